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

"""The Orchestrator Extension on hosts whose VMs are real QEMU guests.

As test_extension_processes.py -- each action a separate
``xsm-cloudstack-extension ACTION FILE TIMEOUT`` process given a JSON
file shaped as CloudStack's management server writes it, two
``xsm-agent`` processes on the real RabbitMQ -- but both agents run
``[hypervisor]driver = qemu`` (TCG) with the guest kit: the VM the
extension creates is a QEMU process booting the kit, whose in-guest
verifier writes to both disks; ``migratevmwithvolume`` moves it live.

Its two NICs keep their MACs on the agents, and the migration finds each
NIC's VIF by its MAC (CloudStack lists them in another order by then);
a NIC whose MAC matches no VIF is refused before anything moves.

Every QEMU the test starts must be gone at its end: a last check kills
what is left and fails the test. In CI (``CI=true``) a missing broker,
QEMU or guest kit fails the test.
"""

import os
import shutil
import time

from testtools import content

from tests.functional.cloudstack import test_extension_processes as ext
from tests.functional.hypervisor import test_qemu_guest as guest_tests
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier

MiB = ext.MiB
MAC_A = '02:00:2a:00:00:0a'
MAC_B = '02:00:2a:00:00:0b'
#: a MAC that no VIF has
MAC_X = '02:00:2a:00:00:ff'
#: seconds a guest may take to boot and write (TCG, 2 busy cores)
BOOT_TIMEOUT = 120
#: the in-guest verifier: blocks per second per disk
RATE = 40


