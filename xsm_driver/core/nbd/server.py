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

"""A threaded NBD server exporting block devices.

Each connection has a reader thread, which parses requests with the
sans-IO core and serves them itself as long as the device answers fast
(a read from the page cache costs less than handing it to another
thread); requests to a slow device, flushes and FUA requests go to a
small pool of workers of the connection, and replies go out in whatever
order they finish. An export is any object with the block
device interface (``size``, ``pread``, ``pwrite``, ``flush``, ``trim``,
``zero``, ``extents`` and the ``can_*`` probes); errors it raises are
answered with their ``errno`` (EIO when they have none).

A connection whose peer breaks the protocol, stalls in the handshake or
vanishes is closed with a logged reason; the others are not affected, and
no thread or file descriptor outlives its connection.

Bounds, so that a flood of connections (no credentials needed to open a
TCP connection) cannot take the server down or keep the legitimate client
out for long:

* at most ``max_connections`` connections: one more is closed as soon as
  it is accepted, counted in :attr:`Server.refused` and logged once per
  burst (not once per connection);
* at most ``max_handshakes`` of them still in the handshake (not yet
  serving an export, nor authenticated by a TLS client certificate): a
  new connection over that limit takes the place of one of them, which
  is closed (counted in :attr:`Server.evicted`, logged once per burst):
  the one that got least far, the oldest first (:func:`eviction_order`:
  a connection that never said a word goes before one that speaks NBD).
  A flood of connections that never finish their handshake thus keeps a
  bounded number of threads, and cannot keep out a client that does
  finish it (in milliseconds): refusing newcomers instead would lock the
  legitimate client out for as long as the flood lasts, and evicting the
  oldest whatever its progress would close the legitimate client whenever
  more than ``max_handshakes`` idle connections arrive during its
  handshake. :func:`admission` decides;
* the handshake, before and during TLS, must end within
  ``handshake_timeout`` seconds of the connection;
* once serving, a request that has begun to arrive (its header, or the
  data of a write) must arrive whole within ``request_timeout`` seconds,
  and no reply may stall for longer; a connection idle between requests
  is kept;
* a connection whose thread cannot be started is closed; the accept loop
  logs it once, pauses briefly (:data:`ACCEPT_PAUSE`) and goes on;
* :meth:`Server.stop` works whatever state the connections are in, and
  never waits more than :data:`STOP_TIMEOUT` for a connection's thread.
"""

import collections.abc
import concurrent.futures
import errno
import logging
import mmap
import os
import secrets
import socket
import ssl
import sys
import threading
import time

from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import protocol as p
from xsm_driver.core.nbd import wire

LOG = logging.getLogger(__name__)

# Defaults of the bounds (see the module's docstring). A process that runs
# migrations sets them from its [agent]nbd_* options with
# set_defaults(**xsm_driver.conf.agent.nbd_server_limits(conf)).
HANDSHAKE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0
MAX_CONNECTIONS = 256
MAX_HANDSHAKES = 64
# Seconds the accept loop pauses after it could not accept a connection or
# start its thread (out of descriptors, threads or memory): a moment for
# the shortage to pass, instead of failing in a tight loop.
ACCEPT_PAUSE = 0.2
# Seconds stop() waits for the thread of one connection (a device stuck in
# I/O may hold it); it goes on without it, with a warning.
STOP_TIMEOUT = 10.0
_NBD_ERRORS = {errno.EPERM: c.NBD_EPERM, errno.EIO: c.NBD_EIO,
               errno.ENOMEM: c.NBD_ENOMEM, errno.EINVAL: c.NBD_EINVAL,
               errno.ENOSPC: c.NBD_ENOSPC, errno.EDQUOT: c.NBD_ENOSPC,
               errno.EOVERFLOW: c.NBD_EOVERFLOW,
               errno.EOPNOTSUPP: c.NBD_ENOTSUP,
               errno.ESHUTDOWN: c.NBD_ESHUTDOWN}
