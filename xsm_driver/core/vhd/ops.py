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

"""Operations on VHD files: create, snapshot, set-parent, coalesce, export.

New files are built beside their final name and linked into place, so an
interrupted ``create`` or ``snapshot`` never leaves a half-written image
under the name asked for, and an existing file is never overwritten.
"""

import glob
import logging
import os
import stat
import tempfile
import time

from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image

LOG = logging.getLogger(__name__)

COPY_CHUNK = 8 * 1024 * 1024
# set-parent rewrites header to locators in one write; XenServer's images
# keep that under 5 MiB (a 2 TiB BAT is 4 MiB).
_MAX_METADATA_REWRITE = 64 * 1024 * 1024


def _publish(path, build, mode=0o644):
    """Build a new file with ``build(fd)`` and link it at ``path``."""
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    if os.path.lexists(path):
        raise errors.InvalidRequest(path=path, reason='already exists; '
                                    'refusing to overwrite it')
    try:
        fd, tmp = tempfile.mkstemp(prefix='.%s.' % name, suffix='.tmp',
                                   dir=folder)
    except OSError as exc:
        raise errors.VHDError(path=path, reason='cannot create: %s'
                              % exc.strerror)
    try:
        build(fd)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.link(tmp, path)
    except FileExistsError:
        raise errors.InvalidRequest(path=path, reason='already exists; '
                                    'refusing to overwrite it')
    except OSError as exc:
        raise errors.VHDError(path=path, reason='cannot create: %s'
                              % exc.strerror)
    finally:
        os.close(fd)
        os.unlink(tmp)
    return path


def _write_all(fd, data, offset):
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _check_size(path, size):
    if not fmt.MIN_SIZE <= size <= fmt.MAX_SIZE:
        raise errors.InvalidRequest(
            path=path, reason='virtual size %d is outside 2 MiB..2040 GiB'
            % size)


def _dynamic_image(footer, header, lay, locator_payloads=()):
    buf = bytearray(lay.metadata_end + fmt.SECTOR)
    packed = footer.pack()
    buf[:fmt.SECTOR] = packed
    buf[-fmt.SECTOR:] = packed
    buf[fmt.HEADER_OFFSET:fmt.BAT_OFFSET] = header.pack()
    buf[fmt.BAT_OFFSET:fmt.BAT_OFFSET + 4 * lay.entries] = (
        b'\xff' * (4 * lay.entries))
    batmap = bytes(lay.batmap_sectors * fmt.SECTOR)
    buf[lay.batmap_header_offset:lay.batmap_offset] = fmt.BatmapHeader(
        offset=lay.batmap_offset, sectors=lay.batmap_sectors,
        checksum=fmt.batmap_checksum(batmap, footer.size)).pack()
    for loc, payload in zip(header.locators, locator_payloads):
        buf[loc.data_offset:loc.data_offset + len(payload)] = payload
    return buf


def create(path, size, fixed=False):
    """Create an empty fixed or dynamic image of ``size`` bytes.

    The size is rounded up to whole 2 MiB blocks, as libvhd does.
    """
    size = fmt.round_size(size)
    _check_size(path, size)
    footer = fmt.Footer(type=fmt.TYPE_FIXED if fixed else fmt.TYPE_DYNAMIC,
                        size=size, uuid=fmt.new_uuid(),
                        timestamp=fmt.vhd_time(time.time()))
    if fixed:
        footer.data_offset = fmt.NO_OFFSET

        def build(fd):
            os.ftruncate(fd, size)
            _write_all(fd, footer.pack(), size)
    else:
        lay = fmt.layout(size, differencing=False)
        header = fmt.Header(max_bat_entries=lay.entries)

        def build(fd):
            _write_all(fd, _dynamic_image(footer, header, lay), 0)
    return _publish(path, build)


