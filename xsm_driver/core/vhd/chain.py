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

"""A VHD image and its parents, read and written as one virtual disk."""

import logging
import os
import threading

from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image

LOG = logging.getLogger(__name__)

BS = fmt.BLOCK_SIZE
SECTOR = fmt.SECTOR


def parent_candidates(path, img):
    """Paths where the parent of ``img`` may be, in the order to try them.

    The locators (MacX, W2ku, W2ru, in the order stored) are relative to the
    child's folder; the header's parent name in the same folder comes last.
    """
    folder = os.path.dirname(os.path.abspath(path))
    found = []
    for loc in img.header.locators:
        if loc.code not in fmt.LOCATOR_CODES or not loc.data_length:
            continue
        try:
            rel = fmt.decode_locator(loc.code, img.read_locator_data(loc))
        except UnicodeDecodeError:
            continue
        found.append(os.path.normpath(os.path.join(folder, rel)))
    if img.header.parent_name:
        found.append(os.path.join(folder, img.header.parent_name))
    return list(dict.fromkeys(found))


def open_parent(path, img):
    """Open the parent of ``img``: the first candidate with its uuid.

    Checking the uuid of every candidate (rather than taking the first
    file that exists) keeps a chain readable when a ``set-parent`` was
    interrupted between its locators and its header.
    """
    tried = parent_candidates(path, img)
    mismatched = []
    for candidate in tried:
        if not os.path.isfile(candidate):
            continue
        parent = vhd_image.Image(candidate)
        if parent.uuid == img.header.parent_uuid:
            return parent
        mismatched.append('%s is %s' % (candidate,
                                        fmt.format_uuid(parent.uuid)))
        parent.close()
    if mismatched:
        raise errors.ParentMismatch(
            path=path, parent=' or '.join(tried),
            reason='the child expects uuid %s, but %s'
            % (fmt.format_uuid(img.header.parent_uuid),
               ', '.join(mismatched)))
    raise errors.ParentNotFound(path=path, tried=', '.join(tried) or
                                'nothing: no locator and no parent name')


def resolve(path):
    """Paths of the chain from ``path`` (the leaf) to its base.

    Only headers are read; raises on a missing parent, a loop, a uuid
    mismatch or a chain deeper than 30.
    """
    return [img.path for img in _open_images(path, False, close=True)]


def _open_images(path, writable, close=False):
    images = []
    try:
        img = vhd_image.Image(path, writable=writable)
        images.append(img)
        seen = {os.path.realpath(path)}
        while img.type == fmt.TYPE_DIFF:
            if len(images) == fmt.MAX_CHAIN_DEPTH:
                raise errors.ChainTooDeep(path=path, depth=len(images) + 1,
                                          limit=fmt.MAX_CHAIN_DEPTH)
            img = open_parent(img.path, img)
            images.append(img)
            real = os.path.realpath(img.path)
            if real in seen:
                raise errors.ChainLoop(path=path, parent=img.path)
            seen.add(real)
    except BaseException:
        close = True
        raise
    finally:
        if close:
            _close_all(images)
    return images


def _close_all(images):
    """Close every image, even when closing one of them fails."""
    error = None
    for img in images:
        try:
            img.close()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


