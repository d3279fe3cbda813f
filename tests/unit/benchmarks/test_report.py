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

"""The pure parts of benchmarks/report.py, qemu_mirror_bench.py, _common.py.

The JSON fed to them here has the shape the benchmarks write (cut down).
"""

from tests import base

common = base.load_benchmark('_common')
report = base.load_benchmark('report')
qemu_mirror = base.load_benchmark('qemu_mirror_bench')
GiB = 1 << 30


def hist(*pairs):
    h = [0] * 28
    for bucket, count in pairs:
        h[bucket] = count
    return h


def migration_json():
    def ours(disk, load, mbps, copy_s, downs):
        return {'disk': disk, 'load': load, 'side': 'ours',
                'median_throughput_bytes_per_s': mbps * 1e6,
                'median_copy_seconds': copy_s,
                'median_migration_seconds': copy_s + 1,
                'median_downtime_ms': downs[0],
                'runs': [{'throughput_bytes_per_s': mbps * 1e6,
                          'copy_seconds': copy_s, 'downtime_ms': d}
                         for d in downs]}

    def peer(disk, mbps, secs):
        return {'disk': disk, 'load': 'idle', 'side': 'peer',
                'median_throughput_bytes_per_s': mbps * 1e6,
                'median_seconds': secs,
                'runs': [{'throughput_bytes_per_s': mbps * 1e6,
                          'seconds': secs}]}
    lat_runs = [{'windows': {
        'no migration': {'histogram': hist((7, 90), (9, 10))},
        'mirror (copy phase)': {'histogram': hist((10, 90), (13, 10))}}}]
    return {
        'config': {'load_rate': 500},
        'images': {'bench-dense': {'size': 4 * GiB, 'allocated': 4 * GiB},
                   'bench-sparse': {'size': 64 * GiB, 'allocated': GiB}},
        'copy': [ours('dense', 'idle', 400.0, 10.0, [20.0, 15.0]),
                 peer('dense', 380.0, 11.0),
                 ours('dense', 'loaded', 280.0, 15.0, [90.0]),
                 ours('sparse', 'idle', 280.0, 2.6, [30.0]),
                 peer('sparse', 78.0, 13.7)],
        'downtime': {'downtime_ms': [20.0, 25.0, 130.0]},
        'latency': {
            'both hosts in this process (fake://)': {'summary': {
                'no migration': {'median_p99_us': 1.0}}, 'runs': []},
            'source in this process, destination the agent process b '
            '(RabbitMQ)': {
                'runs': lat_runs,
                'summary': {
                    'no migration': {'median_p50_us': 70.0,
                                     'median_p99_us': 300.0,
                                     'median_writes': 2500},
                    'mirror (copy phase)': {'median_p50_us': 700.0,
                                            'median_p99_us': 8000.0,
                                            'median_writes': 900}}}}}


def qemu_json():
    runs = []
    for lat in ([300.0] * 99 + [5000.0], [250.0] * 98 + [4000.0] * 2):
        mirror = [800.0] * 95 + [20000.0] * 5
        runs.append({'windows': {
            'no mirror': qemu_mirror.window_stats(lat),
            'mirror (copy phase)': qemu_mirror.window_stats(mirror)},
            'copy': {'seconds': 4.0, 'bytes': 1 << 29, 'MBps': 134.2}})
    return {'config': {'load_rate': 500},
            'summary': qemu_mirror.summarise(runs), 'runs': runs}


class TestCommon(base.TestCase):

    def test_parse_size(self):
        self.assertEqual(512 << 20, common.parse_size('512M'))
        self.assertEqual(4 << 30, common.parse_size('4GiB'))
        self.assertEqual(100, common.parse_size('100'))
        self.assertRaises(ValueError, common.parse_size, 'lots')
        self.assertRaises(ValueError, common.parse_size, '0')

    def test_nearest_rank(self):
        values = list(range(1, 21))
        self.assertEqual(20, common.nearest_rank(values, 99))
        self.assertEqual(10, common.nearest_rank(values, 50))
        self.assertIsNone(common.nearest_rank([], 50))

    def test_histogram_uses_the_counter_buckets(self):
        h = common.histogram([0, 1, 3, 4, 1000, 10 ** 12])
        self.assertEqual(1, h[0])       # 0 us
        self.assertEqual(1, h[1])       # 1
        self.assertEqual(1, h[2])       # 2..3
        self.assertEqual(1, h[3])       # 4..7
        self.assertEqual(1, h[10])      # 512..1023
        self.assertEqual(1, h[27])      # the last takes the rest

    def test_hist_percentile_and_cdf(self):
        h = hist((7, 99), (12, 1))
        low, high, est = common.hist_percentile(h, 50)
        self.assertEqual((64, 128), (low, high))
        self.assertTrue(64 <= est <= 128)
        self.assertEqual((64, 128), common.hist_percentile(h, 99)[:2])
        self.assertEqual((2048, 4096), common.hist_percentile(h, 100)[:2])
        self.assertIsNone(common.hist_percentile([0] * 28, 50))
        self.assertEqual([(128, 0.99), (4096, 1.0)], common.hist_cdf(h))

    def test_ratio(self):
        self.assertEqual(2.0, common.ratio(4.0, 2.0))
        self.assertIsNone(common.ratio(None, 2.0))
        self.assertIsNone(common.ratio(1.0, 0))


