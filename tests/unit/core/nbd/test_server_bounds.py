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

"""The NBD server's bounds, with real sockets.

A connection limit (one more is closed at once, logged once per burst), a
handshake limit (the oldest connection still in its handshake makes room
for a new one), a request deadline once serving, an accept loop that
survives a thread it cannot start, and stop() in every state. Deadlines
are short here and the margins wide: a loaded 2-core machine must not make
these tests fail.
"""

import os
import re
import socket
import threading
import time
from unittest import mock

import fixtures

from tests.unit.core.nbd.test_server_hostile import _Base
from tests.unit.core.nbd.test_server_hostile import go_data
from tests.unit.core.nbd.test_server_hostile import option
from tests.unit.core.nbd.test_server_hostile import request
from tests.unit.core.nbd.test_server_hostile import settle
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls

MiB = 1024 * 1024


def greeted(peer, timeout=5.0):
    """True if the server greets ``peer``; False if it closes at once."""
    try:
        peer.sock.settimeout(timeout)
        peer.greeting()
        return True
    except (EOFError, ConnectionResetError):
        return False


class AdmissionTest(_Base):

    check_leaks = False

    def test_decisions(self):
        admit, refuse, evict = (nbd_server.ADMIT, nbd_server.REFUSE,
                                nbd_server.EVICT)
        cases = [((0, 0, 1, 1), admit), ((1, 0, 1, 1), refuse),
                 ((3, 1, 4, 2), admit), ((3, 2, 4, 2), evict),
                 ((4, 2, 4, 2), refuse), ((10, 0, 256, 64), admit)]
        for args, expected in cases:
            self.assertEqual(expected, nbd_server.admission(*args), args)

    def test_set_defaults(self):
        for name in ('MAX_CONNECTIONS', 'MAX_HANDSHAKES',
                     'HANDSHAKE_TIMEOUT', 'REQUEST_TIMEOUT'):
            self.useFixture(fixtures.MonkeyPatch(
                'xsm_driver.core.nbd.server.' + name,
                getattr(nbd_server, name)))
        nbd_server.set_defaults(max_connections=7, request_timeout=3.5)
        self.assertEqual((7, 64, 3.5), (nbd_server.MAX_CONNECTIONS,
                                        nbd_server.MAX_HANDSHAKES,
                                        nbd_server.REQUEST_TIMEOUT))
        server = nbd_server.Server({})
        self.assertEqual(3.5, server.request_timeout)
        self.assertEqual(2.0, nbd_server.Server(
            {}, request_timeout=2.0).request_timeout)


class _TLS(_Base):

    def setUp(self):
        super().setUp()
        self.creds = tls.make_credentials(os.path.join(self.dir, 'pki'))

    def tls_server(self, **kwargs):
        return self.make_server(tls_context=tls.server_context(
            self.creds[tls.SERVER_CERT], self.creds[tls.SERVER_KEY],
            self.creds[tls.CA_CERT]), **kwargs)

    def tls_client(self, server):
        return self.make_client(server, tls_context=tls.client_context(
            self.creds[tls.CA_CERT], self.creds[tls.CLIENT_CERT],
            self.creds[tls.CLIENT_KEY]), server_hostname='localhost')

    def transfer(self, client, size=8 * MiB):
        data = os.urandom(size)
        offset = self.rng.randrange(0, 32) * MiB
        client.pwrite(data, offset, fua=True)
        self.assertEqual(data, bytes(client.pread(offset, size)))
        self.assertEqual(data, bytes(self.disk.pread(offset, size)))


