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

"""Clean stops of a real QEMU guest over the agent's RPC API (1.5, TCG).

``vm_stop(vm, clean=True, timeout=N)`` presses the guest's ACPI power
button (QMP ``system_powerdown``); the guest kit's verifier (PID 1) flushes
its disks, prints its last line and powers off, and QEMU exits. A guest
that cannot hear the button (its vCPUs stopped) is killed after N
seconds. The wait holds no lock: ``vm_get`` answers meanwhile, a start
is refused, a second stop joins the first. The hosts and agents are those
of test_qemu_migration.py (in-process, on ``fake://``); under CI=true a
missing QEMU or guest kit fails the tests.
"""

import logging
import threading
import time

from tests.functional.core.migration import test_qemu_migration as qm
from tests.functional.hypervisor import test_qemu_guest as guest_tests
from xsm_driver.core.migration import host as host_mod
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier

MiB = 1 << 20
#: the longest a vm_get may take while a clean stop waits, in seconds
PROMPT = 1.0


class _Records(logging.Handler):
    """Every log record of xsm_driver's loggers, kept."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.WARNING):
        return [r.getMessage() for r in self.records if r.levelno >= level]


class _Call(threading.Thread):
    """One RPC call in a thread of its own: its answer and its time."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.answer = self.error = self.took = None

    def run(self):
        t0 = time.monotonic()
        try:
            self.answer = self.fn(*self.args, **self.kwargs)
        except Exception as exc:
            self.error = exc
        self.took = time.monotonic() - t0


