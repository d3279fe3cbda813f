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

"""Sans-IO core of the NBD protocol, for both the client and the server.

Shaped like h11: the caller owns sockets, threads and timeouts.  It feeds
the bytes it received with :meth:`Connection.receive_data`, pulls events with
:meth:`Connection.next_event` (until :data:`NEED_DATA`), turns its own events
into bytes with :meth:`Connection.send` (or :meth:`Connection.send_buffers`,
which never copies a payload), and writes :meth:`Connection.data_to_send`
before it waits for more input: the core queues there what the protocol
fully determines by itself (the greeting, the client flags, every option
reply of the server, the errno reply to a request the server must refuse).

One table, ``_TRANSITIONS``, holds every state change of both roles::

    HANDSHAKE -greeting-> CLIENT_FLAGS -client flags-> OPTIONS
    OPTIONS -option-> OPTION_REPLY -partial reply-> OPTION_REPLY
    OPTION_REPLY -final reply-> OPTIONS | -go-> TRANSMISSION | -abort-> CLOSED
    TRANSMISSION -request/reply-> TRANSMISSION -disc-> CLOSED

After ``NBD_CMD_DISC`` the server still answers the requests in flight and
the client still reads those replies.  A :class:`RemoteProtocolError` moves
the connection to ``ERROR`` for good; a request the server can refuse with
an errno never does.

Payloads up to 32 MiB (by default) pass without per-byte work: the receive
buffer is a bytearray consumed from the front, and an IO layer can read a
payload straight into its own buffer with :attr:`Connection.expected_payload`,
:meth:`Connection.payload_view` and :meth:`Connection.payload_received`.
"""

import dataclasses
import enum
import itertools
import logging
import struct

from xsm_driver.core import exception
from xsm_driver.core.nbd import constants as c

LOG = logging.getLogger(__name__)

MAX_PAYLOAD = 32 * 1024 * 1024
MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING = 4096
# Bytes of option replies a client keeps for one option (an export list).
MAX_OPTION_REPLIES = 1024 * 1024
DEFAULT_EXPORT_FLAGS = (c.NBD_FLAG_SEND_FLUSH | c.NBD_FLAG_SEND_FUA |
                        c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES)
TLS_MODES = ('off', 'allow', 'require')
_U16 = struct.Struct('>H')
_U32 = struct.Struct('>I')
_U64 = struct.Struct('>Q')
_GREETING = struct.Struct('>QQH')        # NBDMAGIC, IHAVEOPT, flags
_OPTION = struct.Struct('>QII')          # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct('>QIII')   # magic, option, type, length
_INFO_EXPORT = struct.Struct('>HQH')     # NBD_INFO_EXPORT, size, flags
_INFO_BLOCK_SIZE = struct.Struct('>HIII')
_EXPORT_NAME_REPLY = struct.Struct('>QH')  # size, transmission flags
_REQUEST = struct.Struct('>IHHQQI')      # magic, flags, type, handle, ...
_SIMPLE_REPLY = struct.Struct('>IIQ')    # magic, error, handle
_CHUNK = struct.Struct('>IHHQI')         # magic, flags, type, handle, len
_HOLE = struct.Struct('>QI')             # offset, hole size
_ERROR = struct.Struct('>IH')            # error, message length
_META_CONTEXT_ID = 1                     # our id of base:allocation

# Command flags each command accepts, and the transmission flag without
# which a command or a command flag must not be used.
_COMMAND_FLAGS = {
    c.NBD_CMD_READ: c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_DF,
    c.NBD_CMD_WRITE: c.NBD_CMD_FLAG_FUA,
    c.NBD_CMD_DISC: 0,
    c.NBD_CMD_FLUSH: c.NBD_CMD_FLAG_FUA,
    c.NBD_CMD_TRIM: c.NBD_CMD_FLAG_FUA,
    c.NBD_CMD_WRITE_ZEROES: (c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_NO_HOLE |
                             c.NBD_CMD_FLAG_FAST_ZERO),
    c.NBD_CMD_BLOCK_STATUS: c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_REQ_ONE,
}
_NEEDS = {
    ('command', c.NBD_CMD_FLUSH): c.NBD_FLAG_SEND_FLUSH,
    ('command', c.NBD_CMD_TRIM): c.NBD_FLAG_SEND_TRIM,
    ('command', c.NBD_CMD_WRITE_ZEROES): c.NBD_FLAG_SEND_WRITE_ZEROES,
    ('flag', c.NBD_CMD_FLAG_FUA): c.NBD_FLAG_SEND_FUA,
    ('flag', c.NBD_CMD_FLAG_DF): c.NBD_FLAG_SEND_DF,
    ('flag', c.NBD_CMD_FLAG_FAST_ZERO): c.NBD_FLAG_SEND_FAST_ZERO,
}
_WRITES = (c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES)


class NBDProtocolError(exception.XSMError):
    """Base class of the errors of the NBD protocol core."""

    msg_fmt = "NBD protocol error: %(reason)s"


class LocalProtocolError(NBDProtocolError):
    """The caller asked the core for something the protocol forbids."""

    msg_fmt = "NBD protocol misused by the caller: %(reason)s"


class RemoteProtocolError(NBDProtocolError):
    """The peer broke the protocol; the connection must be dropped."""

    msg_fmt = "NBD peer broke the protocol: %(reason)s"


class _Sentinel(object):
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


NEED_DATA = _Sentinel('NEED_DATA')
"""Returned by :meth:`Connection.next_event` until more bytes arrive."""


class State(enum.Enum):
    """States of a connection, the same for both roles."""

    HANDSHAKE = 'HANDSHAKE'          # the server greeting is due
    CLIENT_FLAGS = 'CLIENT_FLAGS'    # the client flags are due
    OPTIONS = 'OPTIONS'              # the client may send an option
    OPTION_REPLY = 'OPTION_REPLY'    # the server owes replies to an option
    TRANSMISSION = 'TRANSMISSION'
    CLOSED = 'CLOSED'
    ERROR = 'ERROR'


_TRANSITIONS = {
    (State.HANDSHAKE, 'greeting'): State.CLIENT_FLAGS,
    (State.CLIENT_FLAGS, 'client flags'): State.OPTIONS,
    (State.OPTIONS, 'option'): State.OPTION_REPLY,
    (State.OPTION_REPLY, 'partial reply'): State.OPTION_REPLY,
    (State.OPTION_REPLY, 'final reply'): State.OPTIONS,
    (State.OPTION_REPLY, 'go'): State.TRANSMISSION,
    (State.OPTION_REPLY, 'abort'): State.CLOSED,
    (State.TRANSMISSION, 'request'): State.TRANSMISSION,
    (State.TRANSMISSION, 'reply'): State.TRANSMISSION,
    (State.TRANSMISSION, 'disc'): State.CLOSED,
    (State.CLOSED, 'reply'): State.CLOSED,
}

