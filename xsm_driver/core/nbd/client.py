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

"""An NBD client with many requests in flight.

Any number of threads may call it at once: each request is sent under a
lock, from the caller's thread. Replies (in any order) are read by the
threads that wait for them, one at a time: the first waiter reads the
socket and completes every request whose reply it finds until its own is
complete, the others sleep until theirs is, or until the reading is
handed over to them. A caller alone in flight thus reads its own reply,
and no other thread wakes up for it. ``aio_*`` methods return a
:class:`Pending` so that one thread can keep several requests in flight;
the plain methods wait. Replies are read while someone waits, and also,
by a thread of its own, while a request whose reply may be large (a read,
a block status) is in flight and another is being sent: such a reply left
unread would stop the server reading, and so block that send.

A request may be sent with a *deadline* (``aio_pwrite(..., deadline=D)``):
a sender blocked past it (a server that stopped reading, a link whose
buffers are full) does not block its caller longer. The connection is
then failed and shut down, so that no other frame ever follows the one
left half sent, and every request in flight fails (ETIMEDOUT).
"""

import errno
import logging
import select
import socket
import ssl
import threading
import time

from xsm_driver.core import exception
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p
from xsm_driver.core.nbd import wire

LOG = logging.getLogger(__name__)

#: the names of a client's own threads: the one that reads a large reply
#: nobody waits for, and the watchdog of a send's deadline
RESCUE_THREAD = 'xsm-nbd-client'
WATCHDOG_THREAD = 'xsm-nbd-send-deadline'
THREADS = (RESCUE_THREAD, WATCHDOG_THREAD)


class NBDError(exception.XSMError):
    """A request or the connection failed; ``errno`` says how."""

    msg_fmt = "NBD %(where)s: %(reason)s"

    def __init__(self, message=None, errno=errno.EIO, **kwargs):
        super().__init__(message, **kwargs)
        self.errno = errno


class TLSRefused(NBDError):
    """The server answered NBD_OPT_STARTTLS with an error.

    ``reply`` is its ``NBD_REP_ERR_*`` code: xapi-nbd serving a network
    with the ``insecure_nbd`` purpose answers ``NBD_REP_ERR_POLICY``
    (xapi-project/nbd lib/server.ml, ``connect``: STARTTLS on a clear-text
    channel).
    """

    def __init__(self, message=None, reply=None, **kwargs):
        super().__init__(message, errno=errno.EPROTO, **kwargs)
        self.reply = reply


class Pending:
    """A request in flight; :meth:`wait` returns its result."""

    def __init__(self, kind, offset=0, length=0):
        self.kind = kind
        self.offset = offset
        self.buffer = bytearray(length) if kind == 'read' else None
        self.extents = []
        self.error = None
        self.done = False
        #: the client that sent it (its waiter may read the replies)
        self.client = None
        # released when the request is complete, or when its waiter is to
        # read the replies (see Client._await)
        self._wake = threading.Lock()
        self._wake.acquire()

    def finish(self, error=None):
        """Complete the request; call it under its client's core lock."""
        if error is not None and self.error is None:
            self.error = error
        self.done = True
        self.signal()

    def signal(self):
        """Wake the waiter up; call it under its client's core lock.

        (Every release happens under that lock, so ``locked()`` cannot
        change between the test and the release; a stale release only
        makes a later sleep return early, which its loop allows for.)
        """
        if self._wake.locked():
            self._wake.release()

    def wait(self, timeout=None):
        """Wait for the reply.

        :returns: the data of a read, the extents of a block status
            request (``[(length, flags), ...]``), else None.
        :raises NBDError: the server answered with an error, the
            connection broke, or ``timeout`` expired.
        """
        if not self.done and self.client is not None:
            self.client._await(self, None if timeout is None
                               else time.monotonic() + timeout)
        if not self.done:
            raise NBDError(where=self.kind, errno=errno.ETIMEDOUT,
                           reason='no reply within %s s' % timeout)
        if self.error is not None:
            raise self.error
        if self.kind == 'read':
            return self.buffer
        if self.kind == 'block status':
            return self.extents
        return None


