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

"""The VHD codecs, tested with bytes (no files)."""

import doctest

from tests import base
from xsm_driver.core.vhd import format as fmt

# The end footer of the shared vector empty-1g.vhd, made by vhd-util.
EMPTY_1G_FOOTER = bytes.fromhex(
    '636f6e656374697800000002000100000000000000000200'
    '329a029a7461700000010003000000000000000040000000'
    '00000000400000000820103f00000003fffff24580d521f8'
    '95034a0bb3892e1d2d10bfcf') + bytes(512 - 84)


def load_tests(loader, tests, pattern):
    tests.addTests(doctest.DocTestSuite(fmt))
    return tests


class FooterTest(base.TestCase):

    def test_unpack_vhd_util_footer(self):
        footer = fmt.Footer.unpack(EMPTY_1G_FOOTER)
        self.assertEqual(fmt.TYPE_DYNAMIC, footer.type)
        self.assertEqual(1024 ** 3, footer.size)
        self.assertEqual((2080, 16, 63), footer.geometry)
        self.assertEqual(b'tap\0', footer.creator_app)
        self.assertEqual(0x00010003, footer.creator_version)
        self.assertEqual('80d521f8-9503-4a0b-b389-2e1d2d10bfcf',
                         fmt.format_uuid(footer.uuid))
        self.assertTrue(footer.has_batmap)

    def test_pack_is_byte_identical(self):
        footer = fmt.Footer.unpack(EMPTY_1G_FOOTER)
        self.assertEqual(EMPTY_1G_FOOTER, footer.pack())

    def test_bad_cookie(self):
        raw = b'konectix' + EMPTY_1G_FOOTER[8:]
        self.assertRaisesRegex(fmt.FormatError, 'cookie',
                               fmt.Footer.unpack, raw)

    def test_bad_checksum(self):
        raw = bytearray(EMPTY_1G_FOOTER)
        raw[0x30] ^= 1
        self.assertRaisesRegex(fmt.FormatError, 'checksum is 0x',
                               fmt.Footer.unpack, bytes(raw))

    def test_bad_type_and_size(self):
        for field, value, message in ((60, 7, 'disk type 7'),
                                      (48, 1024 ** 4 * 3, 'virtual size')):
            footer = fmt.Footer.unpack(EMPTY_1G_FOOTER)
            raw = bytearray(footer.pack())
            width = 4 if field == 60 else 8
            raw[field:field + width] = value.to_bytes(width, 'big')
            raw[64:68] = fmt.checksum(raw, 64).to_bytes(4, 'big')
            self.assertRaisesRegex(fmt.FormatError, message,
                                   fmt.Footer.unpack, bytes(raw))

    def test_truncated(self):
        self.assertRaisesRegex(fmt.FormatError, 'truncated',
                               fmt.Footer.unpack, EMPTY_1G_FOOTER[:100])

    def test_hidden_changes_checksum(self):
        footer = fmt.Footer.unpack(EMPTY_1G_FOOTER)
        footer.hidden = 1
        raw = footer.pack()
        self.assertEqual(1, raw[85])
        self.assertEqual(1, fmt.Footer.unpack(raw).hidden)


class GeometryTest(base.TestCase):

    def test_vhd_util_geometries(self):
        # (size, geometry) pairs read from images made by vhd-util.
        for size, chs in ((4 << 20, (120, 4, 17)), (16 << 20, (481, 4, 17)),
                          (32 << 20, (963, 4, 17)),
                          (1 << 30, (2080, 16, 63))):
            self.assertEqual(chs, fmt.geometry(size))

    def test_largest(self):
        self.assertEqual((65535, 16, 255), fmt.geometry(fmt.MAX_SIZE))


class HeaderTest(base.TestCase):

    def test_round_trip_with_locators(self):
        header = fmt.Header(
            max_bat_entries=16, parent_uuid=bytes(range(16)),
            parent_timestamp=1234, parent_name='base.vhd',
            locators=[fmt.Locator(fmt.PLAT_MACX, 512, 17, 3072)] +
            [fmt.Locator() for _ in range(7)])
        raw = header.pack()
        self.assertEqual(1024, len(raw))
        again = fmt.Header.unpack(raw)
        self.assertEqual(header, again)
        self.assertEqual('base.vhd', again.parent_name)

    def test_bad_block_size(self):
        raw = bytearray(fmt.Header(max_bat_entries=1).pack())
        raw[32:36] = (4096).to_bytes(4, 'big')
        raw[36:40] = fmt.checksum(raw, 36).to_bytes(4, 'big')
        self.assertRaisesRegex(fmt.FormatError, 'block size 4096',
                               fmt.Header.unpack, bytes(raw))

    def test_bad_checksum(self):
        raw = bytearray(fmt.Header(max_bat_entries=1).pack())
        raw[100] = 1
        self.assertRaisesRegex(fmt.FormatError, 'header checksum',
                               fmt.Header.unpack, bytes(raw))


class LocatorTest(base.TestCase):

    def test_encodings_as_vhd_util(self):
        self.assertEqual(b'file://./chain-base.vhd',
                         fmt.encode_locator(fmt.PLAT_MACX,
                                            './chain-base.vhd'))
        self.assertEqual('.\\chain-base.vhd'.encode('utf-16-le'),
                         fmt.encode_locator(fmt.PLAT_W2KU,
                                            './chain-base.vhd'))
        for code in fmt.LOCATOR_CODES:
            self.assertEqual('../sr/p.vhd', fmt.decode_locator(
                code, fmt.encode_locator(code, '../sr/p.vhd')))

    def test_space_in_sectors_or_bytes(self):
        self.assertEqual(512, fmt.Locator(data_space=1).space_bytes)
        self.assertEqual(1024, fmt.Locator(data_space=1024).space_bytes)


class LayoutTest(base.TestCase):

    def test_empty_1g_dynamic(self):
        lay = fmt.layout(1 << 30, differencing=False)
        self.assertEqual(512, lay.entries)
        self.assertEqual(3584, lay.batmap_header_offset)
        self.assertEqual(4096, lay.batmap_offset)
        self.assertEqual(4608, lay.metadata_end)

    def test_32m_differencing(self):
        lay = fmt.layout(32 << 20, differencing=True)
        self.assertEqual((3072, 3584, 4096), lay.locator_offsets)
        self.assertEqual(15 * 512, lay.first_block)

    def test_batmap_checksum_length_follows_size(self):
        batmap = bytearray(1024)
        batmap[600] = 1
        # 4097 blocks: libvhd sums only the first sector.
        self.assertEqual(0xFFFFFFFF,
                         fmt.batmap_checksum(batmap, 4097 * fmt.BLOCK_SIZE))


class ParseSizeTest(base.TestCase):

    def test_units(self):
        self.assertEqual(64 << 20, fmt.parse_size('64M'))
        self.assertEqual(1 << 40, fmt.parse_size('1T'))
        self.assertEqual(3 << 30, fmt.parse_size('3GiB'))
        self.assertEqual(4096, fmt.parse_size('4k'))

    def test_rejects(self):
        for bad in ('', 'M', '-1G', '1X', '0', 'ten'):
            self.assertRaises(ValueError, fmt.parse_size, bad)