_MAX_EXTENT = 0xFFFFF000            # extent lengths are uint32, keep aligned
# The reader of a connection serves a request itself (no hand-off to a
# worker thread, which costs more than a read from the page cache) unless
# the device is slow: after SLOW_IN_A_ROW requests in a row each took more
# than INLINE_BUDGET seconds plus its length at INLINE_RATE bytes/s, the
# next POOLED_RUN requests are handed to the connection's workers, so that
# a slow device has several of them in flight. (One slow request is no
# sign: waiting for the GIL alone sometimes takes milliseconds.) Flushes
# and FUA requests always go to the workers.
INLINE_BUDGET = 0.001
INLINE_RATE = 1e9
SLOW_IN_A_ROW = 2
POOLED_RUN = 64
# Write payloads of at least POOLED_PAYLOAD bytes are received into
# page-aligned buffers that a connection reuses: no new memory to zero and
# fault in for each request, and a device can hand them to O_DIRECT as they
# are. A buffer is a power of two bytes long and serves any payload that
# fits (as a view of its first bytes); a server keeps PAYLOAD_BUFFERS of
# them at most, whatever their sizes, for all its connections. (Kept per
# exact payload size, a sparse copy -- runs of every length from 64 KiB to
# 4 MiB -- left one buffer per length in each connection: 20 migrations of
# a 256 MiB disk peaked at ~280 MiB per agent instead of ~110. Kept per
# connection, the 32 connections of the copy of an 8-disk VM kept ~128 MiB.)
POOLED_PAYLOAD = 64 * 1024
PAYLOAD_BUFFERS = 8


def buffer_size(size):
    """The length of the pooled buffer a ``size``-byte payload goes into.

    The next power of two: a dozen sizes between 64 KiB and 32 MiB, so
    that payloads of similar lengths share buffers; the pages of a buffer
    a payload does not reach are never touched, so they cost no memory.
    """
    return 1 << max(size - 1, 0).bit_length()


class _Buffers:
    """Page-aligned payload buffers of one connection, reused.

    :meth:`get` returns a buffer of exactly the size asked for: an
    :class:`mmap.mmap` of that size, or a memoryview of the first bytes of
    a larger one. :meth:`put` takes it back only when nothing but the
    caller holds it any more -- neither the object nor any view derived
    from it (a device that kept one keeps its buffer: it is never written
    again) -- and keeps at most ``keep`` buffers, the largest ones.
    """

    def __init__(self, keep=PAYLOAD_BUFFERS):
        self._keep = keep
        self._free = []                    # mmaps, by increasing length
        self._lock = threading.Lock()

    def get(self, size):
        buf = None
        with self._lock:
            for i, free in enumerate(self._free):
                if len(free) >= size:      # the smallest that fits
                    buf = self._free.pop(i)
                    break
        if buf is None:
            buf = mmap.mmap(-1, buffer_size(size))
        return buf if len(buf) == size else memoryview(buf)[:size]

    def put(self, data):
        # 3: ``data`` here, the caller's name and getrefcount's argument.
        if sys.getrefcount(data) > 3:
            return False
        if type(data) is mmap.mmap:
            buf, data = data, None
            refs = 3           # ``buf``, the caller's name, getrefcount's
        elif type(data) is memoryview:
            try:
                buf = data.obj
                if type(buf) is not mmap.mmap:
                    return False
                # A view derived from ``data`` (a slice, memoryview(data))
                # shares its hold on ``buf``, which then outlives this.
                data.release()
            except (ValueError, BufferError):  # released, or exported now
                return False
            data = None
            refs = 2           # ``buf`` and getrefcount's argument
        else:
            return False
        if sys.getrefcount(buf) > refs:
            return False
        return self._keep_buffer(buf)

    def close(self):
        """Unmap every free buffer, and keep none from now on.

        A stopped server's pool: its memory goes back at once, although
        the server itself lives on until the garbage collector's next full
        pass (each connection's protocol core refers to the server, and
        keeps itself alive through its dispatch tables of bound methods).
        A buffer still in use is dropped when it comes back.
        """
        with self._lock:
            self._keep = 0
            free, self._free = self._free, []
        for buf in free:
            buf.close()

    def _keep_buffer(self, buf):
        with self._lock:
            free = self._free
            if len(free) >= self._keep:
                if not free or len(free[0]) >= len(buf):
                    return False
                free.pop(0)                # make room: drop the smallest
            i = 0
            while i < len(free) and len(free[i]) < len(buf):
                i += 1
            free.insert(i, buf)
        return True


def export_flags(dev):
    """Transmission flags that describe what ``dev`` can do."""
    flags = c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_CAN_MULTI_CONN
    for probe, flag in (('can_flush', c.NBD_FLAG_SEND_FLUSH),
                        ('can_fua', c.NBD_FLAG_SEND_FUA),
                        ('can_trim', c.NBD_FLAG_SEND_TRIM),
                        ('can_zero', c.NBD_FLAG_SEND_WRITE_ZEROES)):
        if getattr(dev, probe, False):
            flags |= flag
    if not getattr(dev, 'can_write', False):
        flags |= c.NBD_FLAG_READ_ONLY
    return flags


