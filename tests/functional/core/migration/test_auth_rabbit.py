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

"""An attacker with the broker's credentials only, on the real RabbitMQ.

Two ``xsm-agent`` processes that trust each other and the test's operator
key (:mod:`fixtures`); the attacker connects with the same broker account
to the same exchange, reads every message (a queue of its own bound to an
agent's routing key), and calls the agents unsigned, with keys of its own,
with genuine calls it saw (replayed, late, or sent to another host), and
answers in an agent's place. Each refused call must leave both hosts as
they were, be logged by the agent, and reach the attacker as a clear
error; genuine agents and the operator still migrate.
"""

import json
import os
import threading
import time
import uuid as uuidlib

from oslo_config import cfg
import oslo_messaging as messaging

from tests import base
from tests.functional.core.migration import fixtures
from tests.functional.core.migration import test_rabbit
from xsm_driver.core import exception
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import auth
from xsm_driver.testing import harness

MiB = fixtures.MiB
MID = '00000000-0000-4000-8000-000000000000'


class Spy:
    """A queue of the attacker's that gets a copy of every call to hosts.

    (The broker account may bind queues to the deployment's exchange: it
    sees every call, as a broker or an eavesdropper on it would.)
    """

    def __init__(self, exchange, hosts):
        import amqp
        self.conn = amqp.Connection(host='%s:%d' % fixtures.BROKER,
                                    userid='guest', password='guest',
                                    connect_timeout=5)
        self.conn.connect()
        self.channel = self.conn.channel()
        self.queue = 'xsm-spy-%s' % uuidlib.uuid4().hex
        self.channel.queue_declare(self.queue, exclusive=True,
                                   auto_delete=True)
        for host in hosts:
            self.channel.queue_bind(self.queue, exchange,
                                    api.queue_name(exchange, host))

    def calls(self, method, wait=5):
        """The calls of ``method`` seen so far (oslo.messaging's dicts)."""
        found = []
        deadline = time.monotonic() + wait
        while not found and time.monotonic() < deadline:
            while True:
                message = self.channel.basic_get(self.queue, no_ack=True)
                if message is None:
                    break
                body = json.loads(message.body)
                call = json.loads(body['oslo.message'])
                if call.get('method') == method:
                    found.append(call)
            if not found:
                time.sleep(0.05)
        return found

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


class ForgingEndpoint:
    """The attacker, answering in an agent's place."""

    target = messaging.Target(version='1.2')

    def __init__(self):
        self.calls = []

    def host_info(self, context):
        self.calls.append(('host_info', context))
        return {'name': 'forged', 'srs': [{'name': 'sr-a', 'path': '/evil',
                                           'type': 'vhd'}],
                'vms': 0, 'active_migrations': 0}

    def receive_prepare(self, context, spec):
        self.calls.append(('receive_prepare', context))
        return {'address': '127.0.0.1', 'port': 1}


