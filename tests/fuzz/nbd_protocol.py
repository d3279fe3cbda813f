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

"""Fuzz target: the server side of the sans-IO NBD core.

An input is one client's byte stream (after a prefix that reaches the
options or the transmission phase), fed to a
:class:`~xsm_driver.core.nbd.protocol.ServerConnection` in chunks whose
sizes the input also chooses. The harness answers every request the way
:mod:`xsm_driver.core.nbd.server` does. Checked:

* the only exception is ``RemoteProtocolError``, after which the
  connection stays in ``ERROR``;
* a request the core hands out can be answered: the reply a server makes
  for it is never refused (else the client would wait for ever);
* nothing grows past the limits given to the core (payloads, queued
  output, Python allocations);
* the chunking changes nothing: fed whole, the same stream gives the
  same events, the same bytes out and the same error.

``python -m tests.fuzz.nbd_protocol [libFuzzer args]`` runs it
under atheris.
"""

import random
import re
import struct

from tests.fuzz import common
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p

TARGET = 'nbd_protocol'
LIMIT = 4096                         # max payload and option length
SIZE = 64 * 1024
EXPORTS = {
    'disk': p.Export(SIZE, flags=p.DEFAULT_EXPORT_FLAGS |
                     c.NBD_FLAG_SEND_FAST_ZERO | c.NBD_FLAG_SEND_DF,
                     description='fuzzed disk'),
    'odd': p.Export(SIZE - 512, block_sizes=(512, 4096, LIMIT)),
}
MEMORY = 4 * 1024 * 1024
_OPTION = struct.Struct('>QII')
_REQUEST = struct.Struct('>IHHQQI')
CLIENT_FLAGS = struct.pack('>I', c.NBD_FLAG_C_FIXED_NEWSTYLE |
                           c.NBD_FLAG_C_NO_ZEROES)


def option(code, data=b''):
    return _OPTION.pack(c.IHAVEOPT, code, len(data)) + data


def go_data(name, infos=()):
    raw = name.encode('utf-8')
    return (struct.pack('>I', len(raw)) + raw +
            struct.pack('>H', len(infos)) +
            b''.join(struct.pack('>H', i) for i in infos))


def request(command, handle, offset=0, length=0, flags=0):
    return _REQUEST.pack(c.NBD_REQUEST_MAGIC, flags, command, handle,
                         offset, length)


META = option(c.NBD_OPT_SET_META_CONTEXT,
              go_data('disk')[:-2] + struct.pack('>I', 1) +
              struct.pack('>I', 15) + b'base:allocation')
# Where a stream starts: nothing, the client flags, in OPTIONS after
# STARTTLS, in TRANSMISSION with simple or structured replies.
PREFIXES = (
    b'',
    CLIENT_FLAGS,
    CLIENT_FLAGS + option(c.NBD_OPT_STARTTLS),
    CLIENT_FLAGS + option(c.NBD_OPT_GO, go_data('disk', (3,))),
    CLIENT_FLAGS + option(c.NBD_OPT_STRUCTURED_REPLY) + META +
    option(c.NBD_OPT_GO, go_data('disk')),
    CLIENT_FLAGS + option(c.NBD_OPT_STRUCTURED_REPLY) +
    option(c.NBD_OPT_GO, go_data('odd', (0, 1, 2, 3))),
)
TLS_MODES = p.TLS_MODES


def reply_for(conn, event):
    """The reply :mod:`..nbd.server` sends to a request event (success)."""
    handle = event.handle
    if type(event) is p.ReadRequest:
        data = bytes(event.length)
        if conn.structured:
            return p.ChunkData(handle, event.offset, data, done=True)
        return p.ReadReply(handle, data)
    if isinstance(event, p.BlockStatusRequest):
        extents = ((event.length, 0),) if event.length else ()
        return p.BlockStatusReply(handle, next(iter(conn.meta_contexts)),
                                  extents, done=True)
    return p.SimpleReply(handle)


def run(mode, read_only, prefix, chunks, eof):
    """Feed ``chunks``; return (events, bytes out, error reason)."""
    conn = p.ServerConnection(EXPORTS, read_only=read_only, tls=mode,
                              max_payload=LIMIT, max_option_length=LIMIT)
    found, out, error = [], bytearray(conn.data_to_send()), None
    fed = len(prefix)
    try:
        # An empty chunk means the end of the stream: only at the end.
        for chunk in [ch for ch in [prefix] + chunks if ch] + [b''] * eof:
            conn.receive_data(chunk)
            fed += len(chunk)
            while True:
                event = conn.next_event()
                out += conn.data_to_send()      # as the server flushes
                if event is p.NEED_DATA or isinstance(
                        event, p.ConnectionClosed):
                    break
                found.append(event)
                assert len(getattr(event, 'data', b'')) <= LIMIT, event
                if hasattr(event, 'handle') and not isinstance(
                        event, p.Disconnect):
                    reply = reply_for(conn, event)
                    try:
                        out += conn.send(reply)
                    except p.LocalProtocolError as exc:
                        raise AssertionError(
                            'the core accepted %r but refuses the reply %r '
                            'a server makes for it (%s): the client would '
                            'wait for ever' % (event, reply, exc))
            assert conn.expected_payload <= LIMIT
            out += conn.data_to_send()
            # Option replies are bounded by the input that asked for them.
            assert len(out) <= 64 * fed + 4 * LIMIT + 4096, (len(out), fed)
    except p.RemoteProtocolError as exc:
        assert conn.state is p.State.ERROR, conn.state
        # The reason counts the bytes buffered, which depends on chunking.
        error = re.sub(r'\b\d+ bytes', 'N bytes', exc.kwargs.get('reason'))
        out += conn.data_to_send()
        try:
            conn.next_event()
        except p.RemoteProtocolError:
            pass
        else:
            raise AssertionError('a failed connection went on')
    return found, bytes(out), error


def chunked(data, seed):
    """Cut ``data`` into pieces of 1..64 bytes chosen by ``seed``."""
    rnd = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        n = rnd.choice((1, 2, 3, 7, 16, 64, 4096))
        out.append(data[pos:pos + n])
        pos += n
    return out


def check_stream(mode, read_only, prefix, body, seed, eof):
    """The checks of the module docstring for one stream."""
    with common.memory_limit(MEMORY, 'an NBD stream'):
        whole = run(mode, read_only, prefix, [body], eof)
    pieces = run(mode, read_only, b'', chunked(prefix + body, seed), eof)
    # After STARTTLS the real server reads TLS records, not these bytes:
    # whether they count as clear text depends on when they arrived.
    if not any(isinstance(e, p.StartTLS) for e in whole[0] + pieces[0]):
        assert whole == pieces, ('chunking changed the outcome', whole[2],
                                 pieces[2])
    return whole


def decode(data):
    """(mode, read_only, prefix, body, seed, eof) from fuzzer bytes.

    Byte 0: the TLS mode (value mod 3), read-only (bit 2), the prefix
    (bits 3-6, mod the number of prefixes), the end of the stream (bit
    7); byte 1 seeds the chunking; the rest is the stream.
    """
    head = data[0]
    return (TLS_MODES[head % 3], bool(head & 4),
            PREFIXES[(head >> 3) % len(PREFIXES)], data[2:], data[1:2],
            bool(head & 0x80))


def one_input(data):
    if not data:
        return
    mode, read_only, prefix, body, seed, eof = decode(data)
    check_stream(mode, read_only, prefix, body, seed, eof)


if __name__ == '__main__':
    common.atheris_main(one_input)
