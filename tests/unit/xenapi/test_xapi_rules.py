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

"""xapi's rules of storage migration: the fake as strict, the engine right.

For each rule of issue 16, ``TestFake*`` checks that the fake pool
refuses (or allows) exactly what xapi does, through the real XenAPI
client; ``TestEngine*`` that the engine follows the rule. The xapi source
of each rule (xapi-project/xen-api master) is named in the test.
"""

import XenAPI

from tests.unit.xenapi import fixtures as xfix
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.xenapi import errors

GiB = xfix.GiB
NET = xfix.NET


class RulesCase(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        self.pa = self.make_pool('pool-a', self.server_a)
        self.pb = self.make_pool('pool-b', self.server_b)
        self.addCleanup(self.pa.logout)
        self.addCleanup(self.pb.logout)

    def token(self, pool=None, fake=None, host=None, network=None):
        pool, fake = pool or self.pb, fake or self.b
        return pool.call('host.migrate_receive', host or fake.master,
                         network or fake.network, {})

    def xapi_refuses(self, code, method, *args, pool=None):
        exc = self.assertRaises(XenAPI.Failure, (pool or self.pa).call,
                                method, *args)
        self.assertEqual(code, exc.details[0], exc.details)
        return exc.details

    def full_map(self, sr=None):
        sr = sr or self.sr_b
        return {v: sr for v in self.a._vm_disks(self.vm)}

    def vif_map(self):
        return {v: self.b.network for v in self.a.get('VM', self.vm)['VIFs']}

    def assert_can_migrate(self, vdi_map=None, vif_map=None, options=None,
                           token=None, vm=None):
        return self.pa.call(
            'VM.assert_can_migrate', vm or self.vm, token or self.token(),
            True, self.full_map() if vdi_map is None else vdi_map,
            self.vif_map() if vif_map is None else vif_map,
            options or {}, {})

    def task_error(self, *args):
        task = self.pa.call('Async.VM.migrate_send', *args)
        self.wait_for(lambda: self.a.get('task', task)['status'] !=
                      'pending', what='the task')
        return self.a.get('task', task)

    def refused_now(self, exc_class=errors.XenAPIError, **kwargs):
        """The engine refuses before xapi is asked to change anything."""
        exc = self.assertRaises(exc_class, self.migrate, **kwargs)
        self.assertFalse([c for c in self.a.calls if c.startswith('Async')])
        return str(exc)


class TestCopyOfARunningVM(RulesCase):
    """The rule.

    xapi_vm_migrate.ml assert_can_migrate (cross_pool): copy of a VM
    that is not halted needs force; within a pool no copy at all
    (migrate_send').
    """

    def test_fake(self):
        details = self.xapi_refuses(
            'VM_BAD_POWER_STATE', 'VM.assert_can_migrate', self.vm,
            self.token(), True, self.full_map(), self.vif_map(),
            {'copy': 'true'}, {})
        self.assertEqual([self.vm, 'halted', 'running'], details[1:])
        self.assertEqual('', self.assert_can_migrate(
            options={'copy': 'true', 'force': 'true'}))
        within = self.task_error(
            self.vm, self.token(self.pa, self.a), True,
            self.full_map(self.sr_a2), {}, {'copy': 'true'}, {})
        self.assertEqual('OPERATION_NOT_ALLOWED', within['error_info'][0])

    def test_engine(self):
        message = self.refused_now(copy=True)
        self.assertIn('VM_BAD_POWER_STATE', message)
        self.assertIn('force=True', message)
        self.assertIn('web-1', message)
        message = self.refused_now(dest='pool-a', copy=True, force=True,
                                   vdi_map=self.vdi_map('NFS-A'), vif_map={})
        self.assertIn('OPERATION_NOT_ALLOWED', message)
        self.assertIn('within its pool', message)


class TestVifMapWithinAPool(RulesCase):
    """The rule.

    xapi_vm_migrate.ml assert_can_migrate (intra_pool): any VIF map is
    OPERATION_NOT_ALLOWED.
    """

    def test_fake(self):
        token = self.token(self.pa, self.a)
        self.xapi_refuses('OPERATION_NOT_ALLOWED', 'VM.assert_can_migrate',
                          self.vm, token, True, self.full_map(self.sr_a2),
                          {v: self.a.network for v in
                           self.a.get('VM', self.vm)['VIFs']}, {}, {})
        self.assertEqual('', self.assert_can_migrate(
            vdi_map=self.full_map(self.sr_a2), vif_map={}, token=token))

    def test_engine(self):
        other = self.a.add_network('other')
        self.assertIsNotNone(other)
        message = self.refused_now(dest='pool-a',
                                   vdi_map=self.vdi_map('NFS-A'),
                                   vif_map={'0': 'other'})
        self.assertIn('OPERATION_NOT_ALLOWED', message)
        self.assertIn('leave the VIF map empty', message)
        # a VIF "mapped" to its own network changes nothing: xapi gets {}
        status = self.wait(self.migrate(dest='pool-a', vif_map={'0': NET},
                                        vdi_map=self.vdi_map('NFS-A')))
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual({}, args[4])


class TestDiskMoveKeepsTheHost(RulesCase):
    """The rule.

    Within a pool the VM's disks move and the VM stays on its host;
    xapi moves the VM to whatever host the token names.
    """

    def setUp(self):
        super().setUp()
        self.h2 = self.a.add_host('pool-a-h2')
        self.shared = self.a.add_sr('NFS-2', type='nfs')
        disk = self.a.add_vdi(self.shared, 'disk', GiB)
        self.vm2 = self.a.add_vm('db-1', [disk], [self.a.network],
                                 host=self.h2)
        self.disk2 = disk

    def test_fake(self):
        # a token for the master moves the VM there: xapi does the same
        token = self.token(self.pa, self.a)
        task = self.pa.call('Async.VM.migrate_send', self.vm2, token, True,
                            {self.disk2: self.sr_a2}, {}, {}, {})
        self.wait_for(lambda: self.a.get('task', task)['status'] ==
                      'success', what='the task')
        self.assertEqual(self.a.master,
                         self.a.get('VM', self.vm2)['resident_on'])

    def test_engine(self):
        status = self.wait(self.engine.migrate_vm(
            'db-1', 'pool-a', {self.uuid(self.a, 'VDI', self.disk2):
                               'NFS-A'}))
        self.assertEqual('done', status['phase'], status['error'])
        [(host, _net, _o)] = self.a.args_of('host.migrate_receive')
        self.assertEqual(self.h2, host)
        self.assertEqual(self.h2, self.a.get('VM', self.vm2)['resident_on'])


class TestSnapshotVifs(RulesCase):
    """The rule.

    xapi_vm_migrate.ml assert_can_migrate/infer_vif_map: the VIFs of
    the VM's snapshots are mapped too, or share a MAC with a mapped VIF.
    """

    def setUp(self):
        super().setUp()
        [self.snap_vif] = self.a.get('VM', self.snap)['VIFs']

    def test_fake(self):
        # same MAC as the VM's mapped VIF: inferred
        self.assertEqual('', self.assert_can_migrate())
        self.a.get('VIF', self.snap_vif)['MAC'] = '02:00:00:00:99:99'
        details = self.xapi_refuses(
            'VIF_NOT_IN_MAP', 'VM.assert_can_migrate', self.vm,
            self.token(), True, self.full_map(), self.vif_map(), {}, {})
        self.assertEqual([self.snap_vif], details[1:])
        vif_map = dict(self.vif_map(), **{self.snap_vif: self.b.network})
        self.assertEqual('', self.assert_can_migrate(vif_map=vif_map))

    def test_engine_maps_a_snapshot_vif_by_its_mac(self):
        self.a.get('VIF', self.snap_vif)['MAC'] = '02:00:00:00:99:99'
        other = self.b.add_network('old-net')
        status = self.wait(self.migrate(vif_map={
            '0': NET, '02:00:00:00:99:99': 'old-net'}))
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual(other, args[4][self.snap_vif])

    def test_engine_names_an_unmapped_snapshot_vif(self):
        self.a.get('VIF', self.snap_vif)['MAC'] = '02:00:00:00:99:99'
        message = self.refused_now(mig_errors.VIFNotInMap)
        self.assertIn(self.uuid(self.a, 'VIF', self.snap_vif), message)
        self.assertIn("of snapshot 'snap'", message)


class TestSuspendedVM(RulesCase):
    """The rule.

    xapi_vm_lifecycle.ml allowed_power_states: migrate_send in Halted,
    Suspended, Running; the suspend image goes to the destination's
    suspend-image SR or default SR (xapi_vm_migrate.ml migrate_send').
    """

    def setUp(self):
        super().setUp()
        disk = self.a.add_vdi(self.sr_a, 'sleepy', GiB)
        self.vm3 = self.a.add_vm('sleeper', [disk], [self.a.network],
                                 power_state='Suspended')
        self.disk3 = disk
        self.suspend = self.a.get('VM', self.vm3)['suspend_VDI']

    def test_fake(self):
        args = (self.vm3, self.token(), False, {self.disk3: self.sr_b},
                {v: self.b.network for v in
                 self.a.get('VM', self.vm3)['VIFs']}, {}, {})
        # no default or suspend SR in pool B: the image has no place
        failed = self.task_error(*args)
        self.assertEqual(['VDI_NOT_IN_MAP', self.suspend],
                         failed['error_info'])
        self.b.set_default_sr(self.sr_b)
        self.assertEqual('success', self.task_error(*args)['status'])
        [moved] = self.b.find('VM', name_label='sleeper')
        self.assertEqual('Suspended', self.b.get('VM', moved)['power_state'])
        self.assertEqual(2, len(self.b.find('VDI', SR=self.sr_b)))
        # paused: refused
        self.a.get('VM', self.vm)['power_state'] = 'Paused'
        failed = self.task_error(self.vm, self.token(), True,
                                 self.full_map(), self.vif_map(), {}, {})
        self.assertEqual(['VM_BAD_POWER_STATE', self.vm,
                          'halted, suspended, running', 'paused'],
                         failed['error_info'])

    def test_engine(self):
        self.b.set_default_sr(self.sr_b)
        status = self.wait(self.engine.migrate_vm(
            'sleeper', 'pool-b', {self.uuid(self.a, 'VDI', self.disk3):
                                  'SR-B'}, {'0': NET}))
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertIs(False, args[2])
        self.assertEqual(self.sr_b, args[3][self.suspend])

    def test_engine_paused_vm_is_refused(self):
        self.a.get('VM', self.vm)['power_state'] = 'Paused'
        message = self.refused_now()
        self.assertIn('paused', message)
        self.assertIn('unpause', message)


class TestInsertedCD(RulesCase):
    """The rule.

    xapi_vm_migrate.ml vdi_filter skips CDs; find_cds_to_eject and
    eject_cds eject them (not for a suspended VM).
    """

    def test_fake(self):
        isos = self.a.add_sr('ISOs', type='iso', content_type='iso')
        vbd = self.a.insert_cd(self.vm, self.a.add_vdi(isos, 'x.iso', GiB))
        self.assertEqual('', self.assert_can_migrate())
        self.assertEqual('success', self.task_error(
            self.vm, self.token(), True, self.full_map(), self.vif_map(),
            {}, {})['status'])
        self.assertEqual([vbd], self.a.ejected)


class TestPoolMigrateOfAHaltedVMsDisk(RulesCase):
    """The rule.

    message_forwarding.ml VDI.pool_migrate: any VM power state
    migrate_send allows; no VBD: VDI_NEEDS_VM_FOR_MIGRATE.
    """

    def test_fake(self):
        disk = self.a.add_vdi(self.sr_a, 'cold', GiB)
        self.a.add_vm('cold-1', [disk], power_state='Halted')
        task = self.pa.call('Async.VDI.pool_migrate', disk, self.sr_a2, {})
        self.wait_for(lambda: self.a.get('task', task)['status'] ==
                      'success', what='the task')
        loose = self.a.add_vdi(self.sr_a, 'loose', GiB)
        task = self.pa.call('Async.VDI.pool_migrate', loose, self.sr_a2, {})
        self.wait_for(lambda: self.a.get('task', task)['status'] ==
                      'failure', what='the task')
        self.assertEqual(['VDI_NEEDS_VM_FOR_MIGRATE', loose],
                         self.a.get('task', task)['error_info'])


class TestOrphanSnapshotVDI(RulesCase):
    """The rule.

    xapi_vm_migrate.ml migrate_send': a snapshot VDI whose original is
    gone goes to the destination's default SR, else VDI_NOT_IN_MAP.
    """

    def setUp(self):
        super().setUp()
        # the snapshot's first VDI loses its original
        vbd = self.a.get('VM', self.snap)['VBDs'][0]
        self.orphan = self.a.get('VBD', vbd)['VDI']
        self.a.get('VDI', self.orphan)['snapshot_of'] = 'OpaqueRef:gone'

    def test_fake(self):
        args = (self.vm, self.token(), True, self.full_map(),
                self.vif_map(), {}, {})
        self.assertEqual(['VDI_NOT_IN_MAP', self.orphan],
                         self.task_error(*args)['error_info'])
        default = self.b.add_sr('Default', type='nfs')
        self.b.set_default_sr(default)
        self.assertEqual('success', self.task_error(*args)['status'])
        self.assertEqual(1, len(self.b.find('VDI', SR=default)))

    def test_engine(self):
        default = self.b.add_sr('Default', type='nfs')
        self.b.set_default_sr(default)
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual(default, args[3][self.orphan])

    def test_engine_without_a_default_sr(self):
        message = self.refused_now(mig_errors.VDINotInMap)
        self.assertIn(self.uuid(self.a, 'VDI', self.orphan), message)


class TestSRFeatures(RulesCase):
    """The rule.

    xapi_vm_migrate.ml assert_sr_support_operations: SM features of
    every moving VDI's SR (VDI_SNAPSHOT, VDI_MIRROR) and of its
    destination (VDI_SNAPSHOT, VDI_MIRROR_IN), whatever the power state;
    SR.allowed_operations (empty while the SR is busy) plays no part.
    """

    def test_fake(self):
        for sr in (self.sr_a, self.sr_b):
            pool = self.a if sr == self.sr_a else self.b
            pool.get('SR', sr)['allowed_operations'] = []
        self.assertEqual('', self.assert_can_migrate())
        self.b.sm_features('nfs', ['VDI_SNAPSHOT', 'VDI_MIRROR_IN'])
        self.assertEqual('', self.assert_can_migrate())
        self.b.sm_features('nfs', ['VDI_SNAPSHOT'])
        details = self.xapi_refuses(
            'SR_DOES_NOT_SUPPORT_MIGRATION', 'VM.assert_can_migrate',
            self.vm, self.token(), True, self.full_map(), self.vif_map(),
            {}, {})
        self.assertEqual([self.sr_b, 'VDI_MIRROR_IN'], details[1:])
        self.b.sm_features('nfs', ['VDI_SNAPSHOT', 'VDI_MIRROR'])
        self.a.sm_features('ext', ['VDI_SNAPSHOT'])
        self.a.get('VM', self.vm)['power_state'] = 'Halted'
        details = self.xapi_refuses(
            'SR_DOES_NOT_SUPPORT_MIGRATION', 'VM.assert_can_migrate',
            self.vm, self.token(), False, self.full_map(), self.vif_map(),
            {}, {})
        self.assertEqual([self.sr_a, 'VDI_MIRROR'], details[1:])

    def test_engine_busy_srs_are_fine(self):
        self.a.get('SR', self.sr_a)['allowed_operations'] = []
        self.b.get('SR', self.sr_b)['allowed_operations'] = []
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])

    def test_engine_halted_vm_on_an_sr_that_cannot_mirror(self):
        self.a.sm_features('ext', ['VDI_CREATE', 'VDI_SNAPSHOT'])
        disk = self.a.add_vdi(self.sr_a, 'cold', GiB)
        self.a.add_vm('cold-1', [disk], power_state='Halted')
        exc = self.assertRaises(
            errors.XenAPIError, self.engine.migrate_vm, 'cold-1', 'pool-b',
            {self.uuid(self.a, 'VDI', disk): 'SR-B'})
        self.assertIn('SR_DOES_NOT_SUPPORT_MIGRATION', str(exc))
        self.assertIn('Local storage', str(exc))
        self.assertFalse([c for c in self.a.calls if c.startswith('Async')])


