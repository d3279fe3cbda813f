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

"""Fuzz target: the threaded NBD server, over loopback, plain and TLS.

Two servers run for the whole session, one plain and one requiring TLS,
each with a well-behaved :class:`~xsm_driver.core.nbd.client.Client` on
its own connection. An input is one hostile client: it connects, sends
the input's bytes (after a prefix that reaches the options or the
transmission phase; for TLS, after a real STARTTLS and TLS handshake
with a trusted certificate, or garbage instead of the handshake) while
reading whatever the server answers, then closes with a FIN or a RST.
Checked:

* the server closes the hostile connection by itself after our FIN (no
  hang), within :data:`SETTLE` seconds;
* while it is served, the server never runs more threads than one
  reader and its workers for it; afterwards every thread and every
  connection it had is gone;
* Python allocations (every thread) stay under :data:`MEMORY`;
* the server logs no error (an internal error it caught is a crash);
* the good client on the same server still writes and reads back.

``python -m tests.fuzz.nbd_server [libFuzzer args]`` runs it
under atheris.
"""

import atexit
import os
import random
import select
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time

from tests.fuzz import common
from tests.fuzz import nbd_protocol
from xsm_driver.core.block import backends
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops

TARGET = 'nbd_server'
MiB = 1024 * 1024
DISK_SIZE = 16 * MiB               # the good client's VHD export
SCRATCH_SIZE = 1 * MiB             # the raw export hostile clients use
MAX_PAYLOAD = 1 * MiB
WORKERS = 4
SETTLE = 10.0
MEMORY = 64 * MiB
option = nbd_protocol.option
go_data = nbd_protocol.go_data
CLIENT_FLAGS = nbd_protocol.CLIENT_FLAGS
GO = option(c.NBD_OPT_GO, go_data('scratch'))
STRUCTURED = (option(c.NBD_OPT_STRUCTURED_REPLY) +
              option(c.NBD_OPT_SET_META_CONTEXT, go_data('scratch')[:-2] +
                     struct.pack('>II', 1, 15) + b'base:allocation') + GO)
# Where the hostile bytes start, after the greeting (plain) or after the
# TLS handshake (the client flags were sent in clear).
PLAIN_PREFIXES = (b'', CLIENT_FLAGS, CLIENT_FLAGS + GO,
                  CLIENT_FLAGS + STRUCTURED)
TLS_PREFIXES = (b'', GO, STRUCTURED, option(c.NBD_OPT_STARTTLS))


