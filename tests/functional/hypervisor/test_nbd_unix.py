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

"""The agent's NBD exports on a unix socket, read and written by QEMU.

A local QEMU guest's disks are the agent's exports on unix sockets
(``nbd+unix://``): qemu-io and qemu-img, QEMU's own NBD client, write and
read them; the bounds of the TCP server apply the same way.
"""

import os
import socket
import stat
import subprocess

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
SIZE = 16 * MiB
TIMEOUT = 30


class TestUnixExport(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.sock = os.path.join(self.dir, 'disk.sock')
        path = ops.create(os.path.join(self.dir, 'disk.vhd'), SIZE)
        self.dev = backends.VHDDevice(path, writable=True)
        self.addCleanup(self.dev.close)

    def serve(self, **kwargs):
        server = nbd_server.Server({'disk': self.dev}, path=self.sock,
                                   **kwargs)
        server.start()
        self.addCleanup(server.stop)
        return server

    def run_tool(self, *argv):
        self.require_command(argv[0])
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        self.assertEqual(0, result.returncode, '%s failed:\n%s%s' % (
            ' '.join(argv), result.stdout, result.stderr))
        return result.stdout

    def url(self):
        return 'nbd+unix:///disk?socket=%s' % self.sock

    def test_qemu_io_writes_and_reads_back(self):
        server = self.serve()
        self.assertEqual(self.sock, server.address)
        self.assertEqual('unix:%s' % self.sock, server.where)
        self.assertEqual(0o600, stat.S_IMODE(os.stat(self.sock).st_mode))
        out = self.run_tool(
            'qemu-io', '-f', 'raw', self.url(),
            '-c', 'write -P 0xa5 1M 3M', '-c', 'flush',
            '-c', 'read -P 0xa5 1M 3M', '-c', 'read -P 0 0 1M')
        self.assertNotIn('Pattern verification failed', out)
        self.assertEqual({0xa5}, set(self.dev.pread(2 * MiB, 4096)))

    def test_qemu_img_sees_the_size_and_copies(self):
        self.serve()
        self.dev.pwrite(b'\x5a' * MiB, 5 * MiB)
        out = self.run_tool('qemu-img', 'info', '--output=json',
                            '-f', 'raw', self.url())
        self.assertIn('"virtual-size": %d' % SIZE, out)
        copy = os.path.join(self.dir, 'copy.raw')
        self.run_tool('qemu-img', 'convert', '-f', 'raw', '-O', 'raw',
                      self.url(), copy)
        with open(copy, 'rb') as f:
            f.seek(5 * MiB)
            self.assertEqual(b'\x5a' * MiB, f.read(MiB))

    def test_stop_removes_the_socket_and_a_stale_one_is_replaced(self):
        server = nbd_server.Server({'disk': self.dev}, path=self.sock)
        server.start()
        server.stop()
        self.assertFalse(os.path.exists(self.sock))
        # A socket file left by a killed agent: nobody listens on it.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.sock)
        stale.close()
        self.serve()
        self.run_tool('qemu-io', '-f', 'raw', self.url(), '-c', 'read 0 4k')

    def test_a_live_socket_is_not_taken_over(self):
        self.serve()
        other = nbd_server.Server({'disk': self.dev}, path=self.sock)
        self.assertRaises(OSError, other.start)
        self.run_tool('qemu-io', '-f', 'raw', self.url(), '-c', 'read 0 4k')

    def test_max_connections_applies(self):
        server = self.serve(max_connections=1)
        first = socket.socket(socket.AF_UNIX)
        self.addCleanup(first.close)
        first.connect(self.sock)
        first.settimeout(TIMEOUT)
        self.assertEqual(b'NBDMAGIC', first.recv(8))
        second = socket.socket(socket.AF_UNIX)
        self.addCleanup(second.close)
        second.connect(self.sock)
        second.settimeout(TIMEOUT)
        self.assertEqual(b'', second.recv(8))      # closed at once
        self.assertEqual(1, server.refused)
