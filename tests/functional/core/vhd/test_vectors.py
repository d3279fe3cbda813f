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

"""The engine against images made by XenServer's vhd-util, and qemu-img."""

import hashlib
import json
import os
import random
import shutil
import subprocess

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
# Bytes that differ between two images made at different times: the
# footer's timestamp, checksum and uuid (in both footers) and the header's
# checksum, parent uuid and parent timestamp.
_FOOTER_VOLATILE = [(24, 28), (64, 84)]
_HEADER_VOLATILE = [(512 + 36, 512 + 60)]


def sha256_of(chain):
    digest = hashlib.sha256()
    for pos in range(0, chain.size, 8 * MiB):
        digest.update(chain.pread(pos, min(8 * MiB, chain.size - pos)))
    return digest.hexdigest()


def masked(raw, dynamic):
    raw = bytearray(raw)
    spans = [(len(raw) - 512 + a, len(raw) - 512 + b)
             for a, b in _FOOTER_VOLATILE]
    if dynamic:
        spans += _FOOTER_VOLATILE + _HEADER_VOLATILE
    for a, b in spans:
        raw[a:b] = bytes(b - a)
    return bytes(raw)


class VectorTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        source = self.vectors_dir()
        with open(os.path.join(source, 'MANIFEST.json')) as f:
            self.manifest = json.load(f)
        # The vectors are read-only: work on copies.
        self.dir = self.make_tempdir()
        for name in self.manifest:
            shutil.copy(os.path.join(source, name), self.dir)
            os.chmod(os.path.join(self.dir, name), 0o644)

    def path(self, name):
        return os.path.join(self.dir, name)


class VhdUtilVectorsTest(VectorTestCase):

    def test_every_vector_reads_as_manifest_says(self):
        for name, meta in sorted(self.manifest.items()):
            with vhd_chain.Chain(self.path(name)) as c:
                self.assertEqual(meta['virtual_size'], c.size, name)
                self.assertEqual(meta['type'],
                                 fmt.TYPE_NAMES[c.leaf.type], name)
                parent = c.images[1].path if c.depth > 1 else None
                self.assertEqual(meta['parent'],
                                 parent and os.path.basename(parent), name)
                self.assertEqual(meta['sha256_of_virtual_disk'],
                                 sha256_of(c), name)
            self.assertEqual([], check.check(self.path(name), chain=True))

    def test_every_vector_exports_to_the_manifest_sha256(self):
        for name, meta in sorted(self.manifest.items()):
            out = ops.export(self.path(name), self.path(name + '.raw'))
            digest = hashlib.sha256()
            with open(out, 'rb') as f:
                for chunk in iter(lambda: f.read(8 * MiB), b''):
                    digest.update(chunk)
            self.assertEqual(meta['sha256_of_virtual_disk'],
                             digest.hexdigest(), name)

    def replay(self, source, target):
        """Write into ``target`` exactly the sectors ``source`` marks."""
        img = vhd_image.Image(source)
        self.addCleanup(img.close)
        order = sorted((img.bat[b], b) for b in img.allocated_blocks())
        with vhd_chain.Chain(target, writable=True) as c:
            for _entry, block in order:
                data_at = img.block_offset(block)
                for first, stop, is_set in vhd_image.runs(
                        img.bitmap(block), 0, fmt.SECTORS_PER_BLOCK):
                    if is_set:
                        buf = bytearray((stop - first) * 512)
                        img.read_into(memoryview(buf), data_at + first * 512)
                        c.pwrite(buf, block * fmt.BLOCK_SIZE + first * 512)

    def test_our_images_are_byte_identical_to_vhd_util(self):
        ours = os.path.join(self.dir, 'ours')
        os.mkdir(ours)

        def mine(name):
            return os.path.join(ours, name)

        ops.create(mine('empty-1g.vhd'), 1024 * MiB)
        ops.create(mine('dyn-16m.vhd'), 16 * MiB)
        self.replay(self.path('dyn-16m.vhd'), mine('dyn-16m.vhd'))
        ops.create(mine('chain-base.vhd'), 32 * MiB)
        self.replay(self.path('chain-base.vhd'), mine('chain-base.vhd'))
        ops.snapshot(mine('chain-mid.vhd'), mine('chain-base.vhd'))
        self.replay(self.path('chain-mid.vhd'), mine('chain-mid.vhd'))
        ops.snapshot(mine('chain-leaf.vhd'), mine('chain-mid.vhd'))
        self.replay(self.path('chain-leaf.vhd'), mine('chain-leaf.vhd'))
        ops.create(mine('fixed-4m.vhd'), 4 * MiB, fixed=True)
        for name in ('empty-1g.vhd', 'dyn-16m.vhd', 'chain-base.vhd',
                     'chain-mid.vhd', 'chain-leaf.vhd'):
            with open(self.path(name), 'rb') as f:
                theirs = masked(f.read(), True)
            with open(mine(name), 'rb') as f:
                self.assertEqual(theirs, masked(f.read(), True), name)
        with open(self.path('fixed-4m.vhd'), 'rb') as f:
            theirs_footer = masked(f.read()[-512:], False)
        with open(mine('fixed-4m.vhd'), 'rb') as f:
            raw = f.read()
        self.assertEqual(4 * MiB + 512, len(raw))
        self.assertEqual(theirs_footer, masked(raw[-512:], False))

    def test_writes_into_vectors_stay_valid(self):
        rng = random.Random(7)
        for name in ('dyn-16m.vhd', 'chain-leaf.vhd', 'fixed-4m.vhd'):
            with vhd_chain.Chain(self.path(name), writable=True) as c:
                model = bytearray(c.pread(0, c.size))
                for _ in range(40):
                    length = rng.randint(1, 3 * MiB)
                    offset = rng.randrange(0, c.size - length)
                    data = rng.randbytes(length)
                    c.pwrite(data, offset)
                    model[offset:offset + length] = data
            with vhd_chain.Chain(self.path(name)) as c:
                self.assertEqual(bytes(model), bytes(c.pread(0, c.size)),
                                 name)
            self.assertEqual([], check.check(self.path(name), chain=True))