_event = dataclasses.dataclass(frozen=True)


# Handshake.

@_event
class ServerHandshake(object):
    """The server greeted with these handshake flags (client side)."""

    flags: int


@_event
class ClientHandshake(object):
    """The client answered the greeting with these flags (server side)."""

    flags: int


# Options the client sends; the server emits the same event once it has
# queued its replies, except where noted.

@_event
class OptionRequest(object):
    """An option the core does not model; the server answers ERR_UNSUP.

    The server also emits it for an option it refused before parsing it
    (malformed data, or TLS required first).
    """

    option: int
    data: bytes = b''


@_event
class ListRequest(object):
    """``NBD_OPT_LIST``: list the exports."""

    option = c.NBD_OPT_LIST


@_event
class AbortRequest(object):
    """``NBD_OPT_ABORT``: end the session (both sides then see Disconnect)."""

    option = c.NBD_OPT_ABORT


@_event
class StartTLSRequest(object):
    """``NBD_OPT_STARTTLS``; a successful one comes out as StartTLS."""

    option = c.NBD_OPT_STARTTLS


@_event
class StructuredReplyRequest(object):
    """``NBD_OPT_STRUCTURED_REPLY``."""

    option = c.NBD_OPT_STRUCTURED_REPLY


@_event
class InfoRequest(object):
    """``NBD_OPT_INFO``: describe export ``name`` (``NBD_INFO_*`` wanted)."""

    option = c.NBD_OPT_INFO
    name: str = ''
    info_requests: tuple = ()


@_event
class GoRequest(InfoRequest):
    """``NBD_OPT_GO``; a successful one comes out as ExportChosen."""

    option = c.NBD_OPT_GO


@_event
class ListMetaContextRequest(object):
    """``NBD_OPT_LIST_META_CONTEXT`` for export ``name``."""

    option = c.NBD_OPT_LIST_META_CONTEXT
    name: str = ''
    queries: tuple = ()


@_event
class SetMetaContextRequest(ListMetaContextRequest):
    """``NBD_OPT_SET_META_CONTEXT`` for export ``name``."""

    option = c.NBD_OPT_SET_META_CONTEXT
    queries: tuple = (c.BASE_ALLOCATION,)


@_event
class ExportNameRequest(object):
    """``NBD_OPT_EXPORT_NAME`` (client side only): choose export ``name``.

    The option of servers that know no ``NBD_OPT_GO``: xapi-nbd understands
    only EXPORT_NAME, ABORT, LIST and STARTTLS and answers every other
    option "unsupported" (xapi-project/nbd lib/server.ml, ``connect``;
    lib/protocol.ml, ``Option.of_int32``).  There is no option reply: the
    server sends the export's size and transmission flags (padded with 124
    zero bytes unless NO_ZEROES was agreed; lib/protocol.ml ``DiskInfo``)
    and enters transmission -- a successful one comes out as ExportChosen
    -- or it closes the connection.
    """

    option = c.NBD_OPT_EXPORT_NAME
    name: str = ''


# Outcomes of options.

@_event
class ExportList(object):
    """Answer to ListRequest: ``((name, description), ...)``."""

    exports: tuple


@_event
class ExportInfo(object):
    """Answer to InfoRequest; ``block_sizes`` is (minimum, preferred, max)."""

    name: str
    size: int
    flags: int
    description: str = ''
    block_sizes: tuple = None


@_event
class ExportChosen(ExportInfo):
    """GoRequest succeeded: the connection is in TRANSMISSION (both sides)."""


@_event
class MetaContexts(object):
    """Answer to List/SetMetaContextRequest: ``((name, id), ...)``."""

    contexts: tuple


@_event
class OptionAck(object):
    """The server acknowledged an option that has no richer answer."""

    option: int


@_event
class OptionError(object):
    """The server refused an option with an ``NBD_REP_ERR_*`` reply."""

    option: int
    reply: int
    message: str = ''


@_event
class StartTLS(object):
    """STARTTLS accepted: write data_to_send(), then wrap the socket."""


@_event
class Disconnect(object):
    """The session ends: NBD_CMD_DISC, or NBD_OPT_ABORT."""

    command = c.NBD_CMD_DISC
    handle = offset = length = flags = 0


@_event
class ConnectionClosed(object):
    """The peer closed the connection where the protocol allows it."""


# Transmission requests (client to server).

@_event
class ReadRequest(object):
    """``NBD_CMD_READ``."""

    command = c.NBD_CMD_READ
    handle: int
    offset: int
    length: int
    flags: int = 0


@_event
class WriteRequest(object):
    """``NBD_CMD_WRITE`` (``NBD_CMD_FLAG_FUA``)."""

    command = c.NBD_CMD_WRITE
    handle: int
    offset: int
    data: bytes
    flags: int = 0

    @property
    def length(self):
        return len(self.data)


@_event
class FlushRequest(object):
    """``NBD_CMD_FLUSH``."""

    command = c.NBD_CMD_FLUSH
    offset = length = 0
    handle: int
    flags: int = 0


@_event
class TrimRequest(ReadRequest):
    """``NBD_CMD_TRIM``."""

    command = c.NBD_CMD_TRIM


@_event
class WriteZeroesRequest(ReadRequest):
    """``NBD_CMD_WRITE_ZEROES`` (``NBD_CMD_FLAG_NO_HOLE``, ``FUA``)."""

    command = c.NBD_CMD_WRITE_ZEROES


@_event
class BlockStatusRequest(ReadRequest):
    """``NBD_CMD_BLOCK_STATUS`` (``NBD_CMD_FLAG_REQ_ONE``)."""

    command = c.NBD_CMD_BLOCK_STATUS


_REQUESTS = {cls.command: cls for cls in (
    ReadRequest, TrimRequest, WriteZeroesRequest, BlockStatusRequest)}


# Replies (server to client).  ``done`` ends the reply to ``handle``.

@_event
class SimpleReply(object):
    """Simple reply without payload; ``error`` is an ``NBD_E*`` value."""

    done = True
    handle: int
    error: int = 0


@_event
class ReadReply(object):
    """Successful simple reply to a read, with its data."""

    done = True
    handle: int
    data: bytes


@_event
class ChunkData(object):
    """``NBD_REPLY_TYPE_OFFSET_DATA`` chunk."""

    handle: int
    offset: int
    data: bytes
    done: bool = False


@_event
class ChunkHole(object):
    """``NBD_REPLY_TYPE_OFFSET_HOLE`` chunk: ``length`` bytes read as zero."""

    handle: int
    offset: int
    length: int
    done: bool = False


