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
seconds. The hosts and agents are those of test_qemu_migration.py
(in-process, on ``fake://``); under CI=true a missing QEMU or guest kit
fails the tests.
"""

import time

from tests.functional.core.migration import test_qemu_migration as qm
from tests.functional.hypervisor import test_qemu_guest as guest_tests
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier

MiB = 1 << 20


class TestCleanStopOverRPC(qm.TwoHostsCase):

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