class TestExtensionQemuGuests(ext.ExtensionCase):

    def setUp(self):
        if shutil.which(guest_tests.QEMU) is None:
            self.missing('command %s not found: install it with "apt-get '
                         'install -y qemu-system-x86"' % guest_tests.QEMU)
        kit = guest_tests.KIT_DIR
        if not os.path.isdir(kit) or not os.listdir(kit):
            self.missing('no guest kit in %s: build it with %s %s'
                         % (kit, guest_tests.KIT_SCRIPT, kit))
        super().setUp()
        # runs before the agents stop (they leave their QEMUs running)
        self.addCleanup(self.assert_no_qemu_left)
        # a guest's verify reads back every block it wrote
        self.a = self.client('a', timeout=120)
        self.b = self.client('b', timeout=120)

    def agent_sections(self, role):
        return {'hypervisor': {'driver': 'qemu', 'accel': 'tcg',
                               'guest_kit': guest_tests.KIT_DIR,
                               'default_memory_mib': 128,
                               'shutdown_timeout': 10}}

    def qemus(self, role):
        return guest_tests.qemu_processes(self.agents[role].folder)

    def assert_no_qemu_left(self):
        left = {role: self.qemus(role) for role in 'ab' if self.qemus(role)}
        for pids in left.values():
            for pid in pids:
                qemu.kill(pid)
        self.assertEqual({}, left, 'QEMU processes left behind (by host)')

    def console_report(self, client, vm, kind, pred=lambda r: True,
                       timeout=BOOT_TIMEOUT):
        """The latest ``kind`` report on ``vm``'s console, once ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            text = client.vm_console(vm)
            rep = verifier.last(text, kind)
            if rep is not None and pred(rep):
                return rep
            self.assertLess(time.monotonic(), deadline,
                            'no %s report on the console of VM %s within '
                            '%s s; it ends with:\n%s%s' % (
                                kind, vm, timeout, text[-2000:],
                                self.logs()))
            time.sleep(0.2)

    def boots(self, uuid):
        """How often the guest's verifier started on this console."""
        return len(verifier.reports(self.a.vm_console(uuid), 'start'))

    def nics(self, *macs_vlans):
        return [{'deviceId': i, 'mac': mac, 'broadcastUri': 'vlan://%d' % v,
                 'defaultNic': i == 0}
                for i, (mac, v) in enumerate(macs_vlans)]

    def test_lifecycle_and_live_migration_of_a_qemu_guest(self):
        t0 = time.monotonic()
        created_nics = self.nics((MAC_A, 120), (MAC_B, 130))
        on_a = self.payload(self.host_a, nics=created_nics, min_ram=128 * MiB,
                            vm_details={'xsm_disks': 'sr-a:16M,sr-a:8M'})
        self.ok('create', on_a)
        [vm] = self.a.vm_list()
        uuid = vm['uuid']
        self.assertEqual('running', vm['power_state'])
        self.assertEqual({'memory_mib': 128, 'vcpus': 1, 'firmware': 'qboot'},
                         vm['qemu'])
        self.assertEqual([MAC_A + '@vlan-120', MAC_B + '@vlan-130'],
                         vm['vifs'])
        [pid] = self.qemus('a')
        argv = qemu.process_argv(pid)
        self.assertIn(argv[argv.index('-m') + 1],
                      [qemu.memory_option(128, accel)
                       for accel in ('tcg', 'kvm')])
        self.console_report(self.a, uuid, 'progress',
                            lambda r: r['writes'] > 5)
        self.assertEqual('poweron', self.ok('status', on_a)['power_state'])

        # suspend and resume pause the QEMU
        self.ok('suspend', on_a)
        self.assertEqual('paused', self.a.vm_get(uuid)['power_state'])
        self.ok('resume', on_a)
        self.assertEqual('running', self.a.vm_get(uuid)['power_state'])
        # stop ends the QEMU; status answers what the QEMU does now
        self.assertEqual('poweroff', self.ok('stop', on_a)['power_state'])
        self.assertEqual([], self.qemus('a'))
        self.assertEqual('poweroff', self.ok('status', on_a)['power_state'])
        self.ok('start', on_a)
        self.assertEqual('poweron', self.ok('status', on_a)['power_state'])
        [pid] = self.qemus('a')
        self.console_report(self.a, uuid, 'start')
        boots = self.boots(uuid)
        # reboot resets the guest in the same QEMU: its verifier starts
        # again (one more start line on the same console)
        self.ok('reboot', on_a)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.boots(uuid) == boots:
            self.assertLess(time.monotonic(), deadline, 'no new boot')
            time.sleep(0.2)
        self.assertEqual(boots + 1, self.boots(uuid))
        self.assertEqual([pid], self.qemus('a'))
        self.assertEqual('poweron', self.ok('status', on_a)['power_state'])
        self.a.guest_start(uuid, rate=RATE)
        self.console_report(self.a, uuid, 'progress',
                            lambda r: r['writes'] > 20)

        # a NIC whose MAC matches no VIF: refused, nothing moves
        error = self.refused('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': self.host_b,
                                     'pools': 'sr-b,raw-b'},
            nics=self.nics((MAC_A, 120), (MAC_X, 130))))
        self.assertIn('MAC %s (network vlan-130) that matches no NIC'
                      % MAC_B, error)
        self.assertIn(MAC_X, error)
        self.assertEqual([], self.a.migration_list())
        self.assertEqual('running', self.a.vm_get(uuid)['power_state'])

        # CloudStack lists the NICs in another order: matched by MAC, each
        # VIF stays on its own NIC's network (by position, they would
        # have swapped VLANs)
        t1 = time.monotonic()
        answer = self.ok('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': self.host_b,
                                     'pools': 'sr-b,raw-b'},
            nics=self.nics((MAC_B, 130), (MAC_A, 120))))
        migration_s = time.monotonic() - t1
        self.assertEqual('done', answer['message']['phase'], answer)
        self.assertEqual(self.host_b, answer['host'])
        self.assertEqual('poweron', answer['power_state'])
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.qemus('a'))
        moved = self.b.vm_get(uuid)
        self.assertEqual('running', moved['power_state'])
        self.assertEqual([MAC_A + '@vlan-120', MAC_B + '@vlan-130'],
                         moved['vifs'])
        self.assertEqual(['sr-b', 'raw-b'], [d['sr'] for d in moved['disks']])
        self.assertEqual(1, len(self.qemus('b')))
        [status] = self.a.migration_list()
        self.assertEqual('qemu', status['guest_kind'])
        # CloudStack still names host a: the VM is found where it is
        answer = self.ok('status', on_a)
        self.assertEqual(('poweron', self.host_b),
                         (answer['power_state'], answer['host']))
        on_b = self.payload(self.host_b, nics=self.nics((MAC_B, 130),
                                                        (MAC_A, 120)))
        self.assertEqual('poweron', self.ok('status', on_b)['power_state'])
        # the guest wrote on through the move; it checks every block
        check = self.b.guest_verify(uuid)
        self.assertEqual('qemu', check['kind'])
        self.assertTrue(check['verified'], check)
        self.assertEqual(0, check['mismatches'])
        self.assertGreater(check['blocks_checked'], 0)
        self.addDetail('numbers', content.text_content(
            'migration_s=%.1f test_s=%.1f storage_pause_ms=%s '
            'qemu_downtime_ms=%s guest_stall_ms=%s' % (
                migration_s, time.monotonic() - t0, status['downtime_ms'],
                status['qemu_downtime_ms'], check['max_stall_ms'])))

        self.assertEqual('poweroff', self.ok('stop', on_b)['power_state'])
        self.assertEqual([], self.qemus('b'))
        self.assertEqual('halted', self.b.vm_get(uuid)['power_state'])
        self.ok('delete', on_b)
        self.assertEqual([], self.b.vm_list())
        self.assertEqual([], [v for v in self.b.vdi_list()
                              if v['uuid'] in {d['vdi']
                                               for d in moved['disks']}])
        self.assertEqual([], self.a.vdi_list())

    def test_wrong_memory_is_refused_with_what_was_wrong(self):
        # 4 MiB: below what a QEMU guest may have; nothing is made
        error = self.refused('create', self.payload(self.host_a,
                                                    min_ram=4 * MiB))
        self.assertIn('refuses the memory or vCPUs of VM i-2-42-VM', error)
        self.assertIn('memory_mib', error)
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        self.assertEqual([], self.qemus('a'))