def set_defaults(max_connections=None, max_handshakes=None,
                 handshake_timeout=None, request_timeout=None):
    """Set the bounds of servers made without them (None: leave as is).

    A process that runs migrations calls this with its ``[agent]nbd_*``
    options (``xsm_driver.conf.agent.nbd_server_limits``), so that the
    servers its migrations make follow them.
    """
    g = globals()
    for name, value in (('MAX_CONNECTIONS', max_connections),
                        ('MAX_HANDSHAKES', max_handshakes),
                        ('HANDSHAKE_TIMEOUT', handshake_timeout),
                        ('REQUEST_TIMEOUT', request_timeout)):
        if value is not None:
            g[name] = value


ADMIT, REFUSE, EVICT = 'admit', 'refuse', 'evict'


def admission(connections, handshaking, max_connections, max_handshakes):
    """What to do with a new connection: ADMIT, REFUSE or EVICT.

    EVICT: admit it, and close the oldest connection still in the
    handshake to make room.

    :param connections: connections the server has now.
    :param handshaking: how many of them are still in the handshake.

    >>> admission(3, 1, 4, 2)
    'admit'
    >>> admission(4, 0, 4, 2)
    'refuse'
    >>> admission(3, 2, 4, 2)
    'evict'
    """
    if connections >= max_connections:
        return REFUSE
    if handshaking >= max_handshakes:
        return EVICT
    return ADMIT


# How far a connection got in its handshake (_Handler.progress)
SILENT, SPOKE, AUTHENTICATED = 0, 1, 2


def eviction_order(progress, accepted):
    """Sort key of the connections a newcomer may take the place of.

    The least advanced goes first (a connection that never sent a byte
    before one that speaks NBD), the oldest first among equals.
    Connections authenticated by a TLS client certificate are never
    candidates.

    >>> sorted([(SPOKE, 1.0), (SILENT, 3.0), (SILENT, 2.0)],
    ...        key=lambda h: eviction_order(*h))
    [(0, 2.0), (0, 3.0), (1, 1.0)]
    """
    return (progress, accepted)


class _Burst:
    """Connections closed over a limit, logged once per burst.

    The first one of a burst is logged (WARNING); the ones after it are
    only counted, until the burst ends (:meth:`end`): then one line (INFO)
    says how many there were.
    """

    def __init__(self, what, limit):
        self.total = 0
        self._burst = 0
        self._what = what                  # 'refusing new connections'
        self._limit = limit                # 'max_connections'

    def hit(self, where, value):
        self.total += 1
        self._burst += 1
        if self._burst == 1:
            LOG.warning('NBD server %s: %s: %s (%d) reached (counted, '
                        'not logged, until the burst ends)', where,
                        self._what, self._limit, value)

    def end(self, where):
        if self._burst:
            LOG.info('NBD server %s: %s: burst over, %d in all',
                     where, self._what, self._burst)
            self._burst = 0


def peer_name(peer):
    """A client's name in logs: ``host:port``, or ``unix`` (no name)."""
    if isinstance(peer, (tuple, list)):
        return '%s:%d' % tuple(peer[:2])
    return 'unix:%s' % peer if peer else 'unix'


def unix_listener(path):
    """A listening unix socket at ``path``, mode 0600 from the start.

    A stale socket file (its server gone: nobody answers) is replaced; a
    live one is refused (``OSError`` EADDRINUSE), as a TCP port in use.
    """
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)                # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, 'NBD unix socket in use', path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    try:
        # No one can connect before listen(): no window with a wider mode.
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    return sock


