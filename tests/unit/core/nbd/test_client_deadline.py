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

"""Send deadlines of our NBD client, and the mirror sending through them.

The peer that matters is a server that stops reading: our own server
whose connection, once in transmission, never reads again (the socket
buffers of both ends fill, then the client's send blocks). Over loopback,
plain and TLS.
"""

import errno
import os
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import filters
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server

MiB = 1024 * 1024
#: how long a send may block
DEADLINE = 0.5
#: what the watchdog may add to it on a busy test machine
SLACK = 1.5
#: 4 MiB writes sent before the buffers are surely full (loopback buffers
#: grow to a few MiB each way)
MAX_WRITES = 64


def _never_read(handler, dev):
    """A connection in transmission that never reads a request."""
    handler.server._stopping.wait()


def raw_file(folder, name, size):
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
        f.truncate(size)
    return backends.RawDevice(path, True)


class DeadlineTestCase(base.TestCase):

    tls_on = False

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.exported = raw_file(self.dir, 'exported', 64 * MiB)
        self.addCleanup(self.exported.close)
        self.server_ctx = self.client_ctx = None
        if self.tls_on:
            self.server_ctx, self.client_ctx = base.tls_contexts(
                os.path.join(self.dir, 'pki'))

    def serve(self, reading=True):
        if not reading:
            self.patch(nbd_server._Handler, '_transmit', _never_read)
        server = nbd_server.Server({'disk': self.exported},
                                   tls_context=self.server_ctx).start()
        self.addCleanup(server.stop)
        return server

    def connect(self, server):
        host, port = server.address
        client = nbd_client.Client(host, port, 'disk', timeout=10,
                                   tls_context=self.client_ctx,
                                   server_hostname='localhost').connect()
        self.addCleanup(client.close)
        return client


class ClientDeadlineTest(DeadlineTestCase):

    def test_send_to_a_server_that_stopped_reading_ends_at_its_deadline(self):
        client = self.connect(self.serve(reading=False))
        data = os.urandom(4 * MiB)
        pendings, blocked_for = [], 0.0
        for n in range(MAX_WRITES):
            start = time.monotonic()
            try:
                pendings.append(client.aio_pwrite(
                    data, (n % 16) * 4 * MiB, deadline=start + DEADLINE))
            except nbd_client.NBDError as exc:
                # the connection failed while this one waited for its turn
                self.assertEqual(errno.ETIMEDOUT, exc.errno)
            blocked_for = max(blocked_for, time.monotonic() - start)
            if client._failure is not None:
                break
        else:
            self.fail('%d MiB went to a server that reads nothing, without '
                      'a send ever blocking' % (4 * MAX_WRITES))
        self.assertLess(blocked_for, DEADLINE + SLACK)
        self.assertGreater(blocked_for, DEADLINE / 2)
        # every request failed with the deadline, none waits for a reply
        for pending in pendings:
            exc = self.assertRaises(nbd_client.NBDError, pending.wait, 1)
            self.assertEqual(errno.ETIMEDOUT, exc.errno)
            self.assertIn('could not be sent in time', str(exc))
        # nothing more is sent on the connection (no frame after a cut one)
        start = time.monotonic()
        exc = self.assertRaises(nbd_client.NBDError, client.aio_pwrite,
                                b'x' * 512, 0, deadline=start + DEADLINE)
        self.assertEqual(errno.ETIMEDOUT, exc.errno)
        self.assertLess(time.monotonic() - start, 0.1)
        start = time.monotonic()
        client.close()
        self.assertLess(time.monotonic() - start, SLACK)
        self.assertFalse(client._reading)
        client._watcher.join(SLACK)
        self.assertFalse(client._watcher.is_alive())

    def test_a_send_done_in_time_outlives_its_deadline(self):
        """The watchdog waking after a finished send leaves it alone."""
        client = self.connect(self.serve())
        client.pwrite(b'p' * 4096, 0)             # no deadline, no watchdog
        self.assertIsNone(client._watcher)
        for n in range(3):
            pending = client.aio_pwrite(b'%d' % n * 4096, 4096 * n,
                                        deadline=time.monotonic() + 0.1)
            self.assertIsNone(pending.wait(5))
            time.sleep(0.2)                       # past the deadline
        self.assertTrue(client._watcher.is_alive())
        self.assertIsNone(client._failure)
        self.assertEqual(b'2' * 4096, bytes(client.pread(8192, 4096)))
        # a long deadline, then a short one: the watchdog is re-armed
        client.aio_pwrite(b'l' * 4096, 0, deadline=time.monotonic() + 60)
        client.aio_pwrite(b's' * 4096, 0,
                          deadline=time.monotonic() + 0.05).wait(5)
        time.sleep(0.1)
        self.assertIsNone(client._failure)
        self.assertEqual(b's' * 4096, bytes(self.exported.pread(0, 4096)))
        client.close()
        client._watcher.join(SLACK)
        self.assertFalse(client._watcher.is_alive())

    def test_the_watchdog_of_a_failed_connection_ends_before_close(self):
        server = self.serve()
        client = self.connect(server)
        client.aio_pwrite(b'a' * 4096, 0,
                          deadline=time.monotonic() + 5).wait(5)
        self.assertTrue(client._watcher.is_alive())
        server.stop()                    # the connection is gone
        self.assertRaises(nbd_client.NBDError, client.pwrite, b'b' * 4096, 0)
        self.assertIsNotNone(client._failure)
        # nothing is sent on a failed connection: nothing left to watch
        client._watcher.join(SLACK)
        self.assertFalse(client._watcher.is_alive())

    def test_waiting_for_the_send_lock_ends_at_the_deadline(self):
        client = self.connect(self.serve())
        client._send.acquire()          # another sender, stuck
        try:
            start = time.monotonic()
            exc = self.assertRaises(nbd_client.NBDError, client.aio_pwrite,
                                    b'w' * 512, 0, deadline=start + 0.2)
            took = time.monotonic() - start
        finally:
            client._send.release()
        self.assertEqual(errno.ETIMEDOUT, exc.errno)
        self.assertGreater(took, 0.15)
        self.assertLess(took, SLACK)
        # nothing was sent: the connection goes on
        self.assertIsNone(client._failure)
        client.pwrite(b'a' * 512, 0)
        self.assertEqual(b'a' * 512, bytes(client.pread(0, 512)))


