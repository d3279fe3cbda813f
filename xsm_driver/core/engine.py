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

"""Migration engines: what runs the migrations an agent is asked for.

An engine is a stevedore plugin of the ``xsm_driver.engine`` namespace,
chosen by ``[agent]engine``; the plugin is a factory called as
``factory(conf, peer_factory, options)`` that returns an object with the
public methods of the native
:class:`~xsm_driver.core.migration.manager.Manager` the agent's endpoint
calls (``migrate_vm``, ``migrate_vdi``, ``get``, ``list``, ``abort``,
``force_complete``, ``active``, ``recover``, ``shutdown``, the
``receive_*`` methods) and a ``host`` attribute the endpoint lists SRs,
VDIs and VMs from:

* ``native``: our own data path under the VMs of this host
  (:func:`native`);
* ``xenapi``: a XenServer or XCP-ng pool, whose xapi migrates its VMs
  (:func:`xsm_driver.core.xenapi.engine.from_config`).
"""

from stevedore import driver
from stevedore import exception as stevedore_exc
from stevedore import extension

from xsm_driver.core import exception

NAMESPACE = 'xsm_driver.engine'


class UnknownEngine(exception.XSMError):
    msg_fmt = ("Unknown migration engine %(name)r in option [agent]engine; "
               "available engines in namespace %(namespace)s: "
               "%(available)s.")


def native(conf, peer_factory=None, options=None):
    """The native engine: this host's ``[sr]repositories`` and VMs."""
    from xsm_driver.core.migration import host as host_mod
    from xsm_driver.core.migration import manager
    # [hypervisor]driver chooses what runs the guests (model by default)
    host = host_mod.Host.from_config(
        conf.agent.host, conf.sr.repositories, conf.agent.state_path,
        conf=conf if 'hypervisor' in conf else None)
    return manager.Manager(host, peer_factory=peer_factory, options=options)


def _reraise(manager, entrypoint, exc):
    raise exc


def load(conf, peer_factory=None, options=None, name=None):
    """Build the engine ``name`` (default: ``[agent]engine``).

    :raises UnknownEngine: no plugin of that name is installed.
    :raises Exception: whatever the plugin raised while importing or
        starting; a broken engine is never skipped.
    """
    name = name or conf.agent.engine
    try:
        mgr = driver.DriverManager(
            NAMESPACE, name, invoke_on_load=True,
            invoke_args=(conf, peer_factory, options),
            on_load_failure_callback=_reraise)
    except stevedore_exc.NoMatches:
        available = extension.ExtensionManager(
            NAMESPACE, on_load_failure_callback=lambda *a: None)
        raise UnknownEngine(name=name, namespace=NAMESPACE,
                            available=', '.join(sorted(
                                available.entry_points_names())) or
                            '(none)')
    return mgr.driver
