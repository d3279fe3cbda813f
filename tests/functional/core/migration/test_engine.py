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

"""The migration engine end to end, in one process.

Two hosts with real SRs in temporary folders and real agents on
oslo.messaging's ``fake://`` transport; the data crosses real mutual-TLS
NBD connections on loopback. (The same over RabbitMQ with agents in their
own processes is in test_rabbit.py.)
"""

import hashlib
import logging
import os
import threading
import time

import fixtures

from tests import base
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import source as source_mod
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.testing import harness

MiB = 1 << 20


def sr_state(sr):
    """What must be identical before a migration and after its abort."""
    return sorted((v.uuid, v.parent, v.hidden, v.read_only, v.size)
                  for v in sr.list())


class EngineFixture(base.TestCase):

    check_leaks = True

    #: ``{host: {sr: driver}}``; SR ``S`` of host ``H`` is ``<root>/H/S``
    SRS = {'host-a': {'sr-a': 'vhd', 'raw-a': 'raw'},
           'host-b': {'sr-b': 'vhd', 'raw-b': 'raw'}}

    def setUp(self):
        super().setUp()
        root = self.make_tempdir()
        layout = {name: {sr: (driver, os.path.join(root, name, sr))
                         for sr, driver in srs.items()}
                  for name, srs in self.SRS.items()}
        local = harness.LocalHosts(root, layout, options=self.options,
                                   rpc_timeout=20)
        self.addCleanup(local.close)
        local.start()
        self.transport = local.transport
        self.hosts, self.agents = local.hosts, local.agents
        self.a = local.client('host-a', timeout=30)
        self.b = local.client('host-b', timeout=30)

    def options(self, name):
        return manager_mod.Options(chunk=1 * MiB)

    def make_vm(self, sizes=(8 * MiB, 12 * MiB), sr='sr-a', rate=300,
                snapshots=2):
        vm = self.a.vm_create('vm', [{'sr': sr, 'size': s} for s in sizes],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=rate, fill=0.5)
        for _ in range(snapshots):
            time.sleep(0.05)
            self.a.vm_snapshot(vm['uuid'])
        return self.a.vm_get(vm['uuid'])

    def wait(self, client, mid, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.migration_get(mid)
            if status['finished'] is not None:
                return status
            time.sleep(0.02)
        self.fail('migration %s did not end within %s s' % (mid, timeout))

    def assert_images_valid(self, host):
        for sr in self.hosts[host].srs.values():
            for name in os.listdir(sr.path):
                if name.endswith('.vhd'):
                    self.assertEqual([], vhd_check.check(
                        os.path.join(sr.path, name)))


class TestVMMigration(EngineFixture):

    def test_vm_moves_live_and_the_guest_verifies(self):
        vm = self.make_vm()
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        mid = self.a.migrate_vm(vm['uuid'], 'host-b', vdi_map,
                                {'net0': 'net0'})
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertGreater(status['bytes_copied'], 0)
        self.assertIsNotNone(status['downtime_ms'])
        self.assertGreater(status['guest_writes_during_migration'], 0)
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        # the finished migration holds neither the VM nor its devices
        # (status answers come from what it kept)
        mig = self.agents['host-a'].manager._sources[mid]
        self.assertIsNone(mig.vm)
        self.assertEqual(set(vdi_map), {i.vdi for i in mig._items})
        self.assertFalse(any(hasattr(i, 'mirror') for i in mig._items))
        self.assertEqual(vm['uuid'], status['vm'])
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual('running', moved['power_state'])
        time.sleep(0.1)     # the guest goes on on host-b
        result = self.b.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'], result)
        self.assertEqual((8 + 12) * MiB, result['bytes_verified'])
        sr_b = self.hosts['host-b'].sr('sr-b')
        for disk in moved['disks']:
            self.assertEqual('sr-b', disk['sr'])
            self.assertEqual(2, len(sr_b.chain(disk['vdi'])))
        self.assert_images_valid('host-b')

    def test_copy_keeps_the_vm_and_restores_the_source_chain(self):
        vm = self.make_vm()
        before = sr_state(self.hosts['host-a'].sr('sr-a'))
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        mid = self.a.migrate_vm(vm['uuid'], 'host-b', vdi_map,
                                {'net0': 'net0'}, copy=True)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual(before, sr_state(self.hosts['host-a'].sr('sr-a')))
        self.assertEqual('halted', self.b.vm_get(vm['uuid'])['power_state'])
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])


class TestVDIMove(EngineFixture):

    def _move(self, vm, to_sr):
        vdi = vm['disks'][0]['vdi']
        mid = self.a.migrate_vdi(vdi, to_sr)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], status['error'])
        return self.a.vm_get(vm['uuid'])

    def test_vhd_to_raw_and_back_live(self):
        vm = self.make_vm(sizes=(8 * MiB,))
        vm = self._move(vm, 'raw-a')
        self.assertEqual('raw-a', vm['disks'][0]['sr'])
        self.assertEqual([], self.hosts['host-a'].sr('sr-a').list())
        vm = self._move(vm, 'sr-a')
        self.assertEqual('sr-a', vm['disks'][0]['sr'])
        self.assertEqual([], self.hosts['host-a'].sr('raw-a').list())
        result = self.a.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'], result)
        self.assert_images_valid('host-a')


