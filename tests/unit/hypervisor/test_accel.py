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

from tests import base
from xsm_driver.hypervisor import accel


class TestDecide(base.TestCase):

    def test_forced_settings_ignore_the_probe(self):
        for have in (True, False):
            for ok in (True, False, None):
                self.assertEqual('kvm', accel.decide('kvm', have, ok))
                self.assertEqual('tcg', accel.decide('tcg', have, ok))

    def test_auto(self):
        self.assertEqual('tcg', accel.decide('auto', False, True))
        self.assertEqual('tcg', accel.decide('auto', True, False))
        self.assertEqual('kvm', accel.decide('auto', True, True))

    def test_needs_probe_only_for_auto_with_dev_kvm(self):
        self.assertTrue(accel.needs_probe('auto', True))
        self.assertFalse(accel.needs_probe('auto', False))
        self.assertFalse(accel.needs_probe('kvm', True))
        self.assertFalse(accel.needs_probe('tcg', True))

    def test_bad_setting(self):
        self.assertRaises(ValueError, accel.decide, 'xen', True)

    def test_probe_verdict(self):
        self.assertTrue(accel.probe_verdict(99, False))
        self.assertFalse(accel.probe_verdict(99, True))
        self.assertFalse(accel.probe_verdict(-6, False))   # MSR assertion
        self.assertFalse(accel.probe_verdict(1, False))

    def test_kernel_probe_verdict_needs_the_kernels_end(self):
        # a nested kvm-pvm host runs the boot sector, then hangs Linux
        end = b'[ 2.4] Kernel panic - not syncing: VFS: Unable to mount root'
        self.assertTrue(accel.probe_verdict(0, False, end, kernel=True))
        self.assertFalse(accel.probe_verdict(0, False, b'', kernel=True))
        self.assertFalse(accel.probe_verdict(99, False, b'', kernel=True))
        self.assertFalse(accel.probe_verdict(0, True, end, kernel=True))

    def test_kernel_probe_command(self):
        cmd = accel.probe_command('qemu', 'kvm', '/i', kernel='/k/vmlinuz')
        self.assertEqual(['-cpu', 'host'],
                         cmd[cmd.index('-cpu'):cmd.index('-cpu') + 2])
        self.assertEqual('/k/vmlinuz', cmd[cmd.index('-kernel') + 1])
        self.assertIn('panic=-1', cmd[cmd.index('-append') + 1])
        self.assertIn('-no-reboot', cmd)
        self.assertNotIn('-drive', cmd)

    def test_boot_sector(self):
        self.assertEqual(512, len(accel.BOOT_SECTOR))
        self.assertEqual(b'\x55\xaa', accel.BOOT_SECTOR[-2:])

    def test_probe_command_uses_the_cpu_the_driver_uses(self):
        cmd = accel.probe_command('qemu', 'kvm', '/t/a,b.img')
        self.assertEqual(['-cpu', 'host'],
                         cmd[cmd.index('-cpu'):cmd.index('-cpu') + 2])
        self.assertIn('file=/t/a,,b.img,format=raw,if=ide', cmd)
        self.assertNotIn('-cpu', accel.probe_command('qemu', 'tcg', '/i'))

    def test_resolve_without_dev_kvm_does_not_probe(self):
        self.assertEqual('tcg', accel.resolve(
            'auto', '/nonexistent/qemu', dev_kvm='/nonexistent/kvm'))
