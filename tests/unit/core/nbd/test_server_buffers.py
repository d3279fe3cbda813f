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
import weakref

from tests import base
from xsm_driver.core.block import device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server

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

    check_leaks = True

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
        b, c = pool.get(256 * KiB), pool.get(256 * KiB)
        self.assertIs(a, b)
        self.assertIsNot(a, c)
        del a
        d = pool.get(256 * KiB)
        self.assertTrue(pool.put(b))
        self.assertTrue(pool.put(c))
        self.assertFalse(pool.put(d))               # only ``keep`` kept
        # anything else than its own buffers is never taken
        self.assertFalse(pool.put(bytearray(256 * KiB)))
        self.assertFalse(pool.put(memoryview(bytearray(256 * KiB))))

    def test_a_payload_gets_a_view_of_a_power_of_two_buffer(self):
        self.assertEqual(64 * KiB, nbd_server.buffer_size(64 * KiB))
        self.assertEqual(128 * KiB, nbd_server.buffer_size(64 * KiB + 1))
        self.assertEqual(4 * MiB, nbd_server.buffer_size(3 * MiB + 4 * KiB))
        self.assertEqual(32 * MiB, nbd_server.buffer_size(32 * MiB))
        pool = nbd_server._Buffers()
        view = pool.get(100 * KiB)
        self.assertIsInstance(view, memoryview)
        self.assertEqual(100 * KiB, len(view))
        buf = view.obj
        self.assertIsInstance(buf, mmap.mmap)
        self.assertEqual(128 * KiB, len(buf))
        del buf
        self.assertTrue(pool.put(view))
        # any payload that fits uses it, the smallest buffer that fits
        big = pool.get(3 * MiB)
        self.assertEqual(4 * MiB, len(big.obj))
        small = pool.get(70 * KiB)
        self.assertEqual(128 * KiB, len(small.obj))
        self.assertTrue(pool.put(big))
        self.assertTrue(pool.put(small))
        again = pool.get(64 * KiB)
        self.assertEqual(128 * KiB, len(again.obj))

    def test_a_view_someone_kept_is_never_reused(self):
        pool = nbd_server._Buffers()
        for keep in (lambda v: v[4096:8192], lambda v: memoryview(v),
                     lambda v: v):
            view = pool.get(100 * KiB)
            view[:4] = b'kept'
            buf = view.obj
            kept = keep(view)
            self.assertFalse(pool.put(view))
            fresh = pool.get(100 * KiB)
            self.assertIsNot(buf, fresh.obj)
            fresh[:4] = b'next'
            self.assertEqual(b'kept', bytes(memoryview(buf)[:4]))
            del kept, fresh

    def test_sparse_copy_sizes_keep_a_bounded_pool(self):
        # a sparse copy writes runs of every length up to its chunk: the
        # pool stays at ``keep`` buffers, not one per length
        pool = nbd_server._Buffers()
        held = []
        for i in range(400):
            size = (16 + (i * 37) % 1009) * 4 * KiB
            held.append(pool.get(size))
            if len(held) > 3:
                self.assertTrue(pool.put(held.pop(0)))
        while held:
            self.assertTrue(pool.put(held.pop()))
        self.assertLessEqual(len(pool._free), nbd_server.PAYLOAD_BUFFERS)
        self.assertTrue(all(len(b) <= 4 * MiB for b in pool._free))

    def test_buffers_are_page_aligned(self):
        from xsm_driver.core.vhd import image
        pool = nbd_server._Buffers()
        buf = pool.get(4 * MiB)
        self.assertTrue(image.direct_ok(memoryview(buf), 0))
        self.assertTrue(image.direct_ok(memoryview(buf)[2 * MiB:], 2 * MiB))


