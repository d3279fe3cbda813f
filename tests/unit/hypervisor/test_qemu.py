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

import os

from tests import base
from xsm_driver import hypervisor
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.hypervisor import model
from xsm_driver.hypervisor import qemu


def spec(**kw):
    disks = [hv_base.DiskSpec('d0', socket='/run/x/nbd0.sock',
                              export='vdi-0'),
             hv_base.DiskSpec('d1', socket='/run/x/a,b.sock',
                              export='vdi-1')]
    kw.setdefault('disks', disks)
    return hv_base.GuestSpec('vm-1', **kw)


def option(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


class TestCommandLine(base.TestCase):

    def argv(self, accel='tcg', paused=False, **kw):
        return qemu.command_line('/usr/bin/qemu-system-x86_64', spec(**kw),
                                 qemu.Paths('/var/lib/g/vm-1'), accel,
                                 '/k/vmlinuz', '/k/initrd', 256, paused)

    def test_disks_on_nbd_unix_sockets(self):
        argv = self.argv()
        self.assertEqual(
            ['driver=nbd,node-name=disk0,server.type=unix,'
             'server.path=/run/x/nbd0.sock,export=vdi-0',
             'driver=nbd,node-name=disk1,server.type=unix,'
             'server.path=/run/x/a,,b.sock,export=vdi-1'],
            option(argv, '-blockdev'))
        self.assertEqual(['virtio-blk-pci,drive=disk0,id=vd0',
                          'virtio-blk-pci,drive=disk1,id=vd1'],
                         option(argv, '-device'))

    def test_disk_on_tcp(self):
        argv = qemu.command_line('q', spec(disks=[hv_base.DiskSpec(
            'd0', host='127.0.0.1', port=10809, export='e')]),
            qemu.Paths('/g'), 'tcg', 'k', 'i', 64)
        self.assertEqual(['driver=nbd,node-name=disk0,server.type=inet,'
                          'server.host=127.0.0.1,server.port=10809,'
                          'export=e'], option(argv, '-blockdev'))

    def test_reconnect_delay(self):
        argv = qemu.command_line('q', spec(), qemu.Paths('/g'), 'tcg', 'k',
                                 'i', 64, reconnect_delay=15)
        for opt in option(argv, '-blockdev'):
            self.assertTrue(opt.endswith(',reconnect-delay=15'), opt)

    def test_memory_vcpus_and_default_memory(self):
        argv = self.argv('kvm', memory_mib=512, vcpus=2)
        self.assertEqual(['512'], option(argv, '-m'))
        self.assertEqual(['2'], option(argv, '-smp'))
        self.assertEqual(['256'], option(self.argv('kvm'), '-m'))

    def test_tcg_memory_is_no_multiple_of_256_kib(self):
        # QEMU < 9.0 under TCG loses guest writes in a live migration of
        # RAM that is a multiple of 256 KiB (see memory_option)
        self.assertEqual(['524296K'], option(self.argv(memory_mib=512),
                                             '-m'))
        self.assertEqual(['262152K'], option(self.argv(), '-m'))
        for mib in (64, 128, 256, 1024):
            kib = int(qemu.memory_option(mib, 'tcg').rstrip('K'))
            self.assertNotEqual(0, kib % 256, mib)
            self.assertEqual(0, kib % 8, mib)      # QEMU's own rounding

    def test_accel_and_cpu(self):
        argv = self.argv('kvm')
        self.assertEqual(['kvm'], option(argv, '-accel'))
        self.assertEqual(['host'], option(argv, '-cpu'))
        argv = self.argv('tcg')
        self.assertEqual(['tcg'], option(argv, '-accel'))
        self.assertEqual([], option(argv, '-cpu'))

    def test_console_qmp_ctl_pidfile_daemonize(self):
        argv = self.argv()
        chardevs = option(argv, '-chardev')
        self.assertIn('file,id=console,path=/var/lib/g/vm-1/console.log',
                      chardevs)
        self.assertIn('socket,id=qmp,path=/var/lib/g/vm-1/qmp.sock,'
                      'server=on,wait=off', chardevs)
        self.assertIn('socket,id=ctl,path=/var/lib/g/vm-1/ctl.sock,'
                      'server=on,wait=off', chardevs)
        self.assertEqual(['chardev:console', 'chardev:ctl'],
                         option(argv, '-serial'))
        self.assertEqual(['chardev=qmp,mode=control'], option(argv, '-mon'))
        self.assertEqual(['/var/lib/g/vm-1/qemu.pid'],
                         option(argv, '-pidfile'))
        self.assertEqual('-daemonize', argv[-1])
        self.assertIn('-nodefaults', argv)
        self.assertEqual(['base=utc,clock=host'], option(argv, '-rtc'))

    def test_paused(self):
        self.assertNotIn('-S', self.argv())
        self.assertIn('-S', self.argv(paused=True))

    def test_kernel_and_cmdline(self):
        argv = self.argv(verifier={'rate': 20, 'verify_at': 100},
                         cmdline='loglevel=3')
        self.assertEqual(['/k/vmlinuz'], option(argv, '-kernel'))
        self.assertEqual(['/k/initrd'], option(argv, '-initrd'))
        self.assertEqual(['console=ttyS0 quiet no_timer_check xsmv.rate=20 '
                          'xsmv.verify_at=100 loglevel=3'],
                         option(argv, '-append'))

    def test_firmware(self):
        self.assertEqual(['qboot.rom'], option(self.argv(), '-bios'))
        self.assertEqual([], option(self.argv(firmware='seabios'), '-bios'))
        self.assertRaises(hv_base.HypervisorError, spec, firmware='ovmf')

    def test_socket_path_too_long(self):
        long_spec = spec(disks=[hv_base.DiskSpec(
            'd0', socket='/' + 'x' * 120, export='e')])
        self.assertRaises(qemu.QemuError, qemu.command_line, 'q',
                          long_spec, qemu.Paths('/g'), 'tcg', 'k', 'i', 64)

    def test_disk_without_socket(self):
        self.assertRaises(qemu.QemuError, qemu.command_line, 'q',
                          spec(disks=[hv_base.DiskSpec('d0')]),
                          qemu.Paths('/g'), 'tcg', 'k', 'i', 64)


class TestPowerState(base.TestCase):

    def test_statuses(self):
        self.assertEqual('running', qemu.power_state('running'))
        for status in ('paused', 'prelaunch', 'inmigrate', 'postmigrate',
                       'finish-migrate', 'suspended', 'io-error'):
            self.assertEqual('paused', qemu.power_state(status), status)
        self.assertEqual('crashed', qemu.power_state('guest-panicked'))
        self.assertEqual('crashed', qemu.power_state('internal-error'))
        self.assertEqual('halted', qemu.power_state('shutdown'))
        self.assertEqual('paused', qemu.power_state('some-new-status'))


class TestRecovery(base.TestCase):

    QMP = '/var/lib/g/vm-1/qmp.sock'

    def our_argv(self):
        return qemu.command_line('/usr/bin/qemu-system-x86_64', spec(),
                                 qemu.Paths('/var/lib/g/vm-1'), 'tcg',
                                 'k', 'i', 64)

    def test_no_pid_file_or_no_process(self):
        self.assertEqual(qemu.GONE, qemu.recovery_action(None, None,
                                                         self.QMP))
        self.assertEqual(qemu.GONE, qemu.recovery_action(123, None,
                                                         self.QMP))

    def test_our_qemu_is_adopted(self):
        self.assertEqual(qemu.ADOPT, qemu.recovery_action(
            123, self.our_argv(), self.QMP))

    def test_pid_reused_by_another_program(self):
        self.assertEqual(qemu.FOREIGN, qemu.recovery_action(
            123, ['/usr/bin/python3', 'path=%s,' % self.QMP], self.QMP))

    def test_qemu_of_another_guest(self):
        self.assertEqual(qemu.FOREIGN, qemu.recovery_action(
            123, self.our_argv(), '/var/lib/g/vm-2/qmp.sock'))
        # a folder whose name starts like ours is not ours
        self.assertEqual(qemu.FOREIGN, qemu.recovery_action(
            123, self.our_argv(), '/var/lib/g/vm-1/qmp'))

    def test_read_pid(self):
        tmp = self.make_tempdir()
        path = os.path.join(tmp, 'p')
        self.assertIsNone(qemu.read_pid(path))
        for text, pid in (('42\n', 42), ('', None), ('x', None),
                          ('-3', None)):
            with open(path, 'w') as f:
                f.write(text)
            self.assertEqual(pid, qemu.read_pid(path), text)

    def test_process_argv(self):
        with open('/proc/self/cmdline', 'rb') as f:
            argv0 = f.read().split(b'\0')[0].decode()
        self.assertEqual(argv0, qemu.process_argv(os.getpid())[0])
        self.assertIsNone(qemu.process_argv(2 ** 22 + 7))


class TestSpec(base.TestCase):

    def test_round_trip(self):
        s = spec(memory_mib=128, vcpus=2, verifier={'rate': 5})
        again = hv_base.GuestSpec.from_dict(s.to_dict())
        self.assertEqual(s.to_dict(), again.to_dict())

    def test_a_spec_file_without_firmware_ran_seabios(self):
        data = spec().to_dict()
        del data['firmware']
        self.assertEqual('seabios',
                         hv_base.GuestSpec.from_dict(data).firmware)

    def test_bad_names(self):
        for name in ('', '../x', 'a/b', '-x', 'x' * 65, None):
            self.assertRaises(hv_base.HypervisorError, hv_base.GuestSpec,
                              name)


class TestLoad(base.TestCase):
    """The drivers through their entry points (setup.cfg)."""

    def test_installed_drivers(self):
        self.assertIs(qemu.QemuDriver, hypervisor.driver_class('qemu'))
        self.assertIs(model.ModelDriver, hypervisor.driver_class('model'))
        self.assertIsInstance(hypervisor.load('model'), model.ModelDriver)
        tmp = self.make_tempdir()
        drv = hypervisor.load('qemu', tmp, accel='tcg')
        self.addCleanup(drv.close)
        self.assertIsInstance(drv, qemu.QemuDriver)
        self.assertEqual({}, drv.recover())

    def test_one_qemu_driver_per_folder(self):
        tmp = self.make_tempdir()
        drv = hypervisor.load('qemu', tmp, accel='tcg')
        self.assertRaises(qemu.QemuError, hypervisor.load, 'qemu', tmp,
                          accel='tcg')
        drv.close()
        drv.close()
        hypervisor.load('qemu', tmp, accel='tcg').close()

    def test_unknown(self):
        exc = self.assertRaises(hypervisor.UnknownDriver, hypervisor.load,
                                'xen')
        self.assertIn('installed: model, qemu', str(exc))
