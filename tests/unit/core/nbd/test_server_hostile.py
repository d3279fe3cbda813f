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

"""Hostile and broken peers against a running NBD server.

Raw sockets speak hand-made bytes (fixed newstyle handshake, options,
requests, as ``doc/proto.md`` of the NBD project has them) to a live
:class:`nbd_server.Server`, while a well-behaved :class:`nbd_client.Client`
keeps reading and writing on the same server.  After every scenario the
bad connection must be closed with a logged reason (or, when the protocol
allows it, answered and kept), the good client must still work, and no
thread or file descriptor may be left behind.
"""

import gc
import logging
import os
import random
import re
import socket
import struct
import threading
import time

import fixtures
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB                  # VHD export of the good clients
SCRATCH_SIZE = 1 * MiB                # raw export the hostile peers use
MAX_PAYLOAD = 32 * MiB
MAX_OPTION = 64 * 1024
SETTLE = 10.0                         # seconds to wait for the server

GREETING = struct.Struct('>QQH')      # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct('>QII')        # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct('>QIII')  # magic, option, reply type, length
REQUEST = struct.Struct('>IHHQQI')    # magic, flags, type, handle, off, len
SIMPLE_REPLY = struct.Struct('>IIQ')  # magic, error, handle
U16 = struct.Struct('>H')
U32 = struct.Struct('>I')
CLIENT_FLAGS = U32.pack(c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES)
LOG_NAME = nbd_server.__name__


def option(opt, data=b'', magic=c.IHAVEOPT, length=None):
    """Bytes of an option request (``length`` may lie about the data)."""
    return OPTION.pack(magic, opt, len(data) if length is None
                       else length) + data


def go_data(name, infos=()):
    """Data of NBD_OPT_GO / NBD_OPT_INFO."""
    raw = name.encode('utf-8')
    return (U32.pack(len(raw)) + raw + U16.pack(len(infos)) +
            b''.join(U16.pack(info) for info in infos))


def request(command, handle, offset=0, length=0, flags=0,
            magic=c.NBD_REQUEST_MAGIC):
    """Bytes of a transmission request header."""
    return REQUEST.pack(magic, flags, command, handle, offset, length)


