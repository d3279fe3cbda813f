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
:func:`load` finds the plugin through its entry point and, for the
drivers of this package, through a built-in table when the entry points
are not installed (a checkout used without ``pip install -e``).
"""

import importlib
import logging

from stevedore import driver as stevedore_driver
from stevedore import exception as stevedore_exc

from xsm_driver.hypervisor import base

LOG = logging.getLogger(__name__)

NAMESPACE = 'xsm_driver.hypervisor'

#: the drivers of this package, for when their entry points are missing
BUILTIN = {
    'model': 'xsm_driver.hypervisor.model:ModelDriver',
    'qemu': 'xsm_driver.hypervisor.qemu:QemuDriver',
}


class UnknownDriver(base.HypervisorError):
    msg_fmt = ('no hypervisor driver %(name)s (namespace %(namespace)s; '
               'built in: %(builtin)s)')


def _reraise(manager, entrypoint, exc):
    raise exc


def driver_class(name, use_entry_points=True):
    """The class of hypervisor driver ``name``.

    :param use_entry_points: look for an installed entry point first.
    :raises UnknownDriver: neither an entry point nor a built-in.
    """
    if use_entry_points:
        try:
            mgr = stevedore_driver.DriverManager(
                NAMESPACE, name, invoke_on_load=False,
                on_load_failure_callback=_reraise)
            return mgr.driver
        except stevedore_exc.NoMatches:
            pass
    target = BUILTIN.get(name)
    if target is None:
        raise UnknownDriver(name=name, namespace=NAMESPACE,
                            builtin=', '.join(sorted(BUILTIN)))
    module, _, attr = target.partition(':')
    LOG.debug('hypervisor driver %s: no entry point, using the built-in '
              '%s', name, target)
    return getattr(importlib.import_module(module), attr)


def load(name, *args, use_entry_points=True, **kwargs):
    """Build hypervisor driver ``name`` with ``args`` and ``kwargs``."""
    return driver_class(name, use_entry_points)(*args, **kwargs)


def from_config(conf, state_dir, name=None):
    """Build the driver ``[hypervisor]driver`` (or ``name``) of ``conf``."""
    cls = driver_class(name or conf.hypervisor.driver)
    return cls.from_config(conf, state_dir)