class TestAbort(EngineFixture):

    def _abort_in(self, phase):
        vm = self.make_vm()
        sr_a = self.hosts['host-a'].sr('sr-a')
        before = sr_state(sr_a)
        depth = {d['vdi']: len(sr_a.chain(d['vdi'])) for d in vm['disks']}

        def hook(mig, now):
            if now == phase:
                mig.cancel('test abort in %s' % phase)
        self.agents['host-a'].manager.phase_hook = hook
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'})
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('test abort in %s' % phase, status['error'])
        self.assertEqual(before, sr_state(sr_a))
        for vdi, n in depth.items():
            self.assertEqual(n, len(sr_a.chain(vdi)))
        self.assertEqual([], self.b.vdi_list())
        self.assertEqual([], self.b.vm_list())
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        result = self.a.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'], result)
        self.assertEqual([], os.listdir(os.path.join(
            self.hosts['host-b'].state_path, 'migrations')) if os.path.isdir(
            os.path.join(self.hosts['host-b'].state_path, 'migrations'))
            else [])

    def test_abort_in_preflight(self):
        self._abort_in('preflight')

    def test_abort_in_prepare_receive(self):
        self._abort_in('prepare-receive')

    def test_abort_in_mirror(self):
        self._abort_in('mirror')

    def test_abort_in_snapshot(self):
        self._abort_in('snapshot')

    def test_abort_in_copy(self):
        self._abort_in('copy')

    def test_abort_in_compose(self):
        self._abort_in('compose')


class TestRefusals(EngineFixture):

    def test_vdi_not_in_map(self):
        vm = self.make_vm(snapshots=0)
        exc = self.assertRaises(
            errors.VDINotInMap, self.a.migrate_vm, vm['uuid'], 'host-b',
            {vm['disks'][0]['vdi']: 'sr-b'}, {'net0': 'net0'})
        self.assertIn(vm['disks'][1]['vdi'], str(exc))

    def test_refusals_happen_before_anything_changes(self):
        vm = self.make_vm(snapshots=0)
        before = sr_state(self.hosts['host-a'].sr('sr-a'))
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        # VIF not mapped across pools
        exc = self.assertRaises(errors.VIFNotInMap, self.a.migrate_vm,
                                vm['uuid'], 'host-b', vdi_map, {})
        self.assertIn('net0', str(exc))
        self.assertEqual(before, sr_state(self.hosts['host-a'].sr('sr-a')))
        self.assertEqual([], self.b.vdi_list())

    def test_fourth_concurrent_migration_is_refused(self):
        self.agents['host-a'].manager.options.max_concurrent = 1
        vm = self.make_vm(snapshots=0)
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        first = self.a.migrate_vm(vm['uuid'], 'host-b', vdi_map,
                                  {'net0': 'net0'}, bandwidth=1 * MiB)
        self.assertRaises(errors.TooManyMigrations, self.a.migrate_vdi,
                          vm['disks'][0]['vdi'], 'raw-a')
        self.a.migration_abort(first)
        self.assertEqual('aborted', self.wait(self.a, first)['phase'])

    def test_a_destination_with_the_wrong_certificate_is_refused(self):
        manager = self.agents['host-a'].manager
        real = manager._peer_factory
        other = self.make_tempdir()

        class WrongCA:
            def __init__(self, peer):
                self._peer = peer

            def __getattr__(self, name):
                return getattr(self._peer, name)

            def prepare(self, spec):
                from xsm_driver.core.migration import credentials
                answer = self._peer.prepare(spec)
                answer['server_ca_pem'] = credentials.Credentials.make(
                    other, 'server', ['127.0.0.1']).ca_pem
                return answer

        manager._peer_factory = lambda name: WrongCA(real(name))
        vm = self.make_vm(snapshots=0)
        logs = self.useFixture(fixtures.FakeLogger(level=logging.INFO))
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'})
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('CERTIFICATE_VERIFY_FAILED', status['error'])
        # the one-time export names appear in no message
        self.assertIn('(migration %s)' % mid, status['error'])
        self.assertNotIn('/%s' % mid, logs.output)
        self.assertNotRegex(status['error'] + logs.output,
                            r'nbd://[^ ]+:\d+/[A-Za-z0-9_-]{20,}')
        self.assertEqual([], self.b.vdi_list())
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])