def unguessable_name():
    """An export name for one migration: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


class _ExportTable(collections.abc.Mapping):
    """The server's devices seen as :class:`protocol.Export` entries.

    With ``listed`` false, NBD_OPT_LIST shows nothing: a client must know
    the name it asks for. ``pinned`` holds the device one connection has
    chosen (NBD_OPT_GO), which it keeps seeing even after the server
    stopped offering it (a one-shot export, :meth:`Server.remove_export`).
    """

    def __init__(self, devices, max_payload, listed=True, pinned=None):
        self._devices = devices
        self._max_payload = max_payload
        self._listed = listed
        self.pinned = pinned if pinned is not None else {}

    def for_connection(self):
        """A view of this table for one connection."""
        return _ExportTable(self._devices, self._max_payload, self._listed,
                            pinned={})

    def device(self, name):
        dev = self.pinned.get(name)
        return dev if dev is not None else self._devices[name]

    def __getitem__(self, name):
        dev = self.device(name)
        return p.Export(size=dev.size, flags=export_flags(dev),
                        description=getattr(dev, 'description', ''),
                        block_sizes=(1, 4096, self._max_payload))

    def __iter__(self):
        return iter(list(self._devices) if self._listed else [])

    def __len__(self):
        return len(self._devices) if self._listed else 0


class _ServerConnection(p.ServerConnection):
    """The protocol core, with NBD_OPT_GO claiming its export.

    A successful GO pins the device it chose in the connection's table,
    and takes a one-shot export off the server's table in the same step
    (under the server's lock), so that two clients racing for it cannot
    both win: the loser is answered as for an unknown export.
    """

    def __init__(self, server, exports, **kwargs):
        super().__init__(exports, **kwargs)
        self._server = server
        #: the chosen export is a one-shot one: its name is a secret
        self.one_shot = False

    def _refuse(self, event, reply, message):
        # The name a client asked for may be a one-shot secret (a replayed
        # or mistyped one): it goes neither to the log nor back.
        name = getattr(event, 'name', None)
        if name:
            message = message.replace(repr(name), '(name withheld)')
        return super()._refuse(event, reply, message)

    def _answer_info(self, event):
        if not isinstance(event, p.GoRequest):
            return super()._answer_info(event)
        claimed = self._server._claim(event.name)
        if claimed is None:
            return self._refuse(event, c.NBD_REP_ERR_UNKNOWN,
                                'no export named %r' % event.name)
        dev, once = claimed
        self.one_shot = once
        self.exports.pinned[event.name] = dev
        try:
            return super()._answer_info(event)
        except BaseException:
            del self.exports.pinned[event.name]
            if once:
                self._server._unclaim(event.name, dev)
            raise


class Server:
    """Serve block devices over NBD.

    :param exports: mapping of export name to block device.
    :param host: address to listen on.
    :param port: TCP port (0 picks a free one; see :attr:`address`).
    :param path: listen on this unix socket instead of TCP (the agent's
        exports to its local QEMU guests); ``host`` and ``port`` are then
        unused. Every bound below applies the same way; the socket file
        is made with mode 0600 and removed by :meth:`stop`.
    :param tls_context: a server :class:`ssl.SSLContext`; when given, TLS
        is required before any export is shown.
    :param workers: requests of one connection served in parallel.
    :param max_payload: largest read or write accepted.
    :param list_exports: answer NBD_OPT_LIST with the export names; a
        server started for a migration does not.
    :param max_connections: connections at once; more are closed at once.
    :param max_handshakes: connections at once still in the handshake.
    :param handshake_timeout: seconds a connection has to finish the
        handshake, TLS included.
    :param request_timeout: seconds a request that has begun to arrive
        has to arrive whole (and a reply to go out).

    The bounds left None take the module's defaults (:func:`set_defaults`)
    when a connection comes.
    """

    def __init__(self, exports, host='127.0.0.1', port=0, tls_context=None,
                 workers=8, max_payload=p.MAX_PAYLOAD, list_exports=True,
                 max_connections=None, max_handshakes=None,
                 handshake_timeout=None, request_timeout=None,
                 path=None):
        self._devices = dict(exports)
        self._once = set()                 # names of one-shot exports
        self._exports_lock = threading.Lock()
        self._table = _ExportTable(self._devices, max_payload, list_exports)
        self._host, self._port = host, port
        self._path = path
        self._tls = tls_context
        self._workers = workers
        self._max_payload = max_payload
        #: write payload buffers, reused by all connections
        self._buffers = _Buffers()
        self._lock = threading.Lock()
        self._handlers = set()
        self._listener = None
        self._thread = None
        self._watchdog = None
        self._stopping = threading.Event()
        self._max_connections = max_connections
        self._max_handshakes = max_handshakes
        self._handshake_timeout = handshake_timeout
        self._request_timeout = request_timeout
        self._refusals = _Burst('refusing new connections',
                                'max_connections')
        self._evictions = _Burst('closing the oldest connections still in '
                                 'the handshake', 'max_handshakes')
        self._thread_error = False         # logged since the last success

    @property
    def handshake_timeout(self):
        return (HANDSHAKE_TIMEOUT if self._handshake_timeout is None
                else self._handshake_timeout)

    @property
    def request_timeout(self):
        return (REQUEST_TIMEOUT if self._request_timeout is None
                else self._request_timeout)

    @property
    def refused(self):
        """Connections closed at once: max_connections was reached."""
        return self._refusals.total

    @property
    def evicted(self):
        """Connections closed in the handshake to make room for newer."""
        return self._evictions.total

    # -- life cycle ----------------------------------------------------------

    def start(self):
        if self._path is not None:
            self._listener = unix_listener(self._path)
        else:
            family = (socket.AF_INET6 if ':' in self._host
                      else socket.AF_INET)
            self._listener = socket.create_server(
                (self._host, self._port), family=family, backlog=64)
        self._thread = threading.Thread(target=self._accept_loop,
                                        name='xsm-nbd-accept', daemon=True)
        self._watchdog = threading.Thread(target=self._watch_loop,
                                          name='xsm-nbd-deadlines',
                                          daemon=True)
        try:
            self._thread.start()
            self._watchdog.start()
        except BaseException:
            self._stopping.set()
            self._listener.shutdown(socket.SHUT_RDWR)
            if self._thread.ident is not None:
                self._thread.join()
            self._listener.close()
            self._unlink()
            raise
        LOG.info('NBD server listening on %s (%s)', self.where,
                 'TLS' if self._tls else 'plain')
        return self

    @property
    def address(self):
        """``(host, port)``; the socket's path when on a unix socket."""
        if self._path is not None:
            return self._path
        return self._listener.getsockname()[:2]

    @property
    def unix(self):
        return self._path is not None

    @property
    def where(self):
        """Where it listens, for logs: ``host:port`` or ``unix:path``."""
        if self._path is not None:
            return 'unix:%s' % self._path
        return '%s:%d' % tuple(self.address)

    def _unlink(self):
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def stop(self):
        """Stop listening, close every connection, wait for the threads.

        Whatever state the connections are in (not yet started, in the
        handshake or TLS, mid-request, stuck in the device): each thread
        is waited for at most :data:`STOP_TIMEOUT` seconds.
        """
        self._stopping.set()
        if self._listener is not None:
            if self._path is not None:
                # (an eventlet green thread in accept() on a unix socket
                # does not wake on the shutdown below; a connection does)
                try:
                    with socket.socket(socket.AF_UNIX) as wake:
                        wake.settimeout(1.0)
                        wake.connect(self._path)
                except OSError:
                    pass
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # Closed only once the accept thread has left accept(): an eventlet
        # green thread waits for the descriptor in the hub, which never
        # hears of a descriptor closed under it (the shutdown wakes it).
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread.ident is not None:
                thread.join()
        if self._listener is not None:
            self._listener.close()
            self._unlink()
        with self._lock:
            handlers = list(self._handlers)
        for handler in handlers:
            handler.abort()
        deadline = time.monotonic() + STOP_TIMEOUT
        for handler in handlers:
            if not handler.join(max(deadline - time.monotonic(), 0.01)):
                LOG.warning('NBD client %s: its thread did not end within '
                            '%.0f s of stop(); going on without it',
                            handler.peer, STOP_TIMEOUT)
        self._buffers.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def connections(self):
        with self._lock:
            return len(self._handlers)

    # -- exports -------------------------------------------------------------

    def add_export(self, name, dev, once=False):
        """Offer ``dev`` as ``name``.

        :param once: a one-shot export: the first client whose NBD_OPT_GO
            for it succeeds takes it off the table, and every later
            NBD_OPT_GO or NBD_OPT_INFO with that name is answered as for
            an unknown export. The winning connection keeps serving.
            (NBD_OPT_EXPORT_NAME opens no export on this server: it is
            refused as an unsupported option, whatever the name.)
        """
        with self._exports_lock:
            if name in self._devices:
                raise ValueError('export %r already exists' % name)
            self._devices[name] = dev
            if once:
                self._once.add(name)

    def remove_export(self, name):
        """Stop offering an export; connections already using it go on."""
        with self._exports_lock:
            self._once.discard(name)
            return self._devices.pop(name)

    def _claim(self, name):
        """``(device, once)`` of ``name`` for an NBD_OPT_GO, or None.

        A one-shot export leaves the table here, atomically.
        """
        with self._exports_lock:
            if name in self._once:
                self._once.discard(name)
                return self._devices.pop(name), True
            dev = self._devices.get(name)
            return None if dev is None else (dev, False)

    def _unclaim(self, name, dev):
        """Put back a one-shot export whose NBD_OPT_GO failed after all."""
        with self._exports_lock:
            if name not in self._devices:
                self._devices[name] = dev
                self._once.add(name)

    # -- connections ---------------------------------------------------------

    def _accept_loop(self):
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # EMFILE, ENOBUFS...: the listener is fine, resources short
                LOG.warning('NBD server: accept failed: %s', exc)
                self._stopping.wait(ACCEPT_PAUSE)
                continue
            if self._stopping.is_set():         # (stop()'s wake-up call)
                self._drop(sock)
                return
            try:
                self._admit(sock, peer)
            except Exception as exc:       # the loop must never die
                self._drop(sock)
                if not self._thread_error:
                    LOG.error('NBD server %s: cannot serve a new '
                              'connection (%s: %s); closing it, pausing '
                              '%.1f s (logged once until one is served)',
                              self.where, type(exc).__name__, exc,
                              ACCEPT_PAUSE)
                self._thread_error = True
                self._stopping.wait(ACCEPT_PAUSE)

    @staticmethod
    def _drop(sock):
        try:
            sock.close()
        except OSError:
            pass

    def _admit(self, sock, peer):
        """Serve a new connection in its own thread, or close it at once."""
        max_conns = (MAX_CONNECTIONS if self._max_connections is None
                     else self._max_connections)
        max_hands = (MAX_HANDSHAKES if self._max_handshakes is None
                     else self._max_handshakes)
        victim = None
        with self._lock:
            waiting = [h for h in self._handlers
                       if not h.serving and not h.evicted and
                       h.progress < AUTHENTICATED]
            decision = admission(len(self._handlers), len(waiting),
                                 max_conns, max_hands)
            if decision == REFUSE:
                self._refusals.hit(self.where, max_conns)
            else:
                self._refusals.end(self.where)
            if decision == EVICT:
                victim = min(waiting, key=lambda h: eviction_order(
                    h.progress, h.accepted))
                victim.evicted = True
                self._evictions.hit(self.where, max_hands)
            elif decision == ADMIT:
                self._evictions.end(self.where)
        if decision == REFUSE:
            self._drop(sock)
            return
        if victim is not None:
            victim.abort()
        handler = _Handler(self, sock, peer)
        with self._lock:
            self._handlers.add(handler)
        try:
            handler.start()
        except BaseException:
            with self._lock:
                self._handlers.discard(handler)
            raise
        self._thread_error = False

    def _watch_loop(self):
        """Close serving connections past request_timeout.

        A request that has begun to arrive must arrive whole, and a reply
        be sent, within request_timeout; the serving sockets are blocking
        (see _Handler._run), so this thread looks at them a few times per
        timeout and shuts a late one down, which ends its blocked calls.
        """
        tick = min(1.0, self.request_timeout / 4.0)
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._lock:
                handlers = list(self._handlers)
            for handler in handlers:
                why = handler.expired(now)
                if why is not None and handler.timed_out is None:
                    handler.timed_out = why
                    handler.abort()

    def _forget(self, handler):
        with self._lock:
            self._handlers.discard(handler)


class _Handler:
    """One client connection."""

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer_name(peer)
        self.conn = _ServerConnection(
            server, server._table.for_connection(),
            tls='require' if server._tls else 'off',
            max_payload=server._max_payload)
        self._core = threading.Lock()      # guards self.conn
        self._send = threading.Lock()      # keeps replies whole on the wire
        self._slots = threading.BoundedSemaphore(server._workers * 2)
        self._pool = None
        self._buffers = server._buffers
        # what is not a write payload is received here, not into a new
        # buffer each time
        self._rbuf = memoryview(bytearray(wire.RECV_BUFFER))
        self._deadline = None              # end of the handshake
        self._request_timeout = server.request_timeout
        self._request_deadline = None      # end of the request arriving
        self._send_deadline = None         # end of the reply being sent
        #: why the watchdog closed the connection (a deadline passed)
        self.timed_out = None
        #: the handshake is over: an export is served (TLS authenticated)
        self.serving = False
        #: closed to make room for a newer connection (max_handshakes)
        self.evicted = False
        self.accepted = time.monotonic()
        #: SILENT, SPOKE or AUTHENTICATED (see eviction_order)
        self.progress = SILENT
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='xsm-nbd-' + self.peer)

    def start(self):
        self._thread.start()

    def join(self, timeout=None):
        """Wait for the thread; False if it is still running.

        A thread that was never started has nothing to wait for.
        """
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abort(self):
        sock = self.sock
        try:
            # shutdown(2) wakes the reader, a native or a green thread.
            # Not SSLSocket.shutdown: it would drop the TLS state under the
            # feet of the threads still using the socket. Nor through
            # socket.socket, eventlet's wrapper class when monkey-patched.
            if isinstance(sock, ssl.SSLSocket):
                socket.SocketType.shutdown(sock, socket.SHUT_RDWR)
            else:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _run(self):
        try:
            if self.sock.family != socket.AF_UNIX:
                self.sock.setsockopt(socket.SOL_SOCKET,
                                     socket.SO_KEEPALIVE, 1)
                self.sock.setsockopt(socket.IPPROTO_TCP,
                                     socket.TCP_NODELAY, 1)
            handshake_timeout = self.server.handshake_timeout
            self._deadline = time.monotonic() + handshake_timeout
            self.sock.settimeout(handshake_timeout)
            dev = self._negotiate()
            if dev is not None:
                self._deadline = None
                # Blocking from now on, set before the workers send: the
                # reader and the workers use the socket at once, which a
                # TLS socket in timeout (non-blocking) mode does not bear
                # (connections broke under load). The server's watchdog
                # enforces request_timeout instead (Server._watch_loop).
                self.sock.settimeout(None)
                self.serving = True
                self._transmit(dev)
        except socket.timeout:
            LOG.warning('NBD client %s closed: no handshake within %.0f s',
                        self.peer, handshake_timeout)
        except (p.RemoteProtocolError, OSError, ssl.SSLError) as exc:
            if self.timed_out is not None:
                LOG.warning('NBD client %s closed: %s', self.peer,
                            self.timed_out)
            elif self.server._stopping.is_set():
                LOG.info('NBD client %s closed: the server stopped',
                         self.peer)
            elif self.evicted:             # logged once for the burst
                LOG.debug('NBD client %s closed: evicted (max_handshakes)',
                          self.peer)
            elif isinstance(exc, p.RemoteProtocolError):
                LOG.warning('NBD client %s closed: %s', self.peer, exc)
            else:
                LOG.info('NBD client %s closed: %s', self.peer, exc)
        except Exception:
            LOG.exception('NBD client %s closed after an internal error',
                          self.peer)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            try:
                self.sock.close()
            finally:
                self.server._forget(self)

    # -- wire helpers --------------------------------------------------------

    def _write(self, buffers):
        if self.serving:
            self._send_deadline = time.monotonic() + self._request_timeout
        try:
            self._send_all(buffers)
        finally:
            self._send_deadline = None

    def _send_all(self, buffers):
        if isinstance(self.sock, ssl.SSLSocket):
            for buf in buffers:
                self.sock.sendall(buf)
            return
        views = [memoryview(b).cast('B') for b in buffers if len(b)]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _flush_core(self):
        # Only the reader produces core bytes; it takes the send lock only
        # when there is something to send, not after every request.
        with self._core:
            out = self.conn.data_to_send()
        if out:
            with self._send:
                self._write([out])

    def _handshake_time_left(self):
        """Bound the next socket call by what is left of the handshake."""
        if self._deadline is None:
            return
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('handshake deadline passed')
        self.sock.settimeout(left)

    def _track_request(self):
        """Start the clock of a request that has begun to arrive.

        Between requests (nothing of the next one received yet) the
        connection may idle for ever; a request that has begun must
        arrive whole within request_timeout (the watchdog, :meth:`expired`).
        """
        if not self.serving:
            return
        # ``_buf``: bytes of a request header the core holds, not yet whole
        with self._core:
            started = bool(self.conn.expected_payload or self.conn._buf)
        if not started:
            self._request_deadline = None
        elif self._request_deadline is None:
            self._request_deadline = time.monotonic() + self._request_timeout

    def expired(self, now):
        """Why this connection is past a deadline, or None (watchdog)."""
        if not self.serving:
            return None
        if self._request_deadline is not None and \
                now >= self._request_deadline:
            return ('a request did not arrive whole within %.0f s'
                    % self._request_timeout)
        if self._send_deadline is not None and now >= self._send_deadline:
            return ('a reply could not be sent within %.0f s'
                    % self._request_timeout)
        return None

    def _feed(self):
        self._handshake_time_left()
        self._track_request()
        with self._core:
            size = self.conn.expected_payload
        if not size:
            got = self.sock.recv_into(self._rbuf)
            if got and self.progress == SILENT:
                self.progress = SPOKE
            with self._core:
                self.conn.receive_data(self._rbuf[:got])
            return
        # A write payload: straight into a buffer, a reused one when it is
        # large, and the core is told once, when it is all there (over TLS
        # one recv_into returns one 16 KiB record).
        buf = (self._buffers.get(size) if size >= POOLED_PAYLOAD
               else bytearray(size))
        with self._core:
            view = self.conn.payload_view(buf)
        want, got = len(view), 0
        recv_into = self.sock.recv_into
        while got < want:
            n = recv_into(view[got:])
            if not n:
                with self._core:
                    self.conn.payload_received(got)
                    self.conn.receive_data(b'')
                return
            got += n
        with self._core:
            self.conn.payload_received(got)

    def _next(self):
        while True:
            with self._core:
                event = self.conn.next_event()
            self._flush_core()
            if event is not p.NEED_DATA:
                self._request_deadline = None
                return event
            self._feed()

    # -- phases --------------------------------------------------------------

    def _negotiate(self):
        self._flush_core()
        while True:
            event = self._next()
            if isinstance(event, p.StartTLS):
                # Publish the TLS socket before its handshake, so that
                # abort() can interrupt a peer stalled in it.
                self.sock = self.server._tls.wrap_socket(
                    self.sock, server_side=True,
                    do_handshake_on_connect=False)
                if self.server._stopping.is_set():
                    return None
                self._handshake_time_left()
                self.sock.do_handshake()
                if self.server._tls.verify_mode == ssl.CERT_REQUIRED:
                    # the peer proved a certificate of our CA: no flood
                    # of strangers can take its place any more
                    self.progress = AUTHENTICATED
            elif isinstance(event, p.ExportChosen):
                # A one-shot name is a secret: it stays out of the logs.
                LOG.debug('NBD client %s uses export %s', self.peer,
                          'a one-shot export' if self.conn.one_shot
                          else repr(event.name))
                return self.conn.exports.device(event.name)
            elif isinstance(event, (p.Disconnect, p.ConnectionClosed)):
                return None

    def _transmit(self, dev):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.server._workers,
            thread_name_prefix='xsm-nbd-io')
        pooled = 0          # requests still to hand to the pool
        slow = 0            # slow requests in a row served inline
        while True:
            event = self._next()
            if isinstance(event, (p.Disconnect, p.ConnectionClosed)):
                return
            if pooled or type(event) is p.FlushRequest or (
                    event.flags & c.NBD_CMD_FLAG_FUA):
                pooled = max(pooled - 1, 0)
                self._slots.acquire()
                # in a box the worker empties: then nothing but the worker
                # holds the request, and its buffer can be reused (this
                # thread lets go of it before the worker may start)
                box, event = [event], None
                self._pool.submit(self._serve_pooled, dev, box)
                box = None
                continue
            buf = event.data if type(event) is p.WriteRequest else None
            reply, took = self._run_request(dev, event)
            length, event = event.length, None
            if buf is not None:
                # back in the pool before the reply lets the client send
                # the next write: the buffers in use stay as many as the
                # client keeps in flight
                self._buffers.put(buf)
                buf = None
            self._reply(reply)
            reply = None
            if took <= INLINE_BUDGET + length / INLINE_RATE:
                slow = 0
            else:
                slow += 1
                if slow >= SLOW_IN_A_ROW:
                    pooled, slow = POOLED_RUN, 0

    def _serve_pooled(self, dev, box):
        req = box.pop()
        buf = req.data if type(req) is p.WriteRequest else None
        try:
            reply, _took = self._run_request(dev, req)
            req = None
            if buf is not None:
                self._buffers.put(buf)
                buf = None
            self._reply(reply)
        finally:
            req = buf = None
            self._slots.release()

    def _run_request(self, dev, req):
        """Execute a request.

        :returns: ``(its reply, the seconds the device took)``.
        """
        start = time.monotonic()
        try:
            reply = self._execute(dev, req)
        except Exception as exc:
            code = _NBD_ERRORS.get(getattr(exc, 'errno', None), c.NBD_EIO)
            if code == c.NBD_EIO and getattr(exc, 'errno', None) is None:
                LOG.exception('NBD export %s: request failed', dev)
            else:
                LOG.debug('NBD request %d failed: %s', req.handle, exc)
            reply = (p.ErrorReply(req.handle, code, str(exc)[:1024],
                                  done=True)
                     if self.conn.structured else
                     p.SimpleReply(req.handle, code))
        return reply, time.monotonic() - start

    def _reply(self, reply):
        """Send a reply (a connection that cannot take it is closed)."""
        try:
            with self._send:
                with self._core:
                    buffers = self.conn.send_buffers(reply)
                self._write(buffers)
        except (OSError, ssl.SSLError) as exc:
            LOG.debug('NBD client %s: reply lost: %s', self.peer, exc)
            self.abort()
        except p.NBDProtocolError as exc:
            LOG.debug('NBD client %s: no reply sent: %s', self.peer, exc)

    def _execute(self, dev, req):
        handle, structured = req.handle, self.conn.structured
        fua = bool(req.flags & c.NBD_CMD_FLAG_FUA)
        if type(req) is p.ReadRequest:
            data = dev.pread(req.offset, req.length)
            if structured:
                return p.ChunkData(handle, req.offset, data, done=True)
            return p.ReadReply(handle, data)
        if isinstance(req, p.WriteRequest):
            dev.pwrite(req.data, req.offset, fua)
        elif isinstance(req, p.FlushRequest):
            dev.flush()
        elif isinstance(req, p.TrimRequest):
            dev.trim(req.offset, req.length)
            if fua:
                dev.flush()
        elif isinstance(req, p.WriteZeroesRequest):
            dev.zero(req.offset, req.length,
                     may_trim=not req.flags & c.NBD_CMD_FLAG_NO_HOLE)
            if fua:
                dev.flush()
        elif isinstance(req, p.BlockStatusRequest):
            return p.BlockStatusReply(
                handle, next(iter(self.conn.meta_contexts)),
                self._status(dev, req), done=True)
        return p.SimpleReply(handle)

    @staticmethod
    def _status(dev, req):
        extents = []
        for _offset, length, flags in dev.extents(req.offset, req.length):
            while length:
                piece = min(length, _MAX_EXTENT)
                extents.append((piece, flags))
                length -= piece
            if req.flags & c.NBD_CMD_FLAG_REQ_ONE:
                return tuple(extents[:1])
        return tuple(extents)