class TestVersions(RulesCase):
    """The rule.

    helpers.ml Checks.Migration: platform_version, xapi_build and xen
    must not decrease; across pools VM_HOST_INCOMPATIBLE_VERSION_MIGRATE
    raised as [vm; host], within one NOT_SUPPORTED_DURING_UPGRADE.
    """

    def older_xen(self, pool, host):
        pool.get('host', host)['software_version']['xen'] = '4.17.5-3'

    def test_fake(self):
        self.older_xen(self.b, self.b.master)
        details = self.xapi_refuses(
            'VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', 'VM.assert_can_migrate',
            self.vm, self.token(), True, self.full_map(), self.vif_map(),
            {}, {})
        self.assertEqual([self.vm, self.b.master], details[1:])
        h2 = self.a.add_host('pool-a-h2')
        self.older_xen(self.a, h2)
        self.xapi_refuses(
            'NOT_SUPPORTED_DURING_UPGRADE', 'VM.assert_can_migrate',
            self.vm, self.token(self.pa, self.a, host=h2), True,
            self.full_map(self.sr_a2), {}, {}, {})

    def test_engine(self):
        self.older_xen(self.b, self.b.master)
        message = self.refused_now()
        self.assertIn('VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', message)
        self.assertIn('xen 4.17.5-3', message)
        self.assertIn('pool-b-master', message)