class ConnectionLimitTest(_TLS):

    def test_one_over_the_limit_is_refused_while_tls_transfers_go_on(self):
        n = 6
        server = self.tls_server(max_connections=n + 1, max_handshakes=100)
        good = self.tls_client(server)
        self.transfer(good)
        plain = [self.raw(server) for _ in range(n)]
        for peer in plain:
            self.assertTrue(greeted(peer))
        self.assertTrue(settle(lambda: server.connections == n + 1))
        extra = [self.raw(server) for _ in range(5)]
        for peer in extra:
            # closed at once: no greeting, well before any timeout
            start = time.monotonic()
            self.assertFalse(greeted(peer, timeout=5.0))
            self.assertLess(time.monotonic() - start, 4.0)
        self.assertEqual(5, server.refused)
        self.transfer(good)
        # once per burst, not once per connection
        self.assertEqual(1, len(re.findall(
            r'refusing new connections: max_connections \(7\) reached',
            self.log.output)))
        for peer in plain:
            peer.close()
        self.assertTrue(settle(lambda: server.connections == 1))
        again = self.raw(server)
        self.assertTrue(greeted(again))
        self.assertIn('refusing new connections: burst over, 5 in all',
                      self.log.output)
        again.close()
        self.transfer(good)

    def test_handshake_flood_cannot_keep_a_tls_client_out(self):
        server = self.tls_server(max_handshakes=4)
        flood = [self.raw(server) for _ in range(20)]
        # every one of them was let in, and the oldest made room
        for peer in flood[-4:]:
            self.assertTrue(greeted(peer))
        self.assertTrue(settle(lambda: server.connections == 4))
        self.assertEqual(16, server.evicted)
        for peer in flood[:16]:
            self.assertTrue(peer.closed_by_server(timeout=5))
        # a client that completes its handshake gets in and works
        good = self.tls_client(server)
        self.transfer(good)
        self.assertEqual(0, server.refused)
        self.assertEqual(1, len(re.findall(
            r'closing the oldest connections still in the handshake: '
            r'max_handshakes \(4\) reached', self.log.output)))
        # the evicted ones are not logged one by one above DEBUG
        self.assertNotRegex(self.log.output, re.compile(
            r'^(INFO|WARNING) NBD client 127\.0\.0\.1:(%s) closed'
            % '|'.join(str(p.port) for p in flood[:16]), re.M))
        self.assertTrue(settle(lambda: server.connections == 4))

    def test_silent_connections_make_room_before_one_that_speaks(self):
        # a client that has begun its handshake is not closed for a flood
        # of connections that never said a word, however many arrive
        server = self.tls_server(max_handshakes=4)
        speaker = self.raw(server)
        speaker.client_flags()          # reads the greeting, answers it
        self.assertTrue(settle(lambda: any(
            h.progress == nbd_server.SPOKE for h in server._handlers)))
        flood = [self.raw(server) for _ in range(10)]
        for peer in flood[:7]:
            self.assertTrue(peer.closed_by_server(timeout=5))
        self.assertEqual(7, server.evicted)
        self.assertFalse(speaker.closed_by_server(timeout=0.5))
        speaker.send(option(c.NBD_OPT_STARTTLS))
        self.assertEqual(c.NBD_REP_ACK, speaker.option_reply()[1])


class AcceptLoopTest(_Base):

    def test_a_thread_that_cannot_start_closes_its_connection_only(self):
        server = self.make_server()
        real_start = threading.Thread.start
        failures = []

        def start(thread):
            if thread.name.startswith('xsm-nbd-127.') and len(failures) < 3:
                failures.append(thread.name)
                raise RuntimeError("can't start new thread")
            return real_start(thread)

        self.useFixture(fixtures.MockPatchObject(threading.Thread, 'start',
                                                 start))
        victims = [self.raw(server) for _ in range(3)]
        for peer in victims:
            self.assertFalse(greeted(peer))
        self.assertEqual(3, len(failures))
        # the accept loop lives on: the next client is served
        good = self.make_client(server)
        good.pwrite(b'still serving' * 100, 0)
        self.assertEqual(b'still serving' * 100, bytes(good.pread(0, 1300)))
        self.assertEqual(1, self.log.output.count(
            'cannot serve a new connection (RuntimeError'))
        self.assertEqual(1, server.connections)
        good.close()
        start_stop = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - start_stop, 5.0)
        self.assertNotIn('cannot join thread', self.log.output)

    def test_accept_errors_pause_and_go_on(self):
        server = self.make_server()
        real_accept = socket.socket.accept
        calls = []

        def accept(sock):
            if sock is server._listener:
                calls.append(time.monotonic())
                if len(calls) <= 2:
                    raise OSError(24, 'Too many open files')
            return real_accept(sock)

        self.useFixture(fixtures.MockPatchObject(socket.socket, 'accept',
                                                 accept))
        # the loop may already wait in the real accept(): then one
        # connection goes through it first; either way the two failing
        # calls come before the next connection is served
        first = self.make_client(server)
        first.pread(0, 512)
        second = self.make_client(server)
        second.pread(0, 512)
        self.assertGreaterEqual(len(calls), 3)
        for earlier, later in zip(calls[:2], calls[1:3]):
            self.assertGreaterEqual(later - earlier,
                                    nbd_server.ACCEPT_PAUSE * 0.9)
        self.assertIn('accept failed: [Errno 24] Too many open files',
                      self.log.output)


