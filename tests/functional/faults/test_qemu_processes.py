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

"""Real QEMU guests moved between two xsm-agent processes (issue 14).

Two ``xsm-agent`` processes, each in its own network namespace (see
:mod:`fixtures`), talk over RabbitMQ on a per-test exchange; both run
their VMs with ``[hypervisor]driver = qemu`` under TCG, booting the guest
kit, whose in-guest verifier writes to every disk all along. Everything
the test does to a VM goes through the agents' RPC API (1.4): create,
start, snapshot, console, verify, migrate, abort, stop.

* a live migration from host a to host b completes: the guest verifies
  on b and writes on there, its QEMU on a is gone and a keeps nothing;
* a migration cancelled over RPC in each phase it goes through
  (``prepare-receive``, ``mirror``, ``snapshot``, ``copy``, ``compose``,
  and the ``memory`` sub-phase, QEMU's own RAM migration, in which the
  journal stays at ``compose``) rolls back: the guest runs on in the
  same QEMU on a, without an I/O error or a mismatch, and b has nothing;
* the destination's agent killed (``kill -9``) mid-copy: the guest on a
  writes on without an error, and the restarted agent of b kills the
  orphaned incoming QEMU and rolls back what it had received.

Every QEMU and agent a test starts is killed in its clean-up, and the
test fails if a QEMU of its folders was still alive then (a test stops
its VM itself when it is done). In CI (``CI=true``) a missing broker,
QEMU, guest kit or namespace support fails these tests.
"""

import logging
import os
import shutil
import time

from testtools import content

from tests.functional.core.migration import fixtures as rabbit
from tests.functional.faults import fixtures
from tests.functional.hypervisor import test_qemu_guest as guest_tests
from xsm_driver.core.migration import journal
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier

LOG = logging.getLogger(__name__)

MiB = fixtures.MiB
records = rabbit.records
chain_depth = rabbit.chain_depth

DISK_SIZE = 16 * MiB
#: seconds a guest may take to boot and write (TCG, 2 busy cores)
BOOT_TIMEOUT = 120
#: seconds a migration may take from its start to its end
MIGRATION_TIMEOUT = 180
#: seconds for the guest to show some more writes
WRITES_TIMEOUT = 60
#: seconds a mirrored guest write waits for the destination
MIRROR_TIMEOUT = 2
#: the in-guest verifier: blocks per second per disk, report interval
RATE = 40
REPORT_MS = 250
#: copy rate limit while the destination is killed: the guest has
#: written 1-2 MiB when it migrates, copied in about 10 s at this rate,
#: time enough to kill mid-copy
KILL_BANDWIDTH = 128 * 1024
#: memory rate limit: QEMU's RAM phase lasts seconds
MEMORY_BANDWIDTH = 256 * 1024
#: what the agents' guests boot (tools/guest-kit/build.sh makes them)
KIT_FILES = ('vmlinuz', 'initramfs.cpio.gz')
#: seconds an agent waits for another's answer, where an agent is killed
RPC_TIMEOUT = 8
#: seconds an incoming QEMU may take to start in the background: the
#: start's own timeout (``QemuDriver.start``), and a margin
INCOMING_START_TIMEOUT = 45


def describe_processes(pids):
    """Each pid's state, parent, age and kernel wait channel.

    For a failure message: a QEMU still daemonizing, or stuck where.
    """
    ticks = os.sysconf('SC_CLK_TCK')
    with open('/proc/uptime') as f:
        uptime = float(f.read().split()[0])
    out = []
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            with open('/proc/%d/wchan' % pid) as f:
                wchan = f.read().strip()
        except OSError as exc:
            out.append('%d: gone (%s)' % (pid, exc))
            continue
        out.append('%d: state %s, parent %s, age %.1f s, waits in %s'
                   % (pid, fields[0], fields[1],
                      uptime - int(fields[19]) / ticks, wchan or '-'))
    return '; '.join(out) or 'none'


