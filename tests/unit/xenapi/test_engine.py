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

"""The xenapi engine against fake pools, through the real XenAPI client."""

import http.server
import logging
import socket
import threading
import time
import xmlrpc.server

import fixtures

from tests.unit.xenapi import fixtures as xfix
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.nbd import tls
from xsm_driver.core.xenapi import engine as engine_mod
from xsm_driver.core.xenapi import errors
from xsm_driver.core.xenapi import session

GiB = xfix.GiB


class TestCrossPool(xfix.PoolsTestCase):

    def test_vm_moves_with_every_disk_and_snapshot(self):
        vm_uuid = self.uuid(self.a, 'VM', self.vm)
        old = self.vdi_map()
        mid = self.migrate()
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertIsNone(status['error'])
        self.assertEqual(100.0, status['progress']['percent'])
        self.assertEqual('xenapi', status['engine'])
        self.assertEqual(sorted(old), status['vdis'])
        # the VM left pool A, with its snapshot; it runs in pool B
        self.assertEqual([], self.a.find('VM', uuid=vm_uuid))
        self.assertEqual([], self.a.find('VDI', SR=self.sr_a))
        [moved] = self.b.find('VM', uuid=vm_uuid)
        self.assertEqual('Running', self.b.get('VM', moved)['power_state'])
        # root, data and both their snapshot VDIs are on SR-B
        self.assertEqual(4, len(self.b.find('VDI', SR=self.sr_b)))
        # the result maps each old disk to its new VDI in pool B
        self.assertEqual(vm_uuid, status['result']['vm'])
        self.assertEqual(sorted(old), sorted(status['result']['vdis']))
        for new in status['result']['vdis'].values():
            [ref] = self.b.find('VDI', uuid=new)
            self.assertEqual(self.sr_b, self.b.get('VDI', ref)['SR'])
        # xapi's order: receive on B, check, then send on A
        self.assertIn('host.migrate_receive', self.b.calls)
        calls = self.a.calls
        self.assertLess(calls.index('VM.assert_can_migrate'),
                        calls.index('Async.VM.migrate_send'))
        self.assertEqual(1, calls.count('Async.VM.migrate_send'))
        self.assertEqual('done', self.engine.get(mid)['phase'])
        self.assertEqual(0, self.engine.active())

    def test_xapi_gets_full_maps_and_the_migration_network(self):
        storage_net = self.b.add_network('storage-net')
        self.b.add_pif(self.b.master, storage_net, ip='10.0.0.2')
        front = self.b.add_network('front')
        self.engine = self.make_engine(migration_network='storage-net')
        snap_vdis = [self.a.get('VBD', vbd)['VDI'] for vbd in
                     self.a.get('VM', self.snap)['VBDs']]
        [vif] = self.a.get('VM', self.vm)['VIFs']
        [snap_vif] = self.a.get('VM', self.snap)['VIFs']
        mac = self.a.get('VIF', vif)['MAC']
        mid = self.migrate(vif_map={mac.upper(): 'front'})
        self.assertEqual('done', self.wait(mid)['phase'])
        # Host.migrate_receive on the destination, on the chosen network
        [(host, network, _opts)] = self.b.args_of('host.migrate_receive')
        self.assertEqual(self.b.master, host)
        self.assertEqual(storage_net, network)
        # migrate_send got every VDI of the VM and of its snapshot, by ref
        [args] = self.a.args_of('Async.VM.migrate_send')
        vm, token, live, vdi_map, vif_map, options, vgpu = args
        self.assertEqual(self.vm, vm)
        self.assertIs(True, live)
        self.assertEqual(self.b.master, token['host'])
        self.assertEqual(sorted([self.disk0, self.disk1] + snap_vdis),
                         sorted(vdi_map))
        self.assertEqual({self.sr_b}, set(vdi_map.values()))
        # the snapshot's VIF (same MAC) follows the VM's, as xapi infers
        self.assertEqual({vif: front, snap_vif: front}, vif_map)
        self.assertEqual(({}, {}), (options, vgpu))
        # the same maps were checked first
        [check] = self.a.args_of('VM.assert_can_migrate')
        self.assertEqual(args[2:], check[2:])
        # the VM's interface is on the mapped network in pool B
        [moved] = self.b.find('VM', name_label='web-1')
        [new_vif] = self.b.get('VM', moved)['VIFs']
        self.assertEqual(front, self.b.get('VIF', new_vif)['network'])

    def test_request_network_overrides_and_options_reach_xapi(self):
        self.b.add_network('storage-net')
        other = self.b.add_network('other-net')
        self.b.add_pif(self.b.master, other, ip='10.0.1.2')
        self.engine = self.make_engine(migration_network='storage-net')
        mid = self.migrate(network='other-net', copy=True, force=True,
                           compress=True)
        self.assertEqual('done', self.wait(mid)['phase'])
        [(_host, network, _o)] = self.b.args_of('host.migrate_receive')
        self.assertEqual(other, network)
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual({'copy': 'true', 'compress': 'true',
                          'force': 'true'}, args[5])

    def test_management_network_by_default(self):
        self.assertEqual('done', self.wait(self.migrate())['phase'])
        [(_host, network, _o)] = self.b.args_of('host.migrate_receive')
        self.assertEqual(self.b.network, network)

    def test_halted_vm_moves_too(self):
        disk = self.a.add_vdi(self.sr_a, 'cold', GiB)
        vm = self.a.add_vm('cold-1', [disk], power_state='Halted')
        mid = self.engine.migrate_vm(
            'cold-1', 'pool-b', {self.uuid(self.a, 'VDI', disk): 'SR-B'})
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertEqual([], self.a.find('VM', name_label='cold-1'))
        self.assertTrue(self.b.find('VM', name_label='cold-1'))
        self.assertNotIn(vm, self.a.db['VM'])

    def test_copy_keeps_the_source(self):
        # xapi copies a running VM across pools only when forced
        mid = self.migrate(copy=True, force=True)
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertIn(self.vm, self.a.db['VM'])
        self.assertEqual(1, len(self.b.find('VM', name_label='web-1')))

    def test_progress_is_reported_while_the_task_runs(self):
        self.a.hold(0.5)
        mid = self.migrate()
        self.wait_for(lambda: self.engine.get(mid)['phase'] == 'copy' and
                      self.engine.get(mid)['progress']['percent'] > 0,
                      what='progress')
        status = self.engine.get(mid)
        self.assertLess(status['progress']['percent'], 100)
        self.assertIsNotNone(status['xapi_task'])
        self.assertEqual([mid], [s['id'] for s in self.engine.list()])
        self.assertEqual(1, self.engine.active())
        # force-complete changes nothing: xapi already goes flat out
        self.assertEqual('copy', self.engine.force_complete(mid)['phase'])
        self.a.release()
        self.assertEqual('done', self.wait(mid)['phase'])


