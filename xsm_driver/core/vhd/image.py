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

"""One VHD file: validation on open, sector bitmaps, block allocation.

An :class:`Image` knows nothing of its parents; :mod:`.chain` reads through
them. Sector bitmaps are handed out as strings of ``'0'``/``'1'`` (one
character a sector, most significant bit first, as on disk) so that finding
runs and testing fullness are C-speed string operations; the cache of the
recently used ones keeps them as on disk, 512 bytes each instead of 4 KiB of
string (a 4 GiB leaf of scattered guest writes cached 8 MiB of strings).

Crash safety of a write that allocates a block (the only write that extends
the file) -- the order is chosen so that the file's last 512 bytes are a
valid footer at every instant and the BAT never points at data that is not
there:

1. the footer is written at the new end of the file (the file grows; the
   old footer is now inside unreferenced space);
2. the zero padding (over the old footer), the sector bitmap and the data
   are written; the rest of the block is the hole step 1 left, which reads
   as zeros (when the file held anything past the old footer, the zeros
   are written too, in one ``pwritev`` with the rest);
3. the BAT sector holding the block's entry is rewritten.

A crash before 3 leaves an image that opens and reads exactly as before the
write (the block is unreferenced space that the next allocation reuses); a
crash after 3 leaves the whole write. Writes into an allocated block write
the data first and the bitmap sector after it, so unmarked sectors still
read from the parent. The batmap (only a hint that a block is full; an unset
bit is always safe) is written at flush and close, header and bits in one
write.

Opening an image that another process (or thread) is writing: every state
the file passes through between two system calls of the writer is valid
(that is the crash safety above), but opening reads it with several calls,
so it can combine two states -- a file size taken before an allocation
with the footer slot the allocation has since overwritten, or with a BAT
entry pointing past that size. Hence :meth:`Image._load` reads the file
size again *after* the BAT (a BAT entry is only ever written after the
file grew to hold its block, so the later size covers every entry read
before it) and the footer at that end, and :meth:`Image._load_consistent`
opens again when validation fails but what the failed attempt read (file
sizes and every byte) differs from what the attempt before it read. A
corrupt image reads the same twice and is reported after the second
attempt; a changing one is retried a bounded number of times.
"""

import array
import collections
import ctypes
import errno
import logging
import os
import stat
import sys
import threading
import time
import warnings

from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt

LOG = logging.getLogger(__name__)

BS = fmt.BLOCK_SIZE
SPB = fmt.SECTORS_PER_BLOCK
ALL_SET = '1' * SPB
NONE_SET = '0' * SPB
ZEROS = memoryview(bytes(BS))
# Sector bitmaps cached per image (512 bytes each: about 2 MiB at most).
_BITMAP_CACHE = 4096
# Opening attempts while what is read keeps changing (see the module
# docstring), and the pause before the n-th retry (n times this, capped).
_LOAD_TRIES = 20
_RETRY_PAUSE = 0.001
_MAX_RETRY_PAUSE = 0.01
# Direct writes (see Image.enable_direct_writes): offset, length and memory
# aligned to DIRECT_ALIGN, at least DIRECT_MIN bytes.
DIRECT_ALIGN = 4096
DIRECT_MIN = 64 * 1024


def _address(view):
    """The memory address of a writable buffer, or None."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def direct_ok(view, offset):
    """Whether ``view`` may be written at ``offset`` with ``O_DIRECT``."""
    n = len(view)
    if n < DIRECT_MIN or (offset | n) % DIRECT_ALIGN:
        return False
    address = _address(view)
    return address is not None and not address % DIRECT_ALIGN


def read_footer(path):
    """The footer of an image, read and checked alone (one small read).

    :raises errors.VHDError: the file cannot be read.
    :raises errors.InvalidImage: its footer is not valid.
    """
    return _read_head(path)[0]


def parent_name(path):
    """The parent name a differencing image's header gives, else None.

    Reads the footer and the dynamic header only (two small reads), not
    the BAT: for questions about a chain's shape (which VDIs have this
    one as parent) asked of every image of an SR, where opening each
    (:class:`Image`) costs with its size.

    :raises errors.VHDError: the file cannot be read.
    :raises errors.InvalidImage: its footer or header is not valid.
    """
    return _read_head(path, header=True)[1]


def _read_head(path, header=False):
    """``(footer, parent name)`` of an image; the name only if asked."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
            if size < fmt.SECTOR:
                raise fmt.FormatError('file is %d bytes, too short for a '
                                      'footer' % size)
            footer = fmt.Footer.unpack(os.pread(f.fileno(), fmt.SECTOR,
                                                size - fmt.SECTOR))
            if not header or footer.type != fmt.TYPE_DIFF:
                return footer, None
            raw = os.pread(f.fileno(), 1024, fmt.HEADER_OFFSET)
            if len(raw) != 1024:
                raise fmt.FormatError('the dynamic header was cut short')
            return footer, fmt.Header.unpack(raw).parent_name
    except fmt.FormatError as exc:
        raise errors.InvalidImage(path=path, reason=str(exc))
    except OSError as exc:
        raise errors.VHDError(path=path, reason='cannot read: %s'
                              % (exc.strerror or exc))