@_event
class BlockStatusReply(object):
    """``NBD_REPLY_TYPE_BLOCK_STATUS``: ``((length, NBD_STATE_*), ...)``."""

    handle: int
    context_id: int
    extents: tuple
    done: bool = False


@_event
class ErrorReply(object):
    """``NBD_REPLY_TYPE_ERROR``, or ``ERROR_OFFSET`` when offset is set."""

    handle: int
    error: int
    message: str = ''
    offset: int = None
    done: bool = False


@_event
class ReplyDone(object):
    """``NBD_REPLY_TYPE_NONE``: the reply to ``handle`` is complete."""

    done = True
    handle: int


@_event
class Export(object):
    """What a server knows of one export (not an event).

    :param size: size in bytes.
    :param flags: ``NBD_FLAG_*`` transmission flags to advertise.
    :param description: text for humans.
    :param block_sizes: (minimum, preferred, maximum) or None for
        (1, 4096, max_payload).
    """

    size: int
    flags: int = DEFAULT_EXPORT_FLAGS
    description: str = ''
    block_sizes: tuple = None


_OPTIONS = {cls.option: cls for cls in (
    ListRequest, AbortRequest, StartTLSRequest, StructuredReplyRequest,
    InfoRequest, GoRequest, ListMetaContextRequest, SetMetaContextRequest)}


def _pack(st, *values):
    """Pack caller-supplied values; out-of-range ones are the caller's bug."""
    try:
        return st.pack(*values)
    except struct.error as exc:
        raise LocalProtocolError(reason='cannot encode %r: %s' % (values, exc))


def _encode(text):
    data = text.encode('utf-8')
    if len(data) > MAX_STRING:
        raise LocalProtocolError(reason='string of %d bytes exceeds the '
                                 'limit of %d bytes' % (len(data), MAX_STRING))
    return data


def _encode_string(text):
    data = _encode(text)
    return _U32.pack(len(data)) + data


def _decode_string(data, pos):
    """Return (text, end) of the length-prefixed string at data[pos:]."""
    (length,) = _U32.unpack_from(data, pos)
    end = pos + 4 + length
    if end > len(data):
        raise ValueError('string of %d bytes overruns the option data'
                         % length)
    return bytes(data[pos + 4:end]).decode('utf-8'), end


def _option_data(event):
    """Return the data bytes of an option request event."""
    if isinstance(event, OptionRequest):
        return event.data
    if isinstance(event, ExportNameRequest):
        return _encode(event.name)          # the whole data, no length
    if isinstance(event, InfoRequest):
        n = len(event.info_requests)
        return (_encode_string(event.name) + _pack(_U16, n) +
                _pack(struct.Struct('>%dH' % n), *event.info_requests))
    if isinstance(event, ListMetaContextRequest):
        return (_encode_string(event.name) +
                _pack(_U32, len(event.queries)) +
                b''.join(_encode_string(q) for q in event.queries))
    return b''


def _parse_option(option, data):
    """Return the event of an option request, None if unknown.

    :raises ValueError: (or struct.error) when the data is malformed.
    """
    cls = _OPTIONS.get(option)
    if cls is None:
        return None
    if issubclass(cls, InfoRequest):
        name, pos = _decode_string(data, 0)
        (count,) = _U16.unpack_from(data, pos)
        if len(data) != pos + 2 + 2 * count:
            raise ValueError('%d information requests do not fill the '
                             'option data' % count)
        return cls(name, struct.unpack_from('>%dH' % count, data, pos + 2))
    if issubclass(cls, ListMetaContextRequest):
        name, pos = _decode_string(data, 0)
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(min(count, len(data))):
            query, pos = _decode_string(data, pos)
            queries.append(query)
        if len(queries) != count or pos != len(data):
            raise ValueError('%d queries do not fill the option data'
                             % count)
        return cls(name, tuple(queries))
    if data and cls is not AbortRequest:
        raise ValueError('option %d takes no data, got %d bytes'
                         % (option, len(data)))
    return cls()


class _Payload(object):
    """A payload being received, and what to do with it once complete."""

    def __init__(self, size, finish):
        self.size = size
        self.finish = finish
        self.buffer = None
        self.view = None
        self.filled = 0


