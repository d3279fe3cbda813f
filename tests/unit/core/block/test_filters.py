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

"""Gate, fence, mirror and counter filters."""

import errno
import os
import random
import threading
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import filters
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
SLOT = 4096


class Cuttable(device.Filter):
    """A device whose link can be cut, as a network cable can."""

    def __init__(self, next_device):
        super().__init__(next_device)
        self.cut = threading.Event()

    def pwrite(self, data, offset, fua=False):
        if self.cut.is_set():
            raise device.BlockError(device='remote', errno=errno.EPIPE,
                                    reason='connection lost')
        return super().pwrite(data, offset, fua)


def raw_file(folder, name, size):
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
        f.truncate(size)
    return path


class GateTest(base.TestCase):

    def setUp(self):
        super().setUp()
        folder = self.make_tempdir()
        self.a = backends.RawDevice(raw_file(folder, 'a', MiB), True)
        self.b = backends.RawDevice(raw_file(folder, 'b', MiB), True)
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.gate = filters.Gate(self.a)

    def test_pause_holds_requests_until_resume(self):
        self.gate.pause()
        done = threading.Event()

        def write():
            self.gate.pwrite(b'x' * 512, 0)
            done.set()

        t = threading.Thread(target=write)
        t.start()
        self.assertFalse(done.wait(0.2))
        self.assertEqual(self.b, self.gate.resume(self.b) and self.gate.next)
        self.assertTrue(done.wait(5))
        t.join()
        self.assertEqual(b'x' * 512, self.b.pread(0, 512))
        self.assertEqual(bytes(512), self.a.pread(0, 512))

    def test_pause_waits_for_in_flight(self):
        release = threading.Event()
        slow = filters.Gate(_Slow(self.a, release))
        t = threading.Thread(target=slow.pwrite, args=(b'y' * 512, 0))
        t.start()
        time.sleep(0.05)
        err = self.assertRaises(device.BlockError, slow.pause, 0.1)
        self.assertEqual(errno.ETIMEDOUT, err.errno)
        self.assertFalse(slow.paused)
        release.set()
        self.assertLess(slow.pause(5), 5)
        slow.resume()
        t.join()

    def test_replacement_must_have_the_same_size(self):
        folder = self.make_tempdir()
        small = backends.RawDevice(raw_file(folder, 'c', 4096), True)
        self.addCleanup(small.close)
        with self.gate.paused_io():
            self.assertRaises(device.BlockError, self.gate.resume, small)
        self.assertIs(self.a, self.gate.next)
        self.gate.pwrite(b'z', 0)


class FenceTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.disk = Memory(MiB)
        self.fence = filters.Fence(self.disk)

    def test_every_request_after_the_seal_fails_untouched(self):
        self.fence.pwrite(b'a' * 512, 0)
        self.assertEqual(b'a' * 512, self.fence.pread(0, 512))
        self.assertFalse(self.fence.sealed)
        self.assertLess(self.fence.seal(5), 5)
        self.assertTrue(self.fence.sealed)
        before = list(self.disk.requests)
        for call in (lambda: self.fence.pwrite(b'b' * 512, 0),
                     lambda: self.fence.zero(0, 512),
                     lambda: self.fence.pread(0, 512),
                     self.fence.flush,
                     lambda: self.fence.trim(0, 512),
                     lambda: self.fence.extents(0, 512)):
            err = self.assertRaises(device.BlockError, call)
            self.assertEqual(errno.ESHUTDOWN, err.errno)
            self.assertIn('shut off', str(err))
        self.assertEqual(before, self.disk.requests)
        self.assertEqual(b'a' * 512, bytes(self.disk.data[:512]))
        self.assertLess(self.fence.seal(5), 5)     # again: nothing to do

    def test_seal_waits_for_the_requests_inside(self):
        release = threading.Event()
        slow = filters.Fence(_Slow(self.disk, release))
        t = threading.Thread(target=slow.pwrite, args=(b'y' * 512, 4096))
        t.start()
        self.addCleanup(t.join)
        self.addCleanup(release.set)
        time.sleep(0.05)
        # a write inside: the seal times out, and stays sealed
        err = self.assertRaises(device.BlockError, slow.seal, 0.1)
        self.assertEqual(errno.ETIMEDOUT, err.errno)
        self.assertIn('1 requests still inside', str(err))
        self.assertTrue(slow.sealed)
        self.assertRaises(device.BlockError, slow.pwrite, b'z' * 512, 0)
        sealed = []
        waiter = threading.Thread(target=lambda: sealed.append(
            slow.seal(10)))
        waiter.start()
        time.sleep(0.05)
        self.assertEqual([], sealed)        # the write is still inside
        release.set()
        waiter.join(10)
        t.join(10)
        self.assertEqual(1, len(sealed))
        # the write that was inside landed, the one after did not
        self.assertEqual(b'y' * 512, bytes(self.disk.data[4096:4608]))
        self.assertEqual(bytes(512), bytes(self.disk.data[:512]))

    def test_over_nbd_a_late_write_is_refused_and_lands_nowhere(self):
        server = nbd_server.Server({'d': self.fence}).start()
        self.addCleanup(server.stop)
        client = nbd_device.NBDDevice.connect(*server.address, 'd',
                                              timeout=10)
        self.addCleanup(client.close)
        client.pwrite(b'c' * 4096, 0)
        self.fence.seal(5)
        # the connection is still open: its next write fails, clearly
        err = self.assertRaises(device.BlockError, client.pwrite,
                                b'd' * 4096, 0)
        self.assertEqual(errno.ESHUTDOWN, err.errno)
        self.assertEqual(b'c' * 4096, bytes(self.disk.data[:4096]))
        self.assertEqual(1, server.connections)


