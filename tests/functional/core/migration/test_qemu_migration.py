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

"""Real QEMU guests on xsm hosts, and their live migration (TCG).

Hosts run their VMs with the ``qemu`` hypervisor driver: each disk's
stack (``Counter(Gate(VHD chain))``) is served on a unix socket and a
QEMU booted from the guest kit runs the in-guest verifier on it. Two
in-process hosts and agents on oslo.messaging's ``fake://`` transport
(as in test_engine.py) migrate such a guest live; the storage moves with
the engine's protocol over mutual-TLS NBD, the memory with QEMU's own
migration, and both meet at one switch-over.

Every QEMU a test starts is killed in its cleanup; a last cleanup fails
the test if a QEMU process of its folder is still alive. Under CI=true a
missing QEMU or guest kit fails the test.
"""

import logging
import os
import threading
import time

import fixtures
from testtools import content

from tests.functional.hypervisor import test_qemu_guest as guest_tests
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import arguments
from xsm_driver.core import sr as sr_mod
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver import hypervisor
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier
from xsm_driver.testing import harness

MiB = 1 << 20
DISK_MIB = 16
BOOT_TIMEOUT = guest_tests.BOOT_TIMEOUT
TIMEOUT = 60


class QemuHostCase(guest_tests.GuestTestCase):
    """Hosts whose guests are QEMU processes (kit checks of the base)."""

    def driver(self):
        return None                     # each host builds its own

    def make_host(self, name, state=None):
        root = os.path.join(self.tmp, name)
        srs = {'sr': sr_mod.load_driver('vhd', 'sr',
                                        os.path.join(root, 'sr'))}
        drv = hypervisor.load('qemu', os.path.join(root, 'g'),
                              accel='tcg', guest_kit=guest_tests.KIT_DIR,
                              memory_mib=128, shutdown_timeout=15)
        host = host_mod.Host(name, srs, os.path.join(root, 'state'), drv)
        self.addCleanup(self.kill_guests, drv)
        self.addCleanup(host.close)
        return host

    def kill_guests(self, drv):
        for pid in guest_tests.qemu_processes(drv.state_dir):
            qemu.kill(pid)

    def make_vm(self, host, disks=1, **verifier_opts):
        opts = {'rate': 40, 'report_ms': 250}
        opts.update(verifier_opts)
        vm = host.create_vm('vm', [{'sr': 'sr', 'size': DISK_MIB * MiB}
                                   for _ in range(disks)])
        vm.qemu = {'memory_mib': 128, 'verifier': opts}
        host.save()
        return vm

    def console(self, name, drv):
        return drv.console_output(name)

    def guest_report(self, host, vm, kind, pred=lambda r: True,
                     timeout=TIMEOUT, after=0):
        return self.wait_report(vm.uuid, kind, pred, timeout, after,
                                drv=host.qemu)


