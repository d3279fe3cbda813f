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

"""The ``raw`` SR driver and its receive views, on real files."""

import errno
import json
import logging
import os
import random
import threading
from unittest import mock

import fixtures

from tests import base
from tests.unit.core.sr import common
from xsm_driver.core.block import device
from xsm_driver.core.sr import base as sr_base
from xsm_driver.core.sr import raw

MiB = common.MiB
U1 = common.U1


class RawContractTest(common.SRContract, base.TestCase):
    driver = raw.RawSR


class RawSRTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        self.dir = os.path.join(self.make_tempdir(), 'sr')
        self.sr = raw.RawSR('fast', self.dir)

    def test_create_is_thick(self):
        vdi = self.sr.create(3 * MiB + 512)
        self.assertEqual(3 * MiB + 512, vdi.size)
        self.assertEqual(vdi.size, vdi.allocated)
        self.assertGreaterEqual(vdi.physical, vdi.size)
        self.assertEqual(vdi.size, os.path.getsize(self.sr.vdi_path(
            vdi.uuid)))
        with self.sr.attach(vdi.uuid) as dev:
            self.assertIsInstance(dev, raw.RawVolume)
            # Allocated but never written: file systems may report such
            # space as a hole (it reads as zeros).
            self.assertEqual(vdi.size, sum(n for _o, n, _f in dev.extents(
                0, vdi.size)))
            self.assertEqual(bytes(4096), bytes(dev.pread(0, 4096)))
        self.assertEqual(0o644, sr_base.mode_of(self.sr.vdi_path(vdi.uuid)))

    def test_sizes(self):
        self.assertEqual(512, self.sr.create(512).size)
        for size in (1000, 511, 4 * MiB + 1):
            exc = self.assertRaises(sr_base.InvalidSize, self.sr.create,
                                    size)
            self.assertIn('512', str(exc))

    def test_hidden_lives_in_the_record(self):
        vdi = self.sr.create(MiB, hidden=True)
        with open(os.path.join(self.dir, '%s.json' % vdi.uuid)) as f:
            self.assertTrue(json.load(f)['hidden'])
        self.assertTrue(raw.RawSR('fast', self.dir).get(vdi.uuid).hidden)
        self.sr.update(vdi.uuid, hidden=False)
        self.assertFalse(raw.RawSR('fast', self.dir).get(vdi.uuid).hidden)

    def test_no_snapshot_nor_coalesce(self):
        vdi = self.sr.create(MiB, name='d')
        before = self.sr.list()
        for call in (self.sr.snapshot, self.sr.coalesce):
            exc = self.assertRaises(sr_base.NotSupported, call, vdi.uuid)
            self.assertIn(vdi.uuid, str(exc))
            self.assertIn('fast', str(exc))
            self.assertIn('copies a raw VDI live', str(exc))
            self.assertRaises(sr_base.VDINotFound, call, U1)
        self.assertEqual(before, self.sr.list())
        self.assertEqual([vdi], self.sr.chain(vdi.uuid))

    def test_no_space(self):
        # Injected: really filling a shared file system is no test to run.
        with mock.patch.object(os, 'posix_fallocate', side_effect=OSError(
                errno.ENOSPC, 'No space left on device')):
            exc = self.assertRaises(sr_base.SRError, self.sr.create, MiB,
                                    name='big')
        self.assertIn('fast', str(exc))
        self.assertIn('No space left', str(exc))
        self.assertEqual([], self.sr.list())
        self.assertEqual(['.lock'], os.listdir(self.dir))

    def test_receive_is_one_file(self):
        rcv = self.sr.receive(MiB, name='n', vm=U1)
        self.addCleanup(rcv.discard)
        self.assertEqual([rcv.leaf_uuid], rcv.vdis)
        self.assertIsInstance(rcv.base, raw.BaseView)
        self.assertIsInstance(rcv.leaf, raw.LeafView)
        self.assertIn('(base)', rcv.base.name)
        self.assertIn('(leaf)', rcv.leaf.name)
        vdi = self.sr.get(rcv.leaf_uuid)
        self.assertEqual(('n', U1, MiB), (vdi.name, vdi.vm, vdi.size))


