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

"""Bounded fuzzing of the sans-IO NBD server core (see nbd_protocol)."""

from hypothesis import given
from hypothesis import strategies as st

from tests import base
from tests.fuzz import common
from tests.fuzz import nbd_protocol as target
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p

LIMIT = target.LIMIT
options = st.builds(
    target.option,
    st.integers(0, 12) | st.integers(0, 2 ** 32 - 1),
    st.binary(max_size=48) | st.builds(
        target.go_data, st.sampled_from(['disk', 'odd', '', 'nope']),
        st.lists(st.integers(0, 4), max_size=4)))
requests = st.builds(
    lambda command, handle, offset, length, flags, payload: target.request(
        command, handle, offset, length, flags) + payload,
    st.integers(0, 9) | st.integers(0, 2 ** 16 - 1), st.integers(0, 4),
    st.sampled_from([0, 1, 511, 512, 4096, target.SIZE - 1, target.SIZE,
                     2 ** 63, 2 ** 64 - 1]) | st.integers(0, 2 ** 64 - 1),
    st.sampled_from([0, 1, 512, LIMIT, LIMIT + 1, 2 ** 32 - 1]) |
    st.integers(0, 2 * LIMIT),
    st.integers(0, 2 ** 16 - 1) | st.sampled_from([0, 1, 2, 4, 8, 16]),
    st.binary(max_size=64))
streams = st.lists(st.binary(min_size=1, max_size=32) | options | requests,
                   max_size=10).map(b''.join)


class NBDProtocolFuzzTest(base.TestCase):

    @common.fuzz_settings(max_examples=2000, deadline=2000)
    @given(st.sampled_from(p.TLS_MODES), st.booleans(),
           st.sampled_from(target.PREFIXES), streams, st.binary(max_size=1),
           st.booleans())
    def test_structured_streams(self, mode, read_only, prefix, body, seed,
                                eof):
        target.check_stream(mode, read_only, prefix, body, seed, eof)

    @common.fuzz_settings(max_examples=500, deadline=2000)
    @given(st.binary(max_size=512))
    def test_raw_bytes(self, data):
        target.one_input(data)

    def test_corpus(self):
        files = common.corpus_files(target.TARGET)
        self.assertGreater(len(files), 5)
        for path in files:
            with open(path, 'rb') as f:
                target.one_input(f.read())

    def test_zero_length_requests_are_refused_not_left_unanswered(self):
        """Regression: structured read / block status of 0 bytes.

        The core took them, then refused the only replies a server can
        make (a data chunk of no byte, an empty extent list): the server
        sent nothing and the client waited for ever.
        """
        for command in (c.NBD_CMD_READ, c.NBD_CMD_BLOCK_STATUS):
            events, out, error = target.run(
                'off', False, target.PREFIXES[4],
                [target.request(command, 7, 512, 0)], False)
            self.assertIsNone(error)
            self.assertEqual([], [e for e in events
                                  if getattr(e, 'handle', None) == 7])
            self.assertIn('%s of 0 bytes' % c.COMMAND_NAMES[command],
                          out.decode('latin-1'))
