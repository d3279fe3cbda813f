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

"""The sparse copier, its rate limiter and its progress."""

import errno
import os
import threading
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import filters
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.migration import copy
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import ops

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB


class Slow(device.Filter):
    """Sleep before each read and/or write."""

    def __init__(self, next_device, read=0.0, write=0.0, on_read=None):
        super().__init__(next_device)
        self.read_delay, self.write_delay = read, write
        self.on_read = on_read
        self.reads = 0
        self._lock = threading.Lock()

    def pread(self, offset, length):
        with self._lock:
            self.reads += 1
            n = self.reads
        if self.on_read is not None:
            self.on_read(n)
        time.sleep(self.read_delay)
        return super().pread(offset, length)

    def pwrite(self, data, offset, fua=False):
        time.sleep(self.write_delay)
        return super().pwrite(data, offset, fua)


class Failing(device.Filter):
    """Fail the ``nth`` write (and every later one)."""

    def __init__(self, next_device, nth, op='pwrite'):
        super().__init__(next_device)
        self.nth, self.op = nth, op
        self.calls = 0
        self.error = device.BlockError(device='failing', reason='disk on '
                                       'fire', errno=errno.ENOSPC)
        self._lock = threading.Lock()

    def _tick(self):
        with self._lock:
            self.calls += 1
            if self.calls >= self.nth:
                raise self.error

    def pread(self, offset, length):
        if self.op == 'pread':
            self._tick()
        return super().pread(offset, length)

    def pwrite(self, data, offset, fua=False):
        if self.op == 'pwrite':
            self._tick()
        return super().pwrite(data, offset, fua)