class TestVersionErrorOrder(RulesCase):
    """The rule.

    VM_HOST_INCOMPATIBLE_VERSION_MIGRATE comes as [vm; host]
    (xapi_vm_migrate.ml assert_can_migrate); the [host; vm] of
    datamodel_errors.ml is still understood.
    """

    def test_engine(self):
        for details in ((self.vm, self.b.master), (self.b.master, self.vm)):
            self.a.fail('VM.assert_can_migrate',
                        'VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', *details)
            status = self.wait(self.migrate())
            self.assertEqual('aborted', status['phase'])
            self.assertIn("destination host %s 'pool-b-master' runs an "
                          "older" % self.uuid(self.b, 'host', self.b.master),
                          status['error'])
            self.assertIn("source of VM %s 'web-1'"
                          % self.uuid(self.a, 'VM', self.vm), status['error'])


class TestMigrationNetwork(RulesCase):
    """The rule.

    xapi_host.ml migrate_receive: the destination host needs a PIF on
    the network (HOST_CANNOT_ATTACH_NETWORK [host; network]) with an IP
    (PIF_HAS_NO_NETWORK_CONFIGURATION or INTERFACE_HAS_NO_IP [pif]).
    """

    def setUp(self):
        super().setUp()
        self.storage = self.b.add_network('storage-net')

    def test_fake(self):
        details = self.xapi_refuses(
            'HOST_CANNOT_ATTACH_NETWORK', 'host.migrate_receive',
            self.b.master, self.storage, {}, pool=self.pb)
        self.assertEqual([self.b.master, self.storage], details[1:])
        pif = self.b.add_pif(self.b.master, self.storage, ip='')
        self.xapi_refuses('PIF_HAS_NO_NETWORK_CONFIGURATION',
                          'host.migrate_receive', self.b.master,
                          self.storage, {}, pool=self.pb)
        self.b.get('PIF', pif)['ip_configuration_mode'] = 'DHCP'
        details = self.xapi_refuses(
            'INTERFACE_HAS_NO_IP', 'host.migrate_receive', self.b.master,
            self.storage, {}, pool=self.pb)
        self.assertEqual([pif], details[1:])

    def test_engine_checks_first(self):
        message = self.refused_now(network='storage-net')
        self.assertIn('HOST_CANNOT_ATTACH_NETWORK', message)
        self.assertIn("network %s 'storage-net'"
                      % self.uuid(self.b, 'network', self.storage), message)
        self.assertIn('pool-b-master', message)
        pif = self.b.add_pif(self.b.master, self.storage, ip='')
        message = self.refused_now(network='storage-net')
        self.assertIn('PIF_HAS_NO_NETWORK_CONFIGURATION', message)
        self.b.get('PIF', pif)['ip_configuration_mode'] = 'DHCP'
        self.assertIn('INTERFACE_HAS_NO_IP',
                      self.refused_now(network='storage-net'))
        self.assertNotIn('host.migrate_receive', self.b.calls)

    def test_engine_translates_xapi_s_refusal(self):
        # the network loses its address between our check and xapi's
        self.b.fail('host.migrate_receive', 'HOST_CANNOT_ATTACH_NETWORK',
                    self.b.master, self.b.network)
        status = self.wait(self.migrate())
        self.assertEqual('aborted', status['phase'])
        self.assertIn("host %s 'pool-b-master' has no interface on network"
                      % self.uuid(self.b, 'host', self.b.master),
                      status['error'])
        self.assertIn('HOST_CANNOT_ATTACH_NETWORK', status['error'])


