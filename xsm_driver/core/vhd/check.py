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

"""Validate VHD files by the rules of XenServer's ``vhd-util check``.

:func:`check` returns every problem found, each a sentence naming the file
and what is wrong; an empty list means the image is valid. The rules are
those of blktap's ``vhd-util check`` with ``-b`` (data under clear bitmap
bits) and ``-p`` (walk the parents), plus the engine's own (2 MiB blocks,
loops, chain depth). Nothing is ever written.
"""

import os
import struct
import time

from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image

TIME_SLACK = 1800            # vhd-util tolerates clocks this far ahead
KNOWN_LOCATORS = {0, 0x57693272, 0x5769326B, fmt.PLAT_W2RU, fmt.PLAT_W2KU,
                  0x4D616320, fmt.PLAT_MACX}
_FOOTER_FIELDS = struct.Struct('>8sIIQI4sIIQQIII16sBB')


def _footer_problems(raw, now):
    """Problems of one 512-byte footer, as vhd-util lists them."""
    (cookie, features, version, data_offset, timestamp, creator_app,
     creator_version, _os, _orig, size, chs, type_, csum, uuid, saved,
     hidden) = _FOOTER_FIELDS.unpack_from(raw)
    if cookie != fmt.FOOTER_COOKIE:
        return ['invalid cookie %r' % cookie]
    out = []
    if csum != fmt.checksum(raw, 64):
        out.append('invalid checksum 0x%08x (computed 0x%08x)'
                   % (csum, fmt.checksum(raw, 64)))
    if not features & 2 or features & ~3:
        out.append('invalid features 0x%08x' % features)
    if version != fmt.FORMAT_VERSION:
        out.append('invalid file format version 0x%08x' % version)
    if type_ not in fmt.TYPE_NAMES:
        out.append('invalid type %d' % type_)
    if type_ not in (fmt.TYPE_DYNAMIC, fmt.TYPE_DIFF) and \
            data_offset != fmt.NO_OFFSET:
        out.append('invalid data offset %d' % data_offset)
    if fmt.unix_time(timestamp) > now + TIME_SLACK:
        out.append('creation time in the future')
    if creator_app[:3] == b'tap' and creator_version > fmt.CREATOR_VERSION:
        out.append('unsupported tap creator version 0x%08x'
                   % creator_version)
    cyl, heads, spt = fmt.geometry(size)
    if (cyl << 16 | heads << 8 | spt) < chs:
        out.append('geometry too large for %d bytes' % size)
    if saved > 1 or hidden > 1:
        out.append('invalid saved (%d) or hidden (%d) state'
                   % (saved, hidden))
    if any(raw[86:512]):
        out.append('invalid reserved bytes')
    if not any(uuid):
        out.append('invalid (null) uuid')
    return out


def _header_problems(img, raw, now):
    out = []
    (_cookie, data_offset, table_offset, version, entries, block_size, _c,
     parent_uuid, parent_ts, reserved, name) = struct.unpack_from(
        '>8sQQIIII16sII512s', raw)
    if version != fmt.FORMAT_VERSION:
        out.append('header: invalid version 0x%08x' % version)
    if data_offset != fmt.NO_OFFSET:
        out.append('header: invalid data offset %d' % data_offset)
    if (not table_offset or table_offset % fmt.SECTOR or
            table_offset + entries * 4 > img.file_size - fmt.SECTOR):
        out.append('header: invalid table offset %d' % table_offset)
    if reserved or any(raw[768:1024]):
        out.append('header: invalid reserved bytes')
    if img.size >> 21 > entries:
        out.append('header: VHD size (%d blocks) exceeds BAT size (%d)'
                   % (img.size >> 21, entries))
    if img.type == fmt.TYPE_DIFF:
        if fmt.unix_time(parent_ts) > now + TIME_SLACK:
            out.append('header: parent creation time in the future')
        try:
            name.decode('utf-16-be').rstrip('\0').encode('ascii')
        except UnicodeError:
            out.append('header: parent name is not ASCII in UTF-16BE')
    else:
        if any(name) or any(raw[576:768]) or any(parent_uuid) or parent_ts:
            out.append('header: a %s image has parent fields set'
                       % fmt.TYPE_NAMES[img.type])
    return out


def _batmap_problems(img):
    hdr = img.batmap_header
    out = []
    if hdr.version > fmt.BATMAP_VERSION:
        out.append('batmap: unsupported version 0x%08x' % hdr.version)
    if hdr.sectors * fmt.SECTOR * 8 < len(img.bat):
        out.append('batmap: %d sectors cannot map %d blocks'
                   % (hdr.sectors, len(img.bat)))
    for block in range(min(img.size >> 21, len(img.bat))):
        if img.is_full(block) and img.block_offset(block) is None:
            out.append('batmap shows unallocated block %d full' % block)
    return out