class TestQemuHost(QemuHostCase):

    def test_vm_runs_in_qemu_on_the_agents_unix_exports(self):
        host = self.make_host('host-a')
        vm = self.make_vm(host)
        host.start_vm(vm.uuid)
        self.assertTrue(vm.in_qemu)
        rep = self.guest_report(host, vm, 'progress',
                                lambda r: r['writes'] > 20, BOOT_TIMEOUT)
        # every guest write passed the agent's stack
        writes = vm.disks[0].counter.stats()['requests'].get('write', 0)
        self.assertGreaterEqual(writes, rep['writes'])
        self.assertEqual('running', host.vm_power_state(vm.uuid))
        host.pause_vm(vm.uuid)
        self.assertEqual('paused', host.vm_power_state(vm.uuid))
        host.resume_vm(vm.uuid)
        rep = self.verify(vm.uuid, drv=host.qemu)
        self.assertTrue(verifier.verified(rep), rep.line)
        pid = host.qemu.pid(vm.uuid)
        host.stop_vm(vm.uuid)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual('halted', vm.power_state)
        self.assertIsNone(vm.disks[0].server)
        host.destroy_vm(vm.uuid)
        self.assertEqual([], host.sr('sr').list())

    def test_a_state_path_too_long_for_the_disk_sockets_is_named(self):
        self.tmp = os.path.join(self.tmp, 'x' * 60)
        host = self.make_host('host-a')
        vm = self.make_vm(host)
        exc = self.assertRaises(qemu.QemuError, host.start_vm, vm.uuid)
        self.assertIn('longer than 107 bytes', str(exc))
        self.assertIn('give host host-a a shorter state path', str(exc))
        self.assertEqual('halted', vm.power_state)
        self.assertIsNone(vm.disks[0].counter)

    def test_a_restarted_agent_finds_its_qemu_again(self):
        host = self.make_host('host-a')
        vm = self.make_vm(host)
        host.start_vm(vm.uuid)
        self.guest_report(host, vm, 'progress', lambda r: r['writes'] > 10,
                          BOOT_TIMEOUT)
        pid = host.qemu.pid(vm.uuid)
        host.close()                          # the agent stops
        time.sleep(1)                         # the guest's I/O waits
        host2 = self.make_host('host-a')
        vm2 = host2.vm(vm.uuid)
        self.assertTrue(vm2.in_qemu)
        self.assertEqual('running', vm2.power_state)
        self.assertEqual(pid, host2.qemu.pid(vm.uuid))
        seen = verifier.last(self.console(vm.uuid, host2.qemu),
                             'progress')['writes']
        rep = self.guest_report(host2, vm2, 'progress',
                                lambda r: r['writes'] > seen + 20)
        self.assertEqual(0, rep['io_errors'])
        rep = self.verify(vm.uuid, drv=host2.qemu)
        self.assertTrue(verifier.verified(rep), rep.line)
        host2.stop_vm(vm.uuid)

    def test_a_guest_an_unfinished_migration_moves_is_halted(self):
        # the agent stopped in the middle of a migration from here: the
        # journal's recovery runs on a halted VM, as it always did
        host = self.make_host('host-a')
        vm = self.make_vm(host)
        host.start_vm(vm.uuid)
        self.guest_report(host, vm, 'progress', lambda r: r['writes'] > 5,
                          BOOT_TIMEOUT)
        pid = host.qemu.pid(vm.uuid)
        host.journal.record('m-1', 'source', 'copy', vm=vm.uuid, items=[])
        host.close()
        host2 = self.make_host('host-a')
        self.assertTrue(qemu.wait_gone(pid, TIMEOUT))
        vm2 = host2.vm(vm.uuid)
        self.assertFalse(vm2.in_qemu)
        self.assertEqual('halted', vm2.power_state)
        self.assertEqual([], guest_tests.qemu_processes(
            host2.qemu.state_dir))


class TwoHostsCase(QemuHostCase):
    """host-a and host-b, each with its agent on ``fake://``."""

    def setUp(self):
        super().setUp()
        # make_host builds each host (its SR, its QEMU driver) and
        # registers its clean-ups; the agents stop before them
        local = harness.LocalHosts(
            self.tmp, {'host-a': {}, 'host-b': {}},
            options=lambda name: manager_mod.Options(chunk=1 * MiB),
            rpc_timeout=30,
            make_host=lambda name, specs, state, conf: self.make_host(name))
        try:
            local.start()
        finally:
            self.addCleanup(local.close)
        self.transport = local.transport
        self.hosts = local.hosts
        self.a = local.client('host-a', timeout=60)
        self.b = local.client('host-b', timeout=60)

    def boot(self, disks=2):
        host = self.hosts['host-a']
        vm = self.make_vm(host, disks=disks)
        host.start_vm(vm.uuid)
        self.guest_report(host, vm, 'progress', lambda r: r['writes'] > 20,
                          BOOT_TIMEOUT)
        # a chain under the first disk: the guest wrote before each
        host.snapshot_vm(vm.uuid)
        time.sleep(0.3)
        host.snapshot_vm(vm.uuid)
        return vm

    def wait(self, mid, timeout=TIMEOUT, until=None):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.a.migration_get(mid)
            if status['finished'] is not None or (
                    until is not None and until(status)):
                return status
            time.sleep(0.05)
        self.fail('migration %s did not end within %s s' % (mid, timeout))

    def wait_resumed(self, host, uuid):
        """Until VM ``uuid`` runs on ``host`` (its guest resumed there)."""
        deadline = time.monotonic() + TIMEOUT
        while host.vm_power_state(uuid) != 'running':
            self.assertLess(time.monotonic(), deadline, 'not resumed')
            time.sleep(0.05)

    def assert_stayed_at_the_source(self, vm, pid):
        """A migration of ``vm`` rolled back: it stayed on host-a.

        Nothing of it on host-b (no QEMU, VM or VDI); on host-a the same
        QEMU runs on, its guest writes on without an error and verifies
        every disk.
        """
        a, b = self.hosts['host-a'], self.hosts['host-b']
        self.assertEqual([], guest_tests.qemu_processes(b.qemu.state_dir))
        self.assertEqual({}, b.vms)
        self.assertEqual([], b.sr('sr').list())
        self.assertEqual(pid, a.qemu.pid(vm.uuid))
        self.assertEqual('running', a.vm_power_state(vm.uuid))
        seen = verifier.last(self.console(vm.uuid, a.qemu),
                             'progress')['writes']
        rep = self.guest_report(a, vm, 'progress',
                                lambda r: r['writes'] > seen + 20)
        self.assertEqual(0, rep['io_errors'])
        self.assertEqual(0, rep['mismatches'])
        check = self.verify(vm.uuid, drv=a.qemu)
        self.assertTrue(verifier.verified(check), check.line)