class QemuAgentsTest(fixtures.NamespacedAgentsFixture):
    """Hosts a and b, each an xsm-agent process running QEMU guests."""

    def setUp(self):
        if shutil.which(guest_tests.QEMU) is None:
            self.missing('command %s not found: install it with "apt-get '
                         'install -y qemu-system-x86"' % guest_tests.QEMU)
        # (the kit is not built here: other tests may be booting it)
        kit = guest_tests.KIT_DIR
        absent = [n for n in KIT_FILES
                  if not os.path.isfile(os.path.join(kit, n))]
        if absent:
            self.missing('the guest kit in %s has no %s: build it with '
                         '"%s %s"' % (kit, ', '.join(absent),
                                      guest_tests.KIT_SCRIPT, kit))
        super().setUp()
        # runs before the agents stop: any QEMU still alive is a leak
        self.addCleanup(self.assert_no_qemu_left)
        # a guest's verify reads back every block it wrote: give it time
        self.a = self.client('a', timeout=120)
        self.b = self.client('b', timeout=120)

    def agent_options(self, role):
        return {'mirror_timeout': MIRROR_TIMEOUT}

    def agent_sections(self, role):
        return {'hypervisor': {'driver': 'qemu', 'accel': 'tcg',
                               'guest_kit': guest_tests.KIT_DIR,
                               'default_memory_mib': 128,
                               'shutdown_timeout': 10}}

    # -- processes -----------------------------------------------------------

    def guests_dir(self, role):
        return os.path.join(self.agents[role].state_path, 'guests')

    def wait_incoming_started(self, vm):
        """b's QEMU processes once its incoming QEMU has started.

        It starts during the copy. Started, it is one process, the daemon
        its pidfile names; until then there are its parent alone (before
        the fork), or the parent and the daemon (the parent waits for the
        daemon's set-up). Its start may take up to its own timeout.
        """
        pidfile = os.path.join(self.guests_dir('b'), vm['uuid'],
                               qemu.PID_FILE)
        deadline = time.monotonic() + INCOMING_START_TIMEOUT
        while True:
            pids = self.qemus('b')
            if pids == [qemu.read_pid(pidfile)] or \
                    time.monotonic() > deadline:
                return pids
            time.sleep(0.05)

    def qemus(self, role):
        """pids of the live QEMU processes of host ``role``'s folder."""
        return guest_tests.qemu_processes(self.agents[role].folder)

    def assert_no_qemu_left(self):
        left = {}
        for role in 'ab':
            pids = self.qemus(role)
            if pids:
                left[role] = pids
            for pid in pids:
                qemu.kill(pid)
        still = [p for role in 'ab' for p in self.qemus(role)]
        self.assertEqual([], still, 'QEMU processes could not be killed')
        self.assertEqual({}, left, 'QEMU processes left behind (by host)')

    # -- the guest -----------------------------------------------------------

    def console_report(self, client, vm, kind, pred=lambda r: True,
                       timeout=WRITES_TIMEOUT, note=''):
        """The first ``kind`` report on ``vm``'s console where ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            text = client.vm_console(vm['uuid'])
            for rep in verifier.reports(text, kind):
                if pred(rep):
                    return rep
            if time.monotonic() > deadline:
                self.fail('%sno %s report as wanted on the console of VM '
                          '%s within %s s; console ends with:\n%s%s'
                          % (note, kind, vm['uuid'], timeout, text[-3000:],
                             self.logs()))
            time.sleep(0.2)

    def last_progress(self, client, vm):
        return verifier.last(client.vm_console(vm['uuid']), 'progress')

    def assert_writes_on(self, client, vm, more=20, note=''):
        """The guest writes ``more`` blocks more, without an error."""
        seen = self.last_progress(client, vm)
        seen = seen['writes'] if seen else 0
        rep = self.console_report(client, vm, 'progress',
                                  lambda r: r['writes'] > seen + more,
                                  note=note)
        self.assertEqual(0, rep['io_errors'], '%s%s' % (note, rep.line))
        self.assertEqual(0, rep['mismatches'], '%s%s' % (note, rep.line))
        return rep

    def assert_verified(self, client, vm, note=''):
        """A full check of every disk passes; the guest stops writing."""
        result = client.guest_verify(vm['uuid'])
        self.assertEqual('qemu', result['kind'], note)
        self.assertTrue(result['verified'], '%s%s%s' % (note, result,
                                                        self.logs()))
        self.assertIsNone(result['error'], note)
        self.assertEqual(0, result['mismatches'], note)
        self.assertEqual(0, result['io_errors'], note)
        self.assertGreater(result['blocks_checked'], 0, note)
        self.assertEqual(result['blocks_checked'] * 4096,
                         result['bytes_verified'], note)
        return result

    def boot_vm(self, snapshots=2):
        """A running QEMU guest on host a, two disks, deep chains.

        ``snapshots`` snapshots of the VM, taken while the guest writes:
        each disk's chain is ``snapshots + 1`` images deep.
        """
        vm = self.a.vm_create(
            'vm-%s' % self.token,
            [{'sr': 'sr-a', 'size': DISK_SIZE} for _ in range(2)],
            vifs=['net0'],
            qemu={'memory_mib': 128,
                  'verifier': {'rate': RATE, 'report_ms': REPORT_MS}})
        self.assertEqual(128, vm['qemu']['memory_mib'])
        self.assertEqual('running', self.a.vm_start(vm['uuid'])[
            'power_state'])
        start = self.console_report(self.a, vm, 'start',
                                    timeout=BOOT_TIMEOUT, note='boot: ')
        self.assertEqual(2, start['disks'], start.line)
        self.console_report(self.a, vm, 'progress',
                            lambda r: r['writes'] > 20,
                            timeout=BOOT_TIMEOUT, note='boot: ')
        for _ in range(snapshots):
            self.a.vm_snapshot(vm['uuid'])
            self.assert_writes_on(self.a, vm, 10, 'after a snapshot: ')
        vm = self.a.vm_get(vm['uuid'])
        vdis = self.a.vdi_list()
        for disk in vm['disks']:
            self.assertEqual(snapshots + 1, chain_depth(vdis, disk['vdi']))
        return vm

    def source_pid(self, vm):
        """The pid of ``vm``'s QEMU on host a (the only QEMU there)."""
        pids = self.qemus('a')
        self.assertEqual(1, len(pids), 'QEMUs of host a: %s' % pids)
        argv = qemu.process_argv(pids[0])
        self.assertTrue(any(vm['uuid'] in arg for arg in argv), argv)
        return pids[0]

    def stop_vm(self, client, vm):
        self.assertEqual('halted', client.vm_stop(vm['uuid'])['power_state'])

    # -- checks --------------------------------------------------------------

    def assert_nothing_on_b(self, vm, note=''):
        """Nothing of ``vm`` on host b: no QEMU, VM, VDI or listener."""
        self.assertEqual([], self.qemus('b'), note)
        folder = os.path.join(self.guests_dir('b'), vm['uuid'])
        left = sorted(os.path.relpath(os.path.join(d, n), folder)
                      for d, dirs, files in os.walk(folder)
                      for n in dirs + files)
        self.assertFalse(os.path.exists(folder),
                         '%sthe incoming guest\'s folder %s is left, with: '
                         '%s%s' % (note, folder, left, self.logs()))
        self.assert_nothing_received()
        self.assertEqual([], self.net.listening_ports(
            'b', self.net.migration['b']), note)

    def assert_stayed_on_a(self, vm, pid, before_a, note=''):
        """A rolled back migration: ``vm`` runs on in QEMU ``pid`` on a.

        Its VDIs and chains are as before, no migration credentials are
        left, its verifier writes on without an error and a full check
        of every disk passes (the verifier then stops writing).
        """
        self.assertEqual([pid], self.qemus('a'), note)
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'],
                         note)
        after_a = self.a.vdi_list()
        self.assertEqual(records(before_a), records(after_a),
                         '%s%s' % (note, self.logs()))
        for disk in vm['disks']:
            self.assertEqual(chain_depth(before_a, disk['vdi']),
                             chain_depth(after_a, disk['vdi']), note)
        self.assertFalse(os.path.exists(os.path.join(
            self.guests_dir('a'), vm['uuid'], qemu.TLS_DIR)),
            '%sQEMU\'s migration TLS credentials are left on a' % note)
        self.assert_writes_on(self.a, vm, 20, note)
        return self.assert_verified(self.a, vm, note)

    def assert_migration_gone_from_a(self, mid, note=''):
        folder = os.path.join(self.agents['a'].state_path, 'migrations', mid)
        self.assertFalse(os.path.exists(folder), '%sleft: %s'
                         % (note, folder))


