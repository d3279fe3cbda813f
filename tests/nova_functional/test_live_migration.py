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

import io
import os
import subprocess
import time

from nova.compute import power_state
from unittest import mock

from nova import objects
from nova.objects import migrate_data as nova_migrate_data
from oslo_utils import uuidutils

from tests.nova_functional import base
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api as rpc_api
from xsm_driver.nova import agent_process

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
        received = []
        calls = self.spy_live_migration(
            before=lambda md: received.append(self.xsm[DEST].vdi_list()))
        self.live_migrate(server)

        # progress is saved on the migration record while it runs
        running = self.wait_for_migration(server, ['running'])
        seen = self.wait_for(
            'progress on the migration record',
            lambda: self.db_migration(running).disk_processed)
        self.assertGreater(seen, 0)
        self.wait_for('progress on the instance', lambda: objects.Instance.
                      get_by_uuid(self.ctxt, server['id']).progress)
        # and GET /servers/{id}/migrations shows it, valid for nova's
        # response schema (the poller fails the test on a 400)
        shown = self.wait_for(
            'progress in GET /servers/{id}/migrations',
            lambda: [m for m in self.polled_migrations
                     if m.get('disk_processed_bytes')])
        self.assertGreater(shown[0]['disk_total_bytes'], 0)

        self.wait_for_server(server, DEST)
        record = self.wait_for_migration(server, ['completed'])
        migration = self.db_migration(record)
        self.assertGreater(migration.disk_total, 0)
        self.assertEqual(migration.disk_total,
                         migration.disk_processed)
        # nothing left: null, as nova's API schema wants (not 0)
        self.assertIsNone(migration.disk_remaining)

        engine = self.engine_migration()
        self.assertEqual('done', engine['phase'], engine['error'])
        self.assertGreater(engine['guest_writes_during_migration'], 0)
        self.assertIsNotNone(engine['downtime_ms'])

        # live_migration got nova's own migrate_data, nothing secret in
        # it; the receive is prepared when the engine starts, agent to
        # agent
        self.assertEqual(1, len(calls))
        self.assert_migrate_data(calls[0])
        self.assertEqual([], received[0])
        self.assertEqual([], self.migration_files(SOURCE))
        self.assertEqual([], self.migration_files(DEST))

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

    def assert_migrate_data(self, migrate_data):
        # a class every nova service knows (the stock conductor too), and
        # one nova's manager rolls back at the destination for
        self.assertIs(nova_migrate_data.LibvirtLiveMigrateData,
                      type(migrate_data))
        self.assertEqual(base.SR, migrate_data.instance_relative_path)
        self.assertFalse(migrate_data.is_shared_instance_path)
        self.assertTrue(migrate_data.block_migration)
        self.assertEqual(
            (True, True), self.computes[SOURCE].manager.
            _live_migration_cleanup_flags(migrate_data))


def broker_consumers(queue):
    """How many consumers RabbitMQ's ``queue`` has (0 when it has none)."""
    import amqp          # kombu's AMQP client, there with oslo.messaging
    conn = amqp.Connection(host='127.0.0.1:5672', userid='guest',
                           password='guest', connect_timeout=5)
    conn.connect()
    try:
        return conn.channel().queue_declare(queue, passive=True)[2]
    except amqp.exceptions.NotFound:
        return 0
    finally:
        conn.close()


