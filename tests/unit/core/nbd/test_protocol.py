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

"""Tests of the sans-IO NBD protocol core, without sockets.

Byte vectors are written by hand from the layouts of the NBD specification
(doc/proto.md), not produced by the code under test.
"""

import struct

from tests import base
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p

MiB = 1024 * 1024
GREETING = b'NBDMAGIC' + b'IHAVEOPT' + b'\x00\x03'
EXPORTS = {
    'disk': p.Export(8 * MiB, description='the disk'),
    'ro': p.Export(MiB, flags=c.NBD_FLAG_SEND_FLUSH),
}


def option(code, data=b''):
    return b'IHAVEOPT' + struct.pack('>II', code, len(data)) + data


def option_reply(code, reply, data=b''):
    return (struct.pack('>QIII', 0x3e889045565a9, code, reply, len(data)) +
            data)


def request(command, handle, offset=0, length=0, flags=0):
    return struct.pack('>IHHQQI', 0x25609513, flags, command, handle,
                       offset, length)


def events(conn):
    """Return every event the connection can produce now."""
    found = []
    while True:
        event = conn.next_event()
        if event is p.NEED_DATA:
            return found
        found.append(event)


class Pair(object):
    """A client and a server wired together in memory."""

    def __init__(self, **server_args):
        self.client = p.ClientConnection()
        self.server = p.ServerConnection(server_args.pop('exports', EXPORTS),
                                         **server_args)
        self.pump()

    def pump(self):
        """Move queued bytes both ways; return (client, server) events."""
        client_events, server_events = [], events(self.server)
        moved = True
        while moved:
            to_client = self.server.data_to_send()
            if to_client:
                self.client.receive_data(to_client)
            client_events += events(self.client)
            to_server = self.client.data_to_send()
            if to_server:
                self.server.receive_data(to_server)
            server_events += events(self.server)
            moved = to_client or to_server
        return client_events, server_events

    def option(self, event):
        """Send an option; return (client event, server event)."""
        self.server.receive_data(self.client.send(event))
        client_events, server_events = self.pump()
        return client_events[-1], server_events[-1]

    def go(self, name='disk', structured=True, meta=True):
        if structured:
            self.option(p.StructuredReplyRequest())
        if meta:
            self.option(p.SetMetaContextRequest(name))
        chosen, _ = self.option(p.GoRequest(name, (c.NBD_INFO_BLOCK_SIZE,)))
        return chosen

    def request(self, event):
        """Client sends a request; return the server's events."""
        self.server.receive_data(self.client.send(event))
        return events(self.server)

    def reply(self, event):
        """Server sends a reply; return the client's events."""
        self.client.receive_data(self.server.send(event))
        return events(self.client)

    def refused(self, event):
        """Send a request the server refuses by itself.

        Return (the server's events, the client's events).
        """
        server_events = self.request(event)
        self.client.receive_data(self.server.data_to_send())
        return server_events, events(self.client)


