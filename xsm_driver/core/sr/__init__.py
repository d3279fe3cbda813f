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

"""Storage repositories (SRs): where the virtual disks of a host live.

An SR holds VDIs and can create, destroy, snapshot, coalesce, attach and
list them, and receive a migrating disk. The interface is
:class:`xsm_driver.core.sr.base.SR`; drivers are stevedore plugins of the
``xsm_driver.sr`` namespace, named in the ``[sr]repositories`` option and
constructed as ``driver(name, path)``:

* ``vhd`` (:mod:`.vhd`, the default): a directory of VHD files, XenServer's
  file SR layout, with XenServer-style snapshots;
* ``raw`` (:mod:`.raw`): a directory of thick raw files, no snapshots.

This module only loads them.
"""

from stevedore import driver
from stevedore import exception as stevedore_exc
from stevedore import extension

from xsm_driver.core import exception

NAMESPACE = 'xsm_driver.sr'


class UnknownSRDriver(exception.XSMError):
    msg_fmt = ("Unknown storage repository driver %(name)r in option "
               "[sr]repositories; available drivers in namespace "
               "%(namespace)s: %(available)s.")


def _available():
    """Names of the installed SR drivers, whether or not they import."""
    mgr = extension.ExtensionManager(
        NAMESPACE, on_load_failure_callback=lambda *args: None)
    return sorted(mgr.entry_points_names())


def load_driver(name, *args, **kwargs):
    """Load and instantiate the SR driver plugin called ``name``.

    :param name: the plugin name, as in ``[sr]repositories`` (e.g. ``vhd``).
    :param args: positional arguments for the driver's constructor.
    :param kwargs: keyword arguments for the driver's constructor.
    :returns: the driver instance.
    :raises UnknownSRDriver: when no plugin of that name is installed.
    :raises Exception: whatever the plugin raised while importing or
        starting; a broken driver is never skipped.
    """
    try:
        mgr = driver.DriverManager(
            NAMESPACE, name,
            invoke_on_load=True, invoke_args=args, invoke_kwds=kwargs,
            on_load_failure_callback=_reraise)
    except stevedore_exc.NoMatches:
        raise UnknownSRDriver(name=name, namespace=NAMESPACE,
                              available=', '.join(_available()) or '(none)')
    return mgr.driver


def _reraise(manager, entrypoint, exc):
    raise exc