class Connection(object):
    """State shared by both roles; use ClientConnection/ServerConnection.

    Public attributes: ``state`` (:class:`State`), ``structured`` (structured
    replies negotiated), ``tls`` (STARTTLS done), ``meta_contexts`` (context
    id to name, as selected by SET_META_CONTEXT), ``export`` (the
    :class:`ExportChosen` of the transmission phase), ``max_payload`` and
    ``max_option_length``.
    """

    def __init__(self, max_payload=MAX_PAYLOAD,
                 max_option_length=MAX_OPTION_LENGTH):
        self.state = State.HANDSHAKE
        self.max_payload = max_payload
        self.max_option_length = max_option_length
        self.structured = False
        self.tls = False
        self.meta_contexts = {}
        self.export = None
        self._meta_export = None
        self._in_flight = {}      # handle -> (command, offset, length, flags)
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._payload = None
        self._failure = None

    # Bytes in, events out.

    def receive_data(self, data):
        """Add received bytes; ``b''`` means the peer closed its side."""
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError(reason='data received after the end '
                                     'of the stream')
        else:
            self._buf += data

    def next_event(self):
        """Return the next event, or NEED_DATA.

        :raises RemoteProtocolError: the peer broke the protocol; the
            connection is then in state ERROR.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError(reason='connection already failed: %s'
                                      % self._failure)
        try:
            event = None
            while event is None:
                if self._payload is not None:
                    event = self._read_payload()
                else:
                    event = self._readers.get(self.state, self._unexpected)()
            if event is NEED_DATA and self._eof:
                event = self._at_eof()
            return event
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            self._failure = exc.kwargs.get('reason')
            LOG.debug("NBD connection failed: %s", self._failure)
            raise

    @property
    def expected_payload(self):
        """Size of the payload being received (0 outside of one).

        When it is large, an IO layer may hand the core a buffer of exactly
        this size with :meth:`payload_view` and ``recv_into`` it.
        """
        return 0 if self._payload is None else self._payload.size

    def payload_view(self, buffer):
        """Receive the current payload into ``buffer`` (no copy later).

        Copies the payload bytes already buffered into ``buffer``, and
        returns a memoryview of the part still to fill: ``recv_into`` it and
        report each read with :meth:`payload_received`.  The event then
        carries ``buffer`` itself as its data.
        """
        payload = self._payload
        if payload is None or payload.view is not None:
            raise LocalProtocolError(reason='no payload is waiting for a '
                                     'buffer')
        view = memoryview(buffer).cast('B')
        if len(view) != payload.size:
            raise LocalProtocolError(reason='payload buffer of %d bytes for '
                                     'a payload of %d bytes'
                                     % (len(view), payload.size))
        payload.buffer, payload.view = buffer, view
        self._fill_payload()
        return view[payload.filled:]

    def payload_received(self, nbytes):
        """Tell the core that ``nbytes`` more payload bytes were received."""
        payload = self._payload
        if payload is None or payload.view is None or (
                payload.filled + nbytes > payload.size):
            raise LocalProtocolError(reason='%d payload bytes were not '
                                     'expected' % nbytes)
        payload.filled += nbytes

    # Events in, bytes out.

    def send_buffers(self, event):
        """Return the list of buffers that carry ``event``.

        Payloads (write data, read data) are returned as they were given,
        never copied.
        """
        if self.state is State.ERROR:
            raise LocalProtocolError(reason='connection already failed')
        sender = self._senders.get(type(event))
        if sender is None:
            raise LocalProtocolError(reason='a %s does not send %s' % (
                type(self).__name__, type(event).__name__))
        return sender(event)

    def send(self, event):
        """Return the bytes that carry ``event``."""
        return b''.join(self.send_buffers(event))

    def data_to_send(self):
        """Return (and forget) the bytes the core produced by itself."""
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def in_flight(self):
        """Handles of the requests still waiting for (the end of) a reply."""
        return frozenset(self._in_flight)

    # Helpers.

    def _next_state(self, step, error):
        try:
            return _TRANSITIONS[self.state, step]
        except KeyError:
            raise error(reason='%s is not allowed in state %s'
                        % (step, self.state.name))

    def _step(self, step, error=RemoteProtocolError):
        self.state = self._next_state(step, error)

    def _take(self, size):
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def _unexpected(self):
        if self._buf:
            raise RemoteProtocolError(reason='unexpected %d bytes in state %s'
                                      % (len(self._buf), self.state.name))
        return NEED_DATA

    def _at_eof(self):
        if self._buf or self._payload is not None:
            raise RemoteProtocolError(reason='connection closed in the '
                                      'middle of a message')
        if self.state is State.CLOSED and not self._in_flight:
            return ConnectionClosed()
        raise RemoteProtocolError(reason='connection closed in state %s '
                                  'with %d requests in flight'
                                  % (self.state.name, len(self._in_flight)))

    def _fill_payload(self):
        payload = self._payload
        n = min(len(self._buf), payload.size - payload.filled)
        if n:
            payload.view[payload.filled:payload.filled + n] = self._buf[:n]
            del self._buf[:n]
            payload.filled += n

    def _read_payload(self):
        payload = self._payload
        if payload.view is None:
            if len(self._buf) < payload.size:
                return NEED_DATA
            data = self._take(payload.size)
        else:
            self._fill_payload()
            if payload.filled < payload.size:
                return NEED_DATA
            data = payload.buffer
            payload.view.release()
        self._payload = None
        return payload.finish(data)

    def _start_tls(self, error):
        if self._buf:
            raise error(reason='%d bytes follow NBD_OPT_STARTTLS in clear '
                        'text' % len(self._buf))
        self.tls = True
        self.structured = False
        self.meta_contexts = {}
        self._meta_export = None

    def _command_problem(self, command, flags):
        """Return why the export cannot take this command, or None."""
        name = c.COMMAND_NAMES.get(command, 'command %d' % command)
        if command not in _COMMAND_FLAGS:
            return 'unknown command %d' % command
        if flags & ~_COMMAND_FLAGS[command]:
            return 'flags 0x%x are not valid for %s' % (flags, name)
        advertised = self.export.flags
        for (kind, value), needed in _NEEDS.items():
            if (flags & value if kind == 'flag' else command == value) and (
                    not advertised & needed):
                return ('%s 0x%x of %s needs transmission flag 0x%x' % (
                    kind, value, name, needed))
        if command == c.NBD_CMD_BLOCK_STATUS and not self.meta_contexts:
            return 'NBD_CMD_BLOCK_STATUS without a metadata context'
        return None

    def _check_reply(self, event, error, size=None):
        """Raise ``error`` unless ``event`` is a valid reply now."""
        request = self._in_flight.get(event.handle)
        if request is None:
            raise error(reason='reply for handle %d, which is not in flight'
                        % event.handle)
        command, offset, length, flags = request
        kind = type(event).__name__
        name = c.COMMAND_NAMES[command]
        if isinstance(event, (SimpleReply, ReadReply)):
            if command == c.NBD_CMD_READ and self.structured:
                raise error(reason='simple reply to NBD_CMD_READ after '
                            'structured replies were negotiated')
            if isinstance(event, ReadReply):
                if command != c.NBD_CMD_READ or len(event.data) != length:
                    raise error(reason='ReadReply of %d bytes to %s of %d '
                                'bytes' % (len(event.data), name, length))
            elif command == c.NBD_CMD_READ and not event.error:
                raise error(reason='successful reply to NBD_CMD_READ '
                            'without its data')
            return
        if not self.structured:
            raise error(reason='%s before structured replies were '
                        'negotiated' % kind)
        if isinstance(event, ErrorReply):
            if not event.error:
                raise error(reason='error chunk with error 0')
            if len(event.message.encode('utf-8')) > MAX_STRING:
                raise error(reason='error message longer than %d bytes'
                            % MAX_STRING)
            if event.offset is None:
                return
            start, size = event.offset, 1
        elif isinstance(event, (ChunkData, ChunkHole)):
            if command != c.NBD_CMD_READ:
                raise error(reason='%s chunk in reply to %s' % (kind, name))
            start = event.offset
            if size is None:
                size = (len(event.data) if isinstance(event, ChunkData)
                        else event.length)
        elif isinstance(event, BlockStatusReply):
            if command != c.NBD_CMD_BLOCK_STATUS:
                raise error(reason='block status chunk in reply to %s' % name)
            if event.context_id not in self.meta_contexts:
                raise error(reason='block status for unknown metadata '
                            'context %d' % event.context_id)
            extents = event.extents
            if not extents or (flags & c.NBD_CMD_FLAG_REQ_ONE and
                               len(extents) > 1) or not all(
                    extent[0] for extent in extents):
                raise error(reason='block status of %d extents (zero length, '
                            'none, or several for NBD_CMD_FLAG_REQ_ONE)'
                            % len(extents))
            return
        else:
            return
        if size < 1 or start < offset or start + size > offset + length:
            raise error(reason='%s at [%d, +%d) outside the %s of [%d, +%d)'
                        % (kind, start, size, name, offset, length))

    def _reply(self, event, error):
        """Account for a valid reply, sent or received; return it."""
        self._check_reply(event, error)
        self._step('reply', error)
        if event.done:
            del self._in_flight[event.handle]
        return event


class ClientConnection(Connection):
    """Client role: send options and requests, receive their replies."""

    def __init__(self, max_payload=MAX_PAYLOAD,
                 max_option_length=MAX_OPTION_LENGTH):
        super(ClientConnection, self).__init__(max_payload, max_option_length)
        self._option = None       # the option waiting for its final reply
        self._replies = []
        self._reply_bytes = 0
        self._handle = 0
        self._readers = {
            State.HANDSHAKE: self._read_greeting,
            State.OPTION_REPLY: self._read_option_reply,
            State.TRANSMISSION: self._read_reply,
            State.CLOSED: self._read_reply,
        }
        self._senders = dict.fromkeys(_OPTIONS.values(), self._send_option)
        self._senders[OptionRequest] = self._send_option
        self._senders[ExportNameRequest] = self._send_option
        self._no_zeroes = False   # NBD_FLAG_C_NO_ZEROES sent
        self._senders.update(dict.fromkeys(
            (WriteRequest, FlushRequest, Disconnect) +
            tuple(_REQUESTS.values()), self._send_request))

    def new_handle(self):
        """Return a handle that no request in flight uses."""
        while True:
            self._handle = (self._handle + 1) % (1 << 64)
            if self._handle not in self._in_flight:
                return self._handle

    def _at_eof(self):
        if (self.state is State.OPTION_REPLY and not self._buf and
                isinstance(self._option, AbortRequest)):
            self.state = State.CLOSED     # the server may skip the ACK
            return Disconnect()
        if (self.state is State.OPTION_REPLY and not self._buf and
                isinstance(self._option, ExportNameRequest)):
            # how a server refuses NBD_OPT_EXPORT_NAME (it has no reply)
            raise RemoteProtocolError(reason='the server closed the '
                                      'connection: it refused export %r'
                                      % self._option.name)
        return super(ClientConnection, self)._at_eof()

    def _read_greeting(self):
        if len(self._buf) < _GREETING.size:
            return NEED_DATA
        magic, option_magic, flags = _GREETING.unpack_from(self._buf)
        if magic != c.NBDMAGIC:
            raise RemoteProtocolError(reason='wrong server magic 0x%016x'
                                      % magic)
        if option_magic != c.IHAVEOPT:
            raise RemoteProtocolError(reason='oldstyle negotiation (magic '
                                      '0x%016x) is not supported'
                                      % option_magic)
        if not flags & c.NBD_FLAG_FIXED_NEWSTYLE:
            raise RemoteProtocolError(reason='server lacks fixed newstyle '
                                      'negotiation (flags 0x%x)' % flags)
        del self._buf[:_GREETING.size]
        self._step('greeting')
        client_flags = c.NBD_FLAG_C_FIXED_NEWSTYLE
        if flags & c.NBD_FLAG_NO_ZEROES:
            client_flags |= c.NBD_FLAG_C_NO_ZEROES
            self._no_zeroes = True
        self._out += _U32.pack(client_flags)
        self._step('client flags')
        return ServerHandshake(flags)

    def _send_option(self, event):
        if type(event) is OptionRequest and event.option in _OPTIONS:
            raise LocalProtocolError(reason='send option %d with its own '
                                     'event class' % event.option)
        if isinstance(event, StartTLSRequest) and self.tls:
            raise LocalProtocolError(reason='TLS was already started')
        if isinstance(event, SetMetaContextRequest) and not self.structured:
            raise LocalProtocolError(reason='NBD_OPT_SET_META_CONTEXT needs '
                                     'structured replies first')
        data = _option_data(event)
        header = _pack(_OPTION, c.IHAVEOPT, event.option, len(data))
        self._step('option', LocalProtocolError)
        if isinstance(event, SetMetaContextRequest):
            self.meta_contexts = {}
        self._option, self._replies, self._reply_bytes = event, [], 0
        return [header + data]

    def _read_option_reply(self):
        if isinstance(self._option, ExportNameRequest):
            return self._read_export_name_reply()
        if len(self._buf) < _OPTION_REPLY.size:
            return NEED_DATA
        magic, option, reply, length = _OPTION_REPLY.unpack_from(self._buf)
        if magic != c.NBD_REP_MAGIC:
            raise RemoteProtocolError(reason='wrong option reply magic '
                                      '0x%016x' % magic)
        if option != self._option.option:
            raise RemoteProtocolError(reason='reply to option %d while '
                                      'option %d is pending'
                                      % (option, self._option.option))
        self._reply_bytes += length
        if length > self.max_option_length or (
                self._reply_bytes > MAX_OPTION_REPLIES):
            raise RemoteProtocolError(reason='option replies of %d bytes '
                                      'exceed the limit' % self._reply_bytes)
        if len(self._buf) < _OPTION_REPLY.size + length:
            return NEED_DATA
        data = self._take(_OPTION_REPLY.size + length)[_OPTION_REPLY.size:]
        if reply & c.NBD_REP_FLAG_ERROR:
            self._step('final reply')
            return OptionError(option, reply, data.decode('utf-8', 'replace'))
        if reply == c.NBD_REP_ACK:
            return self._option_done()
        allowed = {c.NBD_REP_SERVER: (ListRequest,),
                   c.NBD_REP_INFO: (InfoRequest,),
                   c.NBD_REP_META_CONTEXT: (ListMetaContextRequest,)}
        if not isinstance(self._option, allowed.get(reply, ())):
            raise RemoteProtocolError(reason='reply type %d to option %d'
                                      % (reply, option))
        try:
            self._replies.append(self._parse_option_reply(reply, data))
        except (ValueError, struct.error) as exc:
            raise RemoteProtocolError(reason='malformed reply %d to option '
                                      '%d: %s' % (reply, option, exc))
        self._step('partial reply')
        return None

    def _read_export_name_reply(self):
        """Size and flags after NBD_OPT_EXPORT_NAME: transmission begins."""
        size = _EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else 124)
        if len(self._buf) < size:
            return NEED_DATA
        export_size, flags = _EXPORT_NAME_REPLY.unpack_from(self._take(size))
        self._step('go')
        # no NBD_OPT_GO, so no metadata context applies to this export
        self.meta_contexts = {}
        self.export = ExportChosen(self._option.name, export_size, flags)
        return self.export

    @staticmethod
    def _parse_option_reply(reply, data):
        """Return (kind, value) of one option reply."""
        if reply == c.NBD_REP_SERVER:
            name, end = _decode_string(data, 0)
            return 'server', (name, data[end:].decode('utf-8', 'replace'))
        if reply == c.NBD_REP_META_CONTEXT:
            (context_id,) = _U32.unpack_from(data)
            return 'context', (data[4:].decode('utf-8'), context_id)
        (info,) = _U16.unpack_from(data)
        if info == c.NBD_INFO_EXPORT and len(data) == _INFO_EXPORT.size:
            return 'export', _INFO_EXPORT.unpack(data)[1:]
        if info == c.NBD_INFO_BLOCK_SIZE and len(data) == 14:
            return 'block_sizes', _INFO_BLOCK_SIZE.unpack(data)[1:]
        if info in (c.NBD_INFO_EXPORT, c.NBD_INFO_BLOCK_SIZE):
            raise ValueError('information %d of %d bytes' % (info, len(data)))
        kinds = {c.NBD_INFO_NAME: 'name',
                 c.NBD_INFO_DESCRIPTION: 'description'}
        return kinds.get(info), data[2:].decode('utf-8', 'replace')

    def _option_done(self):
        """Turn the ACK of the pending option into its outcome event."""
        option = self._option
        if isinstance(option, InfoRequest):
            info = dict(self._replies)
            if 'export' not in info:
                raise RemoteProtocolError(reason='NBD_REP_ACK without '
                                          'NBD_INFO_EXPORT')
            cls = ExportChosen if isinstance(option, GoRequest) else (
                ExportInfo)
            event = cls(info.get('name', option.name), *info['export'],
                        description=info.get('description', ''),
                        block_sizes=info.get('block_sizes'))
            if cls is ExportChosen:
                self._step('go')
                self.export = event
                if self._meta_export != option.name:
                    self.meta_contexts = {}
                return event
        elif isinstance(option, ListRequest):
            event = ExportList(tuple(value for _, value in self._replies))
        elif isinstance(option, ListMetaContextRequest):
            event = MetaContexts(tuple(value for _, value in self._replies))
            if isinstance(option, SetMetaContextRequest):
                self.meta_contexts = {i: name for name, i in event.contexts}
                self._meta_export = option.name
        elif isinstance(option, AbortRequest):
            self._step('abort')
            return Disconnect()
        elif isinstance(option, StartTLSRequest):
            self._start_tls(RemoteProtocolError)
            event = StartTLS()
        else:
            if isinstance(option, StructuredReplyRequest):
                self.structured = True
            event = OptionAck(option.option)
        self._step('final reply')
        return event

    def _send_request(self, event):
        if event.handle in self._in_flight:
            raise LocalProtocolError(reason='handle %d is already in flight'
                                     % event.handle)
        if not isinstance(event, Disconnect):
            problem = self.export and self._command_problem(event.command,
                                                            event.flags)
            if problem:
                raise LocalProtocolError(reason=problem)
            if event.command in (c.NBD_CMD_READ, c.NBD_CMD_WRITE) and (
                    event.length > self.max_payload):
                raise LocalProtocolError(reason='length %d exceeds the limit '
                                         'of %d bytes' % (event.length,
                                                          self.max_payload))
        header = _pack(_REQUEST, c.NBD_REQUEST_MAGIC, event.flags,
                       event.command, event.handle, event.offset,
                       event.length)
        if isinstance(event, Disconnect):
            self._step('disc', LocalProtocolError)
            return [header]
        self._step('request', LocalProtocolError)
        self._in_flight[event.handle] = (event.command, event.offset,
                                         event.length, event.flags)
        if isinstance(event, WriteRequest):
            return [header, event.data]
        return [header]

    def _read_reply(self):
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (magic,) = _U32.unpack_from(buf)
        if magic == c.NBD_SIMPLE_REPLY_MAGIC:
            if len(buf) < _SIMPLE_REPLY.size:
                return NEED_DATA
            _, error, handle = _SIMPLE_REPLY.unpack_from(buf)
            del buf[:_SIMPLE_REPLY.size]
            request = self._in_flight.get(handle)
            if request and request[0] == c.NBD_CMD_READ and not error and (
                    not self.structured):
                self._payload = _Payload(request[2], lambda data: self._reply(
                    ReadReply(handle, data), RemoteProtocolError))
                return None
            return self._reply(SimpleReply(handle, error),
                               RemoteProtocolError)
        if magic != c.NBD_STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(reason='wrong reply magic 0x%08x'
                                      % magic)
        if len(buf) < _CHUNK.size:
            return NEED_DATA
        _, flags, kind, handle, length = _CHUNK.unpack_from(buf)
        done = bool(flags & c.NBD_REPLY_FLAG_DONE)
        if kind == c.NBD_REPLY_TYPE_OFFSET_DATA and length > 8:
            if len(buf) < _CHUNK.size + 8:
                return NEED_DATA
            (offset,) = _U64.unpack_from(buf, _CHUNK.size)
            self._check_reply(ChunkData(handle, offset, b''),
                              RemoteProtocolError, size=length - 8)
            del buf[:_CHUNK.size + 8]
            self._payload = _Payload(length - 8, lambda data: self._reply(
                ChunkData(handle, offset, data, done), RemoteProtocolError))
            return None
        if length > self.max_payload:
            raise RemoteProtocolError(reason='reply chunk of %d bytes exceeds '
                                      'the limit of %d bytes'
                                      % (length, self.max_payload))
        if len(buf) < _CHUNK.size + length:
            return NEED_DATA
        payload = self._take(_CHUNK.size + length)[_CHUNK.size:]
        return self._reply(_parse_chunk(kind, handle, done, payload),
                           RemoteProtocolError)


def _parse_chunk(kind, handle, done, payload):
    """Return the event of a structured reply chunk without bulk data."""
    size = len(payload)
    if kind == c.NBD_REPLY_TYPE_NONE and not size and done:
        return ReplyDone(handle)
    if kind == c.NBD_REPLY_TYPE_OFFSET_HOLE and size == _HOLE.size:
        return ChunkHole(handle, *_HOLE.unpack(payload), done=done)
    if kind == c.NBD_REPLY_TYPE_BLOCK_STATUS and size >= 12 and (
            size % 8 == 4):
        values = struct.unpack('>%dI' % (size // 4), payload)
        return BlockStatusReply(handle, values[0],
                                tuple(zip(values[1::2], values[2::2])), done)
    if kind & c.NBD_REPLY_TYPE_FLAG_ERROR and size >= _ERROR.size:
        error, length = _ERROR.unpack_from(payload)
        end = _ERROR.size + length
        if kind != c.NBD_REPLY_TYPE_ERROR_OFFSET and end <= size:
            # Unknown error chunk types count as a plain error.
            return ErrorReply(handle, error, payload[_ERROR.size:end].decode(
                'utf-8', 'replace'), None, done)
        if end + 8 <= size:
            return ErrorReply(handle, error, payload[_ERROR.size:end].decode(
                'utf-8', 'replace'), _U64.unpack_from(payload, end)[0], done)
    raise RemoteProtocolError(reason='malformed structured reply chunk of '
                              'type %d with %d bytes' % (kind, size))


class ServerConnection(Connection):
    """Server role: answer options by itself, surface transmission requests.

    :param exports: mapping of export name to :class:`Export`; a custom
        Mapping may compute entries on demand (``get`` and iteration).
    :param read_only: refuse every write with ``NBD_EPERM``.
    :param tls: ``'off'`` (STARTTLS refused), ``'allow'`` or ``'require'``
        (every option but STARTTLS and ABORT gets ``NBD_REP_ERR_TLS_REQD``
        until TLS is started).
    """

    def __init__(self, exports, read_only=False, tls='off',
                 max_payload=MAX_PAYLOAD,
                 max_option_length=MAX_OPTION_LENGTH):
        super(ServerConnection, self).__init__(max_payload, max_option_length)
        if tls not in TLS_MODES:
            raise LocalProtocolError(reason='tls must be one of %s, not %r'
                                     % (', '.join(TLS_MODES), tls))
        self.exports = exports
        self.read_only = read_only
        self.tls_mode = tls
        self._readers = {
            State.CLIENT_FLAGS: self._read_client_flags,
            State.OPTIONS: self._read_option,
            State.TRANSMISSION: self._read_request,
        }
        self._senders = dict.fromkeys(
            (SimpleReply, ReadReply, ChunkData, ChunkHole, BlockStatusReply,
             ErrorReply, ReplyDone), self._send_reply)
        self._out += _GREETING.pack(c.NBDMAGIC, c.IHAVEOPT,
                                    c.NBD_FLAG_FIXED_NEWSTYLE |
                                    c.NBD_FLAG_NO_ZEROES)
        self._step('greeting', LocalProtocolError)

    def _read_client_flags(self):
        if len(self._buf) < 4:
            return NEED_DATA
        (flags,) = _U32.unpack(self._take(4))
        if flags & ~(c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES):
            raise RemoteProtocolError(reason='unknown client flags 0x%08x'
                                      % flags)
        if not flags & c.NBD_FLAG_C_FIXED_NEWSTYLE:
            raise RemoteProtocolError(reason='client lacks fixed newstyle '
                                      'negotiation (flags 0x%x)' % flags)
        self._step('client flags')
        return ClientHandshake(flags)

    def _read_option(self):
        if len(self._buf) < _OPTION.size:
            return NEED_DATA
        magic, option, length = _OPTION.unpack_from(self._buf)
        if magic != c.IHAVEOPT:
            raise RemoteProtocolError(reason='wrong option magic 0x%016x'
                                      % magic)
        if length > self.max_option_length:
            raise RemoteProtocolError(reason='option %d of %d bytes exceeds '
                                      'the limit of %d bytes' % (
                                          option, length,
                                          self.max_option_length))
        if len(self._buf) < _OPTION.size + length:
            return NEED_DATA
        data = self._take(_OPTION.size + length)[_OPTION.size:]
        self._step('option')
        if self.tls_mode == 'require' and not self.tls and option not in (
                c.NBD_OPT_STARTTLS, c.NBD_OPT_ABORT):
            return self._refuse(OptionRequest(option, data),
                                c.NBD_REP_ERR_TLS_REQD, 'TLS is required')
        try:
            event = _parse_option(option, data)
        except (ValueError, struct.error) as exc:
            return self._refuse(OptionRequest(option, data),
                                c.NBD_REP_ERR_INVALID, str(exc))
        if event is None:
            return self._refuse(OptionRequest(option, data),
                                c.NBD_REP_ERR_UNSUP,
                                'option %d is not supported' % option)
        return self._answer(event)

    def _option_reply(self, option, reply, data=b'', step=None):
        if step is None:
            step = 'final reply' if reply == c.NBD_REP_ACK or (
                reply & c.NBD_REP_FLAG_ERROR) else 'partial reply'
        self._out += _OPTION_REPLY.pack(c.NBD_REP_MAGIC, option, reply,
                                        len(data)) + data
        self._step(step, LocalProtocolError)

    def _refuse(self, event, reply, message):
        LOG.debug("NBD option %d refused with 0x%x: %s",
                  event.option, reply, message)
        self._option_reply(event.option, reply, _encode(message))
        return event

    def _answer(self, event):
        """Queue the replies to a well-formed option; return its event."""
        option = event.option
        if isinstance(event, AbortRequest):
            self._option_reply(option, c.NBD_REP_ACK, step='abort')
            return Disconnect()
        if isinstance(event, StartTLSRequest):
            if self.tls_mode == 'off':
                return self._refuse(event, c.NBD_REP_ERR_POLICY,
                                    'TLS is not available')
            if self.tls:
                return self._refuse(event, c.NBD_REP_ERR_INVALID,
                                    'TLS was already started')
            self._start_tls(RemoteProtocolError)
            self._option_reply(option, c.NBD_REP_ACK)
            return StartTLS()
        if isinstance(event, StructuredReplyRequest):
            self.structured = True
        elif isinstance(event, ListRequest):
            for name in self.exports:
                self._option_reply(option, c.NBD_REP_SERVER,
                                   _encode_string(name) + _encode(
                                       self.exports[name].description))
        elif isinstance(event, ListMetaContextRequest):
            return self._answer_meta_context(event)
        elif isinstance(event, InfoRequest):
            return self._answer_info(event)
        self._option_reply(option, c.NBD_REP_ACK)
        return event

    def _answer_info(self, event):
        export = self.exports.get(event.name)
        if export is None:
            return self._refuse(event, c.NBD_REP_ERR_UNKNOWN,
                                'no export named %r' % event.name)
        flags = export.flags | c.NBD_FLAG_HAS_FLAGS
        if self.read_only:
            flags |= c.NBD_FLAG_READ_ONLY
        if not self.structured:
            flags &= ~c.NBD_FLAG_SEND_DF
        sizes = export.block_sizes or (1, 4096, self.max_payload)
        infos = [_INFO_EXPORT.pack(c.NBD_INFO_EXPORT, export.size, flags)]
        for info in sorted(set(event.info_requests)):
            if info == c.NBD_INFO_NAME:
                infos.append(_U16.pack(info) + _encode(event.name))
            elif info == c.NBD_INFO_DESCRIPTION and export.description:
                infos.append(_U16.pack(info) + _encode(export.description))
            elif info == c.NBD_INFO_BLOCK_SIZE:
                infos.append(_INFO_BLOCK_SIZE.pack(info, *sizes))
        for data in infos:
            self._option_reply(event.option, c.NBD_REP_INFO, data)
        chosen = ExportChosen(event.name, export.size, flags,
                              export.description, tuple(sizes))
        if not isinstance(event, GoRequest):
            self._option_reply(event.option, c.NBD_REP_ACK)
            return event
        self._option_reply(event.option, c.NBD_REP_ACK, step='go')
        self.export = chosen
        if self._meta_export != event.name:
            self.meta_contexts = {}
        return chosen

    def _answer_meta_context(self, event):
        setting = isinstance(event, SetMetaContextRequest)
        if setting:
            self.meta_contexts = {}
        if not self.structured:
            return self._refuse(event, c.NBD_REP_ERR_INVALID,
                                'negotiate structured replies first')
        if self.exports.get(event.name) is None:
            return self._refuse(event, c.NBD_REP_ERR_UNKNOWN,
                                'no export named %r' % event.name)
        queries = event.queries or ('base:',)
        wanted = ((c.BASE_ALLOCATION,) if setting else (
            c.BASE_ALLOCATION, 'base:'))
        if any(query in wanted for query in queries):
            context_id = _META_CONTEXT_ID if setting else 0
            self._option_reply(event.option, c.NBD_REP_META_CONTEXT,
                               _U32.pack(context_id) + _encode(
                                   c.BASE_ALLOCATION))
            if setting:
                self.meta_contexts = {context_id: c.BASE_ALLOCATION}
        if setting:
            self._meta_export = event.name
        self._option_reply(event.option, c.NBD_REP_ACK)
        return event

    def _read_request(self):
        if len(self._buf) < _REQUEST.size:
            return NEED_DATA
        magic, flags, command, handle, offset, length = (
            _REQUEST.unpack_from(self._buf))
        if magic != c.NBD_REQUEST_MAGIC:
            raise RemoteProtocolError(reason='wrong request magic 0x%08x'
                                      % magic)
        del self._buf[:_REQUEST.size]
        if command == c.NBD_CMD_WRITE:
            if length > self.max_payload:
                raise RemoteProtocolError(reason='write of %d bytes exceeds '
                                          'the limit of %d bytes'
                                          % (length, self.max_payload))
            self._payload = _Payload(length, lambda data: self._accept(
                command, flags, handle, offset, length, data))
            return None
        return self._accept(command, flags, handle, offset, length, None)

    def _accept(self, command, flags, handle, offset, length, data):
        """Return the event of a request, or None after refusing it."""
        if command == c.NBD_CMD_DISC:
            self._step('disc')
            return Disconnect()
        self._step('request')
        if handle in self._in_flight:
            raise RemoteProtocolError(reason='handle %d is already in flight'
                                      % handle)
        error, reason = self._request_problem(command, flags, offset, length)
        if error:
            LOG.debug("NBD request %d refused with errno %d: %s",
                      handle, error, reason)
            self._out += self._reply_header(handle, error, reason)
            return None
        self._in_flight[handle] = (command, offset, length, flags)
        if command == c.NBD_CMD_WRITE:
            return WriteRequest(handle, offset, data, flags)
        if command == c.NBD_CMD_FLUSH:
            return FlushRequest(handle, flags)
        return _REQUESTS[command](handle, offset, length, flags)

    def _request_problem(self, command, flags, offset, length):
        """Return (errno, reason) for a request to refuse, or (0, None)."""
        problem = self._command_problem(command, flags)
        if problem:
            return c.NBD_EINVAL, problem
        name = c.COMMAND_NAMES[command]
        if command in _WRITES and self.export.flags & c.NBD_FLAG_READ_ONLY:
            return c.NBD_EPERM, '%s to a read-only export' % name
        if command == c.NBD_CMD_FLUSH:
            if offset or length:
                return c.NBD_EINVAL, 'NBD_CMD_FLUSH with offset or length'
            return 0, None
        if not length and (command == c.NBD_CMD_BLOCK_STATUS or (
                command == c.NBD_CMD_READ and self.structured)):
            # No reply chunk describes zero bytes (a data chunk carries at
            # least one, an extent is never empty): refuse the request
            # rather than leave it unanswered.
            return c.NBD_EINVAL, '%s of 0 bytes' % name
        if offset + length > self.export.size:
            error = c.NBD_ENOSPC if command in (
                c.NBD_CMD_WRITE, c.NBD_CMD_WRITE_ZEROES) else c.NBD_EINVAL
            return error, '%s of [%d, +%d) beyond the export size %d' % (
                name, offset, length, self.export.size)
        minimum, _, maximum = self.export.block_sizes
        if offset % minimum or length % minimum:
            return c.NBD_EINVAL, '%s not aligned to %d bytes' % (name, minimum)
        if command in (c.NBD_CMD_READ, c.NBD_CMD_WRITE) and length > maximum:
            return c.NBD_EINVAL, '%s of %d bytes exceeds %d bytes' % (
                name, length, maximum)
        return 0, None

    def _reply_header(self, handle, error, message):
        """Return an error reply to a refused request."""
        if not self.structured:
            return _SIMPLE_REPLY.pack(c.NBD_SIMPLE_REPLY_MAGIC, error, handle)
        return self._chunk_buffers(ErrorReply(handle, error, message,
                                              done=True))[0]

    def _send_reply(self, event):
        buffers = self._chunk_buffers(event)
        self._reply(event, LocalProtocolError)
        return buffers

    @staticmethod
    def _chunk_buffers(event):
        """Encode a reply event; bulk data stays a separate buffer."""
        if isinstance(event, (SimpleReply, ReadReply)):
            header = _pack(_SIMPLE_REPLY, c.NBD_SIMPLE_REPLY_MAGIC,
                           getattr(event, 'error', 0), event.handle)
            return [header, event.data] if isinstance(
                event, ReadReply) else [header]
        flags = c.NBD_REPLY_FLAG_DONE if event.done else 0
        if isinstance(event, ChunkData):
            return [_pack(_CHUNK, c.NBD_STRUCTURED_REPLY_MAGIC, flags,
                          c.NBD_REPLY_TYPE_OFFSET_DATA, event.handle,
                          8 + len(event.data)) +
                    _pack(_U64, event.offset), event.data]
        if isinstance(event, ChunkHole):
            kind = c.NBD_REPLY_TYPE_OFFSET_HOLE
            payload = _pack(_HOLE, event.offset, event.length)
        elif isinstance(event, BlockStatusReply):
            kind = c.NBD_REPLY_TYPE_BLOCK_STATUS
            values = list(itertools.chain.from_iterable(event.extents))
            payload = _pack(struct.Struct('>%dI' % (1 + len(values))),
                            event.context_id, *values)
        elif isinstance(event, ErrorReply):
            message = _encode(event.message)
            payload = _pack(_ERROR, event.error, len(message)) + message
            kind = c.NBD_REPLY_TYPE_ERROR
            if event.offset is not None:
                kind = c.NBD_REPLY_TYPE_ERROR_OFFSET
                payload += _pack(_U64, event.offset)
        else:
            kind, payload = c.NBD_REPLY_TYPE_NONE, b''
        return [_pack(_CHUNK, c.NBD_STRUCTURED_REPLY_MAGIC, flags, kind,
                      event.handle, len(payload)) + payload]
