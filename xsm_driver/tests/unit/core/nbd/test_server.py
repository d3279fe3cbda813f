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

from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import protocol
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops
from xsm_driver.tests import base

MiB = 1024 * 1024
HOLE = device.HOLE | device.ZERO


class ServerTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.vhd = os.path.join(self.dir, 'disk.vhd')
        ops.create(self.vhd, 64 * MiB)
        self.dev = backends.VHDDevice(self.vhd, writable=True)
        self.addCleanup(self.dev.close)

    def serve(self, exports=None, **kwargs):
        server = nbd_server.Server(exports or {'disk': self.dev}, **kwargs)
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
