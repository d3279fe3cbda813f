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

"""Who reads our NBD client's replies: the threads that wait for them.

Against our server over loopback, plain and TLS: a caller alone in flight
reads its own reply; several waiters share the reading and hand it over;
a reply nobody waits for yet is read anyway when it could block a send.
"""

import errno
import os
import threading
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server

MiB = 1024 * 1024
#: offsets of a _Held device whose FUA writes wait for their event
SLOW_A, SLOW_B = 0, MiB


class _Held(device.Filter):
    """FUA writes at ``offset`` wait until ``release[offset]`` is set.

    (The server hands FUA writes to its workers, so a held one does not
    hold the requests behind it, and replies come out of order.)
    """

    def __init__(self, next_device):
        super().__init__(next_device)
        self.release = {SLOW_A: threading.Event(),
                        SLOW_B: threading.Event()}

    def pwrite(self, data, offset, fua=False):
        if fua and offset in self.release:
            self.release[offset].wait(10)
        return super().pwrite(data, offset, fua)


class RepliesTest(base.TestCase):

    check_leaks = True
    tls_on = False

    def setUp(self):
        super().setUp()
        folder = self.make_tempdir()
        path = os.path.join(folder, 'disk')
        with open(path, 'wb') as f:
            f.truncate(64 * MiB)
        self.disk = _Held(backends.RawDevice(path, True))
        self.addCleanup(self.disk.close)
        self.server_ctx = self.client_ctx = None
        if self.tls_on:
            self.server_ctx, self.client_ctx = base.tls_contexts(
                os.path.join(folder, 'pki'))
        self.server = nbd_server.Server({'disk': self.disk}, workers=4,
                                        tls_context=self.server_ctx).start()
        self.addCleanup(self.server.stop)
        host, port = self.server.address
        self.client = nbd_client.Client(host, port, 'disk', timeout=10,
                                        tls_context=self.client_ctx,
                                        server_hostname='localhost')
        self.client.connect()
        self.addCleanup(self.client.close)
        # the threads that took the reading over, in order
        self.readers = []
        read_replies = self.client._read_replies

        def recording(done, deadline):
            self.readers.append(threading.current_thread())
            return read_replies(done, deadline)

        self.client._read_replies = recording

    def test_a_caller_alone_reads_its_own_replies(self):
        before = set(threading.enumerate())
        data = os.urandom(256 * 1024)
        self.client.pwrite(data, 4096)
        self.assertEqual(data, bytes(self.client.pread(4096, len(data))))
        pending = self.client.aio_pwrite(b'a' * 4096, 0,
                                         deadline=time.monotonic() + 10)
        self.assertIsNone(pending.wait(10))
        self.client.flush()
        self.assertEqual(b'a' * 4096, bytes(self.client.pread(0, 4096)))
        self.assertTrue(self.readers)
        self.assertEqual({threading.current_thread()}, set(self.readers))
        # no thread of the client's own was started for that
        self.assertEqual(set(), {t for t in threading.enumerate()
                                 if t.name == 'xsm-nbd-client'} - before)
        self.assertFalse(self.client._reading)

    def test_many_threads_share_the_reading(self):
        errors = []

        def work(n):
            try:
                for i in range(40):
                    at = 2 * MiB + (n * 40 + i) * 4096
                    block = bytes([n + 1, i]) * 2048
                    self.client.pwrite(block, at, fua=bool(i % 3 == 0))
                    if bytes(self.client.pread(at, 4096)) != block:
                        errors.append((n, i))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual([], errors)
        self.assertGreater(len(set(self.readers)), 1)
        self.assertFalse(self.client._reading)
        self.assertEqual({}, self.client._parked)

    def test_reading_is_handed_over_when_the_reader_gives_up(self):
        """A reader whose deadline passes wakes a parked waiter to read."""
        first = self.client.aio_pwrite(b'1' * 4096, SLOW_A, fua=True)
        second = self.client.aio_pwrite(b'2' * 4096, SLOW_B, fua=True)
        outcome = {}

        def wait_first():
            try:
                first.wait(0.3)
            except nbd_client.NBDError as exc:
                outcome['first'] = exc

        reader = threading.Thread(target=wait_first)
        reader.start()
        deadline = time.monotonic() + 5
        while not self.client._reading and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertTrue(self.client._reading)
        timer = threading.Timer(0.6, self.disk.release[SLOW_B].set)
        timer.start()
        self.addCleanup(timer.join)
        self.assertIsNone(second.wait(10))
        reader.join(10)
        self.assertEqual(errno.ETIMEDOUT, outcome['first'].errno)
        self.assertIn(reader, self.readers)
        self.assertIn(threading.current_thread(), self.readers)
        # the reply given up on is read later, by whoever waits then
        self.disk.release[SLOW_A].set()
        self.assertIsNone(first.wait(10))
        self.assertEqual(b'1' * 4096,
                         bytes(self.client.pread(SLOW_A, 4096)))

    def test_a_waiter_gets_a_reply_read_by_another(self):
        slow = self.client.aio_pwrite(b's' * 4096, SLOW_A, fua=True)
        fast = self.client.aio_pwrite(b'f' * 4096, 8192)
        woke = {}

        def wait_slow():
            slow.wait(10)
            woke['slow'] = True

        # a thread reads (for the slow reply) until that one is complete;
        # this thread's fast reply is read by it meanwhile
        reader = threading.Thread(target=wait_slow)
        reader.start()
        deadline = time.monotonic() + 5
        while not self.client._reading and time.monotonic() < deadline:
            time.sleep(0.005)
        timer = threading.Timer(0.3, self.disk.release[SLOW_A].set)
        timer.start()
        self.addCleanup(timer.join)
        self.assertIsNone(fast.wait(10))
        reader.join(10)
        self.assertTrue(woke.get('slow'))
        self.assertEqual([reader], self.readers)

    def test_unwaited_large_replies_do_not_block_a_send(self):
        """Reads pipelined before a large write, waited for after it.

        Their replies (more than the socket buffers hold) must be read
        while the write is sent, or the server stops reading and the
        write's send never ends.
        """
        size = self.client.max_request
        reads = [self.client.aio_pread(0, size) for _ in range(3)]
        data = os.urandom(8 * MiB)
        start = time.monotonic()
        writes = [self.client.aio_pwrite(data, 16 * MiB + n * 8 * MiB)
                  for n in range(3)]
        for pending in reads + writes:
            pending.wait(30)
        self.assertLess(time.monotonic() - start, 30)
        self.assertEqual(data, bytes(self.client.pread(32 * MiB, 8 * MiB)))
        self.assertTrue(any(t.name == 'xsm-nbd-client'
                            for t in self.readers))

    def test_close_fails_what_is_in_flight_and_ends_every_reader(self):
        slow = self.client.aio_pwrite(b's' * 4096, SLOW_A, fua=True)
        outcome = {}

        def wait_slow():
            try:
                slow.wait(10)
            except nbd_client.NBDError as exc:
                outcome['slow'] = exc

        waiter = threading.Thread(target=wait_slow)
        waiter.start()
        deadline = time.monotonic() + 5
        while not self.client._reading and time.monotonic() < deadline:
            time.sleep(0.005)
        start = time.monotonic()
        self.client.close()
        self.assertLess(time.monotonic() - start, 5)
        waiter.join(5)
        self.assertFalse(waiter.is_alive())
        self.assertEqual(errno.ESHUTDOWN, outcome['slow'].errno)
        self.assertFalse(self.client._reading)
        self.disk.release[SLOW_A].set()


class RepliesTLSTest(RepliesTest):

    tls_on = True