class TestVectors(base.TestCase):
    """Messages against byte layouts from the specification."""

    def test_server_greeting(self):
        server = p.ServerConnection(EXPORTS)
        self.assertEqual(GREETING, server.data_to_send())
        self.assertEqual(18, len(GREETING))
        self.assertIs(p.State.CLIENT_FLAGS, server.state)
        server.receive_data(b'\x00\x00\x00\x03')
        self.assertEqual([p.ClientHandshake(3)], events(server))
        self.assertIs(p.State.OPTIONS, server.state)

    def test_client_answers_greeting(self):
        client = p.ClientConnection()
        client.receive_data(GREETING[:10])
        self.assertIs(p.NEED_DATA, client.next_event())
        client.receive_data(GREETING[10:])
        self.assertEqual([p.ServerHandshake(3)], events(client))
        self.assertEqual(b'\x00\x00\x00\x03', client.data_to_send())
        client.receive_data(b'')
        self.assertRaises(p.RemoteProtocolError, client.next_event)

    def test_client_no_zeroes_only_when_offered(self):
        client = p.ClientConnection()
        client.receive_data(GREETING[:-2] + b'\x00\x01')
        events(client)
        self.assertEqual(b'\x00\x00\x00\x01', client.data_to_send())

    def _client(self):
        client = p.ClientConnection()
        client.receive_data(GREETING)
        events(client)
        client.data_to_send()
        return client

    def test_option_requests(self):
        client = self._client()
        self.assertEqual(b'IHAVEOPT\x00\x00\x00\x03\x00\x00\x00\x00',
                         client.send(p.ListRequest()))
        client = self._client()
        self.assertEqual(
            option(7, b'\x00\x00\x00\x04disk\x00\x02\x00\x03\x00\x01'),
            client.send(p.GoRequest('disk', (3, 1))))
        client = self._client()
        self.assertEqual(option(8), client.send(p.StructuredReplyRequest()))
        client.receive_data(option_reply(8, 1))
        events(client)
        self.assertEqual(
            option(10, b'\x00\x00\x00\x04disk\x00\x00\x00\x01'
                   b'\x00\x00\x00\x0fbase:allocation'),
            client.send(p.SetMetaContextRequest('disk')))

    def test_go_replies(self):
        client = self._client()
        client.send(p.GoRequest('disk', (c.NBD_INFO_BLOCK_SIZE,)))
        client.receive_data(
            option_reply(7, 3, b'\x00\x00' + struct.pack('>QH', 4096, 0x45)) +
            option_reply(7, 3, b'\x00\x03' + struct.pack('>III', 1, 4096,
                                                         MiB)) +
            option_reply(7, 3, b'\x00\x02hello') +
            option_reply(7, 3, b'\x00\x09unknown info is ignored') +
            option_reply(7, 1))
        self.assertEqual([p.ExportChosen('disk', 4096, 0x45, 'hello',
                                         (1, 4096, MiB))], events(client))
        self.assertIs(p.State.TRANSMISSION, client.state)

    def test_server_answers_go(self):
        server = p.ServerConnection(EXPORTS)
        server.receive_data(b'\x00\x00\x00\x01' + option(
            7, b'\x00\x00\x00\x04disk\x00\x02\x00\x01\x00\x03'))
        chosen = events(server)[-1]
        flags = 0x6d    # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES
        self.assertEqual(p.ExportChosen('disk', 8 * MiB, flags, 'the disk',
                                        (1, 4096, 32 * MiB)), chosen)
        self.assertEqual(
            GREETING +
            option_reply(7, 3, struct.pack('>HQH', 0, 8 * MiB, flags)) +
            option_reply(7, 3, b'\x00\x01disk') +
            option_reply(7, 3, struct.pack('>HIII', 3, 1, 4096, 32 * MiB)) +
            option_reply(7, 1), server.data_to_send())

    def test_list_reply(self):
        server = p.ServerConnection(EXPORTS)
        server.receive_data(b'\x00\x00\x00\x01' + option(3))
        self.assertEqual([p.ClientHandshake(1), p.ListRequest()],
                         events(server))
        self.assertEqual(
            GREETING +
            option_reply(3, 2, b'\x00\x00\x00\x04diskthe disk') +
            option_reply(3, 2, b'\x00\x00\x00\x02ro') + option_reply(3, 1),
            server.data_to_send())

    def _transmission(self, structured):
        pair = Pair()
        pair.go(structured=structured, meta=structured)
        return pair.client

    def test_requests(self):
        client = self._transmission(True)
        self.assertEqual(request(0, 1, 512, 4096),
                         client.send(p.ReadRequest(1, 512, 4096)))
        self.assertEqual([request(1, 2, 0, 3, flags=1), b'abc'],
                         client.send_buffers(p.WriteRequest(2, 0, b'abc', 1)))
        self.assertEqual(request(3, 3), client.send(p.FlushRequest(3)))
        self.assertEqual(request(4, 4, 8, 16),
                         client.send(p.TrimRequest(4, 8, 16)))
        self.assertEqual(request(6, 5, 0, 512, flags=2),
                         client.send(p.WriteZeroesRequest(5, 0, 512, 2)))
        self.assertEqual(request(7, 6, 0, MiB, flags=8),
                         client.send(p.BlockStatusRequest(6, 0, MiB, 8)))
        self.assertEqual(request(2, 0), client.send(p.Disconnect()))
        self.assertIs(p.State.CLOSED, client.state)

    def test_simple_replies(self):
        client = self._transmission(False)
        client.send(p.ReadRequest(7, 0, 4))
        client.send(p.FlushRequest(8))
        client.receive_data(b'\x67\x44\x66\x98' + b'\x00' * 4 +
                            struct.pack('>Q', 8) + b'\x67\x44\x66\x98' +
                            b'\x00' * 4 + struct.pack('>Q', 7) + b'da')
        self.assertEqual([p.SimpleReply(8)], events(client))
        client.receive_data(b'ta')
        self.assertEqual([p.ReadReply(7, b'data')], events(client))
        self.assertEqual(frozenset(), client.in_flight)

    def test_structured_chunks(self):
        client = self._transmission(True)
        client.send(p.ReadRequest(1, 0, 8))
        client.send(p.BlockStatusRequest(2, 0, 8))
        chunk = struct.Struct('>IHHQI')
        client.receive_data(
            chunk.pack(0x668e33ef, 0, 1, 1, 12) + struct.pack('>Q', 4) +
            b'tail' +
            chunk.pack(0x668e33ef, 0, 2, 1, 12) + struct.pack('>QI', 0, 2) +
            chunk.pack(0x668e33ef, 1, 5, 2, 12) + struct.pack('>III', 1, 8,
                                                              3) +
            chunk.pack(0x668e33ef, 0, 0x8002, 1, 17) +
            struct.pack('>IH', 5, 3) + b'bad' + struct.pack('>Q', 2) +
            chunk.pack(0x668e33ef, 1, 0, 1, 0))
        self.assertEqual([p.ChunkData(1, 4, b'tail'), p.ChunkHole(1, 0, 2),
                          p.BlockStatusReply(2, 1, ((8, 3),), True),
                          p.ErrorReply(1, 5, 'bad', 2), p.ReplyDone(1)],
                         events(client))

    def test_server_reply_buffers(self):
        pair = Pair()
        pair.go()
        pair.request(p.ReadRequest(9, 0, 4))
        header, data = pair.server.send_buffers(p.ChunkData(9, 0, b'abcd',
                                                            True))
        self.assertEqual(struct.pack('>IHHQIQ', 0x668e33ef, 1, 1, 9, 12, 0),
                         header)
        self.assertEqual(b'abcd', data)

    def test_structured_error_vector(self):
        pair = Pair()
        pair.go()
        pair.request(p.WriteZeroesRequest(3, 0, 512))
        self.assertEqual(
            struct.pack('>IHHQIIH', 0x668e33ef, 1, 0x8001, 3, 8, 28, 2) +
            b'no', pair.server.send(p.ErrorReply(3, 28, 'no', done=True)))