class AttackerTest(test_rabbit.RabbitMigrationTest):
    """The attacker's clients: the broker account, and nothing else."""

    def setUp(self):
        super().setUp()
        self.name_a = self.agents['a'].name
        self.name_b = self.agents['b'].name
        path = os.path.join(self.root, 'attacker.conf')
        with open(path, 'w') as f:
            f.write('[DEFAULT]\ncontrol_exchange = %s\n' % self.exchange)
        conf = cfg.ConfigOpts()
        conf(['--config-file', path], project='xsm-attacker',
             default_config_files=[], default_config_dirs=[])
        self.evil = api.get_transport(conf, url=fixtures.RABBIT_URL)
        self.addCleanup(self.evil.cleanup)
        self.attacker_key = auth.generate_key()
        self.keyring = fixtures.keyring(self.exchange)

    def attacker(self, host, credential=None):
        return api.AgentAPI(self.evil, host, timeout=15,
                            credential=credential, trust=None)

    def raw_call(self, host, context, method, args):
        """A call with any context, as a captured one is sent again."""
        client = messaging.get_rpc_client(
            self.evil, messaging.Target(topic=api.transport_topic(self.evil),
                                        server=host), timeout=15)
        return client.call(context, method, **args)

    def state(self):
        """What a refused call must not change, seen by the operator."""
        def vms(client):
            return sorted((v['uuid'], v['power_state'])
                          for v in client.vm_list())

        def migrations(client):
            return sorted((m['id'], m['phase'], m['error'], m['finished'])
                          for m in client.migration_list())
        return {'vms_a': vms(self.a), 'vms_b': vms(self.b),
                'vdis_a': fixtures.records(self.a.vdi_list()),
                'vdis_b': fixtures.records(self.b.vdi_list()),
                'files_a': self.image_files('a', 'sr-a'),
                'files_b': self.image_files('b', 'sr-b'),
                'migrations_a': migrations(self.a),
                'migrations_b': migrations(self.b)}

    def assert_refused(self, call, why, *args, **kwargs):
        exc = self.assertRaises(auth.NotAuthorized, call, *args, **kwargs)
        self.assertIn(why, str(exc))
        return exc

    def receive_spec(self, vm, source_host):
        """A receive request naming the attacker's own client CA."""
        return {'id': str(uuidlib.uuid4()), 'source_host': source_host,
                'vm': vm['uuid'], 'vm_record': vm,
                'disks': [{'vdi': d['vdi'], 'sr': 'sr-b', 'size': 16 * MiB,
                           'allocated': 0} for d in vm['disks']],
                'client_ca': '-----BEGIN CERTIFICATE-----\nevil\n'}

    def migrate_and_verify(self, vm):
        mid = self.migrate(vm)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.b, vm)