def settle(probe, timeout=SETTLE):
    """Poll ``probe`` until it returns a true value or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


class RawPeer(object):
    """A hand-driven NBD client speaking bytes on a plain TCP socket."""

    def __init__(self, address, timeout=5.0):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.port = self.sock.getsockname()[1]

    def send(self, data):
        """Send, ignoring a server that already hung up."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def recv_exact(self, size):
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise EOFError('server closed after %d of %d bytes'
                               % (len(buf), size))
            buf += chunk
        return bytes(buf)

    def greeting(self):
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(18))
        if (magic, opt_magic) != (c.NBDMAGIC, c.IHAVEOPT):
            raise AssertionError('bad greeting %x %x' % (magic, opt_magic))
        return flags

    def client_flags(self, flags=CLIENT_FLAGS):
        self.greeting()
        self.send(flags)

    def option_reply(self):
        magic, opt, kind, length = OPTION_REPLY.unpack(self.recv_exact(20))
        if magic != c.NBD_REP_MAGIC:
            raise AssertionError('bad option reply magic %x' % magic)
        return opt, kind, self.recv_exact(length)

    def option_replies(self):
        """Replies to one option, up to its final one."""
        replies = []
        while True:
            reply = self.option_reply()
            replies.append(reply)
            if reply[1] == c.NBD_REP_ACK or reply[1] & c.NBD_REP_FLAG_ERROR:
                return replies

    def go(self, export='scratch'):
        """NBD_OPT_GO; returns the export size."""
        self.send(option(c.NBD_OPT_GO, go_data(export)))
        replies = self.option_replies()
        if replies[-1][1] != c.NBD_REP_ACK:
            raise AssertionError('GO refused: %r' % (replies,))
        for _opt, kind, data in replies:
            if kind == c.NBD_REP_INFO and U16.unpack_from(data)[0] == 0:
                return struct.unpack_from('>Q', data, 2)[0]
        raise AssertionError('GO without NBD_INFO_EXPORT: %r' % (replies,))

    def handshake(self, export='scratch'):
        self.client_flags()
        return self.go(export)

    def request(self, *args, **kwargs):
        return self.send(request(*args, **kwargs))

    def simple_reply(self):
        """(error, handle) of a simple reply."""
        magic, error, handle = SIMPLE_REPLY.unpack(self.recv_exact(16))
        if magic != c.NBD_SIMPLE_REPLY_MAGIC:
            raise AssertionError('bad simple reply magic %x' % magic)
        return error, handle

    def closed_by_server(self, timeout=5.0):
        """Drain until the server closes; False if it did not in time.

        Once the server has closed, our end is closed too.
        """
        if self._server_closed(timeout):
            self.close()
            return True
        return False

    def _server_closed(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except ConnectionResetError:
                return True
            except socket.timeout:
                return False

    def reset(self):
        """Vanish with a TCP RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             struct.pack('ii', 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


class Traffic(threading.Thread):
    """Keeps a good client writing and reading back in the background."""

    def __init__(self, client, base_offset, seed=0):
        super().__init__(name='good-traffic', daemon=True)
        self.client = client
        self.base = base_offset
        self.rng = random.Random(seed)
        self.done = threading.Event()
        self.errors = []
        self.rounds = 0

    def run(self):
        while not self.done.is_set():
            offset = self.base + self.rng.randrange(256) * 4096
            data = self.rng.randbytes(4096)
            try:
                self.client.pwrite(data, offset)
                got = bytes(self.client.pread(offset, 4096))
            except Exception as exc:
                self.errors.append(repr(exc))
                return
            if got != data:
                self.errors.append('data mismatch at %d' % offset)
                return
            self.rounds += 1
            self.done.wait(0.002)

    def finish(self):
        self.done.set()
        self.join(SETTLE)


class _Base(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.log = self.useFixture(fixtures.FakeLogger(
            name=LOG_NAME, level=logging.DEBUG,
            format='%(levelname)s %(message)s'))
        self.dir = self.make_tempdir()
        vhd = os.path.join(self.dir, 'disk.vhd')
        ops.create(vhd, DISK_SIZE)
        self.disk = backends.VHDDevice(vhd, writable=True)
        self.addCleanup(self.disk.close)
        raw = os.path.join(self.dir, 'scratch.raw')
        with open(raw, 'wb') as f:
            f.truncate(SCRATCH_SIZE)
        self.scratch = backends.RawDevice(raw, writable=True)
        self.addCleanup(self.scratch.close)
        self.rng = random.Random(self.id())

    def make_server(self, **kwargs):
        server = nbd_server.Server({'disk': self.disk,
                                    'scratch': self.scratch}, **kwargs)
        server.start()
        self.addCleanup(server.stop)
        return server

    def make_client(self, server, **kwargs):
        host, port = server.address
        client = nbd_client.Client(host, port, 'disk', timeout=10, **kwargs)
        client.connect()
        self.addCleanup(client.close)
        return client

    def raw(self, server, timeout=5.0):
        peer = RawPeer(server.address, timeout)
        self.addCleanup(peer.close)
        return peer

    def patch_handshake_timeout(self, seconds):
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.nbd.server.HANDSHAKE_TIMEOUT', seconds))

    # -- leak accounting ----------------------------------------------------

    @staticmethod
    def snapshot():
        # Garbage of earlier tests in this process (an unclosed journal in
        # a reference cycle) is collected now, not in the middle of the
        # comparison, where its closed descriptors would count.
        gc.collect()
        return ({t.ident: t.name for t in threading.enumerate()},
                base.open_fds())

    @staticmethod
    def _pool_threads(server):
        """Workers of the live connections: their pools grow on demand."""
        with server._lock:
            handlers = list(server._handlers)
        idents = set()
        for handler in handlers:
            pool = handler._pool
            if pool is not None:
                idents.update(t.ident for t in list(pool._threads))
        return idents

    def leftovers(self, snapshot, server=None, connections=0):
        """What differs from ``snapshot``; empty when the server settled."""
        threads, fds = snapshot
        allowed = set(threads)
        if server is not None:
            allowed |= self._pool_threads(server)
        # the good client's own threads, which it starts when it first
        # needs them (a large reply nobody waits for, a send deadline)
        good = getattr(self, 'good', None)
        if good is not None:
            allowed |= {t.ident for t in (good._rescuer, good._watcher)
                        if t is not None}
        extra = sorted(t.name for t in threading.enumerate()
                       if t.ident not in allowed)
        now = base.open_fds()
        diff = sorted(set(now.items()) ^ set(fds.items()))
        found = {}
        if extra:
            found['threads'] = extra
        if diff:
            found['fds'] = diff
        if server is not None and server.connections != connections:
            found['connections'] = server.connections
        return found

    def assertNoLeaks(self, snapshot, server=None, connections=0):
        settle(lambda: not self.leftovers(snapshot, server, connections))
        self.assertEqual({}, self.leftovers(snapshot, server, connections))

    def assertLogged(self, peer, pattern, level=None):
        """The server logged why it closed the connection of ``peer``."""
        regex = re.compile(r'^(%s) NBD client 127\.0\.0\.1:%d closed.*%s' % (
            level or 'WARNING|INFO', peer.port, pattern), re.M)
        settle(lambda: regex.search(self.log.output))
        self.assertRegex(self.log.output, regex)


class _Serving(_Base):
    """A server with a good client that works throughout every test."""

    def server_kwargs(self):
        return {}

    def client_kwargs(self):
        return {}

    def setUp(self):
        super().setUp()
        self.server = self.make_server(**self.server_kwargs())
        self.good = self.make_client(self.server, **self.client_kwargs())
        self.traffic = Traffic(self.good, 0, seed=self.rng.random())
        self.traffic.start()
        self.addCleanup(self.traffic.finish)
        self.good.pread(0, 4096)
        self.before = self.snapshot()

    def check_good(self):
        """The good client reads back what it writes, now."""
        offset = 8 * MiB + self.rng.randrange(1024) * 4096 + 7
        data = os.urandom(self.rng.randrange(1, 256 * 1024))
        self.good.pwrite(data, offset, fua=True)
        self.assertEqual(data, bytes(self.good.pread(offset, len(data))))
        self.assertEqual(data, bytes(self.disk.pread(offset, len(data))))

    def assertServing(self, snapshot=None):
        """Bad peers are gone without a trace; the good client works."""
        self.assertNoLeaks(snapshot or self.before, self.server, 1)
        self.check_good()
        self.assertEqual([], self.traffic.errors)

    def tearDown(self):
        self.traffic.finish()
        self.assertEqual([], self.traffic.errors)
        self.assertGreater(self.traffic.rounds, 0)
        super().tearDown()


class HandshakeTest(_Serving):

    def test_wrong_client_flags(self):
        for flags, reason in [
                (U32.pack(0xFFFF0003), 'unknown client flags 0xffff0003'),
                (U32.pack(0), 'lacks fixed newstyle'),
                (b'GET / HTTP/1.1\r\n\r\n', 'unknown client flags')]:
            peer = self.raw(self.server)
            peer.client_flags(flags)
            self.assertTrue(peer.closed_by_server())
            self.assertLogged(peer, reason, 'WARNING')
            self.assertServing()

    def test_wrong_option_magic(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_GO, go_data('scratch'),
                         magic=0x49484156454F5058))
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'wrong option magic 0x49484156454f5058',
                          'WARNING')
        self.assertServing()

    def test_oversized_option_closes_without_waiting_for_its_data(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_GO, length=MAX_OPTION + 1))
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'option 7 of 65537 bytes exceeds the limit',
                          'WARNING')
        self.assertServing()

    def test_largest_option_is_read_and_refused(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(0xBEEF, b'\xa5' * MAX_OPTION))
        self.assertEqual([(0xBEEF, c.NBD_REP_ERR_UNSUP)],
                         [r[:2] for r in peer.option_replies()])
        self.assertEqual(SCRATCH_SIZE, peer.go())
        peer.request(c.NBD_CMD_DISC, 1)
        self.assertTrue(peer.closed_by_server())
        self.assertServing()

    def test_unknown_options_are_refused_and_the_session_goes_on(self):
        peer = self.raw(self.server)
        peer.client_flags()
        for opt, data in [(0xDEAD, b'whatever'), (c.NBD_OPT_EXPORT_NAME + 99,
                                                  b''), (0xFFFFFFFF, b'x')]:
            peer.send(option(opt, data))
            replies = peer.option_replies()
            self.assertEqual([(opt, c.NBD_REP_ERR_UNSUP)],
                             [r[:2] for r in replies])
        # Malformed data of a known option: refused too, session goes on.
        peer.send(option(c.NBD_OPT_GO, b'\x00\x00\x10\x00disk'))
        self.assertEqual(c.NBD_REP_ERR_INVALID, peer.option_replies()[-1][1])
        self.assertEqual(SCRATCH_SIZE, peer.go())
        peer.request(c.NBD_CMD_READ, 7, 4096, 512)
        self.assertEqual((0, 7), peer.simple_reply())
        self.assertEqual(bytes(512), peer.recv_exact(512))
        peer.request(c.NBD_CMD_DISC, 8)
        self.assertTrue(peer.closed_by_server())
        self.assertNotIn('WARNING NBD client 127.0.0.1:%d' % peer.port,
                         self.log.output)
        self.assertServing()

    def test_client_that_never_speaks_times_out(self):
        self.patch_handshake_timeout(0.5)
        silent = self.raw(self.server)
        mid_option = self.raw(self.server)
        mid_option.client_flags()
        mid_option.send(option(c.NBD_OPT_GO, go_data('scratch'))[:10])
        start = time.monotonic()
        for peer in silent, mid_option:
            self.assertTrue(peer.closed_by_server(timeout=5))
            self.assertLogged(peer, 'no handshake within', 'WARNING')
        self.assertLess(time.monotonic() - start, 3)
        self.assertServing()

    def test_client_that_dribbles_the_handshake_times_out(self):
        # One byte now and then never lets a single recv() time out: the
        # handshake as a whole must still be bounded.
        self.patch_handshake_timeout(0.5)
        peer = self.raw(self.server)
        peer.client_flags()
        dribble = option(0xD00D, b'z' * 200)
        start = time.monotonic()
        closed = False
        for byte in dribble:
            if not peer.send(bytes([byte])) or time.monotonic() - start > 4:
                break
            peer.sock.settimeout(0.2)
            try:
                closed = not peer.sock.recv(4096)
            except ConnectionResetError:
                closed = True
            except socket.timeout:
                pass
            if closed:
                break
        closed = closed or peer.closed_by_server(timeout=0.1)
        elapsed = time.monotonic() - start
        peer.close()
        self.assertTrue(closed, 'a dribbling client kept its handshake '
                        'open for %.1f s with HANDSHAKE_TIMEOUT 0.5 s'
                        % elapsed)
        self.assertLess(elapsed, 2.0)
        self.assertLogged(peer, 'no handshake within', 'WARNING')
        self.assertServing()

    def test_abort_and_early_disconnects_are_clean(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_ABORT))
        self.assertEqual([(c.NBD_OPT_ABORT, c.NBD_REP_ACK)],
                         [r[:2] for r in peer.option_replies()])
        self.assertTrue(peer.closed_by_server())
        self.assertServing()


class TransmissionTest(_Serving):

    def go(self):
        peer = self.raw(self.server)
        self.assertEqual(SCRATCH_SIZE, peer.handshake())
        return peer

    def test_oversized_write_closes(self):
        peer = self.go()
        peer.request(c.NBD_CMD_WRITE, 1, 0, MAX_PAYLOAD + 1)
        peer.send(b'x' * 4096)
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'write of %d bytes exceeds the limit'
                          % (MAX_PAYLOAD + 1), 'WARNING')
        self.assertServing()

    def test_largest_write_is_read_and_refused_beyond_the_end(self):
        # 32 MiB is allowed on the wire: the server takes the payload and
        # refuses it (the export has 1 MiB), and the connection stays.
        peer = self.go()
        peer.request(c.NBD_CMD_WRITE, 1, 0, MAX_PAYLOAD)
        chunk = b'\xee' * MiB
        for _ in range(MAX_PAYLOAD // MiB):
            peer.send(chunk)
        self.assertEqual((c.NBD_ENOSPC, 1), peer.simple_reply())
        self.assertEqual(bytes(4096), bytes(self.scratch.pread(0, 4096)))
        peer.request(c.NBD_CMD_READ, 2, 0, 16)
        self.assertEqual((0, 2), peer.simple_reply())
        self.assertEqual(bytes(16), peer.recv_exact(16))
        peer.request(c.NBD_CMD_DISC, 3)
        self.assertTrue(peer.closed_by_server())
        self.assertServing()

    def test_wrong_request_magic_closes(self):
        peer = self.go()
        peer.request(c.NBD_CMD_READ, 1, 0, 512, magic=0x25609514)
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'wrong request magic 0x25609514', 'WARNING')
        self.assertServing()

    def test_unknown_commands_get_einval_and_the_connection_stays(self):
        peer = self.go()
        cases = [(c.NBD_CMD_CACHE, 0), (42, 0), (0xFFFF, 0),
                 (c.NBD_CMD_READ, 0x8000),             # unknown flag
                 (c.NBD_CMD_BLOCK_STATUS, 0),          # no meta context
                 (c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF)]  # DF not advertised
        for handle, (command, flags) in enumerate(cases, 100):
            peer.request(command, handle, 0, 512, flags)
            self.assertEqual((c.NBD_EINVAL, handle), peer.simple_reply())
        peer.request(c.NBD_CMD_WRITE, 200, 512, 3)
        peer.send(b'abc')
        self.assertEqual((0, 200), peer.simple_reply())
        peer.request(c.NBD_CMD_READ, 201, 512, 3)
        self.assertEqual((0, 201), peer.simple_reply())
        self.assertEqual(b'abc', peer.recv_exact(3))
        peer.request(c.NBD_CMD_DISC, 202)
        self.assertTrue(peer.closed_by_server())
        self.assertServing()

    def test_reads_past_the_end_get_einval_and_the_connection_stays(self):
        peer = self.go()
        cases = [(SCRATCH_SIZE - 1, 2), (SCRATCH_SIZE, 1),
                 (2 ** 64 - 1, 1), (2 ** 64 - 512, 1024),
                 (0, MAX_PAYLOAD + 1), (0, 2 ** 32 - 1)]
        for handle, (offset, length) in enumerate(cases, 1):
            peer.request(c.NBD_CMD_READ, handle, offset, length)
            self.assertEqual((c.NBD_EINVAL, handle), peer.simple_reply())
        # Writes past the end are refused after their payload.
        peer.request(c.NBD_CMD_WRITE, 50, SCRATCH_SIZE - 2, 4)
        peer.send(b'wxyz')
        self.assertEqual((c.NBD_ENOSPC, 50), peer.simple_reply())
        peer.request(c.NBD_CMD_READ, 51, SCRATCH_SIZE - 4, 4)
        self.assertEqual((0, 51), peer.simple_reply())
        self.assertEqual(bytes(4), peer.recv_exact(4))
        peer.request(c.NBD_CMD_DISC, 52)
        self.assertTrue(peer.closed_by_server())
        self.assertServing()

    def test_duplicate_handle_in_flight_closes(self):
        peer = self.go()
        # Flushes, because the server hands them to its workers: a read
        # served by the connection's reader would be answered, and its
        # handle free again, before the next request is parsed.
        peer.send(b''.join(request(c.NBD_CMD_FLUSH, 9)
                           for _ in range(20)))
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'handle 9 is already in flight', 'WARNING')
        self.assertServing()

    def _vanish_mid_write(self, how):
        peer = self.go()
        peer.request(c.NBD_CMD_WRITE, 1, 4096, 65536)
        peer.send(b'\x77' * 32768)
        time.sleep(0.05)
        how(peer)
        self.assertNoLeaks(self.before, self.server, 1)
        # The half-received write was never applied.
        self.assertEqual(bytes(65536), bytes(self.scratch.pread(4096, 65536)))
        return peer

    def test_client_vanishes_mid_write_with_fin(self):
        peer = self._vanish_mid_write(RawPeer.close)
        self.assertLogged(peer, 'closed in the middle of a message',
                          'WARNING')
        self.assertServing()

    def test_client_vanishes_mid_write_with_rst(self):
        peer = self._vanish_mid_write(RawPeer.reset)
        self.assertLogged(peer, '(reset|middle of a message)')
        self.assertServing()

    def test_client_vanishes_with_replies_unread(self):
        peer = self.go()
        peer.send(b''.join(request(c.NBD_CMD_READ, h, 0, MiB)
                           for h in range(64)))
        time.sleep(0.2)
        peer.reset()
        self.assertLogged(peer, '')
        self.assertServing()

    def test_many_clients_connect_and_disconnect(self):
        def fin(peer):
            peer.close()

        def greet_then_fin(peer):
            peer.greeting()
            peer.close()

        def rst(peer):
            peer.reset()

        def go_then_disc(peer):
            peer.handshake()
            peer.request(c.NBD_CMD_DISC, 1)
            self.assertTrue(peer.closed_by_server())
            peer.close()

        def go_then_rst(peer):
            peer.handshake()
            peer.request(c.NBD_CMD_READ, 1, 0, 65536)
            peer.reset()

        kinds = [fin, greet_then_fin, rst, go_then_disc, go_then_rst]
        for i in range(50):
            kinds[i % len(kinds)](RawPeer(self.server.address))
        self.assertServing()
        # And 50 at once.
        peers = [RawPeer(self.server.address) for _ in range(50)]
        self.assertTrue(settle(lambda: self.server.connections == 51))
        self.check_good()
        for i, peer in enumerate(peers):
            kinds[i % len(kinds)](peer)
        self.assertServing()


# Hypothesis: whatever bytes a peer sends, the server survives.

PREFIXES = [
    b'',
    CLIENT_FLAGS,
    CLIENT_FLAGS + option(c.NBD_OPT_GO, go_data('scratch')),
    CLIENT_FLAGS + option(c.NBD_OPT_STRUCTURED_REPLY) +
    option(c.NBD_OPT_SET_META_CONTEXT, b'\x00\x00\x00\x07scratch'
           b'\x00\x00\x00\x01\x00\x00\x00\x0fbase:allocation') +
    option(c.NBD_OPT_GO, go_data('scratch')),
]
options = st.builds(
    option, st.integers(0, 12) | st.integers(0, 2 ** 32 - 1),
    st.binary(max_size=32),
    st.sampled_from([c.IHAVEOPT] * 9 + [0]),
    st.none() | st.integers(0, 64) | st.integers(0, 2 ** 32 - 1))
requests = st.builds(
    request, st.integers(0, 9), st.integers(0, 3),
    st.integers(0, SCRATCH_SIZE) | st.integers(0, 2 ** 64 - 1),
    st.integers(0, 8192) | st.integers(0, 2 ** 32 - 1),
    st.integers(0, 31),
    st.sampled_from([c.NBD_REQUEST_MAGIC] * 9 + [0x25609512]))
chunks = st.lists(st.binary(min_size=1, max_size=64) | options | requests,
                  max_size=12)


class RandomInputTest(_Serving):

    def fuzz(self, prefix, chunks, ending):
        snapshot = self.snapshot()
        peer = RawPeer(self.server.address)
        try:
            peer.greeting()
            for chunk in [prefix] + chunks:
                if chunk and not peer.send(chunk):
                    break
            if ending == 'rst':
                peer.reset()
            else:
                try:
                    peer.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                # After our FIN the server must hang up by itself.
                self.assertTrue(peer.closed_by_server(timeout=5))
        except EOFError:
            pass            # closed on us while we read the greeting
        finally:
            peer.close()
        self.assertNoLeaks(snapshot, self.server, 1)
        self.check_good()

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.binary(max_size=128), st.sampled_from(['fin', 'rst']))
    def test_random_bytes_from_the_start(self, data, ending):
        self.fuzz(data, [], ending)

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(PREFIXES), chunks, st.sampled_from(['fin', 'rst']))
    def test_random_messages_after_the_handshake(self, prefix, chunks,
                                                 ending):
        self.fuzz(prefix, chunks, ending)

    def test_go_then_fin_closes(self):
        # Deterministic sanity check of the helper: a lone GO then FIN.
        self.fuzz(PREFIXES[2], [], 'fin')
        self.assertServing()


class TLSTest(_Serving):

    def setUp(self):
        self.creds = None
        super().setUp()

    def _creds(self):
        if self.creds is None:
            self.creds = tls.make_credentials(os.path.join(
                self.make_tempdir(), 'pki'))
        return self.creds

    def server_kwargs(self):
        f = self._creds()
        return {'tls_context': tls.server_context(
            f[tls.SERVER_CERT], f[tls.SERVER_KEY], f[tls.CA_CERT])}

    def client_kwargs(self):
        f = self._creds()
        return {'tls_context': tls.client_context(
            f[tls.CA_CERT], f[tls.CLIENT_CERT], f[tls.CLIENT_KEY]),
            'server_hostname': 'localhost'}

    def starttls(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_STARTTLS))
        self.assertEqual([(c.NBD_OPT_STARTTLS, c.NBD_REP_ACK)],
                         [r[:2] for r in peer.option_replies()])
        return peer

    def test_garbage_instead_of_client_hello(self):
        for garbage in (b'\x00' * 512, b'GET / HTTP/1.1\r\n\r\n',
                        b'\x16\x03\x01\x00\x05hello' + os.urandom(300)):
            peer = self.starttls()
            peer.send(garbage)
            self.assertTrue(peer.closed_by_server())
            self.assertLogged(peer, '', 'INFO')
            self.assertServing()

    def test_cleartext_after_starttls_closes(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_STARTTLS) + b'\x16\x03\x01')
        self.assertTrue(peer.closed_by_server())
        self.assertLogged(peer, 'follow NBD_OPT_STARTTLS in clear text',
                          'WARNING')
        self.assertServing()

    def test_options_before_tls_are_refused_and_session_goes_on(self):
        peer = self.raw(self.server)
        peer.client_flags()
        peer.send(option(c.NBD_OPT_GO, go_data('disk')))
        self.assertEqual(c.NBD_REP_ERR_TLS_REQD, peer.option_replies()[-1][1])
        peer.send(option(c.NBD_OPT_ABORT))
        self.assertEqual(c.NBD_REP_ACK, peer.option_replies()[-1][1])
        self.assertTrue(peer.closed_by_server())
        self.assertServing()

    def test_client_silent_in_tls_handshake_times_out(self):
        self.patch_handshake_timeout(0.5)
        peer = self.starttls()
        self.assertTrue(peer.closed_by_server(timeout=5))
        self.assertLogged(peer, '(no handshake within|timed out)')
        self.assertServing()

    def test_client_with_untrusted_certificate(self):
        other = tls.make_credentials(os.path.join(self.dir, 'other'))
        ctx = tls.client_context(self._creds()[tls.CA_CERT],
                                 other[tls.CLIENT_CERT],
                                 other[tls.CLIENT_KEY])
        self.assertRaises(nbd_client.NBDError, self.make_client, self.server,
                          tls_context=ctx, server_hostname='localhost')
        self.assertServing()


class StopTest(_Base):
    """stop() with everyone still connected leaves nothing behind."""

    def start(self, **kwargs):
        self.before = self.snapshot()
        server = self.make_server(**kwargs)
        return server

    def stop(self, server, peers):
        start = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - start
        self.assertLess(elapsed, 3.0, 'stop() took %.1f s' % elapsed)
        self.assertEqual(0, server.connections)
        for peer in peers:
            self.assertTrue(peer.closed_by_server(timeout=2))
            peer.close()

    def test_stop_with_requests_in_flight(self):
        server = self.start()
        good = self.make_client(server)
        pendings = [good.aio_pread(i * MAX_PAYLOAD % DISK_SIZE, MAX_PAYLOAD)
                    for i in range(4)]
        pendings += [good.aio_pwrite(os.urandom(MiB), i * MiB)
                     for i in range(4)]
        silent = self.raw(server)
        mid_option = self.raw(server)
        mid_option.client_flags()
        mid_option.send(option(c.NBD_OPT_GO, go_data('scratch'))[:-3])
        mid_write = self.raw(server)
        mid_write.handshake()
        mid_write.request(c.NBD_CMD_WRITE, 1, 0, 65536)
        mid_write.send(b'w' * 1000)
        unread = self.raw(server)
        unread.handshake()
        unread.send(b''.join(request(c.NBD_CMD_READ, h, 0, MiB)
                             for h in range(40)))
        self.assertTrue(settle(lambda: server.connections == 5))
        time.sleep(0.2)
        self.stop(server, [silent, mid_option, mid_write, unread])
        for pending in pendings:
            try:
                pending.wait(5)
            except nbd_client.NBDError:
                pass
        good.close()
        self.assertNoLeaks(self.before)

    def test_stop_with_client_stalled_in_tls_handshake(self):
        # Bounded, so that a server that waits for the timeout fails fast.
        self.patch_handshake_timeout(8)
        creds = tls.make_credentials(os.path.join(self.dir, 'pki'))
        server = self.start(tls_context=tls.server_context(
            creds[tls.SERVER_CERT], creds[tls.SERVER_KEY],
            creds[tls.CA_CERT]))
        good = self.make_client(server, tls_context=tls.client_context(
            creds[tls.CA_CERT], creds[tls.CLIENT_CERT],
            creds[tls.CLIENT_KEY]), server_hostname='localhost')
        good.pwrite(b'tls' * 100, 0)
        stalled = []
        for hello in (b'', b'\x16\x03\x01\x02\x00\x01'):
            peer = self.raw(server)
            peer.client_flags()
            peer.send(option(c.NBD_OPT_STARTTLS))
            self.assertEqual(c.NBD_REP_ACK, peer.option_replies()[-1][1])
            peer.send(hello)
            stalled.append(peer)
        self.assertTrue(settle(lambda: server.connections == 3))
        time.sleep(0.2)
        self.stop(server, stalled)
        good.close()
        self.assertNoLeaks(self.before)

    def test_stop_twice_and_unused(self):
        server = self.start()
        server.stop()
        server.stop()
        self.assertNoLeaks(self.before)
