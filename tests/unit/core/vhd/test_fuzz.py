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

"""Corrupted images: only VHDError, the path in every message, no writes.

Copies of the shared vectors and of images made by ``ops`` are corrupted
(bytes flipped in every structure, fields changed with their checksum
fixed so that deeper checks are reached, the file truncated, BAT entries
pointed past the end, into the metadata or onto another block). Then:

* ``Chain`` opens, reads and maps the disk, or raises a
  :class:`~xsm_driver.core.vhd.errors.VHDError` naming the corrupted file;
  nothing else is raised and nothing hangs;
* ``check.check`` never raises, returns strings naming files, and is not
  empty when ``Chain`` refused the image;
* when the image cannot be opened for writing, no byte of any file in the
  folder changed.
"""

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import struct
import tempfile

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
BS = fmt.BLOCK_SIZE
SECTOR = fmt.SECTOR
TIME_LIMIT = 20                     # seconds for one example: a hang
VECTORS = ('dyn-16m.vhd', 'fixed-4m.vhd', 'chain-leaf.vhd', 'chain-mid.vhd',
           'empty-1g.vhd')
MADE = ('made-dyn.vhd', 'made-leaf.vhd')
# The image that is opened when a given file is corrupted (its leaf).
LEAF_OF = {'chain-base.vhd': 'chain-leaf.vhd', 'made-base.vhd':
           'made-leaf.vhd'}