def _locator_problems(img):
    out = []
    seen = set()
    resolved = 0
    folder = os.path.dirname(os.path.abspath(img.path))
    for i, loc in enumerate(img.header.locators):
        raw = img.read_raw(24, fmt.HEADER_OFFSET + 576 + 24 * i)
        reserved = struct.unpack_from('>I', raw, 12)[0]
        if loc.code not in KNOWN_LOCATORS:
            out.append('parent locator %d: invalid platform code 0x%08x'
                       % (i, loc.code))
            continue
        if not loc.code:
            if any(raw):
                out.append('parent locator %d: unused but not zero' % i)
            continue
        if loc.code in seen:
            out.append('parent locator %d: duplicate platform code 0x%08x'
                       % (i, loc.code))
        seen.add(loc.code)
        if reserved or not (loc.data_offset and loc.data_space and
                            loc.data_length):
            out.append('parent locator %d: invalid offset, space, length or '
                       'reserved field' % i)
            continue
        if loc.code not in fmt.LOCATOR_CODES:
            continue
        try:
            rel = fmt.decode_locator(loc.code, img.read_locator_data(loc))
        except UnicodeDecodeError:
            out.append('parent locator %d cannot be decoded' % i)
            continue
        if os.path.basename(rel) != img.header.parent_name:
            out.append('parent locator %d name (%s) does not match header '
                       'name (%s)' % (i, rel, img.header.parent_name))
        target = os.path.normpath(os.path.join(folder, rel))
        if os.path.isfile(target):
            resolved += 1
        else:
            out.append('parent locator %d points to missing file %s'
                       % (i, target))
    if not resolved:
        out.append('could not find parent %s' % img.header.parent_name)
    return out


def _data_problems(img):
    """vhd-util check -b: no data under a clear bitmap bit."""
    out = []
    for block in img.allocated_blocks():
        if block >= img.size >> 21 or img.is_full(block):
            continue
        bits = img.bitmap(block)
        data_at = img.block_offset(block)
        for first, stop, is_set in vhd_image.runs(bits, 0, len(bits)):
            if is_set:
                continue
            data = img.read_raw((stop - first) * fmt.SECTOR,
                                data_at + first * fmt.SECTOR)
            if data.count(0) != len(data):
                nonzero = len(data) - len(data.lstrip(b'\0'))
                out.append('sector 0x%x of block 0x%x has data where the '
                           'bitmap is clear'
                           % (first + nonzero // fmt.SECTOR, block))
    return out


def check_image(path, now=None):
    """Problems of one file, its parents not included."""
    now = time.time() if now is None else now
    try:
        file_size = os.stat(path).st_size
        with open(path, 'rb') as f:
            f.seek(max(0, file_size - fmt.SECTOR))
            end = f.read(fmt.SECTOR)
            f.seek(0)
            start = f.read(fmt.SECTOR + 1024)
    except OSError as exc:
        return ['%s: cannot read: %s' % (path, exc.strerror)]
    if file_size % fmt.SECTOR:
        return ['%s: file size %d is not a multiple of 512' % (path,
                                                               file_size)]
    if len(end) < fmt.SECTOR:
        return ['%s: file is too short to hold a footer' % path]
    out = ['primary footer: ' + p for p in _footer_problems(end, now)]
    if out:
        return ['%s: %s' % (path, p) for p in out]
    type_ = struct.unpack_from('>I', end, 60)[0]
    if type_ != fmt.TYPE_FIXED:
        backup = start[:fmt.SECTOR]
        out += ['backup footer: ' + p for p in _footer_problems(backup, now)]
        if not out and backup != end:
            out.append('primary and backup footers do not match')
    if not out:
        try:
            img = vhd_image.Image(path)
        except errors.VHDError as exc:
            return [str(exc)]
        try:
            if img.header is not None:
                out += _header_problems(img, start[fmt.SECTOR:], now)
                if img.batmap_header is not None:
                    out += _batmap_problems(img)
                if img.type == fmt.TYPE_DIFF:
                    out += _locator_problems(img)
                out += _data_problems(img)
        finally:
            img.close()
    return ['%s: %s' % (path, p) for p in out]


def check(path, chain=False, now=None):
    """Validate ``path`` (and, with ``chain``, every parent).

    :returns: a list of problems; empty when everything is valid.
    """
    problems = check_image(path, now)
    if not chain or problems:
        return problems
    try:
        paths = vhd_chain.resolve(path)
    except errors.VHDError as exc:
        return [str(exc)]
    for parent in paths[1:]:
        problems += check_image(parent, now)
    return problems
