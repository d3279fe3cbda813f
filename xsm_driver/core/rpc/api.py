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

"""The client side of the agent's RPC API.

API version history:

* 1.0 - first version: hosts, VMs and their verifying guests, migrations
  as source (``migrate_vm``, ``migrate_vdi``, ``migration_*``) and as
  destination (``receive_*``).
"""

import oslo_messaging as messaging

from xsm_driver.core import rpc

VERSION = '1.0'


def _register_messaging_opts(conf):
    # oslo.messaging 18 registers [oslo_messaging_metrics] and
    # [oslo_messaging_tracing] on the global cfg.CONF only, yet reads them
    # from the transport's conf on every call: a private ConfigOpts needs
    # them too.
    from oslo_messaging._metrics import client as metrics
    from oslo_messaging._tracing import client as tracing
    for group, opts in (('oslo_messaging_metrics',
                         metrics.oslo_messaging_metrics),
                        ('oslo_messaging_tracing',
                         tracing.oslo_messaging_tracing)):
        if group not in conf:
            conf.register_opts(opts, group=group)


def get_transport(conf, url=None):
    """An RPC transport that rebuilds xsm-driver's own exceptions."""
    _register_messaging_opts(conf)
    return messaging.get_rpc_transport(
        conf, url=url, allowed_remote_exmods=rpc.ALLOWED_EXMODS)


class AgentAPI:
    """Call the agent of ``host``.

    :param timeout: seconds to wait for an answer (None: the transport's
        ``rpc_response_timeout``).
    """

    def __init__(self, transport, host, timeout=None):
        self.host = host
        target = messaging.Target(topic=rpc.TOPIC, server=host,
                                  version=VERSION)
        self._client = messaging.get_rpc_client(transport, target,
                                                timeout=timeout)

    def call(self, method, timeout=None, **kwargs):
        client = self._client
        if timeout is not None:
            client = client.prepare(timeout=timeout)
        return client.call({}, method, **kwargs)

    # hosts and VMs
    def host_info(self):
        return self.call('host_info')

    def vdi_list(self, sr=None):
        return self.call('vdi_list', sr=sr)

    def vm_list(self):
        return self.call('vm_list')

    def vm_get(self, vm):
        return self.call('vm_get', vm=vm)

    def vm_create(self, name, disks, vifs=()):
        return self.call('vm_create', name=name, disks=disks,
                         vifs=list(vifs))

    def vm_start(self, vm):
        return self.call('vm_start', vm=vm)

    def vm_stop(self, vm):
        return self.call('vm_stop', vm=vm)

    def vm_destroy(self, vm):
        return self.call('vm_destroy', vm=vm)

    def vm_snapshot(self, vm):
        return self.call('vm_snapshot', vm=vm)

    def guest_start(self, vm, rate=None, read_ratio=1.0, fill=0.0):
        return self.call('guest_start', vm=vm, rate=rate,
                         read_ratio=read_ratio, fill=fill)

    def guest_verify(self, vm):
        return self.call('guest_verify', vm=vm)

    # migrations, as their source
    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None, **options):
        return self.call('migrate_vm', vm=vm, dest_host=dest_host,
                         vdi_map=vdi_map, vif_map=vif_map or {},
                         options=options)

    def migrate_vdi(self, vdi, dest_sr, **options):
        return self.call('migrate_vdi', vdi=vdi, dest_sr=dest_sr,
                         options=options)

    def migration_get(self, migration):
        return self.call('migration_get', migration=migration)

    def migration_list(self):
        return self.call('migration_list')

    def migration_abort(self, migration):
        return self.call('migration_abort', migration=migration)

    def migration_force_complete(self, migration):
        return self.call('migration_force_complete', migration=migration)


class RemotePeer:
    """The destination role of another host, over RPC (see source.py)."""

    def __init__(self, api):
        self._api = api

    def preflight(self, spec):
        return self._api.call('receive_preflight', spec=spec)

    def prepare(self, spec):
        return self._api.call('receive_prepare', spec=spec)

    def compose(self, mid):
        return self._api.call('receive_compose', migration=mid)

    def complete(self, mid, vm_state):
        return self._api.call('receive_complete', migration=mid,
                              vm_state=vm_state)

    def abort(self, mid):
        return self._api.call('receive_abort', migration=mid)

    def status(self, mid):
        return self._api.call('receive_status', migration=mid)