class CopyTestCase(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.threads_before = threading.active_count()
        self.dir = self.make_tempdir()

    def assertNoThreadsLeft(self, wait=0.0):
        deadline = time.monotonic() + wait
        while (threading.active_count() > self.threads_before and
               time.monotonic() < deadline):
            time.sleep(0.02)
        self.assertEqual(self.threads_before, threading.active_count(),
                         [t.name for t in threading.enumerate()])

    def make_chain(self, size=SIZE):
        """A two-image VHD chain with scattered data in both images."""
        base_path = os.path.join(self.dir, 'base.vhd')
        leaf_path = os.path.join(self.dir, 'leaf.vhd')
        ops.create(base_path, size)
        with vhd_chain.Chain(base_path, writable=True) as c:
            c.pwrite(os.urandom(3 * MiB + 512), 1 * MiB)
            c.pwrite(os.urandom(4096), 20 * MiB)
            c.pwrite(os.urandom(512), size - 512)
        ops.snapshot(leaf_path, base_path)
        with vhd_chain.Chain(leaf_path, writable=True) as c:
            c.pwrite(os.urandom(MiB), 2 * MiB)          # over the base
            c.pwrite(os.urandom(8192), 40 * MiB + 512)
            c.pwrite(bytes(4096), 50 * MiB)             # written zeros
        src = backends.VHDDevice(leaf_path)
        self.addCleanup(src.close)
        return src

    def make_raw(self, size=SIZE, name='dst.raw'):
        path = os.path.join(self.dir, name)
        with open(path, 'wb') as f:
            f.truncate(size)
        dev = backends.RawDevice(path, writable=True)
        self.addCleanup(dev.close)
        return dev

    def make_src(self, nchunks, chunk, name='src.raw'):
        dev = self.make_raw(nchunks * chunk, name)
        for i in range(nchunks):
            dev.pwrite(bytes([i % 251 + 1]) * chunk, i * chunk)
        return dev

    @staticmethod
    def allocated(dev, chunk=copy.CHUNK):
        return sum(n for _o, n in plan.split_extents(
            dev.extents(0, dev.size), chunk))

    def assertSameContent(self, a, b):
        self.assertEqual(a.size, b.size)
        step = 8 * MiB
        for pos in range(0, a.size, step):
            n = min(step, a.size - pos)
            if bytes(a.pread(pos, n)) != bytes(b.pread(pos, n)):
                self.fail('content differs in %d+%d' % (pos, n))


class CopyTest(CopyTestCase):

    def test_vhd_chain_into_raw_file_copies_only_allocated(self):
        src = self.make_chain()
        expected = self.allocated(src)
        self.assertLess(expected, 8 * MiB)
        dst = filters.Counter(self.make_raw())
        progress = copy.Progress()
        copied = copy.copy_allocated(src, dst, progress=progress)
        self.assertEqual(expected, copied)
        stats = dst.stats()
        self.assertEqual(expected, stats['bytes_written'])
        self.assertEqual(0, stats['bytes_read'])
        self.assertEqual(1, stats['requests']['flush'])
        self.assertEqual(expected, progress.done)
        self.assertEqual(expected, progress.total)
        self.assertEqual(100.0, progress.snapshot()['percent'])
        self.assertSameContent(src, dst)
        self.assertNoThreadsLeft()

    def test_into_tls_nbd_export(self):
        src = self.make_chain()
        expected = self.allocated(src)
        dst_path = os.path.join(self.dir, 'dst.vhd')
        ops.create(dst_path, SIZE)
        export = backends.VHDDevice(dst_path, writable=True)
        self.addCleanup(export.close)
        server_creds = credentials.Credentials.make(
            os.path.join(self.dir, 'server-pki'), 'server', ['127.0.0.1'])
        client_creds = credentials.Credentials.make(
            os.path.join(self.dir, 'client-pki'), 'client')
        server = nbd_server.Server(
            {'disk': export}, list_exports=False,
            tls_context=server_creds.server_context(client_creds.ca_pem))
        server.start()
        self.addCleanup(server.stop)
        remote = nbd_device.NBDDevice.connect(
            *server.address, export='disk', timeout=10,
            tls_context=client_creds.client_context(server_creds.ca_pem))
        self.addCleanup(remote.close)
        dst = filters.Counter(remote)
        copied = copy.copy_allocated(src, dst, chunk=MiB, depth=4)
        self.assertEqual(expected, copied)
        self.assertEqual(expected, dst.stats()['bytes_written'])
        self.assertSameContent(src, remote)
        # The destination image holds data only where the source does.
        with vhd_chain.Chain(dst_path) as c:
            got = [(o, n) for o, n, alloc in c.extents() if alloc]
        want = [(o, n) for o, n, flags in src.extents(0, SIZE)
                if not flags & device.ZERO]
        self.assertEqual(want, got)
        remote.close()
        server.stop()
        self.assertNoThreadsLeft(wait=5)

    def test_into_several_tls_connections_of_one_export(self):
        src = self.make_chain()
        expected = self.allocated(src, 256 * KiB)
        dst_path = os.path.join(self.dir, 'dst.vhd')
        ops.create(dst_path, SIZE)
        export = backends.VHDDevice(dst_path, writable=True)
        self.addCleanup(export.close)
        server_creds = credentials.Credentials.make(
            os.path.join(self.dir, 'server-pki'), 'server', ['127.0.0.1'])
        client_creds = credentials.Credentials.make(
            os.path.join(self.dir, 'client-pki'), 'client')
        names = [nbd_server.unguessable_name() for _ in range(3)]
        server = nbd_server.Server(
            {}, list_exports=False,
            tls_context=server_creds.server_context(client_creds.ca_pem))
        for name in names:
            server.add_export(name, export, once=True)
        server.start()
        self.addCleanup(server.stop)
        remotes = []
        for name in names:
            remote = nbd_device.NBDDevice.connect(
                *server.address, export=name, timeout=10,
                tls_context=client_creds.client_context(server_creds.ca_pem))
            self.addCleanup(remote.close)
            remotes.append(filters.Counter(remote))
        # Each worker's first read waits for the others': every worker,
        # so every connection, then writes at least one chunk, however
        # late the machine starts some of the threads.
        depth = min(6, expected // (256 * KiB))
        barrier = threading.Barrier(depth, timeout=30)
        slow = Slow(src, on_read=lambda n: n <= depth and barrier.wait())
        copied = copy.copy_allocated(slow, remotes, chunk=256 * KiB,
                                     depth=depth)
        self.assertEqual(expected, copied)
        written = [r.stats()['bytes_written'] for r in remotes]
        self.assertEqual(expected, sum(written))
        # every connection carried a share, and each was flushed
        for r in remotes:
            self.assertGreater(r.stats()['bytes_written'], 0)
            self.assertEqual(1, r.stats()['requests']['flush'])
        self.assertSameContent(src, remotes[0])
        for r in remotes:
            r.close()
        server.stop()
        with vhd_chain.Chain(dst_path) as c:
            got = [(o, n) for o, n, alloc in c.extents() if alloc]
        want = [(o, n) for o, n, flags in src.extents(0, SIZE)
                if not flags & device.ZERO]
        self.assertEqual(want, got)
        self.assertNoThreadsLeft(wait=5)

    def test_error_of_one_of_several_destinations_stops_all(self):
        src = self.make_src(64, 64 * KiB)
        raw = self.make_raw(src.size)
        good = filters.Counter(Slow(raw, write=0.005))
        bad = Failing(Slow(raw, write=0.005), nth=3)
        err = self.assertRaises(device.BlockError, copy.copy_allocated,
                                src, [good, bad], chunk=64 * KiB, depth=4)
        self.assertIs(bad.error, err)
        self.assertLess(good.stats()['bytes_written'], 64 * 64 * KiB)
        self.assertNotIn('flush', good.stats()['requests'])
        self.assertNoThreadsLeft()

    def test_no_destination(self):
        src = self.make_src(1, 4096)
        self.assertRaises(ValueError, copy.copy_allocated, src, [])

    def test_raw_source_with_holes(self):
        src = self.make_raw(name='src.raw')
        src.pwrite(os.urandom(MiB), 8 * MiB)
        src.pwrite(os.urandom(4096), 30 * MiB)
        dst = filters.Counter(self.make_raw())
        copied = copy.copy_allocated(src, dst, chunk=256 * KiB)
        self.assertEqual(self.allocated(src, 256 * KiB), copied)
        self.assertLessEqual(copied, 4 * MiB)     # file systems round up
        self.assertEqual(copied, dst.stats()['bytes_written'])
        self.assertSameContent(src, dst)

    def test_given_ranges_are_cut_to_chunks(self):
        src = self.make_src(4, 256 * KiB)
        dst = filters.Counter(self.make_raw(src.size))
        copied = copy.copy_allocated(src, dst, ranges=[(0, 600 * KiB)],
                                     chunk=256 * KiB, depth=2)
        self.assertEqual(600 * KiB, copied)
        self.assertEqual(3, dst.stats()['requests']['write'])
        self.assertEqual(bytes(src.pread(0, 600 * KiB)),
                         bytes(dst.pread(0, 600 * KiB)))
        self.assertEqual(bytes(424 * KiB), bytes(dst.pread(600 * KiB,
                                                           424 * KiB)))

    def test_nothing_to_copy(self):
        src = self.make_raw(name='empty.raw')
        dst = filters.Counter(self.make_raw())
        progress = copy.Progress()
        self.assertEqual(0, copy.copy_allocated(src, dst, ranges=[],
                                                progress=progress))
        self.assertEqual(100.0, progress.snapshot()['percent'])
        self.assertNoThreadsLeft()

    def test_requests_in_flight_up_to_depth(self):
        src = self.make_src(16, 64 * KiB)
        dst = filters.Counter(Slow(self.make_raw(src.size), write=0.02))
        copy.copy_allocated(src, dst, chunk=64 * KiB, depth=4)
        self.assertEqual(4, dst.stats()['max_in_flight'])
        self.assertSameContent(src, dst)
        self.assertNoThreadsLeft()

    def copy_all(self, pairs, budget):
        """Copy each (src, dst) pair in a thread of its own, sharing budget."""
        threads = [threading.Thread(target=copy.copy_allocated,
                                    args=(src, dst),
                                    kwargs={'chunk': 64 * KiB, 'depth': 4,
                                            'budget': budget})
                   for src, dst in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    def test_copies_sharing_a_budget_hold_at_most_its_chunks(self):
        held = {'now': 0, 'max': 0}
        lock = threading.Lock()

        def read(n):
            with lock:
                held['now'] += 1
                held['max'] = max(held['max'], held['now'])

        class Written(Slow):
            def pwrite(self, data, offset, fua=False):
                super().pwrite(data, offset, fua)
                with lock:
                    held['now'] -= 1

        budget = threading.BoundedSemaphore(3)
        pairs = []
        for i in range(3):
            src = Slow(self.make_src(12, 64 * KiB, 'src%d.raw' % i),
                       on_read=read)
            pairs.append((src, Written(self.make_raw(src.size,
                                                     'dst%d.raw' % i),
                                       write=0.01)))
        self.copy_all(pairs, budget)
        # 3 copies of depth 4 would hold 12 chunks at once without it
        self.assertEqual(3, held['max'])
        self.assertEqual(0, held['now'])
        for src, dst in pairs:
            self.assertSameContent(src, dst)
        self.assertNoThreadsLeft()

    def test_copies_sharing_buffers_reuse_them(self):
        budget = copy.Buffers(3, 64 * KiB)
        pairs = []
        for i in range(3):
            src = self.make_src(12, 64 * KiB, 'src%d.raw' % i)
            pairs.append((src, Slow(self.make_raw(src.size, 'dst%d.raw' % i),
                                    write=0.005)))
        self.copy_all(pairs, budget)
        # 36 chunks through 3 buffers, each made once and kept
        self.assertEqual(3, budget.made)
        self.assertEqual(3, len(budget._free))
        for src, dst in pairs:
            self.assertSameContent(src, dst)
        self.assertNoThreadsLeft()

    def test_a_buffer_a_device_kept_is_not_reused(self):
        kept = []

        class Keeping(device.Filter):
            def pwrite(self, data, offset, fua=False):
                kept.append((offset, data))
                return self.next.pwrite(data, offset, fua)

        src = self.make_src(16, 64 * KiB)
        dst = Keeping(self.make_raw(src.size))
        budget = copy.Buffers(2, 64 * KiB)
        copy.copy_allocated(src, dst, chunk=64 * KiB, depth=2,
                            budget=budget)
        self.assertSameContent(src, dst)
        self.assertEqual(16, len(kept))
        self.assertEqual(16, budget.made)
        for offset, data in kept:       # not overwritten by a later chunk
            self.assertEqual(bytes(src.pread(offset, 64 * KiB)),
                             bytes(data))

    def test_buffers_refuse_nothing(self):
        self.assertRaises(ValueError, copy.Buffers, 0, MiB)
        self.assertRaises(ValueError, copy.Buffers, 1, 0)

    def test_a_copy_waiting_for_the_budget_can_be_cancelled(self):
        budget = threading.BoundedSemaphore(1)
        budget.acquire()                # another copy holds it all
        cancel = threading.Event()
        threading.Timer(0.2, cancel.set).start()
        src = self.make_src(4, 64 * KiB)
        dst = filters.Counter(self.make_raw(src.size))
        start = time.monotonic()
        self.assertRaises(errors.MigrationAborted, copy.copy_allocated,
                          src, dst, chunk=64 * KiB, depth=2, cancel=cancel,
                          budget=budget)
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(0, dst.stats()['bytes_written'])
        budget.release()
        self.assertNoThreadsLeft(wait=1.0)

    def test_cancel_stops_promptly(self):
        cancel = threading.Event()

        def on_read(n):
            if n == 5:
                cancel.set()

        src = Slow(self.make_src(64, 64 * KiB), read=0.02, on_read=on_read)
        dst = filters.Counter(self.make_raw(src.size))
        progress = copy.Progress()
        start = time.monotonic()
        err = self.assertRaises(errors.MigrationAborted, copy.copy_allocated,
                                src, dst, chunk=64 * KiB, depth=4,
                                progress=progress, cancel=cancel,
                                migration_id='m-1')
        took = time.monotonic() - start
        self.assertIn('m-1', str(err))
        self.assertLess(took, 0.5)
        self.assertLess(src.reads, 5 + 4)
        self.assertLess(progress.done, 64 * 64 * KiB)
        self.assertEqual(progress.done, dst.stats()['bytes_written'])
        self.assertNotIn('flush', dst.stats()['requests'])
        self.assertNoThreadsLeft()

    def test_cancel_before_start(self):
        cancel = threading.Event()
        cancel.set()
        src = self.make_src(4, 64 * KiB)
        dst = filters.Counter(self.make_raw(src.size))
        self.assertRaises(errors.MigrationAborted, copy.copy_allocated,
                          src, dst, chunk=64 * KiB, cancel=cancel)
        self.assertEqual(0, dst.stats()['bytes_written'])
        self.assertNoThreadsLeft()

    def test_destination_error_surfaces_and_stops_all(self):
        src = self.make_src(64, 64 * KiB)
        dst = Failing(Slow(self.make_raw(src.size), write=0.005), nth=3)
        err = self.assertRaises(device.BlockError, copy.copy_allocated,
                                src, dst, chunk=64 * KiB, depth=4)
        self.assertIs(dst.error, err)
        self.assertEqual(errno.ENOSPC, err.errno)
        self.assertLessEqual(dst.calls, 3 + 4)
        self.assertNoThreadsLeft()

    def test_source_error_surfaces(self):
        src = Failing(self.make_src(16, 64 * KiB), nth=2, op='pread')
        dst = self.make_raw(src.size)
        err = self.assertRaises(device.BlockError, copy.copy_allocated,
                                src, dst, chunk=64 * KiB, depth=3)
        self.assertIs(src.error, err)
        self.assertNoThreadsLeft()

    def test_error_in_nbd_destination_surfaces(self):
        src = self.make_src(16, 64 * KiB)
        # A read-only export refuses every write with EPERM.
        export = backends.RawDevice(self.make_raw(src.size).name)
        self.addCleanup(export.close)
        server = nbd_server.Server({'ro': export})
        server.start()
        self.addCleanup(server.stop)
        remote = nbd_device.NBDDevice.connect(*server.address, export='ro',
                                              timeout=10)
        self.addCleanup(remote.close)
        err = self.assertRaises(device.BlockError, copy.copy_allocated,
                                src, remote, chunk=64 * KiB, depth=4)
        self.assertEqual(errno.EPERM, err.errno)

    def test_limiter_holds_the_rate(self):
        src = self.make_src(16, 64 * KiB)              # 1 MiB
        dst = self.make_raw(src.size)
        limiter = copy.TokenBucket(4 * MiB)
        progress = copy.Progress()
        start = time.monotonic()
        copy.copy_allocated(src, dst, chunk=64 * KiB, depth=4,
                            limiter=limiter, progress=progress)
        took = time.monotonic() - start
        # 1 MiB at 4 MiB/s: a quarter of a second.
        self.assertGreaterEqual(took, 0.22)
        self.assertLess(took, 0.6)
        self.assertLess(progress.snapshot()['rate_bytes_per_s'],
                        4 * MiB * 1.15)
        self.assertSameContent(src, dst)
        self.assertNoThreadsLeft()

    def test_bad_depth(self):
        src = self.make_src(1, 4096)
        self.assertRaises(ValueError, copy.copy_allocated, src,
                          self.make_raw(4096), depth=0)


class AssignTest(base.TestCase):

    def test_round_robin(self):
        self.assertEqual([0, 1, 2, 0, 1, 2, 0, 1], copy.assign(8, 3))
        self.assertEqual([0, 0, 0], copy.assign(3, 1))
        self.assertEqual([0, 1], copy.assign(2, 4))
        self.assertEqual([], copy.assign(0, 4))

    def test_each_device_gets_an_even_share(self):
        for workers in range(1, 17):
            for devices in range(1, 9):
                shares = [copy.assign(workers, devices).count(d)
                          for d in range(devices)]
                self.assertLessEqual(max(shares) - min(shares), 1)
                self.assertEqual(workers, sum(shares))

    def test_no_device(self):
        self.assertRaises(ValueError, copy.assign, 4, 0)


class SharesTest(base.TestCase):

    def test_one_disk_keeps_every_connection_and_worker(self):
        self.assertEqual((4, 8), copy.shares(1, 8, 8, 4))

    def test_disks_split_the_buffers(self):
        # 8 disks, 8 buffers: 1 connection, 2 workers each (16 threads,
        # 8 connections, instead of 64 threads and 32 connections)
        self.assertEqual((1, 2), copy.shares(8, 8, 8, 4))
        self.assertEqual((2, 4), copy.shares(4, 8, 8, 4))
        self.assertEqual((1, 2), copy.shares(3, 2, 8, 4))

    def test_never_less_than_one_or_more_than_asked(self):
        self.assertEqual((1, 1), copy.shares(64, 1, 1, 4))
        self.assertEqual((1, 1), copy.shares(0, 8, 1, 1))
        self.assertEqual((4, 4), copy.shares(1, 64, 2, 4))
        self.assertEqual((2, 16), copy.shares(2, 64, 16, 2))


class TokenBucketTest(base.TestCase):

    def test_unlimited(self):
        for rate in (None, 0):
            bucket = copy.TokenBucket(rate)
            start = time.monotonic()
            for _ in range(100):
                self.assertEqual(0.0, bucket.consume(100 * MiB))
            self.assertLess(time.monotonic() - start, 0.1)

    def test_paces(self):
        bucket = copy.TokenBucket(MiB)
        start = time.monotonic()
        for _ in range(4):
            bucket.consume(64 * KiB)
        took = time.monotonic() - start
        self.assertGreaterEqual(took, 0.23)
        self.assertLess(took, 0.5)

    def test_cancel_interrupts_a_wait(self):
        bucket = copy.TokenBucket(1000, migration_id='m-7')
        cancel = threading.Event()
        timer = threading.Timer(0.1, cancel.set)
        timer.start()
        self.addCleanup(timer.join)
        start = time.monotonic()
        err = self.assertRaises(errors.MigrationAborted, bucket.consume,
                                10000, cancel)
        self.assertLess(time.monotonic() - start, 0.5)
        self.assertIn('m-7', str(err))
        self.assertRaises(errors.MigrationAborted, bucket.consume, 1,
                          cancel)

    def test_idle_credit_is_capped_at_the_burst(self):
        # the clock: made at 0, idle until 0.3 (0.3 MiB of credit without
        # a cap), both consumed then; the wait's first look is at 10
        bucket = copy.TokenBucket(MiB, burst=64 * KiB,
                                  clock=iter([0.0, 0.3, 0.3, 10.0]).__next__)
        self.assertEqual(0.0, bucket.consume(64 * KiB))   # the burst
        # no credit left: 512 KiB at 1 MiB/s (0.2625 s with 0.3 s credit)
        self.assertAlmostEqual(0.5, bucket.consume(512 * KiB))

    def test_rate_can_change(self):
        bucket = copy.TokenBucket(1000)
        bucket.rate = None
        start = time.monotonic()
        bucket.consume(10 * MiB)
        self.assertLess(time.monotonic() - start, 0.05)
        self.assertIsNone(bucket.rate)


class ProgressTest(base.TestCase):

    def test_snapshot(self):
        now = [100.0]
        progress = copy.Progress(total=1000, phase='copy',
                                 clock=lambda: now[0])
        snap = progress.snapshot()
        self.assertEqual({'done': 0, 'total': 1000, 'percent': 0.0,
                          'rate_bytes_per_s': 0.0, 'eta_s': None,
                          'phase': 'copy', 'elapsed_s': 0.0}, snap)
        progress.add(250)
        snap = progress.snapshot(now=102.0)
        self.assertEqual(25.0, snap['percent'])
        self.assertEqual(125.0, snap['rate_bytes_per_s'])
        self.assertEqual(6.0, snap['eta_s'])
        self.assertEqual(2.0, snap['elapsed_s'])
        progress.phase = 'compose'
        progress.total = 500
        self.assertEqual(50.0, progress.snapshot(now=102.0)['percent'])
        self.assertEqual('compose', progress.phase)

    def test_thread_safe(self):
        progress = copy.Progress(total=8000)

        def add():
            for _ in range(1000):
                progress.add(1)

        threads = [threading.Thread(target=add) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(8000, progress.done)
        self.assertEqual(100.0, progress.snapshot()['percent'])


class TestProgressClock(base.TestCase):

    def test_start_and_stop_bound_the_clock(self):
        now = [100.0]
        prog = copy.Progress(total=100, clock=lambda: now[0])
        now[0] = 110.0
        prog.start()
        prog.add(50)
        now[0] = 120.0
        prog.stop()
        now[0] = 500.0
        snap = prog.snapshot()
        self.assertEqual(10.0, snap['elapsed_s'])
        self.assertEqual(5.0, snap['rate_bytes_per_s'])
        prog.stop()                     # a second stop changes nothing
        self.assertEqual(10.0, prog.snapshot()['elapsed_s'])
