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

"""Our NBD client against a server as narrow as xapi-nbd, over TLS.

xapi-nbd (xapi-project/nbd lib/server.ml) knows only NBD_OPT_EXPORT_NAME,
ABORT, LIST and STARTTLS; the client must fall back to EXPORT_NAME. The
first class checks the client; the second that the double
(:class:`tests.xenapi_fake.XapiNBDServer`) is as strict as xapi-nbd.
"""

import socket
import ssl
import struct
import time

from tests import base
from tests.functional.xenapi import test_coldcopy as cc
from tests import xenapi_fake as fake
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as c
from xsm_driver.core.nbd import tls
from xsm_driver.core.xenapi import coldcopy

MiB = 1 << 20
EXPORT = '/6f2c0a4e-0000-4000-8000-000000000001?session_id=OpaqueRef:s'


class MemDisk:
    """A disk in memory: data at a few places, zeros elsewhere."""

    def __init__(self, size=8 * MiB):
        self.data = bytearray(size)
        self.data[MiB:MiB + 4096] = b'\x11' * 4096
        self.data[5 * MiB + 512:5 * MiB + 1024] = b'\x22' * 512
        self.size = size

    def pread(self, offset, length):
        return bytes(self.data[offset:offset + length])


class XapiNBDCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.cert, (cert_file, key_file) = cc.self_signed(
            self.make_tempdir())
        self.disk = MemDisk()
        self.server = fake.XapiNBDServer(
            {EXPORT: self.disk},
            tls_context=tls.server_context(cert_file, key_file)).start()
        self.addCleanup(self.server.stop)

    def client(self, export=EXPORT, **kwargs):
        kwargs.setdefault('tls_context', coldcopy.tls_context(self.cert))
        kwargs.setdefault('server_hostname', 'xs-a1')
        return nbd_client.Client('127.0.0.1', self.server.address[1],
                                 export, timeout=5, **kwargs)


class TestClientFallsBackToExportName(XapiNBDCase):

    def test_reads_the_disk_over_tls(self):
        with self.client() as client:
            self.assertEqual(self.disk.size, client.size)
            self.assertTrue(client.can(c.NBD_FLAG_READ_ONLY))
            self.assertFalse(client.structured)
            self.assertFalse(client.has_allocation_map)
            # no block status: the whole disk is one data extent
            self.assertEqual([(self.disk.size, 0)],
                             client.block_status(0, self.disk.size))
            self.assertEqual(bytes(self.disk.data),
                             bytes(client.pread(0, self.disk.size)))
        # STARTTLS, then the modern options refused, then EXPORT_NAME
        self.assertEqual([c.NBD_OPT_STARTTLS, c.NBD_OPT_STRUCTURED_REPLY,
                          c.NBD_OPT_GO, c.NBD_OPT_EXPORT_NAME],
                         self.server.options_seen)
        # nothing xapi-nbd refuses was sent in transmission (the server's
        # thread may read the goodbye after close() has returned)
        deadline = time.monotonic() + 5
        while c.NBD_CMD_DISC not in self.server.commands_seen and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual({c.NBD_CMD_READ, c.NBD_CMD_DISC},
                         set(self.server.commands_seen))

    def test_unknown_export_is_a_clear_error(self):
        exc = self.assertRaises(nbd_client.NBDError,
                                self.client('/nope').connect)
        self.assertIn("refused export '/nope'", str(exc))

    def test_clear_text_server_refuses_tls_with_policy(self):
        plain = fake.XapiNBDServer({EXPORT: self.disk}).start()
        self.addCleanup(plain.stop)
        client = nbd_client.Client(
            '127.0.0.1', plain.address[1], EXPORT, timeout=5,
            tls_context=coldcopy.tls_context(self.cert),
            server_hostname='xs-a1')
        exc = self.assertRaises(nbd_client.TLSRefused, client.connect)
        self.assertEqual(c.NBD_REP_ERR_POLICY, exc.reply)
        # without TLS the same server is read
        with nbd_client.Client('127.0.0.1', plain.address[1], EXPORT,
                               timeout=5) as client:
            self.assertEqual(bytes(self.disk.data[MiB:MiB + 4096]),
                             bytes(client.pread(MiB, 4096)))