class TestQemuLiveMigration(QemuAgentsTest):

    def test_guest_moves_to_the_other_agent_and_verifies_there(self):
        t0 = time.monotonic()
        vm = self.boot_vm()
        src_pid = self.source_pid(vm)
        self.assertEqual([], self.qemus('b'))
        before = self.last_progress(self.a, vm)
        t1 = time.monotonic()
        mid = self.migrate(vm)
        status = self.wait(self.a, mid, timeout=MIGRATION_TIMEOUT)
        migration_s = time.monotonic() - t1
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assertIsNone(status['error'])
        self.assertEqual('qemu', status['guest_kind'])
        self.assertGreater(status['bytes_copied'], 0)
        self.assertIsNotNone(status['downtime_ms'])
        self.assertIsNotNone(status['qemu_downtime_ms'])
        # the source's QEMU is gone, nothing of the VM is left on a
        self.assertTrue(qemu.wait_gone(src_pid, 60),
                        'the QEMU pid %d on a still runs' % src_pid)
        self.assertEqual([], self.qemus('a'))
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        self.assertFalse(os.path.exists(os.path.join(self.guests_dir('a'),
                                                     vm['uuid'])))
        self.assert_migration_gone_from_a(mid)
        # the guest runs on b in a QEMU of b's, over base + leaf chains
        deadline = time.monotonic() + 60
        while self.b.vm_get(vm['uuid'])['power_state'] != 'running':
            self.assertLess(time.monotonic(), deadline, 'not resumed on b')
            time.sleep(0.1)
        pids_b = self.qemus('b')
        self.assertEqual(1, len(pids_b), pids_b)
        self.assertNotEqual(src_pid, pids_b[0])
        moved = self.b.vm_get(vm['uuid'])
        received = self.b.vdi_list()
        for disk in moved['disks']:
            self.assertEqual('sr-b', disk['sr'])
            self.assertEqual(2, chain_depth(received, disk['vdi']))
        # it writes on there: the same guest, not booted again (its
        # memory came along: its counts go on from where they were on a)
        rep = self.assert_writes_on(self.b, vm, 40, 'on b: ')
        console = self.b.vm_console(vm['uuid'])
        self.assertEqual([], verifier.reports(console, 'start'), console)
        first = verifier.reports(console, 'progress')[0]
        self.assertGreater(first['writes'], before['writes'], first.line)
        result = self.assert_verified(self.b, vm, 'on b: ')
        self.assertGreaterEqual(result['writes'], rep['writes'])
        numbers = ('migration_s=%.2f test_s=%.1f bytes_copied=%d '
                   'storage_pause_ms=%s qemu_downtime_ms=%s '
                   'guest_max_stall_ms=%s guest_max_wall_stall_ms=%s '
                   'blocks_checked=%d writes=%d' % (
                       migration_s, time.monotonic() - t0,
                       status['bytes_copied'], status['downtime_ms'],
                       status['qemu_downtime_ms'], result['max_stall_ms'],
                       result['max_wall_stall_ms'], result['blocks_checked'],
                       result['writes']))
        LOG.warning('QEMU guest between agent processes: %s', numbers)
        self.addDetail('numbers', content.text_content(numbers))
        # once stopped, nothing runs on either host
        self.stop_vm(self.b, vm)
        self.assertEqual([], self.qemus('b'))


