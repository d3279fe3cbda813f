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

"""The pure parts of benchmarks/rtt_bench.py and its part of the report."""

from tests import base


rtt = base.load_benchmark('rtt_bench')
report = base.load_benchmark('report')

# what qemu-io 7.2 prints for two writes
QEMU_IO = '''wrote 4096/4096 bytes at offset 0
4 KiB, 1 ops; 00.00 sec (9.578 MiB/sec and 2452.0230 ops/sec)
wrote 4096/4096 bytes at offset 4096
4 KiB, 1 ops; 00.00 sec (15.625 MiB/sec and 4000.0000 ops/sec)
'''


class TestPure(base.TestCase):

    def test_qemu_io_latencies_from_its_timing_lines(self):
        got = rtt.qemu_io_latencies(QEMU_IO)
        self.assertEqual(2, len(got))
        self.assertAlmostEqual(407.83, got[0], places=2)
        self.assertEqual(250.0, got[1])

    def test_qemu_io_script_paces_with_its_sleep(self):
        self.assertEqual('write 0 4096\nsleep 2\nwrite 8192 4096\nsleep 2\n',
                         rtt.qemu_io_script([0, 8192], 2))
        self.assertEqual('write 0 4096\n', rtt.qemu_io_script([0], 0))

    def test_gap_is_whole_milliseconds(self):
        self.assertEqual(2, rtt.gap_ms(500))
        self.assertEqual(1, rtt.gap_ms(5000))
        self.assertEqual(3, rtt.gap_ms(333))

    def test_schedule_runs_every_pair_once_a_repeat_in_rotating_order(self):
        order = rtt.schedule(3)
        n = len(rtt.CLIENTS) * len(rtt.SERVERS) * len(rtt.PACINGS)
        self.assertEqual(3 * n, len(order))
        for i in range(3):
            self.assertEqual(n, len(set(order[i * n:(i + 1) * n])))
        self.assertEqual(3, len({order[0], order[n], order[2 * n]}))

    def test_summary_takes_medians_per_pair(self):
        runs = [dict(rtt.run_stats(lat), client='ours', server='nbdkit',
                     pacing='paced')
                for lat in ([100, 200, 300], [110, 210, 900], [90, 190, 400])]
        (row,) = rtt.summarise(runs)
        self.assertEqual((200, 400), (row['p50_us'], row['p99_us']))
        self.assertEqual([200, 210, 190], row['p50_runs_us'])
        self.assertEqual([300, 900, 400], row['p99_runs_us'])

    def test_report_renders_the_round_trips(self):
        runs = [dict(rtt.run_stats([300, 350, 700]), client=c, server=s,
                     pacing='paced') for c in rtt.CLIENTS
                for s in rtt.SERVERS]
        data = {'rtt': {'config': {'writes': 3}, 'paced_gap_ms': 2,
                        'summary': rtt.summarise(runs)}}
        meta = {'command': 'x', 'mode': 'full', 'date': 'today',
                'machine': {}, 'code': None}
        text = report.render(data, [], {}, meta)
        self.assertIn('The round trip of one mirrored write', text)
        self.assertIn('a sleep of 2 ms after each write',
                      ' '.join(text.split()))
        rows = [line.split() for line in text.splitlines()
                if line.split()[:1] in (['ours'], ['qemu-io'])]
        self.assertEqual(6, len(rows))
        self.assertEqual(['paced', '350', '700', '350', '700'], rows[0][2:])