class TestLiveMigrationEventlet(TestLiveMigration):
    """The same with nova monkey-patched by eventlet (deprecated mode).

    Run by tools/run-nova-tests.sh in a second process without
    OS_NOVA_DISABLE_EVENTLET_PATCHING; skipped in the native-threads run.
    Each compute runs its xsm agent in its own threads (``[xsm]agent =
    thread``), green threads here: the engine's NBD client and server use
    eventlet's green TLS sockets. The agents meet on a real RabbitMQ, as
    nova-compute's own bus would be.
    """

    #: what ``[xsm]agent`` gives each compute here
    AGENT_CLASS = agent_mod.Agent

    def setUp(self):
        if not base.eventlet_patched():
            self.skipTest('eventlet mode: run without '
                          'OS_NOVA_DISABLE_EVENTLET_PATCHING')
        super().setUp()

    def test_block_migration(self):
        for host in (SOURCE, DEST):
            self.assertIsInstance(self.computes[host].manager.driver._agent,
                                  self.AGENT_CLASS)
        super().test_block_migration()

    def start_xsm_compute(self, host, sr_path=None):
        compute = super().start_xsm_compute(host, sr_path)
        # Stop the agent when the test ends: nova's service fixture runs
        # cleanup_host in a thread nobody waits for, and an agent still
        # serving (a child agent outlives this process) would take the
        # calls of the next test for the same host name.
        self.addCleanup(compute.manager.driver.cleanup_host, host)
        return compute

    def xsm_flags(self):
        flags = super().xsm_flags()
        problem = base.broker_problem()
        if problem:
            self.missing(problem)
        # An exchange of its own, for its notifications, fanouts and RPC
        # queues (named after the exchange too: xsm-agent@<exchange>.host1),
        # so that no agent of another run, or one left over, takes this
        # test's calls.
        exchange = 'xsm-nova-%s' % uuidutils.generate_uuid()
        for host in (SOURCE, DEST):
            queue = rpc_api.queue_name(exchange, host)
            others = broker_consumers(queue)
            if others:
                self.fail('RabbitMQ queue %s already has %d consumer(s): '
                          'an xsm agent of another run, or one left over '
                          '(ps -ef | grep xsm_driver.cmd.agent), would take '
                          'this test\'s calls' % (queue, others))
        flags['transport_url'] = base.RABBIT_URL
        flags['agent'] = 'thread'
        self.flags(control_exchange=exchange)
        return flags


class TestLiveMigrationEventletChild(TestLiveMigrationEventlet):
    """The same with ``[xsm]agent = process``: a child xsm-agent per host.

    (In the eventlet run of tools/run-nova-tests.sh, whose filter matches
    this class's name too.)
    """

    AGENT_CLASS = agent_process.AgentProcess

    def xsm_flags(self):
        flags = super().xsm_flags()
        flags['agent'] = 'process'
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

        dest = self.computes[DEST].manager.driver
        with mock.patch.object(
                dest, 'rollback_live_migration_at_destination',
                wraps=dest.rollback_live_migration_at_destination) as rb:
            self.api.delete_migration(server['id'], record['id'])
            self.wait_for_migration(server, ['cancelled'])
            self.wait_for_server(server, SOURCE)
            # nova rolled back at the destination: its task has ended
            self.wait_for('the destination\'s rollback',
                          lambda: rb.call_count)
        self.assertEqual(1, rb.call_count)
        self.assert_no_dest_task()

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
        # aborted before the copy ended; on a busy machine the 2 s can run
        # out before the copy has counted its bytes (total still 0)
        progress = engine['progress']
        self.assertTrue(progress['total'] == 0 or
                        progress['done'] < progress['total'], progress)
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
        check = self.destination_check(server)
        self.assertEqual('Error', check['result'])
        self.assertRegex(check['details'],
                         r"^Migration pre-check error: SR 'local' on host "
                         r"host2 needs .* \(\d+ bytes\) but has .* free$")
        self.assertIsNone(self.engine_migration())   # never started
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual(source_before, self.sr_records(SOURCE))
        self.assert_guest_verified(server, SOURCE)


class TestStartFailure(base.XSMLiveMigrationTestCase):
    """The source's engine cannot start: nothing stays anywhere."""

    EPHEMERAL_GB = 0

    def test_nothing_left_when_the_source_cannot_start(self):
        server = self.boot()
        self.start_guest(server)
        source_before = self.sr_records(SOURCE)

        def fail_to_start(*args, **kwargs):
            raise RuntimeError('the source agent is unreachable (test)')

        drv = self.computes[SOURCE].manager.driver
        with mock.patch.object(drv._api, 'migrate_vm', fail_to_start):
            self.live_migrate(server)
            self.wait_for_migration(server, ['error', 'failed'])
            self.wait_for_server(server, SOURCE)
        self.assert_no_dest_task()
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual([], self.migration_files(DEST))
        self.assertEqual([], self.migration_files(SOURCE))
        self.assertEqual(source_before, self.sr_records(SOURCE))
        self.assert_guest_verified(server, SOURCE)

    def test_a_guest_that_does_not_run_is_refused(self):
        server = self.boot()
        self.xsm[SOURCE].vm_stop(server['id'])      # nova still says ACTIVE
        self.live_migrate(server)
        self.wait_for_migration(server, ['error'])
        self.wait_for_server(server, SOURCE)
        check = self.destination_check(server)
        self.assertIn('is not running on host host1 (its xsm VM is halted)',
                      check['details'])
        self.assertIsNone(self.engine_migration())
        self.assertEqual([], self.xsm[DEST].vdi_list())
        self.assertEqual('halted',
                         self.xsm[SOURCE].vm_get(server['id'])['power_state'])


