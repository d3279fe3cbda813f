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

"""A flood of plain connections against a TLS export, with real peers.

Hundreds of idle TCP connections (no credentials needed to open one), and
more arriving all the time, while qemu-img copies the export over mutual
TLS: the copy completes bit for bit, and the server's connections (so its
threads) stay within max_handshakes plus the client's own.
"""

import logging
import os
import socket
import threading

import fixtures

from tests.functional.core.nbd.test_real_peers import PeerTestCase
from tests.functional.core.nbd.test_real_peers import read_file
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls

MAX_HANDSHAKES = 16
FLOOD = 200


class FloodTest(PeerTestCase):

    def setUp(self):
        super().setUp()
        self.creds = self.credentials()
        self.pki = os.path.dirname(self.creds[tls.CA_CERT])
        self.log = self.useFixture(fixtures.FakeLogger(
            name=nbd_server.__name__, level=logging.INFO))
        self.socks = []
        self.addCleanup(self._close_all)

    def _close_all(self):
        for sock in self.socks:
            sock.close()

    def flood(self, port, stop, peak):
        """Open a connection every 20 ms until ``stop``; note the peak."""
        while not stop.wait(0.02):
            try:
                self.socks.append(socket.create_connection(
                    ('127.0.0.1', port), timeout=5))
            except OSError:
                pass
            peak[0] = max(peak[0], self.server.connections)

    def test_qemu_img_copies_through_a_flood_of_idle_connections(self):
        self.require_command('qemu-img')
        leaf = self.make_chain()
        expected = self.export(leaf)
        self.server = nbd_server.Server(
            {'secret': self.open_vhd(leaf)},
            tls_context=self.tls_server_context(self.creds),
            list_exports=False, max_handshakes=MAX_HANDSHAKES)
        self.server.start()
        self.addCleanup(self.server.stop)
        port = self.server.address[1]
        for _ in range(FLOOD):
            self.socks.append(socket.create_connection(('127.0.0.1', port),
                                                       timeout=5))
        stop, peak = threading.Event(), [0]
        flooder = threading.Thread(target=self.flood,
                                   args=(port, stop, peak), daemon=True)
        flooder.start()
        self.addCleanup(flooder.join, 10)
        self.addCleanup(stop.set)
        out = self.path('out.raw')
        self.run_tool('qemu-img', 'convert',
                      *self.qemu_tls(self.pki, port, 'secret'), '-O', 'raw',
                      out)
        stop.set()
        flooder.join(10)
        self.assertEqual(expected, read_file(out))
        self.assertGreaterEqual(self.server.evicted,
                                FLOOD - MAX_HANDSHAKES)
        self.assertEqual(0, self.server.refused)
        # the flood's connections within max_handshakes, plus qemu-img's
        # (gone now) and those being evicted at that instant
        self.assertLessEqual(peak[0], MAX_HANDSHAKES + 8)
        # logged once for the burst, not once per connection
        self.assertLessEqual(self.log.output.count(
            'max_handshakes (16) reached'), 2)