class TestQemuMirrorStats(base.TestCase):

    def test_window_stats(self):
        s = qemu_mirror.window_stats([100.0] * 98 + [9000.0, 20000.0])
        self.assertEqual(100, s['writes'])
        self.assertEqual(100.0, s['p50_us'])
        self.assertEqual(9000.0, s['p99_us'])
        self.assertEqual((8192, 16384), s['hist_p99'][:2])
        self.assertEqual(20000.0, s['max_us'])

    def test_summarise_takes_medians_and_pools(self):
        s = qemu_json()['summary']
        # p99 by nearest rank: 300 in the first run, 4000 in the second
        self.assertEqual(2150.0, s['no mirror']['median_p99_us'])
        self.assertEqual(275.0, s['no mirror']['median_p50_us'])
        self.assertEqual(200, sum(s['no mirror']['pooled_histogram']))
        self.assertEqual(20000.0, s['mirror (copy phase)']['median_p99_us'])
        self.assertEqual(4.0, s['copy']['median_seconds'])
        self.assertNotIn('mirror, ready', s)


class TestReportTables(base.TestCase):

    def test_vhd_pairs(self):
        data = {'results': [{'workload': 'seq-read-2M', 'rows': [
            {'side': 'ours', 'label': 'Chain.pread 2M', 'mb_per_s': 3000.0,
             'runs_mb_per_s': [3000.0]},
            {'side': 'qemu', 'label': 'qemu-img convert',
             'mb_per_s': 1500.0, 'runs_mb_per_s': [1500.0],
             'compared_with': 'Chain.pread 2M',
             'ratio_ours_over_qemu': 2.0}]}]}
        rows = report.vhd_pairs(data)
        self.assertEqual(1, len(rows))
        self.assertEqual(('Chain.pread 2M', 3000.0, 1500.0, 2.0),
                         (rows[0]['ours'], rows[0]['ours_MBps'],
                          rows[0]['peer_MBps'], rows[0]['ratio']))
        self.assertEqual([], report.vhd_pairs(None))

    def test_nbd_pairs(self):
        data = {'results': [{'workload': 'dense/tls/file',
                             'allocated_bytes': 1 << 28,
                             'ratio_ours_over_qemu': 0.9, 'rows': [
                                 {'side': 'ours', 'mb_per_s_allocated': 90.0,
                                  'seconds': [3.0]},
                                 {'side': 'qemu',
                                  'mb_per_s_allocated': 100.0,
                                  'seconds': [2.7]}]}]}
        (row,) = report.nbd_pairs(data)
        self.assertEqual((90.0, 100.0, 0.9), (row['ours_MBps'],
                                              row['peer_MBps'], row['ratio']))

    def test_migration_pairs_compare_with_the_idle_peer(self):
        rows = {(r['disk'], r['load']): r
                for r in report.migration_pairs(migration_json())}
        self.assertEqual(3, len(rows))
        self.assertAlmostEqual(400 / 380.0, rows['dense', 'idle']['ratio'])
        self.assertAlmostEqual(280 / 380.0, rows['dense', 'loaded']['ratio'])
        self.assertAlmostEqual(280 / 78.0, rows['sparse', 'idle']['ratio'])

    def test_proportionality(self):
        pts = report.time_vs_allocated(migration_json())
        self.assertEqual([('dense', 4 * GiB, 10.0), ('dense', 4 * GiB, 10.0),
                          ('sparse', GiB, 2.6)], pts['ours'])
        prop = report.proportionality(pts)
        self.assertAlmostEqual(2.6 / 2.5, prop['ours']['ratio'])
        # the peer pays for the sparse disk's virtual size
        self.assertGreater(prop['peer']['ratio'], 4)

    def test_latency_prefers_the_rabbit_mode(self):
        label, rows = report.latency_rows(migration_json(), qemu_json())
        self.assertIn('RabbitMQ', label)
        by = {r['ours_window']: r for r in rows}
        self.assertEqual(300.0, by['no migration']['ours_p99'])
        mirror = by['mirror (copy phase)']
        self.assertEqual(8000.0, mirror['ours_p99'])
        # QEMU's value is its histogram estimate, the same method as ours
        self.assertTrue(16384 <= mirror['qemu_p99'] <= 32768)
        self.assertAlmostEqual(8000.0 / mirror['qemu_p99'],
                               mirror['p99_ratio'])
        self.assertNotIn('mirror, copy throttled', by)

    def test_targets(self):
        mig = migration_json()
        rows = report.migration_pairs(mig)
        _, lat = report.latency_rows(mig, qemu_json())
        downs = report.downtimes(mig)
        self.assertEqual([20.0, 25.0, 130.0], downs['small VM switch-overs'])
        prop = report.proportionality(report.time_vs_allocated(mig))
        met = {t: ok for t, m, ok in report.targets(rows, lat, downs, prop)}
        self.assertTrue(met['copy throughput >= 1.0x nbdcopy (dense disk)'])
        self.assertTrue(met['copy throughput >= 1.0x nbdcopy (sparse '
                            'disk)'])
        self.assertTrue(met['guest p99 write latency under mirroring <= '
                            'QEMU write-blocking mirror'])
        self.assertFalse(met['downtime p99 < 100 ms (3 switch-overs)'])
        self.assertFalse(met['downtime p99 < 100 ms (every migration, 7)'])
        self.assertTrue([ok for t, ok in met.items()
                         if t.startswith('migration time proportional')][0])

    def test_nothing_measured_claims_nothing(self):
        self.assertEqual([], report.targets([], [], {}, {}))

    def test_rst_table(self):
        text = report.rst_table(['a', 'bb'], [('xyz', None), ('1', 2)])
        self.assertEqual('===  ==\na    bb\n===  ==\nxyz  -\n1    2\n'
                         '===  ==', text)

    def test_render_names_every_command_and_failure(self):
        runs = [{'name': 'migration', 'rc': 1, 'seconds': 3.0,
                 'argv_display': ['python', 'benchmarks/migration_bench.py'],
                 'tail': 'RabbitMQ is not reachable'},
                {'name': 'qemu-mirror', 'rc': 0, 'seconds': 9.0,
                 'argv_display': ['python',
                                  'benchmarks/qemu_mirror_bench.py']}]
        meta = {'command': 'python benchmarks/report.py --quick',
                'mode': 'quick', 'date': '2026-01-01 00:00 UTC',
                'machine': {'cpus': 2, 'loadavg': (1.0, 1.0, 1.0)},
                'load_after': (2.0, 2.0, 2.0)}
        text = report.render({'migration': migration_json(),
                              'qemu-mirror': qemu_json()}, runs,
                             {'downtime.png': '_static/perf/downtime.png'},
                             meta)
        self.assertIn('``python benchmarks/migration_bench.py``', text)
        self.assertIn('What failed', text)
        self.assertIn('RabbitMQ is not reachable', text)
        self.assertIn('.. image:: _static/perf/downtime.png', text)
        self.assertIn('2026-01-01 00:00 UTC', text)
        for line in text.splitlines():
            self.assertEqual(line, line.rstrip())


