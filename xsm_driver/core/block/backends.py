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

"""Block devices backed by a VHD chain or a raw file."""

import contextlib
import ctypes
import errno
import logging
import os

from xsm_driver.core.block import device
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import errors as vhd_errors
from xsm_driver.core.vhd import format as vhd_format

LOG = logging.getLogger(__name__)

SECTOR = vhd_format.SECTOR


@contextlib.contextmanager
def _as_block_errors(dev):
    """Turn engine and OS errors into :class:`device.BlockError`."""
    try:
        yield
    except device.BlockError:
        raise
    except vhd_errors.InvalidRequest as exc:
        raise device.BlockError(str(exc), errno=errno.EINVAL)
    except vhd_errors.ReadOnlyImage as exc:
        raise device.BlockError(str(exc), errno=errno.EPERM)
    except vhd_errors.VHDError as exc:
        raise device.BlockError(str(exc),
                                errno=exc.kwargs.get('errno') or errno.EIO)
    except OSError as exc:
        raise device.BlockError(device=dev.name, reason=exc.strerror or
                                str(exc), errno=exc.errno or errno.EIO)


class VHDDevice(device.BlockDevice):
    """A VHD chain; only its leaf is written.

    :param path: the leaf image.
    :param writable: open the leaf for writing.
    """

    can_flush = True
    can_fua = True
    can_extents = True

    def __init__(self, path, writable=False):
        self.name = path
        self.chain = vhd_chain.Chain(path, writable=writable)
        self.can_write = self.can_trim = self.can_zero = writable

    @property
    def size(self):
        return self.chain.size

    def pread(self, offset, length):
        self.check_range(offset, length)
        with _as_block_errors(self):
            return self.chain.pread(offset, length)

    def read_into(self, buf, offset):
        view = memoryview(buf).cast('B')
        self.check_range(offset, len(view))
        with _as_block_errors(self):
            self.chain.read_into(view, offset)

    def pwrite(self, data, offset, fua=False):
        with _as_block_errors(self):
            self.chain.pwrite(data, offset)
            if fua:
                self.chain.flush()

    def flush(self):
        with _as_block_errors(self):
            self.chain.flush()

    def trim(self, offset, length):
        self.check_range(offset, length)
        start = -(-offset // SECTOR) * SECTOR
        stop = (offset + length) // SECTOR * SECTOR
        if stop > start:
            with _as_block_errors(self):
                self.chain.discard(start, stop - start)

    def zero(self, offset, length, may_trim=False):
        self.check_range(offset, length)
        start = -(-offset // SECTOR) * SECTOR
        stop = (offset + length) // SECTOR * SECTOR
        with _as_block_errors(self):
            if stop <= start:
                self.chain.pwrite(bytes(length), offset)
                return
            if start > offset:
                self.chain.pwrite(bytes(start - offset), offset)
            if offset + length > stop:
                self.chain.pwrite(bytes(offset + length - stop), stop)
            self.chain.write_zeroes(start, stop - start)

    def extents(self, offset, length):
        with _as_block_errors(self):
            return [(o, n, 0 if allocated else device.HOLE | device.ZERO)
                    for o, n, allocated in self.chain.extents(offset,
                                                              length)]

    def close(self):
        self.chain.close()


_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def _libc_fallocate():
    try:
        # The process's own symbols: no library search (which probes the
        # host with uname and ldconfig) at import time.
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError, TypeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                     ctypes.c_int64]
    return func


_fallocate = _libc_fallocate()


class RawDevice(device.BlockDevice):
    """A raw file (or block device) used as a disk.

    :param path: the file.
    :param writable: open for writing.
    """

    can_flush = True
    can_fua = True
    can_extents = True

    def __init__(self, path, writable=False):
        self.name = path
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags)
        except OSError as exc:
            raise device.BlockError(device=path, reason='cannot open: %s'
                                    % exc.strerror, errno=exc.errno)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self.can_write = self.can_trim = self.can_zero = writable

    @property
    def size(self):
        return self._size

    def pread(self, offset, length):
        buf = bytearray(length)
        self.read_into(buf, offset)
        return buf

    def read_into(self, buf, offset):
        view = memoryview(buf).cast('B')
        length = len(view)
        self.check_range(offset, length)
        with _as_block_errors(self):
            done = 0
            while done < length:
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if not got:
                    # a file that shrank reads as zeros
                    view[done:] = bytes(length - done)
                    break
                done += got

    def pwrite(self, data, offset, fua=False):
        view = memoryview(data).cast('B')
        self.check_range(offset, len(view))
        if not self.can_write:
            raise device.BlockError(device=self.name, reason='read-only',
                                    errno=errno.EPERM)
        with _as_block_errors(self):
            while view:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
            if fua:
                os.fdatasync(self._fd)

    def flush(self):
        with _as_block_errors(self):
            os.fdatasync(self._fd)

    def _punch(self, offset, length):
        if _fallocate is None:
            return False
        flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, flags, offset, length) == 0:
            return True
        LOG.debug('%s: punching a hole failed: %s', self.name,
                  os.strerror(ctypes.get_errno()))
        return False

    def trim(self, offset, length):
        self.check_range(offset, length)
        if self.can_trim:
            self._punch(offset, length)

    def zero(self, offset, length, may_trim=False):
        self.check_range(offset, length)
        if not self._punch(offset, length):
            super().zero(offset, length, may_trim)

    def extents(self, offset, length):
        self.check_range(offset, length)
        out = []
        pos, end = offset, offset + length
        with _as_block_errors(self):
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end          # only a hole remains
                data = min(data, end)
                if data > pos:
                    out.append((pos, data - pos, device.HOLE | device.ZERO))
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                out.append((data, hole - data, 0))
                pos = hole
        return out

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