def _parent_reference(child_path, parent_path):
    """Header name and locator payloads for a parent, relative to the child.

    :returns: ``(name, [(code, payload), ...])``
    """
    parent_path = os.path.abspath(parent_path)
    name = os.path.basename(parent_path)
    rel = os.path.relpath(parent_path,
                          os.path.dirname(os.path.abspath(child_path)))
    if not rel.startswith('..'):
        rel = './' + rel
    if not (name.isascii() and name.isprintable()):
        raise errors.InvalidRequest(
            path=child_path, reason='parent file name %r is not printable '
            'ASCII, which XenServer requires' % name)
    payloads = [(code, fmt.encode_locator(code, rel))
                for code in fmt.LOCATOR_CODES]
    for code, payload in payloads:
        if len(payload) > fmt.LOCATOR_SPACE:
            raise errors.InvalidRequest(
                path=child_path, reason='relative path to the parent %r is '
                'too long for a parent locator (%d bytes, at most %d)'
                % (rel, len(payload), fmt.LOCATOR_SPACE))
    return name, payloads


def _open_parent_for_child(child_path, parent_path):
    """Validate the chain a new child will hang from; return its facts."""
    with vhd_chain.Chain(parent_path) as parent:
        if parent.depth + 1 > fmt.MAX_CHAIN_DEPTH:
            raise errors.ChainTooDeep(path=child_path,
                                      depth=parent.depth + 1,
                                      limit=fmt.MAX_CHAIN_DEPTH)
        real_child = os.path.realpath(child_path)
        for img in parent.images:
            if os.path.realpath(img.path) == real_child:
                raise errors.ChainLoop(path=child_path, parent=img.path)
        return parent.leaf.uuid, parent.size


def snapshot(child_path, parent_path):
    """Create a differencing image over ``parent_path``.

    The parent becomes read-only: its write permission bits are removed and
    :class:`~xsm_driver.core.vhd.chain.Chain` refuses to write it.
    """
    parent_uuid, size = _open_parent_for_child(child_path, parent_path)
    name, payloads = _parent_reference(child_path, parent_path)
    lay = fmt.layout(size, differencing=True)
    locators = [fmt.Locator(code, fmt.LOCATOR_SPACE, len(payload), offset)
                for (code, payload), offset in zip(payloads,
                                                   lay.locator_offsets)]
    locators += [fmt.Locator() for _ in range(8 - len(locators))]
    header = fmt.Header(
        max_bat_entries=lay.entries, parent_uuid=parent_uuid,
        parent_timestamp=fmt.vhd_time(os.stat(parent_path).st_mtime),
        parent_name=name, locators=locators)
    footer = fmt.Footer(type=fmt.TYPE_DIFF, size=size, uuid=fmt.new_uuid(),
                        timestamp=fmt.vhd_time(time.time()))
    vhd_image.make_read_only(parent_path)
    image = _dynamic_image(footer, header, lay, [p for _c, p in payloads])
    return _publish(child_path, lambda fd: _write_all(fd, image, 0))


def set_parent(child_path, parent_path, durable=True):
    """Re-point a differencing image at a new parent (compose).

    Updates the parent uuid, timestamp, name and the MacX/W2ku/W2ru
    locators. The header and the locators are rewritten in a single write
    (with the unchanged BAT and batmap between them), so an interrupted
    call leaves either the old parent or the new one, never a mix.

    :param durable: False: the write is not followed by ``fsync`` (the
        caller makes the file durable later).
    """
    parent_uuid, parent_size = _open_parent_for_child(child_path,
                                                      parent_path)
    name, payloads = _parent_reference(child_path, parent_path)
    img = vhd_image.Image(child_path, writable=True)
    try:
        if img.type != fmt.TYPE_DIFF:
            raise errors.InvalidRequest(
                path=child_path, reason='is a %s image; only a differencing '
                'image has a parent' % fmt.TYPE_NAMES[img.type])
        if img.size < parent_size:
            raise errors.InvalidRequest(
                path=child_path, reason='virtual size %d is smaller than the '
                'new parent %s (%d)' % (img.size, parent_path, parent_size))
        header = img.header
        slots = [(loc, payload) for code, payload in payloads
                 for loc in header.locators if loc.code == code]
        if not slots:
            raise errors.InvalidRequest(path=child_path,
                                        reason='has no parent locator to '
                                        'rewrite')
        for loc, payload in slots:
            if len(payload) > loc.space_bytes or \
                    loc.data_offset < fmt.BAT_OFFSET:
                raise errors.InvalidRequest(
                    path=child_path, reason='parent locator at %d has room '
                    'for %d bytes, the new path needs %d'
                    % (loc.data_offset, loc.space_bytes, len(payload)))
            loc.data_length = len(payload)
        header.parent_uuid = parent_uuid
        header.parent_timestamp = fmt.vhd_time(os.stat(parent_path).st_mtime)
        header.parent_name = name
        start = fmt.HEADER_OFFSET
        end = max(loc.data_offset + loc.space_bytes for loc, _p in slots)
        if end - start > _MAX_METADATA_REWRITE:
            raise errors.InvalidRequest(
                path=child_path, reason='parent locators lie %d bytes after '
                'the header; too far to rewrite them with it' % end)
        buf = bytearray(img.read_raw(end - start, start))
        buf[:1024] = header.pack()
        for loc, payload in slots:
            at = loc.data_offset - start
            buf[at:at + loc.space_bytes] = payload + bytes(
                loc.space_bytes - len(payload))
        img.write_raw(buf, start)
        if durable:
            img.flush()
    finally:
        img.close()


