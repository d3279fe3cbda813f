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

"""Property tests of the NBD protocol core (hypothesis)."""

import struct

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from tests import base
from tests.unit.core.nbd import test_protocol as tp
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p

LIMIT = 4096
SIZE = 64 * 1024
EXPORTS = {'disk': p.Export(SIZE, flags=p.DEFAULT_EXPORT_FLAGS |
                            c.NBD_FLAG_SEND_FAST_ZERO)}
GO = tp.option(7, b'\x00\x00\x00\x04disk\x00\x00')
PREFIXES = [
    b'',
    b'\x00\x00\x00\x01',
    b'\x00\x00\x00\x01' + GO,
    b'\x00\x00\x00\x01' + tp.option(8) +
    tp.option(10, b'\x00\x00\x00\x04disk\x00\x00\x00\x01'
              b'\x00\x00\x00\x0fbase:allocation') + GO,
]
requests = st.builds(
    lambda command, flags, handle, offset, length, magic: struct.pack(
        '>IHHQQI', magic, flags, command, handle, offset, length),
    st.integers(0, 9), st.integers(0, 31), st.integers(0, 3),
    st.one_of(st.integers(0, SIZE), st.integers(0, 2 ** 64 - 1)),
    st.one_of(st.integers(0, 2 * LIMIT), st.integers(0, 2 ** 32 - 1)),
    st.sampled_from([c.NBD_REQUEST_MAGIC] * 9 + [0]))
streams = st.tuples(
    st.sampled_from(PREFIXES),
    st.lists(st.one_of(st.binary(max_size=64), requests), max_size=12),
    st.booleans())


def drain(conn, chunks, eof):
    """Feed chunks; return the events, stopping at a RemoteProtocolError."""
    found = []
    try:
        # An empty chunk would mean the end of the stream: only at the end.
        for chunk in [chunk for chunk in chunks if chunk] + [b''] * eof:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is p.NEED_DATA or isinstance(
                        event, p.ConnectionClosed):
                    break
                found.append(event)
                assert len(getattr(event, 'data', b'')) <= LIMIT
            assert conn.expected_payload <= LIMIT
            assert len(conn.data_to_send()) <= 4 * LIMIT
    except p.RemoteProtocolError:
        assert conn.state is p.State.ERROR
    return found


class TestFuzz(base.TestCase):

    @settings(max_examples=300, deadline=None)
    @given(streams)
    def test_server_survives_any_bytes(self, stream):
        prefix, chunks, eof = stream
        server = p.ServerConnection(EXPORTS, max_payload=LIMIT,
                                    max_option_length=LIMIT, tls='allow')
        drain(server, [prefix] + chunks, eof)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=10), st.booleans(),
           st.booleans())
    def test_client_survives_any_bytes(self, chunks, structured, eof):
        pair = tp.Pair(exports=EXPORTS)
        pair.go(structured=structured, meta=structured)
        client = pair.client
        client.max_payload = LIMIT
        client.send(p.ReadRequest(0, 0, 512))
        client.send(p.WriteRequest(1, 0, b'x'))
        if structured:
            client.send(p.BlockStatusRequest(2, 0, 512))
        drain(client, chunks, eof)

    @settings(max_examples=100, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=10))
    def test_client_handshake_survives_any_bytes(self, chunks):
        drain(p.ClientConnection(), [tp.GREETING] + chunks, True)


def _request(kind, handle, offset, length, flags, data):
    """Build a valid request event (not empty) from drawn values."""
    offset = min(offset, SIZE - 1)
    length = max(1, min(length, SIZE - offset))
    if kind is p.WriteRequest:
        return p.WriteRequest(handle, offset, data[:length],
                              flags & c.NBD_CMD_FLAG_FUA)
    if kind is p.FlushRequest:
        return p.FlushRequest(handle, flags & c.NBD_CMD_FLAG_FUA)
    allowed = p._COMMAND_FLAGS[kind.command] & ~c.NBD_CMD_FLAG_DF
    return kind(handle, offset, length, flags & allowed)


def _replies(request, structured, pieces, error):
    """Replies a server may send to ``request``, in order."""
    handle = request.handle
    if error:
        if structured:
            return [p.ErrorReply(handle, c.NBD_EIO, 'boom', done=True)]
        return [p.SimpleReply(handle, c.NBD_EIO)]
    if isinstance(request, p.BlockStatusRequest):
        return [p.BlockStatusReply(handle, 1, ((request.length, 0),), True)]
    if not isinstance(request, p.ReadRequest) or type(request) is not (
            p.ReadRequest):
        return [p.SimpleReply(handle)]
    if not structured:
        return [p.ReadReply(handle, bytes(request.length))]
    cuts = sorted({0, request.length} | {
        cut % request.length for cut in pieces})
    chunks = []
    for start, end in zip(cuts, cuts[1:]):
        offset = request.offset + start
        if (start // 7) % 2:
            chunks.append(p.ChunkHole(handle, offset, end - start))
        else:
            chunks.append(p.ChunkData(handle, offset, b'd' * (end - start)))
    return chunks + [p.ReplyDone(handle)]


class TestRoundTrip(base.TestCase):

    @settings(max_examples=100, deadline=None)
    @given(st.booleans(), st.lists(st.tuples(
        st.sampled_from([p.ReadRequest, p.WriteRequest, p.FlushRequest,
                         p.TrimRequest, p.WriteZeroesRequest,
                         p.BlockStatusRequest]),
        st.integers(0, SIZE), st.integers(0, 3 * LIMIT),
        st.integers(0, 31), st.binary(max_size=LIMIT),
        st.lists(st.integers(0, 2 ** 32), max_size=4), st.booleans()),
        max_size=8), st.randoms(use_true_random=False))
    def test_requests_and_replies_round_trip(self, structured, drawn, rnd):
        pair = tp.Pair(exports=EXPORTS)
        pair.go(structured=structured, meta=structured)
        pending = []
        for handle, (kind, offset, length, flags, data, pieces,
                     error) in enumerate(drawn):
            if kind is p.BlockStatusRequest and not structured:
                continue
            request = _request(kind, handle, offset, length, flags, data)
            self.assertEqual([request], pair.request(request))
            pending.append(_replies(request, structured, pieces, error))
        # Interleave the replies of different requests in random order.
        while pending:
            replies = rnd.choice(pending)
            reply = replies.pop(0)
            self.assertEqual([reply], pair.reply(reply))
            if not replies:
                pending.remove(replies)
        self.assertEqual(frozenset(), pair.client.in_flight)
        self.assertEqual(frozenset(), pair.server.in_flight)
        self.assertEqual([p.Disconnect()], pair.request(p.Disconnect()))