class TestTheDoubleIsAsStrictAsXapiNBD(XapiNBDCase):
    """Each rule of xapi-project/nbd lib/server.ml, on the raw wire."""

    def raw(self):
        sock = socket.create_connection(('127.0.0.1',
                                         self.server.address[1]), 5)
        self.addCleanup(sock.close)
        magic, opt, flags = struct.unpack('>QQH', self.recv(sock, 18))
        # fixed newstyle only: never NBD_FLAG_NO_ZEROES
        self.assertEqual(c.NBD_FLAG_FIXED_NEWSTYLE, flags)
        sock.sendall(struct.pack('>I', c.NBD_FLAG_C_FIXED_NEWSTYLE))
        return sock

    @staticmethod
    def recv(sock, n):
        data = b''
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return data
            data += chunk
        return data

    def option(self, sock, option, data=b''):
        sock.sendall(struct.pack('>QII', c.IHAVEOPT, option, len(data)) +
                     data)

    def reply(self, sock):
        head = self.recv(sock, 20)
        _magic, option, reply, length = struct.unpack('>QIII', head)
        return option, reply, self.recv(sock, length)

    def tls(self, sock):
        self.option(sock, c.NBD_OPT_STARTTLS)
        self.assertEqual(c.NBD_REP_ACK, self.reply(sock)[1])
        return coldcopy.tls_context(self.cert).wrap_socket(
            sock, server_hostname='xs-a1')

    def test_options_before_tls_need_tls(self):
        sock = self.raw()
        for option in (c.NBD_OPT_GO, c.NBD_OPT_LIST,
                       c.NBD_OPT_STRUCTURED_REPLY):
            self.option(sock, option)
            self.assertEqual(c.NBD_REP_ERR_TLS_REQD, self.reply(sock)[1])

    def test_export_name_before_tls_hangs_up(self):
        sock = self.raw()
        self.option(sock, c.NBD_OPT_EXPORT_NAME, EXPORT.encode())
        self.assertEqual(b'', self.recv(sock, 1))

    def test_only_four_options_are_known_after_tls(self):
        sock = self.tls(self.raw())
        for option in (c.NBD_OPT_GO, c.NBD_OPT_INFO,
                       c.NBD_OPT_STRUCTURED_REPLY,
                       c.NBD_OPT_SET_META_CONTEXT,
                       c.NBD_OPT_LIST_META_CONTEXT):
            self.option(sock, option)
            self.assertEqual((option, c.NBD_REP_ERR_UNSUP),
                             self.reply(sock)[:2])
        self.option(sock, c.NBD_OPT_STARTTLS)
        self.assertEqual(c.NBD_REP_ERR_INVALID, self.reply(sock)[1])
        self.option(sock, c.NBD_OPT_LIST)
        self.assertEqual(c.NBD_REP_ERR_POLICY, self.reply(sock)[1])

    def test_export_name_reply_and_transmission_rules(self):
        sock = self.tls(self.raw())
        self.option(sock, c.NBD_OPT_EXPORT_NAME, EXPORT.encode())
        size, flags = struct.unpack('>QH', self.recv(sock, 10))
        self.assertEqual(self.disk.size, size)
        self.assertEqual(c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY, flags)
        self.assertEqual(bytes(124), self.recv(sock, 124))

        def request(cmd, offset, length, handle=7):
            sock.sendall(struct.pack('>IHHQQI', c.NBD_REQUEST_MAGIC, 0, cmd,
                                     handle, offset, length))
            magic, error, got = struct.unpack('>IIQ', self.recv(sock, 16))
            self.assertEqual((c.NBD_SIMPLE_REPLY_MAGIC, handle),
                             (magic, got))
            return error

        self.assertEqual(22, request(c.NBD_CMD_READ, 100, 512))   # EINVAL
        self.assertEqual(22, request(c.NBD_CMD_READ, 0, 100))
        for cmd in (c.NBD_CMD_FLUSH, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES,
                    c.NBD_CMD_BLOCK_STATUS):
            self.assertEqual(22, request(cmd, 0, 512))
        self.assertEqual(1, request(c.NBD_CMD_WRITE, 0, 0))        # EPERM
        self.assertEqual(0, request(c.NBD_CMD_READ, MiB, 512))
        self.assertEqual(b'\x11' * 512, self.recv(sock, 512))

    def test_unknown_export_hangs_up(self):
        sock = self.tls(self.raw())
        self.option(sock, c.NBD_OPT_EXPORT_NAME, b'/other')
        self.assertEqual(b'', self.recv(sock, 1))

    def test_client_without_fixed_newstyle_is_refused(self):
        sock = socket.create_connection(('127.0.0.1',
                                         self.server.address[1]), 5)
        self.addCleanup(sock.close)
        self.recv(sock, 18)
        sock.sendall(struct.pack('>I', 0))
        try:
            self.assertEqual(b'', self.recv(sock, 1))
        except (ConnectionResetError, ssl.SSLError):
            pass
