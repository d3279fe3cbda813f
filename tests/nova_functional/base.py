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

"""Nova's functional harness with two computes that use ``xsm.XSMDriver``.

The real nova-api (WSGI in process), conductor, scheduler, placement and
two nova-compute services run in this process, as in Nova's own
``ServerLiveMigrateForceAndAbort``; the computes load the driver through
the shim (``compute_driver = xsm.XSMDriver`` -> ``nova.virt.xsm``). Each
compute embeds the xsm agent of its host, with a VHD SR in a temporary
folder; the agents meet on a ``fake://`` transport of their own, and the
disk data crosses real mutual-TLS NBD connections on loopback.

The test reaches each host's agent with :class:`AgentAPI` to drive and
check the verifying guest (the VM's "vCPU") and to list the SRs.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

from nova import context as nova_context
from nova import monkey_patch
from nova import objects
from nova.tests.functional.api import client as api_client
from nova.tests.functional import integrated_helpers
from oslo_utils.fixture import uuidsentinel as uuids
from oslo_utils import uuidutils

from tests import nova_shared
# The SR drivers probe libc (os.uname) when imported; nova's test fixtures
# forbid host probes during a test, so they are imported here, before.
from xsm_driver.core.block import backends
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys
from xsm_driver.core.sr import raw as raw_sr  # noqa: F401
from xsm_driver.core.sr import vhd as vhd_sr  # noqa: F401
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.nova import driver as xsm_driver  # noqa: F401 ([xsm] opts)

MiB = 1 << 20
GiB = 1 << 30

SOURCE, DEST = 'host1', 'host2'
SR = 'local'


RABBIT_URL = 'rabbit://guest:guest@127.0.0.1:5672/'


def broker_problem(address=('127.0.0.1', 5672), timeout=1.0):
    """Why RabbitMQ cannot be reached; None when it can."""
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as exc:
        return ('RabbitMQ is not reachable at %s:%d (%s); the eventlet-mode '
                'test runs the xsm agents as child processes, which meet on '
                'a real broker with the guest/guest account' % (
                    address[0], address[1], exc))
    return None


def eventlet_patched():
    return monkey_patch.is_patched()


class PatientStateWaits:
    """Nova's waits for a server's status, bounded for two loaded cores.

    nova's ``_wait_for_state_change`` gives up after 10 polls 0.5 s apart
    (about 5 s), and ``_wait_until_deleted`` after 40 (20 s). Measured in
    this harness at load 20-26 (2 cores, TCG): ``os-start`` of a QEMU guest
    took 1.2-3.7 s from the API call to ACTIVE, of which QEMU's own start
    (its ``-daemonize`` parent returns once the machine is set up) took
    0.4-2.4 s and nova's RPC, start_instance and the status poll the rest;
    one timed out at nova's 5 s in a run at load ~10. Nothing in it waits
    in vain (no sleep, no lock held, no RPC timeout): it is CPU time the
    processes wait for. A clean stop may also take up to
    ``[hypervisor]shutdown_timeout`` before its kill.
    So the waits end at :attr:`STATE_TIMEOUT` instead; a test whose server
    reaches the status goes on as soon as the API shows it, and one that
    never does still fails (the same assertion, later).
    """

    #: seconds until a server must show the status a test waits for
    STATE_TIMEOUT = 60
    #: seconds until a deleted server must be gone from the API
    DELETE_TIMEOUT = 60
    _POLL = 0.5                 # nova's interval between two polls

    def _wait_for_state_change(self, server, expected_status,
                               max_retries=None, wait_for_fault_key=True):
        return self._wait_for_server_parameter(
            server, {'status': expected_status}, max_retries,
            wait_for_fault_key=wait_for_fault_key)

    def _wait_for_server_parameter(self, server, expected_params,
                                   max_retries=None, api=None,
                                   wait_for_fault_key=True):
        if max_retries is None:
            max_retries = int(self.STATE_TIMEOUT / self._POLL)
        return super()._wait_for_server_parameter(
            server, expected_params, max_retries, api=api,
            wait_for_fault_key=wait_for_fault_key)

    def _wait_until_deleted(self, server):
        # (nova's, with a deadline instead of 40 polls)
        initially_in_error = server.get('status') == 'ERROR'
        deadline = time.monotonic() + self.DELETE_TIMEOUT
        while True:
            try:
                server = self.api.get_server(server['id'])
            except api_client.OpenStackApiNotFoundException:
                return
            if not initially_in_error and server['status'] == 'ERROR':
                self.fail('server %s went to ERROR instead of disappearing'
                          % server['id'])
            if time.monotonic() > deadline:
                self.fail('server %s still there %s s after its delete '
                          '(status %s)' % (server['id'], self.DELETE_TIMEOUT,
                                           server['status']))
            time.sleep(self._POLL)


class MigrationPolling:
    """The migration APIs polled, strictly, while a migration test runs.

    For a test case of nova's harness with ``admin_api`` and
    ``computes``.
    """

    def strict_get(self, relative):
        """GET at the latest microversion; the response, whatever it is.

        (Not through the client's ``microversion`` attribute, which the
        test's own thread may be changing meanwhile.)
        """
        api = self.admin_api
        return api.request('%s/%s' % (api.base_url, relative), headers={
            'X-OpenStack-Nova-API-Version': 'latest',
            'OpenStack-API-Version': 'compute latest',
            'X-Auth-User': api.auth_user, 'X-User-Id': api.auth_user,
            'X-Auth-Project-Id': api.project_id,
            'X-Roles': ','.join(api.roles)})

    def poll_migrations(self, server, interval=0.05):
        """Poll the migration APIs while the test runs; fail on a 4xx/5xx.

        ``GET /servers/{id}/migrations`` (the running migration, its
        disk progress) and ``GET /os-migrations``, every ``interval``
        seconds from now to the test's end and once more then. At the
        end, the destination must have no live_migration_at_dest task
        left (nova ends it in post_live_migration_at_destination or in
        rollback_live_migration_at_destination).
        """
        poller = nova_shared.MigrationPoller(self.strict_get, server['id'],
                                             interval)

        def finish():
            self.assertEqual([], poller.stop(30))
            self.assert_no_dest_task()

        self.addCleanup(finish)
        poller.start()
        self.polled_migrations = poller.seen
        return poller.seen

    def pending_dest_tasks(self):
        """Each compute's live_migration_at_dest tasks not ended yet."""
        return {host: dict(compute.manager._pending_dest_live_migrations)
                for host, compute in self.computes.items()
                if compute.manager._pending_dest_live_migrations}

    def assert_no_dest_task(self, timeout=30):
        """No compute keeps a live_migration_at_dest task of a migration.

        Nova ends the destination's task in
        post_live_migration_at_destination or in
        rollback_live_migration_at_destination; one left behind keeps that
        nova-compute from stopping until its graceful shutdown times out.
        """
        deadline = time.monotonic() + timeout
        while self.pending_dest_tasks() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual({}, self.pending_dest_tasks())


class XSMLiveMigrationTestCase(PatientStateWaits, MigrationPolling,
                               integrated_helpers.ProviderUsageBaseTestCase):
    """Two xsm computes, a flavor with a root and an ephemeral disk."""

    compute_driver = 'xsm.XSMDriver'

    #: [xsm] options of the test
    BANDWIDTH_MIB = 0
    COMPLETION_TIMEOUT = 0
    TIMEOUT_ACTION = 'abort'
    #: the flavor's disks, GiB (sparse VHDs: only written blocks take room)
    ROOT_GB, EPHEMERAL_GB = 1, 1
    #: the verifying guest: writes per second per disk, and the fraction
    #: of each disk written before the migration
    GUEST_RATE = 20
    GUEST_FILL = 0.02

    def setUp(self):
        # nova's wheel has api-paste.ini in <prefix>/etc/nova, not in the
        # state_path the test configuration expects (the source tree's top)
        self.flags(api_paste_config=os.path.join(
            sys.prefix, 'etc', 'nova', 'api-paste.ini'), group='wsgi')
        super().setUp()
        # nova's test configuration gives the managers 0 s to shut down:
        # a stopped compute then runs its driver's cleanup_host (which
        # stops the host's agent) in a thread of its own, which may end
        # after the test's fixtures stopped faking the thread pools'
        # shutdown, and shuts them down for every later test of the
        # process ("Cannot create the default thread pool executor").
        # 20 s: all of them for cleanup_host, none for waiting on tasks.
        self.flags(manager_shutdown_timeout=20)
        # short: a QEMU guest's NBD sockets are unix sockets under it
        # (108 bytes at most), nova's fixtures nest TMPDIR deep
        self.root = tempfile.mkdtemp(prefix='xsm-nova-', dir='/tmp')
        self.addCleanup(subprocess.call, ['rm', '-rf', self.root])
        self.flags(group='xsm', **self.xsm_flags())
        self.flags(group='xsm', **self.auth_flags())
        self.xsm = {}
        for host in (SOURCE, DEST):
            self.start_xsm_compute(host)
        flavor_id = self._create_flavor(
            name='xsm.small', memory_mb=256, vcpu=1, disk=self.ROOT_GB,
            ephemeral=self.EPHEMERAL_GB)
        self.flavor = self.admin_api.get_flavor(flavor_id)
        # targeted at cell1, where the instances and migrations are: an
        # untargeted context reads the cell nova's CellDatabases fixture
        # used last, cell0 while another thread (the migration poller's
        # GET /os-migrations, over every cell) targets it: the instance
        # was then not found (InstanceNotFound, seen at load ~18)
        self.ctxt = nova_context.get_admin_context()
        nova_context.set_target_cell(self.ctxt, self.cell_mappings['cell1'])

    def xsm_flags(self):
        """The [xsm] options of the test."""
        return dict(
            transport_url='fake://xsm-%s/' % uuidutils.generate_uuid(),
            bandwidth_limit=self.BANDWIDTH_MIB,
            completion_timeout=self.COMPLETION_TIMEOUT,
            completion_timeout_action=self.TIMEOUT_ACTION,
            progress_interval=0.1, rpc_timeout=30, leaf_headroom_mb=8)

    def auth_flags(self):
        """Keys of the hosts and the operator, trusted by every host.

        Each host's identity key is where its driver looks for it
        (``identity.key`` in its state_path); the operator key signs the
        drivers' calls and the test's.
        """
        hosts = {}
        for host in (SOURCE, DEST):
            key = keys.create_key_file(os.path.join(
                self.root, host, 'state', keys.IDENTITY_FILE))
            hosts[host] = auth.public_text(key)
        operator = os.path.join(self.root, 'operator.key')
        key = keys.create_key_file(operator)
        return dict(trusted_hosts=hosts,
                    trusted_operators={'operator': auth.public_text(key)},
                    operator_key_file=operator, operator_name='operator')

    def missing(self, message):
        """Fail in CI, skip elsewhere: CI must never hide a missing peer."""
        if os.environ.get('CI') == 'true':
            self.fail(message)
        self.skipTest(message)

    def sr_path(self, host):
        return os.path.join(self.root, host, 'sr')

    def start_xsm_compute(self, host, sr_path=None):
        """Start nova-compute ``host``: its driver opens the host's SR."""
        self.flags(sr_repositories=['%s:vhd:%s' % (
                       SR, sr_path or self.sr_path(host))],
                   state_path=os.path.join(self.root, host, 'state'),
                   group='xsm')
        # the driver reads its node uuid once, at init_host (as libvirt's
        # functional tests arrange it)
        with mock.patch('nova.virt.node.get_local_node_uuid',
                        return_value=str(getattr(uuids, 'node_%s' % host))):
            compute = self._start_compute(host)
        # the driver's client: the operator key of [xsm]
        self.xsm[host] = compute.manager.driver._agent_api(host)
        return compute

    # -- helpers -------------------------------------------------------------

    @property
    def usage(self):
        """What one server of the flavor uses in placement."""
        return {'VCPU': 1, 'MEMORY_MB': 256,
                'DISK_GB': self.ROOT_GB + self.EPHEMERAL_GB}

    def assert_usage(self, host, servers=1):
        self.assertRequestMatchesUsage(
            {rc: n * servers for rc, n in self.usage.items()},
            self._get_provider_uuid_by_host(host))

    def boot(self, host=SOURCE):
        """Boot a server on ``host``; check its VM and disks there."""
        request = self._build_server(
            image_uuid='155d900f-4e14-4e4c-a73d-069cbf4541e6',
            flavor_id=self.flavor['id'], networks='none')
        request['availability_zone'] = 'nova:%s' % host
        server = self._wait_for_state_change(
            self.api.post_server({'server': request}), 'ACTIVE')
        self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        self.assert_usage(host)
        vm = self.xsm[host].vm_get(server['id'])
        self.assertEqual('running', vm['power_state'])
        expected = [self.ROOT_GB * GiB] + (
            [self.EPHEMERAL_GB * GiB] if self.EPHEMERAL_GB else [])
        sizes = {v['uuid']: v['size'] for v in self.xsm[host].vdi_list()}
        self.assertEqual(expected, [sizes[d['vdi']] for d in vm['disks']])
        return server

    def start_guest(self, server, host=SOURCE):
        self.xsm[host].guest_start(server['id'], rate=self.GUEST_RATE,
                                   fill=self.GUEST_FILL)

    def live_migrate(self, server, host=DEST):
        self.poll_migrations(server)
        self.api.post_server_action(server['id'], {
            'os-migrateLive': {'host': host, 'block_migration': True}})

    def wait_for(self, what, predicate, timeout=60, interval=0.1):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail('timed out after %s s waiting for %s'
                          % (timeout, what))
            time.sleep(interval)

    def migration_record(self, server, statuses=None):
        for mig in self.admin_api.api_get('/os-migrations').body[
                'migrations']:
            if mig['instance_uuid'] == server['id'] and (
                    statuses is None or mig['status'] in statuses):
                return mig
        return None

    def wait_for_migration(self, server, statuses, timeout=60):
        return self.wait_for(
            'migration of %s in %s' % (server['id'], statuses),
            lambda: self.migration_record(server, statuses), timeout)

    def wait_for_server(self, server, host, status='ACTIVE', timeout=60):
        def check():
            s = self.api.get_server(server['id'])
            if s['OS-EXT-SRV-ATTR:host'] == host and s['status'] == status \
                    and s['OS-EXT-STS:task_state'] is None:
                return s
            return None
        return self.wait_for('server %s %s on %s' % (server['id'], status,
                                                     host), check, timeout)

    def engine_migration(self, host=SOURCE):
        """The engine's status of the one migration ``host`` started."""
        migrations = self.xsm[host].migration_list()
        self.assertLessEqual(len(migrations), 1)
        return migrations[0] if migrations else None

    def destination_check(self, server):
        """The destination's pre-check event of ``server``'s migration.

        Its ``result``, and its ``details`` when it failed.
        """
        actions = self.api.get_instance_actions(server['id'])
        action = [a for a in actions if a['action'] == 'live-migration'][0]
        events = self.api.get_instance_action_details(
            server['id'], action['request_id'])['events']
        return [e for e in events if e['event'] ==
                'compute_check_can_live_migrate_destination'][0]

    def wait_for_copy(self, minimum=1):
        """Wait until the engine copies and has copied ``minimum`` bytes."""
        def copying():
            status = self.engine_migration()
            if status is not None and status['phase'] == 'copy' and \
                    status['progress']['done'] >= minimum:
                return status
            return None
        return self.wait_for('the copy to be under way', copying)

    def db_migration(self, record):
        return objects.Migration.get_by_id(self.ctxt, record['id'])

    def sr_records(self, host):
        """What must be identical before a migration and after an abort."""
        return sorted((v['uuid'], v['parent'], v['hidden'], v['read_only'],
                       v['size']) for v in self.xsm[host].vdi_list())

    def assert_images_valid(self, host):
        path = self.sr_path(host)
        for name in os.listdir(path):
            if name.endswith('.vhd'):
                self.assertEqual([], vhd_check.check(os.path.join(path,
                                                                  name)))

    def spy_live_migration(self, before=None):
        """Record the migrate_data the source's live_migration gets.

        :param before: called with that migrate_data before the driver's
            own live_migration runs.
        :returns: the list the migrate_data objects are appended to.
        """
        drv = self.computes[SOURCE].manager.driver
        real = drv.live_migration
        seen = []

        def live_migration(context, instance, dest, post_method,
                           recover_method, block_migration=False,
                           migrate_data=None):
            seen.append(migrate_data)
            if before is not None:
                before(migrate_data)
            return real(context, instance, dest, post_method,
                        recover_method, block_migration, migrate_data)

        patcher = mock.patch.object(drv, 'live_migration', live_migration)
        patcher.start()
        self.addCleanup(patcher.stop)
        return seen

    def migration_files(self, host):
        """What is left in a host's per-migration state folder."""
        top = os.path.join(self.root, host, 'state', 'migrations')
        return sorted(os.path.relpath(os.path.join(d, n), top)
                      for d, dirs, files in os.walk(top)
                      for n in dirs + files)

    def read_disk(self, host, vdi, length):
        """The first ``length`` bytes of a VDI's virtual disk."""
        dev = backends.VHDDevice(os.path.join(self.sr_path(host),
                                              '%s.vhd' % vdi))
        try:
            return bytes(dev.pread(0, length))
        finally:
            dev.close()

    #: seconds the test's ``guest_verify`` calls wait for the agent's
    #: answer, instead of the drivers' ``[xsm]rpc_timeout`` (30 s): the
    #: agent stops the guest and reads back and checks every block it
    #: wrote; for the model guest every 4 KiB block of both 1 GiB disks
    #: (524,288 blocks, in Python). In the eventlet run with child agents
    #: at load ~25-30 (2 cores) that answer came after more than 30 s
    #: (between 31 and 41 s after the call): the call timed out, the
    #: guest was fine.
    VERIFY_TIMEOUT = 180

    def guest_verify(self, server, host):
        """The agent's ``guest_verify`` of ``server`` on ``host``.

        (:meth:`AgentAPI.guest_verify`'s call, with
        :attr:`VERIFY_TIMEOUT`.)
        """
        return self.xsm[host].call('guest_verify',
                                   timeout=self.VERIFY_TIMEOUT,
                                   vm=server['id'])

    def assert_guest_verified(self, server, host):
        result = self.guest_verify(server, host)
        self.assertTrue(result['verified'], result)
        self.assertEqual((self.ROOT_GB + self.EPHEMERAL_GB) * GiB,
                         result['bytes_verified'])
        return result
