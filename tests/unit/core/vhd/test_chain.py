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

"""Reading and writing through images and chains."""

import os
import threading

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
BS = fmt.BLOCK_SIZE


class ChainTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def path(self, name):
        return os.path.join(self.dir, name)

    def open(self, name, writable=False):
        c = vhd_chain.Chain(self.path(name), writable=writable)
        self.addCleanup(c.close)
        return c

    def assertValid(self, name):
        self.assertEqual([], check.check(self.path(name), chain=True))


class DynamicTest(ChainTestCase):

    def setUp(self):
        super().setUp()
        ops.create(self.path('d.vhd'), 16 * MiB)

    def test_new_image_reads_zeros_and_is_all_hole(self):
        c = self.open('d.vhd')
        self.assertEqual(bytes(16 * MiB), c.pread(0, 16 * MiB))
        self.assertEqual([(0, 16 * MiB, False)], c.extents())
        # footer copy, header, BAT, batmap header, batmap, footer
        self.assertEqual(512 + 1024 + 512 + 512 + 512 + 512,
                         os.path.getsize(self.path('d.vhd')))

    def test_partial_block_is_zero_filled_and_only_written_marked(self):
        c = self.open('d.vhd', writable=True)
        c.pwrite(b'\x11' * 1536, BS + 3 * 512)
        c.close()
        img = vhd_image.Image(self.path('d.vhd'))
        self.addCleanup(img.close)
        bits = img.bitmap(1)
        self.assertEqual('000111' + '0' * (fmt.SECTORS_PER_BLOCK - 6), bits)
        self.assertFalse(img.is_full(1))
        data = img.read_raw(BS, img.block_offset(1))
        self.assertEqual(bytes(1536) + b'\x11' * 1536 + bytes(BS - 3072),
                         data)
        self.assertEqual(0, img.block_offset(1) % 4096)
        self.assertValid('d.vhd')

    def test_full_block_sets_batmap_bit(self):
        c = self.open('d.vhd', writable=True)
        c.pwrite(b'\x22' * BS, 2 * BS)
        c.close()
        img = vhd_image.Image(self.path('d.vhd'))
        self.addCleanup(img.close)
        self.assertTrue(img.is_full(2))
        self.assertEqual(1, len(img.allocated_blocks()))
        self.assertValid('d.vhd')

    def test_block_filled_piecewise_becomes_full(self):
        c = self.open('d.vhd', writable=True)
        for off in range(0, BS, 256 * 1024):
            c.pwrite(b'\x33' * (256 * 1024), off)
        c.close()
        img = vhd_image.Image(self.path('d.vhd'))
        self.addCleanup(img.close)
        self.assertTrue(img.is_full(0))
        self.assertValid('d.vhd')

    def test_unaligned_write_read_back(self):
        c = self.open('d.vhd', writable=True)
        c.pwrite(b'abc', 1000)
        c.pwrite(b'Z' * 5000, BS - 2500)
        self.assertEqual(bytes(1000) + b'abc' + bytes(21),
                         c.pread(0, 1024))
        self.assertEqual(b'Z' * 5000, c.pread(BS - 2500, 5000))
        self.assertEqual(b'\0Z', c.pread(BS - 2501, 2))
        # Extents are whole sectors: the ones the writes touched.
        self.assertEqual([(0, 512, False), (512, 512, True),
                          (1024, BS - 2560 - 1024, False),
                          (BS - 2560, 5120, True),
                          (BS + 2560, 14 * MiB - 2560, False)],
                         c.extents())

    def test_out_of_range(self):
        c = self.open('d.vhd', writable=True)
        self.assertRaisesRegex(errors.InvalidRequest, 'outside the virtual '
                               'disk', c.pwrite, b'x', 16 * MiB)
        self.assertRaises(errors.InvalidRequest, c.pread, 16 * MiB - 1, 2)
        self.assertRaises(errors.InvalidRequest, c.pread, -1, 1)

    def test_read_only_chain_refuses_writes(self):
        c = self.open('d.vhd')
        self.assertRaises(errors.ReadOnlyImage, c.pwrite, b'x' * 512, 0)

    def test_write_zeroes_unmarks_and_zeroes_data(self):
        c = self.open('d.vhd', writable=True)
        c.pwrite(b'\x44' * BS, 0)
        c.write_zeroes(4096, 8192)
        self.assertEqual(bytes(8192), c.pread(4096, 8192))
        self.assertEqual((4096, 8192, False), c.extents()[1])
        c.close()
        self.assertValid('d.vhd')

    def test_concurrent_writers(self):
        c = self.open('d.vhd', writable=True)

        def writer(n):
            for i in range(n, 64, 8):
                c.pwrite(bytes([i]) * 128 * 1024, i * 128 * 1024)

        threads = [threading.Thread(target=writer, args=(n,))
                   for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(64):
            self.assertEqual(bytes([i]) * 128 * 1024,
                             c.pread(i * 128 * 1024, 128 * 1024))
        c.close()
        self.assertValid('d.vhd')


class SparseAllocationTest(ChainTestCase):

    def test_a_small_write_into_a_new_block_costs_little_disk(self):
        ops.create(self.path('s.vhd'), 1024 * MiB)
        c = self.open('s.vhd', writable=True)
        data = os.urandom(4096)
        for block in range(8):          # every write allocates a block
            c.pwrite(data, block * 2 * MiB + 8192)
        c.flush()
        st = os.stat(self.path('s.vhd'))
        self.assertGreater(st.st_size, 8 * 2 * MiB)
        # 8 blocks of 2 MiB each, but only bitmaps and 4 KiB of data in
        # each are on disk (the rest is holes)
        self.assertLess(st.st_blocks * 512, 1 * MiB)
        for block in range(8):
            at = block * 2 * MiB
            self.assertEqual(bytes(8192) + data + bytes(2 * MiB - 12288),
                             bytes(c.pread(at, 2 * MiB)))
        self.assertValid('s.vhd')

    def test_garbage_past_the_footer_is_overwritten_with_zeros(self):
        ops.create(self.path('g.vhd'), 64 * MiB)
        size = os.path.getsize(self.path('g.vhd'))
        # what a crash between the new footer and the BAT update leaves:
        # unreferenced bytes, then a footer at the new end
        with open(self.path('g.vhd'), 'r+b') as f:
            f.seek(size - 512)
            footer = f.read(512)
            f.write(b'\xff' * (3 * MiB) + footer)
        c = self.open('g.vhd', writable=True)
        c.pwrite(b'x' * 512, 4096)
        c.flush()
        self.assertEqual(bytes(4096) + b'x' * 512 + bytes(2 * MiB - 4608),
                         bytes(c.pread(0, 2 * MiB)))
        self.assertValid('g.vhd')


class DifferencingTest(ChainTestCase):

    def setUp(self):
        super().setUp()
        ops.create(self.path('base.vhd'), 8 * MiB)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(b'B' * (4 * MiB), 0)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))

    def test_unmarked_sectors_fall_through(self):
        c = self.open('leaf.vhd', writable=True)
        c.pwrite(b'L' * 512, 1024)
        self.assertEqual(b'B' * 1024 + b'L' * 512 + b'B' * 512,
                         c.pread(0, 2048))
        self.assertEqual(2, c.depth)

    def test_sub_sector_write_keeps_parent_bytes(self):
        c = self.open('leaf.vhd', writable=True)
        c.pwrite(b'xy', 100)
        self.assertEqual(b'B' * 100 + b'xy' + b'B' * 410, c.pread(0, 512))
        c.close()
        self.assertValid('leaf.vhd')

    def test_parent_is_read_only(self):
        self.assertRaisesRegex(errors.ReadOnlyImage, 'snapshot parents',
                               vhd_chain.Chain, self.path('base.vhd'), True)

    def test_write_zeroes_in_leaf_stores_zeros(self):
        c = self.open('leaf.vhd', writable=True)
        c.write_zeroes(0, 4096)
        self.assertEqual(bytes(4096) + b'B' * 4096, c.pread(0, 8192))
        self.assertFalse(c.discard(0, 4096))

    def test_child_larger_than_parent_reads_zeros_beyond(self):
        ops.create(self.path('big.vhd'), 12 * MiB)
        ops.snapshot(self.path('big-leaf.vhd'), self.path('big.vhd'))
        ops.set_parent(self.path('big-leaf.vhd'), self.path('base.vhd'))
        c = self.open('big-leaf.vhd')
        self.assertEqual(12 * MiB, c.size)
        self.assertEqual(b'B' * 512 + bytes(512),
                         c.pread(4 * MiB - 512, 1024))
        self.assertEqual(bytes(4 * MiB), c.pread(8 * MiB, 4 * MiB))

    def test_missing_parent(self):
        os.rename(self.path('base.vhd'), self.path('gone.vhd'))
        err = self.assertRaises(errors.ParentNotFound, vhd_chain.Chain,
                                self.path('leaf.vhd'))
        self.assertIn(self.path('leaf.vhd'), str(err))
        self.assertIn(self.path('base.vhd'), str(err))

    def test_fixed_base(self):
        ops.create(self.path('fixed.vhd'), 4 * MiB, fixed=True)
        with vhd_chain.Chain(self.path('fixed.vhd'), writable=True) as c:
            c.pwrite(b'F' * MiB, MiB)
        ops.snapshot(self.path('over-fixed.vhd'), self.path('fixed.vhd'))
        c = self.open('over-fixed.vhd', writable=True)
        c.pwrite(b'o' * 512, MiB)
        self.assertEqual(b'o' * 512 + b'F' * 512, c.pread(MiB, 1024))
        self.assertEqual([(0, 4 * MiB, True)], c.extents())
        c.close()
        self.assertValid('over-fixed.vhd')