class TestLinkBench(base.TestCase):

    link = base.load_benchmark('link_bench')

    def test_copy_span_places_boundaries_between_polls(self):
        polls = [(0.0, 'preflight'), (1.0, 'copy'), (2.0, 'copy'),
                 (3.0, 'switch-over'), (4.0, 'done')]
        self.assertEqual(2.0, self.link.copy_span(polls))
        self.assertIsNone(self.link.copy_span([(0.0, 'done')]))
        self.assertIsNone(self.link.copy_span([(0.0, 'copy')]))

    def test_summary_and_report_rows(self):
        results = [
            {'disk': 'dense', 'side': 'ours', 'MBps': 40.0, 'seconds': 5.0,
             'copy_seconds': 4.0, 'allocated': 1 << 28},
            {'disk': 'dense', 'side': 'peer', 'MBps': 44.0, 'seconds': 3.0,
             'allocated': 1 << 28},
            {'disk': 'dense', 'side': 'ours', 'MBps': 44.0, 'seconds': 5.0,
             'copy_seconds': 3.8, 'allocated': 1 << 28},
            {'disk': 'dense', 'side': 'peer', 'MBps': 40.0, 'seconds': 3.2,
             'allocated': 1 << 28}]
        summary = self.link.summarise(results)
        self.assertEqual(42.0, summary['dense']['ours']['median_MBps'])
        self.assertEqual(3.9, summary['dense']['ours']['median_seconds'])
        self.assertEqual(1.0, summary['dense']['ratio'])
        (row,) = report.link_pairs({'summary': summary})
        self.assertEqual(('dense', 1.0, [40.0, 44.0]),
                         (row['disk'], row['ratio'], row['ours_runs_MBps']))
        met = report.targets([], [], {}, {}, [row])
        self.assertEqual([('copy throughput >= 1.0x nbdcopy (dense disk, '
                           'shaped link)', '1.00x', True)], met)
