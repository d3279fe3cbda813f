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

"""Bounded fuzzing of the agent's RPC endpoints (see the rpc target)."""

import os
import threading

from hypothesis import given
from hypothesis import strategies as st
from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from tests import base
from tests.fuzz import common
from tests.fuzz import rpc as target
from xsm_driver.core.rpc import arguments

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() |
    st.floats(allow_nan=True, allow_infinity=True) |
    st.sampled_from(target.STRINGS) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(st.sampled_from(target.STRINGS) | st.text(max_size=6),
                    inner, max_size=3),
    max_leaves=8)
calls = st.sampled_from(target.METHODS).flatmap(
    lambda method: st.tuples(st.just(method), st.fixed_dictionaries(
        {}, optional={name: json_values
                      for name in target.PARAMETERS[method]})))
MiB = 1024 * 1024
PEM = '-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n'


class RPCFuzzTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = self.make_tempdir()

    @common.fuzz_settings(max_examples=300, deadline=60000)
    @given(st.binary(min_size=1, max_size=96))
    def test_mutated_calls(self, data):
        # Plausible calls (real VM, VDI and SR names) with parts replaced.
        c = target.Call(self.root)
        try:
            method, kwargs = c.decode(data)
            target.check_call(c, method, kwargs, self.threads())
        finally:
            c.close()

    @common.fuzz_settings(max_examples=150, deadline=60000)
    @given(calls)
    def test_json_arguments(self, call):
        method, kwargs = call
        target.call(self.root, method, target.deliver(kwargs))

    def test_corpus(self):
        # Each crash-* input failed before the checks of agent.py.
        files = common.corpus_files(target.TARGET)
        self.assertGreater(len(files), 5)
        for path in files:
            with open(path, 'rb') as f:
                data = f.read()
            c = target.Call(self.root)
            try:
                method, kwargs = c.decode(data)
                target.check_call(c, method, kwargs, self.threads())
            finally:
                c.close()

    @staticmethod
    def threads():
        return {t.ident for t in threading.enumerate()}

    # -- regressions: each was an agent failure with a traceback --------

    def refused(self, method, kwargs, text):
        """The call is answered with InvalidArgument naming ``text``."""
        c = target.Call(self.root)
        self.addCleanup(c.close)
        self.addCleanup(c.stop)
        kwargs = {k: (v(c) if callable(v) else v) for k, v in kwargs.items()}
        before = c.state()
        try:
            c.dispatcher.dispatch(target._Incoming(method, kwargs))
        except target.rpc_dispatcher.ExpectedException as exc:
            error = exc.exc_info[1]
        else:
            self.fail('%s(%r) was not refused' % (method, kwargs))
        self.assertIsInstance(error, arguments.InvalidArgument)
        self.assertIn(method, str(error))
        self.assertIn(text, str(error))
        self.assertEqual(before, c.state())

    def test_unknown_and_missing_arguments(self):
        # (TypeError from the call itself)
        self.refused('vm_get', {'vm': 'vm1', 'args': 1},
                     "unexpected keyword argument 'args'")
        self.refused('vm_get', {}, "missing a required argument: 'vm'")

    def test_unhashable_references(self):
        # (TypeError: unhashable type, from a dict lookup)
        self.refused('vm_get', {'vm': ['vm1']}, 'argument vm must be a '
                     'JSON Unicode string')
        self.refused('vdi_list', {'sr': {'sr1': 1}}, 'argument sr must be')

    def test_malformed_vdi_map_and_options(self):
        # (TypeError inside the manager; an option of 0 failed the
        # migration later, in its thread)
        self.refused('migrate_vdi', {'vdi': lambda c: c.vdi,
                                     'dest_sr': 'sr2',
                                     'options': {'chunk': 0}},
                     'option chunk must be a JSON integer in [512, ')
        self.refused('migrate_vdi', {'vdi': lambda c: c.vdi,
                                     'dest_sr': 'sr2',
                                     'options': {'depth': 10 ** 6}},
                     'option depth')
        self.refused('migrate_vdi', {'vdi': lambda c: c.vdi,
                                     'dest_sr': 'sr2',
                                     'options': {'nope': 1}},
                     "unknown migration option 'nope'")
        self.refused('migrate_vm', {'vm': 'vm1', 'dest_host': 'x',
                                    'vdi_map': {'a': ['sr2']}},
                     "vdi_map['a'] must be a JSON Unicode string")
        self.refused('vm_create', {'name': 'x', 'disks': [{'sr': 'sr1'}]},
                     'disks[0].size must be a JSON integer')
        # (TypeError: unhashable type, from the begun migrations; found by
        # atheris)
        self.refused('migrate_vm', {'vm': 'vm1', 'dest_host': 'x',
                                    'vdi_map': {}, 'migration_id': {'a': 1}},
                     'argument migration_id must be a JSON Unicode string')
        # (TypeError: 'NoneType' object is not iterable)
        self.refused('migrate_vm', {'vm': 'vm1', 'dest_host': 'x',
                                    'vdi_map': None},
                     'argument vdi_map must be a JSON object')

    def spec(self, c, **changes):
        spec = {'id': target.UUID, 'source_host': 'other-host',
                'vdis': [{'uuid': c.vdi, 'sr': 'sr2', 'size': 4 * MiB}],
                'client_ca_pem': PEM}
        spec.update(changes)
        return {k: v for k, v in spec.items() if v is not None}

    def test_migration_request_without_id(self):
        # (KeyError: 'id')
        self.refused('receive_prepare', {'spec': lambda c: self.spec(
            c, id=None)}, 'spec.id must be a JSON Unicode string')

    def test_migration_request_with_malformed_parts(self):
        # (AttributeError in the checks themselves; found by atheris)
        self.refused('receive_preflight', {'spec': lambda c: self.spec(
            c, vif_map='net0')}, 'spec.vif_map must be a JSON object')
        self.refused('receive_preflight', {'spec': lambda c: self.spec(
            c, vdis=[{'uuid': c.vdi, 'sr': 'sr2'}])},
            'spec.vdis[0].size must be a JSON integer')
        # (KeyError: 'allocated', from the space estimate)
        self.refused('receive_preflight', {'spec': lambda c: self.spec(c)},
                     'spec.vdis[0].allocated must be a JSON integer')

    def test_migration_id_that_is_a_path(self):
        # (The id names the migration's folder of credentials: with
        # '../../../x' the receive wrote its TLS key outside the agent's
        # state folder.)
        self.refused('receive_prepare', {'spec': lambda c: self.spec(
            c, id='../../../tmp/x')}, 'spec.id must be a migration uuid')
        self.assertFalse(os.path.exists(os.path.join(self.root, 'tmp')))

    def test_migration_request_with_garbage_certificate(self):
        # (ssl.SSLError once the receive had been half prepared)
        self.refused('receive_prepare', {'spec': self.spec},
                     'spec.client_ca_pem is no PEM certificate')

    def test_lone_surrogates(self):
        # (UnicodeEncodeError from the journal; found by atheris)
        self.refused('receive_status', {'migration': '\udcff'},
                     'argument migration must be a JSON Unicode string')

    def test_non_finite_numbers(self):
        self.refused('guest_start', {'vm': 'vm1', 'rate': float('nan')},
                     'argument rate must be a JSON finite number')

    def test_unknown_vdi_is_a_clean_error(self):
        """Found by atheris: find_vdi raised KeyError, not its error."""
        kwargs = {'vdi': target.UUID, 'dest_sr': 'sr2'}
        target.call(self.root, 'migrate_vdi', kwargs)   # the checks pass
        c = target.Call(self.root)
        self.addCleanup(c.close)
        exc = self.assertRaises(
            rpc_dispatcher.ExpectedException, c.dispatcher.dispatch,
            target._Incoming('migrate_vdi', kwargs))
        self.assertIn('VDI %s is in none of its SRs' % target.UUID,
                      str(exc.exc_info[1]))