def make_read_only(path):
    """Mark an image read-only the way snapshots do: no write bits."""
    os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o222)


def is_read_only(path):
    return not os.stat(path).st_mode & 0o222


def bits_to_bytes(bits):
    return int(bits, 2).to_bytes(fmt.BITMAP_SIZE, 'big')


def bytes_to_bits(raw):
    return format(int.from_bytes(raw, 'big'), '0%db' % SPB)


def runs(bits, start, end):
    """Yield ``(first, stop, is_set)`` runs of ``bits[start:end]``.

    >>> list(runs('0011101', 1, 7))
    [(1, 2, False), (2, 5, True), (5, 6, False), (6, 7, True)]
    """
    pos = start
    while pos < end:
        is_set = bits[pos] == '1'
        stop = bits.find('0' if is_set else '1', pos, end)
        if stop < 0:
            stop = end
        yield pos, stop, is_set
        pos = stop


def set_bits(bits, first, stop, value):
    return bits[:first] + ('1' if value else '0') * (stop - first) + \
        bits[stop:]


class Image:
    """A single VHD file, validated when opened.

    :param path: the file.
    :param writable: open for writing (parents of a chain never are).
    """

    def __init__(self, path, writable=False):
        self.path = path
        self.writable = writable
        self._lock = threading.Lock()
        self._bitmaps = collections.OrderedDict()
        self._batmap_dirty = False
        self._seen = None
        self._direct_fd = None
        try:
            self._fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY)
                               | getattr(os, 'O_CLOEXEC', 0))
        except OSError as exc:
            raise errors.VHDError(path=path, reason='cannot open: %s'
                                  % exc.strerror)
        try:
            self._load_consistent()
        except fmt.FormatError as exc:
            self.close()
            raise errors.InvalidImage(path=path, reason=str(exc))
        except OSError as exc:
            # A directory, or a read error: name the file, as for the open.
            self.close()
            raise errors.VHDError(path=path, reason='cannot read: %s'
                                  % (exc.strerror or exc))
        except BaseException:
            self.close()
            raise

    # -- opening and validation -------------------------------------------

    def _load_consistent(self):
        """:meth:`_load`, again while a concurrent writer explains failure.

        A failed attempt is retried when it read anything (a file size or
        a byte) different from the previous attempt: the file is changing
        under us. When two attempts in a row read the same, the image is
        what it is and the error stands; so is the error of the last of
        ``_LOAD_TRIES`` attempts.
        """
        previous = None
        try:
            for attempt in range(_LOAD_TRIES):
                self._seen = []
                try:
                    self._load()
                    return
                except fmt.FormatError as exc:
                    if self._seen == previous or attempt + 1 == _LOAD_TRIES:
                        raise
                    previous = self._seen
                    LOG.debug('%s changed while being opened (%s), opening '
                              'again', self.path, exc)
                # The first retry is immediate (a corrupt image costs one
                # more reading, no pause); later ones let the writer finish.
                time.sleep(min(_RETRY_PAUSE * attempt, _MAX_RETRY_PAUSE))
        finally:
            self._seen = None

    def _stat_size(self):
        size = os.fstat(self._fd).st_size
        if self._seen is not None:
            self._seen.append(size)
        return size

    def _pread(self, length, offset, what):
        """Read metadata whose offset and length come from the file."""
        if offset < 0 or length < 0 or offset + length > self.file_size:
            raise fmt.FormatError('the %s (%d bytes at offset %d) lies '
                                  'beyond the end of the file (%d bytes)'
                                  % (what, length, offset, self.file_size))
        data = os.pread(self._fd, length, offset)
        if self._seen is not None:
            self._seen.append((offset, data))
        if len(data) != length:
            raise fmt.FormatError('the %s (%d bytes at offset %d) was cut '
                                  'short' % (what, length, offset))
        return data

    def _load(self):
        self.file_size = self._stat_size()
        if self.file_size < fmt.SECTOR:
            raise fmt.FormatError('file is %d bytes, too short for a footer'
                                  % self.file_size)
        raw_footer = self._pread(fmt.SECTOR, self.file_size - fmt.SECTOR,
                                 'footer')
        self.footer = fmt.Footer.unpack(raw_footer)
        self.size = self.footer.size
        self.type = self.footer.type
        self.header = None
        self.bat = None
        self._batmap_header = None
        if self.type == fmt.TYPE_FIXED:
            if self.file_size < self.size + fmt.SECTOR:
                raise fmt.FormatError(
                    'fixed image of %d bytes needs a file of %d bytes, the '
                    'file has %d' % (self.size, self.size + fmt.SECTOR,
                                     self.file_size))
            return
        self.header = fmt.Header.unpack(
            self._pread(1024, fmt.HEADER_OFFSET, 'dynamic header'))
        entries = self.header.max_bat_entries
        if entries < fmt.bat_entries(self.size):
            raise fmt.FormatError('BAT has %d entries, %d are needed for %d '
                                  'bytes' % (entries,
                                             fmt.bat_entries(self.size),
                                             self.size))
        regions = [(0, fmt.BAT_OFFSET, 'footer copy and header')]
        bat_at = self.header.table_offset
        bat_len = fmt.bat_bytes(entries)
        if bat_at < fmt.BAT_OFFSET or bat_at % fmt.SECTOR:
            raise fmt.FormatError('BAT offset %d is not a sector after the '
                                  'header' % bat_at)
        self.bat = array.array('I', self._pread(entries * 4, bat_at, 'BAT'))
        if sys.byteorder == 'little':
            self.bat.byteswap()
        regions.append((bat_at, bat_at + bat_len, 'BAT'))
        self._batmap = bytearray(fmt.batmap_sectors(entries) * fmt.SECTOR)
        self._batmap_header = None
        if self.footer.has_batmap:
            self._load_batmap(bat_at + bat_len, entries, regions)
        self._recheck_end(raw_footer)
        if self.type == fmt.TYPE_DIFF:
            self._load_locators(regions)
        self._check_blocks(regions)

    def _recheck_end(self, raw_footer):
        """Take the file size again now that the BAT has been read.

        A writer grows the file (footer at the new end) before it points a
        BAT entry at the new block, so this size holds every block of the
        BAT read before it, where the size taken first may not. The footer
        at the new end must be the one validated at the old end.
        """
        first, size = self.file_size, self._stat_size()
        if size == first:
            return
        self.file_size = size
        if self._pread(fmt.SECTOR, size - fmt.SECTOR, 'footer') != raw_footer:
            raise fmt.FormatError('the footer changed while the file was '
                                  'being read (its size went from %d to %d '
                                  'bytes)' % (first, size))

    def _load_batmap(self, at, entries, regions):
        hdr = fmt.BatmapHeader.unpack(
            self._pread(fmt.SECTOR, at, 'batmap header'))
        if hdr.sectors < fmt.batmap_sectors(entries):
            raise fmt.FormatError('batmap has %d sectors, %d are needed'
                                  % (hdr.sectors,
                                     fmt.batmap_sectors(entries)))
        raw = self._pread(hdr.sectors * fmt.SECTOR, hdr.offset, 'batmap')
        expected = fmt.batmap_checksum(raw, self.size)
        if expected != hdr.checksum:
            raise fmt.FormatError('batmap checksum is 0x%08x, computed 0x%08x'
                                  % (hdr.checksum, expected))
        regions.append((at, at + fmt.SECTOR, 'batmap header'))
        regions.append((hdr.offset, hdr.offset + len(raw), 'batmap'))
        self._batmap = bytearray(raw)
        self._batmap_header = hdr

    def _load_locators(self, regions):
        for i, loc in enumerate(self.header.locators):
            if not loc.code:
                continue
            end = loc.data_offset + loc.space_bytes
            if (loc.data_length > loc.space_bytes or loc.data_offset %
                    fmt.SECTOR or end > self.file_size - fmt.SECTOR):
                raise fmt.FormatError(
                    'parent locator %d (offset %d, space %d, length %d) does '
                    'not fit in the file' % (i, loc.data_offset,
                                             loc.space_bytes,
                                             loc.data_length))
            regions.append((loc.data_offset, end, 'parent locator %d' % i))

    def _check_blocks(self, regions):
        """Every allocated block lies in the file and overlaps nothing."""
        blocks = sorted((e * fmt.SECTOR, i) for i, e in enumerate(self.bat)
                        if e != fmt.UNALLOCATED)
        regions.sort()
        for (a_start, a_end, a_name), (b_start, _e, b_name) in zip(
                regions, regions[1:]):
            if b_start < a_end:
                raise fmt.FormatError('%s (at %d) overlaps %s (at %d)'
                                      % (b_name, b_start, a_name, a_start))
        metadata_end = max(end for _s, end, _n in regions)
        footer_at = self.file_size - fmt.SECTOR
        previous_end, previous = metadata_end, None
        for start, block in blocks:
            if start + fmt.SECTOR + BS > footer_at:
                raise fmt.FormatError(
                    'BAT entry %d points at %d, beyond the end of the file '
                    '(%d bytes)' % (block, start, self.file_size))
            if start < previous_end:
                if previous is None:
                    raise fmt.FormatError(
                        'BAT entry %d points at %d, inside the metadata '
                        '(which ends at %d)' % (block, start, metadata_end))
                raise fmt.FormatError(
                    'blocks %d and %d overlap (at %d and %d)'
                    % (previous, block, previous_end - fmt.SECTOR - BS,
                       start))
            previous_end, previous = start + fmt.SECTOR + BS, block
        self._data_end = previous_end
        if self.writable and self._batmap_header is None and \
                self.footer.has_batmap:
            raise fmt.FormatError('batmap is missing')

    # -- block state ---------------------------------------------------------

    @property
    def uuid(self):
        return self.footer.uuid

    @property
    def blocks(self):
        return 0 if self.bat is None else len(self.bat)

    def block_offset(self, block):
        """Byte offset of a block's data in the file, or None."""
        if self.bat is None:
            return block * BS
        if block >= len(self.bat):
            return None
        entry = self.bat[block]
        if entry == fmt.UNALLOCATED:
            return None
        return entry * fmt.SECTOR + fmt.SECTOR

    def is_full(self, block):
        if self.bat is None:
            return True
        return bool(self._batmap[block >> 3] & (0x80 >> (block & 7)))

    def _set_full(self, block, full):
        mask = 0x80 >> (block & 7)
        if full:
            self._batmap[block >> 3] |= mask
        else:
            self._batmap[block >> 3] &= ~mask
        self._batmap_dirty = self._batmap_header is not None

    def bitmap(self, block):
        """The block's sector bitmap as a string of '0' and '1'."""
        if self.is_full(block):
            return ALL_SET
        raw = self._bitmaps.get(block)
        if raw is not None:
            self._bitmaps.move_to_end(block)
            return bytes_to_bits(raw)
        offset = self.block_offset(block)
        if offset is None:
            return NONE_SET
        raw = os.pread(self._fd, fmt.BITMAP_SIZE, offset - fmt.SECTOR)
        bits = bytes_to_bits(raw)
        if bits == ALL_SET:
            self._set_full(block, True)
        else:
            self._cache(block, raw)
        return bits

    def _cache(self, block, raw):
        """Remember ``block``'s bitmap, ``raw`` as on disk (512 bytes)."""
        self._bitmaps[block] = raw
        self._bitmaps.move_to_end(block)
        while len(self._bitmaps) > _BITMAP_CACHE:
            self._bitmaps.popitem(last=False)

    def allocated_blocks(self):
        if self.bat is None:
            return range(fmt.bat_entries(self.size))
        return [i for i, e in enumerate(self.bat) if e != fmt.UNALLOCATED]

    # -- data ----------------------------------------------------------------

    def read_into(self, view, file_offset):
        got = os.preadv(self._fd, [view], file_offset)
        if got != len(view):
            raise errors.InvalidImage(
                path=self.path, reason='short read of %d bytes at %d (got %d)'
                % (len(view), file_offset, got))

    def _require_writable(self):
        if not self.writable:
            raise errors.ReadOnlyImage(path=self.path,
                                       reason='it cannot be written')

    def write(self, offset, data):
        """Write sector-aligned ``data`` at virtual ``offset``.

        ``data`` is a memoryview whose length is a multiple of 512.
        """
        self._require_writable()
        if self.bat is None:
            self._pwritev([data], offset)
            return
        pos, end = offset, offset + len(data)
        while pos < end:
            block = pos // BS
            stop = min(end, (block + 1) * BS)
            self._write_block(block, (pos - block * BS) // fmt.SECTOR,
                              data[pos - offset:stop - offset])
            pos = stop

    def _write_block(self, block, first, chunk):
        stop = first + len(chunk) // fmt.SECTOR
        with self._lock:
            offset = self.block_offset(block)
            if offset is None:
                self._allocate(block, first, stop, chunk)
                return
        self._write_data(chunk, offset + first * fmt.SECTOR)
        self._mark(block, first, stop, True)

    def _mark(self, block, first, stop, value):
        with self._lock:
            bits = self.bitmap(block)
            if (('0' if value else '1') not in bits[first:stop]):
                return
            bits = set_bits(bits, first, stop, value)
            raw = bits_to_bytes(bits)
            self._pwritev([raw], self.block_offset(block) - fmt.SECTOR)
            if bits == ALL_SET:
                self._bitmaps.pop(block, None)
                self._set_full(block, True)
            else:
                self._cache(block, raw)
                if value is False and self.is_full(block):
                    self._set_full(block, False)

    def _allocate(self, block, first, stop, chunk):
        """Append a new block (see the module docstring for the order)."""
        bitmap_at = fmt.first_block_offset(self._data_end)
        footer_at = bitmap_at + fmt.SECTOR + BS
        bits = set_bits(NONE_SET, first, stop, True)
        # Nothing but the old footer lies past the data: the new footer,
        # written beyond the end, leaves a hole that reads as zeros, so
        # only the old footer's place, the bitmap and the written sectors
        # need writing (a 4 KiB guest write costs 4 KiB, not 2 MiB).
        holes = self.file_size <= self._data_end + fmt.SECTOR
        self._pwritev([self.footer.pack()], footer_at)
        if self.file_size > footer_at + fmt.SECTOR:
            os.ftruncate(self._fd, footer_at + fmt.SECTOR)
        self.file_size = footer_at + fmt.SECTOR
        raw = bits_to_bytes(bits)
        head = [ZEROS[:bitmap_at - self._data_end], raw]
        if holes:
            self._pwritev(head, self._data_end)
            self._write_data(chunk, bitmap_at + (1 + first) * fmt.SECTOR)
        else:
            self._pwritev(head + [ZEROS[:first * fmt.SECTOR], chunk,
                                  ZEROS[:(SPB - stop) * fmt.SECTOR]],
                          self._data_end)
        self.bat[block] = bitmap_at // fmt.SECTOR
        self._write_bat_sector(block)
        self._data_end = footer_at
        if bits == ALL_SET:
            self._set_full(block, True)
        else:
            self._cache(block, raw)

    def _write_bat_sector(self, block):
        first = block - block % (fmt.SECTOR // 4)
        entries = self.bat[first:first + fmt.SECTOR // 4]
        if sys.byteorder == 'little':
            entries.byteswap()
        raw = entries.tobytes()
        if len(raw) < fmt.SECTOR:
            # The last BAT sector: keep the padding that is on disk.
            at = self.header.table_offset + first * 4 + len(raw)
            raw += os.pread(self._fd, fmt.SECTOR - len(raw), at)
        self._pwritev([raw], self.header.table_offset + first * 4)

    def unmark(self, offset, length):
        """Zero whole sectors and mark them unwritten.

        In an image without a parent they read as zeros either way; the
        data is zeroed first because ``vhd-util check -b`` rejects data
        under a clear bitmap bit. The space stays allocated.
        """
        self._require_writable()
        pos, end = offset, offset + length
        while pos < end:
            block = pos // BS
            stop = min(end, (block + 1) * BS)
            data_at = self.block_offset(block)
            if data_at is not None:
                self._pwritev([ZEROS[:stop - pos]], data_at + pos % BS)
                self._mark(block, (pos - block * BS) // fmt.SECTOR,
                           (stop - block * BS) // fmt.SECTOR, False)
            pos = stop

    def enable_direct_writes(self):
        """Write large aligned data with ``O_DIRECT`` from now on.

        For a bulk copy into a new image (a migration's destination base):
        the data goes from the caller's buffer to the disk, not through
        the page cache, which on a busy host costs more CPU than the copy
        itself. Only data writes of at least :data:`DIRECT_MIN` bytes whose
        offset, length and memory are aligned to :data:`DIRECT_ALIGN` go
        direct (a copy's requests into a page-aligned buffer); metadata and
        every other write stay buffered, and Linux keeps buffered reads
        coherent with direct writes. Durability is unchanged: :meth:`flush`
        still ends with ``fsync``.

        :returns: False when the file system refuses ``O_DIRECT`` (writes
            then stay buffered).
        """
        self._require_writable()
        if self._direct_fd is not None:
            return True
        flag = getattr(os, 'O_DIRECT', 0)
        if not flag:
            return False
        try:
            self._direct_fd = os.open(self.path, os.O_WRONLY | flag |
                                      getattr(os, 'O_CLOEXEC', 0))
        except OSError as exc:
            LOG.debug('%s: no direct writes (%s)', self.path, exc.strerror)
            return False
        return True

    def _write_data(self, chunk, offset):
        """Write guest data: direct when enabled and aligned."""
        fd = self._direct_fd
        if fd is None or not direct_ok(chunk, offset):
            self._pwritev([chunk], offset)
            return
        want = len(chunk)
        try:
            done = os.pwritev(fd, [chunk], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise errors.VHDError(
                    path=self.path, errno=exc.errno, reason='write of %d '
                    'bytes at %d failed: %s' % (want, offset, exc.strerror))
            # Not for this file system after all: buffered from now on.
            LOG.debug('%s: direct write refused (%s), writing through the '
                      'page cache', self.path, exc.strerror)
            self._close_direct()
            self._pwritev([chunk], offset)
            return
        if done != want:
            # the rest (a full disk says so there) through the page cache
            self._pwritev([chunk[done:]], offset + done)

    def _close_direct(self):
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            os.close(fd)

    def _pwritev(self, buffers, offset):
        want = sum(len(b) for b in buffers)
        try:
            done = os.pwritev(self._fd, buffers, offset)
        except OSError as exc:
            raise errors.VHDError(path=self.path, errno=exc.errno,
                                  reason='write of %d bytes at %d failed: %s'
                                  % (want, offset, exc.strerror))
        if done != want:
            # A regular file only writes short when the disk is full.
            raise errors.VHDError(
                path=self.path, errno=errno.ENOSPC, reason='short write at '
                '%d: %d of %d bytes (disk full?)' % (offset, done, want))

    # -- metadata updates ----------------------------------------------------

    def write_footer(self, footer):
        """Replace both footers (the end one first)."""
        self._require_writable()
        raw = footer.pack()
        self._pwritev([raw], self.file_size - fmt.SECTOR)
        if self.type != fmt.TYPE_FIXED:
            self._pwritev([raw], 0)
        self.footer = footer

    def write_raw(self, data, offset):
        """Write bytes of the file itself in one system call."""
        self._require_writable()
        self._pwritev([data], offset)

    def read_locator_data(self, locator):
        return os.pread(self._fd, locator.data_length, locator.data_offset)

    def read_raw(self, length, offset):
        """Bytes of the file itself (for ``check``)."""
        return os.pread(self._fd, length, offset)

    @property
    def batmap_header(self):
        return self._batmap_header

    def _write_batmap(self):
        hdr = self._batmap_header
        hdr.checksum = fmt.batmap_checksum(self._batmap, self.size)
        at = self.header.table_offset + fmt.bat_bytes(len(self.bat))
        if hdr.offset == at + fmt.SECTOR:
            self._pwritev([hdr.pack(), self._batmap], at)
        else:
            self._pwritev([self._batmap], hdr.offset)
            self._pwritev([hdr.pack()], at)
        self._batmap_dirty = False

    def flush(self):
        """Write the batmap if it changed and make everything durable."""
        if not self.writable:
            return
        with self._lock:
            if self._batmap_dirty:
                self._write_batmap()
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise errors.VHDError(path=self.path, reason='fsync failed: '
                                      '%s' % exc.strerror)

    def close(self):
        if getattr(self, '_fd', None) is None:
            return
        try:
            if self.writable and self._batmap_dirty:
                self._write_batmap()
        finally:
            self._close_direct()
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        # An image dropped without close(): give its descriptors back (an
        # agent runs for months) but write nothing from the collector; a
        # batmap left unwritten only under-reports full blocks.
        if getattr(self, '_fd', None) is None:
            return
        warnings.warn('VHD image %s was not closed' % self.path,
                      ResourceWarning, stacklevel=2)
        self._close_direct()
        os.close(self._fd)
        self._fd = None

    def __repr__(self):
        return '<Image %s %s %d>' % (self.path,
                                     fmt.TYPE_NAMES[self.type], self.size)