class _Slow(device.Filter):

    def __init__(self, next_device, release):
        super().__init__(next_device)
        self.release = release

    def pwrite(self, data, offset, fua=False):
        self.release.wait(10)
        return super().pwrite(data, offset, fua)


class MirrorTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def test_write_is_on_both(self):
        local = backends.RawDevice(raw_file(self.dir, 'l', MiB), True)
        remote = backends.RawDevice(raw_file(self.dir, 'r', MiB), True)
        self.addCleanup(remote.close)
        mirror = filters.Mirror(local, remote)
        self.addCleanup(mirror.close)
        mirror.pwrite(b'm' * 1000, 10)
        mirror.zero(20, 10)
        mirror.trim(4096, 4096)
        mirror.flush()
        for dev in (local, remote):
            self.assertEqual(b'm' * 10 + bytes(10) + b'm' * 980,
                             bytes(dev.pread(10, 1000)))
        self.assertIs(remote, mirror.detach())
        mirror.pwrite(b'n', 0)
        self.assertEqual(b'\0', bytes(remote.pread(0, 1)))
        self.assertIsNone(mirror.failure)

    def test_hung_remote_is_dropped_after_timeout(self):
        local = backends.RawDevice(raw_file(self.dir, 'l', MiB), True)
        release = threading.Event()
        remote = _Slow(backends.RawDevice(raw_file(self.dir, 'r', MiB),
                                          True), release)
        failures = []
        mirror = filters.Mirror(local, remote, on_failure=failures.append,
                                timeout=0.2)
        self.addCleanup(mirror.close)
        self.addCleanup(remote.close)
        self.addCleanup(release.set)
        mirror.pwrite(b'h' * 512, 0)
        self.assertEqual(b'h' * 512, bytes(local.pread(0, 512)))
        self.assertEqual(1, len(failures))
        self.assertEqual(errno.ETIMEDOUT, failures[0].errno)
        self.assertIsNone(mirror.remote)

    def test_writes_swaps_and_cut(self):
        """Verified writes go on while the gate swaps and the link is cut.

        The remote is a raw file behind a link the test cuts.
        """
        size = 16 * MiB
        remote_raw = backends.RawDevice(raw_file(self.dir, 'remote', size),
                                        True)
        self.addCleanup(remote_raw.close)
        remote = Cuttable(remote_raw)
        failures = self.swaps_and_cut(size, remote, remote.cut.set,
                                      remote_raw.pread)
        self.assertEqual(errno.EPIPE, failures[0].errno)

    def test_writes_swaps_and_cut_over_nbd(self):
        """The same, mirrored to a VHD served by our NBD server.

        The cut is the server going away with requests in flight.
        """
        size = 16 * MiB
        remote_path = os.path.join(self.dir, 'remote.vhd')
        ops.create(remote_path, size)
        exported = backends.VHDDevice(remote_path, writable=True)
        server = nbd_server.Server({'disk': exported}).start()
        self.addCleanup(server.stop)
        remote = nbd_device.NBDDevice.connect(*server.address, 'disk',
                                              timeout=10)
        self.addCleanup(remote.close)
        self.swaps_and_cut(size, remote, server.stop, None)
        exported.close()
        with vhd_chain.Chain(remote_path) as written:
            self.check_remote(written.pread)

    def swaps_and_cut(self, size, remote, cut, read_remote):
        """Run the workload; check the local side; return the failures.

        Eight writers each own a region and keep writing numbered 4 KiB
        slots, reading every write back. Meanwhile the disk is snapshotted
        twice (the gate pauses, the mirror's local device becomes a new
        differencing leaf) and the mirror's link is cut. No request may
        fail, every write must read back, the cut must be reported once,
        and the remote must hold every write that completed before the cut.
        """
        writers, slots = 8, 32
        region = size // writers
        leaf = os.path.join(self.dir, 'disk0.vhd')
        ops.create(leaf, size)
        local = backends.VHDDevice(leaf, writable=True)
        failures = []
        mirror = filters.Mirror(local, remote, on_failure=failures.append)
        gate = filters.Gate(mirror)
        self.addCleanup(gate.close)
        stop, is_cut = threading.Event(), threading.Event()
        errors = []
        # per writer: {slot: (seq, completed_before_cut)} of the last write
        history = [dict() for _ in range(writers)]

        def writer(w):
            seq = 0
            try:
                while not stop.is_set():
                    slot = seq % slots
                    offset = w * region + slot * SLOT
                    data = pattern(w, seq)
                    before_cut = not is_cut.is_set()
                    gate.pwrite(data, offset)
                    if bytes(gate.pread(offset, SLOT)) != data:
                        errors.append('writer %d seq %d read back wrong'
                                      % (w, seq))
                        return
                    history[w][slot] = (seq, before_cut and
                                        not is_cut.is_set())
                    seq += 1
            except Exception as exc:
                errors.append('writer %d: %r' % (w, exc))

        threads = [threading.Thread(target=writer, args=(w,))
                   for w in range(writers)]
        for t in threads:
            t.start()
        for n in (1, 2):
            time.sleep(0.15)
            with gate.paused_io():
                old = mirror.next
                old.close()
                new_leaf = os.path.join(self.dir, 'disk%d.vhd' % n)
                ops.snapshot(new_leaf, old.name)
                mirror.next = backends.VHDDevice(new_leaf, writable=True)
        time.sleep(0.15)
        is_cut.set()
        cut()
        time.sleep(0.15)
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        self.assertEqual(1, len(failures))
        self.assertIsNone(mirror.remote)
        self.assertEqual(3, mirror.next.chain.depth)
        self.history = [(w * region, h) for w, h in enumerate(history)]
        for base_offset, slots_written in self.history:
            self.assertGreater(len(slots_written), 0)
            for slot, (seq, _before_cut) in slots_written.items():
                w = base_offset // region
                self.assertEqual(pattern(w, seq), bytes(gate.pread(
                    base_offset + slot * SLOT, SLOT)))
        if read_remote is not None:
            self.check_remote(read_remote)
        return failures

    def check_remote(self, read_remote):
        for w, (base_offset, slots_written) in enumerate(self.history):
            for slot, (seq, before_cut) in slots_written.items():
                if before_cut:
                    self.assertEqual(pattern(w, seq), bytes(read_remote(
                        base_offset + slot * SLOT, SLOT)))