class SectorMapTest(base.TestCase):

    def test_set_and_runs_match_a_model(self):
        rng = random.Random(3)
        for sectors in (1, 7, 8, 9, 63, 64, 65, 1000, 4099):
            smap = raw.SectorMap(sectors)
            model = [False] * sectors
            for _ in range(30):
                first = rng.randrange(sectors)
                stop = min(sectors, first + rng.choice([1, 2, 7, 8, 9, 70,
                                                        600]))
                smap.set(first, stop)
                model[first:stop] = [True] * (stop - first)
                self.assertEqual(model, [smap.is_set(i)
                                         for i in range(sectors)])
                a = rng.randrange(sectors)
                b = rng.randrange(a, sectors + 1)
                want, pos = [], a
                while pos < b:
                    if model[pos]:
                        pos += 1
                        continue
                    end = pos
                    while end < b and not model[end]:
                        end += 1
                    want.append((pos, end))
                    pos = end
                self.assertEqual(want, list(smap.clear_runs(a, b)))

    def test_runs_of_empty_and_full_maps(self):
        smap = raw.SectorMap(100000)
        self.assertEqual([(5, 99999)], list(smap.clear_runs(5, 99999)))
        smap.set(0, 100000)
        self.assertEqual([], list(smap.clear_runs(0, 100000)))
        self.assertEqual(b'\xff' * 12500, bytes(smap.bits))


