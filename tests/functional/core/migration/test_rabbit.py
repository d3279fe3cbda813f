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

"""The migration engine over a real RabbitMQ, one xsm-agent process a host.

The same scenarios as test_engine.py, but the control plane is RabbitMQ
(``rabbit://guest:guest@127.0.0.1:5672/``) and each host is its own
``xsm-agent`` process, so that an agent can be killed (``kill -9``) in the
middle of a migration and restarted to recover from its journal. In CI a
missing broker fails these tests; elsewhere they are skipped.
"""

import errno
import os
import subprocess
import time

from tests.functional.core.migration import fixtures
from xsm_driver.core.migration import errors
from xsm_driver.core.vhd import check as vhd_check

MiB = fixtures.MiB
records = fixtures.records
chain_depth = fixtures.chain_depth


class RabbitMigrationTest(fixtures.RabbitAgentsFixture):

    def make_vm(self, sizes=(16 * MiB, 24 * MiB), rate=300, fill=0.5,
                snapshots=2):
        """A running VM on host a, its guest writing, its chains deep."""
        vm = self.a.vm_create('vm-%s' % self.token,
                              [{'sr': 'sr-a', 'size': s} for s in sizes],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=rate, fill=fill)
        for _ in range(snapshots):
            time.sleep(0.05)
            self.a.vm_snapshot(vm['uuid'])
        return self.a.vm_get(vm['uuid'])

    def migrate(self, vm, **options):
        return self.a.migrate_vm(vm['uuid'], self.agents['b'].name,
                                 {d['vdi']: 'sr-b' for d in vm['disks']},
                                 {'net0': 'net0'}, **options)

    def assert_guest_verifies(self, client, vm, size=None):
        result = client.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'], '%s%s' % (result, self.logs()))
        if size is not None:
            self.assertEqual(size, result['bytes_verified'])

    def assert_nothing_received(self):
        self.assertEqual([], self.b.vdi_list(), self.logs())
        self.assertEqual([], self.b.vm_list())
        for sr in self.agents['b'].srs:
            self.assertEqual([], self.image_files('b', sr))
        # no credentials, and no folder, of the migration are left
        migrations = os.path.join(self.agents['b'].state_path, 'migrations')
        left = sorted(os.path.relpath(os.path.join(d, n), migrations)
                      for d, dirs, files in os.walk(migrations)
                      for n in dirs + files)
        self.assertEqual([], left, 'left in %s' % migrations)


class TestLiveMigration(RabbitMigrationTest):

    def test_vm_moves_to_the_other_host_and_the_guest_verifies(self):
        vm = self.make_vm()
        vdis = self.a.vdi_list()
        for disk in vm['disks']:
            self.assertEqual(3, chain_depth(vdis, disk['vdi']))
        mid = self.migrate(vm)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assertGreater(status['bytes_copied'], 0)
        self.assertIsNotNone(status['downtime_ms'])
        self.assertGreater(status['downtime_ms'], 0)
        # nothing is left on the source
        self.assertEqual([], self.a.vdi_list())
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        # the VM runs on the destination, over base + leaf chains
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual('running', moved['power_state'])
        received = self.b.vdi_list()
        for disk in moved['disks']:
            self.assertEqual('sr-b', disk['sr'])
            self.assertEqual(2, chain_depth(received, disk['vdi']))
        time.sleep(0.2)         # the guest goes on on host b
        self.assert_guest_verifies(self.b, vm, (16 + 24) * MiB)
        sr_b = self.agents['b'].sr_path('sr-b')
        images = [n for n in self.image_files('b', 'sr-b')
                  if n.endswith('.vhd')]
        self.assertEqual(4, len(images))
        for name in images:
            self.assertEqual([], vhd_check.check(os.path.join(sr_b, name)))


class TestAbortOverRPC(RabbitMigrationTest):

    def test_abort_while_copying_restores_both_sides(self):
        vm = self.make_vm()
        before_a, before_b = self.a.vdi_list(), self.b.vdi_list()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        self.a.migration_abort(mid)
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertIn('cancelled', status['error'])
        after_a = self.a.vdi_list()
        self.assertEqual(records(before_a), records(after_a))
        for disk in vm['disks']:
            self.assertEqual(chain_depth(before_a, disk['vdi']),
                             chain_depth(after_a, disk['vdi']))
        self.assertEqual(records(before_b), records(self.b.vdi_list()))
        self.assert_nothing_received()
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, (16 + 24) * MiB)


