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

"""VHD on-disk structures as blktap's libvhd writes them (sans-IO).

Everything here turns bytes into values and values into bytes; nothing
touches a file. All integers are big-endian. The layout of a new image made
by :func:`layout` is byte-for-byte the one ``vhd-util create`` and
``vhd-util snapshot`` produce::

    0      footer copy (dynamic and differencing images only)
    512    dynamic header (1024 bytes)
    1536   BAT, one uint32 sector offset per 2 MiB block, padded to 512
    ...    batmap header (512), then the batmap (one bit per block)
    ...    parent locators MacX, W2ku, W2ru (512 bytes each, differencing)
    ...    data blocks: a 512-byte sector bitmap then 2 MiB of data, the
           data starting on a 4 KiB boundary
    end    footer
"""

import dataclasses
import datetime
import re
import struct
import uuid as uuidlib

SECTOR = 512
BLOCK_SIZE = 2 * 1024 * 1024
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR
BITMAP_SIZE = SECTORS_PER_BLOCK // 8            # 512 bytes: one sector
DATA_ALIGN = 4096
MIN_SIZE = 2 * 1024 * 1024
MAX_SIZE = 2040 * 1024 ** 3
MAX_CHAIN_DEPTH = 30

UNALLOCATED = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_FIXED: 'fixed', TYPE_DYNAMIC: 'dynamic',
              TYPE_DIFF: 'differencing'}

FOOTER_COOKIE = b'conectix'
HEADER_COOKIE = b'cxsparse'
BATMAP_COOKIE = b'tdbatmap'
FEATURES = 2
FORMAT_VERSION = 0x00010000
CREATOR_APP = b'tap\0'
CREATOR_VERSION = 0x00010003
BATMAP_VERSION = 0x00010002
# libvhd requires a batmap from creator "tap" version 1.2 on.
BATMAP_MIN_CREATOR_VERSION = 0x00010002

PLAT_MACX = 0x4D616358                          # b'MacX'
PLAT_W2KU = 0x57326B75                          # b'W2ku'
PLAT_W2RU = 0x57327275                          # b'W2ru'
LOCATOR_CODES = (PLAT_MACX, PLAT_W2KU, PLAT_W2RU)
LOCATOR_SPACE = SECTOR

HEADER_OFFSET = SECTOR
BAT_OFFSET = 3 * SECTOR

_EPOCH = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_EPOCH_UNIX = int(_EPOCH.timestamp())

_FOOTER = struct.Struct('>8sIIQI4sIIQQHBBII16sBB426x')
_HEADER = struct.Struct('>8sQQIIII16sII512s')
_LOCATOR = struct.Struct('>IIIIQ')
_BATMAP_HEADER = struct.Struct('>8sQIIIB')
_SIZE_RE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$',
                      re.IGNORECASE)
_CHECKSUM_AT = 64                               # footer checksum offset
_HEADER_CHECKSUM_AT = 36


class FormatError(ValueError):
    """Bytes that are not the VHD structure they should be.

    The image layer adds the file name (:class:`errors.InvalidImage`).
    """


def checksum(data, skip=None):
    """Ones' complement of the byte sum, the skipped 4 bytes counted as 0.

    >>> hex(checksum(bytes(512)))
    '0xffffffff'
    """
    total = sum(data)
    if skip is not None:
        total -= sum(data[skip:skip + 4])
    return ~total & 0xFFFFFFFF


