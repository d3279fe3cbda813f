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

"""The ``raw`` SR: thick raw files.

Every VDI is ``<uuid>.raw``, allocated in full when created, with no
parent. Read-only is the file mode; the hidden flag, which a raw file cannot
hold, lives in the VDI's record.

Raw VDIs have no snapshot: the migration engine copies a raw source live
while it mirrors the guest's writes, which is our equivalent.

A migration into a raw VDI writes one file through two views that share a
sector map (:class:`LeafView` for the mirrored guest writes,
:class:`BaseView` for the copy): a sector the leaf wrote is never written
by the base afterwards, so the leaf always wins, whatever the order in
which the two arrive.
"""

import errno
import logging
import os
import re
import threading

from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.sr import base

LOG = logging.getLogger(__name__)

SECTOR = base.SECTOR
_ZERO_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_ZERO_CHUNK))
# Bytes with at least one bit set / at least one bit clear.
_ANY_SET = re.compile(rb'[^\x00]')
_ANY_CLEAR = re.compile(rb'[^\xff]')


class RawVolume(base.Volume, backends.RawDevice):
    """A raw VDI attached from an SR; tells the SR when it is closed."""


class SectorMap:
    """One bit a 512-byte sector, most significant bit first.

    Not thread-safe by itself: the views call it under their shared lock.
    """

    def __init__(self, sectors):
        self.sectors = sectors
        self.bits = bytearray(-(-sectors // 8))

    def is_set(self, sector):
        return bool(self.bits[sector >> 3] & (0x80 >> (sector & 7)))

    def set(self, first, stop):
        """Set the bits of sectors ``first`` to ``stop - 1``."""
        pos = first
        while pos < stop and pos & 7:
            self.bits[pos >> 3] |= 0x80 >> (pos & 7)
            pos += 1
        whole = (stop - pos) >> 3
        if whole:
            self.bits[pos >> 3:(pos >> 3) + whole] = b'\xff' * whole
            pos += whole << 3
        while pos < stop:
            self.bits[pos >> 3] |= 0x80 >> (pos & 7)
            pos += 1

    def _find(self, pos, stop, value):
        """First sector in ``[pos, stop)`` whose bit is ``value``, or stop."""
        other = _ANY_SET if value else _ANY_CLEAR
        while pos < stop:
            if not pos & 7:
                # Skip whole bytes without the bit we look for.
                first, last = pos >> 3, stop >> 3
                if first < last:
                    match = other.search(self.bits, first, last)
                    pos = (match.start() if match else last) << 3
                    if pos >= stop:
                        return stop
            if self.is_set(pos) == value:
                return pos
            pos += 1
        return stop

    def clear_runs(self, first, stop):
        """Yield ``(start, end)`` runs of clear bits in ``[first, stop)``."""
        pos = first
        while pos < stop:
            start = self._find(pos, stop, False)
            if start >= stop:
                return
            end = self._find(start, stop, True)
            yield start, end
            pos = end


class _Shared:
    """The file both views write, its sector map and their lock."""

    def __init__(self, path, release):
        self.raw = backends.RawDevice(path, writable=True)
        self.map = SectorMap(self.raw.size // SECTOR)
        self.lock = threading.Lock()
        self.users = 2
        self._release = release

    def drop(self):
        with self.lock:
            self.users -= 1
            last = self.users == 0
        if last:
            try:
                self.raw.close()
            finally:
                self._release()


class _View(device.BlockDevice):
    """A view of the received file.

    Reads, flushes and extents are the file's. Trim does nothing: the
    source keeps old data under a trim of its differencing leaf, and the
    copy brings that data here.
    """

    can_write = can_flush = can_fua = can_trim = can_zero = True
    can_extents = True
    role = None

    def __init__(self, shared):
        self._shared = shared
        self._closed = False
        self.name = '%s (%s)' % (shared.raw.name, self.role)

    @property
    def size(self):
        return self._shared.raw.size

    def _raw(self):
        if self._closed:
            raise device.BlockError(device=self.name, reason='the device is '
                                    'closed', errno=errno.EBADF)
        return self._shared.raw

    def pread(self, offset, length):
        return self._raw().pread(offset, length)

    def read_into(self, buf, offset):
        self._raw().read_into(buf, offset)

    def flush(self):
        self._raw().flush()

    def trim(self, offset, length):
        self._raw()
        self.check_range(offset, length)

    def extents(self, offset, length):
        return self._raw().extents(offset, length)

    def _write_zeros(self, raw, offset, length):
        for pos in range(offset, offset + length, _ZERO_CHUNK):
            raw.pwrite(_ZEROS[:min(_ZERO_CHUNK, offset + length - pos)], pos)

    def close(self):
        if not self._closed:
            self._closed = True
            self._shared.drop()


class LeafView(_View):
    """Where mirrored guest writes land; they win over the base.

    Writes must cover whole 512-byte sectors (the mirror aligns them): the
    base data of a partly written sector may not have arrived yet, so it
    cannot be merged. An unaligned write fails with EINVAL.
    """

    role = 'leaf'

    def _claim(self, offset, length):
        """Check a write and mark its sectors as the leaf's."""
        self.check_range(offset, length)
        if offset % SECTOR or length % SECTOR:
            raise device.BlockError(
                device=self.name, errno=errno.EINVAL,
                reason='write of %d bytes at %d is not whole 512-byte '
                'sectors; writes to a receiving leaf must be aligned'
                % (length, offset))
        raw = self._raw()
        # Marked under the lock that base writes hold while they write: a
        # base write of these sectors has landed already or never will.
        with self._shared.lock:
            self._shared.map.set(offset // SECTOR,
                                 (offset + length) // SECTOR)
        return raw

    def pwrite(self, data, offset, fua=False):
        view = memoryview(data).cast('B')
        raw = self._claim(offset, len(view))
        raw.pwrite(view, offset, fua)

    def zero(self, offset, length, may_trim=False):
        raw = self._claim(offset, length)
        self._write_zeros(raw, offset, length)


class BaseView(_View):
    """Where the copy of the source lands; it skips what the leaf wrote."""

    role = 'base'

    def _unclaimed(self, offset, length, write):
        """Call ``write(raw, start, end)`` for the runs the leaf left.

        The lock is held the whole time, so no leaf write of these sectors
        can land before the base data.
        """
        self.check_range(offset, length)
        raw = self._raw()
        end = offset + length
        with self._shared.lock:
            for first, stop in self._shared.map.clear_runs(
                    offset // SECTOR, -(-end // SECTOR)):
                write(raw, max(offset, first * SECTOR),
                      min(end, stop * SECTOR))
        return raw

    def pwrite(self, data, offset, fua=False):
        view = memoryview(data).cast('B')
        raw = self._unclaimed(
            offset, len(view),
            lambda raw, a, b: raw.pwrite(view[a - offset:b - offset], a))
        if fua:
            raw.flush()

    def zero(self, offset, length, may_trim=False):
        self._unclaimed(offset, length,
                        lambda raw, a, b: self._write_zeros(raw, a, b - a))


class RawSR(base.SR):
    """An SR of thick raw files."""

    type = 'raw'
    ext = 'raw'
    hidden_in_record = True

    def _check_size(self, size):
        if not isinstance(size, int) or isinstance(size, bool) or \
                size <= 0 or size % SECTOR:
            raise base.InvalidSize(sr=self.name, size=size,
                                   reason='a raw VDI is a positive multiple '
                                   'of 512 bytes')
        return size

    def _facts(self, uuid, path, record):
        st = os.stat(path)
        return {'size': st.st_size, 'parent': None,
                'read_only': not st.st_mode & 0o222,
                'hidden': bool(record.get('hidden')),
                'physical': st.st_blocks * 512, 'allocated': st.st_size}

    def _build(self, uuid, path, size, hidden):
        tmp = self._tmp_path(uuid, 'new')
        base.remove(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                         os.O_CLOEXEC, 0o644)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            base.remove(tmp)
            raise
        self._place(uuid, tmp, path)

    def _set_hidden(self, uuid, path, hidden):
        self._write_record(uuid, hidden=hidden)

    def _open(self, uuid, path, writable, release):
        return RawVolume(path, writable, release)

    def _not_supported(self, what, uuid):
        uuid = self._check_uuid(uuid)
        self.get(uuid)
        return base.NotSupported(
            sr=self.name, type=self.type,
            reason='cannot %s VDI %s: raw VDIs have no differencing images; '
            'the migration engine copies a raw VDI live while it mirrors '
            'its writes instead' % (what, uuid))

    def snapshot(self, uuid):
        raise self._not_supported('snapshot', uuid)

    def coalesce(self, uuid):
        raise self._not_supported('coalesce', uuid)

    def receive(self, size, name='', vm=None):
        """One raw file, written through a base and a leaf view."""
        vdi = self.create(size, name=name, vm=vm)
        try:
            with self._locked():
                release = self._attached(vdi.uuid)
                try:
                    shared = _Shared(self.vdi_path(vdi.uuid), release)
                except BaseException:
                    release()
                    raise
        except BaseException as exc:
            self.destroy(vdi.uuid)
            if isinstance(exc, Exception):
                raise self._error('receive into', vdi.uuid, exc)
            raise
        LOG.info('SR %s: receiving into raw VDI %s', self.name, vdi.uuid)
        return base.Receiver(self, BaseView(shared), LeafView(shared),
                             vdi.uuid, [vdi.uuid])
