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

"""Signed calls and answers (xsm_driver.core.rpc.auth), without IO."""

import copy
import datetime
import doctest
import json
import os
import stat

from tests import base
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys

NOW = 1_800_000_000.0
MID = '00000000-0000-4000-8000-000000000000'


def load_tests(loader, tests, pattern):
    tests.addTests(doctest.DocTestSuite(auth))
    return tests


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now


class KeysTest(base.TestCase):

    def test_public_text_round_trip(self):
        key = auth.generate_key()
        text = auth.public_text(key)
        self.assertEqual(44, len(text))
        self.assertEqual(text, auth.public_text(auth.parse_public(text)))
        self.assertEqual(text, auth.public_text(key.public_key()))

    def test_bad_public_keys(self):
        for text in ('', 'not base64!', 'AAAA', 'A' * 42 + '=='):
            self.assertRaises(ValueError, auth.parse_public, text)

    def test_trust_refuses_a_bad_key_naming_its_owner(self):
        exc = self.assertRaises(ValueError, auth.Trust, {'h1': 'xyz'})
        self.assertIn('h1', str(exc))

    def test_pem_round_trip(self):
        key = auth.generate_key()
        again = auth.load_private_pem(auth.private_pem(key))
        self.assertEqual(auth.public_text(key), auth.public_text(again))

    def test_key_file_is_0600_and_never_overwritten(self):
        path = os.path.join(self.make_tempdir(), 'sub', 'k.key')
        key = keys.create_key_file(path)
        self.assertEqual(0o600, stat.S_IMODE(os.stat(path).st_mode))
        self.assertEqual(auth.public_text(key),
                         auth.public_text(keys.load_key_file(path)))
        self.assertRaises(FileExistsError, keys.create_key_file, path)

    def test_key_file_readable_by_others_is_refused(self):
        path = os.path.join(self.make_tempdir(), 'k.key')
        keys.create_key_file(path)
        os.chmod(path, 0o644)
        exc = self.assertRaises(keys.KeyFileError, keys.load_key_file, path)
        self.assertIn('chmod 600', str(exc))

    def test_trusted_hosts_file(self):
        path = os.path.join(self.make_tempdir(), 'peers')
        a, b = (auth.public_text(auth.generate_key()) for _ in 'ab')
        with open(path, 'w') as f:
            f.write('# peers\nh1 %s\n\n h2  %s  # second\n' % (a, b))
        self.assertEqual({'h1': a, 'h2': b},
                         keys.read_trusted_hosts_file(path))
        with open(path, 'a') as f:
            f.write('h3\n')
        exc = self.assertRaises(keys.KeyFileError,
                                keys.read_trusted_hosts_file, path)
        self.assertIn('line 5', str(exc))


class CanonicalTest(base.TestCase):

    def test_order_and_tuples_do_not_matter(self):
        self.assertEqual(auth.canonical({'a': (1, 2), 'b': {'y': 1, 'x': 2}}),
                         auth.canonical({'b': {'x': 2, 'y': 1}, 'a': [1, 2]}))

    def test_what_json_makes_of_a_value_is_what_is_signed(self):
        # the receiver sees the value after oslo.messaging's JSON
        value = {'when': datetime.datetime(2026, 1, 2, 3, 4, 5),
                 'rate': 0.1, 'n': None, 'big': 2 ** 40}
        wire = json.loads(json.dumps(json.loads(
            auth.canonical(value).decode())))
        self.assertEqual(auth.digest(value), auth.digest(wire))

    def test_different_values_differ(self):
        self.assertNotEqual(auth.digest({'vm': 'a'}), auth.digest({'vm': 'b'}))
        self.assertNotEqual(auth.digest({'x': 1}), auth.digest({'x': 1.5}))


class Deployment:
    """Two hosts and an operator who trust each other."""

    def __init__(self):
        self.keys = {n: auth.generate_key() for n in ('h1', 'h2', 'op')}
        self.attacker = auth.generate_key()

    def trust(self):
        return auth.Trust(
            {h: auth.public_text(self.keys[h]) for h in ('h1', 'h2')},
            {'op': auth.public_text(self.keys['op'])})

    def guard(self, host='h1', clock=None, **kwargs):
        return auth.Guard(host, self.keys[host], self.trust(),
                          clock=clock or Clock(), **kwargs)

    def operator(self):
        return auth.Credential(auth.OPERATOR, 'op', self.keys['op'])

    def agent(self, host='h2'):
        return auth.Credential(auth.AGENT, host, self.keys[host])


