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

"""The sector bitmaps an image caches: what they cost, what they answer."""

import os
import tracemalloc

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

KiB = 1024
MiB = 1024 * KiB
BLOCKS = 256                      # partly written blocks, each cached
SIZE = BLOCKS * fmt.BLOCK_SIZE


def scattered(block):
    """Virtual offset of the 4 KiB a guest writes in ``block``."""
    return block * fmt.BLOCK_SIZE + (block * 37 % 500) * 4 * KiB


class BitmapCacheTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.path = os.path.join(self.dir, 'leaf.vhd')
        ops.create(self.path, SIZE)

    def write_scattered(self, chain):
        for block in range(BLOCKS):
            chain.pwrite(bytes([block % 251 + 1]) * 4 * KiB, scattered(block))

    def test_cached_bitmaps_cost_their_size_on_disk(self):
        # One 4 KiB guest write in each 2 MiB block: every block partly
        # written, its bitmap cached. What stays allocated in the image
        # module afterwards is about 512 bytes a block (the bitmap as on
        # disk), not a 4096-character string.
        chain = vhd_chain.Chain(self.path, writable=True)
        self.addCleanup(chain.close)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = tracemalloc.take_snapshot()
        self.write_scattered(chain)
        after = tracemalloc.take_snapshot()
        kept = sum(st.size_diff for st in after.compare_to(
            before, 'filename')
            if st.traceback[0].filename == vhd_image.__file__)
        self.assertEqual(BLOCKS, len(chain.leaf._bitmaps))
        self.assertLess(kept, BLOCKS * (fmt.BITMAP_SIZE + 128),
                        'the cache keeps %d bytes for %d bitmaps'
                        % (kept, BLOCKS))

    def test_bitmaps_from_the_cache_and_from_the_file_agree(self):
        chain = vhd_chain.Chain(self.path, writable=True)
        self.addCleanup(chain.close)
        self.write_scattered(chain)
        # a second write in block 3 changes its cached bitmap
        chain.pwrite(b'\x7f' * 8 * KiB, 3 * fmt.BLOCK_SIZE)
        cached = [chain.leaf.bitmap(b) for b in range(BLOCKS)]
        chain.close()
        fresh = vhd_image.Image(self.path)
        self.addCleanup(fresh.close)
        self.assertEqual(cached, [fresh.bitmap(b) for b in range(BLOCKS)])
        for block, bits in enumerate(cached):
            first = (scattered(block) % fmt.BLOCK_SIZE) // fmt.SECTOR
            expected = [(first, first + 8, True)]
            if block == 3:
                expected.insert(0, (0, 16, True))
            self.assertEqual(expected, [r for r in vhd_image.runs(
                bits, 0, fmt.SECTORS_PER_BLOCK) if r[2]], block)

    def test_the_cache_is_bounded(self):
        self.patch(vhd_image, '_BITMAP_CACHE', 16)
        chain = vhd_chain.Chain(self.path, writable=True)
        self.addCleanup(chain.close)
        self.write_scattered(chain)
        self.assertEqual(16, len(chain.leaf._bitmaps))
        # the most recent ones stay
        self.assertEqual(list(range(BLOCKS - 16, BLOCKS)),
                         list(chain.leaf._bitmaps))