def pattern(w, seq):
    return (b'%04d:%08d:' % (w, seq)) * (SLOT // 14) + bytes(SLOT % 14)


class Memory(device.BlockDevice):
    """A writable in-memory disk that records every request it gets."""

    can_write = can_flush = can_trim = can_zero = True

    def __init__(self, size, name='memory'):
        self.name = name
        self.data = bytearray(size)
        self.requests = []
        self._lock = threading.Lock()

    @property
    def size(self):
        return len(self.data)

    def pread(self, offset, length):
        self.check_range(offset, length)
        with self._lock:
            return bytes(self.data[offset:offset + length])

    def pwrite(self, data, offset, fua=False):
        data = bytes(data)
        self.check_range(offset, len(data))
        with self._lock:
            self.requests.append(('pwrite', offset, len(data)))
            self.data[offset:offset + len(data)] = data

    def zero(self, offset, length, may_trim=False):
        self.check_range(offset, length)
        with self._lock:
            self.requests.append(('zero', offset, length))
            self.data[offset:offset + length] = bytes(length)


class _WaitsForRemote(device.Filter):
    """A local device whose writes wait until the remote has started."""

    def __init__(self, next_device, started):
        super().__init__(next_device)
        self.started = started
        self.waited_in_vain = 0

    def pwrite(self, data, offset, fua=False):
        if not self.started.wait(5):
            self.waited_in_vain += 1
        return super().pwrite(data, offset, fua)


class _SignalsStart(device.Filter):

    def __init__(self, next_device, started):
        super().__init__(next_device)
        self.started = started

    def pwrite(self, data, offset, fua=False):
        self.started.set()
        return super().pwrite(data, offset, fua)


class MirrorAlignmentTest(base.TestCase):
    """The remote only gets aligned requests, and ends up like the local."""

    ALIGN = 512

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def mirror(self, local, remote, **kwargs):
        failures = []
        mirror = filters.Mirror(local, remote, on_failure=failures.append,
                                **kwargs)
        self.addCleanup(mirror.close)
        self.addCleanup(lambda: self.assertEqual([], failures))
        return mirror

    def assertAligned(self, requests, size, align=ALIGN):
        bad = [(kind, offset, length) for kind, offset, length in requests
               if offset % align or ((offset + length) % align and
                                     offset + length != size)]
        self.assertEqual([], bad)

    def hammer(self, mirror, size, threads=6, count=300, seed=0,
               region=None):
        """Unaligned writes, zeros and trims of 1 to 1000 bytes."""
        region = region or size
        errors = []

        def worker(n):
            rng = random.Random('%s-%d' % (seed, n))
            try:
                for _ in range(count):
                    length = rng.randint(1, 1000)
                    offset = rng.randrange(region - length + 1)
                    kind = rng.random()
                    if kind < 0.8:
                        mirror.pwrite(rng.randbytes(length), offset)
                    elif kind < 0.9:
                        mirror.zero(offset, length)
                    else:
                        mirror.trim(offset, length)
            except Exception as exc:
                errors.append(repr(exc))

        workers = [threading.Thread(target=worker, args=(n,))
                   for n in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        self.assertEqual([], errors)

    def test_unaligned_writes_from_threads_to_memory(self):
        size = 256 * 1024
        local, remote = Memory(size, 'local'), Memory(size, 'remote')
        mirror = self.mirror(local, remote)
        # A small region makes requests overlap, often in one sector.
        self.hammer(mirror, size, region=16 * 1024, seed=1)
        self.hammer(mirror, size, seed=2)
        self.assertEqual(bytes(local.data), bytes(remote.data))
        self.assertAligned(remote.requests, size)
        self.assertGreater(len(remote.requests), 3000)

    def test_unaligned_writes_from_threads_to_a_raw_file(self):
        size = 1024 * 1024
        local = backends.RawDevice(raw_file(self.dir, 'l', size), True)
        self.addCleanup(local.close)
        raw = backends.RawDevice(raw_file(self.dir, 'r', size), True)
        self.addCleanup(raw.close)
        recorder = Recorder(raw)
        mirror = self.mirror(local, recorder)
        self.hammer(mirror, size, region=32 * 1024, seed=3)
        self.hammer(mirror, size, seed=4)
        self.assertEqual(bytes(local.pread(0, size)),
                         bytes(raw.pread(0, size)))
        self.assertAligned(recorder.requests, size)

    def test_other_alignment_and_unaligned_device_end(self):
        size = 64 * 1024 + 100            # the last block is partial
        local, remote = Memory(size), Memory(size)
        mirror = self.mirror(local, remote, align=4096)
        self.hammer(mirror, size, threads=4, count=200, seed=5)
        mirror.pwrite(b'e' * 30, size - 50)
        self.assertEqual(('pwrite', 64 * 1024, 100), remote.requests[-1])
        mirror.pwrite(b'f' * 100, 64 * 1024)
        self.assertEqual(('pwrite', 64 * 1024, 100), remote.requests[-1])
        self.assertEqual(bytes(local.data), bytes(remote.data))
        self.assertAligned(remote.requests, size, 4096)

    def test_large_unaligned_zero_sends_its_middle_as_a_zero(self):
        size = 4 * MiB
        local, remote = Memory(size), Memory(size)
        local.data[:] = remote.data[:] = b'\xff' * size
        mirror = self.mirror(local, remote)
        mirror.zero(1000, 3 * MiB)
        mirror.trim(3 * MiB + 4196, 700)          # inside two sectors
        self.assertEqual([('pwrite', 512, 512),
                          ('zero', 1024, 3 * MiB - 512),
                          ('pwrite', 3 * MiB + 512, 512),
                          ('pwrite', 3 * MiB + 4096, 1024)],
                         remote.requests)
        self.assertEqual(bytes(local.data), bytes(remote.data))

    def test_sub_sector_write_carries_the_whole_sector(self):
        size = MiB
        local, remote = Memory(size), Memory(size)
        local.data[0:1024] = b'L' * 1024       # data the remote lacks
        mirror = self.mirror(local, remote)
        mirror.pwrite(b'x', 700)
        self.assertEqual([('pwrite', 512, 512)], remote.requests)
        self.assertEqual(b'L' * 188 + b'x' + b'L' * 323,
                         bytes(remote.data[512:1024]))

    def test_aligned_writes_go_to_both_in_parallel(self):
        size = MiB
        started = threading.Event()
        local = _WaitsForRemote(Memory(size), started)
        remote = _SignalsStart(Memory(size), started)
        mirror = self.mirror(local, remote)
        mirror.pwrite(b'a' * 4096, 8192)
        self.assertEqual(0, local.waited_in_vain)
        self.assertEqual(b'a' * 4096, bytes(remote.pread(8192, 4096)))

    def test_remote_failure_in_the_unaligned_path_is_reported(self):
        local = Memory(MiB)
        remote = Cuttable(Memory(MiB))
        remote.cut.set()
        failures = []
        mirror = filters.Mirror(local, remote, on_failure=failures.append)
        self.addCleanup(mirror.close)
        mirror.pwrite(b'u' * 10, 3)
        self.assertEqual(b'u' * 10, bytes(local.pread(3, 10)))
        self.assertEqual(1, len(failures))
        self.assertEqual(errno.EPIPE, failures[0].errno)
        self.assertIsNone(mirror.remote)
        mirror.pwrite(b'v' * 10, 3)           # goes on, locally only
        self.assertEqual(b'v' * 10, bytes(local.pread(3, 10)))


class Recorder(device.Filter):
    """Records the write requests that pass."""

    def __init__(self, next_device):
        super().__init__(next_device)
        self.requests = []
        self._lock = threading.Lock()

    def _record(self, kind, offset, length):
        with self._lock:
            self.requests.append((kind, offset, length))

    def pwrite(self, data, offset, fua=False):
        self._record('pwrite', offset, len(memoryview(data).cast('B')))
        return super().pwrite(data, offset, fua)

    def zero(self, offset, length, may_trim=False):
        self._record('zero', offset, length)
        return super().zero(offset, length, may_trim)

    def trim(self, offset, length):
        self._record('trim', offset, length)
        return super().trim(offset, length)


class CounterTest(base.TestCase):

    def test_counts(self):
        path = raw_file(self.make_tempdir(), 'c', MiB)
        counter = filters.Counter(backends.RawDevice(path, True))
        self.addCleanup(counter.close)
        counter.pwrite(b'q' * 4096, 0)
        counter.pread(0, 1000)
        counter.flush()
        self.assertRaises(device.BlockError, counter.pread, MiB, 1)
        stats = counter.stats()
        self.assertEqual({'write': 1, 'read': 2, 'flush': 1},
                         stats['requests'])
        self.assertEqual(4096, stats['bytes_written'])
        self.assertEqual(1000, stats['bytes_read'])
        self.assertEqual(1, stats['errors'])
        self.assertEqual(0, stats['in_flight'])
        self.assertEqual(1, stats['max_in_flight'])
        self.assertEqual(4, sum(stats['latency_us_histogram']))
        self.assertTrue(counter.can_write)
