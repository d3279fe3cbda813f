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

"""Create, snapshot, set-parent, coalesce, hidden, info, export, write."""

import gc
import io
import os
import warnings

from tests.unit.core.vhd import test_chain
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024


class CreateTest(test_chain.ChainTestCase):

    def test_sizes_round_up_to_2mib(self):
        ops.create(self.path('odd.vhd'), 3 * MiB + 1)
        self.assertEqual(4 * MiB, self.open('odd.vhd').size)

    def test_size_limits(self):
        self.assertRaisesRegex(errors.InvalidRequest, '2 MiB..2040 GiB',
                               ops.create, self.path('big.vhd'),
                               2041 * 1024 ** 3)
        self.assertFalse(os.path.exists(self.path('big.vhd')))

    def test_largest_dynamic(self):
        ops.create(self.path('max.vhd'), fmt.MAX_SIZE)
        c = self.open('max.vhd', writable=True)
        c.pwrite(b'end', fmt.MAX_SIZE - 3)
        self.assertEqual(b'end', c.pread(fmt.MAX_SIZE - 3, 3))
        self.assertEqual([(0, fmt.MAX_SIZE - 512, False),
                          (fmt.MAX_SIZE - 512, 512, True)], c.extents())
        c.close()
        self.assertValid('max.vhd')

    def test_fixed_layout(self):
        ops.create(self.path('f.vhd'), 4 * MiB, fixed=True)
        self.assertEqual(4 * MiB + 512, os.path.getsize(self.path('f.vhd')))
        self.assertValid('f.vhd')

    def test_never_overwrites(self):
        ops.create(self.path('a.vhd'), 4 * MiB)
        before = open(self.path('a.vhd'), 'rb').read()
        self.assertRaisesRegex(errors.InvalidRequest, 'already exists',
                               ops.create, self.path('a.vhd'), 8 * MiB)
        self.assertEqual(before, open(self.path('a.vhd'), 'rb').read())
        self.assertEqual(['a.vhd'], os.listdir(self.dir))