class TestMore(EngineFixture):

    def test_a_halted_vm_moves_cold(self):
        vm = self.make_vm(rate=None, snapshots=1)
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])
        self.a.vm_stop(vm['uuid'])
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'})
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual('halted', self.b.vm_get(vm['uuid'])['power_state'])
        self.assertEqual([], self.a.vdi_list())
        self.assert_images_valid('host-b')

    def test_the_same_vdi_cannot_move_twice_at_once(self):
        vm = self.make_vm(snapshots=0)
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        first = self.a.migrate_vm(vm['uuid'], 'host-b', vdi_map,
                                  {'net0': 'net0'}, bandwidth=1 * MiB)
        exc = self.assertRaises(errors.MigrationError, self.a.migrate_vdi,
                                vm['disks'][0]['vdi'], 'raw-a')
        self.assertIn(first, str(exc))
        self.a.migration_abort(first)
        self.assertEqual('aborted', self.wait(self.a, first)['phase'])

    def test_force_complete_lifts_the_bandwidth_limit(self):
        vm = self.make_vm(sizes=(16 * MiB,), snapshots=0)
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {vm['disks'][0]['vdi']: 'sr-b'},
                                {'net0': 'net0'}, bandwidth=256 * 1024)
        while self.a.migration_get(mid)['phase'] != 'copy':
            time.sleep(0.01)
        start = time.monotonic()
        self.a.migration_force_complete(mid)
        status = self.wait(self.a, mid, timeout=20)
        self.assertEqual('done', status['phase'], status['error'])
        # 8 MiB at 256 KiB/s would take 30 s
        self.assertLess(time.monotonic() - start, 10)
        self.assertTrue(self.b.guest_verify(vm['uuid'])['verified'])


class TestSeveralCopyConnections(EngineFixture):
    """The copy of one VDI over several one-shot TLS connections."""

    def record_connections(self):
        used = []
        real = source_mod.Migration._connect

        def connect(mig, export):
            used.append(export)
            return real(mig, export)
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.migration.source.Migration._connect', connect))
        return used

    @staticmethod
    def digest(sr, vdi):
        dev = sr.attach(vdi, writable=False)
        try:
            h = hashlib.sha256()
            for pos in range(0, dev.size, 4 * MiB):
                h.update(bytes(dev.pread(pos, min(4 * MiB,
                                                  dev.size - pos))))
            return h.hexdigest()
        finally:
            dev.close()

    def test_copy_is_bit_identical(self):
        used = self.record_connections()
        vm = self.make_vm(sizes=(16 * MiB, 8 * MiB), rate=None, snapshots=1)
        self.a.vm_stop(vm['uuid'])
        sr_a = self.hosts['host-a'].sr('sr-a')
        want = {d['vdi']: self.digest(sr_a, d['vdi']) for d in vm['disks']}
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'}, copy=True)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], status['error'])
        # two VDIs, each copied over 4 connections (1 MiB requests)
        self.assertEqual(2 * manager_mod.Options.connections, len(used))
        self.assertEqual(len(used), len(set(used)))
        sr_b = self.hosts['host-b'].sr('sr-b')
        for vdi, new in status['result']['vdis'].items():
            self.assertEqual(want[vdi], self.digest(sr_b, new))
        self.assert_images_valid('host-b')

    def test_abort_during_the_copy_leaves_nothing_behind(self):
        used = self.record_connections()
        vm = self.make_vm(sizes=(16 * MiB,), snapshots=1)
        sr_a = self.hosts['host-a'].sr('sr-a')
        before = sr_state(sr_a)
        depth = len(sr_a.chain(vm['disks'][0]['vdi']))
        threads = {t.name for t in threading.enumerate()}
        mid = self.a.migrate_vm(vm['uuid'], 'host-b',
                                {vm['disks'][0]['vdi']: 'sr-b'},
                                {'net0': 'net0'}, bandwidth=512 * 1024)
        receives = self.agents['host-b'].manager._receives
        deadline = time.monotonic() + 20
        server = None
        while time.monotonic() < deadline:
            status = self.a.migration_get(mid)
            rec = receives.get(mid)
            server = rec._server if rec is not None else None
            # the leaf (mirror) and the four base connections are up
            if status['phase'] == 'copy' and status['bytes_copied'] and \
                    server is not None and server.connections == 5:
                break
            time.sleep(0.01)
        else:
            self.fail('the copy did not get under way: %s' % status)
        self.assertEqual(1 + manager_mod.Options.connections, len(used))
        self.a.migration_abort(mid)
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'])
        self.assertEqual(0, server.connections)
        self.assertEqual(before, sr_state(sr_a))
        self.assertEqual(depth, len(sr_a.chain(vm['disks'][0]['vdi'])))
        self.assertEqual([], self.b.vdi_list())
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])
        # no connection, copier or server thread of the migration is left
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = sorted(t.name for t in threading.enumerate()
                          if t.name.startswith(('xsm-nbd', 'xsm-copy')) and
                          t.name not in threads)
            if not left:
                break
            time.sleep(0.05)
        self.assertEqual([], left)