class QemuTest(VectorTestCase):
    """qemu-img (Debian qemu-utils) reads what we write, and vice versa."""

    def setUp(self):
        super().setUp()
        self.qemu_img = self.require_command('qemu-img')
        self.qemu_io = self.require_command('qemu-io')

    def run_cmd(self, *args):
        result = subprocess.run(args, capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(0, result.returncode,
                         '%s failed: %s%s' % (' '.join(args), result.stdout,
                                              result.stderr))
        return result.stdout

    def compare(self, image, raw):
        self.run_cmd(self.qemu_img, 'compare', '-f', 'vpc', '-F', 'raw',
                     image, raw)

    def test_qemu_reads_vectors_after_our_writes(self):
        rng = random.Random(3)
        for name in ('fixed-4m.vhd', 'dyn-16m.vhd', 'empty-1g.vhd'):
            with vhd_chain.Chain(self.path(name), writable=True) as c:
                for _ in range(25):
                    length = rng.randint(1, MiB)
                    c.pwrite(rng.randbytes(length),
                             rng.randrange(0, min(c.size, 64 * MiB) - length))
            out = ops.export(self.path(name), self.path(name + '.raw'))
            self.compare(self.path(name), out)

    def test_qemu_reads_images_we_create(self):
        for fixed in (False, True):
            name = 'new-%s.vhd' % fixed
            ops.create(self.path(name), 40 * MiB, fixed=fixed)
            with vhd_chain.Chain(self.path(name), writable=True) as c:
                c.pwrite(b'\xa5' * (3 * MiB + 7), MiB + 11)
                c.pwrite(b'\x5a' * 512, 39 * MiB)
            # A fixed VHD has no footer copy at offset 0 for qemu to probe.
            info = json.loads(self.run_cmd(self.qemu_img, 'info', '-f', 'vpc',
                                           '--output=json', self.path(name)))
            self.assertEqual('vpc', info['format'])
            self.assertEqual(40 * MiB, info['virtual-size'])
            self.compare(self.path(name),
                         ops.export(self.path(name),
                                    self.path(name + '.raw')))

    def test_we_read_what_qemu_writes(self):
        image = self.path('qemu.vhd')
        self.run_cmd(self.qemu_img, 'create', '-q', '-f', 'vpc', '-o',
                     'subformat=dynamic', image, '64M')
        self.run_cmd(self.qemu_io, '-f', 'vpc',
                     '-c', 'write -P 0x61 0 3M',
                     '-c', 'write -P 0x62 5000k 4k',
                     '-c', 'write -P 0x63 60M 1M', image)
        raw = self.path('qemu.raw')
        self.run_cmd(self.qemu_img, 'convert', '-f', 'vpc', '-O', 'raw',
                     image, raw)
        with open(raw, 'rb') as f:
            expected = f.read()
        with vhd_chain.Chain(image) as c:
            self.assertEqual(expected, bytes(c.pread(0, c.size)))
            allocated = sum(n for _o, n, a in c.extents() if a)
        self.assertGreaterEqual(allocated, 4 * MiB + 4096)
        with vhd_chain.Chain(image, writable=True) as c:
            c.pwrite(b'\x64' * 4096, MiB)
        expected = expected[:MiB] + b'\x64' * 4096 + expected[MiB + 4096:]
        with open(raw, 'wb') as f:
            f.write(expected)
        self.compare(image, raw)