class TestQemuAbortInEachPhase(QemuAgentsTest):
    """A migration cancelled over RPC in each phase it goes through.

    One VM for all rounds (its QEMU must be the same one at the end of
    every round). A round is held by the phase hook of host a's agent
    (:mod:`hooked_agent`) right after the migration entered the phase,
    or, for ``memory`` (QEMU's RAM migration, inside the journal's
    ``compose``: no hook point), slowed down with ``memory_bandwidth``.
    """

    HOLD_PHASES = True

    #: (round name, phase to hold or None, its occurrence, whether b
    #: already runs the incoming QEMU then)
    ROUNDS = (
        ('prepare-receive', 'prepare-receive', 1, False),
        ('mirror', 'mirror', 1, True),
        ('snapshot', 'snapshot', 2, True),
        ('copy', 'copy', 1, True),
        ('compose', 'compose', 1, True),
        ('memory', None, None, True),
    )

    def start_round(self, vm, phase, occurrence):
        """Start a migration and have it in the round's phase."""
        if phase is not None:
            self.hold_at(phase, occurrence)
            mid = self.migrate(vm)
            return mid, self.wait_held(mid, phase, timeout=MIGRATION_TIMEOUT)
        mid = self.migrate(vm, memory_bandwidth=MEMORY_BANDWIDTH)
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            status = self.a.migration_get(mid)
            if status['progress'].get('phase') == 'memory':
                break
            if status['finished'] is not None or \
                    time.monotonic() > deadline:
                self.fail('migration %s never was in its memory phase '
                          '(%s: %s)%s' % (mid, status['phase'],
                                          status['error'], self.logs()))
            time.sleep(0.02)
        self.assertEqual('compose', status['phase'])
        # QEMU has begun to send the guest's RAM
        time.sleep(0.5)
        status = self.a.migration_get(mid)
        self.assertEqual('memory', status['progress'].get('phase'),
                         'the memory phase ended within 0.5 s: %s' % status)
        return mid, status

    def test_cancel_over_rpc_in_each_phase(self):
        vm = self.boot_vm()
        pid = self.source_pid(vm)
        before_a = self.a.vdi_list()
        for name, phase, occurrence, incoming in self.ROUNDS:
            note = 'cancel in %s: ' % name
            mid, status = self.start_round(vm, phase, occurrence)
            self.assertEqual('qemu', status['guest_kind'], note)
            if incoming:
                pids = self.wait_incoming_started(vm)
                self.assertEqual(1, len(pids), '%sQEMUs of b: %s%s' % (
                    note, describe_processes(pids), self.logs()))
            else:
                self.assertEqual([], self.qemus('b'), note)
            status = self.a.migration_abort(mid)
            if phase is not None:
                self.assertEqual(phase, status['phase'], note)
                self.release()
            status = self.wait(self.a, mid, timeout=MIGRATION_TIMEOUT)
            self.assertEqual('aborted', status['phase'],
                             '%s%s%s' % (note, status, self.logs()))
            self.assertIn('cancelled by the operator', status['error'], note)
            self.assertIsNone(status['downtime_ms'], note)
            # the same QEMU runs on a, writing without an error, and
            # every disk verifies; b has nothing
            result = self.assert_stayed_on_a(vm, pid, before_a, note)
            self.assert_nothing_on_b(vm, note)
            self.assert_migration_gone_from_a(mid, note)
            LOG.info('%swrites=%d blocks_checked=%d', note,
                     result['writes'], result['blocks_checked'])
            # the next round begins with the guest writing
            self.a.guest_start(vm['uuid'])
            self.assert_writes_on(self.a, vm, 10, note)
        self.stop_vm(self.a, vm)
        self.assertEqual([], self.qemus('a'))