class TestHypervisorUptime(base.XSMLiveMigrationTestCase):
    """``GET /os-hypervisors/{id}`` at 2.88+ asks the driver's uptime."""

    def test_uptime_is_what_uptime_prints(self):
        self.admin_api.microversion = '2.88'
        found = self.admin_api.api_get(
            '/os-hypervisors?hypervisor_hostname_pattern=%s' % SOURCE
        ).body['hypervisors']
        self.assertEqual(1, len(found), found)
        hyp = self.admin_api.api_get(
            '/os-hypervisors/%s' % found[0]['id']).body['hypervisor']
        self.assertIn(' up ', hyp['uptime'])
        self.assertIn('load average', hyp['uptime'])


class TestSpawnFromImage(base.XSMLiveMigrationTestCase):
    """The root disk holds the Glance image's data, and it migrates."""

    EPHEMERAL_GB = 0

    def create_image(self, data, disk_format='raw'):
        image_id = uuidutils.generate_uuid()
        self.glance.create(None, {
            'id': image_id, 'name': 'xsm-%s' % disk_format,
            'status': 'active', 'disk_format': disk_format,
            'container_format': 'bare', 'size': len(data),
            'min_disk': 0, 'min_ram': 0, 'is_public': True,
            'properties': {}}, data=io.BytesIO(data))
        return image_id

    def boot_image(self, image_id, status='ACTIVE'):
        request = self._build_server(image_uuid=image_id,
                                     flavor_id=self.flavor['id'],
                                     networks='none')
        request['availability_zone'] = 'nova:%s' % SOURCE
        return self._wait_for_state_change(
            self.api.post_server({'server': request}), status)

    def test_root_disk_holds_the_image_and_it_migrates(self):
        # 3 MiB and a bit: data, a zero MiB the SR need not store, data
        data = (os.urandom(MiB) + bytes(MiB) + os.urandom(MiB) + b'end')
        server = self.boot_image(self.create_image(data))
        vm = self.xsm[SOURCE].vm_get(server['id'])
        root = vm['disks'][0]['vdi']
        self.assertEqual(data + bytes(4096),
                         self.read_disk(SOURCE, root, len(data) + 4096))
        vdis = {v['uuid']: v for v in self.xsm[SOURCE].vdi_list()}
        self.assertEqual(base.GiB, vdis[root]['size'])
        # no downloaded file stays behind
        self.assertEqual([], os.listdir(os.path.join(
            self.root, SOURCE, 'state', 'images')))

        self.live_migrate(server)
        self.wait_for_server(server, DEST)
        self.wait_for_migration(server, ['completed'])
        moved = self.xsm[DEST].vm_get(server['id'])
        root = moved['disks'][0]['vdi']
        self.assertEqual(data + bytes(4096),
                         self.read_disk(DEST, root, len(data) + 4096))
        self.assertEqual([], self.xsm[SOURCE].vdi_list())
        self.assert_images_valid(DEST)

    def test_an_image_the_root_disk_cannot_take_is_refused(self):
        image_id = self.create_image(b'QFI\xfb' + bytes(4092), 'qcow2')
        server = self.boot_image(image_id, status='ERROR')
        self.assertIn("disk format 'qcow2' cannot be written",
                      server['fault']['message'])
        for host in (SOURCE, DEST):
            self.assertEqual([], self.xsm[host].vdi_list())
            self.assertEqual([], self.xsm[host].vm_list())