class TestQemuGuestOverRPC(TwoHostsCase):
    """A QEMU guest made and driven through the agent's RPC API (1.4)."""

    def console_report(self, vm_uuid, kind, pred, timeout=BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for rep in verifier.reports(self.a.vm_console(vm_uuid), kind):
                if pred(rep):
                    return rep
            self.assertLess(time.monotonic(), deadline,
                            'no %s report over vm_console' % kind)
            time.sleep(0.1)

    def test_create_start_pause_verify_and_a_dead_qemu(self):
        exc = self.assertRaises(hv_base.InvalidGuestOptions,
                                self.a.vm_create, 'bad',
                                [{'sr': 'sr', 'size': DISK_MIB * MiB}],
                                qemu={'memory_mib': 4})
        self.assertIn('memory_mib must be int in [16,', str(exc))
        self.assertEqual([], self.a.vm_list())
        vm = self.a.vm_create(
            'vm', [{'sr': 'sr', 'size': DISK_MIB * MiB}] * 2,
            qemu={'memory_mib': 128,
                  'verifier': {'rate': 40, 'report_ms': 250}})
        self.assertEqual(128, vm['qemu']['memory_mib'])
        self.assertNotIn('firmware', vm['qemu'])
        self.a.vm_start(vm['uuid'])
        # chosen at the first cold boot, kept in the record
        self.assertEqual('qboot',
                         self.a.vm_get(vm['uuid'])['qemu']['firmware'])
        self.console_report(vm['uuid'], 'progress',
                            lambda r: r['writes'] > 10)
        self.a.guest_start(vm['uuid'], rate=80)
        self.console_report(vm['uuid'], 'start', lambda r: r['disks'] == 2)
        self.assertEqual('paused', self.a.vm_pause(vm['uuid'])[
            'power_state'])
        self.assertEqual('paused', self.a.vm_get(vm['uuid'])['power_state'])
        self.assertEqual('running', self.a.vm_resume(vm['uuid'])[
            'power_state'])
        check = self.a.guest_verify(vm['uuid'])
        self.assertEqual('qemu', check['kind'])
        self.assertTrue(check['verified'], check)
        self.assertGreater(check['writes'], 10)
        # (the blocks the guest wrote, each read back and compared)
        self.assertEqual(check['blocks_checked'] * 4096,
                         check['bytes_verified'])
        self.assertGreater(check['blocks_checked'], 0)
        exc = self.assertRaises(arguments.InvalidArgument,
                                self.a.vm_console, vm['uuid'], limit=0)
        self.assertIn('limit must be in [1,', str(exc))
        # the guest's QEMU dies: the VM is halted, its disks let go of
        host = self.hosts['host-a']
        qemu.kill(host.qemu.pid(vm['uuid']))
        self.assertEqual('halted', self.a.vm_get(vm['uuid'])['power_state'])
        self.assertIsNone(host.vm(vm['uuid']).disks[0].counter)
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))
        # and it starts again
        self.a.vm_start(vm['uuid'])
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.a.vm_reboot(vm['uuid'])
        self.console_report(vm['uuid'], 'start', lambda r: True)
        self.a.vm_stop(vm['uuid'])
        self.a.vm_destroy(vm['uuid'])
        self.assertEqual([], host.sr('sr').list())