class RequestDeadlineTest(_Base):

    TIMEOUT = 1.0

    def setUp(self):
        super().setUp()
        self.server = self.make_server(request_timeout=self.TIMEOUT)

    def serving_peer(self):
        peer = self.raw(self.server, timeout=10)
        peer.handshake()
        return peer

    def assertCut(self, peer, pattern, within):
        start = time.monotonic()
        self.assertTrue(peer.closed_by_server(timeout=within + 5))
        self.assertLess(time.monotonic() - start, within + 5)
        self.assertLogged(peer, pattern, 'WARNING')

    def test_a_write_whose_data_stalls_is_cut(self):
        for length in (64 * 1024, 4096):       # pooled and plain buffers
            peer = self.serving_peer()
            start = time.monotonic()
            peer.request(c.NBD_CMD_WRITE, 1, 0, length)
            peer.send(b'w' * 1000)
            self.assertCut(peer, 'did not arrive whole within 1 s',
                           2 * self.TIMEOUT)
            self.assertGreaterEqual(time.monotonic() - start,
                                    self.TIMEOUT * 0.9)
        self.assertEqual(b'\0' * 1000, bytes(self.scratch.pread(0, 1000)))

    def test_a_write_dribbled_byte_by_byte_is_cut(self):
        # never a second without a byte: only a deadline on the whole
        # request can end it
        peer = self.serving_peer()
        peer.request(c.NBD_CMD_WRITE, 1, 0, 128 * 1024)
        start = time.monotonic()
        cut = False
        while time.monotonic() - start < 10:
            if not peer.send(b'd'):
                cut = True
                break
            time.sleep(0.1)
            if peer._server_closed(0.01):
                cut = True
                break
        elapsed = time.monotonic() - start
        self.assertTrue(cut, 'a dribbled write was served for %.1f s'
                        % elapsed)
        self.assertLess(elapsed, 6.0)
        self.assertGreaterEqual(elapsed, self.TIMEOUT * 0.9)
        self.assertLogged(peer, 'did not arrive', 'WARNING')

    def test_half_a_request_header_is_cut(self):
        peer = self.serving_peer()
        peer.send(request(c.NBD_CMD_READ, 1, 0, 4096)[:11])
        self.assertCut(peer, 'a request did not arrive whole within 1 s',
                       2 * self.TIMEOUT)

    def test_an_idle_connection_is_kept(self):
        peer = self.serving_peer()
        time.sleep(3 * self.TIMEOUT)
        peer.request(c.NBD_CMD_WRITE, 7, 4096, 4)
        peer.send(b'kept')
        self.assertEqual((0, 7), peer.simple_reply())
        self.assertEqual(b'kept', bytes(self.scratch.pread(4096, 4)))
        # a request split by a pause shorter than the deadline is served
        peer.send(request(c.NBD_CMD_READ, 8, 4096, 4)[:10])
        time.sleep(self.TIMEOUT / 3)
        peer.send(request(c.NBD_CMD_READ, 8, 4096, 4)[10:])
        self.assertEqual((0, 8), peer.simple_reply())
        self.assertEqual(b'kept', peer.recv_exact(4))
        peer.request(c.NBD_CMD_DISC, 9)
        self.assertTrue(peer.closed_by_server())

    def test_the_good_client_copes_with_the_deadline(self):
        good = self.make_client(self.server)
        data = os.urandom(4 * MiB)
        for _ in range(3):
            good.pwrite(data, 0)
            time.sleep(1.5 * self.TIMEOUT)        # idle past the deadline
            self.assertEqual(data, bytes(good.pread(0, 4 * MiB)))