class TestLiveMigrationInDoubt(base.XSMLiveMigrationTestCase):
    """A switch-over in doubt is reported and watched, never guessed."""

    EPHEMERAL_GB = 0

    def test_in_doubt_keeps_running_until_resolved(self):
        server = self.boot()
        self.start_guest(server)
        src = self.computes[SOURCE].manager.driver
        dst = self.computes[DEST].manager.driver
        real_get = src._api.migration_get
        in_doubt = {'on': True, 'polls': 0}

        def migration_get(mid):
            # the engine's answer while nobody knows whether the
            # destination committed (then, "resolved", the real one)
            status = real_get(mid)
            if in_doubt['on'] and status['phase'] in ('switch-over',
                                                      'clean-up', 'done'):
                in_doubt['polls'] += 1
                return dict(status, phase='in-doubt', result=None,
                            finished=status['finished'] or 1.0,
                            error='no certain answer from host2 (test)')
            return status

        with mock.patch.object(src._api, 'migration_get', migration_get), \
                mock.patch.object(
                    src, 'rollback_live_migration_at_source') as rb_src, \
                mock.patch.object(
                    dst, 'rollback_live_migration_at_destination') as rb_dst:
            self.live_migrate(server)
            record = self.wait_for_migration(server, ['running'])
            self.wait_for('the driver to see it in doubt',
                          lambda: in_doubt['polls'] >= 5)
            # neither rolled back nor completed: still running in Nova
            time.sleep(0.5)
            self.assertEqual('running',
                             self.migration_record(server)['status'])
            s = self.api.get_server(server['id'])
            self.assertEqual(SOURCE, s['OS-EXT-SRV-ATTR:host'])
            self.assertEqual('migrating', s['OS-EXT-STS:task_state'])
            self.assertFalse(rb_src.called)
            self.assertFalse(rb_dst.called)
            faults = objects.InstanceFaultList.get_by_instance_uuids(
                self.ctxt, [server['id']])
            self.assertEqual(1, len(faults))
            self.assertIn('is in doubt; settle it with "xsm-migrate '
                          'resolve ', faults[0].message)
            # resolved: the destination had committed
            in_doubt['on'] = False
            self.wait_for_server(server, DEST)
            self.wait_for_migration(server, ['completed'])
        self.assertFalse(rb_src.called)
        self.assertFalse(rb_dst.called)
        self.assertEqual(record['id'],
                         self.migration_record(server, ['completed'])['id'])
        self.assert_guest_verified(server, DEST)


class TestGuestsOutliveCompute(base.XSMLiveMigrationTestCase):
    """``[xsm]agent = auto`` on a real bus: the agent outlives nova-compute.

    nova-compute starts the host's agent as a process of its own; stopped,
    nova-compute leaves it (and the guest) running; restarted, it adopts
    it. (Native threads; RabbitMQ at 127.0.0.1:5672, an exchange of the
    test's own.)
    """

    EPHEMERAL_GB = 0

    def xsm_flags(self):
        flags = super().xsm_flags()
        problem = base.broker_problem()
        if problem:
            self.missing(problem)
        flags['transport_url'] = base.RABBIT_URL
        flags['agent'] = 'auto'
        self.flags(control_exchange='xsm-nova-%s'
                   % uuidutils.generate_uuid())
        return flags

    def start_xsm_compute(self, host, sr_path=None):
        compute = super().start_xsm_compute(host, sr_path)
        agent = compute.manager.driver._agent
        self.assertIsInstance(agent, agent_process.AgentProcess)
        self.assertTrue(agent.detached)
        # the test ends the agents it made (nova-compute never does)
        if not agent.adopted:
            self.addCleanup(agent.terminate)
        return compute

    def test_stop_and_restart_of_nova_compute_keep_the_guest(self):
        server = self.boot()
        self.start_guest(server)
        first = self.computes[SOURCE].manager.driver._agent
        pid = first.pid()
        self.assertIsNotNone(pid)

        # nova-compute stops (its service, then the driver's clean-up)
        compute = self.computes[SOURCE]
        compute.stop()
        compute.manager.driver.cleanup_host(SOURCE)
        os.kill(pid, 0)                 # the agent still runs
        self.assertEqual('running',
                         self.xsm[SOURCE].vm_get(server['id'])[
                             'power_state'])
        time.sleep(0.3)
        self.assert_guest_verified(server, SOURCE)

        # a new nova-compute adopts the agent: same process, same guest
        compute = self.start_xsm_compute(SOURCE)
        agent = compute.manager.driver._agent
        self.assertTrue(agent.adopted)
        self.assertEqual(pid, agent.pid())
        instance = objects.Instance.get_by_uuid(self.ctxt, server['id'])
        self.assertEqual(power_state.RUNNING,
                         compute.manager.driver.get_info(instance).state)
        self.assert_guest_verified(server, SOURCE)

        # and it live-migrates the guest as ever
        self.live_migrate(server)
        self.wait_for_server(server, DEST)
        self.wait_for_migration(server, ['completed'])
        self.assert_guest_verified(server, DEST)