class TestWithinPool(xfix.PoolsTestCase):

    def test_vm_disks_move_to_another_sr_of_the_pool(self):
        mid = self.migrate(dest='pool-a', vdi_map=self.vdi_map('NFS-A'),
                           vif_map={})
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertIn(self.vm, self.a.db['VM'])
        self.assertEqual([], self.a.find('VDI', SR=self.sr_a))
        self.assertEqual(4, len(self.a.find('VDI', SR=self.sr_a2)))
        self.assertNotIn('host.migrate_receive', self.b.calls)

    def test_vdi_pool_migrate(self):
        disk = self.uuid(self.a, 'VDI', self.disk1)
        mid = self.engine.migrate_vdi(disk, 'NFS-A')
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual('vdi', status['kind'])
        new = status['result']['vdis'][disk]
        [ref] = self.a.find('VDI', uuid=new)
        self.assertEqual(self.sr_a2, self.a.get('VDI', ref)['SR'])
        vbd = self.a.get('VM', self.vm)['VBDs'][1]
        self.assertEqual(ref, self.a.get('VBD', vbd)['VDI'])
        self.assertIn('Async.VDI.pool_migrate', self.a.calls)
        self.assertNotIn('Async.VM.migrate_send', self.a.calls)

    def test_vdi_pool_migrate_of_a_halted_vm_s_disk(self):
        # xapi picks a host for a VM that does not run
        # (message_forwarding.ml VDI.pool_migrate)
        disk = self.a.add_vdi(self.sr_a, 'cold', GiB)
        self.a.add_vm('cold-1', [disk], power_state='Halted')
        status = self.wait(self.engine.migrate_vdi(
            self.uuid(self.a, 'VDI', disk), 'NFS-A'))
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual([], self.a.find('VDI', SR=self.sr_a,
                                         name_label='cold'))
        self.assertIn('Async.VDI.pool_migrate', self.a.calls)

    def test_vdi_pool_migrate_of_a_vdi_without_vm(self):
        disk = self.a.add_vdi(self.sr_a, 'loose', GiB)
        exc = self.assertRaises(errors.XenAPIError, self.engine.migrate_vdi,
                                self.uuid(self.a, 'VDI', disk), 'NFS-A')
        self.assertIn('VDI_NEEDS_VM_FOR_MIGRATE', str(exc))
        self.assertIn('vdi-copy', str(exc))
        self.assertNotIn('Async.VDI.pool_migrate', self.a.calls)

    def test_vdi_pool_migrate_space(self):
        self.a.get('SR', self.sr_a2)['physical_size'] = GiB // 2
        self.assertRaises(mig_errors.InsufficientSpace,
                          self.engine.migrate_vdi,
                          self.uuid(self.a, 'VDI', self.disk0), 'NFS-A')


