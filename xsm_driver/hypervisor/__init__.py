# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""Hypervisor drivers: what runs the guests of a host.

A driver is a stevedore plugin of the ``xsm_driver.hypervisor`` namespace
(:class:`xsm_driver.hypervisor.base.Driver`): ``qemu`` runs each guest as a
QEMU process, ``model`` runs the verifying workload thread in its place.
"""

import logging

from stevedore import driver as stevedore_driver
from stevedore import exception as stevedore_exc
from stevedore import extension

from xsm_driver.hypervisor import base

LOG = logging.getLogger(__name__)

NAMESPACE = 'xsm_driver.hypervisor'


class UnknownDriver(base.HypervisorError):
    msg_fmt = ('no hypervisor driver %(name)s (namespace %(namespace)s; '
               'installed: %(available)s)')


def _reraise(manager, entrypoint, exc):
    raise exc


def driver_class(name):
    """The class of hypervisor driver ``name``.

    :raises UnknownDriver: no such plugin is installed.
    :raises Exception: whatever the plugin raised while importing; a
        broken driver is never skipped.
    """
    try:
        mgr = stevedore_driver.DriverManager(
            NAMESPACE, name, invoke_on_load=False,
            on_load_failure_callback=_reraise)
    except stevedore_exc.NoMatches:
        available = sorted(extension.ExtensionManager(
            NAMESPACE, on_load_failure_callback=lambda *args: None
        ).entry_points_names())
        raise UnknownDriver(name=name, namespace=NAMESPACE,
                            available=', '.join(available) or '(none)')
    return mgr.driver


def load(name, *args, **kwargs):
    """Build hypervisor driver ``name`` with ``args`` and ``kwargs``."""
    return driver_class(name)(*args, **kwargs)


def from_config(conf, state_dir, name=None):
    """Build the driver ``[hypervisor]driver`` (or ``name``) of ``conf``."""
    cls = driver_class(name or conf.hypervisor.driver)
    return cls.from_config(conf, state_dir)