class SnapshotTest(test_chain.ChainTestCase):

    def test_chain_and_locators(self):
        ops.create(self.path('base.vhd'), 8 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        img = vhd_image.Image(self.path('leaf.vhd'))
        self.addCleanup(img.close)
        self.assertEqual('base.vhd', img.header.parent_name)
        self.assertEqual(
            [fmt.PLAT_MACX, fmt.PLAT_W2KU, fmt.PLAT_W2RU],
            [loc.code for loc in img.header.locators[:3]])
        self.assertEqual(b'file://./base.vhd',
                         img.read_locator_data(img.header.locators[0]))
        self.assertEqual(
            int(os.stat(self.path('base.vhd')).st_mtime),
            fmt.unix_time(img.header.parent_timestamp))
        self.assertTrue(vhd_image.is_read_only(self.path('base.vhd')))
        self.assertValid('leaf.vhd')

    def test_parent_in_another_folder(self):
        os.mkdir(self.path('a'))
        os.mkdir(self.path('b'))
        ops.create(self.path('a/base.vhd'), 4 * MiB)
        ops.snapshot(self.path('b/leaf.vhd'), self.path('a/base.vhd'))
        img = vhd_image.Image(self.path('b/leaf.vhd'))
        self.addCleanup(img.close)
        self.assertEqual(b'file://../a/base.vhd',
                         img.read_locator_data(img.header.locators[0]))
        self.assertEqual(2, self.open('b/leaf.vhd').depth)
        self.assertValid('b/leaf.vhd')

    def test_depth_limit(self):
        ops.create(self.path('0.vhd'), 4 * MiB)
        for i in range(1, 30):
            ops.snapshot(self.path('%d.vhd' % i),
                         self.path('%d.vhd' % (i - 1)))
        self.assertEqual(30, self.open('29.vhd').depth)
        err = self.assertRaises(errors.ChainTooDeep, ops.snapshot,
                                self.path('30.vhd'), self.path('29.vhd'))
        self.assertIn('31 images deep; the limit is 30', str(err))
        self.assertFalse(os.path.exists(self.path('30.vhd')))

    def test_non_ascii_parent_name(self):
        ops.create(self.path('bäse.vhd'), 4 * MiB)
        self.assertRaisesRegex(errors.InvalidRequest, 'ASCII', ops.snapshot,
                               self.path('leaf.vhd'), self.path('bäse.vhd'))


class SetParentTest(test_chain.ChainTestCase):

    def test_compose_onto_copied_parent(self):
        # The migration's compose: a leaf re-pointed at a copy of its base.
        ops.create(self.path('base.vhd'), 8 * MiB)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(b'P' * MiB, 0)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        with vhd_chain.Chain(self.path('leaf.vhd'), writable=True) as c:
            c.pwrite(b'L' * 512, 512)
            expected = c.pread(0, 8 * MiB)
        ops.create(self.path('copy.vhd'), 8 * MiB)
        with vhd_chain.Chain(self.path('copy.vhd'), writable=True) as c:
            c.pwrite(b'P' * MiB, 0)
        img = vhd_image.Image(self.path('leaf.vhd'))
        old_uuid = img.header.parent_uuid
        img.close()
        ops.set_parent(self.path('leaf.vhd'), self.path('copy.vhd'))
        os.chmod(self.path('base.vhd'), 0o644)
        os.unlink(self.path('base.vhd'))
        c = self.open('leaf.vhd')
        self.assertEqual(self.path('copy.vhd'), c.images[1].path)
        self.assertEqual(expected, c.pread(0, 8 * MiB))
        self.assertNotEqual(old_uuid, c.leaf.header.parent_uuid)
        self.assertEqual('copy.vhd', c.leaf.header.parent_name)
        self.assertValid('leaf.vhd')

    def test_refuses_loop_and_dynamic_child(self):
        ops.create(self.path('a.vhd'), 4 * MiB)
        ops.snapshot(self.path('b.vhd'), self.path('a.vhd'))
        ops.snapshot(self.path('c.vhd'), self.path('b.vhd'))
        self.assertRaises(errors.ChainLoop, ops.set_parent,
                          self.path('b.vhd'), self.path('c.vhd'))
        ops.create(self.path('x.vhd'), 4 * MiB)
        self.assertRaisesRegex(errors.InvalidRequest, 'only a differencing',
                               ops.set_parent, self.path('x.vhd'),
                               self.path('c.vhd'))
        self.assertValid('c.vhd')

    def test_refuses_larger_parent(self):
        ops.create(self.path('a.vhd'), 4 * MiB)
        ops.snapshot(self.path('b.vhd'), self.path('a.vhd'))
        ops.create(self.path('big.vhd'), 8 * MiB)
        self.assertRaisesRegex(errors.InvalidRequest, 'smaller than the new '
                               'parent', ops.set_parent, self.path('b.vhd'),
                               self.path('big.vhd'))


class RefreshParentTimestampTest(test_chain.ChainTestCase):

    def test_the_header_alone_while_the_child_is_written(self):
        # A migration's leaf, open and taking writes, over a base the copy
        # changed since the leaf was made.
        ops.create(self.path('base.vhd'), 8 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        os.chmod(self.path('base.vhd'), 0o644)      # (as a receive's base)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(b'P' * MiB, 0)
        os.utime(self.path('base.vhd'), (1e9, 1.2e9))
        leaf = self.open('leaf.vhd', writable=True)
        leaf.pwrite(b'L' * 4096, 2 * MiB)       # a block allocated before
        ops.refresh_parent_timestamp(self.path('leaf.vhd'),
                                     self.path('base.vhd'), durable=False)
        leaf.pwrite(b'M' * 4096, 4 * MiB)       # and one after
        leaf.close()
        c = self.open('leaf.vhd')
        self.assertEqual(fmt.vhd_time(1.2e9), c.leaf.header.parent_timestamp)
        self.assertEqual('base.vhd', c.leaf.header.parent_name)
        self.assertEqual(b'P' * 512, c.pread(0, 512))
        self.assertEqual(b'L' * 4096, c.pread(2 * MiB, 4096))
        self.assertEqual(b'M' * 4096, c.pread(4 * MiB, 4096))
        self.assertValid('leaf.vhd')

    def test_refuses_another_parent_and_a_dynamic_child(self):
        ops.create(self.path('a.vhd'), 4 * MiB)
        ops.snapshot(self.path('b.vhd'), self.path('a.vhd'))
        ops.create(self.path('x.vhd'), 4 * MiB)
        before = open(self.path('b.vhd'), 'rb').read()
        self.assertRaisesRegex(errors.InvalidRequest, 'its parent is',
                               ops.refresh_parent_timestamp,
                               self.path('b.vhd'), self.path('x.vhd'))
        self.assertRaisesRegex(errors.InvalidRequest, 'only a differencing',
                               ops.refresh_parent_timestamp,
                               self.path('x.vhd'), self.path('a.vhd'))
        self.assertEqual(before, open(self.path('b.vhd'), 'rb').read())


class ReplaceParentsTest(test_chain.ChainTestCase):

    def test_a_parent_written_meanwhile_reads_after_the_swap(self):
        ops.create(self.path('base.vhd'), 8 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        leaf = self.open('leaf.vhd', writable=True)
        os.chmod(self.path('base.vhd'), 0o644)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(b'P' * MiB, 0)
        self.assertEqual(bytes(512), leaf.pread(0, 512))   # its old BAT
        old = leaf.images[1]
        leaf.replace_parents([vhd_image.Image(self.path('base.vhd'))])
        self.assertIsNone(old._fd)                          # closed
        self.assertEqual(b'P' * 512, leaf.pread(0, 512))
        other = vhd_image.Image(self.path('leaf.vhd'))
        self.addCleanup(other.close)
        self.assertRaisesRegex(errors.InvalidRequest, 'not the chain',
                               leaf.replace_parents, [other])
        self.assertEqual(b'P' * 512, leaf.pread(0, 512))   # unchanged


class CoalesceTest(test_chain.ChainTestCase):

    def build(self):
        ops.create(self.path('base.vhd'), 8 * MiB)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(b'b' * (3 * MiB), 0)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        with vhd_chain.Chain(self.path('leaf.vhd'), writable=True) as c:
            c.pwrite(b'L' * 1536, 512)
            c.pwrite(b'M' * (2 * MiB), 4 * MiB)
            return c.pread(0, 8 * MiB)

    def test_coalesce_copies_only_written_sectors(self):
        expected = self.build()
        self.assertEqual(self.path('base.vhd'),
                         ops.coalesce(self.path('leaf.vhd')))
        base = self.open('base.vhd')
        self.assertEqual(expected, base.pread(0, 8 * MiB))
        self.assertEqual(expected, self.open('leaf.vhd').pread(0, 8 * MiB))
        self.assertValid('leaf.vhd')
        # Running it again changes nothing.
        ops.coalesce(self.path('leaf.vhd'))
        self.assertEqual(expected, self.open('base.vhd').pread(0, 8 * MiB))

    def test_refuses_with_siblings(self):
        self.build()
        ops.snapshot(self.path('sibling.vhd'), self.path('base.vhd'))
        before = open(self.path('base.vhd'), 'rb').read()
        err = self.assertRaises(errors.InvalidRequest, ops.coalesce,
                                self.path('leaf.vhd'))
        self.assertIn('sibling.vhd', str(err))
        self.assertEqual(before, open(self.path('base.vhd'), 'rb').read())

    def test_no_parent(self):
        ops.create(self.path('lone.vhd'), 4 * MiB)
        self.assertRaisesRegex(errors.InvalidRequest, 'no parent',
                               ops.coalesce, self.path('lone.vhd'))


class MiscTest(test_chain.ChainTestCase):

    def test_an_image_dropped_unclosed_gives_its_descriptor_back(self):
        ops.create(self.path('d.vhd'), 4 * MiB)
        image = vhd_image.Image(self.path('d.vhd'), writable=True)
        fd = image._fd
        target = os.readlink('/proc/self/fd/%d' % fd)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            del image
            gc.collect()
        self.assertIn(ResourceWarning, [w.category for w in caught])
        try:
            now = os.readlink('/proc/self/fd/%d' % fd)
        except OSError:
            now = None              # closed, and not reused since
        self.assertNotEqual(target, now)
        self.assertValid('d.vhd')

    def test_hidden_in_both_footers(self):
        ops.create(self.path('h.vhd'), 4 * MiB)
        ops.set_hidden(self.path('h.vhd'), True)
        raw = open(self.path('h.vhd'), 'rb').read()
        self.assertEqual(1, raw[85])
        self.assertEqual(raw[:512], raw[-512:])
        self.assertTrue(ops.info(self.path('h.vhd'))['hidden'])
        self.assertValid('h.vhd')

    def test_info(self):
        ops.create(self.path('base.vhd'), 8 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        facts = ops.info(self.path('leaf.vhd'))
        self.assertEqual('differencing', facts['type'])
        self.assertEqual(2, facts['chain_depth'])
        self.assertEqual(self.path('base.vhd'), facts['parent'])
        self.assertEqual('tap 1.3', facts['creator'])
        self.assertEqual(0, facts['chain_allocated_bytes'])

    def test_write_and_export_sparse(self):
        ops.create(self.path('d.vhd'), 64 * MiB)
        data = os.urandom(MiB + 100)
        self.assertEqual(len(data), ops.write(self.path('d.vhd'), 40 * MiB,
                                              io.BytesIO(data)))
        out = ops.export(self.path('d.vhd'), self.path('d.raw'))
        raw = open(out, 'rb').read()
        self.assertEqual(64 * MiB, len(raw))
        self.assertEqual(data, raw[40 * MiB:41 * MiB + 100])
        self.assertEqual(bytes(40 * MiB), raw[:40 * MiB])
        self.assertLess(os.stat(out).st_blocks * 512, 4 * MiB)

    def test_write_beyond_end_writes_nothing(self):
        ops.create(self.path('d.vhd'), 4 * MiB)
        before = open(self.path('d.vhd'), 'rb').read()
        self.assertRaises(errors.InvalidRequest, ops.write,
                          self.path('d.vhd'), 3 * MiB, io.BytesIO(
                              b'x' * (2 * MiB)))
        self.assertEqual(before, open(self.path('d.vhd'), 'rb').read())

    def test_checks_reject_corruption(self):
        ops.create(self.path('c.vhd'), 4 * MiB)
        with vhd_chain.Chain(self.path('c.vhd'), writable=True) as c:
            c.pwrite(b'x' * 512, 0)
        img = vhd_image.Image(self.path('c.vhd'))
        data_at = img.block_offset(0)
        img.close()
        with open(self.path('c.vhd'), 'r+b') as f:
            f.seek(data_at + 4096)
            f.write(b'stray')
        problems = check.check(self.path('c.vhd'))
        self.assertEqual(1, len(problems))
        self.assertIn('sector 0x8 of block 0x0 has data where the bitmap '
                      'is clear', problems[0])
        self.assertIn(self.path('c.vhd'), problems[0])
