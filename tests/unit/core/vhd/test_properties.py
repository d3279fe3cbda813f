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

"""Random operation sequences on a chain, checked against a bytearray model.

Each example starts from one empty image (dynamic, or fixed for the
fixed-base variant) and runs a random sequence of writes (any offset and
length, unaligned, partial and whole blocks, block-crossing), zeroing,
discards, reopens, snapshots, coalesces and "collapses" (coalesce the middle
image into its parent, then re-point the leaf at the grandparent with
``set_parent``). The model is a plain ``bytearray`` of the virtual disk;
snapshots, coalesces and collapses must not change it.

After the sequence the leaf must be valid for ``check`` (``vhd-util check
-b -p``), read back as the model through the chain and through ``export``,
and every range ``extents()`` calls unallocated must be zeros in the model.
"""

import os
import random
import tempfile

from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
BS = fmt.BLOCK_SIZE
SECTOR = fmt.SECTOR
MAX_DEPTH = 5                       # keep examples small and fast
DYNAMIC_SIZE = 10 * MiB - 1000      # rounded up to 10 MiB by create
FIXED_SIZE = 8 * MiB


def payload(kind, seed, length):
    """Bytes to write: random, all zeros, or one repeated byte."""
    if kind == 'zeros':
        return bytes(length)
    if kind == 'byte':
        return bytes([seed % 255 + 1]) * length
    return random.Random(seed).randbytes(length)