class TestQemuLiveMigration(TwoHostsCase):
    """A running QEMU guest moves from host-a to host-b with its disks."""

    def test_live_migration_guest_verifies_on_the_destination(self):
        t0 = time.monotonic()
        vm = self.boot()
        a, b = self.hosts['host-a'], self.hosts['host-b']
        src_pid = a.qemu.pid(vm.uuid)
        before = verifier.last(self.console(vm.uuid, a.qemu), 'progress')
        vdi_map = {d.vdi: 'sr' for d in vm.disks}
        t1 = time.monotonic()
        mid = self.a.migrate_vm(vm.uuid, 'host-b', vdi_map, {})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual('qemu', status['guest_kind'])
        migration_s = time.monotonic() - t1
        # the source's QEMU is gone, nothing is left on host-a
        self.assertTrue(qemu.wait_gone(src_pid, TIMEOUT))
        self.assertEqual([], guest_tests.qemu_processes(a.qemu.state_dir))
        self.assertEqual({}, a.vms)
        self.assertEqual([], a.sr('sr').list())
        self.assertFalse(os.path.exists(a.qemu.paths(vm.uuid).folder))
        # the guest runs on host-b, its memory and disks in agreement
        vm_b = b.vm(vm.uuid)
        self.wait_resumed(b, vm.uuid)
        self.assertTrue(vm_b.in_qemu)
        # the guest's state came over TLS, its keys are gone afterwards
        params = b.qemu.qmp_execute(vm.uuid, 'query-migrate-parameters')
        self.assertEqual(qemu.TLS_ID, params.get('tls-creds'))
        self.assertFalse(os.path.exists(b.qemu.tls_dir(vm.uuid)))
        rep = self.guest_report(
            b, vm_b, 'progress', lambda r: r['writes'] > before['writes'] +
            40)
        self.assertEqual(0, rep['io_errors'])
        self.assertEqual(0, rep['mismatches'])
        check = self.verify(vm.uuid, drv=b.qemu)
        self.assertTrue(verifier.verified(check), check.line)
        self.assertEqual(2, check['disks'])
        self.assertGreater(check['checked'], 0)
        # (the verifier's longest gap between two writes since it
        # started: by the guest's clock, which stands still while the VM
        # is stopped, and by the RTC, to about a second)
        numbers = (
            'migration_s=%.2f test_s=%.1f storage_pause_ms=%s '
            'qemu_downtime_ms=%s guest_stall_ms=%s guest_wall_stall_ms=%s '
            'verify: %s' % (
                migration_s, time.monotonic() - t0, status['downtime_ms'],
                status['qemu_downtime_ms'], rep['max_stall_ms'],
                rep['max_wall_stall_ms'], check.line))
        logging.getLogger(__name__).warning('QEMU live migration: %s',
                                            numbers)
        self.addDetail('numbers', _text(numbers))
        self.assertIsNotNone(status['downtime_ms'])
        self.assertIsNotNone(status['qemu_downtime_ms'])
        b.stop_vm(vm.uuid)

    def test_the_commit_opens_no_image(self):
        # the incoming guest's gates take the leaves the compose kept
        # open: no image (no BAT) is read in the pause
        opened, seen = [], []
        real_image = vhd_image.Image
        real_complete = destination.Receive.complete

        def image(path, *args, **kwargs):
            opened.append((threading.current_thread().name, path))
            return real_image(path, *args, **kwargs)

        def complete(rcv, vm_state=None):
            me = threading.current_thread().name
            with fixtures.MonkeyPatch('xsm_driver.core.vhd.image.Image',
                                      image):
                try:
                    return real_complete(rcv, vm_state)
                finally:
                    seen.append([p for t, p in opened if t == me])
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.migration.destination.Receive.complete',
            complete))
        vm = self.boot()
        b = self.hosts['host-b']
        mid = self.a.migrate_vm(vm.uuid, 'host-b',
                                {d.vdi: 'sr' for d in vm.disks}, {})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual([[]], seen)
        self.wait_resumed(b, vm.uuid)
        check = self.verify(vm.uuid, drv=b.qemu)
        self.assertTrue(verifier.verified(check), check.line)
        b.stop_vm(vm.uuid)

    def test_abort_mid_copy_keeps_the_guest_running_on_the_source(self):
        vm = self.boot()
        a, b = self.hosts['host-a'], self.hosts['host-b']
        pid = a.qemu.pid(vm.uuid)
        sr_before = sorted(v.uuid for v in a.sr('sr').list())
        vdi_map = {d.vdi: 'sr' for d in vm.disks}
        mid = self.a.migrate_vm(vm.uuid, 'host-b', vdi_map, {},
                                bandwidth=64 * 1024)
        status = self.wait(mid, until=lambda s: s['phase'] == 'copy')
        self.assertEqual('copy', status['phase'])
        # the source asked for the incoming QEMU in compose's answer ...
        spec = b.journal.get(mid, role=destination.ROLE).state['spec']
        self.assertEqual(destination.INCOMING_AT_COMPOSE,
                         spec.get('incoming_at'))
        # ... so it starts on host-b during the copy, and waits there,
        # paused (while QEMU daemonizes, two processes name it)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not (vm.uuid in b.qemu.list() and len(
                guest_tests.qemu_processes(b.qemu.state_dir)) == 1):
            self.assertLess(time.monotonic(), deadline,
                            'no incoming QEMU on host-b')
            time.sleep(0.05)
        self.assertEqual('copy', self.a.migration_get(mid)['phase'])
        self.a.migration_abort(mid)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assert_stayed_at_the_source(vm, pid)
        self.assertEqual(sr_before, sorted(v.uuid for v in
                                           a.sr('sr').list()))
        a.stop_vm(vm.uuid)

    def test_abort_while_the_memory_moves_resumes_nothing_twice(self):
        vm = self.boot(disks=1)
        a = self.hosts['host-a']
        pid = a.qemu.pid(vm.uuid)
        vdi_map = {d.vdi: 'sr' for d in vm.disks}
        # slow enough for the memory phase to last a few seconds
        mid = self.a.migrate_vm(vm.uuid, 'host-b', vdi_map, {},
                                memory_bandwidth=256 * 1024)
        status = self.wait(mid, until=lambda s: s['progress'].get(
            'phase') == 'memory')
        self.assertEqual('memory', status['progress']['phase'],
                         status['error'])
        time.sleep(0.5)
        self.a.migration_abort(mid)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertFalse(os.path.exists(a.qemu.tls_dir(vm.uuid)))
        self.assert_stayed_at_the_source(vm, pid)
        a.stop_vm(vm.uuid)