class TestPair(base.TestCase, Pair):
    """A client and a server negotiating and transmitting together."""

    def setUp(self):
        super(TestPair, self).setUp()
        Pair.__init__(self)

    def test_handshake_events(self):
        pair = Pair()
        self.assertIs(p.State.OPTIONS, pair.client.state)
        self.assertIs(p.State.OPTIONS, pair.server.state)

    def test_list_info_go(self):
        self.assertEqual(
            (p.ExportList((('disk', 'the disk'), ('ro', ''))),
             p.ListRequest()), self.option(p.ListRequest()))
        info, event = self.option(p.InfoRequest('ro', (c.NBD_INFO_NAME,
                                                       c.NBD_INFO_DESCRIPTION,
                                                       c.NBD_INFO_BLOCK_SIZE)))
        self.assertEqual(p.ExportInfo('ro', MiB, 5, '', (1, 4096, 32 * MiB)),
                         info)
        self.assertEqual(p.InfoRequest('ro', (1, 2, 3)), event)
        self.assertIs(p.State.OPTIONS, self.client.state)
        error, _ = self.option(p.GoRequest('missing'))
        self.assertEqual(p.OptionError(7, c.NBD_REP_ERR_UNKNOWN,
                                       "no export named 'missing'"), error)
        chosen, server_chosen = self.option(p.GoRequest('disk'))
        self.assertEqual(server_chosen.size, chosen.size)
        self.assertEqual(server_chosen.flags, chosen.flags)
        self.assertIs(p.State.TRANSMISSION, self.client.state)
        self.assertIs(p.State.TRANSMISSION, self.server.state)
        self.assertFalse(self.client.structured)

    def test_structured_and_meta_context(self):
        error, _ = self.option(p.ListMetaContextRequest('disk'))
        self.assertEqual(c.NBD_REP_ERR_INVALID, error.reply)
        self.assertEqual(p.OptionAck(8),
                         self.option(p.StructuredReplyRequest())[0])
        self.assertEqual(
            p.MetaContexts((('base:allocation', 0),)),
            self.option(p.ListMetaContextRequest('disk', ('base:',)))[0])
        self.assertEqual(
            p.MetaContexts(()),
            self.option(p.ListMetaContextRequest('disk', ('qemu:x',)))[0])
        self.assertEqual(p.MetaContexts((('base:allocation', 1),)),
                         self.option(p.SetMetaContextRequest('disk'))[0])
        self.assertEqual({1: 'base:allocation'}, self.client.meta_contexts)
        self.assertEqual({1: 'base:allocation'}, self.server.meta_contexts)
        self.option(p.GoRequest('disk'))
        self.assertTrue(self.client.structured and self.server.structured)

    def test_meta_context_dropped_for_other_export(self):
        self.option(p.StructuredReplyRequest())
        self.option(p.SetMetaContextRequest('disk'))
        self.option(p.GoRequest('ro'))
        self.assertEqual({}, self.client.meta_contexts)
        self.assertEqual({}, self.server.meta_contexts)
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.BlockStatusRequest(1, 0, 512))

    def test_every_command_out_of_order(self):
        self.go()
        read = p.ReadRequest(1, 4096, 8192)
        write = p.WriteRequest(2, 0, b'x' * 1000, c.NBD_CMD_FLAG_FUA)
        flush = p.FlushRequest(3)
        trim = p.TrimRequest(4, 0, 4096)
        zeroes = p.WriteZeroesRequest(5, 4096, 4096, c.NBD_CMD_FLAG_NO_HOLE)
        status = p.BlockStatusRequest(6, 0, MiB, c.NBD_CMD_FLAG_REQ_ONE)
        for event in (read, write, flush, trim, zeroes, status):
            self.assertEqual([event], self.request(event))
        self.assertEqual(set(range(1, 7)), self.server.in_flight)
        replies = [
            p.SimpleReply(5), p.ChunkHole(1, 8192, 4096),
            p.BlockStatusReply(6, 1, ((4096, c.NBD_STATE_HOLE),), True),
            p.SimpleReply(3), p.ChunkData(1, 4096 + 2048, b'b' * 2048),
            p.SimpleReply(2, c.NBD_EIO), p.ChunkData(1, 4096, b'a' * 2048),
            p.ErrorReply(4, c.NBD_EIO, 'trim failed', 100, done=True),
            p.ReplyDone(1)]
        for event in replies:
            self.assertEqual([event], self.reply(event))
        self.assertEqual(frozenset(), self.client.in_flight)
        self.assertEqual(frozenset(), self.server.in_flight)
        self.assertEqual([p.Disconnect()], self.request(p.Disconnect()))
        self.assertIs(p.State.CLOSED, self.server.state)

    def test_disconnect_event(self):
        self.go()
        self.server.receive_data(self.client.send(p.Disconnect()))
        self.assertEqual([p.Disconnect()], events(self.server))
        self.server.receive_data(b'')
        self.assertIsInstance(self.server.next_event(), p.ConnectionClosed)

    def test_replies_in_flight_after_disconnect(self):
        self.go(structured=False, meta=False)
        self.request(p.ReadRequest(1, 0, 2))
        self.request(p.Disconnect())
        self.assertEqual([p.ReadReply(1, b'ok')],
                         self.reply(p.ReadReply(1, b'ok')))
        self.assertRaises(p.LocalProtocolError, self.server.send,
                          p.SimpleReply(1))

    def test_simple_mode_read(self):
        self.go(structured=False, meta=False)
        self.request(p.ReadRequest(1, 0, 3))
        self.assertRaises(p.LocalProtocolError, self.server.send,
                          p.ChunkData(1, 0, b'abc'))
        self.assertRaises(p.LocalProtocolError, self.server.send,
                          p.ReadReply(1, b'ab'))
        self.assertRaises(p.LocalProtocolError, self.server.send,
                          p.SimpleReply(1))
        self.assertEqual([p.SimpleReply(1, c.NBD_EIO)],
                         self.reply(p.SimpleReply(1, c.NBD_EIO)))

    def test_large_payload_into_caller_buffer(self):
        self.go()
        data = bytes(range(256)) * 4096
        header, payload = self.client.send_buffers(p.WriteRequest(9, 0, data))
        self.assertIs(data, payload)
        self.server.receive_data(header + payload[:1000])
        self.assertIs(p.NEED_DATA, self.server.next_event())
        self.assertEqual(len(data), self.server.expected_payload)
        target = bytearray(len(data))
        view = self.server.payload_view(target)
        self.assertEqual(len(data) - 1000, len(view))
        view[:] = payload[1000:]
        self.server.payload_received(len(view))
        event = self.server.next_event()
        self.assertIs(target, event.data)
        self.assertEqual(data, event.data)
        self.assertEqual(0, self.server.expected_payload)

    def test_read_chunk_into_caller_buffer(self):
        self.go()
        self.request(p.ReadRequest(1, 0, 4096))
        wire = self.server.send(p.ChunkData(1, 0, b'z' * 4096, done=True))
        self.client.receive_data(wire[:40])
        self.assertIs(p.NEED_DATA, self.client.next_event())
        target = bytearray(4096)
        view = self.client.payload_view(target)
        view[:] = wire[40:]
        self.assertRaises(p.LocalProtocolError,
                          self.client.payload_received, 4097)
        self.client.payload_received(len(view))
        self.assertEqual(p.ChunkData(1, 0, b'z' * 4096, True),
                         self.client.next_event())
        self.assertRaises(p.LocalProtocolError, self.client.payload_view,
                          bytearray(1))

    def test_starttls(self):
        pair = Pair(tls='require')
        error, event = pair.option(p.GoRequest('disk'))
        self.assertEqual(c.NBD_REP_ERR_TLS_REQD, error.reply)
        self.assertEqual(p.OptionRequest(7, event.data), event)
        self.assertEqual(c.NBD_REP_ERR_TLS_REQD,
                         pair.option(p.ListRequest())[0].reply)
        self.assertEqual((p.StartTLS(), p.StartTLS()),
                         pair.option(p.StartTLSRequest()))
        self.assertTrue(pair.client.tls and pair.server.tls)
        self.assertIs(p.State.OPTIONS, pair.client.state)
        self.assertRaises(p.LocalProtocolError, pair.client.send,
                          p.StartTLSRequest())
        pair.go()
        self.assertIs(p.State.TRANSMISSION, pair.server.state)

    def test_server_refuses_second_starttls(self):
        pair = Pair(tls='allow')
        pair.option(p.StartTLSRequest())
        pair.server.receive_data(option(5))
        self.assertEqual([p.StartTLSRequest()], events(pair.server))
        self.assertEqual(option_reply(5, c.NBD_REP_ERR_INVALID,
                                      b'TLS was already started'),
                         pair.server.data_to_send())

    def test_starttls_resets_negotiation(self):
        pair = Pair(tls='allow')
        pair.option(p.StructuredReplyRequest())
        pair.option(p.StartTLSRequest())
        self.assertFalse(pair.client.structured or pair.server.structured)

    def test_starttls_refused_without_tls(self):
        error, event = self.option(p.StartTLSRequest())
        self.assertEqual(p.OptionError(5, c.NBD_REP_ERR_POLICY,
                                       'TLS is not available'), error)
        self.assertFalse(self.client.tls)

    def test_starttls_injection(self):
        pair = Pair(tls='allow')
        pair.server.receive_data(option(5) + option(3))
        self.assertRaises(p.RemoteProtocolError, pair.server.next_event)
        self.assertIs(p.State.ERROR, pair.server.state)
        self.assertRaises(p.RemoteProtocolError, pair.server.next_event)

    def test_abort(self):
        self.assertEqual((p.Disconnect(), p.Disconnect()),
                         self.option(p.AbortRequest()))
        self.assertIs(p.State.CLOSED, self.client.state)
        self.assertIs(p.State.CLOSED, self.server.state)

    def test_abort_without_ack(self):
        self.client.send(p.AbortRequest())
        self.client.receive_data(b'')
        self.assertEqual(p.Disconnect(), self.client.next_event())

    def test_unknown_option_then_continue(self):
        error, event = self.option(p.OptionRequest(42, b'junk'))
        self.assertEqual(p.OptionError(42, c.NBD_REP_ERR_UNSUP,
                                       'option 42 is not supported'), error)
        self.assertEqual(p.OptionRequest(42, b'junk'), event)
        self.assertIsInstance(self.option(p.GoRequest('disk'))[0],
                              p.ExportChosen)

    def test_malformed_option_gets_invalid(self):
        self.server.receive_data(option(7, b'\x00\x00\x00\x09ab'))
        self.assertEqual([p.OptionRequest(7, b'\x00\x00\x00\x09ab')],
                         events(self.server))
        self.client.send(p.ListRequest())   # the client's turn, as if
        self.server.data_to_send()
        self.server.receive_data(option(3, b'x'))
        events(self.server)
        self.assertIn(b'takes no data', self.server.data_to_send())

    def test_request_errors_are_replies(self):
        pair = Pair(read_only=True)
        pair.go()
        cases = [
            (p.ReadRequest(1, 8 * MiB - 512, 1024), c.NBD_EINVAL),
            (p.WriteRequest(2, 0, b'x'), c.NBD_EPERM),
            (p.TrimRequest(3, 0, 512), c.NBD_EPERM),
            (p.ReadRequest(4, 0, 32 * MiB), c.NBD_EINVAL),
        ]
        for event, errno in cases:
            server_events, replies = pair.refused(event)
            self.assertEqual([], server_events)
            self.assertEqual(1, len(replies))
            self.assertEqual((event.handle, errno, True),
                             (replies[0].handle, replies[0].error,
                              replies[0].done))
        self.assertEqual('NBD_CMD_READ of [8388096, +1024) beyond the '
                         'export size 8388608', replies[0].message and
                         pair.refused(cases[0][0])[1][0].message)
        self.assertEqual(frozenset(), pair.server.in_flight)
        self.assertEqual(frozenset(), pair.client.in_flight)

    def test_request_errors_simple_mode(self):
        self.go(structured=False, meta=False)
        self.assertEqual(([], [p.SimpleReply(1, c.NBD_ENOSPC)]),
                         self.refused(p.WriteRequest(1, 8 * MiB, b'x')))

    def test_unknown_command_gets_einval(self):
        self.go()
        self.server.receive_data(request(5, 77, 0, 512) + request(99, 78))
        self.assertEqual([], events(self.server))
        self.client._in_flight.update({77: (0, 0, 512, 0),
                                       78: (0, 0, 0, 0)})
        self.client.receive_data(self.server.data_to_send())
        found = events(self.client)
        self.assertEqual([c.NBD_EINVAL] * 2, [e.error for e in found])
        self.assertEqual('unknown command 5', found[0].message)

    def test_flags_not_advertised(self):
        pair = Pair()
        pair.go('ro')
        self.assertRaises(p.LocalProtocolError, pair.client.send,
                          p.TrimRequest(1, 0, 512))
        self.assertRaises(p.LocalProtocolError, pair.client.send,
                          p.WriteRequest(1, 0, b'x', c.NBD_CMD_FLAG_FUA))
        pair.server.receive_data(request(4, 1, 0, 512))
        self.assertEqual([], events(pair.server))
        self.assertIn(b'needs transmission flag', pair.server.data_to_send())

    def test_local_misuse(self):
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.ReadRequest(1, 0, 1))
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.SetMetaContextRequest('disk'))
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.OptionRequest(7))
        self.assertRaises(p.LocalProtocolError, self.server.send,
                          p.ListRequest())
        self.go()
        self.client.send(p.ReadRequest(1, 0, 1))
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.ReadRequest(1, 0, 1))
        self.assertRaises(p.LocalProtocolError, self.client.send,
                          p.ReadRequest(2, -1, 1))
        self.assertNotIn(self.client.new_handle(), self.client.in_flight)
        self.assertRaises(p.LocalProtocolError, p.ServerConnection, {},
                          tls='maybe')


