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

"""Over TLS, the NBD connections receive into buffers they keep.

``SSLSocket.recv(n)`` allocates ``n`` bytes before it waits (and returns
one 16 KiB record at most): an idle reader would hold that much for as
long as it waits. ``recv_into`` a connection's own buffer allocates
nothing.
"""

import os
import ssl

from tests import base
from tests.unit.core.nbd import test_server_buffers
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server

MiB = 1024 * 1024


class ReceiveTest(base.TestCase):

    def test_tls_connections_never_recv_a_new_buffer(self):
        server_ctx, client_ctx = base.tls_contexts(self.make_tempdir())
        asked, into = [], []
        recv, recv_into = ssl.SSLSocket.recv, ssl.SSLSocket.recv_into

        def spy_recv(sock, buflen=1024, flags=0):
            asked.append(buflen)
            return recv(sock, buflen, flags)

        def spy_recv_into(sock, buffer, nbytes=None, flags=0):
            into.append(len(buffer))
            return recv_into(sock, buffer, nbytes, flags)
        self.patch(ssl.SSLSocket, 'recv', spy_recv)
        self.patch(ssl.SSLSocket, 'recv_into', spy_recv_into)
        dev = test_server_buffers.Keeper(8 * MiB)
        server = nbd_server.Server({'disk': dev},
                                   tls_context=server_ctx).start()
        self.addCleanup(server.stop)
        client = nbd_client.Client(*server.address, export='disk',
                                   tls_context=client_ctx,
                                   server_hostname='localhost',
                                   timeout=10).connect()
        self.addCleanup(client.close)
        data = os.urandom(2 * MiB)
        for i in range(4):
            client.pwrite(data, i * 2 * MiB)
        client.flush()
        self.assertEqual(data, bytes(client.pread(2 * MiB, 2 * MiB)))
        self.assertEqual(bytes(data), bytes(dev.data[:2 * MiB]))
        self.assertEqual([], asked)
        self.assertTrue(into)