class ReuseOverTheWireTest(base.TestCase):

    check_leaks = True

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
        # 256 KiB payloads get a whole buffer, 100 KiB ones a view of one
        for size in (256 * KiB, 100 * KiB):
            for hold in ('object', 'view'):
                for slow in (0.0, 0.003):      # inline, and by the workers
                    dev = Keeper(4 * MiB, hold=hold, slow=slow)
                    self.run_writes(dev, size=size)
                    self.assertEqual(24, len(dev.kept))
                    for copy, kept in dev.kept:
                        self.assertEqual(copy, bytes(kept),
                                         (size, hold, slow))

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

    def test_buffers_in_use_are_the_writes_in_flight(self):
        # A slow device (its writes go to the workers): the buffer goes
        # back to the pool before the reply, so a client that waits for
        # each reply before its next write needs one buffer, not one
        # more whenever its next write beats the worker to the pool.
        allocated = []
        buffer_size = nbd_server.buffer_size

        def counting(size):
            allocated.append(size)
            return buffer_size(size)
        self.patch(nbd_server, 'buffer_size', counting)
        keep = nbd_server._Buffers._keep_buffer

        def late_keep(pool, buf):
            # a server thread descheduled on its way back to the pool
            threading.Event().wait(0.02)
            return keep(pool, buf)
        self.patch(nbd_server._Buffers, '_keep_buffer', late_keep)
        for slow in (0.0, 0.01):
            dev = Keeper(8 * MiB, slow=slow)
            del allocated[:]
            server = nbd_server.Server({'disk': dev}).start()
            self.addCleanup(server.stop)
            client = nbd_client.Client(*server.address, export='disk',
                                       timeout=10).connect()
            self.addCleanup(client.close)
            want = bytearray(dev.size)
            for i in range(16):
                data = os.urandom(MiB)
                offset = (i % 8) * MiB
                want[offset:offset + MiB] = data
                client.pwrite(data, offset)
            self.assertEqual(bytes(want), bytes(client.pread(0, dev.size)))
            self.assertEqual([MiB], allocated, slow)

    def test_writes_of_many_sizes_share_a_few_buffers(self):
        dev = Keeper(8 * MiB)
        allocated = []
        buffer_size = nbd_server.buffer_size

        def counting(size):
            allocated.append(size)
            return buffer_size(size)
        self.patch(nbd_server, 'buffer_size', counting)
        server = nbd_server.Server({'disk': dev}).start()
        self.addCleanup(server.stop)
        client = nbd_client.Client(*server.address, export='disk',
                                   timeout=10).connect()
        self.addCleanup(client.close)
        want = bytearray(dev.size)
        offset = 0
        for i in range(60):
            size = (16 + (i * 53) % 240) * 4 * KiB
            data = os.urandom(size)
            offset = (offset + size) % (dev.size - size) // 4096 * 4096
            want[offset:offset + size] = data
            client.pwrite(data, offset)
        client.flush()
        self.assertEqual(bytes(want), bytes(client.pread(0, dev.size)))
        # 60 sizes between 64 KiB and 1 MiB: a handful of buffers
        self.assertLessEqual(len(allocated), nbd_server.PAYLOAD_BUFFERS)
        (handler,) = list(server._handlers)
        kept = handler._buffers._free
        self.assertLessEqual(len(kept), nbd_server.PAYLOAD_BUFFERS)
        self.assertLessEqual(sum(len(b) for b in kept),
                             nbd_server.PAYLOAD_BUFFERS * MiB)

    def test_small_writes_are_not_pooled(self):
        dev = Keeper(MiB, hold='object')
        self.run_writes(dev, requests=8, size=4 * KiB)
        for copy, kept in dev.kept:
            self.assertNotIsInstance(kept, mmap.mmap)
            self.assertEqual(copy, bytes(kept))


class StopTest(base.TestCase):

    check_leaks = True

    def test_stop_unmaps_the_pool(self):
        # A stopped server lingers until a full garbage collection (its
        # connections' protocol cores are reference cycles); its pooled
        # buffers (megabytes each) must not linger with it.
        dev = Keeper(8 * MiB)
        pooled = []
        write = dev.pwrite

        def spy(data, offset, fua=False):
            buf = data if type(data) is mmap.mmap else data.obj
            pooled.append(weakref.ref(buf))
            buf = None
            write(data, offset, fua)
        dev.pwrite = spy
        server = nbd_server.Server({'disk': dev}).start()
        self.addCleanup(server.stop)
        client = nbd_client.Client(*server.address, export='disk',
                                   timeout=10).connect()
        self.addCleanup(client.close)
        for i in range(8):
            client.pwrite(os.urandom(MiB), i * MiB)
        client.close()
        self.assertEqual(8, len(pooled))
        self.assertTrue(any(ref() is not None for ref in pooled))
        server.stop()
        self.assertEqual([], [ref for ref in pooled if ref() is not None])
        # and a buffer that comes back later is not kept
        pool = server._buffers
        buf = pool.get(MiB)
        self.assertFalse(pool.put(buf))