class TestLocalLiveMigrationOnADisabledHost(RulesCase):
    """The rule.

    xapi_vm_helpers.ml assert_can_boot_here: a disabled host refuses VMs,
    but a running VM whose disks move while it stays on its host (a local
    live migration) is not refused.
    """

    def setUp(self):
        super().setUp()
        self.a.get('host', self.a.master)['enabled'] = False

    def test_fake(self):
        self.assertEqual('', self.assert_can_migrate(
            vdi_map=self.full_map(self.sr_a2), vif_map={},
            token=self.token(self.pa, self.a)))
        h2 = self.a.add_host('pool-a-h2', enabled=False)
        self.xapi_refuses('HOST_DISABLED', 'VM.assert_can_migrate', self.vm,
                          self.token(self.pa, self.a, host=h2), True,
                          self.full_map(self.sr_a2), {}, {}, {})

    def test_engine(self):
        status = self.wait(self.migrate(dest='pool-a', vif_map={},
                                        vdi_map=self.vdi_map('NFS-A')))
        self.assertEqual('done', status['phase'], status['error'])
        status = self.wait(self.engine.migrate_vdi(
            self.uuid(self.a, 'VDI', self.a._vm_disks(self.vm)[0]),
            'Local storage'))
        self.assertEqual('done', status['phase'], status['error'])


