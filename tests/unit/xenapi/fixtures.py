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

"""Two fake pools on loopback and a xenapi engine between them."""

from tests import base
from tests import xenapi_fake as fake
from xsm_driver.core.migration import manager
from xsm_driver.core.xenapi import engine as engine_mod
from xsm_driver.core.xenapi import session

GiB = fake.GiB
NET = 'Pool-wide network associated with eth0'


class PoolsTestCase(base.TestCase):
    """Pool A (the agent's, with VM web-1) and pool B (a destination)."""

    max_concurrent = 3
    check_leaks = True

    def setUp(self):
        super().setUp()
        self.a = fake.FakePool('pool-a', task_seconds=0.2)
        self.b = fake.FakePool('pool-b', task_seconds=0.2)
        self.server_a = self.start_server(self.a)
        self.server_b = self.start_server(self.b)
        self.sr_a = self.a.add_sr('Local storage', host=self.a.master)
        self.sr_a2 = self.a.add_sr('NFS-A', type='nfs')
        self.sr_b = self.b.add_sr('SR-B', type='nfs')
        self.disk0 = self.a.add_vdi(self.sr_a, 'root', 2 * GiB)
        self.disk1 = self.a.add_vdi(self.sr_a, 'data', 1 * GiB)
        self.vm = self.a.add_vm('web-1', [self.disk0, self.disk1],
                                [self.a.network])
        self.snap = self.a.snapshot_vm(self.vm)
        self.engine = self.make_engine()

    def start_server(self, pool, tls_context=None):
        server = fake.XenAPIServer(pool, tls_context).start()
        self.addCleanup(server.stop)
        return server

    def make_pool(self, name, server, password='secret', **kwargs):
        kwargs.setdefault('retry_interval', 0.01)
        kwargs.setdefault('timeout', 5.0)
        return session.Pool(name, server.url, 'root', password, **kwargs)

    def make_engine(self, **kwargs):
        kwargs.setdefault('poll_interval', 0.02)
        kwargs.setdefault('busy_wait', 0.05)
        kwargs.setdefault('lost_timeout', 2.0)
        engine = engine_mod.XenAPIEngine(
            'pool-a', self.make_pool('pool-a', self.server_a),
            {'pool-b': self.make_pool('pool-b', self.server_b)},
            options=manager.Options(max_concurrent=self.max_concurrent),
            state_path=kwargs.pop('state_path', None) or self.make_tempdir(),
            **kwargs)
        self.addCleanup(engine.shutdown)
        return engine

    def uuid(self, pool, cls, ref):
        return pool.get(cls, ref)['uuid']

    def vdi_map(self, sr='SR-B'):
        return {self.uuid(self.a, 'VDI', self.disk0): sr,
                self.uuid(self.a, 'VDI', self.disk1): sr}

    def migrate(self, vm='web-1', dest='pool-b', vdi_map=None,
                vif_map=None, **options):
        return self.engine.migrate_vm(
            vm, dest, self.vdi_map() if vdi_map is None else vdi_map,
            {'0': NET} if vif_map is None else vif_map, **options)

    def wait(self, mid, timeout=15):
        status = self.engine.wait(mid, timeout)
        self.assertIsNotNone(status['finished'], status)
        return status

    def wait_for(self, predicate, timeout=10, what='condition'):
        import time
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            time.sleep(0.01)
        self.fail('timed out waiting for %s' % what)
