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

"""The server's reused write-payload buffers."""

import mmap
import os
import threading

from xsm_driver.core.block import device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.tests import base

KiB = 1024
MiB = 1024 * KiB


class Keeper(device.BlockDevice):
    """A memory disk that keeps every write payload object it is given.

    ``hold='object'`` keeps the object, ``'view'`` a memoryview of it,
    ``None`` copies the bytes and keeps nothing. ``slow`` writes sleep, so
    that the server hands them to its workers.
    """

    can_write = can_flush = True

    def __init__(self, size, hold=None, slow=0.0):
        self.name = 'keeper'
        self._size = size
        self.hold = hold
        self.slow = slow
        self.data = bytearray(size)
        self.kept = []
        self.lock = threading.Lock()

    @property
    def size(self):
        return self._size

    def pread(self, offset, length):
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data, offset, fua=False):
        if self.slow:
            threading.Event().wait(self.slow)
        with self.lock:
            self.data[offset:offset + len(data)] = data
            if self.hold == 'object':
                self.kept.append((bytes(data), data))
            elif self.hold == 'view':
                self.kept.append((bytes(data), memoryview(data)))

    def flush(self):
        pass


class BuffersTest(base.TestCase):

    def test_reused_only_when_nobody_holds_it(self):
        pool = nbd_server._Buffers(keep=2)
        a = pool.get(256 * KiB)
        self.assertIsInstance(a, mmap.mmap)
        self.assertEqual(256 * KiB, len(a))
        self.assertTrue(pool.put(a))
        self.assertIs(a, pool.get(256 * KiB))
        view = memoryview(a)
        self.assertFalse(pool.put(a))               # a view is alive
        view.release()
        other = [a]
        self.assertFalse(pool.put(a))               # another reference
        del other
        self.assertTrue(pool.put(a))
        # another size is another buffer, and only ``keep`` are kept
        self.assertIsNot(a, pool.get(128 * KiB))
        b, c = pool.get(256 * KiB), pool.get(256 * KiB)
        self.assertIs(a, b)
        del a
        d = pool.get(256 * KiB)
        self.assertTrue(pool.put(b))
        self.assertTrue(pool.put(c))
        self.assertFalse(pool.put(d))
        # anything else than its own buffers is never taken
        self.assertFalse(pool.put(bytearray(256 * KiB)))

    def test_buffers_are_page_aligned(self):
        from xsm_driver.core.vhd import image
        pool = nbd_server._Buffers()
        buf = pool.get(4 * MiB)
        self.assertTrue(image.direct_ok(memoryview(buf), 0))
        self.assertTrue(image.direct_ok(memoryview(buf)[2 * MiB:], 2 * MiB))


class ReuseOverTheWireTest(base.TestCase):

    def run_writes(self, dev, requests=24, size=256 * KiB):
        server = nbd_server.Server({'disk': dev}).start()
        self.addCleanup(server.stop)
        client = nbd_client.Client(*server.address, export='disk',
                                   timeout=10).connect()
        self.addCleanup(client.close)
        want = bytearray(dev.size)
        pendings = []
        for i in range(requests):
            data = os.urandom(size)
            offset = (i * size) % (dev.size - size)
            want[offset:offset + size] = data
            pendings.append(client.aio_pwrite(data, offset))
            if len(pendings) >= 4:
                pendings.pop(0).wait(10)
        for pending in pendings:
            pending.wait(10)
        client.flush()
        self.assertEqual(bytes(want), bytes(client.pread(0, dev.size)))
        return client

    def test_a_device_that_keeps_payloads_sees_them_unchanged(self):
        for hold in ('object', 'view'):
            for slow in (0.0, 0.003):      # inline, and by the workers
                dev = Keeper(4 * MiB, hold=hold, slow=slow)
                self.run_writes(dev)
                self.assertEqual(24, len(dev.kept))
                for copy, kept in dev.kept:
                    self.assertEqual(copy, bytes(kept), (hold, slow))

    def test_a_device_that_keeps_nothing_gets_reused_buffers(self):
        dev = Keeper(4 * MiB)
        seen = []
        write = dev.pwrite

        def spy(data, offset, fua=False):
            seen.append(id(data))
            write(data, offset, fua)
        dev.pwrite = spy
        self.run_writes(dev)
        self.assertEqual(24, len(seen))
        self.assertLessEqual(len(set(seen)), nbd_server.PAYLOAD_BUFFERS + 1)

    def test_small_writes_are_not_pooled(self):
        dev = Keeper(MiB, hold='object')
        self.run_writes(dev, requests=8, size=4 * KiB)
        for copy, kept in dev.kept:
            self.assertNotIsInstance(kept, mmap.mmap)
            self.assertEqual(copy, bytes(kept))
