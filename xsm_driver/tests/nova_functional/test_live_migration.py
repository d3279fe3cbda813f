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

"""``POST /servers/{id}/action {"os-migrateLive": {"block_migration":
true}}`` through the real Nova API, with two xsm computes."""

import os
import subprocess
import time

from nova.compute import power_state
from nova import objects
from oslo_utils import uuidutils

from xsm_driver.tests.nova_functional import base

MiB = base.MiB
SOURCE, DEST = base.SOURCE, base.DEST


class TestLiveMigration(base.XSMLiveMigrationTestCase):
    """The migration completes; the guest's data arrives whole."""

    # slow enough that the guest writes during the copy, fast enough for CI
    BANDWIDTH_MIB = 16

    def test_block_migration(self):
        server = self.boot()
        self.start_guest(server)
        time.sleep(0.3)
        vm = self.xsm[SOURCE].vm_get(server['id'])
        self.live_migrate(server)

        # progress is saved on the migration record while it runs
        running = self.wait_for_migration(server, ['running'])
        seen = self.wait_for(
            'progress on the migration record',
            lambda: self.db_migration(running).disk_processed)
        self.assertGreater(seen, 0)
        self.wait_for('progress on the instance', lambda: objects.Instance.
                      get_by_uuid(self.ctxt, server['id']).progress)

        self.wait_for_server(server, DEST)
        record = self.wait_for_migration(server, ['completed'])
        migration = self.db_migration(record)
        self.assertGreater(migration.disk_total, 0)
        self.assertEqual(migration.disk_total,
                         migration.disk_processed)
        self.assertEqual(0, migration.disk_remaining)

        engine = self.engine_migration()
        self.assertEqual('done', engine['phase'], engine['error'])
        self.assertGreater(engine['guest_writes_during_migration'], 0)
        self.assertIsNotNone(engine['downtime_ms'])

        # nothing left on the source; the VM runs on the destination
        self.assertEqual([], self.xsm[SOURCE].vm_list())
        self.assertEqual([], self.xsm[SOURCE].vdi_list())
        moved = self.xsm[DEST].vm_get(server['id'])
        self.assertEqual(vm['uuid'], moved['uuid'])
        self.assertEqual('running', moved['power_state'])
        self.assertEqual({base.SR}, {d['sr'] for d in moved['disks']})
        instance = objects.Instance.get_by_uuid(self.ctxt, server['id'])
        self.assertEqual(power_state.RUNNING, self.computes[
            DEST].manager.driver.get_info(instance).state)
        time.sleep(0.3)       # the guest goes on, on the destination
        self.assert_guest_verified(server, DEST)
        self.assert_images_valid(DEST)
        # the disks' chains are all the destination's SR holds
        disks = [d['vdi'] for d in moved['disks']]
        parents = {v['uuid']: v['parent']
                   for v in self.xsm[DEST].vdi_list()}
        chained = set()
        for uuid in disks:
            while uuid is not None:
                chained.add(uuid)
                uuid = parents[uuid]
        self.assertEqual(set(parents), chained)

        self._run_periodics()
        self.assert_usage(DEST)
        self.assert_usage(SOURCE, servers=0)
        self._delete_and_check_allocations(server)
        self.assertEqual([], self.xsm[DEST].vdi_list())


class TestLiveMigrationEventlet(TestLiveMigration):
    """The same with nova monkey-patched by eventlet (deprecated mode).

    Run by tools/run-nova-tests.sh in a second process without
    OS_NOVA_DISABLE_EVENTLET_PATCHING; skipped in the native-threads run.
    Each compute then runs its xsm agent as a child process
    (``[xsm]agent = auto``), so the agents meet on a real RabbitMQ.
    """

    def setUp(self):
        if not base.eventlet_patched():
            self.skipTest('eventlet mode: run without '
                          'OS_NOVA_DISABLE_EVENTLET_PATCHING')
        super().setUp()

    def xsm_flags(self):
        flags = super().xsm_flags()
        problem = base.broker_problem()
        if problem:
            self.missing(problem)
        flags['transport_url'] = base.RABBIT_URL
        # an exchange of its own: other runs on the broker never meet it
        self.flags(control_exchange='xsm-nova-%s' % uuidutils.generate_uuid())
        return flags


class TestLiveMigrationAbort(base.XSMLiveMigrationTestCase):
    """DELETE /servers/{id}/migrations/{id} while the disks copy."""

    EPHEMERAL_GB = 0
    BANDWIDTH_MIB = 1

    def test_abort_mid_copy(self):
        server = self.boot()
        self.start_guest(server)
        source_before = self.sr_records(SOURCE)
        dest_before = self.sr_records(DEST)
        self.assertEqual([], dest_before)
        self.live_migrate(server)
        record = self.wait_for_migration(server, ['running'])
        status = self.wait_for_copy(minimum=1)
        self.assertLess(status['progress']['done'],
                        status['progress']['total'])
        self.assertNotEqual([], self.xsm[DEST].vdi_list())  # receiving

        self.api.delete_migration(server['id'], record['id'])
        self.wait_for_migration(server, ['cancelled'])
        self.wait_for_server(server, SOURCE)

        engine = self.engine_migration()
        self.assertEqual('aborted', engine['phase'])
        self.assertIn('cancelled by the operator', engine['error'])
        # the destination holds nothing, the source what it held before
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual([], self.xsm[DEST].vm_list())
        self.assertEqual(source_before, self.sr_records(SOURCE))
        vm = self.xsm[SOURCE].vm_get(server['id'])
        self.assertEqual('running', vm['power_state'])
        self.assert_guest_verified(server, SOURCE)
        self._run_periodics()
        self.assert_usage(SOURCE)
        self.assert_usage(DEST, servers=0)