class TestCleanStopOverRPC(qm.TwoHostsCase):

    def setUp(self):
        super().setUp()
        self.log = _Records()
        logger = logging.getLogger('xsm_driver')
        logger.addHandler(self.log)
        self.addCleanup(logger.removeHandler, self.log)
        if logger.getEffectiveLevel() > logging.INFO:
            level = logger.level
            logger.setLevel(logging.INFO)
            self.addCleanup(logger.setLevel, level)

    def create(self, **verifier_opts):
        opts = {'rate': 40, 'report_ms': 250}
        opts.update(verifier_opts)
        vm = self.a.vm_create(
            'vm', [{'sr': 'sr', 'size': qm.DISK_MIB * MiB}] * 2,
            qemu={'memory_mib': 128, 'verifier': opts})
        return vm['uuid']

    def console_report(self, uuid, kind, pred=lambda r: True,
                       timeout=qm.BOOT_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for rep in verifier.reports(self.a.vm_console(uuid), kind):
                if pred(rep):
                    return rep
            self.assertLess(time.monotonic(), deadline,
                            'no %s report over vm_console' % kind)
            time.sleep(0.1)

    def test_acpi_power_off_keeps_every_write(self):
        host = self.hosts['host-a']
        # adopt=1: each boot's verifier first takes what the disks hold
        # as its model (its digest on the adopt line)
        uuid = self.create(adopt=1)
        self.a.vm_start(uuid)
        first = self.console_report(uuid, 'adopt')
        self.assertEqual('ok', first['result'], first.line)
        self.assertEqual(0, first['written'])          # new disks: zeros
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 60)
        pid = host.qemu.pid(uuid)

        t0 = time.monotonic()
        stopped = self.a.vm_stop(uuid, clean=True, timeout=60)
        took = time.monotonic() - t0
        self.assertIs(True, stopped['clean'], stopped)
        self.assertEqual('halted', stopped['power_state'])
        self.assertLess(took, 30, 'the power-off took %.1f s' % took)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))
        self.assertEqual('halted', self.a.vm_get(uuid)['power_state'])
        self.assertIsNone(host.vm(uuid).disks[0].counter)   # detached

        console = self.a.vm_console(uuid)
        # the verifier's last line is the shutdown line, after its flush
        final = verifier.reports(console)[-1]
        self.assertEqual('shutdown', final.kind, console[-2000:])
        for key in ('mismatches', 'io_errors', 'flush_errors'):
            self.assertEqual(0, final[key], final.line)
        self.assertGreater(final['written'], 60)
        self.assertGreaterEqual(final['writes'], final['written'])

        # booted again: the disks hold exactly what the guest wrote
        self.a.vm_start(uuid)
        again = self.console_report(uuid, 'adopt',
                                    lambda r: r['written'] > 0)
        self.assertEqual('ok', again['result'], again.line)
        self.assertEqual(0, again['mismatches'])
        self.assertEqual(final['written'], again['written'])
        self.assertEqual(final['model'], again['model'],
                         'the disks do not hold what the guest wrote')
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 10)
        check = self.a.guest_verify(uuid)
        self.assertTrue(check['verified'], check)
        # (the adopted blocks and this boot's)
        self.assertGreaterEqual(check['blocks_checked'], final['written'])
        self.a.vm_stop(uuid, clean=False)
        self.a.vm_destroy(uuid)

    def test_a_paused_guest_is_killed_after_the_timeout(self):
        host = self.hosts['host-a']
        uuid = self.create()
        self.a.vm_start(uuid)
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 10)
        self.assertEqual('paused', self.a.vm_pause(uuid)['power_state'])
        pid = host.qemu.pid(uuid)
        t0 = time.monotonic()
        # its vCPUs are stopped: it cannot hear the power button
        stopped = self.a.vm_stop(uuid, clean=True, timeout=2)
        took = time.monotonic() - t0
        self.assertIs(False, stopped['clean'], stopped)
        self.assertEqual('halted', stopped['power_state'])
        self.assertGreaterEqual(took, 2)
        self.assertLess(took, 20, 'the kill took %.1f s' % took)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))
        self.assertIsNone(verifier.last(self.a.vm_console(uuid),
                                        'shutdown'))

    def test_a_hard_stop_kills_at_once(self):
        host = self.hosts['host-a']
        uuid = self.create()
        self.a.vm_start(uuid)
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 10)
        pid = host.qemu.pid(uuid)
        stopped = self.a.vm_stop(uuid, clean=False)
        self.assertIs(False, stopped['clean'], stopped)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertIsNone(verifier.last(self.a.vm_console(uuid),
                                        'shutdown'))
        # a caller of before 1.5 (no clean): killed at once too, as before
        self.a.vm_start(uuid)
        self.console_report(uuid, 'start', lambda r: True)
        stopped = self.a.vm_stop(uuid)
        self.assertIs(False, stopped['clean'], stopped)
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))

    def paused_guest(self):
        """A guest booted over RPC and paused: it cannot hear the button."""
        uuid = self.create()
        self.a.vm_start(uuid)
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 10)
        self.assertEqual('paused', self.a.vm_pause(uuid)['power_state'])
        return uuid

    def start_stop(self, uuid, **kwargs):
        """A vm_stop in a thread, once the host waits for the guest."""
        host = self.hosts['host-a']
        call = _Call(self.a.vm_stop, uuid, **kwargs)
        call.start()
        deadline = time.monotonic() + 10
        while host.vm(uuid).stopping is None:
            self.assertIsNone(call.took, 'the stop ended without a wait: '
                              '%r %r' % (call.answer, call.error))
            self.assertLess(time.monotonic(), deadline,
                            'the clean stop did not start waiting')
            time.sleep(0.01)
        return call

    def answered(self, call, timeout=60):
        call.join(timeout)
        self.assertFalse(call.is_alive(), 'no answer within %s s' % timeout)
        if call.error is not None:
            raise call.error
        return call.answer

    def test_vm_get_answers_while_a_clean_stop_waits(self):
        host = self.hosts['host-a']
        uuid = self.paused_guest()
        pid = host.qemu.pid(uuid)
        stop = self.start_stop(uuid, clean=True, timeout=5)
        waited_from = time.monotonic()
        # over RPC, from this thread, while the stop waits its 5 s
        for _ in range(3):
            t0 = time.monotonic()
            got = self.a.vm_get(uuid)
            took = time.monotonic() - t0
            self.assertLess(took, PROMPT, 'vm_get took %.2f s' % took)
            self.assertEqual('paused', got['power_state'])   # still is
            t0 = time.monotonic()
            listed = {v['uuid']: v for v in self.a.vm_list()}
            took = time.monotonic() - t0
            self.assertLess(took, PROMPT, 'vm_list took %.2f s' % took)
            self.assertEqual('paused', listed[uuid]['power_state'])
            time.sleep(0.3)
        self.assertIsNone(stop.took, 'the stop did not wait')
        # a start meanwhile is refused, clearly, and starts nothing
        exc = self.assertRaises(host_mod.VMStopping, self.a.vm_start, uuid)
        self.assertIn('VM %s on host host-a is stopping' % uuid, str(exc))
        self.assertEqual(pid, host.qemu.pid(uuid))
        self.assertEqual([pid],
                         guest_tests.qemu_processes(host.qemu.state_dir))
        # a second clean stop joins the first and answers with it
        second = _Call(self.a.vm_stop, uuid, clean=True, timeout=60)
        second.start()

        stopped = self.answered(stop)
        self.assertGreaterEqual(time.monotonic() - waited_from, 4.5)
        self.assertGreaterEqual(stop.took, 5)
        self.assertLess(stop.took, 25, 'the kill took %.1f s' % stop.took)
        self.assertIs(False, stopped['clean'], stopped)
        self.assertEqual('halted', stopped['power_state'])
        joined = self.answered(second, 10)
        self.assertEqual('halted', joined['power_state'])
        self.assertIs(False, joined['clean'], joined)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))
        self.assertEqual('halted', self.a.vm_get(uuid)['power_state'])
        self.assertIsNone(host.vm(uuid).disks[0].counter)   # detached
        warnings = self.log.messages()
        self.assertTrue(any('did not power off within 5 s' in m
                            for m in warnings), warnings)
        self.assertFalse([m for m in warnings if 'is gone' in m])
        # halted: it starts again
        self.assertEqual('running', self.a.vm_start(uuid)['power_state'])
        self.a.vm_stop(uuid, clean=False)

    def test_a_hard_stop_cuts_a_clean_stops_wait_short(self):
        host = self.hosts['host-a']
        uuid = self.paused_guest()
        pid = host.qemu.pid(uuid)
        clean = self.start_stop(uuid, clean=True, timeout=120)
        t0 = time.monotonic()
        hard = self.a.vm_stop(uuid, clean=False)
        took = time.monotonic() - t0
        self.assertEqual('halted', hard['power_state'])
        self.assertIs(False, hard['clean'], hard)
        self.assertLess(took, 20, 'the hard stop took %.1f s' % took)
        stopped = self.answered(clean, 10)
        self.assertIs(False, stopped['clean'], stopped)   # it was killed
        self.assertEqual('halted', stopped['power_state'])
        self.assertLess(clean.took, 30)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual([], guest_tests.qemu_processes(host.qemu.state_dir))
        self.assertIsNone(host.vm(uuid).stopping)
        self.assertFalse(host.vm(uuid).in_qemu)

    def test_polls_during_a_clean_power_off_see_no_qemu_gone(self):
        host = self.hosts['host-a']
        uuid = self.create()
        self.a.vm_start(uuid)
        self.console_report(uuid, 'progress', lambda r: r['writes'] > 20)
        pid = host.qemu.pid(uuid)
        stop = self.start_stop(uuid, clean=True, timeout=60)
        # (the guest powers off in well under a second: the polls may
        # see it running, or its QEMU gone already, halted)
        seen = []
        while stop.is_alive() or not seen:
            t0 = time.monotonic()
            state = self.a.vm_get(uuid)['power_state']
            took = time.monotonic() - t0
            self.assertLess(took, PROMPT, 'vm_get took %.2f s' % took)
            seen.append(state)
        stopped = self.answered(stop)
        self.assertIs(True, stopped['clean'], stopped)
        self.assertEqual('halted', stopped['power_state'])
        self.assertLessEqual(set(seen), {'running', 'halted'})
        self.assertEqual('halted', self.a.vm_get(uuid)['power_state'])
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual('shutdown', verifier.reports(
            self.a.vm_console(uuid))[-1].kind)
        messages = self.log.messages(logging.INFO)
        self.assertTrue(any('powered off (ACPI)' in m for m in messages),
                        messages)
        self.assertFalse([m for m in messages if 'is gone' in m])
        self.assertFalse(self.log.messages())     # not one warning