def _set_user_timeout(sock, seconds):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probe = max(1, int(seconds) // 3)
    for name, value in (('TCP_KEEPIDLE', probe), ('TCP_KEEPINTVL', probe),
                        ('TCP_KEEPCNT', 3),
                        ('TCP_USER_TIMEOUT', int(seconds * 1000))):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


#: requests and replies up to this size go out in one send (and one TLS
#: record): a write header and its payload arrive together at the server
_JOIN_UP_TO = 64 * 1024
#: requests whose replies may fill the socket buffers
_LARGE_REPLIES = ('read', 'block status')


def _shutdown(sock):
    """shutdown(2) ``sock`` at once, whatever other threads do with it.

    Their blocked ``recv``/``send`` return (end of stream, EPIPE): with a
    native thread in the kernel's call, and with an eventlet green thread
    waiting in the hub for the descriptor to become ready. Not
    ``SSLSocket.shutdown``, which drops the TLS state under the feet of a
    thread still using it (its next read raises ValueError); and not
    through ``socket.socket``, which is eventlet's wrapper class, without a
    ``shutdown`` of its own, in a monkey-patched process.
    """
    try:
        if isinstance(sock, ssl.SSLSocket):
            socket.SocketType.shutdown(sock, socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Client:
    """A connection to one export of an NBD server.

    :param host: server address.
    :param port: server port.
    :param export: export name.
    :param tls_context: a client :class:`ssl.SSLContext` to require TLS.
    :param server_hostname: name to check the server certificate against
        (default: ``host``).
    :param timeout: seconds for connecting and each handshake step; also
        the default wait of the blocking methods.
    :param user_timeout: seconds sent data may stay unacknowledged before
        the kernel gives up on the connection (``TCP_USER_TIMEOUT``, with
        keep-alives): a dead link then fails every request instead of
        blocking a sender for the minutes TCP retries by default.
    :param label: the name in messages and logs (default
        ``nbd://HOST:PORT/EXPORT``); give one when the export name is a
        secret.
    """

    def __init__(self, host, port, export='', tls_context=None,
                 server_hostname=None, timeout=30.0,
                 max_payload=p.MAX_PAYLOAD, user_timeout=None, label=None):
        self.host, self.port, self.export = host, port, export
        self.name = label or 'nbd://%s:%d/%s' % (host, port, export)
        self._tls = tls_context
        self._server_hostname = server_hostname or host
        self.timeout = timeout
        self.user_timeout = user_timeout
        self.conn = p.ClientConnection(max_payload=max_payload)
        self._core = threading.Lock()
        self._send = threading.Lock()
        self._pending = {}
        self._failure = None
        self._sock = None
        self._closing = False
        # replies (see _await): whether a thread reads the socket, the
        # other waiters (in order), the rescue thread (see _rescue_loop)
        # and its call, the reader's stepping down (for close), the
        # receive buffer, the part of a reply's payload still to receive,
        # and a poll object for deadlines
        self._reading = False
        self._parked = {}
        self._rescuer = None
        self._rescue_call = threading.Condition(self._core)
        self._stepped_down = threading.Condition(self._core)
        self._rbuf = memoryview(bytearray(wire.RECV_BUFFER))
        self._payload_rest = None
        self._poll = None
        # the send deadline watchdog (see _watch_loop)
        self._watch = threading.Condition(threading.Lock())
        self._watcher = None
        self._watch_at = None          # when the watchdog wakes next
        self._watch_span = None        # seconds of the last deadline
        self._send_deadline = None     # of the send in progress, if any
        self.size = None
        self.flags = 0
        self.structured = False
        self.max_request = max_payload

    # -- connecting -------------------------------------------------------

    def connect(self):
        """Connect and negotiate; returns self.

        Negotiates TLS (when a context was given), structured replies and
        the base:allocation context, then enters transmission.
        """
        try:
            self._sock = socket.create_connection((self.host, self.port),
                                                  timeout=self.timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.user_timeout:
                _set_user_timeout(self._sock, self.user_timeout)
            self._negotiate()
        except (OSError, ssl.SSLError) as exc:
            self._close_socket()
            raise NBDError(where=self.name, errno=getattr(exc, 'errno', None)
                           or errno.ECONNREFUSED, reason=str(exc))
        except p.NBDProtocolError as exc:
            self._close_socket()
            raise NBDError(where=self.name, errno=errno.EPROTO,
                           reason=str(exc))
        except BaseException:
            self._close_socket()
            raise
        self._sock.settimeout(None)
        # select.poll has no descriptor limit; eventlet's green select
        # module has no poll, only select (which it serves from its hub)
        if hasattr(select, 'poll'):
            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN)
        return self

    def _handshake_event(self):
        while True:
            event = self.conn.next_event()
            out = self.conn.data_to_send()
            if out:
                self._sock.sendall(out)
            if event is not p.NEED_DATA:
                return event
            got = self._sock.recv_into(self._rbuf)
            self.conn.receive_data(self._rbuf[:got])

    def _option(self, event):
        self._sock.sendall(self.conn.send(event))
        return self._handshake_event()

    def _negotiate(self):
        self._handshake_event()                       # the greeting
        if self._tls is not None:
            answer = self._option(p.StartTLSRequest())
            if not isinstance(answer, p.StartTLS):
                raise TLSRefused(where=self.name,
                                 reply=getattr(answer, 'reply', None),
                                 reason='the server refused TLS: %s'
                                 % (getattr(answer, 'message', '') or
                                    answer))
            self._sock = self._tls.wrap_socket(
                self._sock, server_hostname=self._server_hostname)
        answer = self._option(p.StructuredReplyRequest())
        self.structured = isinstance(answer, p.OptionAck)
        if self.structured:
            self._option(p.SetMetaContextRequest(self.export))
        answer = self._option(p.GoRequest(self.export,
                                          (c.NBD_INFO_BLOCK_SIZE,)))
        if isinstance(answer, p.OptionError) and \
                answer.reply == c.NBD_REP_ERR_UNSUP:
            # xapi-nbd knows only NBD_OPT_EXPORT_NAME, ABORT, LIST and
            # STARTTLS (xapi-project/nbd lib/server.ml, connect): choose
            # the export the old way; no structured replies, no block
            # status, so a copy reads every block.
            LOG.info('%s: the server does not know NBD_OPT_GO; choosing '
                     'the export with NBD_OPT_EXPORT_NAME', self.name)
            answer = self._option(p.ExportNameRequest(self.export))
        if not isinstance(answer, p.ExportChosen):
            raise NBDError(where=self.name, errno=errno.ENOENT,
                           reason='the server refused the export: %s'
                           % getattr(answer, 'message', answer))
        self.size, self.flags = answer.size, answer.flags
        if answer.block_sizes:
            self.max_request = min(self.max_request, answer.block_sizes[2])

    @property
    def has_allocation_map(self):
        return bool(self.conn.meta_contexts)

    def can(self, flag):
        """Whether the export advertises transmission flag ``flag``."""
        return bool(self.flags & flag)

    # -- requests ---------------------------------------------------------

    def _submit(self, pending, make_event, deadline=None):
        """Send a request; its reply completes ``pending``.

        :param deadline: ``time.monotonic()`` value by which the request
            must be on its way: waiting for the send lock past it fails
            this request alone (nothing was sent); a send still blocked
            at it fails the connection (see :meth:`_expire_send`).
        """
        if deadline is None:
            self._send.acquire()
        elif not self._send.acquire(timeout=max(
                0.0, deadline - time.monotonic())):
            raise NBDError(where=self.name, errno=errno.ETIMEDOUT,
                           reason='%s not sent: another request is still '
                           'being sent' % pending.kind)
        try:
            with self._core:
                if self._failure is not None:
                    raise self._failure
                handle = self.conn.new_handle()
                try:
                    buffers = self.conn.send_buffers(make_event(handle))
                except p.LocalProtocolError as exc:
                    raise NBDError(where=self.name, errno=errno.EINVAL,
                                   reason=str(exc))
                if self._pending and not self._reading:
                    self._rescue_if_needed()
                self._pending[handle] = pending
                pending.client = self
            if deadline is not None:
                self._watch_send(deadline)
            try:
                self._write(buffers)
            except (OSError, ssl.SSLError) as exc:
                self._fail(NBDError(where=self.name, errno=errno.EPIPE,
                                    reason='connection lost: %s' % exc))
            finally:
                if deadline is not None:
                    self._unwatch_send()
        finally:
            self._send.release()
        return pending

    def _write(self, buffers):
        total = sum(len(b) for b in buffers)
        if len(buffers) > 1 and total <= _JOIN_UP_TO:
            buffers = [b''.join(buffers)]
        for buf in buffers:
            self._sock.sendall(buf)

    # -- send deadlines ---------------------------------------------------
    #
    # One watchdog thread per client, started with the first deadline. A
    # sender wakes it only when its deadline comes before the watchdog's
    # next wake-up; otherwise announcing a send costs two uncontended lock
    # operations. The watchdog sleeps one timeout at a time (the last one
    # announced), so with a steady stream of requests it wakes about once
    # per timeout, never once per request.

    def _watch_send(self, deadline):
        with self._watch:
            self._send_deadline = deadline
            self._watch_span = max(deadline - time.monotonic(), 0.001)
            if self._watcher is None:
                self._watch_at = deadline
                self._watcher = threading.Thread(
                    target=self._watch_loop, daemon=True,
                    name=WATCHDOG_THREAD)
                self._watcher.start()
            elif self._watch_at > deadline:
                self._watch_at = deadline
                self._watch.notify()

    def _unwatch_send(self):
        with self._watch:
            self._send_deadline = None
            if self._failure is not None:
                self._watch.notify()        # its watch may end

    def _watch_loop(self):
        with self._watch:
            while not self._closing:
                now = time.monotonic()
                deadline = self._send_deadline
                if deadline is None and self._failure is not None:
                    return          # failed: nothing will be sent again
                if deadline is not None and now >= deadline:
                    self._send_deadline = None
                    self._watch.release()
                    try:
                        self._expire_send()
                    finally:
                        self._watch.acquire()
                    continue
                if deadline is None:
                    # no send in progress: any later one ends later
                    deadline = now + self._watch_span
                self._watch_at = deadline
                self._watch.wait(deadline - now)

    def _expire_send(self):
        """A send outlived its deadline: fail the connection, unblock it.

        The frame it was sending may be cut short on the wire; nothing
        else is ever sent on this connection (the failure is recorded
        first), and the shutdown ends the blocked send.
        """
        self._fail(NBDError(where=self.name, errno=errno.ETIMEDOUT,
                            reason='a request could not be sent in time: '
                            'the server is not reading'))
        sock = self._sock
        if sock is not None:
            _shutdown(sock)

    def _chunks(self, offset, length):
        step = self.max_request
        return [(pos, min(step, offset + length - pos))
                for pos in range(offset, offset + length, step)]

    def aio_pread(self, offset, length, flags=0):
        return self._submit(Pending('read', offset, length),
                            lambda h: p.ReadRequest(h, offset, length, flags))

    def aio_pwrite(self, data, offset, fua=False, deadline=None):
        """Send a write (at most :attr:`max_request` bytes) now.

        :param deadline: ``time.monotonic()`` value past which the caller
            is not kept blocked by the send (see the module docstring).
        :returns: a :class:`Pending`.
        """
        flags = c.NBD_CMD_FLAG_FUA if fua else 0
        return self._submit(Pending('write'), lambda h: p.WriteRequest(
            h, offset, data, flags), deadline)

    def pread(self, offset, length):
        if length <= self.max_request:
            return self.aio_pread(offset, length).wait(self.timeout)
        buf = bytearray(length)
        pendings = [(pos - offset, self.aio_pread(pos, n))
                    for pos, n in self._chunks(offset, length)]
        for at, pending in pendings:
            data = pending.wait(self.timeout)
            buf[at:at + len(data)] = data
        return buf

    def pwrite(self, data, offset, fua=False):
        view = memoryview(data).cast('B')
        pendings = [self.aio_pwrite(view[pos - offset:pos - offset + n],
                                    pos, fua)
                    for pos, n in self._chunks(offset, len(view))]
        for pending in pendings:
            pending.wait(self.timeout)

    def flush(self):
        self._submit(Pending('flush'),
                     lambda h: p.FlushRequest(h)).wait(self.timeout)

    def trim(self, offset, length):
        self._submit(Pending('trim'), lambda h: p.TrimRequest(
            h, offset, length)).wait(self.timeout)

    def zero(self, offset, length, may_trim=False):
        flags = 0 if may_trim else c.NBD_CMD_FLAG_NO_HOLE
        self._submit(Pending('write zeroes'), lambda h: p.WriteZeroesRequest(
            h, offset, length, flags)).wait(self.timeout)

    def block_status(self, offset, length):
        """``[(length, flags), ...]`` of base:allocation from ``offset``.

        The server may describe less (or, for the last extent, more) than
        asked for.
        """
        if not self.has_allocation_map:
            return [(length, 0)]
        length = min(length, 0xFFFFFFFF)
        return self._submit(Pending('block status'),
                            lambda h: p.BlockStatusRequest(
                                h, offset, length)).wait(self.timeout)

    # -- replies ----------------------------------------------------------

    def _await(self, pending, deadline):
        """Wait until ``pending`` is complete or ``deadline`` has passed.

        The first waiter reads the replies; the others sleep (parked, in
        order) until their request is complete or the reading is handed
        over to them, when the reader's own request is complete or its
        deadline passed.
        """
        while True:
            with self._core:
                if pending.done:
                    return
                lead = not self._reading
                if lead:
                    self._reading = True
                else:
                    self._parked[pending] = None
            if lead:
                try:
                    self._read_replies(lambda: pending.done, deadline)
                finally:
                    with self._core:
                        self._reading = False
                        self._hand_over()
                return
            left = -1 if deadline is None else max(
                0.0, deadline - time.monotonic())
            woken = pending._wake.acquire(timeout=left)
            with self._core:
                self._parked.pop(pending, None)
                if not woken:
                    self._hand_over()
                    return

    def _hand_over(self):
        """Wake a parked waiter up to read, if nobody reads (core held)."""
        if not self._reading:
            self._stepped_down.notify_all()
            if self._parked:
                next(iter(self._parked)).signal()
            else:
                self._rescue_if_needed()

    def _large_in_flight(self):
        return any(q.kind in _LARGE_REPLIES for q in self._pending.values())

    def _rescue_if_needed(self):
        """Nobody reads: call the rescuer when a large reply is due.

        (Core held.) Such a reply left unread fills the socket buffers
        and stops the server reading: a send would then block for ever.
        """
        if not self._large_in_flight():
            return
        if self._rescuer is None:
            self._rescuer = threading.Thread(target=self._rescue_loop,
                                             daemon=True,
                                             name=RESCUE_THREAD)
            self._rescuer.start()
        else:
            self._rescue_call.notify()

    def _rescue_loop(self):
        """Read while a large reply is due and nobody else reads."""
        def settled():
            with self._core:
                return not self._large_in_flight()

        with self._core:
            while True:
                self._rescue_call.wait_for(
                    lambda: self._closing or self._failure is not None or (
                        not self._reading and self._large_in_flight()))
                if self._closing or self._failure is not None:
                    return
                self._reading = True
                self._core.release()
                try:
                    self._read_replies(settled, None)
                finally:
                    self._core.acquire()
                    self._reading = False
                    self._hand_over()

    def _read_replies(self, done, deadline):
        """Read replies until ``done()`` is true or ``deadline`` passed."""
        try:
            while True:
                while True:
                    with self._core:
                        event = self.conn.next_event()
                    if event is p.NEED_DATA:
                        break
                    if isinstance(event, (p.ConnectionClosed, p.Disconnect)):
                        raise NBDError(where=self.name, errno=errno.ESHUTDOWN,
                                       reason='connection closed')
                    self._complete(event)
                if done() or not self._readable(deadline):
                    return
                if not self._receive():
                    raise NBDError(where=self.name, errno=errno.EPIPE,
                                   reason='the server closed the connection')
        except NBDError as exc:
            self._fail(exc)
        except p.NBDProtocolError as exc:
            self._fail(NBDError(where=self.name, errno=errno.EPROTO,
                                reason=str(exc)))
        except (OSError, ssl.SSLError) as exc:
            self._fail(NBDError(where=self.name, errno=errno.EPIPE,
                                reason='connection lost: %s' % exc))

    def _readable(self, deadline):
        """Whether there is something to receive before ``deadline``.

        Without a deadline the receive itself waits.
        """
        sock = self._sock
        if deadline is None or sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        left = max(0.0, deadline - time.monotonic())
        try:
            if self._poll is not None:
                return bool(self._poll.poll(left * 1000))
            return bool(select.select([sock], [], [], left)[0])
        except ValueError:          # closed under us: receive says so
            return True

    def _receive(self):
        """Receive more bytes for the core; False at the end of the stream.

        A payload goes straight into its own buffer (``recv_into``), other
        bytes through the client's buffer. A socket closed under the
        reader is the end of the stream too: a TLS socket without its TLS
        object raises ValueError, and a closed descriptor OSError (which
        :meth:`close` does not report).
        """
        sock = self._sock
        try:
            if sock is None:
                return False
            rest = self._payload_rest
            if rest is None:
                with self._core:
                    size = self.conn.expected_payload
                    if size:
                        rest = self.conn.payload_view(bytearray(size))
            if rest is None:
                got = sock.recv_into(self._rbuf)
                with self._core:
                    self.conn.receive_data(self._rbuf[:got])
                return bool(got)
            got = sock.recv_into(rest)
            with self._core:
                if not got:
                    self.conn.receive_data(b'')
                    return False
                self.conn.payload_received(got)
            self._payload_rest = rest[got:] if got < len(rest) else None
            return True
        except ValueError:
            return False
        except OSError:
            if self._closing:
                return False
            raise

    def _complete(self, event):
        with self._core:
            pending = self._pending.get(event.handle)
        if pending is None:
            return
        if isinstance(event, p.ReadReply):
            pending.buffer = event.data
        elif isinstance(event, p.ChunkData):
            at = event.offset - pending.offset
            pending.buffer[at:at + len(event.data)] = event.data
        elif isinstance(event, p.ChunkHole):
            at = event.offset - pending.offset
            pending.buffer[at:at + event.length] = bytes(event.length)
        elif isinstance(event, p.BlockStatusReply):
            pending.extents.extend(event.extents)
        elif isinstance(event, (p.ErrorReply, p.SimpleReply)) and \
                event.error:
            pending.error = NBDError(
                where=self.name, errno=event.error,
                reason='%s failed: %s' % (pending.kind, getattr(
                    event, 'message', '') or errno.errorcode.get(
                        event.error, event.error)))
        if event.done:
            with self._core:
                self._pending.pop(event.handle, None)
                self._parked.pop(pending, None)
                pending.finish()

    def _fail(self, error):
        with self._core:
            if self._failure is None:
                self._failure = error
            pending, self._pending = self._pending, {}
            for item in pending.values():
                self._parked.pop(item, None)
                item.finish(error)
            self._rescue_call.notify_all()
        with self._watch:
            self._watch.notify()
        if not isinstance(error, NBDError) or error.errno != errno.ESHUTDOWN:
            LOG.debug('%s: %s', self.name, error)

    # -- closing ----------------------------------------------------------

    def close(self):
        """Say goodbye (NBD_CMD_DISC) and close the connection.

        Every request in flight fails (ESHUTDOWN). The socket is shut down
        first, which ends a waiter's wait for data (a native or an eventlet
        green thread alike), and closed once no waiter reads it any more.
        A sender still blocked after :attr:`timeout` (a dead link) is not
        waited for: the goodbye is skipped and the shutdown fails its send.
        """
        sock = self._sock
        if sock is None:
            return
        self._closing = True
        wait = -1 if self.timeout is None else self.timeout
        if self._send.acquire(timeout=wait):
            try:
                with self._core:
                    ready = (self._failure is None and
                             self.conn.state is p.State.TRANSMISSION)
                    buffers = (self.conn.send_buffers(p.Disconnect())
                               if ready else [])
                self._write(buffers)
            except (OSError, ssl.SSLError, p.NBDProtocolError):
                pass
            finally:
                self._send.release()
        self._fail(NBDError(where=self.name, errno=errno.ESHUTDOWN,
                            reason='the client closed the connection'))
        _shutdown(sock)
        with self._watch:
            self._watch.notify_all()
        # nothing of the client's is left running once it is closed
        for thread in (self._rescuer, self._watcher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(self.timeout)
        with self._core:
            if not self._stepped_down.wait_for(lambda: not self._reading,
                                               self.timeout):
                LOG.warning('%s: a waiter still read the connection %s s '
                            'after its shutdown', self.name, self.timeout)
        self._close_socket()

    def abort(self):
        """Drop the connection now, without a goodbye.

        Every request in flight fails at once, and so does a sender blocked
        on a link that went dead; :meth:`close` still releases the rest.
        """
        # The failure first: the shutdown wakes the reader, whose end of
        # stream must not become the reason the requests fail with.
        self._fail(NBDError(where=self.name, errno=errno.ECONNABORTED,
                            reason='the connection was aborted'))
        sock = self._sock
        if sock is not None:
            _shutdown(sock)

    def _close_socket(self):
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()