class _StuckDevice:
    """A device whose reads block until released (a hung disk)."""

    size = MiB
    can_write = False

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()

    def pread(self, offset, length):
        self.entered.set()
        self.release.wait(30)
        return b'\0' * length


class StopTest(_TLS):

    def test_stop_with_connections_in_every_state(self):
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.nbd.server.STOP_TIMEOUT', 1.0))
        before = self.snapshot()
        stuck = _StuckDevice()
        self.addCleanup(stuck.release.set)
        server = nbd_server.Server(
            {'disk': self.disk, 'stuck': stuck},
            tls_context=tls.server_context(
                self.creds[tls.SERVER_CERT], self.creds[tls.SERVER_KEY],
                self.creds[tls.CA_CERT]),
            max_connections=8, handshake_timeout=60, request_timeout=60)
        server.start()
        self.addCleanup(server.stop)
        # serving, idle
        good = self.tls_client(server)
        self.transfer(good, MiB)
        # serving, its reader stuck in the device
        stuck_client = nbd_client.Client(
            *server.address, 'stuck', timeout=60,
            tls_context=tls.client_context(
                self.creds[tls.CA_CERT], self.creds[tls.CLIENT_CERT],
                self.creds[tls.CLIENT_KEY]), server_hostname='localhost')
        stuck_client.connect()
        self.addCleanup(stuck_client.close)
        pending = stuck_client.aio_pread(0, 4096)
        self.assertTrue(stuck.entered.wait(10))
        # silent before the handshake
        silent = self.raw(server)
        # stalled in the TLS handshake
        in_tls = self.raw(server)
        in_tls.client_flags()
        in_tls.send(option(c.NBD_OPT_STARTTLS))
        self.assertEqual(c.NBD_REP_ACK, in_tls.option_replies()[-1][1])
        in_tls.send(b'\x16\x03\x01\x02\x00\x01')
        # mid-option
        mid_option = self.raw(server)
        mid_option.client_flags()
        mid_option.send(option(c.NBD_OPT_GO, go_data('disk'))[:-3])
        self.assertTrue(settle(lambda: server.connections == 5))
        # one that could not get a thread, then refused ones
        real_start = threading.Thread.start
        failed = []

        def start(thread):
            if thread.name.startswith('xsm-nbd-127.') and not failed:
                failed.append(thread)
                raise RuntimeError("can't start new thread")
            return real_start(thread)

        with mock.patch.object(threading.Thread, 'start', start):
            no_thread = self.raw(server)
            self.assertFalse(greeted(no_thread))
        self.assertEqual(1, len(failed))
        more = [self.raw(server) for _ in range(3)]
        self.assertTrue(settle(lambda: server.connections == 8))
        refused = self.raw(server)
        self.assertFalse(greeted(refused))
        start_stop = time.monotonic()
        server.stop()
        elapsed = time.monotonic() - start_stop
        # the stuck reader is given STOP_TIMEOUT (1 s) and left behind
        self.assertLess(elapsed, 5.0, 'stop() took %.1f s' % elapsed)
        for peer in [silent, in_tls, mid_option] + more:
            self.assertTrue(peer.closed_by_server(timeout=5))
        self.assertIn('did not end within 1 s of stop()', self.log.output)
        self.assertNotIn('cannot join thread', self.log.output)
        stuck.release.set()
        try:
            pending.wait(10)
        except nbd_client.NBDError:
            pass
        stuck_client.close()
        good.close()
        no_thread.close()
        refused.close()
        server.stop()                   # again: nothing left to do
        self.assertNoLeaks(before)

    def test_stop_when_the_accept_thread_never_started(self):
        server = nbd_server.Server({'disk': self.disk})
        with mock.patch.object(threading.Thread, 'start',
                               side_effect=RuntimeError('no thread')):
            self.assertRaises(RuntimeError, server.start)
        start = time.monotonic()
        server.stop()
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(-1, server._listener.fileno())     # closed