class TestPreflight(xfix.PoolsTestCase):
    """Refusals before anything changes, from XenAPI records."""

    def assertNothingStarted(self):
        self.assertNotIn('host.migrate_receive', self.b.calls)
        self.assertNotIn('VM.assert_can_migrate', self.a.calls)
        self.assertFalse([c for c in self.a.calls if c.startswith('Async')])
        self.assertEqual(0, self.engine.active())

    def refused(self, exc_class, **kwargs):
        exc = self.assertRaises(exc_class, self.migrate, **kwargs)
        self.assertNothingStarted()
        return str(exc)

    def test_unmapped_disk_is_named(self):
        vdi_map = self.vdi_map()
        missing = self.uuid(self.a, 'VDI', self.disk1)
        del vdi_map[missing]
        message = self.refused(mig_errors.VDINotInMap, vdi_map=vdi_map)
        self.assertIn(missing, message)
        self.assertIn('VDI_NOT_IN_MAP', message)

    def test_snapshot_vdis_follow_their_disk(self):
        # mapping only the disks is enough: the snapshots' VDIs follow
        mid = self.migrate()
        self.assertEqual('done', self.wait(mid)['phase'])

    def test_unmapped_vif(self):
        message = self.refused(mig_errors.VIFNotInMap, vif_map={})
        self.assertIn('VIF_NOT_IN_MAP', message)
        self.assertIn('device 0', message)

    def test_unknown_vif_and_vdi(self):
        self.assertIn('not a network interface',
                      self.refused(errors.XenAPIError, vif_map={'7': 'x'}))
        vdi_map = dict(self.vdi_map(), nope='SR-B')
        self.assertIn('nope', self.refused(errors.XenAPIError,
                                           vdi_map=vdi_map))

    def test_not_enough_space(self):
        self.b.get('SR', self.sr_b)['physical_size'] = GiB // 2
        message = self.refused(mig_errors.InsufficientSpace)
        self.assertIn('SR-B', message)
        # 512 + 256 MiB of disks, 2 x 4 MiB of snapshots, 2 x 64 MiB
        # headroom for the running disks
        self.assertIn('needs 904.0 MiB', message)
        self.assertIn('has 512.0 MiB free', message)

    def test_destination_sr_cannot_receive(self):
        self.b.sm_features('nfs', ['VDI_CREATE', 'VDI_SNAPSHOT'])
        message = self.refused(errors.XenAPIError)
        self.assertIn('cannot receive', message)
        self.assertIn('VDI_MIRROR_IN', message)
        self.assertIn('SR_DOES_NOT_SUPPORT_MIGRATION', message)

    def test_source_sr_cannot_mirror(self):
        self.a.sm_features('ext', ['VDI_CREATE', 'VDI_SNAPSHOT'])
        message = self.refused(errors.XenAPIError)
        self.assertIn('Local storage', message)
        self.assertIn('VDI_MIRROR', message)
        self.assertIn('SR_DOES_NOT_SUPPORT_MIGRATION', message)

    def test_destination_host_disabled(self):
        self.b.get('host', self.b.master)['enabled'] = False
        message = self.refused(errors.XenAPIError)
        self.assertIn('pool-b-master', message)
        self.assertIn('HOST_DISABLED', message)

    def test_older_destination(self):
        self.b.get('host', self.b.master)['software_version'][
            'platform_version'] = '3.2.0'
        message = self.refused(errors.XenAPIError)
        self.assertIn('VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', message)
        self.assertIn('3.2.0', message)

    def test_unknown_pool_sr_vm_option(self):
        self.assertIn('pool-a, pool-b',
                      self.refused(errors.XenAPIError, dest='pool-z'))
        self.assertIn('no SR', self.refused(errors.XenAPIError,
                                            vdi_map=self.vdi_map('nope')))
        self.assertIn('no VM', self.refused(errors.XenAPIError, vm='nope'))
        self.assertIn('knows', self.refused(errors.NotSupported, turbo=1))

    def test_inserted_cd_is_left_to_xapi(self):
        # xapi skips CD drives and ejects them itself
        # (xapi_vm_migrate.ml vdi_filter, find_cds_to_eject)
        isos = self.a.add_sr('ISOs', type='iso', content_type='iso')
        iso = self.a.add_vdi(isos, 'install.iso', GiB // 2)
        vbd = self.a.insert_cd(self.vm, iso)
        mid = self.migrate()
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertEqual([vbd], self.a.ejected)
        [args] = self.a.args_of('Async.VM.migrate_send')
        self.assertNotIn(iso, args[3])
        self.assertIn(iso, self.a.db['VDI'])

    def test_vm_busy(self):
        self.a.get('VM', self.vm)['allowed_operations'] = []
        self.assertIn('does not allow migrate_send',
                      self.refused(errors.XenAPIError))

    def test_vdi_already_moving(self):
        self.a.hold(0.5)
        mid = self.migrate()
        exc = self.assertRaises(errors.XenAPIError, self.engine.migrate_vdi,
                                self.uuid(self.a, 'VDI', self.disk0),
                                'NFS-A')
        self.assertIn('already moving in migration %s' % mid, str(exc))
        self.a.release()
        self.wait(mid)


class TestXapiErrors(xfix.PoolsTestCase):
    """Each xapi error of DESIGN §9, as the operator reads it."""

    def failed(self, status):
        self.assertEqual('aborted', status['phase'])
        # xapi rolled back: the VM is still where it was
        self.assertIn(self.vm, self.a.db['VM'])
        self.assertEqual([], self.b.find('VM', name_label='web-1'))
        self.assertEqual('aborted', self.engine.get(status['id'])['phase'])
        return status['error']

    def assert_refused(self, method, *details):
        self.a.fail(method, *details)
        return self.failed(self.wait(self.migrate()))

    def assert_task_fails(self, *details):
        self.a.fail_task('VM.migrate_send', *details, at=0.3)
        return self.failed(self.wait(self.migrate()))

    def test_vdi_not_in_map(self):
        message = self.assert_refused('VM.assert_can_migrate',
                                      'VDI_NOT_IN_MAP', self.disk1)
        self.assertIn(self.uuid(self.a, 'VDI', self.disk1), message)
        self.assertIn("'data' on SR 'Local storage'", message)

    def test_vif_not_in_map(self):
        vif = self.a.get('VM', self.vm)['VIFs'][0]
        message = self.assert_refused('VM.assert_can_migrate',
                                      'VIF_NOT_IN_MAP', vif)
        self.assertIn(self.uuid(self.a, 'VIF', vif), message)

    def test_sr_does_not_support_migration(self):
        message = self.assert_refused('VM.assert_can_migrate',
                                      'SR_DOES_NOT_SUPPORT_MIGRATION',
                                      self.sr_a, 'VDI_MIRROR')
        self.assertIn("'Local storage'", message)
        self.assertIn('lacks VDI_MIRROR', message)

    def test_mirror_failed(self):
        message = self.assert_task_fails('MIRROR_FAILED', self.disk0)
        self.assertIn("'root' on SR 'Local storage'", message)
        self.assertIn('migration network', message)

    def test_source_space(self):
        message = self.assert_task_fails('SR_SOURCE_SPACE_INSUFFICIENT',
                                         self.sr_a)
        self.assertIn("'Local storage'", message)
        self.assertIn('free space', message)

    def test_incompatible_version(self):
        # xapi raises [vm; host] (xapi_vm_migrate.ml assert_can_migrate),
        # not the [host; vm] datamodel_errors.ml documents
        message = self.assert_refused(
            'VM.assert_can_migrate', 'VM_HOST_INCOMPATIBLE_VERSION_MIGRATE',
            self.vm, self.b.master)
        self.assertIn("VM %s 'web-1'" % self.uuid(self.a, 'VM', self.vm),
                      message)
        self.assertIn("host %s 'pool-b-master'"
                      % self.uuid(self.b, 'host', self.b.master), message)
        self.assertIn('update the destination pool', message)

    def test_host_disabled_at_receive(self):
        self.b.fail('host.migrate_receive', 'HOST_DISABLED', self.b.master)
        message = self.failed(self.wait(self.migrate()))
        self.assertIn("'pool-b-master'", message)
        self.assertIn('host-enable', message)

    def test_no_space_in_the_backend(self):
        self.a.fail_task('VM.migrate_send', 'SR_BACKEND_FAILURE_44', '',
                         'There is insufficient space', at=0.5)
        mid = self.migrate()
        status = self.wait(mid)
        self.failed(status)
        self.assertIn('no space left on the destination SR',
                      status['error'])
        self.assertIn('web-1', status['error'])
        # xapi's error names no SR: the message names the plan's
        self.assertIn("to pool-b (SR 'SR-B')", status['error'])
        self.assertIn('map the disks to a larger SR', status['error'])
        self.assertIsInstance(self.engine._migrations[mid].error,
                              mig_errors.InsufficientSpace)

    def test_chain_too_deep(self):
        self.a.fail_task('VM.migrate_send', 'SR_BACKEND_FAILURE_109', '',
                         'The snapshot chain is too long', at=0.1)
        mid = self.migrate()
        message = self.failed(self.wait(mid))
        self.assertIn('snapshot chain is too long', message)
        # which disks, on which SR, and what to do
        self.assertIn("(disks %s on SR 'Local storage')"
                      % ', '.join(sorted(self.vdi_map())), message)
        self.assertIn('delete snapshots of the VM', message)
        self.assertIsInstance(self.engine._migrations[mid].error,
                              mig_errors.ChainTooDeep)

    def test_licence(self):
        message = self.assert_refused('VM.assert_can_migrate',
                                      'LICENCE_RESTRICTION',
                                      'storage_motion')
        self.assertIn('licence does not allow storage_motion', message)

    def test_too_many_from_other_clients_waits_and_retries(self):
        self.a.fail_task('VM.migrate_send', 'TOO_MANY_STORAGE_MIGRATES',
                         '3', at=0.0)
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual(2, self.a.calls.count('Async.VM.migrate_send'))

    def test_leftovers_on_the_destination_are_reported(self):
        self.a.leave_on_failure = True
        self.a.fail_task('VM.migrate_send', 'MIRROR_FAILED', self.disk0)
        status = self.wait(self.migrate())
        self.assertEqual('aborted', status['phase'])
        [line] = status['leftovers']
        self.assertIn("'leftover'", line)
        self.assertIn('xe vdi-destroy', line)


class TestAbort(xfix.PoolsTestCase):

    def test_abort_mid_task(self):
        self.a.hold(0.5)
        mid = self.migrate()
        self.wait_for(lambda: self.engine.get(mid)['xapi_task'],
                      what='the task')
        self.engine.abort(mid)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('cancelled by the operator', status['error'])
        self.assertIn('task.cancel', self.a.calls)
        self.assertIn(self.vm, self.a.db['VM'])
        self.assertEqual([], self.b.find('VM', name_label='web-1'))
        self.assertEqual([], self.b.find('VDI', SR=self.sr_b))
        self.assertEqual([], status['leftovers'])
        self.assertRaises(mig_errors.InvalidPhase, self.engine.abort, mid)

    def test_abort_unknown(self):
        self.assertRaises(mig_errors.MigrationNotFound, self.engine.abort,
                          'nope')


class TestQueue(xfix.PoolsTestCase):

    def add_vms(self, n):
        out = []
        for i in range(n):
            disk = self.a.add_vdi(self.sr_a, 'd%d' % i, GiB)
            self.a.add_vm('vm-%d' % i, [disk])
            out.append((('vm-%d' % i), self.uuid(self.a, 'VDI', disk)))
        return out

    def test_the_fourth_migration_waits_its_turn(self):
        vms = self.add_vms(4)
        self.a.hold(0.5)
        mids = [self.engine.migrate_vm(name, 'pool-b', {disk: 'SR-B'})
                for name, disk in vms]
        self.wait_for(lambda: sum(self.a.storage.values()) == 3,
                      what='three running')
        fourth = self.engine.get(mids[3])
        self.assertTrue(fourth['queued'])
        self.assertEqual(0, fourth['queue_position'])
        self.assertEqual('preflight', fourth['phase'])
        self.assertEqual(4, self.engine.active())
        self.assertEqual(3, self.a.calls.count('Async.VM.migrate_send'))
        self.a.release()
        for mid in mids:
            self.assertEqual('done', self.wait(mid)['phase'])
        self.assertEqual(3, self.a.peak_storage)
        self.assertEqual(4, self.a.calls.count('Async.VM.migrate_send'))

    def test_a_higher_configured_limit_still_queues_the_fourth(self):
        self.max_concurrent = 5
        self.engine = self.make_engine()
        vms = self.add_vms(4)
        self.a.hold(0.5)
        mids = [self.engine.migrate_vm(name, 'pool-b', {disk: 'SR-B'})
                for name, disk in vms]
        self.wait_for(lambda: sum(self.a.storage.values()) == 3,
                      what='three running')
        self.assertTrue(self.engine.get(mids[3])['queued'])
        self.a.release()
        for mid in mids:
            self.assertEqual('done', self.wait(mid)['phase'])
        self.assertEqual(3, self.a.peak_storage)
        # never refused by xapi: the engine kept within its limit
        self.assertEqual(4, self.a.calls.count('Async.VM.migrate_send'))

    def test_abort_while_queued_touches_nothing(self):
        vms = self.add_vms(4)
        self.a.hold(0.5)
        mids = [self.engine.migrate_vm(name, 'pool-b', {disk: 'SR-B'})
                for name, disk in vms]
        self.wait_for(lambda: sum(self.a.storage.values()) == 3,
                      what='three running')
        receives = self.b.calls.count('host.migrate_receive')
        self.engine.abort(mids[3])
        status = self.wait(mids[3])
        self.assertEqual('aborted', status['phase'])
        self.assertEqual(receives, self.b.calls.count('host.migrate_receive'))
        self.a.release()
        for mid in mids[:3]:
            self.assertEqual('done', self.wait(mid)['phase'])


class TestConnection(xfix.PoolsTestCase):

    def test_lost_connection_while_polling_is_retried(self):
        self.a.drop('task.get_record', 'before', count=2)
        self.a.drop('task.get_record', 'after', count=1)
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])

    def test_answer_of_migrate_send_lost_the_task_is_adopted(self):
        self.a.drop('Async.VM.migrate_send', 'after')
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])
        # xapi got exactly one migrate_send: it was not sent blindly again
        self.assertEqual(1, self.a.calls.count('Async.VM.migrate_send'))

    def test_migrate_send_that_never_arrived_is_sent_again(self):
        self.a.drop('Async.VM.migrate_send', 'before')
        status = self.wait(self.migrate())
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual(1, self.a.calls.count('Async.VM.migrate_send'))

    def test_unknown_start_is_reported_not_claimed(self):
        self.a.drop('Async.VM.migrate_send', 'after')
        self.a.drop('VM.get_current_operations', 'before', count=100,
                    skip=1)
        status = self.wait(self.migrate())
        self.assertEqual('copy', status['phase'])
        self.assertIn('cannot find out whether xapi started it',
                      status['error'])
        self.assertIn(self.uuid(self.a, 'VM', self.vm), status['error'])
        self.a._drop.clear()

    def test_pool_gone_for_good_is_reported_then_recovered(self):
        state = self.make_tempdir()
        self.engine = self.make_engine(state_path=state, lost_timeout=0.3)
        self.a.hold(0.5)
        mid = self.migrate()
        self.wait_for(lambda: self.engine.get(mid)['xapi_task'],
                      what='the task')
        self.a.drop('task.get_record', 'before', count=10 ** 6)
        status = self.wait(mid)
        # not "aborted": xapi may still finish it
        self.assertEqual('copy', status['phase'])
        self.assertIn('may still be running', status['error'])
        self.assertIn(status['xapi_task'], status['error'])
        self.assertEqual([mid], [e.id for e in
                                 self.engine.journal.unfinished()])
        # the pool is back and xapi finished; a new agent follows the task
        self.a._drop.clear()
        self.a.release()
        again = self.make_engine(state_path=state)
        [(rid, role, outcome)] = again.recover()
        self.assertEqual(mid, rid)
        self.assertIn('following xapi task', outcome)
        self.assertEqual('done', again.wait(mid, 10)['phase'])
        self.assertTrue(self.b.find('VM', name_label='web-1'))

    def test_pool_member_url_leads_to_the_master(self):
        logger = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        self.a.fail('session.login_with_password', 'HOST_IS_SLAVE',
                    '127.0.0.1')
        pool = self.make_pool('pool-a', self.server_a)
        self.assertIn(self.vm, pool.call('VM.get_all'))
        self.assertEqual(2, self.a.calls.count(
            'session.login_with_password'))
        self.assertIn('is not the pool master', logger.output)

    def test_expired_session_logs_in_again(self):
        self.a.hold(0.3)
        mid = self.migrate()
        self.wait_for(lambda: self.engine.get(mid)['xapi_task'],
                      what='the task')
        logins = self.a.logins
        self.a.expire_sessions()
        self.a.release()
        self.assertEqual('done', self.wait(mid)['phase'])
        self.assertGreater(self.a.logins, logins)

    def test_wrong_password_is_clear_and_secret(self):
        logger = self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        pool = self.make_pool('pool-a', self.server_a,
                              password='hunter2-wrong')
        exc = self.assertRaises(errors.PoolUnreachable, pool.call,
                                'VM.get_all')
        self.assertIn('user root was refused', str(exc))
        self.assertNotIn('hunter2', str(exc))
        self.assertNotIn('hunter2', repr(pool))
        self.assertNotIn('hunter2', logger.output)

    def test_no_secret_in_the_logs_of_a_migration(self):
        logger = self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        mid = self.migrate()
        status = self.wait(mid)
        self.assertEqual('done', status['phase'])
        self.assertNotIn('secret', logger.output)
        self.assertIn('logged in', logger.output)
        # neither our sessions nor the destination's session in
        # migrate_receive's token (it lets anyone act on pool B)
        sessions = self.a.sessions | self.b.sessions
        self.assertTrue(sessions)
        for session_ref in sessions:
            self.assertNotIn(session_ref, logger.output)
            self.assertNotIn(session_ref, str(status))
            self.assertNotIn(session_ref, str(self.engine.journal.get(
                mid, role='source').state))