class TestMalformed(base.TestCase):
    """Peers that break the protocol get RemoteProtocolError."""

    def server(self, data, **kwargs):
        server = p.ServerConnection(EXPORTS, **kwargs)
        server.receive_data(b'\x00\x00\x00\x01' + data)
        return server

    def assertRemote(self, conn, text):
        error = self.assertRaises(p.RemoteProtocolError, events, conn)
        self.assertIn(text, str(error))
        self.assertIsInstance(error, p.NBDProtocolError)

    def test_wrong_option_magic(self):
        self.assertRemote(self.server(b'IHAVEOPX' + b'\x00' * 8),
                          'wrong option magic')

    def test_oversized_option(self):
        header = b'IHAVEOPT' + struct.pack('>II', 3, 64 * 1024 + 1)
        self.assertRemote(self.server(header), 'exceeds the limit')

    def test_bad_client_flags(self):
        server = p.ServerConnection(EXPORTS)
        server.receive_data(b'\x00\x00\x00\x04')
        self.assertRemote(server, 'unknown client flags')
        server = p.ServerConnection(EXPORTS)
        server.receive_data(b'\x00\x00\x00\x00')
        self.assertRemote(server, 'fixed newstyle')

    def go_server(self, **kwargs):
        return self.server(option(7, b'\x00\x00\x00\x04disk\x00\x00'),
                           **kwargs)

    def test_wrong_request_magic(self):
        server = self.go_server()
        server.receive_data(b'\x25\x60\x95\x14' + b'\x00' * 24)
        self.assertRemote(server, 'wrong request magic')

    def test_oversized_write(self):
        server = self.go_server(max_payload=4096)
        server.receive_data(request(1, 1, 0, 4097))
        self.assertRemote(server, 'write of 4097 bytes exceeds')

    def test_truncated_input(self):
        server = self.go_server()
        server.receive_data(request(1, 1, 0, 10) + b'12345')
        events(server)
        server.receive_data(b'')
        self.assertRemote(server, 'middle of a message')
        server = self.server(option(3)[:10])
        events(server)
        server.receive_data(b'')
        self.assertRemote(server, 'middle of a message')

    def test_data_after_disconnect(self):
        server = self.go_server()
        server.receive_data(request(2, 0) + b'x')
        self.assertRemote(server, 'unexpected 1 bytes in state CLOSED')

    def test_duplicate_handle(self):
        server = self.go_server()
        server.receive_data(request(0, 1, 0, 1) * 2)
        self.assertRemote(server, 'handle 1 is already in flight')

    def client(self, structured=True):
        pair = Pair()
        pair.go(structured=structured, meta=structured)
        return pair.client

    def test_client_wrong_greeting(self):
        client = p.ClientConnection()
        client.receive_data(b'NBDMAGIC' + struct.pack('>QQ', 0x00420281861253,
                                                      0))
        self.assertRemote(client, 'oldstyle')
        client = p.ClientConnection()
        client.receive_data(b'NBDMAGIC' + b'IHAVEOPT' + b'\x00\x00')
        self.assertRemote(client, 'fixed newstyle')

    def test_client_unknown_handle(self):
        client = self.client()
        client.receive_data(struct.pack('>IIQ', 0x67446698, 0, 5))
        self.assertRemote(client, 'handle 5, which is not in flight')

    def test_client_chunk_outside_request(self):
        client = self.client()
        client.send(p.ReadRequest(1, 0, 512))
        client.receive_data(struct.pack('>IHHQIQ', 0x668e33ef, 0, 1, 1, 9 +
                                        512, 0))
        self.assertRemote(client, 'outside the NBD_CMD_READ')

    def test_client_simple_read_when_structured(self):
        client = self.client()
        client.send(p.ReadRequest(1, 0, 512))
        client.receive_data(struct.pack('>IIQ', 0x67446698, 0, 1))
        self.assertRemote(client, 'simple reply to NBD_CMD_READ')

    def test_client_chunk_without_structured(self):
        client = self.client(structured=False)
        client.send(p.FlushRequest(1))
        client.receive_data(struct.pack('>IHHQI', 0x668e33ef, 1, 0, 1, 0))
        self.assertRemote(client, 'before structured replies')

    def test_client_bad_chunks(self):
        chunk = struct.Struct('>IHHQI')
        for kind, payload, text in [
                (2, b'\x00' * 11, 'malformed'),
                (0, b'', 'malformed'),           # NONE without DONE
                (5, struct.pack('>III', 9, 8, 0), 'unknown metadata'),
                (0x8001, struct.pack('>IH', 5, 9) + b'x', 'malformed'),
                (77, b'', 'malformed')]:
            client = self.client()
            client.send(p.BlockStatusRequest(1, 0, 512) if kind == 5 else
                        p.ReadRequest(1, 0, 512))
            client.receive_data(chunk.pack(0x668e33ef, 0, kind, 1,
                                           len(payload)) + payload)
            self.assertRemote(client, text)

    def test_client_error_message_too_long(self):
        client = self.client()
        client.send(p.ReadRequest(1, 0, 512))
        client.receive_data(struct.pack('>IHHQIIH', 0x668e33ef, 1, 0x8001, 1,
                                        6 + 5000, 5, 5000) + b'm' * 5000)
        self.assertRemote(client, 'error message longer than 4096 bytes')

    def test_client_unknown_error_chunk_is_an_error(self):
        client = self.client()
        client.send(p.ReadRequest(1, 0, 512))
        client.receive_data(struct.pack('>IHHQIIH', 0x668e33ef, 1, 0x8009, 1,
                                        6, 5, 0))
        self.assertEqual([p.ErrorReply(1, 5, '', None, True)], events(client))

    def test_client_option_reply_errors(self):
        client = p.ClientConnection()
        client.receive_data(GREETING)
        events(client)
        client.send(p.GoRequest('disk'))
        client.receive_data(option_reply(7, 1))
        self.assertRemote(client, 'without NBD_INFO_EXPORT')
        client = p.ClientConnection()
        client.receive_data(GREETING)
        events(client)
        client.send(p.ListRequest())
        client.receive_data(option_reply(3, 3, b'\x00\x00'))
        self.assertRemote(client, 'reply type 3 to option 3')