class TestSuspendImageWithinThePool(RulesCase):
    """The rule.

    xapi_vm_migrate.ml migrate_send': within a pool the suspend image of
    a suspended VM stays where it is when the destination host sees its
    SR.
    """

    def test_engine(self):
        disk = self.a.add_vdi(self.sr_a, 'sleepy', GiB)
        vm = self.a.add_vm('sleeper', [disk], power_state='Suspended')
        image = self.a.get('VM', vm)['suspend_VDI']
        status = self.wait(self.engine.migrate_vm(
            'sleeper', 'pool-a', {self.uuid(self.a, 'VDI', disk): 'NFS-A'}))
        self.assertEqual('done', status['phase'], status['error'])
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertNotIn(image, args[3])
        self.assertEqual(self.sr_a, self.a.get('VDI', image)['SR'])


class TestSynchronousCalls(RulesCase):
    """The rule.

    ``VM.migrate_send`` and ``VDI.pool_migrate`` without ``Async.`` run
    the same rules and answer with the result or the failure.
    """

    def test_fake(self):
        self.xapi_refuses('VM_BAD_POWER_STATE', 'VM.migrate_send', self.vm,
                          self.token(), True, self.full_map(),
                          self.vif_map(), {'copy': 'true'}, {})
        loose = self.a.add_vdi(self.sr_a, 'loose', GiB)
        self.xapi_refuses('VDI_NEEDS_VM_FOR_MIGRATE', 'VDI.pool_migrate',
                          loose, self.sr_a2, {})
        new = self.pa.call('VDI.pool_migrate', self.disk1, self.sr_a2, {})
        self.assertEqual(self.sr_a2, self.a.get('VDI', new)['SR'])