class TestLiveMigrationForceComplete(base.XSMLiveMigrationTestCase):
    """POST .../migrations/{id}/action force_complete lifts the limit."""

    EPHEMERAL_GB = 0
    BANDWIDTH_MIB = 1

    def test_force_complete(self):
        server = self.boot()
        self.start_guest(server)
        self.live_migrate(server)
        record = self.wait_for_migration(server, ['running'])
        status = self.wait_for_copy(minimum=1)
        total = status['progress']['total']
        left = total - status['progress']['done']
        # at 1 MiB/s the rest would take this long
        self.assertGreater(left, 6 * MiB)
        forced = time.monotonic()
        self.api.force_complete_migration(server['id'], record['id'])
        self.wait_for_server(server, DEST)
        self.wait_for_migration(server, ['completed'])
        self.assertLess(time.monotonic() - forced, left / MiB / 2)
        self.assertEqual('done', self.engine_migration()['phase'])
        self.assertEqual([], self.xsm[SOURCE].vdi_list())
        self.assert_guest_verified(server, DEST)


class TestLiveMigrationCompletionTimeout(base.XSMLiveMigrationTestCase):
    """[xsm]completion_timeout with the abort action."""

    EPHEMERAL_GB = 0
    BANDWIDTH_MIB = 1
    COMPLETION_TIMEOUT = 1          # s per GiB, 2 GiB at least: 2 s
    TIMEOUT_ACTION = 'abort'

    def test_timeout_aborts(self):
        server = self.boot()
        self.start_guest(server)
        source_before = self.sr_records(SOURCE)
        self.live_migrate(server)
        self.wait_for_migration(server, ['failed'])
        self.wait_for_server(server, SOURCE)
        engine = self.engine_migration()
        self.assertEqual('aborted', engine['phase'])
        self.assertLess(engine['progress']['done'],
                        engine['progress']['total'])
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual(source_before, self.sr_records(SOURCE))
        self.assert_guest_verified(server, SOURCE)


class TestLiveMigrationCompletionTimeoutForce(
        base.XSMLiveMigrationTestCase):
    """[xsm]completion_timeout with the force_complete action."""

    EPHEMERAL_GB = 0
    BANDWIDTH_MIB = 1
    COMPLETION_TIMEOUT = 1          # s per GiB, 2 GiB at least: 2 s
    TIMEOUT_ACTION = 'force_complete'

    def test_timeout_forces_completion(self):
        server = self.boot()
        self.start_guest(server)
        started = time.monotonic()
        self.live_migrate(server)
        self.wait_for_server(server, DEST)
        self.wait_for_migration(server, ['completed'])
        engine = self.engine_migration()
        self.assertEqual('done', engine['phase'])
        # at 1 MiB/s the copy alone would have taken this long
        self.assertLess(time.monotonic() - started,
                        engine['progress']['total'] / MiB)
        self.assert_guest_verified(server, DEST)


class TestLiveMigrationNoSpace(base.XSMLiveMigrationTestCase):
    """A destination SR without room refuses at the pre-check."""

    EPHEMERAL_GB = 0

    def start_xsm_compute(self, host, sr_path=None):
        if host != DEST:
            return super().start_xsm_compute(host, sr_path)
        # a 1 GiB file system: placement sees DISK_GB 1 (the flavor fits),
        # but a filler leaves less free space than the copy needs
        mount = os.path.join(self.root, 'small')
        os.makedirs(mount)
        try:
            subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1g', 'tmpfs',
                            mount], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.missing('this test mounts a 1 GiB tmpfs, as root: %s'
                         % (getattr(exc, 'stderr', None) or exc))
        self.addCleanup(subprocess.call, ['umount', '-l', mount])
        with open(os.path.join(mount, 'filler'), 'wb') as f:
            os.posix_fallocate(f.fileno(), 0, 1000 * MiB)
        return super().start_xsm_compute(host, os.path.join(mount, 'sr'))

    def test_refused_at_pre_check(self):
        server = self.boot()
        self.start_guest(server)
        source_before = self.sr_records(SOURCE)
        self.live_migrate(server)
        self.wait_for_migration(server, ['error'])
        self.wait_for_server(server, SOURCE)
        # the reason names the SR, what it needs and what it has
        actions = self.api.get_instance_actions(server['id'])
        action = [a for a in actions if a['action'] == 'live-migration'][0]
        events = self.api.get_instance_action_details(
            server['id'], action['request_id'])['events']
        check = [e for e in events if e['event'] ==
                 'compute_check_can_live_migrate_destination'][0]
        self.assertEqual('Error', check['result'])
        self.assertRegex(check['details'],
                         r"^Migration pre-check error: SR 'local' on host "
                         r"host2 needs .* \(\d+ bytes\) but has .* free$")
        self.assertIsNone(self.engine_migration())   # never started
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual(source_before, self.sr_records(SOURCE))
        self.assert_guest_verified(server, SOURCE)