class ViewsTest(base.TestCase):

    size = 2 * MiB

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        self.sr = raw.RawSR('fast', os.path.join(self.make_tempdir(), 'sr'))
        self.rcv = self.sr.receive(self.size)
        self.addCleanup(self.rcv.discard)
        self.base, self.leaf = self.rcv.base, self.rcv.leaf

    def file(self):
        with open(self.sr.vdi_path(self.rcv.leaf_uuid), 'rb') as f:
            return f.read()

    def test_capabilities(self):
        for dev in (self.base, self.leaf):
            self.assertTrue(dev.can_write and dev.can_flush and dev.can_fua
                            and dev.can_zero and dev.can_trim and
                            dev.can_extents)
            self.assertEqual(self.size, dev.size)
        self.base.pwrite(b'B' * 4096, 0)
        for dev in (self.base, self.leaf):
            extents = dev.extents(0, self.size)
            self.assertEqual((0, 0), extents[0][::2])
            self.assertGreaterEqual(extents[0][1], 4096)
            self.assertEqual(self.size, sum(n for _o, n, _f in extents))

    def test_leaf_wins_in_either_order(self):
        self.leaf.pwrite(b'L' * 512, 512)
        self.base.pwrite(b'B' * 2048, 0)
        self.base.pwrite(b'C' * 512, 4096)
        self.leaf.pwrite(b'M' * 1024, 4096, fua=True)
        self.assertEqual(b'B' * 512 + b'L' * 512 + b'B' * 1024,
                         bytes(self.leaf.pread(0, 2048)))
        self.assertEqual(b'M' * 1024, bytes(self.base.pread(4096, 1024)))
        self.base.pwrite(b'D' * 4096, 4096, fua=True)
        self.assertEqual(b'M' * 1024 + b'D' * 3072,
                         bytes(self.leaf.pread(4096, 4096)))

    def test_unaligned_base_writes_skip_leaf_sectors_bytewise(self):
        self.leaf.pwrite(b'L' * 512, 512)
        self.base.pwrite(b'B' * 1400, 100)
        want = bytes(100) + b'B' * 412 + b'L' * 512 + b'B' * 476 + \
            bytes(548)
        self.assertEqual(want, bytes(self.base.pread(0, 2048)))
        self.base.pwrite(b'Q', 600)             # inside a leaf sector
        self.base.pwrite(b'R', 1501)            # a sector of the base's
        self.assertEqual(b'L', bytes(self.leaf.pread(600, 1)))
        self.assertEqual(b'R', bytes(self.leaf.pread(1501, 1)))

    def test_unaligned_leaf_writes_refused(self):
        for call in (lambda: self.leaf.pwrite(b'x' * 512, 100),
                     lambda: self.leaf.pwrite(b'x' * 100, 0),
                     lambda: self.leaf.zero(0, 100),
                     lambda: self.leaf.zero(256, 512)):
            exc = self.assertRaises(device.BlockError, call)
            self.assertEqual(errno.EINVAL, exc.errno)
            self.assertIn('aligned', str(exc))
        # Nothing was marked: the base still writes there.
        self.base.pwrite(b'B' * 1024, 0)
        self.assertEqual(b'B' * 1024, bytes(self.leaf.pread(0, 1024)))

    def test_out_of_range(self):
        for call in (lambda: self.leaf.pwrite(b'x' * 512, self.size),
                     lambda: self.base.pwrite(b'x', self.size),
                     lambda: self.base.zero(self.size - 512, 1024),
                     lambda: self.leaf.trim(-512, 512),
                     lambda: self.base.pread(self.size, 1)):
            exc = self.assertRaises(device.BlockError, call)
            self.assertEqual(errno.EINVAL, exc.errno)

    def test_zero(self):
        self.base.pwrite(b'B' * 8192, 0)
        self.leaf.pwrite(b'L' * 1024, 1024)
        self.base.zero(0, 4096)                 # skips the leaf's sectors
        self.assertEqual(bytes(1024) + b'L' * 1024 + bytes(2048) +
                         b'B' * 4096, bytes(self.leaf.pread(0, 8192)))
        self.leaf.zero(1024, 512)
        self.base.pwrite(b'C' * 2048, 0)
        self.assertEqual(b'C' * 1024 + bytes(512) + b'L' * 512,
                         bytes(self.leaf.pread(0, 2048)))
        self.leaf.zero(0, self.size)            # larger than a chunk
        self.base.pwrite(b'D' * 512, 0)
        self.assertEqual(bytes(self.size), self.file())

    def test_trim_changes_nothing(self):
        self.base.pwrite(b'B' * 1024, 0)
        self.leaf.trim(0, 1024)
        self.base.trim(0, 1024)
        self.assertEqual(b'B' * 1024, bytes(self.leaf.pread(0, 1024)))
        self.base.pwrite(b'C' * 1024, 0)        # the trim claimed nothing
        self.assertEqual(b'C' * 1024, bytes(self.leaf.pread(0, 1024)))

    def test_close(self):
        self.leaf.close()
        exc = self.assertRaises(device.BlockError, self.leaf.pwrite,
                                b'x' * 512, 0)
        self.assertEqual(errno.EBADF, exc.errno)
        self.assertRaises(device.BlockError, self.leaf.pread, 0, 1)
        # The other view still works, and the VDI is still being written.
        self.base.pwrite(b'B' * 512, 0)
        self.assertRaises(sr_base.VDIInUse, self.sr.destroy,
                          self.rcv.leaf_uuid)
        self.base.close()
        self.base.close()
        self.leaf.close()
        self.assertRaises(device.BlockError, self.base.flush)
        with self.sr.attach(self.rcv.leaf_uuid, writable=True) as dev:
            self.assertEqual(b'B' * 512, bytes(dev.pread(0, 512)))

    def test_compose(self):
        self.base.pwrite(b'B' * 4096, 0)
        self.leaf.pwrite(b'L' * 512, 0)
        vdi = self.rcv.compose()
        self.assertEqual((self.rcv.leaf_uuid, None, False),
                         (vdi.uuid, vdi.parent, vdi.hidden))
        self.assertEqual(b'L' * 512 + b'B' * 3584, self.file()[:4096])
        self.assertRaises(device.BlockError, self.leaf.pwrite, b'x' * 512,
                          0)

    def hammer(self, seed):
        """Copy and mirror the whole file at once from many threads."""
        rng = random.Random(seed)
        size, sectors = self.size, self.size // 512
        # The copy: the disk cut at random byte offsets (unaligned pieces).
        cuts = sorted(set(rng.randrange(1, size) for _ in range(300)))
        bounds = [0] + cuts + [size]
        copy = [(a, rng.randbytes(b - a) if rng.random() < 0.85 else b - a)
                for a, b in zip(bounds, bounds[1:])]
        rng.shuffle(copy)
        # The mirror: single sectors and runs, no sector twice.
        order = list(range(sectors))
        rng.shuffle(order)
        taken = set()
        mirror = []
        for first in order[:sectors // 2]:
            n = rng.choice([1, 1, 1, 2, 5, 16])
            run = [s for s in range(first, min(sectors, first + n))]
            if any(s in taken for s in run):
                continue
            taken.update(run)
            length = len(run) * 512
            mirror.append((first * 512, rng.randbytes(length)
                           if rng.random() < 0.9 else length))
        want = bytearray(size)
        for offset, data in copy:
            if not isinstance(data, int):
                want[offset:offset + len(data)] = data
        for offset, data in mirror:
            n = data if isinstance(data, int) else len(data)
            want[offset:offset + n] = bytes(n) if isinstance(data, int) \
                else data
        errors = []
        start = threading.Barrier(16)

        def run(items, dev):
            try:
                start.wait()
                for offset, data in items:
                    if isinstance(data, int):
                        dev.zero(offset, data)
                    else:
                        dev.pwrite(data, offset)
            except Exception as exc:      # pragma: no cover - reported
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(copy[i::8],
                                                      self.base))
                   for i in range(8)]
        threads += [threading.Thread(target=run, args=(mirror[i::8],
                                                       self.leaf))
                    for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        return bytes(want)

    def test_many_threads_leaf_wins(self):
        want = self.hammer(11)
        vdi = self.rcv.compose()
        self.assertEqual(want, self.file())
        with self.sr.attach(vdi.uuid) as dev:
            self.assertEqual(want, bytes(dev.pread(0, self.size)))

    def test_many_threads_leaf_wins_again(self):
        for seed in (12, 13, 14):
            rcv = self.sr.receive(self.size)
            self.addCleanup(rcv.discard)
            self.rcv, self.base, self.leaf = rcv, rcv.base, rcv.leaf
            want = self.hammer(seed)
            rcv.compose()
            self.assertEqual(want, self.file())
