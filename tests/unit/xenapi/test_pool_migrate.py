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

"""A VM moves to another host of its pool, its disks staying: VM.pool_migrate.

And what Nova's driver sends the engine: a destination named like a host
of the pool, VIFs named by the names they were made with and mapped to
themselves, a receive check on the destination.
"""

from tests.unit.xenapi import fixtures as xfix
from tests import xenapi_fake as fake
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.xenapi import errors

GiB = fake.GiB


class TestPoolMigrate(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        self.h2 = self.a.add_host('xs2')
        self.shared = self.a.add_sr('Shared', type='nfs')
        self.root = self.a.add_vdi(self.shared, 'root')
        self.web2 = self.a.add_vm('web-2', [self.root], [self.a.network])
        self.root_uuid = self.uuid(self.a, 'VDI', self.root)

    def test_to_a_host_named_like_the_nova_compute(self):
        mid = self.engine.migrate_vm('web-2', 'xs2',
                                     {self.root_uuid: 'Shared'}, {})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual([[self.web2, self.h2, {'live': 'true'}]],
                         self.a.args_of('Async.VM.pool_migrate'))
        self.assertEqual([], self.a.args_of('Async.VM.migrate_send'))
        self.assertEqual([], self.a.args_of('host.migrate_receive'))
        self.assertEqual(self.h2, self.a.get('VM', self.web2)['resident_on'])
        # the same VDI, on the same SR
        [vbd] = self.a.get('VM', self.web2)['VBDs']
        self.assertEqual(self.root, self.a.get('VBD', vbd)['VDI'])
        # progress: the VM's memory
        self.assertEqual(256 << 20, status['progress']['total'])
        self.assertEqual(256 << 20, status['progress']['done'])
        self.assertEqual({'vm': self.uuid(self.a, 'VM', self.web2),
                          'vdis': {}, 'host': 'xs2'}, status['result'])

    def test_pool_slash_host_and_an_unmapped_vif_map(self):
        # the VIF "mapped to itself" (Nova) stays: no VIF map is sent
        vif = self.uuid(self.a, 'VIF', self.a.get('VM', self.web2)['VIFs'][0])
        mid = self.engine.migrate_vm('web-2', 'pool-a/xs2',
                                     {self.root_uuid: 'Shared'},
                                     {vif: xfix.NET})
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertEqual(1, len(self.a.args_of('Async.VM.pool_migrate')))

    def test_abort(self):
        self.a.hold(0.5)
        mid = self.engine.migrate_vm('web-2', 'xs2',
                                     {self.root_uuid: 'Shared'}, {})
        self.wait_for(lambda: self.engine.get(mid)['phase'] == 'copy' and
                      self.engine.get(mid)['xapi_task'], what='the task')
        self.engine.abort(mid)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertEqual(1, len(self.a.args_of('task.cancel')))
        self.assertEqual(self.a.master,
                         self.a.get('VM', self.web2)['resident_on'])

    def test_refusals_before_xapi(self):
        # a disk on the master's local SR: xs2 does not see it
        vm = self.uuid(self.a, 'VM', self.vm)
        exc = self.assertRaises(
            errors.XenAPIError, self.engine.migrate_vm, vm, 'xs2',
            {self.uuid(self.a, 'VDI', self.disk0): 'Local storage',
             self.uuid(self.a, 'VDI', self.disk1): 'Local storage'}, {})
        self.assertIn('host xs2 does not see SR Local storage', str(exc))
        exc = self.assertRaises(
            errors.XenAPIError, self.engine.migrate_vm, 'web-2',
            'pool-a-master', {self.root_uuid: 'Shared'}, {})
        self.assertIn('already runs on host pool-a-master', str(exc))
        self.a.get('host', self.h2)['enabled'] = False
        self.assertRaises(errors.XenAPIError, self.engine.migrate_vm,
                          'web-2', 'xs2', {self.root_uuid: 'Shared'}, {})
        self.assertEqual([], self.a.args_of('Async.VM.pool_migrate'))

    def test_xapi_refusal_in_the_task(self):
        self.a.get('VM', self.web2).update(memory_dynamic_max=32 * GiB,
                                           memory_static_max=32 * GiB)
        mid = self.engine.migrate_vm('web-2', 'xs2',
                                     {self.root_uuid: 'Shared'}, {})
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('HOST_NOT_ENOUGH_FREE_MEMORY', status['error'])
        self.assertEqual(self.a.master,
                         self.a.get('VM', self.web2)['resident_on'])

    def test_a_disk_that_moves_is_a_storage_migration(self):
        mid = self.engine.migrate_vm('web-2', 'xs2',
                                     {self.root_uuid: 'NFS-A'}, {})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual([], self.a.args_of('Async.VM.pool_migrate'))
        self.assertEqual(1, len(self.a.args_of('Async.VM.migrate_send')))


class TestNovaNames(xfix.PoolsTestCase):
    """VIFs named as the agent made them, mapped to themselves."""

    def test_cross_pool_vif_by_its_name(self):
        host = self.engine.host
        host.vm_network = xfix.NET
        vm = host.create_vm('i-9', [{'sr': 'NFS-A', 'size': GiB}],
                            ['port-7'])
        host.start_vm(vm.uuid)
        mid = self.engine.migrate_vm(
            vm.uuid, 'pool-b', {vm.disks[0]['vdi']: 'SR-B'},
            {'port-7': 'port-7'})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual([self.b.network], list(args[4].values()))
        [new] = [r for r, rec in self.b.db['VM'].items()
                 if rec['name_label'] == 'i-9']
        [vif] = self.b.get('VM', new)['VIFs']
        self.assertEqual(self.b.network, self.b.get('VIF', vif)['network'])

    def test_unknown_vif_name(self):
        exc = self.assertRaises(errors.XenAPIError, self.engine.migrate_vm,
                                'web-1', 'pool-b', self.vdi_map(),
                                {'port-x': 'port-x'})
        self.assertIn('port-x', str(exc))


class TestReceivePreflight(xfix.PoolsTestCase):

    def spec(self, sr, size, uuid='00000000-0000-0000-0000-000000000001'):
        return {'vdis': [{'uuid': uuid, 'sr': sr, 'size': size,
                          'allocated': size}]}

    def test_checks(self):
        self.engine.receive_preflight(self.spec('NFS-A', GiB))
        self.assertRaises(host_mod.SRNotFound,
                          self.engine.receive_preflight,
                          self.spec('nope', GiB))
        exc = self.assertRaises(errors.XenAPIError,
                                self.engine.receive_preflight,
                                self.spec('NFS-A', 200 * GiB))
        self.assertIn('SR NFS-A of pool pool-a has', str(exc))
        # a disk already on the SR needs no room there
        uuid = self.uuid(self.a, 'VDI', self.disk0)
        self.engine.receive_preflight(self.spec('Local storage', 200 * GiB,
                                                uuid))
        self.assertEqual('aborted', self.engine.receive_abort('m'))
