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

"""A flood of plain connections does not stop a migration (issue 15).

A stranger who finds the destination's NBD port opens idle connections to
it as fast as it can, from before the source's first connection until the
end; the migration still completes, the guest verifies on the destination
and the server never held more connections than its bounds allow.
"""

import socket
import threading
import time

import fixtures

from tests.functional.core.migration import test_engine
from xsm_driver.core.nbd import server as nbd_server

MiB = 1 << 20


class Flooder:
    """Plain TCP connections to every NBD server made, kept open idle."""

    def __init__(self, per_server=400):
        self.per_server = per_server
        self.servers = []
        self.sockets = []
        self.opened = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = []

    def attack(self, server):
        if server.unix:
            return                      # only local users reach those
        with self.lock:
            self.servers.append(server)
        t = threading.Thread(target=self._flood, args=(server,),
                             daemon=True)
        self.threads.append(t)
        t.start()

    def _flood(self, server):
        host, port = server.address[:2]
        for _ in range(self.per_server):
            if self.stop.is_set():
                return
            try:
                sock = socket.create_connection((host, port), timeout=2)
            except OSError:
                time.sleep(0.005)       # closed or refused: go on
                continue
            with self.lock:
                self.sockets.append(sock)
                self.opened += 1

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(10)
        with self.lock:
            for sock in self.sockets:
                sock.close()
            self.sockets = []


class TestMigrationUnderFlood(test_engine.EngineFixture):

    MAX_HANDSHAKES = 16

    def setUp(self):
        super().setUp()
        self.flooder = Flooder()
        self.addCleanup(self.flooder.close)
        for name, value in (('MAX_HANDSHAKES', self.MAX_HANDSHAKES),
                            ('HANDSHAKE_TIMEOUT', 5)):
            self.useFixture(fixtures.MonkeyPatch(
                'xsm_driver.core.nbd.server.' + name, value))
        real_start = nbd_server.Server.start
        flooder = self.flooder

        def start(server):
            result = real_start(server)
            flooder.attack(server)      # before anyone else connects
            return result
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.nbd.server.Server.start', start))

    def test_the_migration_completes_and_verifies(self):
        vm = self.make_vm(sizes=(16 * MiB,))
        vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
        mid = self.a.migrate_vm(vm['uuid'], 'host-b', vdi_map,
                                {'net0': 'net0'})
        status = self.wait(self.a, mid, timeout=120)
        self.flooder.close()
        self.assertEqual('done', status['phase'], status['error'])
        # the flood reached the servers the migration used
        self.assertGreater(len(self.flooder.servers), 0)
        self.assertGreater(self.flooder.opened, self.MAX_HANDSHAKES)
        evicted = sum(s.evicted for s in self.flooder.servers)
        self.assertGreater(evicted, 0)
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual('running', moved['power_state'])
        result = self.b.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'], result)
        self.assertEqual([], self.a.vm_list())
        self.assert_images_valid('host-b')
