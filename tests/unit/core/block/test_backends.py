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

"""VHD and raw block devices."""

import errno
import os

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
HOLE = device.HOLE | device.ZERO


class VHDDeviceTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.path = os.path.join(self.dir, 'd.vhd')
        ops.create(self.path, 8 * MiB)

    def open(self, writable=True):
        dev = backends.VHDDevice(self.path, writable=writable)
        self.addCleanup(dev.close)
        return dev

    def test_read_write_extents(self):
        dev = self.open()
        self.assertTrue(dev.can_write and dev.can_extents and dev.can_zero)
        dev.pwrite(b'a' * 4096, MiB, fua=True)
        self.assertEqual(b'a' * 4096, dev.pread(MiB, 4096))
        self.assertEqual([(0, MiB, HOLE), (MiB, 4096, 0),
                          (MiB + 4096, 7 * MiB - 4096, HOLE)],
                         dev.extents(0, 8 * MiB))

    def test_read_into_reads_as_pread(self):
        dev = self.open()
        dev.pwrite(os.urandom(3 * MiB), MiB - 512)
        dev.pwrite(b'x' * 512, 6 * MiB + 1024)
        buf = bytearray(b'\xff' * (8 * MiB))      # junk from a reuse
        dev.read_into(buf, 0)
        self.assertEqual(bytes(dev.pread(0, 8 * MiB)), bytes(buf))
        view = memoryview(buf)[:4096]
        dev.read_into(view, 6 * MiB)
        self.assertEqual(bytes(1024) + b'x' * 512 + bytes(2560),
                         bytes(view))
        err = self.assertRaises(device.BlockError, dev.read_into,
                                bytearray(4096), 8 * MiB - 512)
        self.assertEqual(errno.EINVAL, err.errno)

    def test_zero_unaligned(self):
        dev = self.open()
        dev.pwrite(b'b' * 8192, 0)
        dev.zero(100, 5000)
        self.assertEqual(b'b' * 100 + bytes(5000) + b'b' * 3092,
                         dev.pread(0, 8192))

    def test_trim_in_dynamic_reads_zero(self):
        dev = self.open()
        dev.pwrite(b'c' * 8192, 0)
        dev.trim(0, 4096)
        self.assertEqual(bytes(4096) + b'c' * 4096, dev.pread(0, 8192))

    def test_errors_carry_errno(self):
        dev = self.open()
        err = self.assertRaises(device.BlockError, dev.pread, 8 * MiB, 1)
        self.assertEqual(errno.EINVAL, err.errno)
        ro = self.open(writable=False)
        self.assertFalse(ro.can_write)
        err = self.assertRaises(device.BlockError, ro.pwrite, b'x', 0)
        self.assertEqual(errno.EPERM, err.errno)


class RawDeviceTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.make_tempdir(), 'd.raw')
        with open(self.path, 'wb') as f:
            f.truncate(8 * MiB)

    def test_read_write_extents_zero(self):
        dev = backends.RawDevice(self.path, writable=True)
        self.addCleanup(dev.close)
        self.assertEqual(8 * MiB, dev.size)
        dev.pwrite(b'r' * MiB, 2 * MiB, fua=True)
        self.assertEqual(b'r' * MiB, dev.pread(2 * MiB, MiB))
        extents = dev.extents(0, 8 * MiB)
        self.assertEqual(8 * MiB, sum(n for _o, n, _f in extents))
        self.assertIn((2 * MiB, MiB, 0), extents)
        self.assertEqual(HOLE, extents[0][2])
        dev.zero(2 * MiB, 4096)
        self.assertEqual(bytes(4096), dev.pread(2 * MiB, 4096))
        self.assertEqual(b'r', dev.pread(2 * MiB + 4096, 1))

    def test_read_into_reused_buffer_of_a_file_that_shrank(self):
        dev = backends.RawDevice(self.path, writable=True)
        self.addCleanup(dev.close)
        dev.pwrite(b'r' * 8192, 0)
        buf = bytearray(b'\xff' * 16384)          # junk from a reuse
        dev.read_into(buf, 0)
        self.assertEqual(b'r' * 8192 + bytes(8192), bytes(buf))
        os.truncate(self.path, 4096)               # shrank under us
        buf[:] = b'\xff' * 16384
        dev.read_into(memoryview(buf)[:8192], 0)
        self.assertEqual(b'r' * 4096 + bytes(4096) + b'\xff' * 8192,
                         bytes(buf))

    def test_read_only(self):
        dev = backends.RawDevice(self.path)
        self.addCleanup(dev.close)
        err = self.assertRaises(device.BlockError, dev.pwrite, b'x', 0)
        self.assertEqual(errno.EPERM, err.errno)

    def test_missing_file(self):
        err = self.assertRaises(device.BlockError, backends.RawDevice,
                                self.path + '.nope')
        self.assertIn('cannot open', str(err))