def steps(size):
    """A strategy of one operation on a virtual disk of ``size`` bytes."""
    sectors = size // SECTOR
    anywhere = st.integers(0, size - 1)
    near_boundary = st.builds(
        lambda block, delta: min(size - 1, max(0, block * BS + delta)),
        st.integers(0, size // BS), st.integers(-1536, 1536))
    offsets = st.one_of(anywhere, near_boundary)
    lengths = st.one_of(st.integers(1, 4096), st.integers(1, 3 * BS),
                        st.sampled_from([SECTOR, BS - SECTOR, BS, BS + 1]))
    writes = st.tuples(st.just('write'), offsets, lengths,
                       st.sampled_from(['random', 'random', 'zeros',
                                        'byte']),
                       st.integers(0, 2 ** 32))
    fill_block = st.tuples(st.just('fill_block'),
                           st.integers(0, size // BS - 1),
                           st.integers(0, 2 ** 32))
    aligned = st.tuples(st.integers(0, sectors - 1),
                        st.one_of(st.integers(1, 64),
                                  st.integers(1, 2 * fmt.SECTORS_PER_BLOCK)))
    zeroes = st.builds(lambda r: ('write_zeroes',) + r, aligned)
    discards = st.builds(lambda r: ('discard',) + r, aligned)
    # Snapshots are weighted up so that chains get deep enough to coalesce
    # and collapse.
    chain_ops = st.sampled_from([('reopen',), ('snapshot',), ('snapshot',),
                                 ('coalesce',), ('collapse',),
                                 ('collapse',)])
    return st.one_of(writes, writes, fill_block, zeroes, discards,
                     chain_ops, chain_ops)


def first_difference(expected, actual):
    if len(expected) != len(actual):
        return 'lengths differ: %d != %d' % (len(expected), len(actual))
    for at in range(0, len(expected), SECTOR):
        if expected[at:at + SECTOR] != actual[at:at + SECTOR]:
            return 'first difference in the sector at %d' % at
    return None


class Harness:
    """A chain of images in a folder, its writable leaf and the model."""

    def __init__(self, test, folder, size, fixed):
        self.test = test
        self.folder = folder
        self.counter = 0
        self.paths = [ops.create(self.new_path(), size, fixed=fixed)]
        with vhd_chain.Chain(self.paths[0]) as c:
            self.size = c.size
        self.model = bytearray(self.size)
        self.chain = None
        self.open()

    def new_path(self):
        self.counter += 1
        return os.path.join(self.folder, '%d.vhd' % self.counter)

    @property
    def leaf(self):
        return self.paths[-1]

    def open(self):
        self.chain = vhd_chain.Chain(self.leaf, writable=True)
        self.test.assertEqual(len(self.paths), self.chain.depth)

    def close(self):
        if self.chain is not None:
            self.chain.close()
            self.chain = None

    def assert_reads(self, offset, length, what):
        got = self.chain.pread(offset, length)
        diff = first_difference(self.model[offset:offset + length], got)
        if diff:
            self.test.fail('%s: range %d+%d reads wrong: %s'
                           % (what, offset, length, diff))

    # -- the operations ------------------------------------------------------

    def do_write(self, offset, length, kind, seed):
        length = min(length, self.size - offset)
        data = payload(kind, seed, length)
        self.chain.pwrite(data, offset)
        self.model[offset:offset + length] = data
        self.assert_reads(offset, length, 'write')

    def do_fill_block(self, block, seed):
        self.do_write(block * BS, BS, 'random', seed)

    def _aligned(self, first, count):
        count = min(count, self.size // SECTOR - first)
        return first * SECTOR, count * SECTOR

    def do_write_zeroes(self, first, count):
        offset, length = self._aligned(first, count)
        self.chain.write_zeroes(offset, length)
        self.model[offset:offset + length] = bytes(length)
        self.assert_reads(offset, length, 'write_zeroes')

    def do_discard(self, first, count):
        offset, length = self._aligned(first, count)
        forgot = self.chain.discard(offset, length)
        # Only an image without a parent can forget (and reads zeros).
        self.test.assertEqual(
            self.chain.leaf.type == fmt.TYPE_DYNAMIC, forgot)
        if forgot:
            self.model[offset:offset + length] = bytes(length)
        self.assert_reads(offset, length, 'discard')

    def do_reopen(self):
        self.close()
        self.open()

    def do_snapshot(self):
        if len(self.paths) >= MAX_DEPTH:
            return
        self.close()
        child = self.new_path()
        self.test.assertEqual(child, ops.snapshot(child, self.leaf))
        self.paths.append(child)
        self.open()
        self.test.assertEqual([], self.chain.leaf.allocated_blocks())

    def do_coalesce(self):
        if len(self.paths) < 2:
            return
        self.close()
        parent = ops.coalesce(self.leaf)
        self.test.assertEqual(os.path.abspath(self.paths[-2]), parent)
        # The parent now reads as its child: all the leaf's sectors moved.
        with vhd_chain.Chain(parent) as c:
            diff = first_difference(self.model, c.pread(0, self.size))
        if diff:
            self.test.fail('coalesced parent differs from the leaf: %s'
                           % diff)
        self.open()

    def do_collapse(self):
        """Coalesce the middle image, re-point the leaf at the grandparent.

        This is how a chain is shortened: the virtual disk must not change.
        """
        if len(self.paths) < 3:
            return
        self.close()
        middle, grand = self.paths[-2], self.paths[-3]
        self.test.assertEqual(os.path.abspath(grand), ops.coalesce(middle))
        ops.set_parent(self.leaf, grand)
        os.unlink(middle)       # nothing refers to it any more
        del self.paths[-2]
        self.open()
        self.test.assertEqual(os.path.abspath(grand),
                              os.path.abspath(self.chain.images[1].path))

    def run(self, step):
        getattr(self, 'do_' + step[0])(*step[1:])

    # -- the final verdict ---------------------------------------------------

    def verify(self):
        self.close()
        self.test.assertEqual([], check.check(self.leaf, chain=True))
        with vhd_chain.Chain(self.leaf) as c:
            self.test.assertEqual(len(self.paths), c.depth)
            diff = first_difference(self.model, c.pread(0, self.size))
            if diff:
                self.test.fail('virtual disk differs from the model: %s'
                               % diff)
            extents = c.extents()
        pos = 0
        for offset, length, allocated in extents:
            self.test.assertEqual(pos, offset, 'extents leave a gap')
            self.test.assertGreater(length, 0)
            self.test.assertEqual(0, offset % SECTOR)
            self.test.assertEqual(0, length % SECTOR)
            if not allocated:
                run = self.model[offset:offset + length]
                self.test.assertEqual(
                    length, run.count(0), 'unallocated range %d+%d is not '
                    'zeros in the model' % (offset, length))
            pos = offset + length
        self.test.assertEqual(self.size, pos, 'extents do not end at size')
        out = os.path.join(self.folder, 'export.raw')
        self.test.assertEqual(out, ops.export(self.leaf, out))
        with open(out, 'rb') as f:
            exported = f.read()
        diff = first_difference(self.model, exported)
        if diff:
            self.test.fail('export differs from the model: %s' % diff)


class ModelTest(base.TestCase):

    def run_sequence(self, size, fixed, sequence):
        with tempfile.TemporaryDirectory(prefix='xsm-prop-') as folder:
            harness = Harness(self, folder, size, fixed)
            try:
                for step in sequence:
                    harness.run(step)
                harness.verify()
            finally:
                harness.close()

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(st.lists(steps(fmt.round_size(DYNAMIC_SIZE)), min_size=1,
                    max_size=14))
    def test_dynamic_base(self, sequence):
        self.run_sequence(DYNAMIC_SIZE, False, sequence)

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(st.lists(steps(FIXED_SIZE), min_size=1, max_size=14))
    def test_fixed_base(self, sequence):
        self.run_sequence(FIXED_SIZE, True, sequence)

    def test_collapse_keeps_the_disk(self):
        """A fixed, readable example of the sequence the properties cover."""
        sequence = [
            ('write', BS - 700, 3000, 'random', 1),     # crosses a block
            ('snapshot',),
            ('write', 100, 10, 'byte', 2),              # sub-sector
            ('fill_block', 2, 3),                       # batmap bit
            ('snapshot',),
            ('write', 3 * BS + 513, BS, 'random', 4),
            ('write_zeroes', 1, 8),
            ('discard', 0, 8),                          # refused: parent
            ('collapse',),
            ('coalesce',),
            ('reopen',),
            ('write', 0, 5 * BS, 'random', 5),
        ]
        self.run_sequence(DYNAMIC_SIZE, False, sequence)