class TestQemuDestinationKilled(QemuAgentsTest):
    """``kill -9`` of the destination's agent in the middle of the copy.

    The agents wait :data:`RPC_TIMEOUT` s for each other's answers: the
    source gives up telling the dead destination to roll back, and ends
    the migration aborted, while b is still down.
    """

    def agent_sections(self, role):
        sections = super().agent_sections(role)
        sections['DEFAULT'] = {'rpc_response_timeout': RPC_TIMEOUT}
        return sections

    def test_destination_agent_killed_mid_copy(self):
        vm = self.boot_vm()
        pid = self.source_pid(vm)
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=KILL_BANDWIDTH)
        self.wait_phase(self.a, mid, 'copy', timeout=MIGRATION_TIMEOUT)
        self.wait_progress(self.a, mid, timeout=MIGRATION_TIMEOUT)
        status = self.a.migration_get(mid)
        self.assertEqual('copy', status['phase'])
        self.assertLess(status['bytes_copied'], status['progress']['total'])
        # the incoming QEMU waits on b (it started during the copy)
        incoming = self.wait_incoming_started(vm)
        self.assertEqual(1, len(incoming), describe_processes(incoming))
        dest = self.agents['b']
        dest.kill()
        t_kill = time.monotonic()
        # b's QEMU outlives its agent (it daemonized): an orphan now
        self.assertEqual(incoming, self.qemus('b'))
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        # the guest on a writes on, without an error, its mirror to the
        # dead destination dropped after at most MIRROR_TIMEOUT
        self.assert_writes_on(self.a, vm, 2 * RATE * MIRROR_TIMEOUT,
                              'b killed: ')
        # the source rolls back on its own, b still down
        status = self.wait(self.a, mid, timeout=MIGRATION_TIMEOUT)
        aborted_s = time.monotonic() - t_kill
        self.assertEqual('aborted', status['phase'], self.logs())
        # whichever failed first on the dead destination: the mirror, or
        # (the machine loaded) a copy connection still in its handshake
        error = status['error']
        self.assertTrue('mirroring to the destination failed' in error or
                        'nbd://%s:' % self.net.migration['b'] in error, error)
        self.assertIn('the destination could not be told to roll back',
                      self.agents['a'].log())
        result = self.assert_stayed_on_a(vm, pid, before_a, 'b killed: ')
        self.assert_migration_gone_from_a(mid)
        # b, down all along, still has the orphan and the receive ...
        self.assertEqual(incoming, self.qemus('b'))
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        # ... until its agent is back: it kills the orphan, removes the
        # orphan's folder and rolls back the receive, before it serves
        self.start_agents(dest)
        self.assertTrue(qemu.wait_gone(incoming[0], 30),
                        'the orphan incoming QEMU still runs%s'
                        % self.logs())
        log = dest.log()
        self.assertIn('belongs to no VM here', log)
        self.assertIn('rolled back what this destination had received', log)
        self.assert_nothing_on_b(vm, 'b restarted: ')
        # the journals (read beside the running agents) agree: nothing
        # is left for a later restart to finish or roll back
        for role in 'ab':
            path = os.path.join(self.agents[role].state_path,
                                'journal.sqlite')
            with journal.Journal(path) as jnl:
                self.assertEqual([], jnl.unfinished(), role)
                self.assertEqual('aborted', jnl.get(mid).phase, role)
        # the guest on a never noticed: it writes on, and verifies again
        self.a.guest_start(vm['uuid'])
        self.assert_writes_on(self.a, vm, 20, 'b restarted: ')
        again = self.assert_verified(self.a, vm, 'b restarted: ')
        self.assertGreater(again['writes'], result['writes'])
        numbers = ('aborted_s_after_kill=%.1f writes=%d blocks_checked=%d '
                   'error=%r' % (aborted_s, again['writes'],
                                 again['blocks_checked'], status['error']))
        LOG.warning('destination agent killed mid-copy: %s', numbers)
        self.addDetail('numbers', content.text_content(numbers))
        self.stop_vm(self.a, vm)
        self.assertEqual([], self.qemus('a'))
