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

"""Nova as an operator runs it, with two xsm computes, driven by ``openstack``.

One deployment (:mod:`tests.nova_deployment.deployment`: separate
placement-api, nova-api, nova-conductor, nova-scheduler and two
nova-compute processes, MariaDB, RabbitMQ) serves every test of the
class; each test boots its own server with python-openstackclient and
checks what happened on the hosts through their xsm agents. While a
migration runs, ``GET /servers/{id}/migrations`` and ``GET
/os-migrations`` are polled at the newest microversion; nova-api runs
with ``[api]response_validation = error``, so a migration record field
nova's schema refuses fails the test (a 400/500 answer).

The computes' ``[xsm]bandwidth_limit`` slows the copy so that a test
catches a migration running (abort, force-complete).

The servers of the first tests are the agents' model guests; the last
test starts both computes again with QEMU guests
(:meth:`~tests.nova_deployment.deployment.Deployment.switch_hypervisor`:
cheaper than a second deployment, whose start and stop took ~4 minutes
at load 15-50).
"""

import os
import signal
import unittest

import requests
import testtools
from testtools import content

from tests.nova_deployment import deployment as dep_mod
from tests import nova_shared
from xsm_driver.hypervisor import qemu as qemu_mod
from xsm_driver.hypervisor import verifier

ALPHA, BETA = dep_mod.HOSTS
MiB = 1 << 20
GiB = 1 << 30
#: nova's power_state.RUNNING, as "openstack server show -f json" gives it
RUNNING = 1

#: [xsm]bandwidth_limit of the computes, MiB/s
BANDWIDTH_MIB = 8
#: guest writes per second per disk
GUEST_RATE = 20
#: the fraction of the 1 GiB root disk the guest writes before a
#: migration: small for the round trip, big enough for abort and
#: force-complete to catch the copy running: ~96 s at the limit. (With
#: 0.25, 32 s, the abort came 9 s after the copy had ended at load 40-50:
#: 41 s from the migration's start to the DELETE, for two polls of the
#: agent, one GET and an ``openstack`` process, which took 8-9 s only to
#: start then. 96 s is more than twice that.)
SMALL_FILL, BIG_FILL = 0.01, 0.75
#: the log lines kept with a failure, per log
LOG_TAIL = 150
#: seconds the services' slowest steps may take on a busy 2-core machine
TIMEOUT = 240


def _in_ci():
    return os.environ.get('CI') == 'true'