class TestQemuCommitRule(TwoHostsCase):
    """The commit rule with a QEMU guest: an answer lost at the commit.

    The source's QEMU waits in ``pre-switchover`` while the source asks
    the destination whether it committed; it sends the rest of the guest
    only on ``committed``, and cancels (the guest runs on here) only on
    ``aborted``.
    """

    def lose_commit(self, after):
        real = destination.Receive.complete

        def complete(receive, vm_state=None):
            if after:
                real(receive, vm_state)
                raise RuntimeError('test: the commit\'s reply was lost')
            raise RuntimeError('test: the commit request was lost')
        self.useFixture(fixtures.MockPatchObject(
            destination.Receive, 'complete', complete))

    def test_commit_reply_lost_the_guest_moves_once(self):
        vm = self.boot(disks=1)
        a, b = self.hosts['host-a'], self.hosts['host-b']
        src_pid = a.qemu.pid(vm.uuid)
        self.lose_commit(after=True)
        mid = self.a.migrate_vm(vm.uuid, 'host-b',
                                {d.vdi: 'sr' for d in vm.disks}, {})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertTrue(qemu.wait_gone(src_pid, TIMEOUT))
        self.assertEqual({}, a.vms)
        vm_b = b.vm(vm.uuid)
        self.wait_resumed(b, vm.uuid)
        check = self.verify(vm.uuid, drv=b.qemu)
        self.assertTrue(verifier.verified(check), check.line)
        b.stop_vm(vm_b.uuid)

    def test_commit_request_lost_the_guest_stays_at_the_source(self):
        vm = self.boot(disks=1)
        a = self.hosts['host-a']
        pid = a.qemu.pid(vm.uuid)
        self.lose_commit(after=False)
        mid = self.a.migrate_vm(vm.uuid, 'host-b',
                                {d.vdi: 'sr' for d in vm.disks}, {})
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assert_stayed_at_the_source(vm, pid)
        a.stop_vm(vm.uuid)


def _text(value):
    return content.text_content(value)