# Header fields (offset inside the 1024-byte header, size) worth changing
# with a valid checksum: data offset, table offset, version, max BAT
# entries, block size, parent uuid, parent timestamp, locator fields.
HEADER_FIELDS = ((8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (40, 16),
                 (56, 4), (576, 4), (580, 4), (584, 4), (592, 8),
                 (600, 4), (604, 4), (608, 4), (616, 8))
# Footer fields: features, version, data offset, original and current
# size, disk type, uuid.
FOOTER_FIELDS = ((8, 4), (12, 4), (16, 8), (40, 8), (48, 8), (60, 4),
                 (68, 16))


class Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def alarm(_sig, _frame):
        raise Hang('no answer after %d s' % seconds)
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def digest(folder):
    """sha256 of every file of a folder, by name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), 'rb') as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def structures(path):
    """(name, offset, length) of the structures of a valid image."""
    size = os.path.getsize(path)
    out = [('footer', size - SECTOR, SECTOR)]
    img = vhd_image.Image(path)
    try:
        if img.header is None:
            return out + [('data', 0, min(size - SECTOR, BS))]
        table = img.header.table_offset
        bat_len = fmt.bat_bytes(len(img.bat))
        out += [('footer copy', 0, SECTOR), ('header', SECTOR, 1024),
                ('bat', table, min(bat_len, 4 * len(img.bat) + 8))]
        if img.batmap_header is not None:
            out += [('batmap header', table + bat_len, SECTOR),
                    ('batmap', img.batmap_header.offset,
                     img.batmap_header.sectors * SECTOR)]
        for loc in img.header.locators:
            if loc.code:
                out.append(('locator', loc.data_offset, loc.space_bytes))
        for block in img.allocated_blocks()[:2]:
            out.append(('bitmap', img.block_offset(block) - SECTOR, SECTOR))
    finally:
        img.close()
    return out


def patch_bytes(path, offset, data):
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(data)


def read_bytes(path, offset, length):
    with open(path, 'rb') as f:
        f.seek(offset)
        return f.read(length)


def fix_footer(path, offset, raw):
    raw = bytearray(raw)
    struct.pack_into('>I', raw, 64, fmt.checksum(raw, 64))
    patch_bytes(path, offset, raw)


def fix_header(path, raw):
    raw = bytearray(raw)
    struct.pack_into('>I', raw, 36, fmt.checksum(raw, 36))
    patch_bytes(path, SECTOR, raw)


def set_bat_entry(path, block, sector):
    img = vhd_image.Image(path)
    table = img.header.table_offset
    img.close()
    patch_bytes(path, table + 4 * block, struct.pack('>I', sector))


# -- the corruptions, each (kind, parameters...) -----------------------------

corruptions = st.one_of(
    # flip bits of bytes in one structure
    st.tuples(st.just('flip'), st.integers(0, 20), st.integers(0, 2 ** 20),
              st.lists(st.integers(1, 255), min_size=1, max_size=4)),
    # overwrite a header or footer field, the checksum fixed
    st.tuples(st.just('header field'), st.sampled_from(HEADER_FIELDS),
              st.sampled_from([0, 1, 511, 512, 2 ** 31, 2 ** 32 - 1,
                               2 ** 63, 2 ** 64 - 1]) | st.integers(0)),
    st.tuples(st.just('footer field'), st.sampled_from(FOOTER_FIELDS),
              st.sampled_from([0, 1, 2, 3, 4, 512, 2 ** 21 + 512,
                               2 ** 40, 2 ** 64 - 1]) | st.integers(0)),
    # batmap header fields: offset, sector count (no checksum covers them)
    st.tuples(st.just('batmap field'), st.sampled_from([(8, 8), (16, 4)]),
              st.sampled_from([0, 1, 2 ** 20, 2 ** 32 - 1, 2 ** 63,
                               2 ** 64 - 512]) | st.integers(0)),
    # cut the file
    st.tuples(st.just('truncate'), st.floats(0, 1)),
    # a BAT entry somewhere else
    st.tuples(st.just('bat'), st.integers(0, 7),
              st.sampled_from(['past eof', 'metadata', 'overlap', 'any']),
              st.integers(0, 2 ** 32 - 1)),
)


def corrupt(path, corruption):
    """Apply ``corruption``; return False when it does not apply."""
    kind = corruption[0]
    size = os.path.getsize(path)
    parts = structures(path)
    if kind == 'flip':
        _name, at, length = parts[corruption[1] % len(parts)]
        at += corruption[2] % max(1, length - len(corruption[3]))
        old = read_bytes(path, at, len(corruption[3]))
        flipped = bytes(a ^ b for a, b in zip(old, corruption[3]))
        patch_bytes(path, at, flipped)
    elif kind == 'header field':
        if size < 3 * SECTOR or not any(p[0] == 'header' for p in parts):
            return False
        (at, width), value = corruption[1:]
        raw = bytearray(read_bytes(path, SECTOR, 1024))
        raw[at:at + width] = (value % 256 ** width).to_bytes(width, 'big')
        fix_header(path, raw)
    elif kind == 'footer field':
        (at, width), value = corruption[1:]
        offsets = [size - SECTOR] + ([0] if len(parts) > 2 else [])
        for offset in offsets:
            raw = bytearray(read_bytes(path, offset, SECTOR))
            raw[at:at + width] = (value % 256 ** width).to_bytes(width,
                                                                 'big')
            fix_footer(path, offset, raw)
    elif kind == 'batmap field':
        found = [p for p in parts if p[0] == 'batmap header']
        if not found:
            return False
        (at, width), value = corruption[1:]
        patch_bytes(path, found[0][1] + at,
                    (value % 256 ** width).to_bytes(width, 'big'))
    elif kind == 'truncate':
        os.truncate(path, int(size * corruption[1]))
    elif kind == 'bat':
        img = vhd_image.Image(path)
        allocated = [] if img.bat is None else img.allocated_blocks()
        blocks = 0 if img.bat is None else len(img.bat)
        img.close()
        if not blocks:
            return False
        block = corruption[1] % blocks
        where = corruption[2]
        if where == 'past eof':
            sector = size // SECTOR - corruption[3] % 4096
        elif where == 'metadata':
            sector = corruption[3] % 8
        elif where == 'overlap':
            if not allocated:
                return False
            other = allocated[corruption[3] % len(allocated)]
            img = vhd_image.Image(path)
            sector = img.bat[other] + corruption[3] % (2 * SPB_SECTORS)
            img.close()
            if block == other:
                block = (block + 1) % blocks
        else:
            sector = corruption[3]
        set_bat_entry(path, block, sector % 2 ** 32)
    return True


SPB_SECTORS = fmt.SECTORS_PER_BLOCK


class FuzzTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.source = self.make_tempdir()
        vectors = self.vectors_dir()
        for name in os.listdir(vectors):
            if name.endswith('.vhd'):
                shutil.copyfile(os.path.join(vectors, name),
                                os.path.join(self.source, name))
                os.chmod(os.path.join(self.source, name), 0o644)
        p = functools.partial(os.path.join, self.source)
        ops.create(p('made-dyn.vhd'), 6 * MiB)
        with vhd_chain.Chain(p('made-dyn.vhd'), writable=True) as c:
            c.pwrite(b'd' * 3000, BS - 1000)
            c.pwrite(b'f' * BS, 2 * BS)
        ops.create(p('made-base.vhd'), 6 * MiB)
        with vhd_chain.Chain(p('made-base.vhd'), writable=True) as c:
            c.pwrite(b'b' * BS, 0)
        ops.snapshot(p('made-leaf.vhd'), p('made-base.vhd'))
        with vhd_chain.Chain(p('made-leaf.vhd'), writable=True) as c:
            c.pwrite(b'L' * 5000, 4096)
        for name in os.listdir(self.source):
            self.assertEqual([], check.check(p(name), chain=True), name)

    def folder_copy(self):
        """A private copy of the source images, removed at the end."""
        folder = tempfile.mkdtemp(prefix='xsm-fuzz-', dir=self.source)
        for name in os.listdir(self.source):
            if name.endswith('.vhd'):
                shutil.copy2(os.path.join(self.source, name), folder)
        return folder

    def assertNamesPath(self, path, exc):
        self.assertIsInstance(exc, errors.VHDError)
        self.assertIn(path, str(exc))

    def exercise(self, folder, name):
        """Open, read and write the corrupted ``name``; check the rules.

        :returns: True when the chain opened.
        """
        corrupted = os.path.join(folder, name)
        leaf = os.path.join(folder, LEAF_OF.get(name, name))
        opened = True
        with time_limit(TIME_LIMIT):
            try:
                with vhd_chain.Chain(leaf) as c:
                    extents = c.extents()
                    for offset, length, allocated in extents:
                        if allocated or c.size <= 64 * MiB:
                            c.pread(offset, min(length, 64 * MiB))
            except errors.VHDError as exc:
                opened = False
                self.assertIn(corrupted, str(exc))
            problems = check.check(leaf, chain=True)
            self.assertIsInstance(problems, list)
            for problem in problems:
                self.assertIsInstance(problem, str)
                self.assertIn(folder, problem)
            if not opened:
                self.assertNotEqual([], problems)
                self.assertIn(corrupted, ' '.join(problems))
            before = digest(folder)
            try:
                with vhd_chain.Chain(leaf, writable=True) as c:
                    c.pwrite(b'fuzz', c.size - 4)
                    c.pwrite(b'fuzz' * 1024, 1000)
            except errors.VHDError:
                self.assertEqual(before, digest(folder))
        return opened


class CorruptionFuzzTest(FuzzTestCase):

    @settings(max_examples=250, deadline=None,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.function_scoped_fixture])
    @given(st.sampled_from(VECTORS + MADE + ('chain-base.vhd',
                                             'made-base.vhd')),
           corruptions)
    def test_corrupted_images(self, name, corruption):
        folder = self.folder_copy()
        try:
            if corrupt(os.path.join(folder, name), corruption):
                self.exercise(folder, name)
        finally:
            shutil.rmtree(folder)


class NamedCorruptionTest(FuzzTestCase):
    """One test per kind of damage, with the message checked."""

    def setUp(self):
        super().setUp()
        self.dir = self.folder_copy()

    def path(self, name):
        return os.path.join(self.dir, name)

    def assertRefused(self, name, error, text, leaf=None):
        """Opening fails with ``error`` naming the file; check agrees."""
        path = self.path(name)
        leaf = self.path(leaf or name)
        before = digest(self.dir)
        exc = self.assertRaises(error, vhd_chain.Chain, leaf)
        self.assertIn(path, str(exc))
        self.assertIn(text, str(exc))
        problems = check.check(leaf, chain=True)
        self.assertNotEqual([], problems)
        self.assertIn(path, problems[0])
        self.assertRaises(error, vhd_chain.Chain, leaf, True)
        self.assertEqual(before, digest(self.dir))
        return exc

    def test_bad_footer_cookie(self):
        size = os.path.getsize(self.path('dyn-16m.vhd'))
        patch_bytes(self.path('dyn-16m.vhd'), size - SECTOR, b'cOnectix')
        self.assertRefused('dyn-16m.vhd', errors.InvalidImage,
                           'footer cookie')

    def test_bad_footer_checksum(self):
        size = os.path.getsize(self.path('fixed-4m.vhd'))
        patch_bytes(self.path('fixed-4m.vhd'), size - SECTOR + 66, b'\x55')
        self.assertRefused('fixed-4m.vhd', errors.InvalidImage,
                           'footer checksum')

    def test_footer_size_larger_than_the_bat(self):
        path = self.path('made-dyn.vhd')
        for offset in (0, os.path.getsize(path) - SECTOR):
            raw = bytearray(read_bytes(path, offset, SECTOR))
            struct.pack_into('>Q', raw, 48, 64 * MiB)
            fix_footer(path, offset, raw)
        self.assertRefused('made-dyn.vhd', errors.InvalidImage,
                           'BAT has 3 entries')

    def test_truncated_file(self):
        os.truncate(self.path('made-dyn.vhd'), 5 * MiB)
        self.assertRefused('made-dyn.vhd', errors.InvalidImage, 'cookie')

    def test_bat_entry_beyond_eof(self):
        size = os.path.getsize(self.path('made-dyn.vhd'))
        set_bat_entry(self.path('made-dyn.vhd'), 1, size // SECTOR)
        self.assertRefused('made-dyn.vhd', errors.InvalidImage,
                           'beyond the end of the file')

    def test_overlapping_blocks(self):
        img = vhd_image.Image(self.path('made-dyn.vhd'))
        first = img.bat[0]
        img.close()
        set_bat_entry(self.path('made-dyn.vhd'), 2, first + 8)
        self.assertRefused('made-dyn.vhd', errors.InvalidImage,
                           'blocks 0 and 2 overlap')

    def test_block_inside_the_metadata(self):
        set_bat_entry(self.path('made-dyn.vhd'), 1, 3)   # the BAT itself
        self.assertRefused('made-dyn.vhd', errors.InvalidImage,
                           'inside the metadata')

    def assertOnlyVHDError(self, name, text):
        """Open and check ``name``: a VHDError, never another exception."""
        path = self.path(name)
        try:
            vhd_chain.Chain(path).close()
            self.fail('%s opened' % path)
        except errors.VHDError as exc:
            self.assertIn(path, str(exc))
            self.assertIn(text, str(exc))
        problems = check.check(path)
        self.assertEqual(1, len(problems))
        self.assertIn(path, problems[0])

    def test_huge_bat_offset(self):
        """A header table offset of 2**63 (sector multiple, checksum valid).

        (Before commit 76ef1f7 it reached ``os.pread``: OverflowError.)
        """
        raw = bytearray(read_bytes(self.path('made-dyn.vhd'), SECTOR, 1024))
        struct.pack_into('>Q', raw, 16, 2 ** 63)
        fix_header(self.path('made-dyn.vhd'), raw)
        self.assertOnlyVHDError('made-dyn.vhd', 'BAT')

    def batmap_header_at(self, name):
        img = vhd_image.Image(self.path(name))
        at = img.header.table_offset + fmt.bat_bytes(len(img.bat))
        img.close()
        return at

    def test_huge_batmap_offset(self):
        """A batmap offset of 2**63 (no checksum covers it).

        (Before commit 76ef1f7 it reached ``os.pread``: OverflowError.)
        """
        at = self.batmap_header_at('made-dyn.vhd')
        patch_bytes(self.path('made-dyn.vhd'), at + 8,
                    struct.pack('>Q', 2 ** 63))
        self.assertOnlyVHDError('made-dyn.vhd', 'batmap')

    def test_huge_batmap_sector_count(self):
        """A batmap of 2**32 - 1 sectors (2 TiB).

        (Before commit 76ef1f7 it was read in one ``os.pread``: MemoryError.)
        """
        at = self.batmap_header_at('made-dyn.vhd')
        patch_bytes(self.path('made-dyn.vhd'), at + 16,
                    struct.pack('>I', 2 ** 32 - 1))
        self.assertOnlyVHDError('made-dyn.vhd', 'batmap')

    def test_missing_parent(self):
        os.rename(self.path('chain-mid.vhd'), self.path('elsewhere.vhd'))
        exc = self.assertRefused('chain-leaf.vhd', errors.ParentNotFound,
                                 'parent image not found')
        # Every place looked at is named: the locators' path and the
        # header's parent name resolve to the same file here.
        self.assertIn('tried %s' % self.path('chain-mid.vhd'), str(exc))

    def test_parent_uuid_mismatch(self):
        path = self.path('made-base.vhd')
        for offset in (0, os.path.getsize(path) - SECTOR):
            raw = bytearray(read_bytes(path, offset, SECTOR))
            raw[68:84] = fmt.new_uuid()
            fix_footer(path, offset, raw)
        exc = self.assertRefused('made-base.vhd', errors.ParentMismatch,
                                 'the child expects uuid',
                                 leaf='made-leaf.vhd')
        self.assertIn(self.path('made-leaf.vhd'), str(exc))

    def point_at(self, child, parent):
        """Hand-edit ``child`` to name ``parent``, bypassing the checks."""
        img = vhd_image.Image(self.path(child), writable=True)
        target = vhd_image.Image(self.path(parent))
        header = img.header
        header.parent_uuid = target.uuid
        header.parent_name = parent
        target.close()
        for loc in header.locators:
            if loc.code in fmt.LOCATOR_CODES:
                payload = fmt.encode_locator(loc.code, './' + parent)
                img.write_raw(payload.ljust(loc.space_bytes, b'\0'),
                              loc.data_offset)
                loc.data_length = len(payload)
        img.write_raw(header.pack(), fmt.HEADER_OFFSET)
        img.close()

    def test_loop_in_a_chain(self):
        ops.snapshot(self.path('a.vhd'), self.path('made-leaf.vhd'))
        ops.snapshot(self.path('b.vhd'), self.path('a.vhd'))
        # set_parent refuses to make the loop ...
        self.assertRaises(errors.ChainLoop, ops.set_parent,
                          self.path('a.vhd'), self.path('b.vhd'))
        # ... so make it by hand: a -> b -> a.
        self.point_at('a.vhd', 'b.vhd')
        before = digest(self.dir)
        for name in ('a.vhd', 'b.vhd'):
            exc = self.assertRaises(errors.ChainLoop, vhd_chain.Chain,
                                    self.path(name))
            self.assertIn(self.path(name), str(exc))
            self.assertIn('loops back', str(exc))
            problems = check.check(self.path(name), chain=True)
            self.assertEqual(1, len(problems))
            self.assertIn('loops back', problems[0])
            # (a.vhd is also read-only: it is b.vhd's snapshot parent.)
            self.assertRaises(errors.VHDError, vhd_chain.Chain,
                              self.path(name), True)
            self.assertRaises(errors.VHDError, ops.coalesce,
                              self.path(name))
        self.assertEqual(before, digest(self.dir))

    def test_image_that_is_its_own_parent(self):
        ops.snapshot(self.path('self.vhd'), self.path('made-leaf.vhd'))
        self.point_at('self.vhd', 'self.vhd')
        exc = self.assertRaises(errors.ChainLoop, vhd_chain.Chain,
                                self.path('self.vhd'))
        self.assertIn(self.path('self.vhd'), str(exc))

    def test_chain_of_31_images(self):
        ops.create(self.path('0.vhd'), 2 * MiB)
        for i in range(1, 30):
            ops.snapshot(self.path('%d.vhd' % i),
                         self.path('%d.vhd' % (i - 1)))
        with vhd_chain.Chain(self.path('29.vhd')) as c:
            self.assertEqual(30, c.depth)
        err = self.assertRaises(errors.ChainTooDeep, ops.snapshot,
                                self.path('30.vhd'), self.path('29.vhd'))
        self.assertIn('limit is 30', str(err))
        self.assertFalse(os.path.exists(self.path('30.vhd')))
        # set_parent only counts the new parent's chain, not the images
        # below the child: hanging 1.vhd from a two-deep chain makes the
        # chain of 29.vhd 31 images deep.
        ops.create(self.path('x.vhd'), 2 * MiB)
        ops.snapshot(self.path('y.vhd'), self.path('x.vhd'))
        ops.set_parent(self.path('1.vhd'), self.path('y.vhd'))
        before = digest(self.dir)
        err = self.assertRaises(errors.ChainTooDeep, vhd_chain.Chain,
                                self.path('29.vhd'))
        self.assertIn(self.path('29.vhd'), str(err))
        self.assertIn('31 images deep; the limit is 30', str(err))
        problems = check.check(self.path('29.vhd'), chain=True)
        self.assertEqual(1, len(problems))
        self.assertIn('limit is 30', problems[0])
        self.assertRaises(errors.ChainTooDeep, vhd_chain.Chain,
                          self.path('29.vhd'), True)
        self.assertEqual(before, digest(self.dir))
        with vhd_chain.Chain(self.path('28.vhd')) as c:
            self.assertEqual(30, c.depth)
