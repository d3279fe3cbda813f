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

from tests import base
from xsm_driver.hypervisor import verifier

CONSOLE = """\
[    1.234] virtio_blk virtio1: [vda] 65536 512-byte logical blocks
XSMV init modules=8 uptime=1.93
XSMV start disks=2 blocks=8192,8192 rate=20 reads=1 ctl=/dev/ttyS1
XSMV progress t_ms=2566 writes=11 reads=11 mismatches=0 io_errors=0 \
max_stall_ms=52 last_stall_ms=51 max_wall_stall_ms=51 writing=1
XSMV mismatch disk=1 dev=vdb block=12 expected=gen:5 found=zeros
garbage XSMV progress t_ms=3000 writes=20 mismatches=1
XSMV verify id=1 result=FAIL disks=2 blocks=16384 checked=41 \
unwritten=16343 mismatches=1 io_errors=0 ms=57
XSMV verify id=2 result=ok disks=2 blocks=16384 checked=41 \
unwritten=16343 mismatches=0 io_errors=0 ms=50
XSMV
"""


class TestVerifierLines(base.TestCase):

    def test_parse(self):
        rep = verifier.parse_line(CONSOLE.splitlines()[3])
        self.assertEqual('progress', rep.kind)
        self.assertEqual(11, rep['writes'])
        self.assertEqual(51, rep['max_wall_stall_ms'])
        self.assertIsNone(verifier.parse_line('[ 1.0] hello'))
        self.assertIsNone(verifier.parse_line('XSMV '))

    def test_reports(self):
        kinds = [r.kind for r in verifier.reports(CONSOLE)]
        self.assertEqual(['init', 'start', 'progress', 'mismatch',
                          'progress', 'verify', 'verify'], kinds)
        self.assertEqual('zeros', verifier.reports(
            CONSOLE, 'mismatch')[0]['found'])
        self.assertEqual(20, verifier.last(CONSOLE, 'progress')['writes'])
        self.assertIsNone(verifier.last(CONSOLE, 'shutdown'))

    def test_a_line_still_being_written_is_not_a_report(self):
        whole = 'XSMV verify id=1 result=ok disks=1 mismatches=0 io_errors=0'
        self.assertEqual([], verifier.reports(whole[:16]))
        self.assertEqual([], verifier.reports(whole))
        self.assertTrue(verifier.verified(verifier.last(whole + '\r\n',
                                                        'verify')))
        self.assertEqual(['verify'], [r.kind for r in verifier.reports(
            whole + '\nXSMV progress writes=1')])

    def test_verified(self):
        first, second = verifier.reports(CONSOLE, 'verify')
        self.assertFalse(verifier.verified(first))
        self.assertTrue(verifier.verified(second))
        self.assertFalse(verifier.verified(None))
