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

"""The block device interface every backend and filter implements.

Modelled on nbdkit's plugin table: a device answers ``size``, ``pread``,
``pwrite``, ``flush``, ``trim``, ``zero`` and ``extents``, and says what it
can do through ``can_*`` probes. A filter wraps another device (``next``)
and overrides only what it changes; no filter changes data.
"""

import abc
import errno

from xsm_driver.core import exception

# Extent flags, as NBD's base:allocation context defines them.
HOLE = 1
ZERO = 2


class BlockError(exception.XSMError):
    """An I/O request failed; ``errno`` says how, as NBD would reply."""

    msg_fmt = "%(device)s: %(reason)s"

    def __init__(self, message=None, errno=errno.EIO, **kwargs):
        super().__init__(message, **kwargs)
        self.errno = errno


class BlockDevice(abc.ABC):
    """A virtual disk that serves byte-addressed reads and writes.

    Implementations are safe to call from many threads at once.
    """

    name = 'device'

    @property
    @abc.abstractmethod
    def size(self):
        """Size of the device in bytes."""

    @abc.abstractmethod
    def pread(self, offset, length):
        """Read bytes.

        :param offset: byte offset.
        :param length: number of bytes.
        :returns: a bytes-like object of exactly ``length`` bytes.
        """

    def read_into(self, buf, offset):
        """Read ``len(buf)`` bytes at ``offset`` into a writable buffer.

        For callers that reuse their buffers (the copy). This default reads
        with :meth:`pread` and copies; backends read straight into ``buf``.
        A filter inherits this default, so that its own :meth:`pread` is
        never bypassed; one that only passes reads on may pass this on too.

        :param buf: a writable bytes-like object.
        :param offset: byte offset.
        """
        view = memoryview(buf).cast('B')
        view[:] = self.pread(offset, len(view))

    def pwrite(self, data, offset, fua=False):
        """Write bytes.

        :param data: a bytes-like object.
        :param offset: byte offset.
        :param fua: make the write durable before returning.
        """
        raise self._unsupported('write')

    def flush(self):
        """Make every completed write durable."""

    def trim(self, offset, length):
        """Say a range is no longer needed; its content becomes undefined."""

    def zero(self, offset, length, may_trim=False):
        """Make a range read as zeros.

        :param may_trim: the device may deallocate the range.
        """
        step = 1 << 20
        buf = bytes(min(step, length))
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            self.pwrite(memoryview(buf)[:n], pos)

    def extents(self, offset, length):
        """Allocation of a range.

        :returns: a list of ``(offset, length, flags)`` covering the range,
            ``flags`` a combination of :data:`HOLE` and :data:`ZERO`.
        """
        return [(offset, length, 0)]

    def close(self):
        """Release what the device holds."""

    # -- capability probes --------------------------------------------------

    can_write = False
    can_flush = False
    can_fua = False
    can_trim = False
    can_zero = False
    can_extents = False

    def _unsupported(self, what):
        return BlockError(device=self.name, reason='%s is not supported'
                          % what, errno=errno.EOPNOTSUPP)

    def check_range(self, offset, length):
        """Raise :class:`BlockError` (EINVAL) for a range outside the disk."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(device=self.name, errno=errno.EINVAL,
                             reason='range %d+%d is outside the %d-byte '
                             'device' % (offset, length, self.size))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _passthrough(probe):
    return property(lambda self: getattr(self.next, probe))


class Filter(BlockDevice):
    """A device stacked over another; passes everything through."""

    can_write = _passthrough('can_write')
    can_flush = _passthrough('can_flush')
    can_fua = _passthrough('can_fua')
    can_trim = _passthrough('can_trim')
    can_zero = _passthrough('can_zero')
    can_extents = _passthrough('can_extents')

    def __init__(self, next_device):
        self.next = next_device

    @property
    def name(self):
        return self.next.name

    @property
    def size(self):
        return self.next.size

    def pread(self, offset, length):
        return self.next.pread(offset, length)

    def pwrite(self, data, offset, fua=False):
        return self.next.pwrite(data, offset, fua)

    def flush(self):
        return self.next.flush()

    def trim(self, offset, length):
        return self.next.trim(offset, length)

    def zero(self, offset, length, may_trim=False):
        return self.next.zero(offset, length, may_trim)

    def extents(self, offset, length):
        return self.next.extents(offset, length)

    def close(self):
        return self.next.close()