class TestStrangers(AttackerTest):

    def test_unsigned_calls_change_nothing(self):
        vm = self.make_vm(snapshots=0)
        before = self.state()
        a, b = self.attacker(self.name_a), self.attacker(self.name_b)
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        for call, args in (
                (a.host_info, ()), (a.vdi_list, ()), (a.vm_list, ()),
                (a.vm_get, (vm['uuid'],)), (a.vm_stop, (vm['uuid'],)),
                (a.vm_destroy, (vm['uuid'],)),
                (a.migrate_vm, (vm['uuid'], self.name_b, vdi_map)),
                (a.migration_abort, (MID,)),
                (b.vm_start, (vm['uuid'],)),
                (b.vdi_import, (vm['disks'][0]['vdi'], '/etc/passwd',
                                'raw'))):
            self.assert_refused(call, 'the call is not signed', *args)
        peer = api.RemotePeer(b)
        spec = self.receive_spec(vm, self.name_a)
        for call, args in ((peer.preflight, (spec,)),
                           (peer.prepare, (spec,)),
                           (peer.complete, (spec['id'], 'running')),
                           (peer.abort, (spec['id'],)),
                           (peer.status, (spec['id'],))):
            self.assert_refused(call, 'the call is not signed', *args)
        self.assertEqual(before, self.state())
        self.assertIn('refused call vm_destroy from an unsigned caller: the '
                      'call is not signed', self.agents['a'].log())
        self.assertIn('refused call receive_prepare from an unsigned '
                      'caller', self.agents['b'].log())
        self.assertNotIn('Traceback', self.agents['a'].log())
        # genuine agents and the operator still migrate
        self.migrate_and_verify(vm)

    def test_keys_of_the_attacker_are_not_trusted(self):
        vm = self.make_vm(snapshots=0)
        before = self.state()
        key = self.attacker_key
        as_operator = auth.Credential(auth.OPERATOR, 'operator', key)
        as_stranger = auth.Credential(auth.OPERATOR, 'mallory', key)
        as_host_b = auth.Credential(auth.AGENT, self.name_b, key)
        self.assert_refused(self.attacker(self.name_a, as_operator).vm_destroy,
                            'signature is not valid', vm['uuid'])
        self.assert_refused(self.attacker(self.name_a, as_stranger).host_info,
                            'no trusted key for operator mallory')
        peer = api.RemotePeer(self.attacker(self.name_b, as_host_b))
        spec = self.receive_spec(vm, self.name_b)
        self.assert_refused(peer.prepare, 'signature is not valid', spec)
        as_evil_host = auth.Credential(auth.AGENT, 'evil-host', key)
        peer = api.RemotePeer(self.attacker(self.name_b, as_evil_host))
        self.assert_refused(peer.prepare, 'no trusted key for agent '
                            'evil-host', self.receive_spec(vm, 'evil-host'))
        self.assertEqual(before, self.state())
        self.assertIn('refused call vm_destroy from operator operator: the '
                      'signature is not valid', self.agents['a'].log())

    def test_a_trusted_agent_may_not_act_as_the_operator(self):
        # host b's own key (a host taken over, or a confused agent): it may
        # receive migrations, not order host a about
        vm = self.make_vm(snapshots=0)
        before = self.state()
        _, key_b = self.keyring.hosts[self.name_b]
        as_b = self.attacker(self.name_a,
                             auth.Credential(auth.AGENT, self.name_b, key_b))
        for call, args in ((as_b.vm_destroy, (vm['uuid'],)),
                           (as_b.host_info, ()),
                           (as_b.migrate_vm, (vm['uuid'], self.name_b,
                                              {}))):
            self.assert_refused(call, 'only operators may', *args)
        # nor receive a migration on behalf of host a
        peer = api.RemotePeer(self.attacker(
            self.name_b, auth.Credential(auth.AGENT, self.name_b, key_b)))
        self.assert_refused(peer.prepare, 'may not act for source host',
                            self.receive_spec(vm, self.name_a))
        self.assertEqual(before, self.state())

    def test_a_trusted_agent_acts_only_on_its_own_receives(self):
        # host b's key on host b itself: a receive from host a is not its
        vm = self.make_vm(snapshots=0)
        mid = self.migrate(vm, bandwidth=4 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        _, key_b = self.keyring.hosts[self.name_b]
        peer = api.RemotePeer(self.attacker(
            self.name_b, auth.Credential(auth.AGENT, self.name_b, key_b)))
        for call, args in ((peer.complete, (mid, 'running')),
                           (peer.abort, (mid,)), (peer.compose, (mid,)),
                           (peer.status, (mid,)), (peer.renew, (mid,))):
            self.assert_refused(call, 'agent %s may not act on a receive '
                                'from host %r' % (self.name_b, self.name_a),
                                *args)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assert_guest_verifies(self.b, vm)


class TestCapturedCalls(AttackerTest):

    def setUp(self):
        super().setUp()
        self.spy = Spy(self.exchange, [self.name_a, self.name_b])
        self.addCleanup(self.spy.close)

    def test_a_replayed_call_is_refused(self):
        vm = self.make_vm(snapshots=0)
        self.a.vm_stop(vm['uuid'])                      # genuine
        [captured] = self.spy.calls('vm_stop')
        self.assertIn('_context_xsm_auth', captured)    # the broker saw it
        self.a.vm_start(vm['uuid'])
        before = self.state()
        exc = self.assertRaises(
            auth.NotAuthorized, self.raw_call, self.name_a,
            {auth.CONTEXT_KEY: captured['_context_xsm_auth']}, 'vm_stop',
            captured['args'])
        self.assertIn('already made (a replay)', str(exc))
        self.assertEqual(before, self.state())
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assertIn('refused call vm_stop from operator operator: the '
                      'call was already made (a replay)',
                      self.agents['a'].log())

    def test_a_call_signed_for_another_host_is_refused(self):
        vm = self.make_vm(snapshots=0)
        self.b.vm_list()                                # genuine, to b
        [captured] = self.spy.calls('vm_list')
        before = self.state()
        exc = self.assertRaises(
            auth.NotAuthorized, self.raw_call, self.name_a,
            {auth.CONTEXT_KEY: captured['_context_xsm_auth']}, 'vm_list',
            captured['args'])
        self.assertIn('signed for host %r' % self.name_b, str(exc))
        # nor does a signature carry over to another method or arguments
        self.a.vm_get(vm['uuid'])
        captured = self.spy.calls('vm_get')[-1]
        ctx = {auth.CONTEXT_KEY: captured['_context_xsm_auth']}
        self.assert_refused(self.raw_call, 'signed for method',
                            self.name_a, ctx, 'vm_destroy', captured['args'])
        self.assertEqual(before, self.state())

    def test_a_stale_call_is_refused(self):
        vm = self.make_vm(snapshots=0)
        before = self.state()
        # a genuine call made (or captured) ten minutes ago
        envelope = self.keyring.credential().sign(
            self.name_a, 'vm_destroy', {'vm': vm['uuid']},
            now=time.time() - 600)
        self.assert_refused(self.raw_call, 's old (more than the 60 s',
                            self.name_a, {auth.CONTEXT_KEY: envelope},
                            'vm_destroy', {'vm': vm['uuid']})
        envelope = self.keyring.credential().sign(
            self.name_a, 'vm_destroy', {'vm': vm['uuid']},
            now=time.time() + 600)
        self.assert_refused(self.raw_call, 'in the future', self.name_a,
                            {auth.CONTEXT_KEY: envelope}, 'vm_destroy',
                            {'vm': vm['uuid']})
        self.assertEqual(before, self.state())

    def test_the_broker_sees_calls_but_migrations_still_work(self):
        vm = self.make_vm(snapshots=0)
        self.migrate_and_verify(vm)
        # the destination's calls were signed by host a, its answers by b
        [prepare] = self.spy.calls('receive_prepare')
        envelope = prepare['_context_xsm_auth']
        self.assertEqual((auth.AGENT, self.name_a, self.name_b),
                         (envelope['role'], envelope['sender'],
                          envelope['target']))
        # played again, it is refused and receives nothing more
        before = self.state()
        self.assert_refused(self.raw_call, 'replay', self.name_b,
                            {auth.CONTEXT_KEY: envelope}, 'receive_prepare',
                            prepare['args'])
        self.assertEqual(before, self.state())


class TestImpostors(AttackerTest):

    def serve_as(self, host, endpoint):
        server = messaging.get_rpc_server(
            self.evil, messaging.Target(topic=api.transport_topic(self.evil),
                                        server=host),
            [endpoint], executor='threading')
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        return server

    def test_migrations_go_to_trusted_hosts_only(self):
        vm = self.make_vm(snapshots=0)
        evil = 'host-evil-%s' % self.token
        endpoint = ForgingEndpoint()
        self.serve_as(evil, endpoint)
        self.addCleanup(fixtures._delete_from_broker,
                        fixtures.queue_names(self.exchange, evil),
                        self.exchange)
        before = self.state()
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        # the agent refuses even the operator's order to migrate to it
        for call in (self.a.migrate_vm, self.a.migrate_vm_begin):
            self.assert_refused(call, 'destination host %r is not a trusted '
                                'host' % evil, vm['uuid'], evil, vdi_map)
        time.sleep(0.5)
        self.assertEqual([], endpoint.calls)      # never contacted
        self.assertEqual(before, self.state())

    def test_a_forged_answer_is_refused(self):
        # the attacker takes calls from host a's queue, and answers them
        endpoint = ForgingEndpoint()
        self.serve_as(self.name_a, endpoint)
        genuine = forged = 0
        for _ in range(12):
            try:
                info = self.a.host_info()
            except auth.UntrustedAnswer as exc:
                self.assertIn('is not signed', str(exc))
                forged += 1
            else:
                self.assertEqual(self.name_a, info['name'])
                genuine += 1
        self.assertEqual(12, genuine + forged)
        self.assertGreater(forged, 0, 'the attacker took no call')
        self.assertGreater(genuine, 0)

    def test_a_forged_error_is_refused_a_genuine_one_is_not(self):
        class Failing(ForgingEndpoint):
            def host_info(self, context):
                raise exception.XSMError('forged: the host is gone')

        genuine = self.assertRaises(exception.XSMError, self.a.vm_get,
                                    'no-such-vm')
        self.assertNotIsInstance(genuine, auth.UntrustedAnswer)
        self.assertIn('no-such-vm', str(genuine))
        self.serve_as(self.name_a, Failing())
        forged = 0
        for _ in range(12):
            try:
                self.assertEqual(self.name_a, self.a.host_info()['name'])
            except auth.UntrustedAnswer as exc:
                self.assertIn('an unsigned error (XSMError_Remote: forged',
                              str(exc))
                forged += 1
        self.assertGreater(forged, 0, 'the attacker took no call')

    def test_a_forged_sealed_answer_is_refused(self):
        # ... even sealed with a key of its own in host a's name
        key = self.attacker_key
        name_a = self.name_a

        class Sealing(ForgingEndpoint):
            def host_info(self, context):
                envelope = context[auth.CONTEXT_KEY]
                return auth.seal_reply(key, name_a, envelope,
                                       super().host_info(context))

        self.serve_as(self.name_a, Sealing())
        forged = 0
        for _ in range(12):
            try:
                self.assertEqual(self.name_a, self.a.host_info()['name'])
            except auth.UntrustedAnswer as exc:
                self.assertIn('signature is not valid', str(exc))
                forged += 1
        self.assertGreater(forged, 0, 'the attacker took no call')


class TestQueuesPerExchange(base.TestCase):
    """Two deployments on one virtual host, with a host name in common."""

    def setUp(self):
        super().setUp()
        problem = fixtures.broker_problem()
        if problem:
            self.missing(problem)

    def test_agents_of_one_name_on_two_exchanges_do_not_share_calls(self):
        root = self.make_tempdir()
        token = uuidlib.uuid4().hex[:10]
        name = 'host-same-%s' % token
        agents, deployments = {}, {}
        for side in ('one', 'two'):
            exchange = 'xsm-test-%s-%s' % (side, token)
            folder = os.path.join(root, side)
            agents[side] = fixtures.AgentProcess(
                name, folder, {'sr-%s' % side: (
                    'vhd', os.path.join(folder, 'sr'))}, exchange)
            deployments[side] = harness.Deployment(
                root, exchange, {side: agents[side]}, rpc_timeout=15)
            self.addCleanup(deployments[side].close)
        # both agents serve at once, each on its own exchange
        problem = harness.start_all(agents.values())
        if problem:
            self.fail(problem)
        clients = {side: d.connect()[side] for side, d in deployments.items()}
        answers = {'one': set(), 'two': set()}
        errors = []

        def ask(side):
            try:
                for _ in range(10):
                    answers[side].update(
                        sr['name'] for sr in clients[side].host_info()['srs'])
            except Exception as exc:
                errors.append(exc)
        threads = [threading.Thread(target=ask, args=(side,))
                   for side in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual([], errors)
        self.assertEqual({'one': {'sr-one'}, 'two': {'sr-two'}}, answers)
        # one queue each, with its own agent as the only consumer
        for side in agents:
            queue = api.queue_name('xsm-test-%s-%s' % (side, token), name)
            self.assertEqual(1, consumers(queue), queue)


def consumers(queue):
    import amqp
    conn = amqp.Connection(host='%s:%d' % fixtures.BROKER, userid='guest',
                           password='guest', connect_timeout=5)
    conn.connect()
    try:
        return conn.channel().queue_declare(queue, passive=True)[2]
    finally:
        conn.close()
