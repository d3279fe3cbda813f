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

"""Bounded fuzzing of the threaded NBD server (see nbd_server)."""

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from tests import base
from tests.fuzz import common
from tests.fuzz import nbd_server as target
from tests.fuzz import test_nbd_protocol
from xsm_driver.core.nbd import constants as c

SIZE = target.SCRATCH_SIZE
requests = st.builds(
    lambda command, handle, offset, length, flags, payload: (
        test_nbd_protocol.target.request(command, handle, offset, length,
                                         flags) + payload),
    st.integers(0, 9), st.integers(0, 4),
    st.sampled_from([0, 512, SIZE - 512, SIZE, 2 ** 64 - 1]) |
    st.integers(0, SIZE),
    st.sampled_from([0, 1, 4096, target.MAX_PAYLOAD,
                     target.MAX_PAYLOAD + 1, 2 ** 32 - 1]) |
    st.integers(0, 65536),
    st.sampled_from([0, c.NBD_CMD_FLAG_FUA, c.NBD_CMD_FLAG_REQ_ONE]) |
    st.integers(0, 2 ** 16 - 1),
    st.binary(max_size=64))
streams = st.lists(st.binary(min_size=1, max_size=32) |
                   test_nbd_protocol.options | requests,
                   max_size=10).map(b''.join)
endings = st.sampled_from(['fin', 'rst'])


class NBDServerFuzzTest(base.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.harness = target.Harness()

    @classmethod
    def tearDownClass(cls):
        cls.harness.close()
        common.stop_tracing()
        super().tearDownClass()

    @common.fuzz_settings(max_examples=250, deadline=30000)
    @given(st.sampled_from(target.PLAIN_PREFIXES), streams,
           st.binary(max_size=1), endings)
    def test_plain(self, prefix, body, seed, ending):
        self.harness.hostile(False, False, prefix, body, seed, ending)

    @common.fuzz_settings(max_examples=80, deadline=30000)
    @given(st.booleans(), st.sampled_from(target.TLS_PREFIXES), streams,
           st.binary(max_size=1), endings)
    def test_tls(self, garbage, prefix, body, seed, ending):
        self.harness.hostile(True, garbage, prefix, body, seed, ending)

    def test_corpus(self):
        files = common.corpus_files(target.TARGET)
        self.assertGreater(len(files), 5)
        for path in files:
            with open(path, 'rb') as f:
                self.harness.hostile(*target.decode(f.read()))

    def test_zero_length_requests_get_an_answer(self):
        """Regression: a structured read or block status of 0 bytes.

        The server took the request, then could not send the reply it
        made (no chunk describes 0 bytes) and sent nothing: the client
        waited for ever. Now the request is refused with EINVAL.
        """
        for command in (c.NBD_CMD_READ, c.NBD_CMD_BLOCK_STATUS):
            sock = socket.create_connection(
                self.harness.servers[0].address, timeout=10)
            self.addCleanup(sock.close)
            sock.recv(18)
            sock.sendall(target.CLIENT_FLAGS + target.STRUCTURED +
                         test_nbd_protocol.target.request(command, 9, 0, 0))
            magic = struct.pack('>I', c.NBD_STRUCTURED_REPLY_MAGIC)
            buf = b''
            while not (magic in buf and
                       len(buf) >= buf.index(magic) + 26):
                chunk = sock.recv(65536)
                self.assertNotEqual(b'', chunk, 'closed without a reply')
                buf += chunk
            _, flags, kind, handle, _, error = struct.unpack_from(
                '>IHHQII', buf, buf.index(magic))
            self.assertEqual((c.NBD_REPLY_FLAG_DONE, 9, c.NBD_EINVAL),
                             (flags, handle, error))
            self.assertEqual(c.NBD_REPLY_TYPE_ERROR, kind)
            sock.close()