class Chain:
    """A leaf VHD and its parents as one virtual disk.

    Only the leaf can be written; parents are opened read-only. Reads and
    writes take any byte range; writes that do not cover whole sectors read
    the edge sectors through the chain first.

    :param path: the leaf image.
    :param writable: open the leaf for writing.
    """

    def __init__(self, path, writable=False):
        self.path = path
        if writable and vhd_image.is_read_only(path):
            raise errors.ReadOnlyImage(
                path=path, reason='the file has no write permission bits, '
                'which is how snapshot parents are made read-only; write to '
                'its leaf instead (or chmod u+w if it is no parent)')
        self.images = _open_images(path, writable)
        self.leaf = self.images[0]
        self.size = self.leaf.size
        self.writable = writable
        self._rmw_lock = threading.Lock()

    @property
    def depth(self):
        return len(self.images)

    def close(self):
        _close_all(self.images)

    def replace_parents(self, parents):
        """Read through ``parents`` from now on; the ones held close.

        Each image holds its BAT as it read it: parents written since
        this chain opened them (by another writer, e.g. a migration's
        copy into its base) are opened again and given here. Call it
        while nothing reads or writes through the chain.

        :param parents: the same images, opened again, base last.
        :raises errors.InvalidRequest: they are not the same images;
            nothing changed.
        """
        old = self.images[1:]
        if [p.uuid for p in parents] != [p.uuid for p in old]:
            given = ', '.join(p.path for p in parents)
            held = ', '.join(p.path for p in old)
            raise errors.InvalidRequest(
                path=self.path, reason='the parents given (%s) are not the '
                'chain\'s (%s)' % (given, held))
        self.images = [self.leaf] + list(parents)
        _close_all(old)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.InvalidRequest(
                path=self.path, reason='range %d+%d is outside the virtual '
                'disk of %d bytes' % (offset, length, self.size))

    # -- reads -------------------------------------------------------------

    def pread(self, offset, length):
        """Read ``length`` bytes at ``offset`` through the chain."""
        self.check_range(offset, length)
        data = self._read_direct(offset, length)
        if data is not None:
            return data
        buf = bytearray(length)
        self._read(0, memoryview(buf), offset)
        return buf

    def _read_direct(self, offset, length):
        """Bytes of a range one image holds whole within one block, or None.

        The common case (a sequential or random read of data the leaf or
        one parent wrote) then costs one ``pread`` and no buffer to zero.
        """
        block = offset // BS
        if not length or (offset + length - 1) // BS != block:
            return None
        for img in self.images:
            if offset + length > img.size:
                return None
            data_at = img.block_offset(block)
            if data_at is None:
                continue
            at = data_at + offset - block * BS
            if img.bat is not None and not img.is_full(block):
                first = (offset - block * BS) // SECTOR
                stop = -(-(offset + length - block * BS) // SECTOR)
                bits = img.bitmap(block)[first:stop]
                if '0' in bits:
                    return None
            data = img.read_raw(length, at)
            return data if len(data) == length else None
        return None

    def read_into(self, view, offset):
        """Read into a writable buffer (for ``recv_into``-style callers)."""
        view = memoryview(view).cast('B')
        self.check_range(offset, len(view))
        self._read(0, view, offset)

    def _read(self, level, view, offset):
        end = offset + len(view)
        if level == len(self.images):
            view[:] = bytes(len(view)) if len(view) > BS else \
                vhd_image.ZEROS[:len(view)]
            return
        img = self.images[level]
        if end > img.size:
            # A child may be larger than its parent; the rest reads as 0.
            cut = max(offset, img.size)
            self._read(len(self.images), view[cut - offset:], cut)
            if cut == offset:
                return
            view, end = view[:cut - offset], cut
        if img.bat is None:
            img.read_into(view, offset)
            return
        pos = offset
        while pos < end:
            block = pos // BS
            base = block * BS
            stop = min(end, base + BS)
            piece = view[pos - offset:stop - offset]
            data_at = img.block_offset(block)
            if data_at is None:
                self._read(level + 1, piece, pos)
            elif img.is_full(block):
                img.read_into(piece, data_at + pos - base)
            else:
                bits = img.bitmap(block)
                for first, last, is_set in vhd_image.runs(
                        bits, (pos - base) // SECTOR,
                        -(-(stop - base) // SECTOR)):
                    a = max(pos, base + first * SECTOR)
                    b = min(stop, base + last * SECTOR)
                    sub = view[a - offset:b - offset]
                    if is_set:
                        img.read_into(sub, data_at + a - base)
                    else:
                        self._read(level + 1, sub, a)
            pos = stop

    # -- writes ------------------------------------------------------------

    def pwrite(self, data, offset):
        """Write ``data`` (any bytes-like object) at ``offset``."""
        if not self.writable:
            raise errors.ReadOnlyImage(path=self.path,
                                       reason='the chain is not writable')
        view = memoryview(data).cast('B')
        self.check_range(offset, len(view))
        end = offset + len(view)
        if offset % SECTOR or end % SECTOR:
            # Read-modify-write of the edge sectors: two such writes into
            # the same sector (not overlapping each other) must not undo
            # one another, so they take turns.
            with self._rmw_lock:
                self._write_partial(view, offset, end)
            return
        if view:
            self.leaf.write(offset, view)

    def _write_partial(self, view, offset, end):
        start = offset - offset % SECTOR
        stop = -(-end // SECTOR) * SECTOR
        edges = memoryview(bytearray(stop - start))
        self._read(0, edges[:SECTOR], start)
        if stop - SECTOR > start:
            self._read(0, edges[-SECTOR:], stop - SECTOR)
        edges[offset - start:end - start] = view
        self.leaf.write(start, edges)

    def write_zeroes(self, offset, length):
        """Make a sector-aligned range read as zeros.

        In an image without a parent the sectors are only unmarked (no data
        is written); a differencing leaf must store the zeros.
        """
        self._check_aligned(offset, length)
        if self.leaf.type == fmt.TYPE_DYNAMIC:
            self.leaf.unmark(offset, length)
            return
        for pos in range(offset, offset + length, BS):
            n = min(BS, offset + length - pos)
            self.pwrite(vhd_image.ZEROS[:n], pos)

    def discard(self, offset, length):
        """Forget data where that is safe; returns True when it did.

        Only an image without a parent can forget sectors (they read as
        zeros afterwards); in a differencing image unmarking would expose
        the parent's older data, and in a fixed image nothing is gained.
        """
        self._check_aligned(offset, length)
        if self.leaf.type != fmt.TYPE_DYNAMIC:
            return False
        self.leaf.unmark(offset, length)
        return True

    def _check_aligned(self, offset, length):
        if not self.writable:
            raise errors.ReadOnlyImage(path=self.path,
                                       reason='the chain is not writable')
        self.check_range(offset, length)
        if offset % SECTOR or length % SECTOR:
            raise errors.InvalidRequest(
                path=self.path, reason='range %d+%d is not a whole number of '
                '512-byte sectors' % (offset, length))

    def flush(self):
        self.leaf.flush()

    # -- allocation ----------------------------------------------------------

    def extents(self, offset=0, length=None):
        """Allocated and unallocated runs of the chain in a range.

        :param offset: start of the range (bytes).
        :param length: length of the range; default to the end of the disk.
        :returns: a list of ``(offset, length, allocated)`` covering the
            range, adjacent runs merged, sector granularity.
        """
        end = self.size if length is None else offset + length
        self.check_range(offset, end - offset)
        first, last = offset // BS, -(-end // BS)
        if last - first <= 4096:
            touched = [b for b in range(first, last) if any(
                img.block_offset(b) is not None for img in self.images)]
        else:
            touched = set()
            for img in self.images:
                touched.update(b for b in img.allocated_blocks()
                               if first <= b < last)
            touched = sorted(touched)
        out = []

        def add(start, stop, allocated):
            start, stop = max(start, offset), min(stop, end)
            if start >= stop:
                return
            if out and out[-1][2] == allocated and \
                    out[-1][0] + out[-1][1] == start:
                start = out.pop()[0]
            out.append((start, stop - start, allocated))

        pos = offset
        for block in touched:
            add(pos, block * BS, False)
            base = block * BS
            for lo, hi, is_set in vhd_image.runs(
                    self._union_bitmap(block), 0, fmt.SECTORS_PER_BLOCK):
                add(base + lo * SECTOR, base + hi * SECTOR, is_set)
            pos = base + BS
        add(pos, end, False)
        return out

    def _union_bitmap(self, block):
        union = 0
        for img in self.images:
            if block * BS >= img.size or img.block_offset(block) is None:
                continue
            if img.is_full(block):
                return vhd_image.ALL_SET
            union |= int(img.bitmap(block), 2)
        return format(union, '0%db' % fmt.SECTORS_PER_BLOCK)

    def allocated_bytes(self):
        return sum(n for _o, n, alloc in self.extents() if alloc)