def batmap_checksum(batmap, size):
    """Checksum of a batmap as libvhd computes it.

    libvhd sums ``max(1, ceil((size >> 24) / 512))`` sectors of the map,
    a length derived from the virtual size rather than from the batmap
    header's own sector count.
    """
    return checksum(batmap[:SECTOR * max(1, -(-(size >> 24) // SECTOR))])


def vhd_time(unix_seconds):
    """Seconds since 2000-01-01 00:00 UTC, the VHD epoch, as a uint32."""
    return (int(unix_seconds) - _EPOCH_UNIX) & 0xFFFFFFFF


def unix_time(vhd_seconds):
    return vhd_seconds + _EPOCH_UNIX


def geometry(size):
    """CHS geometry of a disk of ``size`` bytes (VHD specification).

    >>> geometry(4 * 1024 * 1024)
    (120, 4, 17)
    """
    sectors = min(size // SECTOR, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def round_size(size):
    """Virtual size as libvhd stores it: rounded up to whole 2 MiB blocks."""
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def align_up(value, alignment):
    return -(-value // alignment) * alignment


def bat_entries(size):
    return -(-size // BLOCK_SIZE)


def bat_bytes(entries):
    return align_up(entries * 4, SECTOR)


def batmap_sectors(entries):
    return -(-entries // (8 * SECTOR))


def first_block_offset(metadata_end):
    """Byte offset of a block's bitmap such that its data is 4 KiB aligned.

    ``metadata_end`` is the first byte after everything before the block.

    >>> first_block_offset(4608)
    7680
    """
    return align_up(metadata_end + BITMAP_SIZE, DATA_ALIGN) - BITMAP_SIZE


@dataclasses.dataclass
class Footer:
    type: int
    size: int
    uuid: bytes
    timestamp: int
    data_offset: int = SECTOR
    original_size: int = None
    geometry: tuple = None
    features: int = FEATURES
    version: int = FORMAT_VERSION
    creator_app: bytes = CREATOR_APP
    creator_version: int = CREATOR_VERSION
    creator_os: int = 0
    saved: int = 0
    hidden: int = 0

    def __post_init__(self):
        if self.original_size is None:
            self.original_size = self.size
        if self.geometry is None:
            self.geometry = geometry(self.size)

    def pack(self):
        cyl, heads, spt = self.geometry
        raw = bytearray(_FOOTER.pack(
            FOOTER_COOKIE, self.features, self.version, self.data_offset,
            self.timestamp, self.creator_app, self.creator_version,
            self.creator_os, self.original_size, self.size, cyl, heads, spt,
            self.type, 0, self.uuid, self.saved, self.hidden))
        struct.pack_into('>I', raw, _CHECKSUM_AT, checksum(raw))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw):
        if len(raw) < SECTOR:
            raise FormatError('footer is truncated (%d bytes)' % len(raw))
        (cookie, features, version, data_offset, timestamp, creator_app,
         creator_version, creator_os, original_size, size, cyl, heads, spt,
         type_, csum, uuid, saved, hidden) = _FOOTER.unpack_from(raw)
        if cookie != FOOTER_COOKIE:
            raise FormatError('footer cookie is %r, expected %r'
                              % (cookie, FOOTER_COOKIE))
        expected = checksum(raw[:SECTOR], _CHECKSUM_AT)
        if csum != expected:
            raise FormatError('footer checksum is 0x%08x, computed 0x%08x'
                              % (csum, expected))
        if version >> 16 != 1:
            raise FormatError('footer version 0x%08x is not 1.x' % version)
        if type_ not in TYPE_NAMES:
            raise FormatError('disk type %d is not fixed (2), dynamic (3) '
                              'or differencing (4)' % type_)
        if size % SECTOR or not MIN_SIZE <= size <= MAX_SIZE:
            raise FormatError(
                'virtual size %d is not a multiple of 512 between 2 MiB and '
                '2040 GiB' % size)
        if type_ == TYPE_FIXED:
            if data_offset != NO_OFFSET:
                raise FormatError('fixed image has data offset %d, expected '
                                  'all ones' % data_offset)
        elif data_offset != HEADER_OFFSET:
            raise FormatError('data offset %d, expected 512' % data_offset)
        return cls(type=type_, size=size, uuid=uuid, timestamp=timestamp,
                   data_offset=data_offset, original_size=original_size,
                   geometry=(cyl, heads, spt), features=features,
                   version=version, creator_app=creator_app,
                   creator_version=creator_version, creator_os=creator_os,
                   saved=saved, hidden=hidden)

    @property
    def has_batmap(self):
        return (self.creator_app == CREATOR_APP and
                self.creator_version >= BATMAP_MIN_CREATOR_VERSION)


@dataclasses.dataclass
class Locator:
    code: int = 0
    data_space: int = 0
    data_length: int = 0
    data_offset: int = 0

    def pack(self):
        return _LOCATOR.pack(self.code, self.data_space, self.data_length, 0,
                             self.data_offset)

    @classmethod
    def unpack(cls, raw, at=0):
        code, space, length, _reserved, offset = _LOCATOR.unpack_from(raw, at)
        return cls(code, space, length, offset)

    @property
    def space_bytes(self):
        """Reserved bytes; old writers gave sectors, libvhd gives bytes."""
        if self.data_space < SECTOR:
            return self.data_space * SECTOR
        return self.data_space


def encode_locator(code, relpath):
    """Locator payload for a parent ``relpath`` relative to the child."""
    if code == PLAT_MACX:
        return ('file://' + relpath).encode('utf-8')
    return relpath.replace('/', '\\').encode('utf-16-le')


def decode_locator(code, payload):
    """Relative or absolute path of the parent from a locator payload."""
    if code == PLAT_MACX:
        text = payload.decode('utf-8')
        if text.startswith('file://'):
            text = text[len('file://'):]
        return text
    return payload.decode('utf-16-le').replace('\\', '/')


@dataclasses.dataclass
class Header:
    max_bat_entries: int
    table_offset: int = BAT_OFFSET
    block_size: int = BLOCK_SIZE
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    parent_name: str = ''
    locators: list = dataclasses.field(
        default_factory=lambda: [Locator() for _ in range(8)])
    version: int = FORMAT_VERSION
    data_offset: int = NO_OFFSET

    def pack(self):
        name = self.parent_name.encode('utf-16-be')
        if len(name) > 512:
            raise FormatError('parent name %r is longer than 256 characters'
                              % self.parent_name)
        raw = bytearray(_HEADER.pack(
            HEADER_COOKIE, self.data_offset, self.table_offset, self.version,
            self.max_bat_entries, self.block_size, 0, self.parent_uuid,
            self.parent_timestamp, 0, name))
        for loc in self.locators:
            raw += loc.pack()
        raw += bytes(1024 - len(raw))
        struct.pack_into('>I', raw, _HEADER_CHECKSUM_AT, checksum(raw))
        return bytes(raw)

    @classmethod
    def unpack(cls, raw):
        if len(raw) < 1024:
            raise FormatError('dynamic header is truncated (%d bytes)'
                              % len(raw))
        (cookie, data_offset, table_offset, version, entries, block_size,
         csum, parent_uuid, parent_ts, _reserved,
         name) = _HEADER.unpack_from(raw)
        if cookie != HEADER_COOKIE:
            raise FormatError('dynamic header cookie is %r, expected %r'
                              % (cookie, HEADER_COOKIE))
        expected = checksum(raw[:1024], _HEADER_CHECKSUM_AT)
        if csum != expected:
            raise FormatError('dynamic header checksum is 0x%08x, computed '
                              '0x%08x' % (csum, expected))
        if version >> 16 != 1:
            raise FormatError('dynamic header version 0x%08x is not 1.x'
                              % version)
        if block_size != BLOCK_SIZE:
            raise FormatError('block size %d is not supported; XenServer '
                              'uses 2 MiB blocks' % block_size)
        try:
            parent_name = name.decode('utf-16-be').split('\0', 1)[0]
        except UnicodeDecodeError:
            raise FormatError('parent name is not valid UTF-16')
        locators = [Locator.unpack(raw, _HEADER.size + i * _LOCATOR.size)
                    for i in range(8)]
        return cls(max_bat_entries=entries, table_offset=table_offset,
                   block_size=block_size, parent_uuid=parent_uuid,
                   parent_timestamp=parent_ts, parent_name=parent_name,
                   locators=locators, version=version,
                   data_offset=data_offset)


@dataclasses.dataclass
class BatmapHeader:
    offset: int
    sectors: int
    checksum: int
    version: int = BATMAP_VERSION

    def pack(self):
        raw = _BATMAP_HEADER.pack(BATMAP_COOKIE, self.offset, self.sectors,
                                  self.version, self.checksum, 0)
        return raw + bytes(SECTOR - len(raw))

    @classmethod
    def unpack(cls, raw):
        cookie, offset, sectors, version, csum, _marker = (
            _BATMAP_HEADER.unpack_from(raw))
        if cookie != BATMAP_COOKIE:
            raise FormatError('batmap header cookie is %r, expected %r'
                              % (cookie, BATMAP_COOKIE))
        return cls(offset=offset, sectors=sectors, checksum=csum,
                   version=version)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parts of a new dynamic or differencing image go."""

    entries: int
    batmap_header_offset: int
    batmap_offset: int
    batmap_sectors: int
    locator_offsets: tuple
    metadata_end: int

    @property
    def first_block(self):
        return first_block_offset(self.metadata_end)


def layout(size, differencing):
    """Offsets of the parts of a new image of ``size`` bytes.

    >>> layout(1024 ** 3, False).metadata_end
    4608
    """
    entries = bat_entries(size)
    batmap_header = BAT_OFFSET + bat_bytes(entries)
    batmap = batmap_header + SECTOR
    nsectors = batmap_sectors(entries)
    end = batmap + nsectors * SECTOR
    locators = ()
    if differencing:
        locators = tuple(end + i * LOCATOR_SPACE
                         for i in range(len(LOCATOR_CODES)))
        end += len(LOCATOR_CODES) * LOCATOR_SPACE
    return Layout(entries, batmap_header, batmap, nsectors, locators, end)


def new_uuid():
    return uuidlib.uuid4().bytes


def format_uuid(raw):
    return str(uuidlib.UUID(bytes=bytes(raw)))


def parse_size(text):
    """Parse an operator's size: bytes, or a number with K, M, G or T.

    >>> parse_size('2G'), parse_size('1.5M'), parse_size('512')
    (2147483648, 1572864, 512)
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError('%r is not a size (use bytes, or a number with K, '
                         'M, G or T)' % text)
    number, unit = match.groups()
    result = int(float(number) * 1024 ** 'BKMGT'.index(unit.upper() or 'B'))
    if result <= 0:
        raise ValueError('%r is not a positive size' % text)
    return result
