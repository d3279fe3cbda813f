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

"""The source's lease on the destination's receive, between real agents.

Over RabbitMQ, one ``xsm-agent`` process a host with a lease of two
seconds: a source killed for good (``kill -9``, never restarted) leaves
nothing on the destination, and a source frozen past its lease
(``SIGSTOP``, then ``SIGCONT``) comes back to a clear error, its VM
intact. Over oslo.messaging's ``fake://`` transport: the renewal call
against an agent of API 1.1, which has no lease.
"""

import os
import signal
import time
import uuid as uuidlib

from oslo_config import cfg
import oslo_messaging as messaging

from tests import base
from tests.functional.core.migration import fixtures
from tests.functional.core.migration import test_rabbit
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import source as source_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.testing import harness

MiB = test_rabbit.MiB
records = test_rabbit.records
LEASE = 2
#: how late past its lease a lost source's receive may be rolled back
MARGIN = 15


class TestLeaseOverRabbit(test_rabbit.RabbitMigrationTest):

    def agent_options(self, role):
        return {'receive_lease_timeout': LEASE}

    def receive_status(self, mid):
        return self.b.call('receive_status', migration=mid)

    def wait_nothing_received(self, mid, within):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.receive_status(mid)['phase'] == 'aborted' and \
                    not self.b.vdi_list():
                return
            time.sleep(0.1)
        self.fail('host b still receives migration %s %s s after its '
                  'source went silent (lease: %s s): %s%s'
                  % (mid, within, LEASE, self.b.vdi_list(), self.logs()))

    def test_a_source_lost_for_good_leaves_nothing_behind(self):
        vm = self.make_vm()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        # it is receiving, and renewals keep it so past the lease
        time.sleep(LEASE * 1.5)
        self.assertEqual('prepare-receive',
                         self.receive_status(mid)['phase'])
        self.assertEqual(1, self.b.host_info()['active_migrations'])
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        self.agents['a'].kill()           # never restarted
        killed = time.monotonic()
        self.wait_nothing_received(mid, LEASE + MARGIN)
        # (not before the lease ran out since the last renewal, which came
        # up to one renewal interval before the kill)
        self.assertGreaterEqual(time.monotonic() - killed,
                                LEASE - source_mod.renew_interval(LEASE))
        self.assert_nothing_received()
        status = self.receive_status(mid)
        self.assertGreaterEqual(status['expired']['silent'], LEASE)
        self.assertEqual(LEASE, status['expired']['lease'])
        self.assertEqual(0, self.b.host_info()['active_migrations'])
        self.assertIn('no lease renewal from its source host %s'
                      % self.agents['a'].name, self.agents['b'].log())
        # the source, were it to come back, would hear why
        exc = self.assertRaises(errors.LeaseExpired, self.b.call,
                                'receive_renew', version='1.2',
                                migration=mid)
        self.assertIn('rolled back its receive after', str(exc))

    def test_a_source_frozen_past_its_lease_aborts_with_the_reason(self):
        vm = self.make_vm()
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=1 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        source = self.agents['a'].proc
        source.send_signal(signal.SIGSTOP)
        try:
            self.wait_nothing_received(mid, LEASE + MARGIN)
        finally:
            source.send_signal(signal.SIGCONT)
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertIn('migration %s aborted: destination host %s rolled back '
                      'its receive after' % (mid, self.agents['b'].name),
                      status['error'])
        self.assertIn('without a lease renewal from the source',
                      status['error'])
        # the source is as before, its VM running with its data
        self.assertEqual(records(before_a), records(self.a.vdi_list()))
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, (16 + 24) * MiB)
        self.assert_nothing_received()


class OldEndpoint(agent_mod.AgentEndpoint):
    """An agent of API 1.1: no receive_renew."""

    target = messaging.Target(version='1.1')


class TestRenewOverRPC(base.TestCase):
    """Renewals over ``fake://``, where a call raises the server's error."""

    def transport_and_names(self, root):
        conf = cfg.ConfigOpts()
        return (api.get_transport(conf, url='fake://'), 'host-new',
                'host-old')

    def identity(self, name):
        """The agent's identity (none needed on ``fake://``)."""
        return None

    def setUp(self):
        super().setUp()
        root = self.make_tempdir()
        self.transport, self.new, self.old = self.transport_and_names(root)
        self.addCleanup(self.transport.cleanup)
        # the new host: a harness host with its agent
        local = harness.LocalHosts(
            root, {self.new: {'sr': ('vhd', os.path.join(root, 'new',
                                                         'sr'))}},
            self.transport, identity=self.identity)
        self.addCleanup(local.close)
        local.start()
        old_host = host_mod.Host.from_config(
            self.old, ['sr:vhd:%s' % os.path.join(root, 'old', 'sr')],
            os.path.join(root, 'old', 'state'))
        self.addCleanup(old_host.close)
        old_identity = self.identity(self.old)
        server = messaging.get_rpc_server(
            self.transport, messaging.Target(
                topic=api.transport_topic(self.transport), server=self.old),
            [OldEndpoint(manager_mod.Manager(old_host),
                         old_identity and old_identity.guard())],
            executor='threading')
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)

    def peer(self, name):
        return api.RemotePeer(api.AgentAPI(self.transport, name, timeout=10))

    def test_an_old_destination_holds_no_lease(self):
        self.assertIsNone(self.peer(self.old).renew(
            '00000000-0000-4000-8000-000000000000', timeout=5))

    def test_a_new_destination_answers_for_its_receives(self):
        exc = self.assertRaises(errors.MigrationNotFound,
                                self.peer(self.new).renew,
                                '00000000-0000-4000-8000-000000000000',
                                timeout=5)
        self.assertIn('not found on host %s' % self.new, str(exc))


class TestRenewOverRabbit(TestRenewOverRPC):
    """The same over RabbitMQ, where the error crosses as RemoteError."""

    def transport_and_names(self, root):
        problem = fixtures.broker_problem()
        if problem:
            self.missing(problem)
        token = uuidlib.uuid4().hex[:10]
        self.exchange = exchange = 'xsm-test-%s' % token
        new, old = 'host-new-' + token, 'host-old-' + token
        keyring = fixtures.keyring(exchange)
        keyring.add_host(new)
        keyring.add_host(old)
        conf = fixtures.client_conf(root, exchange)
        self.addCleanup(fixtures._delete_from_broker,
                        fixtures.queue_names(exchange, new, old), exchange)
        return (api.get_transport(conf, url=fixtures.RABBIT_URL), new, old)

    def identity(self, name):
        return fixtures.keyring(self.exchange).identity(name)