class NovaDeploymentTest(testtools.TestCase):
    """The operator's scenarios on one deployment.

    With model guests: boot, live block migration there and back, abort,
    force-complete; then both computes stop (no task left), and start
    again with QEMU guests (TCG, the guest kit's verifier): a server's
    QEMU outlives restarts of nova-compute and of the xsm-agent.
    """

    dep = None
    failures = 0

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        missing = dep_mod.problems('qemu')
        if missing:
            message = 'no deployment possible here: %s' % '; '.join(missing)
            if _in_ci():            # CI never hides a missing peer
                raise AssertionError(message)
            raise unittest.SkipTest(message)
        cls.dep = dep_mod.Deployment(bandwidth_limit=BANDWIDTH_MIB,
                                     log=lambda line: None)
        try:
            cls.dep.start()
        except BaseException:
            cls.dep.stop(remove=False)
            raise

    @classmethod
    def tearDownClass(cls):
        dep, cls.dep = cls.dep, None
        if dep is not None:
            problems = dep.stop(remove=cls.failures == 0)
            if problems:
                raise AssertionError('the deployment did not end cleanly '
                                     '(%s kept): %s' % (dep.root,
                                                        '; '.join(problems)))
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.addOnException(self._attach_logs)

    def _attach_logs(self, exc_info):
        type(self).failures += 1
        dep = self.dep
        paths = [os.path.join(dep.logs, '%s.log' % n) for n in (
            ALPHA, BETA, 'nova-conductor', 'nova-api', 'nova-scheduler')]
        paths += [os.path.join(dep.xsm_state(h), 'xsm-agent.log')
                  for h in dep_mod.HOSTS]
        for path in paths:
            try:
                with open(path, errors='replace') as f:
                    lines = f.readlines()[-LOG_TAIL:]
            except OSError:
                continue
            lines = [ln for ln in lines if ' DEBUG ' not in ln] or lines
            self.addDetail(os.path.relpath(path, dep.root),
                           content.text_content(''.join(lines)))

    # -- helpers -----------------------------------------------------------

    def openstack(self, *args, **kwargs):
        return self.dep.openstack(*args, **kwargs)

    def wait_for(self, what, predicate, timeout=TIMEOUT, interval=1.0):
        return self.dep.wait_for(what, predicate, timeout, interval)

    def show(self, server_id):
        return self.openstack('server', 'show', server_id)

    def boot(self, host=ALPHA, image=dep_mod.ZERO_IMAGE_NAME,
             flavor=dep_mod.FLAVOR):
        name = 'vm-%s' % self.id().rsplit('.', 1)[-1]
        server = self.openstack(
            'server', 'create', '--flavor', flavor, '--image',
            image, '--nic', 'none', '--availability-zone',
            'nova:%s' % host, '--wait', name, timeout=TIMEOUT)
        self.addCleanup(self.delete, server['id'])
        server = self.show(server['id'])
        self.assertEqual('ACTIVE', server['status'], server)
        self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual(RUNNING, server['OS-EXT-STS:power_state'])
        vm = self.dep.agent_api(host).vm_get(server['id'])
        self.assertEqual('running', vm['power_state'])
        return server

    def delete(self, server_id):
        self.openstack('server', 'delete', '--wait', server_id, parse=False,
                       timeout=TIMEOUT)
        for host in dep_mod.HOSTS:
            api = self.dep.agent_api(host)
            self.assertNotIn(server_id, [v['name'] for v in api.vm_list()])
            self.assertEqual([], api.vdi_list())
        # a QEMU guest's process went with it
        self.assertEqual([], qemu_mod.processes_naming(self.dep.root))

    def root_disk(self, host, vm):
        """The first bytes of ``vm``'s root disk, read from the SR."""
        from xsm_driver.core.block import backends
        vdi = vm['disks'][0]['vdi']
        dev = backends.VHDDevice(os.path.join(self.dep.sr_path(host),
                                              '%s.vhd' % vdi))
        try:
            return bytes(dev.pread(0, len(dep_mod.IMAGE_DATA)))
        finally:
            dev.close()

    def guest(self, server, host, fill=SMALL_FILL):
        return self.dep.agent_api(host).guest_start(
            server['id'], rate=GUEST_RATE, fill=fill)

    def assert_guest_verified(self, server, host):
        result = self.dep.agent_api(host, timeout=TIMEOUT).guest_verify(
            server['id'])
        self.assertTrue(result['verified'], result)
        self.assertEqual(GiB, result['bytes_verified'])
        self.assertGreater(result['writes'], 0)
        return result

    def strict_get(self, path):
        """GET on nova-api at the newest microversion (no client)."""
        return requests.get(self.dep.url('nova-api') + path, headers={
            'OpenStack-API-Version': 'compute latest',
            'X-OpenStack-Nova-API-Version': 'latest'}, timeout=60)

    def poll_migrations(self, server, interval=0.2):
        """Poll the migration APIs until the test ends; fail on 4xx/5xx.

        :returns: the list the records of ``GET /servers/{id}/
            migrations`` are added to.
        """
        poller = nova_shared.MigrationPoller(self.strict_get, server['id'],
                                             interval, prefix='/')
        self.addCleanup(lambda: self.assertEqual([], poller.stop(60)))
        poller.start()
        return poller.seen

    def live_migrate(self, server, host=None, wait=True):
        args = ['server', 'migrate', '--live-migration', '--block-migration']
        if host:
            args += ['--host', host]
        if wait:
            args.append('--wait')
        self.openstack(*(['--os-compute-api-version', '2.30'] + args +
                         [server['id']]), parse=False, timeout=TIMEOUT)

    def migration(self, server, statuses=None):
        """The newest live migration record of ``server`` (os-migrations)."""
        resp = self.strict_get('/os-migrations?instance_uuid=%s'
                               '&migration_type=live-migration'
                               % server['id'])
        self.assertEqual(200, resp.status_code, resp.text)
        records = sorted(resp.json()['migrations'], key=lambda m: m['id'])
        if not records:
            return None
        if statuses is not None and records[-1]['status'] not in statuses:
            return None
        return records[-1]

    def wait_for_server(self, server, host, status='ACTIVE'):
        def check():
            s = self.show(server['id'])
            if s['OS-EXT-SRV-ATTR:host'] == host and \
                    s['status'] == status and \
                    s['OS-EXT-STS:task_state'] is None:
                return s
            return None
        return self.wait_for('server %s %s on %s' % (server['id'], status,
                                                     host), check)

    def wait_for_copy(self, host=ALPHA, minimum=MiB):
        """The engine's migration on ``host``, once it copies data."""
        def copying():
            for m in self.dep.agent_api(host).migration_list():
                if m['phase'] == 'copy' and \
                        m['progress']['done'] >= minimum:
                    return m
            return None
        return self.wait_for('the copy to be under way on %s' % host,
                             copying, interval=0.2)

    def running_migration(self, server):
        """The in-progress migration of GET /servers/{id}/migrations."""
        def running():
            resp = self.strict_get('/servers/%s/migrations' % server['id'])
            self.assertEqual(200, resp.status_code, resp.text)
            return (resp.json()['migrations'] or [None])[0]
        return self.wait_for('a running migration of %s' % server['id'],
                             running, interval=0.2)

    def ensure_compute(self, host):
        """Start nova-compute ``host`` unless it runs; wait until up."""
        if host not in self.dep.procs:
            self.dep.start_compute(host)

        def compute_up():
            services = self.openstack('compute', 'service', 'list',
                                      '--service', 'nova-compute',
                                      '--host', host)
            return services and services[0]['State'] == 'up'
        self.wait_for('nova-compute %s up' % host, compute_up)

    def compute_log(self, host, offset=0):
        """nova-compute ``host``'s log from byte ``offset`` on."""
        with open(os.path.join(self.dep.logs, '%s.log' % host), 'rb') as f:
            f.seek(offset)
            return f.read().decode('utf-8', 'replace')

    def console(self, server):
        """The console through nova's API (``openstack console log``)."""
        return self.openstack('console', 'log', 'show', server['id'],
                              parse=False)

    def console_file(self, host, vm):
        """The console, read from the guest's folder (no nova needed)."""
        path = os.path.join(self.dep.guest_folder(host, vm['uuid']),
                            qemu_mod.CONSOLE_LOG)
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')

    def wait_progress(self, what, read, after):
        """The last ``progress`` line once it counts more than ``after``.

        :param read: returns the console's text.
        """
        seen = ['']

        def check():
            seen[0] = read()
            rep = verifier.last(seen[0], 'progress')
            return rep if rep is not None and rep['writes'] > after \
                else None
        try:
            rep = self.wait_for(what, check, interval=0.5)
        except dep_mod.DeploymentError:
            self.addDetail('console', content.text_content(seen[0][-4000:]))
            raise
        self.assertEqual(0, rep['io_errors'], rep.line)
        self.assertEqual(0, rep['mismatches'], rep.line)
        return rep

    def qemu_of(self, host, vm):
        """(pid, start time, pid file's mtime) of the VM's QEMU on host."""
        found = self.dep.qemu_process(host, vm['uuid'])
        self.assertIsNotNone(found, 'no QEMU of VM %s runs on %s' % (
            vm['uuid'], host))
        mtime = os.stat(os.path.join(self.dep.guest_folder(
            host, vm['uuid']), qemu_mod.PID_FILE)).st_mtime_ns
        return found + (mtime,)

    def assert_qemu_verified(self, server, host):
        return nova_shared.assert_verified(self, self.dep.agent_api(
            host, timeout=TIMEOUT).guest_verify(server['id']))

    def assert_active(self, server, host):
        server = self.show(server['id'])
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual(RUNNING, server['OS-EXT-STS:power_state'])
        self.assertEqual('running', self.dep.agent_api(host).vm_get(
            server['id'])['power_state'])
        return server

    # -- the scenarios (run in this order, on one deployment) ---------------

    def test_0_boot_from_an_image(self):
        server = self.boot(BETA, image=dep_mod.IMAGE_NAME)
        vm = self.dep.agent_api(BETA).vm_get(server['id'])
        # nova-compute fetched the image from the image service with
        # nova's Glance client, and the agent wrote it into the root disk
        self.assertEqual(dep_mod.IMAGE_DATA, self.root_disk(BETA, vm))

    def test_1_boot_and_live_block_migration_there_and_back(self):
        server = self.boot(ALPHA)
        self.guest(server, ALPHA)
        seen = self.poll_migrations(server)

        self.live_migrate(server, BETA)
        self.wait_for_server(server, BETA)
        self.assertEqual('completed', self.migration(server)['status'])
        vm = self.dep.agent_api(BETA).vm_get(server['id'])
        self.assertEqual('running', vm['power_state'])
        self.assertNotIn(server['id'], [
            v['name'] for v in self.dep.agent_api(ALPHA).vm_list()])
        # the running migration, as GET /servers/{id}/migrations showed
        # it while it ran, with the disk progress the driver saved
        self.assertNotEqual([], seen)
        self.assertEqual(BETA, seen[-1]['dest_compute'])
        self.assertGreater(seen[-1]['disk_total_bytes'] or 0, 0)

        # back, the scheduler choosing the host (the only other one)
        self.live_migrate(server)
        self.wait_for_server(server, ALPHA)
        self.assertEqual('completed', self.migration(server)['status'])
        self.assertEqual(RUNNING, self.show(server['id'])[
            'OS-EXT-STS:power_state'])
        self.assert_guest_verified(server, ALPHA)

    def test_2_abort(self):
        server = self.boot(ALPHA)
        self.guest(server, ALPHA, fill=BIG_FILL)
        before = sorted(v['uuid'] for v in
                        self.dep.agent_api(BETA).vdi_list())
        self.poll_migrations(server)
        self.live_migrate(server, BETA, wait=False)
        self.wait_for_copy()
        record = self.running_migration(server)
        self.openstack('--os-compute-api-version', '2.24', 'server',
                       'migration', 'abort', server['id'],
                       str(record['id']), parse=False)
        self.wait_for('the migration cancelled',
                      lambda: self.migration(server, ('cancelled',)))
        server = self.wait_for_server(server, ALPHA)
        self.assertEqual(RUNNING, server['OS-EXT-STS:power_state'])
        # the destination is left as it was
        self.wait_for('the destination SR as before the migration',
                      lambda: sorted(v['uuid'] for v in self.dep.agent_api(
                          BETA).vdi_list()) == before)
        self.assertNotIn(server['id'], [
            v['name'] for v in self.dep.agent_api(BETA).vm_list()])
        self.assert_guest_verified(server, ALPHA)

    def test_3_force_complete(self):
        server = self.boot(ALPHA)
        self.guest(server, ALPHA, fill=BIG_FILL)
        self.poll_migrations(server)
        self.live_migrate(server, BETA, wait=False)
        copying = self.wait_for_copy()
        record = self.running_migration(server)
        total = copying['progress']['total']
        self.openstack('--os-compute-api-version', '2.22', 'server',
                       'migration', 'force', 'complete', server['id'],
                       str(record['id']), parse=False)
        self.wait_for_server(server, BETA)
        self.assertEqual('completed', self.migration(server)['status'])
        self.assertGreater(total, 100 * MiB)
        self.assert_guest_verified(server, BETA)

    def test_4_computes_stop_without_a_leaked_task(self):
        """Every migration so far ended its destination task."""
        for host in dep_mod.HOSTS:
            took = self.dep.stop_compute(host, signal.SIGTERM)
            self.assertLess(took, 30, host)
            with open(os.path.join(self.dep.logs, '%s.log' % host)) as f:
                text = f.read()
            self.assertNotIn('Graceful shutdown timed out', text)

    def test_5_a_qemu_guest_outlives_restarts_of_nova_compute_and_agent(self):
        """A server's QEMU runs on through restarts of its host's services.

        Its QEMU runs under the host's xsm-agent, a process of its own
        that nova-compute starts (``[xsm]agent = auto``) and leaves
        running: stopping and starting nova-compute, and restarting the
        agent, leave the guest running in the same QEMU process, which
        the guest proves by writing on (its verifier's ``progress`` lines
        on the serial console, read through ``openstack console log
        show``); a live migration afterwards moves it with every write
        kept.
        """
        # both computes again, now with QEMU guests (new agents)
        self.dep.switch_hypervisor('qemu', timeout=TIMEOUT)
        server = self.boot(ALPHA, image=dep_mod.QEMU_IMAGE_NAME,
                           flavor=dep_mod.QEMU_FLAVOR)
        vm = self.dep.agent_api(ALPHA).vm_get(server['id'])
        self.assertEqual({'memory_mib': dep_mod.QEMU_MEMORY_MB, 'vcpus': 1,
                          'firmware': 'qboot'}, vm['qemu'])
        qemu = self.qemu_of(ALPHA, vm)
        agent_pid = self.dep.agent_pid(ALPHA)
        self.assertIsNotNone(agent_pid)
        # the guest's verifier writes (its console, through nova's API)
        rep = self.wait_progress('the guest to write (nova\'s console)',
                                 lambda: self.console(server), 0)

        # nova-compute stops: the guest writes on in the same QEMU
        since = os.path.getsize(os.path.join(self.dep.logs,
                                             '%s.log' % ALPHA))
        took = self.dep.stop_compute(ALPHA, signal.SIGTERM)
        self.addCleanup(self.ensure_compute, ALPHA)
        self.assertLess(took, 30)
        self.assertNotIn('Graceful shutdown timed out',
                         self.compute_log(ALPHA, since))
        at_stop = verifier.last(self.console_file(ALPHA, vm), 'progress')
        rep = self.wait_progress(
            'the guest to write on without nova-compute',
            lambda: self.console_file(ALPHA, vm), at_stop['writes'] + 20)
        self.assertEqual(qemu, self.qemu_of(ALPHA, vm))

        # nova-compute starts again, adopts the agent it left and finds
        # the guest running; the guest writes on after the restart
        self.ensure_compute(ALPHA)
        self.wait_for('the restarted nova-compute to adopt the agent',
                      lambda: 'adopted' in self.compute_log(ALPHA, since))
        self.assertEqual(agent_pid, self.dep.agent_pid(ALPHA))
        at_restart = verifier.last(self.console_file(ALPHA, vm), 'progress')
        self.assert_active(server, ALPHA)
        rep = self.wait_progress(
            'the guest to write after nova-compute\'s restart',
            lambda: self.console(server), at_restart['writes'] + 20)
        self.assertGreater(rep['t_ms'], at_restart['t_ms'])
        self.assertEqual(qemu, self.qemu_of(ALPHA, vm))

        # the agent restarts (an upgrade): the new one adopts the QEMU,
        # serves its disks again, and the guest writes on, no I/O failed
        stopped, answered = self.dep.restart_agent(ALPHA)
        self.addDetail('agent restart', content.text_content(
            'old agent stopped in %.1f s, new one answered %.1f s later'
            % (stopped, answered)))
        new_agent = self.dep.agent_pid(ALPHA)
        self.assertNotEqual(agent_pid, new_agent)
        self.assertEqual(qemu, self.qemu_of(ALPHA, vm))
        with open(os.path.join(self.dep.xsm_state(ALPHA),
                               'xsm-agent.log')) as f:
            self.assertIn('VM %s (%s) runs on in its QEMU (running)'
                          % (vm['uuid'], vm['name']), f.read())
        at_restart = verifier.last(self.console_file(ALPHA, vm), 'progress')
        self.assert_active(server, ALPHA)
        rep = self.wait_progress(
            'the guest to write after the agent\'s restart',
            lambda: self.console(server), at_restart['writes'] + 20)
        self.assertEqual(qemu, self.qemu_of(ALPHA, vm))

        # and it live-migrates as before, every write kept (the way back
        # is left out: ~50-80 s more; the model guests' test_1 and the
        # Nova suite's TestQemuLiveMigration go there and back)
        self.poll_migrations(server)
        self.live_migrate(server, BETA)
        self.wait_for_server(server, BETA)
        self.assertEqual('completed', self.migration(server)['status'])
        self.assertIsNone(qemu_mod.process_argv(qemu[0]))
        self.assertIsNone(self.dep.qemu_process(ALPHA, vm['uuid']))
        self.qemu_of(BETA, self.dep.agent_api(BETA).vm_get(server['id']))
        self.assert_active(server, BETA)
        self.assert_qemu_verified(server, BETA)
