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

"""Our NBD client against our NBD server, over loopback sockets."""

import errno
import os
import socket
import threading
import time
import tracemalloc

import fixtures

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import protocol
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
HOLE = device.HOLE | device.ZERO


class ServerTestCase(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.vhd = os.path.join(self.dir, 'disk.vhd')
        ops.create(self.vhd, 64 * MiB)
        self.dev = backends.VHDDevice(self.vhd, writable=True)
        self.addCleanup(self.dev.close)

    def serve(self, exports=None, **kwargs):
        if exports is None:
            exports = {'disk': self.dev}
        server = nbd_server.Server(exports, **kwargs)
        server.start()
        self.addCleanup(server.stop)
        return server

    def connect(self, server, export='disk', **kwargs):
        host, port = server.address
        client = nbd_client.Client(host, port, export, timeout=10, **kwargs)
        client.connect()
        self.addCleanup(client.close)
        return client


class PlainTest(ServerTestCase):

    def test_read_write_flush_zero_trim(self):
        client = self.connect(self.serve())
        self.assertEqual(64 * MiB, client.size)
        self.assertTrue(client.structured)
        self.assertTrue(client.has_allocation_map)
        data = os.urandom(3 * MiB + 5)
        client.pwrite(data, MiB - 7, fua=True)
        self.assertEqual(data, bytes(client.pread(MiB - 7, len(data))))
        client.zero(MiB, 4096)
        self.assertEqual(bytes(4096), bytes(client.pread(MiB, 4096)))
        client.trim(2 * MiB, 4096)
        client.flush()
        self.assertEqual(bytes(self.dev.pread(0, 8 * MiB)),
                         bytes(client.pread(0, 8 * MiB)))

    def test_block_status_matches_vhd_allocation(self):
        self.dev.pwrite(b'x' * 4096, 5 * MiB)
        client = self.connect(self.serve())
        self.assertEqual([(5 * MiB, HOLE), (4096, 0),
                          (59 * MiB - 4096, HOLE)],
                         client.block_status(0, 64 * MiB))
        remote = nbd_device.NBDDevice(client)
        self.assertEqual(self.dev.extents(0, 64 * MiB),
                         remote.extents(0, 64 * MiB))

    def test_many_requests_in_flight_from_many_threads(self):
        client = self.connect(self.serve())
        pendings = [client.aio_pwrite(bytes([i]) * 65536, i * 65536)
                    for i in range(64)]
        for pending in pendings:
            pending.wait(10)
        errors = []

        def reader(n):
            for i in range(n, 64, 4):
                if bytes(client.pread(i * 65536, 65536)) != \
                        bytes([i]) * 65536:
                    errors.append(i)

        threads = [threading.Thread(target=reader, args=(n,))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)

    def test_errors_become_errno_replies(self):
        client = self.connect(self.serve())
        err = self.assertRaises(nbd_client.NBDError, client.pread,
                                64 * MiB - 1, 2)
        self.assertEqual(errno.EINVAL, err.errno)
        # The connection survives a refused request.
        self.assertEqual(bytes(4), bytes(client.pread(0, 4)))

    def test_read_only_export(self):
        ro = backends.VHDDevice(self.vhd)
        self.addCleanup(ro.close)
        client = self.connect(self.serve({'ro': ro}), export='ro')
        err = self.assertRaises(nbd_client.NBDError, client.pwrite, b'x', 0)
        self.assertEqual(errno.EPERM, err.errno)

    def test_unknown_export(self):
        server = self.serve()
        err = self.assertRaises(nbd_client.NBDError, self.connect, server,
                                'nope')
        self.assertIn('refused the export', str(err))

    def test_several_clients_and_no_leftovers(self):
        server = self.serve()
        threads_before = threading.active_count()
        clients = [self.connect(server) for _ in range(5)]
        for i, client in enumerate(clients):
            client.pwrite(bytes([i + 1]) * 512, i * 512)
        for i in range(5):
            # Every client sees what the others wrote.
            self.assertEqual(bytes([i + 1]) * 512,
                             bytes(clients[-1 - i].pread(i * 512, 512)))
        self.assertEqual(5, server.connections)
        for client in clients:
            client.close()
        for _ in range(100):
            if not server.connections:
                break
            threading.Event().wait(0.05)
        self.assertEqual(0, server.connections)
        self.assertLessEqual(threading.active_count(), threads_before)


class _Slow(device.Filter):
    """Reads take ``delay`` seconds; counts how many run at once."""

    def __init__(self, next_device, delay):
        super().__init__(next_device)
        self.delay = delay
        self.active = self.most = 0
        self._lock = threading.Lock()

    def pread(self, offset, length):
        with self._lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(self.delay)
            return super().pread(offset, length)
        finally:
            with self._lock:
                self.active -= 1


class DispatchTest(ServerTestCase):
    """Who serves a request: the connection's reader or its workers."""

    def pool_threads(self, server):
        (handler,) = list(server._handlers)
        return len(handler._pool._threads)

    def test_fast_requests_are_served_by_the_reader(self):
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.nbd.server.INLINE_BUDGET', 3600.0))
        server = self.serve()
        client = self.connect(server)
        pendings = [client.aio_pwrite(bytes([i]) * 4096, i * 4096)
                    for i in range(32)]
        pendings += [client.aio_pread(i * 4096, 4096) for i in range(32)]
        for pending in pendings:
            pending.wait(10)
        self.assertEqual(bytes([5]) * 4096, bytes(client.pread(5 * 4096,
                                                               4096)))
        self.assertEqual(0, self.pool_threads(server))
        # Flushes and FUA writes may wait for the disk: workers take them.
        client.flush()
        client.pwrite(b'f' * 4096, 0, fua=True)
        self.assertGreaterEqual(self.pool_threads(server), 1)
        self.assertEqual(b'f' * 4096, bytes(client.pread(0, 4096)))

    def test_small_requests_are_received_into_a_reused_buffer(self):
        """No new receive buffer per request (each was 256 KiB)."""
        client = self.connect(self.serve())
        client.pwrite(b'w' * 4096, 0)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        for i in range(200):
            client.pwrite(bytes([i]) * 4096, i * 4096)
        _now, peak = tracemalloc.get_traced_memory()
        self.assertLess(peak, 128 * 1024)
        self.assertEqual(bytes([199]) * 4096,
                         bytes(self.dev.pread(199 * 4096, 4096)))

    def test_slow_device_gets_requests_in_parallel(self):
        for i in range(16):
            self.dev.pwrite(bytes([i + 1]) * 4096, i * 4096)
        slow = _Slow(self.dev, 0.02)
        server = self.serve({'disk': slow})
        client = self.connect(server)
        pendings = [client.aio_pread(i % 16 * 4096, 4096)
                    for i in range(48)]
        for i, pending in enumerate(pendings):
            self.assertEqual(bytes([i % 16 + 1]) * 4096,
                             bytes(pending.wait(10)))
        self.assertGreater(slow.most, 1)
        self.assertGreater(self.pool_threads(server), 1)


class TLSTest(ServerTestCase):

    def setUp(self):
        super().setUp()
        self.creds = tls.make_credentials(os.path.join(self.dir, 'pki'))
        f = self.creds
        self.server = self.serve(tls_context=tls.server_context(
            f[tls.SERVER_CERT], f[tls.SERVER_KEY], f[tls.CA_CERT]))

    def test_mutual_tls(self):
        f = self.creds
        client = self.connect(self.server, tls_context=tls.client_context(
            f[tls.CA_CERT], f[tls.CLIENT_CERT], f[tls.CLIENT_KEY]),
            server_hostname='localhost')
        client.pwrite(b'secret' * 100, 0)
        self.assertEqual(b'secret' * 100, bytes(client.pread(0, 600)))

    def test_plain_client_sees_no_export(self):
        err = self.assertRaises(nbd_client.NBDError, self.connect,
                                self.server)
        self.assertIn('TLS', str(err))

    def test_client_without_certificate_is_refused(self):
        f = self.creds
        self.assertRaises(nbd_client.NBDError, self.connect, self.server,
                          tls_context=tls.client_context(f[tls.CA_CERT]),
                          server_hostname='localhost')


class ExportNamesTest(ServerTestCase):

    def list_exports(self, server):
        sock = socket.create_connection(server.address, timeout=10)
        self.addCleanup(sock.close)
        conn = protocol.ClientConnection()

        def next_event():
            while True:
                event = conn.next_event()
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                if event is not protocol.NEED_DATA:
                    return event
                conn.receive_data(sock.recv(65536))

        next_event()
        sock.sendall(conn.send(protocol.ListRequest()))
        return next_event()

    def test_listed_by_default(self):
        self.assertEqual((('disk', ''),),
                         self.list_exports(self.serve()).exports)

    def test_migration_exports_are_hidden_and_unguessable(self):
        name = nbd_server.unguessable_name()
        self.assertGreaterEqual(len(name), 32)
        self.assertNotEqual(name, nbd_server.unguessable_name())
        server = self.serve({name: self.dev}, list_exports=False)
        self.assertEqual((), self.list_exports(server).exports)
        self.assertEqual(64 * MiB, self.connect(server, name).size)


class OneShotExportTest(ServerTestCase):

    def handshake(self, server):
        """A raw protocol client past the greeting; returns ``ask``."""
        sock = socket.create_connection(server.address, timeout=10)
        self.addCleanup(sock.close)
        conn = protocol.ClientConnection()

        def next_event():
            while True:
                event = conn.next_event()
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                if event is not protocol.NEED_DATA:
                    return event
                conn.receive_data(sock.recv(65536))

        def ask(event):
            sock.sendall(conn.send(event))
            return next_event()

        next_event()
        return ask

    def test_second_client_is_refused_and_the_first_keeps_working(self):
        server = self.serve({})
        server.add_export('mig', self.dev, once=True)
        first = self.connect(server, 'mig')
        first.pwrite(b'a' * 4096, 0)
        err = self.assertRaises(nbd_client.NBDError, self.connect, server,
                                'mig')
        self.assertIn('refused the export', str(err))
        # The winner keeps serving, also after the loser tried.
        first.pwrite(b'b' * 4096, 4096)
        self.assertEqual(b'a' * 4096 + b'b' * 4096,
                         bytes(first.pread(0, 8192)))
        self.assertEqual(b'a' * 4096 + b'b' * 4096,
                         bytes(self.dev.pread(0, 8192)))

    def test_info_before_go_does_not_use_it_up(self):
        server = self.serve({}, list_exports=True)
        server.add_export('mig', self.dev, once=True)
        ask = self.handshake(server)
        self.assertEqual(('mig', ''), ask(protocol.ListRequest()).exports[0])
        info = ask(protocol.InfoRequest('mig'))
        self.assertIsInstance(info, protocol.ExportInfo)
        self.assertEqual(64 * MiB, info.size)
        self.assertEqual(64 * MiB, self.connect(server, 'mig').size)

    def test_later_go_and_info_get_unknown_export(self):
        server = self.serve({'disk': self.dev})
        server.add_export('mig', self.dev, once=True)
        self.connect(server, 'mig')
        for request in (protocol.InfoRequest('mig'),
                        protocol.GoRequest('mig')):
            ask = self.handshake(server)
            for name in ('mig', 'never-there'):
                answer = ask(type(request)(name))
                self.assertIsInstance(answer, protocol.OptionError)
                self.assertEqual(protocol.c.NBD_REP_ERR_UNKNOWN,
                                 answer.reply)
        self.assertEqual([('disk', '')], [
            e for e in self.handshake(server)(
                protocol.ListRequest()).exports])
        # The name can be offered again once it was used up.
        server.add_export('mig', self.dev, once=True)
        self.assertEqual(64 * MiB, self.connect(server, 'mig').size)

    def test_export_name_option_opens_nothing(self):
        server = self.serve({})
        server.add_export('mig', self.dev, once=True)
        ask = self.handshake(server)
        answer = ask(protocol.OptionRequest(protocol.c.NBD_OPT_EXPORT_NAME,
                                            b'mig'))
        self.assertIsInstance(answer, protocol.OptionError)
        self.assertEqual(protocol.c.NBD_REP_ERR_UNSUP, answer.reply)
        self.assertEqual(64 * MiB, self.connect(server, 'mig').size)

    def test_exports_of_the_constructor_and_plain_ones_stay(self):
        server = self.serve({'disk': self.dev})
        server.add_export('other', self.dev)
        for name in ('disk', 'disk', 'other', 'other'):
            self.assertEqual(64 * MiB, self.connect(server, name).size)

    def test_removed_before_use(self):
        server = self.serve({})
        server.add_export('mig', self.dev, once=True)
        self.assertIs(self.dev, server.remove_export('mig'))
        self.assertRaises(nbd_client.NBDError, self.connect, server, 'mig')
        self.assertRaises(KeyError, server.remove_export, 'mig')

    def test_racing_clients_exactly_one_gets_in(self):
        server = self.serve({}, list_exports=False)
        for round_ in range(5):
            name = nbd_server.unguessable_name()
            server.add_export(name, self.dev, once=True)
            count = 8
            barrier = threading.Barrier(count)
            winners, losers, other = [], [], []

            def race(i):
                host, port = server.address
                client = nbd_client.Client(host, port, name, timeout=10)
                barrier.wait()
                try:
                    client.connect()
                except nbd_client.NBDError as exc:
                    (losers if 'refused the export' in str(exc)
                     else other).append(exc)
                    return
                self.addCleanup(client.close)
                winners.append(client)

            threads = [threading.Thread(target=race, args=(i,))
                       for i in range(count)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            self.assertEqual([], other)
            self.assertEqual(1, len(winners), 'round %d' % round_)
            self.assertEqual(count - 1, len(losers))
            data = bytes([round_ + 1]) * 512
            winners[0].pwrite(data, round_ * 512)
            self.assertEqual(data, bytes(winners[0].pread(round_ * 512,
                                                          512)))