class ClientDeadlineTLSTest(ClientDeadlineTest):

    tls_on = True


class MirrorDeadlineTest(DeadlineTestCase):

    def mirror(self, server, timeout=DEADLINE):
        host, port = server.address
        remote = nbd_device.NBDDevice.connect(
            host, port, 'disk', tls_context=self.client_ctx,
            server_hostname='localhost', timeout=10)
        self.addCleanup(remote.close)
        local = raw_file(self.dir, 'local', 64 * MiB)
        failures = []
        mirror = filters.Mirror(local, remote, on_failure=failures.append,
                                timeout=timeout)
        self.addCleanup(mirror.close)
        return mirror, remote, failures

    def test_remote_that_stopped_reading_is_dropped_within_the_timeout(self):
        # 32 MiB: more than the socket buffers of both ends hold, so the
        # send itself blocks (not only the wait for the reply)
        mirror, remote, failures = self.mirror(self.serve(reading=False))
        data = os.urandom(32 * MiB)
        start = time.monotonic()
        mirror.pwrite(data, 16 * MiB)
        took = time.monotonic() - start
        self.assertLess(took, DEADLINE + SLACK)
        # the guest's write succeeded locally
        self.assertEqual(data, bytes(mirror.pread(16 * MiB, 32 * MiB)))
        self.assertIsNone(mirror.remote)
        self.assertEqual(1, len(failures))
        self.assertEqual(errno.ETIMEDOUT, failures[0].errno)
        self.assertIn('could not be sent in time', str(failures[0]))
        self.assertIs(failures[0], mirror.failure)
        mirror.pwrite(b'after' * 100, 0)          # local only from now on
        self.assertEqual(b'after' * 100, bytes(mirror.pread(0, 500)))
        self.assertEqual(1, len(failures))

    def test_remote_that_does_not_answer_is_dropped_within_the_timeout(self):
        # a small write fits in the buffers: its reply never comes
        mirror, remote, failures = self.mirror(self.serve(reading=False))
        start = time.monotonic()
        mirror.pwrite(b'q' * 4096, 8192)
        self.assertLess(time.monotonic() - start, DEADLINE + SLACK)
        self.assertEqual(b'q' * 4096, bytes(mirror.pread(8192, 4096)))
        self.assertIsNone(mirror.remote)
        self.assertEqual(1, len(failures))
        self.assertEqual(errno.ETIMEDOUT, failures[0].errno)
        self.assertIn('no answer within', str(failures[0]))

    def test_writes_are_sent_from_the_guest_thread(self):
        """No worker thread: aligned and unaligned writes, both copies."""
        mirror, remote, failures = self.mirror(self.serve(), timeout=10)
        handed_off = []
        submit = mirror._pool.submit
        self.patch(mirror._pool, 'submit', lambda *args: (
            handed_off.append(args), submit(*args))[1])
        data = os.urandom(MiB)
        mirror.pwrite(data, 3 * MiB)                  # aligned
        mirror.pwrite(b'u' * 700, 5 * MiB + 100)     # unaligned
        mirror.pwrite(b'f' * 4096, 0, fua=True)
        self.assertEqual([], handed_off)
        mirror.flush()                                # through the pool
        self.assertEqual(1, len(handed_off))
        self.assertEqual([], failures)
        for dev in (mirror.next, remote):
            self.assertEqual(data, bytes(dev.pread(3 * MiB, MiB)))
            self.assertEqual(bytes(100) + b'u' * 700 + bytes(224),
                             bytes(dev.pread(5 * MiB, 1024)))
            self.assertEqual(b'f' * 4096, bytes(dev.pread(0, 4096)))

    def test_write_past_the_end_fails_locally_and_keeps_the_remote(self):
        mirror, remote, failures = self.mirror(self.serve(), timeout=10)
        exc = self.assertRaises(device.BlockError, mirror.pwrite,
                                b'e' * 4096, 64 * MiB - 2048)
        self.assertEqual(errno.EINVAL, exc.errno)
        self.assertIs(remote, mirror.remote)
        self.assertEqual([], failures)

    def test_remote_whose_connection_broke_is_dropped(self):
        mirror, remote, failures = self.mirror(self.serve(), timeout=10)
        remote.client.abort()
        mirror.pwrite(b'g' * 4096, 4096)
        self.assertEqual(b'g' * 4096, bytes(mirror.pread(4096, 4096)))
        self.assertEqual(1, len(failures))
        self.assertEqual(errno.ECONNABORTED, failures[0].errno)
        self.assertIsNone(mirror.remote)


class MirrorDeadlineTLSTest(MirrorDeadlineTest):

    tls_on = True