class TestHTTPS(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        pki = tls.make_credentials(self.make_tempdir())
        self.ca = pki[tls.CA_CERT]
        self.server = self.start_server(
            self.a, tls.server_context(pki[tls.SERVER_CERT],
                                       pki[tls.SERVER_KEY]))

    def test_master_certificate_checked_against_ca_file(self):
        pool = self.make_pool('pool-a', self.server, ca_file=self.ca)
        self.assertIn(self.vm, pool.call('VM.get_all'))

    def test_untrusted_master_is_refused_at_once(self):
        pool = self.make_pool('pool-a', self.server)
        exc = self.assertRaises(errors.PoolUnreachable, pool.call,
                                'VM.get_all')
        self.assertIn('[xenapi]ca_file', str(exc))
        self.assertNotIn('session.login_with_password', self.a.calls)


class TestRecover(xfix.PoolsTestCase):

    def test_unstarted_migration_is_closed(self):
        state = self.make_tempdir()
        engine = self.make_engine(state_path=state)
        engine.journal.record('m1', 'source', 'prepare-receive')
        self.assertEqual([('m1', 'source', 'aborted (not started)')],
                         engine.recover())
        self.assertEqual('aborted', engine.get('m1')['phase'])

    def test_start_without_a_task_is_reported(self):
        engine = self.make_engine()
        engine.journal.record('m2', 'source', 'copy', vm='vm-uuid-1')
        [(mid, _role, outcome)] = engine.recover()
        self.assertTrue(outcome.startswith('unknown'), outcome)
        self.assertIn('vm-uuid-1', outcome)

    def test_task_xapi_forgot_is_reported(self):
        engine = self.make_engine()
        engine.journal.record('m3', 'source', 'copy', task='OpaqueRef:gone',
                              task_uuid='t-uuid-3', vm='vm-uuid-3')
        engine.recover()
        status = engine.wait('m3', 10)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('xapi no longer knows task t-uuid-3', status['error'])
        self.assertIn('by hand', status['error'])

    def test_shutdown_leaves_xapi_tasks_running(self):
        state = self.make_tempdir()
        engine = self.make_engine(state_path=state)
        self.engine = engine
        self.a.hold(0.5)
        mid = self.migrate()
        self.wait_for(lambda: engine.get(mid)['xapi_task'], what='task')
        engine.shutdown()
        self.assertNotIn('task.cancel', self.a.calls)
        self.a.release()
        again = self.make_engine(state_path=state)
        self.assertEqual([mid], [m for m, _r, _o in again.recover()])
        self.assertEqual('done', again.wait(mid, 10)['phase'])

    def test_shutdown_ends_the_connections_and_closes_the_journal(self):
        self.engine.find_vm('web-1')
        self.engine.pool('pool-b').call('pool.get_all')
        for server in (self.server_a, self.server_b):
            self.assertEqual(1, len(server._server._open))
        self.engine.shutdown()
        # the pools' handlers see the client hang up and end
        self.wait_for(lambda: not (self.server_a._server._open or
                                   self.server_b._server._open),
                      timeout=5, what='the connections to end')
        exc = self.assertRaises(mig_errors.JournalError,
                                self.engine.journal.list)
        self.assertIn('the journal is closed', str(exc))
        self.engine.shutdown()              # a second time does nothing


class TestTaskResult(xfix.base.TestCase):

    def test_task_result(self):
        self.assertEqual('OpaqueRef:x',
                         engine_mod.task_result('<value>OpaqueRef:x</value>'))
        self.assertEqual('', engine_mod.task_result(None))


class _HTMLHandler(http.server.BaseHTTPRequestHandler):
    """A web server that is not a pool master (a portal, a proxy)."""

    status = 200

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get('Content-Length', 0)))
        body = b'<html><body>Welcome to nginx!</body></html>'
        self.send_response(self.status)
        self.send_header('Content-Type', 'text/html')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TestOperatorMistakes(xfix.PoolsTestCase):
    """What an operator gets wrong gets a clear error, never a traceback.

    Every refusal is an XSMError subclass (it crosses the RPC boundary as
    itself and xsm-migrate prints its one line), names what was wrong,
    comes quickly, and comes before xapi is asked to change anything.
    """

    def assertNothingStarted(self):
        self.assertNotIn('host.migrate_receive', self.b.calls)
        self.assertFalse([c for c in self.a.calls if c.startswith('Async')])
        self.assertEqual(0, self.engine.active())

    def with_destination(self, url, password='secret', **kwargs):
        kwargs.setdefault('retry_interval', 0.01)
        kwargs.setdefault('timeout', 5.0)
        self.engine = engine_mod.XenAPIEngine(
            'pool-a', self.make_pool('pool-a', self.server_a),
            {'pool-b': session.Pool('pool-b', url, 'root', password,
                                    **kwargs)},
            state_path=self.make_tempdir(), poll_interval=0.02)
        self.addCleanup(self.engine.shutdown)

    def serve(self, server):
        thread = threading.Thread(target=server.serve_forever,
                                  kwargs={'poll_interval': 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return 'http://127.0.0.1:%d/' % server.server_address[1]

    def refused(self, exc_class=errors.XenAPIError, **kwargs):
        exc = self.assertRaises(exc_class, self.migrate, **kwargs)
        self.assertNothingStarted()
        return str(exc)

    def test_wrong_password_of_the_destination(self):
        self.with_destination(self.server_b.url, password='wrong')
        message = self.refused(errors.PoolUnreachable)
        self.assertIn('pool pool-b', message)
        self.assertIn('user root was refused', message)
        self.assertNotIn('wrong', message.replace('wrong user', ''))

    def test_url_of_something_that_is_not_a_pool_master(self):
        for status in (200, 404):
            handler = type('H', (_HTMLHandler,), {'status': status})
            url = self.serve(http.server.HTTPServer(('127.0.0.1', 0),
                                                    handler))
            self.with_destination(url)
            message = self.refused(errors.PoolUnreachable)
            self.assertIn('does not answer as a XenAPI pool master',
                          message)
            self.assertIn(url, message)

    def test_xml_rpc_server_without_xapi_s_envelope(self):
        server = xmlrpc.server.SimpleXMLRPCServer(
            ('127.0.0.1', 0), logRequests=False, allow_none=True)
        server.register_function(lambda *a: {'ok': 1},
                                 'session.login_with_password')
        self.with_destination(self.serve(server))
        message = self.refused(errors.PoolUnreachable)
        self.assertIn('does not answer as a XenAPI pool master', message)

    def test_master_that_is_down(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            url = 'http://127.0.0.1:%d/' % s.getsockname()[1]
        self.with_destination(url)
        message = self.refused(errors.PoolUnreachable)
        self.assertIn('cannot reach the pool master', message)
        self.assertIn('ConnectionRefusedError', message)

    def test_master_that_never_answers_is_given_up_on_quickly(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(('127.0.0.1', 0))
        listener.listen(8)                  # accepts, never answers
        self.with_destination('http://127.0.0.1:%d/'
                              % listener.getsockname()[1], timeout=0.5)
        start = time.monotonic()
        message = self.refused(errors.PoolUnreachable)
        # one timeout, not one per retry
        self.assertLess(time.monotonic() - start, 1.5)
        self.assertIn('did not answer', message)
        self.assertIn('within 0 s', message.replace('0.5', '0'))

    def test_unusable_urls(self):
        for url, why in (('ftp://xs-b', "not 'ftp'"),
                         ('xs-b.example.net', "not ''"),
                         ('https://root:hunter2@xs-b/', 'user name or '
                          'password')):
            self.with_destination(url)
            message = self.refused(errors.PoolUnreachable)
            self.assertIn('the pool URL is unusable', message)
            self.assertIn(why, message)
            self.assertNotIn('hunter2', message)

    def test_names_that_do_not_exist(self):
        self.assertIn("no network 'nope' in pool pool-b",
                      self.refused(vif_map={'0': 'nope'}))
        self.assertIn("no host 'nope' in pool pool-b",
                      self.refused(dest='pool-b/nope'))
        self.assertIn("no SR 'nope' in pool pool-b",
                      self.refused(vdi_map=self.vdi_map('nope')))
        self.assertIn('not a disk of the VM',
                      self.refused(vdi_map=dict(self.vdi_map(),
                                                nope='SR-B')))
        self.assertIn("no VM called 'nope' in pool pool-a",
                      self.refused(vm='nope'))
        self.engine = self.make_engine(migration_network='nope')
        self.assertIn("no network 'nope' in pool pool-b (the migration "
                      "network)", self.refused())
        self.assertIn('no VDI nope in pool pool-a', str(self.assertRaises(
            errors.XenAPIError, self.engine.migrate_vdi, 'nope', 'NFS-A')))
        message = str(self.assertRaises(
            errors.XenAPIError, self.engine.migrate_vdi,
            self.uuid(self.a, 'VDI', self.disk1), 'nope'))
        self.assertIn("no SR 'nope' in pool pool-a (nor a local SR", message)
        self.assertNothingStarted()

    def test_unexpected_error_code_when_reading(self):
        self.a.fail('SR.get_all_records', 'SOMETHING_NEW', 'a', 'b')
        exc = self.assertRaises(errors.XenAPIError, lambda: self.engine.host
                                .srs)
        self.assertIn('XenAPI call failed: SOMETHING_NEW a b', str(exc))
        self.b.fail('network.get_all_records', 'SOMETHING_NEW', 'c')
        self.assertIn('SOMETHING_NEW c', self.refused())

    def test_unexpected_error_code_of_a_task_and_of_polling(self):
        self.a.fail_task('VM.migrate_send', 'INTERNAL_ERROR', 'boom',
                         at=0.3)
        status = self.wait(self.migrate())
        self.assertEqual('aborted', status['phase'])
        self.assertIn('INTERNAL_ERROR boom', status['error'])
        # the message says which VM, disks and SRs it was about
        self.assertIn("migrating VM web-1 (disks %s on SR 'Local storage') "
                      "to pool-b (SR 'SR-B')"
                      % ', '.join(sorted(self.vdi_map())), status['error'])
        self.a.fail('task.get_record', 'SOMETHING_NEW', 'x')
        status = self.wait(self.migrate())
        self.assertEqual('aborted', status['phase'])
        self.assertIn('SOMETHING_NEW x', status['error'])
        self.assertNotIn("['", status['error'])
