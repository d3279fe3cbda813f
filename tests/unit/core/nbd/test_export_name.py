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

"""NBD_OPT_EXPORT_NAME on the client side of the sans-IO core, in bytes.

The reply has no option header: size (u64), transmission flags (u16) and
124 zero bytes unless NO_ZEROES was agreed (xapi-project/nbd
lib/protocol.ml ``DiskInfo``); a server refuses by closing.
"""

import struct

from tests import base
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p


def greeted(server_flags):
    conn = p.ClientConnection()
    conn.receive_data(struct.pack('>QQH', c.NBDMAGIC, c.IHAVEOPT,
                                  server_flags))
    assert isinstance(conn.next_event(), p.ServerHandshake)
    return conn


class TestExportName(base.TestCase):

    def test_request_bytes(self):
        conn = greeted(c.NBD_FLAG_FIXED_NEWSTYLE)
        self.assertEqual(struct.pack('>I', c.NBD_FLAG_C_FIXED_NEWSTYLE),
                         conn.data_to_send())
        self.assertEqual(struct.pack('>QII', c.IHAVEOPT,
                                     c.NBD_OPT_EXPORT_NAME, 5) + b'/disk',
                         conn.send(p.ExportNameRequest('/disk')))
        self.assertIs(p.State.OPTION_REPLY, conn.state)

    def test_reply_with_the_124_zero_bytes(self):
        conn = greeted(c.NBD_FLAG_FIXED_NEWSTYLE)
        conn.send(p.ExportNameRequest('/disk'))
        reply = struct.pack('>QH', 1 << 30, 3) + bytes(124)
        conn.receive_data(reply[:100])
        self.assertIs(p.NEED_DATA, conn.next_event())
        conn.receive_data(reply[100:])
        event = conn.next_event()
        self.assertEqual(p.ExportChosen('/disk', 1 << 30, 3), event)
        self.assertIs(p.State.TRANSMISSION, conn.state)
        self.assertEqual({}, conn.meta_contexts)
        # a simple read reply with its data follows
        conn.send(p.ReadRequest(1, 0, 512))
        conn.receive_data(struct.pack('>IIQ', c.NBD_SIMPLE_REPLY_MAGIC, 0, 1)
                          + b'x' * 512)
        self.assertEqual(b'x' * 512, bytes(conn.next_event().data))

    def test_reply_without_zeroes_when_agreed(self):
        conn = greeted(c.NBD_FLAG_FIXED_NEWSTYLE | c.NBD_FLAG_NO_ZEROES)
        conn.data_to_send()
        conn.send(p.ExportNameRequest('/disk'))
        conn.receive_data(struct.pack('>QH', 4096, 1))
        self.assertEqual(p.ExportChosen('/disk', 4096, 1), conn.next_event())

    def test_refusal_is_the_connection_closing(self):
        conn = greeted(c.NBD_FLAG_FIXED_NEWSTYLE)
        conn.send(p.ExportNameRequest('/nope'))
        conn.receive_data(b'')
        exc = self.assertRaises(p.RemoteProtocolError, conn.next_event)
        self.assertIn("refused export '/nope'", str(exc))

    def test_the_server_side_is_unchanged(self):
        # only the client sends it: the server core still answers it as an
        # option it does not model
        self.assertNotIn(c.NBD_OPT_EXPORT_NAME, p._OPTIONS)
