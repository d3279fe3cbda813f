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

"""Direct (O_DIRECT) data writes of a VHD image, for bulk copies."""

import errno
import mmap
import os

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.core.vhd import errors as vhd_errors
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB


def aligned(data):
    """``data`` in a page-aligned buffer (as the NBD server receives)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    return buf


class DirectWritesTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.path = os.path.join(self.dir, 'base.vhd')
        ops.create(self.path, SIZE)
        self.chain = vhd_chain.Chain(self.path, writable=True)
        # the chain open at the end (reopen() replaces it)
        self.addCleanup(lambda: self.chain.close())
        self.direct = []
        if not self.chain.leaf.enable_direct_writes():
            self.missing('the file system of %s refuses O_DIRECT (set '
                         'TMPDIR to a disk file system)' % self.dir)
        real = os.pwritev

        def spy(fd, buffers, offset):
            if fd == self.chain.leaf._direct_fd:
                self.direct.append((offset, sum(len(b) for b in buffers)))
            return real(fd, buffers, offset)
        self.useFixture(_Patch(os, 'pwritev', spy))

    def reopen(self):
        self.chain.close()
        self.chain = vhd_chain.Chain(self.path)
        return self.chain

    def test_aligned_copy_goes_direct_and_reads_back(self):
        want = bytearray(SIZE)
        pieces = [(0, 4 * MiB), (6 * MiB, 2 * MiB), (9 * MiB, MiB),
                  (SIZE - 4 * MiB, 4 * MiB)]
        for offset, n in pieces:
            data = os.urandom(n)
            want[offset:offset + n] = data
            self.chain.pwrite(aligned(data), offset)
        self.assertEqual(sum(n for _o, n in pieces),
                         sum(n for _o, n in self.direct))
        # into a block already allocated: direct too
        data = os.urandom(128 * KiB)
        want[MiB:MiB + len(data)] = data
        self.chain.pwrite(aligned(data), MiB)
        self.assertEqual(128 * KiB, self.direct[-1][1])
        self.chain.flush()
        self.assertEqual(bytes(want), bytes(self.reopen().pread(0, SIZE)))
        self.assertEqual([], vhd_check.check(self.path))

    def test_what_cannot_go_direct_is_written_buffered(self):
        want = bytearray(SIZE)
        cases = [(0, os.urandom(4 * MiB)),              # bytes: read-only
                 (4 * MiB + 512, aligned(os.urandom(MiB))),  # offset
                 (8 * MiB, aligned(os.urandom(16 * KiB))),   # too small
                 (12 * MiB, aligned(os.urandom(MiB + 512)))]  # length
        for offset, data in cases:
            want[offset:offset + len(data)] = data
            self.chain.pwrite(data, offset)
        # a buffer whose memory is not page-aligned
        raw = bytearray(MiB + 8)
        view = memoryview(raw)[8:]
        view[:] = os.urandom(MiB)
        if vhd_image.direct_ok(view, 16 * MiB):
            view = memoryview(bytearray(MiB + 16))[16:]
            view[:] = os.urandom(MiB)
        self.assertFalse(vhd_image.direct_ok(view, 16 * MiB))
        want[16 * MiB:17 * MiB] = view
        self.chain.pwrite(view, 16 * MiB)
        self.assertEqual([], self.direct)
        self.chain.flush()
        self.assertEqual(bytes(want), bytes(self.reopen().pread(0, SIZE)))
        self.assertEqual([], vhd_check.check(self.path))

    def test_buffered_and_direct_writes_of_the_same_place_agree(self):
        first = os.urandom(2 * MiB)
        self.chain.pwrite(first, 2 * MiB)                   # buffered
        self.assertEqual(first, bytes(self.chain.pread(2 * MiB, 2 * MiB)))
        second = os.urandom(2 * MiB)
        self.chain.pwrite(aligned(second), 2 * MiB)         # direct
        self.assertEqual(1, len(self.direct))
        self.assertEqual(second, bytes(self.chain.pread(2 * MiB, 2 * MiB)))
        third = os.urandom(4 * KiB)
        self.chain.pwrite(third, 3 * MiB)                   # buffered
        want = second[:MiB] + third + second[MiB + 4 * KiB:]
        self.assertEqual(want, bytes(self.chain.pread(2 * MiB, 2 * MiB)))
        self.chain.flush()
        self.assertEqual(want, bytes(self.reopen().pread(2 * MiB, 2 * MiB)))

    def test_refused_direct_write_falls_back_to_the_page_cache(self):
        leaf = self.chain.leaf
        real = os.pwritev
        refused = []

        def refuse(fd, buffers, offset):
            if fd == leaf._direct_fd:
                refused.append(offset)
                raise OSError(errno.EINVAL, 'Invalid argument')
            return real(fd, buffers, offset)
        self.useFixture(_Patch(os, 'pwritev', refuse))
        data = os.urandom(4 * MiB)
        self.chain.pwrite(aligned(data), 0)
        self.assertEqual(1, len(refused))
        self.assertIsNone(leaf._direct_fd)           # buffered from now on
        self.chain.pwrite(aligned(data), 4 * MiB)
        self.assertEqual(1, len(refused))
        self.chain.flush()
        self.assertEqual(data + data, bytes(self.reopen().pread(0, 8 * MiB)))

    def test_other_errors_are_reported_with_the_path(self):
        leaf = self.chain.leaf
        real = os.pwritev

        def fail(fd, buffers, offset):
            if fd == leaf._direct_fd:
                raise OSError(errno.EIO, 'Input/output error')
            return real(fd, buffers, offset)
        self.useFixture(_Patch(os, 'pwritev', fail))
        exc = self.assertRaises(vhd_errors.VHDError, self.chain.pwrite,
                                aligned(os.urandom(2 * MiB)), 0)
        self.assertIn(self.path, str(exc))
        self.assertEqual(errno.EIO, exc.kwargs['errno'])

    def test_read_only_image_refuses(self):
        self.chain.close()
        with vhd_chain.Chain(self.path) as c:
            self.assertRaises(vhd_errors.ReadOnlyImage,
                              c.leaf.enable_direct_writes)

    def test_close_closes_the_direct_descriptor(self):
        fd = self.chain.leaf._direct_fd
        self.assertIsNotNone(fd)
        self.chain.close()
        self.assertRaises(OSError, os.fstat, fd)


class _Patch(object):
    """``fixtures.MonkeyPatch`` for a module attribute given as an object."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def setUp(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def cleanUp(self):
        setattr(self.obj, self.name, self.old)

    def getDetails(self):
        return {}