class TestAgentKilled(RabbitMigrationTest):

    def test_destination_killed_while_copying(self):
        vm = self.make_vm()
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        dest = self.agents['b']
        dest.kill()
        # what it had received is still on its disk...
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        # ... until it starts again and its journal rolls it back
        self.start_agents(dest)
        self.assertIn('rolled back what this destination had received',
                      dest.log())
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertIsNotNone(status['error'])
        self.assertEqual(records(before_a), records(self.a.vdi_list()))
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, (16 + 24) * MiB)
        self.assert_nothing_received()

    def test_source_killed_while_copying(self):
        vm = self.make_vm()
        # stop the guest's writes (verifying stops it) so that the disks'
        # content can be read and compared after the crash
        self.assert_guest_verifies(self.a, vm)
        sr_a = self.agents['a'].sr_path('sr-a')
        leaves = {d['vdi']: os.path.join(sr_a, d['vdi'] + '.vhd')
                  for d in vm['disks']}
        digests = {v: fixtures.digest(p) for v, p in leaves.items()}
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        self.assertNotEqual([], self.b.vdi_list())     # it was receiving
        source = self.agents['a']
        source.kill()
        self.start_agents(source)
        self.assertIn('aborted after a restart', source.log())
        self.assertEqual('aborted', self.a.migration_get(mid)['phase'])
        # the snapshot is merged back: the same VDIs, chains as deep
        after_a = self.a.vdi_list()
        self.assertEqual(records(before_a), records(after_a))
        for disk in vm['disks']:
            self.assertEqual(chain_depth(before_a, disk['vdi']),
                             chain_depth(after_a, disk['vdi']))
        # the restarted source had the destination roll back
        self.assert_nothing_received()
        # the VM comes back halted, starts, and its data is what it was
        self.assertEqual('halted', self.a.vm_get(vm['uuid'])['power_state'])
        self.assertEqual('running', self.a.vm_start(vm['uuid'])[
            'power_state'])
        for vdi, path in leaves.items():
            self.assertEqual(digests[vdi], fixtures.digest(path),
                             'VDI %s changed' % vdi)


class TestFullDestination(RabbitMigrationTest):
    """Host b's SR sr-b is a 24 MiB tmpfs."""

    TMPFS_SIZE = 24 * MiB

    def sr_layout(self, role, folder):
        layout = super().sr_layout(role, folder)
        if role == 'b':
            self.tmpfs = os.path.join(folder, 'tmpfs')
            os.makedirs(self.tmpfs)
            self.mount_tmpfs(self.tmpfs)
            layout['sr-b'] = ('vhd', os.path.join(self.tmpfs, 'sr-b'))
        return layout

    def agent_options(self, role):
        # little leaf headroom, so that what decides is the data to copy
        return {'leaf_headroom_mb': 1} if role == 'b' else {}

    def mount_tmpfs(self, path):
        self.require_command('mount')
        proc = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=%dm,mode=0700'
             % (self.TMPFS_SIZE // MiB), 'tmpfs', path],
            capture_output=True, text=True)
        if proc.returncode != 0:
            self.missing('cannot mount a %d MiB tmpfs on %s (these tests '
                         'need root and mount(8)): %s'
                         % (self.TMPFS_SIZE // MiB, path,
                            proc.stderr.strip() or proc.returncode))
        self.addCleanup(self._umount, path)

    @staticmethod
    def _umount(path):
        if subprocess.run(['umount', path], capture_output=True).returncode:
            subprocess.run(['umount', '-l', path], capture_output=True)

    def fill_tmpfs(self):
        """Write a ballast file until the tmpfs has no byte left."""
        ballast = os.path.join(self.tmpfs, 'ballast')
        self.addCleanup(lambda: os.path.exists(ballast) and
                        os.remove(ballast))
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for size in (1 * MiB, 4096, 512):
                buf = b'\xa5' * size
                while True:
                    try:
                        os.write(fd, buf)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        st = os.statvfs(self.tmpfs)
        self.assertEqual(0, st.f_bavail * st.f_frsize)
        return ballast

    def test_preflight_refuses_what_does_not_fit(self):
        # 40 MiB of data, all allocated, cannot fit in 24 MiB
        vm = self.make_vm(sizes=(40 * MiB,), fill=1.0, snapshots=1)
        before_a = self.a.vdi_list()
        exc = self.assertRaises(errors.InsufficientSpace, self.migrate, vm)
        self.assertIn('sr-b', str(exc))
        self.assertIn(self.agents['b'].name, str(exc))
        self.assertIn('free', str(exc))
        self.assertEqual(records(before_a), records(self.a.vdi_list()))
        self.assertEqual([], self.a.migration_list())
        self.assert_nothing_received()
        self.assert_guest_verifies(self.a, vm, 40 * MiB)

    def test_space_running_out_while_copying_aborts(self):
        vm = self.make_vm(sizes=(16 * MiB,), snapshots=1)
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        self.fill_tmpfs()
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        # ENOSPC, as a failed or a short write
        self.assertRegex(status['error'],
                         'No space left on device|disk full')
        self.assertEqual(records(before_a), records(self.a.vdi_list()))
        self.assertEqual([], self.b.vdi_list(sr='sr-b'), self.logs())
        self.assert_nothing_received()
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, 16 * MiB)