class ExtentsRangeTest(ChainTestCase):

    def test_range_is_clipped_and_matches_whole_map(self):
        ops.create(self.path('e.vhd'), 64 * MiB)
        c = self.open('e.vhd', writable=True)
        c.pwrite(b'x' * 3000, 5 * MiB + 700)
        c.pwrite(b'y' * (2 * MiB), 40 * MiB)
        whole = c.extents()
        self.assertEqual(64 * MiB, sum(n for _o, n, _a in whole))
        for offset, length in ((0, 64 * MiB), (5 * MiB, 4096),
                               (5 * MiB + 1024, 1), (39 * MiB, 3 * MiB),
                               (63 * MiB, MiB)):
            part = c.extents(offset, length)
            self.assertEqual(offset, part[0][0])
            self.assertEqual(length, sum(n for _o, n, _a in part))
            for o, n, allocated in part:
                for wo, wn, wa in whole:
                    if wo <= o < wo + wn:
                        self.assertEqual(wa, allocated, (o, n))
                        self.assertLessEqual(o + n, wo + wn)
        self.assertRaises(errors.InvalidRequest, c.extents, 63 * MiB,
                          2 * MiB)


class ParentNameTest(ChainTestCase):
    """``image.parent_name``: the header's parent, without the BAT."""

    def test_names_what_a_full_open_names(self):
        ops.create(self.path('base.vhd'), 16 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        self.assertIsNone(vhd_image.parent_name(self.path('base.vhd')))
        img = vhd_image.Image(self.path('leaf.vhd'))
        self.addCleanup(img.close)
        self.assertEqual(img.header.parent_name,
                         vhd_image.parent_name(self.path('leaf.vhd')))
        self.assertEqual('base.vhd',
                         vhd_image.parent_name(self.path('leaf.vhd')))
        ops.create(self.path('fixed.vhd'), 4 * MiB, fixed=True)
        self.assertIsNone(vhd_image.parent_name(self.path('fixed.vhd')))

    def test_bad_files_raise_errors_naming_them(self):
        ops.create(self.path('base.vhd'), 16 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        with open(self.path('leaf.vhd'), 'r+b') as f:
            f.seek(fmt.HEADER_OFFSET)
            f.write(b'garbage!')
        err = self.assertRaises(errors.InvalidImage, vhd_image.parent_name,
                                self.path('leaf.vhd'))
        self.assertIn('leaf.vhd', str(err))
        with open(self.path('short.vhd'), 'wb') as f:
            f.write(b'x' * 100)
        err = self.assertRaises(errors.InvalidImage, vhd_image.parent_name,
                                self.path('short.vhd'))
        self.assertIn('too short', str(err))
        err = self.assertRaises(errors.VHDError, vhd_image.parent_name,
                                self.path('missing.vhd'))
        self.assertIn('missing.vhd', str(err))

    def test_read_footer_is_the_footer_of_a_full_open(self):
        ops.create(self.path('base.vhd'), 16 * MiB)
        ops.set_hidden(self.path('base.vhd'), True)
        img = vhd_image.Image(self.path('base.vhd'))
        self.addCleanup(img.close)
        footer = vhd_image.read_footer(self.path('base.vhd'))
        self.assertEqual(img.footer, footer)
        self.assertEqual(1, footer.hidden)