class HostileClient:
    """One connection that sends given bytes and reads all it gets."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=SETTLE)
        self.received = 0

    def recv_exact(self, size):
        buf = b''
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise EOFError('closed after %d of %d bytes'
                               % (len(buf), size))
            buf += chunk
        return buf

    def starttls(self, context):
        """Greeting, client flags and STARTTLS in clear, then TLS."""
        self.recv_exact(18)
        self.sock.sendall(CLIENT_FLAGS + option(c.NBD_OPT_STARTTLS))
        _magic, _opt, reply, length = struct.unpack(
            '>QIII', self.recv_exact(20))
        self.recv_exact(length)
        assert reply == c.NBD_REP_ACK, 'STARTTLS refused: 0x%x' % reply
        if context is not None:
            self.sock = context.wrap_socket(self.sock,
                                            server_hostname='localhost')

    def _read_some(self):
        """Read what is there; False once the server has closed."""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError,
                    BlockingIOError):
                return True
            except (ConnectionResetError, ssl.SSLError):
                return False
            if not data:
                return False
            self.received += len(data)
            if not (isinstance(self.sock, ssl.SSLSocket) and
                    self.sock.pending()):
                return True

    def run(self, chunks, ending, thread_limit):
        """Send ``chunks``, end with ``ending``; wait for the server.

        :returns: True when the server closed the connection.
        """
        self.sock.setblocking(False)
        pending = list(chunks)
        deadline = time.monotonic() + SETTLE
        ended = False
        while time.monotonic() < deadline:
            threads = threading.active_count()
            assert threads <= thread_limit, (
                '%d threads while one hostile client is served (limit %d): '
                '%s' % (threads, thread_limit, common.thread_names()))
            want_write = [self.sock] if pending else []
            readable, writable, _ = select.select([self.sock], want_write,
                                                  [], 0.05)
            if readable and not self._read_some():
                return True
            if writable and pending:
                try:
                    sent = self.sock.send(pending[0])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError,
                        BlockingIOError):
                    continue
                except (BrokenPipeError, ConnectionResetError,
                        ssl.SSLError):
                    return True
                pending[0] = pending[0][sent:]
                if not pending[0]:
                    pending.pop(0)
            if not pending and not ended:
                ended = True
                if ending == 'rst':
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack('ii', 1, 0))
                    return True
                try:
                    socket.socket.shutdown(self.sock, socket.SHUT_WR)
                except OSError:
                    return True
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Harness:
    """Two servers (plain, TLS) with a good client each."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix='xsm-fuzz-nbd-')
        self.devices = []
        self.servers = []
        self.clients = []
        self.rng = random.Random(0)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _device(self, kind, name, size):
        path = os.path.join(self.dir, name)
        if kind == 'vhd':
            ops.create(path, size)
            dev = backends.VHDDevice(path, writable=True)
        else:
            with open(path, 'wb') as f:
                f.truncate(size)
            dev = backends.RawDevice(path, writable=True)
        self.devices.append(dev)
        return dev

    def _start(self):
        creds = tls.make_credentials(os.path.join(self.dir, 'pki'))
        self.client_tls = tls.client_context(
            creds[tls.CA_CERT], creds[tls.CLIENT_CERT], creds[tls.CLIENT_KEY])
        server_tls = tls.server_context(
            creds[tls.SERVER_CERT], creds[tls.SERVER_KEY], creds[tls.CA_CERT])
        for name, context in (('plain', None), ('tls', server_tls)):
            server = nbd_server.Server(
                {'disk': self._device('vhd', name + '.vhd', DISK_SIZE),
                 'scratch': self._device('raw', name + '.raw',
                                         SCRATCH_SIZE)},
                tls_context=context, workers=WORKERS,
                max_payload=MAX_PAYLOAD).start()
            self.servers.append(server)
            host, port = server.address
            good = nbd_client.Client(
                host, port, 'disk', timeout=SETTLE,
                tls_context=self.client_tls if context else None,
                server_hostname='localhost' if context else None)
            good.connect()
            self.clients.append(good)
            # Warm the good connection's workers up (they start on demand).
            for i in range(2 * WORKERS):
                good.pwrite(b'warm', i * 4096, fua=True)
        self.check_good()

    def close(self):
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()
        for dev in self.devices:
            dev.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def check_good(self, which=(0, 1)):
        """The good clients write and read back, now."""
        for i in which:
            offset = self.rng.randrange(DISK_SIZE // 4096 - 64) * 4096 + 7
            data = self.rng.randbytes(self.rng.randrange(1, 65536))
            self.clients[i].pwrite(data, offset)
            got = bytes(self.clients[i].pread(offset, len(data)))
            assert got == data, 'the good client read other data'

    def server_threads(self, server):
        """Threads of the server's live connections (readers, workers)."""
        with server._lock:
            handlers = list(server._handlers)
        idents = set()
        for handler in handlers:
            idents.add(handler._thread.ident)
            pool = handler._pool
            if pool is not None:
                idents.update(t.ident for t in list(pool._threads))
        return idents

    def settled(self, server, baseline):
        return server.connections == 1 and not (
            {t.ident for t in threading.enumerate()} - baseline -
            self.server_threads(server))

    def hostile(self, use_tls, garbage_tls, prefix, body, chunk_seed,
                ending):
        """One hostile session; raises AssertionError on a failure."""
        server = self.servers[1 if use_tls else 0]
        common.settle(lambda: server.connections == 1, SETTLE)
        baseline = {t.ident for t in threading.enumerate()}
        # One reader and its workers for the hostile client (the good
        # client's workers are warm already).
        limit = len(baseline) + 1 + WORKERS
        errors = common.error_log()
        mark = len(errors.records)
        peer = HostileClient(server.address)
        try:
            with common.memory_limit(MEMORY, 'a hostile NBD client'):
                try:
                    if use_tls:
                        peer.starttls(None if garbage_tls
                                      else self.client_tls)
                    closed = peer.run(nbd_protocol.chunked(
                        prefix + body, chunk_seed), ending, limit)
                except (EOFError, ConnectionError, ssl.SSLError,
                        socket.timeout):
                    closed = True       # refused early: fine
                assert closed, ('the server neither answered nor closed the '
                                'hostile connection within %.0f s' % SETTLE)
        finally:
            peer.close()
        assert common.settle(lambda: self.settled(server, baseline),
                             SETTLE), (
            'after the hostile client: %d connections, threads %s'
            % (server.connections, common.thread_names()))
        assert not errors.since(mark), errors.since(mark)
        self.check_good([1 if use_tls else 0])


def decode(data):
    """The arguments of :meth:`Harness.hostile` from fuzzer bytes.

    Byte 0: TLS (bit 0), garbage instead of the TLS handshake (bit 6),
    the prefix (bits 1-2), RST rather than FIN at the end (bit 7); byte 1
    seeds the chunking; the rest is sent.
    """
    head = data[0] if data else 0
    use_tls = bool(head & 1)
    prefixes = TLS_PREFIXES if use_tls else PLAIN_PREFIXES
    return (use_tls, use_tls and bool(head & 0x40),
            prefixes[(head >> 1) % len(prefixes)], data[2:], data[1:2],
            'rst' if head & 0x80 else 'fin')


_HARNESS = []


def harness():
    if not _HARNESS:
        _HARNESS.append(Harness())
        atexit.register(_HARNESS[0].close)
    return _HARNESS[0]


def one_input(data):
    harness().hostile(*decode(data))


if __name__ == '__main__':
    common.atheris_main(one_input)
