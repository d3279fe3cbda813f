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

"""Real guests: the guest kit booted by the qemu driver under TCG.

Each test boots the kit's kernel and initramfs in QEMU (TCG: KVM is not
used here, even where it works, so the tests behave the same on every
machine) with its disks on ``qemu-nbd`` exports on unix sockets, and
reads the in-guest verifier's lines on the serial console. (The
project's own NBD server listens on TCP only; the agent's exports of a
VM's disks will need it on a unix socket.)

Every QEMU a test starts is killed in its cleanup, and a last cleanup
fails the test if a QEMU process of its folder is still alive.
"""

import os
import shutil
import signal
import subprocess
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import filters
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver import hypervisor
from xsm_driver.hypervisor import accel
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier

KIT_SCRIPT = os.path.join(base.REPO_TOP, 'tools', 'guest-kit', 'build.sh')
KIT_DIR = os.environ.get('XSM_GUEST_KIT',
                         os.path.join(base.REPO_TOP, '.guest-kit'))
QEMU = 'qemu-system-x86_64'
BOOT_TIMEOUT = 60          # TCG boots the kit in ~3-4 s; a busy CI is slow
TIMEOUT = 30
DISK_MIB = 16

_kit_built = []


qemu_processes = qemu.processes_naming


class GuestTestCase(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        if shutil.which(QEMU) is None:
            self.missing('command %s not found: install it with "apt-get '
                         'install -y qemu-system-x86" (or run '
                         'tools/run-tests.sh)' % QEMU)
        self.require_command('qemu-nbd')
        self.build_kit()
        self.tmp = self.make_tempdir()
        # registered before the driver's cleanups, so it runs after them
        self.addCleanup(self.assert_no_qemu_left)
        self.state = os.path.join(self.tmp, 'vms')
        self.nbd_procs = []
        self.drv = self.driver()

    def build_kit(self):
        if _kit_built:
            return
        env = dict(os.environ, XSM_GUEST_KIT_NO_INSTALL='1')
        try:
            proc = subprocess.run([KIT_SCRIPT, KIT_DIR], env=env,
                                  capture_output=True, text=True,
                                  timeout=300, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.fail('%s took more than 300 s' % KIT_SCRIPT)
        if proc.returncode != 0:
            self.missing('the guest kit cannot be built (%s): %s'
                         % (KIT_SCRIPT, proc.stderr.strip()[-1000:]))
        _kit_built.append(True)

    def driver(self):
        drv = hypervisor.load('qemu', self.state, accel='tcg',
                              guest_kit=KIT_DIR, memory_mib=128,
                              shutdown_timeout=15)
        self.addCleanup(self.destroy_all, drv)
        return drv

    def destroy_all(self, drv):
        for name in drv.list():
            try:
                drv.destroy(name)
            except Exception:
                pass
        drv.close()

    def assert_no_qemu_left(self):
        left = qemu_processes(self.tmp)
        for pid in left:
            qemu.kill(pid)
        self.assertEqual([], left, 'QEMU processes left behind')

    def disk(self, index, create=True):
        """A raw disk file served by qemu-nbd on a unix socket."""
        image = os.path.join(self.tmp, 'disk%d.raw' % index)
        if create:
            with open(image, 'wb') as f:
                f.truncate(DISK_MIB << 20)
        sock = os.path.join(self.tmp, 'nbd%d.sock' % index)
        log = open(os.path.join(self.tmp, 'qemu-nbd%d.log' % index), 'w')
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            ['qemu-nbd', '-k', sock, '-f', 'raw', '-x', 'vdi-%d' % index,
             '--persistent', '--shared=4', image],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.addCleanup(self.reap, proc)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.fail('qemu-nbd did not serve %s' % sock)
            time.sleep(0.02)
        self.nbd_procs.append(proc)
        return hv_base.DiskSpec('d%d' % index, socket=sock,
                                export='vdi-%d' % index), image

    @staticmethod
    def reap(proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(TIMEOUT)

    def boot(self, name='g1', disks=1, **verifier_opts):
        opts = {'rate': 20, 'report_ms': 250}
        opts.update(verifier_opts)
        specs = []
        self.images = []
        for i in range(disks):
            spec, image = self.disk(i)
            specs.append(spec)
            self.images.append(image)
        spec = hv_base.GuestSpec(name, specs, verifier=opts)
        t0 = time.monotonic()
        self.drv.start(spec)
        self.wait_report(name, 'progress', lambda r: r['writes'] > 0,
                         BOOT_TIMEOUT)
        self.boot_seconds = time.monotonic() - t0
        return spec

    def console(self, name='g1', drv=None):
        return (drv or self.drv).console_output(name)

    def wait_report(self, name, kind, pred=lambda r: True, timeout=TIMEOUT,
                    after=0, drv=None):
        """The first report of ``kind``, past ``after``, where ``pred``."""
        deadline = time.monotonic() + timeout
        while True:
            for rep in verifier.reports(self.console(name, drv),
                                        kind)[after:]:
                if pred(rep):
                    return rep
            if time.monotonic() > deadline:
                self.fail('no %s report in %s s; console:\n%s'
                          % (kind, timeout,
                             self.console(name, drv)[-3000:]))
            time.sleep(0.1)

    def verify(self, name='g1', drv=None):
        done = len(verifier.reports(self.console(name, drv), 'verify'))
        (drv or self.drv).guest_command(name, verifier.VERIFY)
        return self.wait_report(name, 'verify', after=done, drv=drv)


class TestQemuGuest(GuestTestCase):

    def test_two_disks_pause_verify_shutdown(self):
        self.boot(disks=2)
        start = verifier.last(self.console(), 'start')
        self.assertEqual(2, start['disks'])
        blocks = (DISK_MIB << 20) // 4096
        self.assertEqual('%d,%d' % (blocks, blocks), start['blocks'])
        self.assertEqual('running', self.drv.power_state('g1'))
        self.wait_report('g1', 'progress', lambda r: r['wall_synced'])

        self.drv.pause('g1')
        self.assertEqual('paused', self.drv.power_state('g1'))
        before = verifier.last(self.console(), 'progress')
        time.sleep(3)
        self.assertEqual(before.line,
                         verifier.last(self.console(), 'progress').line,
                         'the guest went on while paused')
        self.drv.resume('g1')
        self.assertEqual('running', self.drv.power_state('g1'))
        after = self.wait_report(
            'g1', 'progress', lambda r: r['writes'] > before['writes'])
        # the guest's own clock stood still; the one that follows the RTC
        # (a resolution of one second) did not
        self.assertGreaterEqual(after['max_wall_stall_ms'], 2000)
        self.assertLess(after['max_stall_ms'], 2000)

        rep = self.verify()
        self.assertTrue(verifier.verified(rep), rep.line)
        self.assertGreater(rep['checked'], 0)
        self.assertEqual(2, rep['disks'])

        pid = self.drv.pid('g1')
        self.assertTrue(self.drv.shutdown('g1'), 'no clean ACPI power-off')
        self.assertEqual('halted', self.drv.power_state('g1'))
        self.assertIsNone(qemu.process_argv(pid))
        final = verifier.last(self.console(), 'shutdown')
        self.assertEqual(0, final['mismatches'])
        self.assertEqual(0, final['io_errors'])
        paths = self.drv.paths('g1')
        self.assertFalse(os.path.exists(paths.pid))
        self.assertFalse(os.path.exists(paths.qmp))

    def test_lost_writes_show_as_mismatches(self):
        self.boot(verify_at=20)
        rep = self.wait_report('g1', 'verify')
        self.assertTrue(verifier.verified(rep), rep.line)
        # lose every write behind the guest's back, while it is paused
        self.drv.pause('g1')
        with open(self.images[0], 'r+b') as f:
            f.write(bytes(DISK_MIB << 20))
            f.flush()
            os.fsync(f.fileno())
        self.drv.resume('g1')
        rep = self.verify()
        self.assertFalse(verifier.verified(rep))
        self.assertEqual('FAIL', rep['result'])
        # every block but those the guest wrote again between its resume
        # and the verify command (20 writes a second) reads as zeros
        self.assertGreater(rep['mismatches'], 0)
        self.assertLessEqual(rep['checked'] - rep['mismatches'], 10)
        self.assertEqual('zeros', verifier.reports(
            self.console(), 'mismatch')[0]['found'])

    def test_reboot_destroy_and_start_again(self):
        spec = self.boot()
        self.drv.reboot('g1')
        self.wait_report('g1', 'start', after=1, timeout=BOOT_TIMEOUT)
        self.assertEqual('running', self.drv.power_state('g1'))
        pid = self.drv.pid('g1')
        self.drv.destroy('g1')
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual('halted', self.drv.power_state('g1'))
        self.assertFalse(os.path.exists(self.drv.paths('g1').qmp))
        self.assertEqual([], qemu_processes(self.tmp))
        # a halted guest starts again; a running one cannot start twice
        self.drv.start(spec)
        self.assertEqual('running', self.drv.power_state('g1'))
        self.assertRaises(hv_base.GuestExists, self.drv.start, spec)

    def test_a_reset_right_after_the_start_reboots(self):
        # SeaBIOS hung in most of these tries (hypervisor.base.FIRMWARES)
        spec, _ = self.disk(0)
        spec = hv_base.GuestSpec('g1', [spec], verifier={'rate': 20})
        self.assertEqual('qboot', spec.firmware)
        for _ in range(4):
            self.drv.start(spec)
            self.drv.reboot('g1')
            self.wait_report('g1', 'start', timeout=BOOT_TIMEOUT)
            self.drv.destroy('g1')

    def test_the_nbd_server_restarts_under_the_guest(self):
        # as the agent that serves the disks restarts
        self.boot()
        self.nbd_procs[0].terminate()
        self.nbd_procs[0].wait(TIMEOUT)
        time.sleep(2)
        seen = verifier.last(self.console(), 'progress')['writes']
        self.disk(0, create=False)
        rep = self.wait_report('g1', 'progress',
                               lambda r: r['writes'] > seen + 20)
        self.assertEqual(0, rep['io_errors'], self.console())
        self.assertEqual(0, rep['mismatches'], self.console())
        # the guest's writes waited for the server (2 s), and failed none
        self.assertGreaterEqual(rep['max_stall_ms'], 1500)
        rep = self.verify()
        self.assertTrue(verifier.verified(rep), rep.line)

    def test_started_paused_then_killed_when_acpi_is_not_heard(self):
        disk, _ = self.disk(0)
        self.drv.start(hv_base.GuestSpec('g1', [disk]), paused=True)
        self.assertEqual('paused', self.drv.power_state('g1'))
        pid = self.drv.pid('g1')
        t0 = time.monotonic()
        # a guest whose vCPUs are stopped cannot hear the power button
        self.assertFalse(self.drv.shutdown('g1', timeout=1))
        self.assertLess(time.monotonic() - t0, 10)
        self.assertIsNone(qemu.process_argv(pid))
        self.assertEqual('halted', self.drv.power_state('g1'))

    def test_a_guest_that_cannot_start_leaves_nothing(self):
        spec = hv_base.GuestSpec('g1', [hv_base.DiskSpec(
            'd0', socket=os.path.join(self.tmp, 'nobody.sock'),
            export='x')])
        self.assertRaises(qemu.QemuError, self.drv.start, spec)
        self.assertEqual([], self.drv.list())
        self.assertFalse(os.path.exists(self.drv.paths('g1').pid))


class TestAgentBlockStack(GuestTestCase):
    """The guest's disk served by xsm-driver's own NBD server.

    Through the stack an agent gives a VM's disk, ``Counter(Gate(raw))``:
    every guest write passes the gate, and a paused gate (a switch-over)
    stalls the guest without failing any of its I/O. (The server listens
    on TCP here: it has no unix socket yet.)
    """

    def test_guest_io_through_the_gate(self):
        image = os.path.join(self.tmp, 'disk0.raw')
        with open(image, 'wb') as f:
            f.truncate(DISK_MIB << 20)
        raw = backends.RawDevice(image, writable=True)
        self.addCleanup(raw.close)
        gate = filters.Gate(raw)
        counter = filters.Counter(gate)
        srv = nbd_server.Server({'vdi-0': counter}).start()
        self.addCleanup(srv.stop)
        # (runs before srv.stop: frees the I/O a failed test left held)
        self.addCleanup(lambda: gate.paused and gate.resume())
        host, port = srv.address
        self.drv.start(hv_base.GuestSpec('g1', [hv_base.DiskSpec(
            'd0', host=host, port=port, export='vdi-0')],
            verifier={'rate': 20, 'report_ms': 250}))
        rep = self.wait_report('g1', 'progress', lambda r: r['writes'] > 10,
                               BOOT_TIMEOUT)
        # the guest's writes are the agent's: 4 KiB each, through the gate
        self.assertGreaterEqual(counter.stats()['requests'].get('write', 0),
                                rep['writes'])

        gate.pause(timeout=TIMEOUT)
        time.sleep(2)
        gate.resume()
        rep = self.wait_report('g1', 'progress',
                               lambda r: r['writes'] > rep['writes'] + 20)
        self.assertEqual(0, rep['io_errors'])
        self.assertGreaterEqual(rep['max_stall_ms'], 1500)
        rep = self.verify()
        self.assertTrue(verifier.verified(rep), rep.line)
        self.drv.destroy('g1')


class TestAccel(base.TestCase):

    def test_auto_probe_decides_and_is_kept(self):
        binary = shutil.which(QEMU)
        if binary is None:
            self.missing('command %s not found: install it with "apt-get '
                         'install -y qemu-system-x86"' % QEMU)
        cache = os.path.join(self.make_tempdir(), 'probe.json')
        t0 = time.monotonic()
        first = accel.resolve('auto', binary, cache_file=cache)
        self.assertIn(first, ('kvm', 'tcg'))
        self.assertLess(time.monotonic() - t0, 15)
        if os.path.exists('/dev/kvm'):
            self.assertTrue(os.path.exists(cache))
        accel._cache.clear()            # a new agent: the file answers
        self.assertEqual(first, accel.resolve('auto', binary,
                                              cache_file=cache))


class TestRestart(GuestTestCase):
    """An agent that restarts finds its QEMU again, or knows it is gone."""

    def test_new_driver_adopts_the_running_qemu(self):
        self.boot()
        pid = self.drv.pid('g1')
        self.drv.close()                     # the agent goes away

        drv2 = self.driver()
        self.assertEqual({'g1': 'running'}, drv2.recover())
        self.assertEqual(pid, drv2.pid('g1'))
        drv2.pause('g1')
        self.assertEqual('paused', drv2.power_state('g1'))
        drv2.resume('g1')
        seen = len(verifier.reports(self.console(), 'progress'))
        self.wait_report('g1', 'progress', after=seen)
        rep = self.verify(drv=drv2)
        self.assertTrue(verifier.verified(rep), rep.line)
        drv2.close()

        # the QEMU dies while no agent runs: halted, files cleaned
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(qemu.wait_gone(pid, TIMEOUT))
        drv3 = self.driver()
        self.assertEqual({'g1': 'halted'}, drv3.recover())
        self.assertEqual([], drv3.list())
        self.assertFalse(os.path.exists(drv3.paths('g1').pid))

    def test_a_qemu_that_does_not_answer_is_killed(self):
        disk, _ = self.disk(0)
        self.drv.start(hv_base.GuestSpec('g1', [disk]), paused=True)
        pid = self.drv.pid('g1')
        self.drv.close()
        os.kill(pid, signal.SIGSTOP)        # alive, but deaf to QMP
        self.addCleanup(qemu.kill, pid)
        drv2 = hypervisor.load('qemu', self.state, accel='tcg',
                               guest_kit=KIT_DIR, qmp_timeout=1)
        self.addCleanup(self.destroy_all, drv2)
        self.assertEqual({'g1': 'halted'}, drv2.recover())
        self.assertTrue(qemu.wait_gone(pid, TIMEOUT))
        self.assertEqual([], qemu_processes(self.tmp))

    def test_reused_pid_is_not_killed(self):
        spec = hv_base.GuestSpec('g2', [])
        paths = self.drv.paths('g2')
        os.makedirs(paths.folder)
        with open(paths.spec, 'w') as f:
            f.write('{"name": "g2", "disks": []}')
        with open(paths.pid, 'w') as f:
            f.write(str(os.getpid()))        # this test runner, not QEMU
        self.assertEqual({'g2': 'halted'}, self.drv.recover())
        self.assertFalse(os.path.exists(paths.pid))
        self.assertEqual('g2', spec.name)