def refresh_parent_timestamp(child_path, parent_path, durable=True):
    """Record the parent's present mtime in a child's header, alone.

    For a child whose parent was written after the child was made over it
    (a migration's base, copied into while its leaf took the mirrored
    writes): only the 1024-byte header is read (with the footer copy at
    offset 0) and rewritten, in one write -- not the BAT, nor the batmap,
    nor the footer at the end, which a writer of the child may be
    changing meanwhile. The parent must be the one the header names.

    :param durable: False: no ``fsync`` (the caller makes the file
        durable later).
    :raises errors.InvalidRequest: the child is no differencing image, or
        names another parent.
    """
    parent = vhd_image.read_footer(parent_path)
    mtime = os.stat(parent_path).st_mtime
    try:
        fd = os.open(child_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.VHDError(path=child_path, reason='cannot open: %s'
                              % exc.strerror)
    try:
        try:
            footer = fmt.Footer.unpack(os.pread(fd, fmt.SECTOR, 0))
            if footer.type != fmt.TYPE_DIFF:
                raise errors.InvalidRequest(
                    path=child_path, reason='is a %s image; only a '
                    'differencing image has a parent'
                    % fmt.TYPE_NAMES[footer.type])
            header = fmt.Header.unpack(os.pread(fd, 1024, fmt.HEADER_OFFSET))
        except fmt.FormatError as exc:
            raise errors.InvalidImage(path=child_path, reason=str(exc))
        if header.parent_uuid != parent.uuid:
            raise errors.InvalidRequest(
                path=child_path, reason='its parent is %s, not %s (%s)'
                % (fmt.format_uuid(header.parent_uuid),
                   fmt.format_uuid(parent.uuid), parent_path))
        header.parent_timestamp = fmt.vhd_time(mtime)
        os.pwrite(fd, header.pack(), fmt.HEADER_OFFSET)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _children_of(parent):
    """Differencing images beside ``parent`` whose header names it."""
    found = []
    for path in glob.glob(os.path.join(os.path.dirname(parent.path) or '.',
                                       '*.vhd')):
        try:
            img = vhd_image.Image(path)
        except errors.VHDError:
            continue
        try:
            if img.type == fmt.TYPE_DIFF and \
                    img.header.parent_uuid == parent.uuid:
                found.append(path)
        finally:
            img.close()
    return found


def coalesce(child_path):
    """Merge a differencing image's data into its parent.

    Only the sectors the child has written are copied; the child is left as
    it is (it reads the same as before). Refused when the parent has other
    children in its folder, whose content would change. Safe to run again
    after an interruption.

    :returns: the parent's path.
    """
    with vhd_chain.Chain(child_path) as chain:
        if chain.depth < 2:
            raise errors.InvalidRequest(path=child_path,
                                        reason='has no parent to coalesce '
                                        'into')
        child, parent_path = chain.leaf, chain.images[1].path
        if child.size > chain.images[1].size:
            raise errors.InvalidRequest(
                path=child_path, reason='is larger than its parent %s; '
                'resize the parent first' % parent_path)
        real = os.path.realpath(child_path)
        others = [p for p in _children_of(chain.images[1])
                  if os.path.realpath(p) != real]
        if others:
            raise errors.InvalidRequest(
                path=child_path, reason='its parent %s has other children '
                '(%s) whose content coalescing would change'
                % (parent_path, ', '.join(sorted(others))))
        parent = vhd_image.Image(parent_path, writable=True)
        try:
            buf = memoryview(bytearray(fmt.BLOCK_SIZE))
            for block in child.allocated_blocks():
                data_at = child.block_offset(block)
                bits = child.bitmap(block)
                for first, stop, is_set in vhd_image.runs(
                        bits, 0, fmt.SECTORS_PER_BLOCK):
                    if not is_set:
                        continue
                    piece = buf[first * fmt.SECTOR:stop * fmt.SECTOR]
                    child.read_into(piece, data_at + first * fmt.SECTOR)
                    parent.write(block * fmt.BLOCK_SIZE +
                                 first * fmt.SECTOR, piece)
            parent.flush()
        finally:
            parent.close()
    return parent_path


def set_hidden(path, hidden):
    """Set XenServer's ``hidden`` flag in both footers."""
    img = vhd_image.Image(path, writable=True)
    try:
        footer = img.footer
        footer.hidden = 1 if hidden else 0
        img.write_footer(footer)
        img.flush()
    finally:
        img.close()


def info(path):
    """Facts about an image and its chain, as a dict of primitives."""
    with vhd_chain.Chain(path) as chain:
        img = chain.leaf
        allocated = [b for b in img.allocated_blocks() if b < img.blocks] \
            if img.bat is not None else []
        result = {
            'path': os.path.abspath(path),
            'type': fmt.TYPE_NAMES[img.type],
            'virtual_size': img.size,
            'file_size': img.file_size,
            'uuid': fmt.format_uuid(img.uuid),
            'hidden': bool(img.footer.hidden),
            'read_only': vhd_image.is_read_only(path),
            'creator': '%s %d.%d' % (
                img.footer.creator_app.rstrip(b'\0').decode('ascii',
                                                            'replace'),
                img.footer.creator_version >> 16,
                img.footer.creator_version & 0xFFFF),
            'timestamp': fmt.unix_time(img.footer.timestamp),
            'allocated_blocks': len(allocated),
            'chain_depth': chain.depth,
            'chain': [os.path.abspath(i.path) for i in chain.images],
            'chain_allocated_bytes': chain.allocated_bytes(),
            'parent': None,
        }
        if img.type == fmt.TYPE_DIFF:
            result['parent'] = os.path.abspath(chain.images[1].path)
            result['parent_uuid'] = fmt.format_uuid(img.header.parent_uuid)
        return result


def export(path, output, chunk=COPY_CHUNK):
    """Write the whole virtual disk to a raw file, sparse.

    Unallocated ranges and all-zero chunks become holes. The output appears
    under its name only when complete.
    """
    output = os.path.abspath(output)
    with vhd_chain.Chain(path) as chain:
        fd, tmp = tempfile.mkstemp(prefix='.%s.' % os.path.basename(output),
                                   suffix='.tmp',
                                   dir=os.path.dirname(output))
        try:
            os.ftruncate(fd, chain.size)
            for offset, length, allocated in chain.extents():
                if not allocated:
                    continue
                for pos in range(offset, offset + length, chunk):
                    data = chain.pread(pos, min(chunk, offset + length - pos))
                    if data.count(0) != len(data):
                        _write_all(fd, data, pos)
            os.fchmod(fd, 0o644)
            os.fsync(fd)
            os.replace(tmp, output)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
    return output


def write(path, offset, stream, chunk=COPY_CHUNK):
    """Write everything read from ``stream`` at ``offset`` of the chain.

    The whole range is checked before the first byte is written; input of
    unknown length (a pipe) is read completely first for that reason.

    :returns: the number of bytes written.
    """
    with vhd_chain.Chain(path, writable=True) as chain:
        try:
            st = os.fstat(stream.fileno())
            length = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (AttributeError, OSError, ValueError):
            length = None
        pending = None
        if length is None:
            pending = stream.read()
            length = len(pending)
        chain.check_range(offset, length)
        if pending is not None:
            chain.pwrite(pending, offset)
        else:
            done = 0
            while done < length:
                data = stream.read(min(chunk, length - done))
                if not data:
                    break
                chain.pwrite(data, offset + done)
                done += len(data)
            length = done
        chain.flush()
        return length