def context(envelope):
    return {auth.CONTEXT_KEY: envelope}


class GuardTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.d = Deployment()
        self.clock = Clock(NOW - 120)       # the agent started earlier
        self.guard = self.d.guard(clock=self.clock)
        self.clock.now = NOW

    def sign(self, method, args, credential=None, target='h1', now=NOW,
             nonce=None):
        credential = credential or self.d.operator()
        return credential.sign(target, method, args, now=now, nonce=nonce)

    def refused(self, method, args, ctx, why):
        caller, problem = self.guard.decide(method, ctx, args)
        self.assertIsNotNone(problem, 'admitted: %s' % (caller,))
        self.assertIn(why, problem)
        return caller

    def test_operator_call_is_admitted_and_answer_sealed(self):
        args = {'vm': 'v1'}
        env = self.sign('vm_destroy', args)
        caller = self.guard.admit('vm_destroy', context(env), args)
        self.assertEqual((auth.OPERATOR, 'op'), caller[:2])
        reply = json.loads(json.dumps(self.guard.seal(caller, {'a': (1,)})))
        self.assertEqual({'a': [1]}, auth.open_reply(
            reply, 'h1', env, self.d.keys['h1'].public_key()))

    def test_unsigned(self):
        who = self.refused('host_info', {}, {}, 'not signed')
        self.assertEqual('an unsigned caller', who)
        self.refused('host_info', {}, None, 'not signed')
        self.refused('host_info', {}, {auth.CONTEXT_KEY: 'x'}, 'mapping')

    def test_malformed_envelopes(self):
        env = self.sign('host_info', {})
        for field, value, why in (('sig', None, 'sig'), ('ts', '1', 'ts'),
                                  ('ts', True, 'ts'), ('v', 2, 'protocol'),
                                  ('role', 'god', 'role')):
            bad = dict(env, **{field: value})
            self.refused('host_info', {}, context(bad), why)
        bad = dict(env)
        del bad['nonce']
        self.refused('host_info', {}, context(bad), 'no nonce')

    def test_untrusted_key(self):
        forged = auth.Credential(auth.OPERATOR, 'op', self.d.attacker)
        self.refused('host_info', {}, context(self.sign(
            'host_info', {}, forged)), 'signature is not valid')
        stranger = auth.Credential(auth.OPERATOR, 'mallory', self.d.attacker)
        self.refused('host_info', {}, context(self.sign(
            'host_info', {}, stranger)), 'no trusted key for operator '
            'mallory')
        as_host = auth.Credential(auth.AGENT, 'h3', self.d.attacker)
        self.refused('receive_prepare', {'spec': {}}, context(self.sign(
            'receive_prepare', {'spec': {}}, as_host)), 'no trusted key')

    def test_an_agent_key_is_not_an_operator_key(self):
        h2_as_operator = auth.Credential(auth.OPERATOR, 'h2',
                                         self.d.keys['h2'])
        self.refused('vm_destroy', {'vm': 'v'}, context(self.sign(
            'vm_destroy', {'vm': 'v'}, h2_as_operator)), 'no trusted key')

    def test_other_target(self):
        env = self.sign('host_info', {}, target='h2')
        self.refused('host_info', {}, context(env), "signed for host 'h2'")

    def test_other_method_or_arguments(self):
        env = self.sign('vm_get', {'vm': 'v1'})
        self.refused('vm_destroy', {'vm': 'v1'}, context(env),
                     "signed for method 'vm_get'")
        self.refused('vm_get', {'vm': 'v2'}, context(env),
                     'not the ones that were signed')
        self.refused('vm_get', {'vm': 'v1', 'x': 1}, context(env),
                     'not the ones that were signed')

    def test_tampered_fields_break_the_signature(self):
        env = self.sign('vm_get', {'vm': 'v1'})
        for field, value in (('ts', env['ts'] + 1), ('nonce', '00' * 16),
                             ('sender', 'h2')):
            self.refused('vm_get', {'vm': 'v1'},
                         context(dict(env, **{field: value})),
                         'not valid' if field != 'sender' else 'no trusted')
        # the role is signed too: h2's signature as 'agent' is not an
        # operator's
        env = self.sign('receive_status', {'migration': MID},
                        self.d.agent('h2'))
        self.refused('receive_status', {'migration': MID},
                     context(dict(env, role=auth.OPERATOR)), 'no trusted')

    def test_stale_and_future_calls(self):
        for offset, why in ((-61, 'old'), (61, 'in the future')):
            env = self.sign('host_info', {}, now=NOW + offset)
            self.refused('host_info', {}, context(env), why)
        for offset in (-59, 59):
            env = self.sign('host_info', {}, now=NOW + offset)
            self.assertIsNone(self.guard.decide('host_info', context(env),
                                                {})[1])

    def test_replay(self):
        args = {'migration': MID}
        env = self.sign('migration_abort', args)
        self.guard.admit('migration_abort', context(env), args)
        self.clock.now += 30
        self.refused('migration_abort', args, copy.deepcopy(context(env)),
                     'replay')
        self.clock.now += 31                   # and later it is stale
        self.refused('migration_abort', args, context(env), 'old')

    def test_no_replay_across_a_restart(self):
        # the nonce cache is in memory: a restarted agent refuses calls
        # signed before it started, so a captured call cannot run twice
        args = {'migration': MID}
        env = self.sign('migration_abort', args)
        self.guard.admit('migration_abort', context(env), args)
        self.clock.now += 5
        restarted = self.d.guard(clock=self.clock)
        caller, problem = restarted.decide('migration_abort',
                                           copy.deepcopy(context(env)), args)
        self.assertIn('5.000 s before this agent started', problem)
        fresh = self.sign('migration_abort', args, now=self.clock.now)
        restarted.admit('migration_abort', context(fresh), args)

    def test_a_refused_call_does_not_burn_its_nonce(self):
        args = {'vm': 'v1'}
        env = self.sign('vm_get', args)
        self.refused('vm_get', {'vm': 'other'}, context(env), 'arguments')
        self.guard.admit('vm_get', context(env), args)

    def test_replay_cache_is_bounded(self):
        guard = self.d.guard(clock=self.clock, cache_size=3)
        for i in range(3):
            env = self.sign('host_info', {})
            guard.admit('host_info', context(env), {})
        env = self.sign('host_info', {})
        caller, problem = guard.decide('host_info', context(env), {})
        self.assertIn('too many calls', problem)
        self.clock.now += 61          # the three are stale: room again
        env = self.sign('host_info', {}, now=self.clock.now)
        guard.admit('host_info', context(env), {})
        self.assertEqual(1, len(guard.replays))

    def test_agents_may_call_receive_methods_only(self):
        h2 = self.d.agent('h2')
        for method, args in (('vm_destroy', {'vm': 'v'}), ('host_info', {}),
                             ('migrate_vm', {'vm': 'v', 'dest_host': 'h2',
                                             'vdi_map': {}}),
                             ('migration_abort', {'migration': MID})):
            self.refused(method, args, context(self.sign(method, args, h2)),
                         'only operators')
        args = {'migration': MID}
        env = self.sign('receive_abort', args, h2)
        self.guard.admit('receive_abort', context(env), args)

    def test_peer_calls_extend_what_agents_may_call(self):
        guard = self.d.guard(clock=self.clock,
                             peer_calls=['migration_outcome'])
        args = {'migration': MID}
        env = self.sign('migration_outcome', args, self.d.agent('h2'))
        guard.admit('migration_outcome', context(env), args)

    def test_migrations_go_to_trusted_hosts_only(self):
        for method in ('migrate_vm', 'migrate_vm_begin'):
            args = {'vm': 'v', 'dest_host': 'evil', 'vdi_map': {}}
            self.refused(method, args, context(self.sign(method, args)),
                         "destination host 'evil' is not a trusted host")
            args['dest_host'] = 'h2'
            self.assertIsNone(self.guard.decide(
                method, context(self.sign(method, args)), args)[1])

    def test_destinations_the_engine_reaches_itself(self):
        guard = self.d.guard(clock=self.clock, destinations=['pool-b'])
        args = {'vm': 'v', 'dest_host': 'pool-b', 'vdi_map': {}}
        env = self.sign('migrate_vm', args)
        guard.admit('migrate_vm', context(env), args)
        args = dict(args, dest_host='pool-c')
        env = self.sign('migrate_vm', args)
        self.assertIn('not a trusted host',
                      guard.decide('migrate_vm', context(env), args)[1])

    def test_receives_come_from_trusted_sources_only(self):
        spec = {'source_host': 'evil', 'id': MID}
        for method in ('receive_prepare', 'receive_prepare_ahead',
                       'receive_preflight'):
            args = {'spec': spec}
            self.refused(method, args, context(self.sign(method, args)),
                         "source host 'evil' is not a trusted host")
        args = {'migration': MID, 'source_host': 'evil'}
        self.refused('receive_claim', args, context(self.sign(
            'receive_claim', args)), 'not a trusted host')

    def test_an_agent_acts_for_itself_only(self):
        args = {'spec': {'source_host': 'h1', 'id': MID}}
        env = self.sign('receive_prepare', args, self.d.agent('h2'))
        self.refused('receive_prepare', args, context(env),
                     "agent h2 may not act for source host 'h1'")
        args = {'migration': MID, 'source_host': 'h1'}
        env = self.sign('receive_claim', args, self.d.agent('h2'))
        self.refused('receive_claim', args, context(env), 'may not act')

    def test_admit_logs_one_line_and_raises(self):
        with self.assertLogs('xsm_driver.core.rpc.auth', 'WARNING') as logs:
            exc = self.assertRaises(auth.NotAuthorized, self.guard.admit,
                                    'vm_destroy', {}, {'vm': 'v'})
        self.assertEqual(['WARNING:xsm_driver.core.rpc.auth:refused call '
                          'vm_destroy from an unsigned caller: the call is '
                          'not signed'], logs.output)
        self.assertEqual('host h1 refused vm_destroy: the call is not '
                         'signed', str(exc))


class ReplyTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.d = Deployment()
        self.env = self.d.agent('h2').sign('h1', 'receive_status',
                                           {'migration': MID}, now=NOW)
        self.h1 = self.d.keys['h1']

    def open(self, reply, host='h1', env=None, key=None):
        return auth.open_reply(reply, host, env or self.env,
                               (key or self.h1).public_key())

    def test_sealed_answer(self):
        reply = auth.seal_reply(self.h1, 'h1', self.env, {'state': 'done'})
        self.assertEqual({'state': 'done'}, self.open(reply))

    def test_unsigned_answer(self):
        exc = self.assertRaises(auth.UntrustedAnswer, self.open,
                                {'state': 'done'})
        self.assertIn('is not signed', str(exc))
        self.assertRaises(auth.UntrustedAnswer, self.open, None)

    def test_answer_of_another_key(self):
        reply = auth.seal_reply(self.d.attacker, 'h1', self.env, 'x')
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, reply)
        self.assertIn('signature is not valid', str(exc))

    def test_changed_result(self):
        reply = auth.seal_reply(self.h1, 'h1', self.env, {'state': 'done'})
        reply['result'] = {'state': 'aborted'}
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, reply)
        self.assertIn('not the one that was signed', str(exc))

    def test_sealed_error(self):
        reply = json.loads(json.dumps(auth.seal_reply(
            self.h1, 'h1', self.env, error='{"class": "X"}')))
        exc = self.assertRaises(ValueError, auth.open_reply, reply, 'h1',
                                self.env, self.h1.public_key(),
                                rebuild=ValueError)
        self.assertEqual('{"class": "X"}', str(exc))
        self.assertRaises(RuntimeError, self.open, reply)

    def test_an_error_seal_does_not_make_a_result_nor_the_reverse(self):
        error = auth.seal_reply(self.h1, 'h1', self.env, error='boom')
        result = auth.seal_reply(self.h1, 'h1', self.env, 'fine')
        swapped = {auth.REPLY_KEY: error[auth.REPLY_KEY], 'result': 'boom'}
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, swapped)
        self.assertIn('result is not the one that was signed', str(exc))
        swapped = {auth.REPLY_KEY: result[auth.REPLY_KEY], 'error': 'fine'}
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, swapped)
        self.assertIn('error is not the one that was signed', str(exc))
        both = dict(result, error='boom')
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, both)
        self.assertIn('it holds error, result', str(exc))

    def test_answer_of_another_call_or_host(self):
        other = self.d.agent('h2').sign('h1', 'receive_status',
                                        {'migration': MID}, now=NOW)
        reply = auth.seal_reply(self.h1, 'h1', other, 'done')
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, reply)
        self.assertIn('nonce', str(exc))
        reply = auth.seal_reply(self.d.keys['h2'], 'h2', self.env, 'done')
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, reply)
        self.assertIn("sealed for sender 'h2'", str(exc))
        abort = dict(self.env, method='receive_abort')
        reply = auth.seal_reply(self.h1, 'h1', abort, 'done')
        exc = self.assertRaises(auth.UntrustedAnswer, self.open, reply)
        self.assertIn('method', str(exc))


class IdentityTest(base.TestCase):

    def test_an_agent_trusts_itself(self):
        key = auth.generate_key()
        identity = auth.Identity('h9', key, auth.Trust())
        self.assertIsNotNone(identity.trust.key(auth.AGENT, 'h9'))
        self.assertEqual(('agent', 'h9'), (identity.credential().role,
                                           identity.credential().name))
