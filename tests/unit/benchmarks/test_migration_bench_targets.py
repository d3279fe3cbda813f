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

"""migration_bench.py's own output names issue 18's targets (no looser)."""

import argparse
import io

from tests import base

mig_bench = base.load_benchmark('migration_bench')
report = base.load_benchmark('report')


def bench(ratio):
    b = mig_bench.Bench(argparse.Namespace(workdir='/nonexistent'))
    b.args = argparse.Namespace(scale=1.0, runs=1, poll=0.05,
                                restart_agents=True, quiet=True)
    run = {'throughput_bytes_per_s': ratio * 1e8, 'downtime_ms': 3.0,
           'cpu_s_per_GiB': 2.5}
    b.copy_results = [
        {'disk': 'dense', 'load': 'idle', 'side': 'ours',
         'median_throughput_bytes_per_s': ratio * 1e8,
         'median_copy_seconds': 1.0, 'median_migration_seconds': 1.2,
         'median_cpu_source': (1.0, 1.0),
         'median_cpu_destination': (1.0, 1.0),
         'median_phase_seconds': {'copy': 1.0}, 'median_cpu_s_per_GiB': 2.5,
         'runs': [run]},
        {'disk': 'dense', 'load': 'idle', 'side': 'peer',
         'median_throughput_bytes_per_s': 1e8, 'median_seconds': 3.0,
         'median_cpu_nbdcopy': (1.0, 1.0),
         'median_cpu_qemu_nbd_source': (1.0, 1.0),
         'median_cpu_qemu_nbd_destination': (1.0, 1.0),
         'median_cpu_s_per_GiB': 6.0,
         'runs': [{'throughput_bytes_per_s': 1e8, 'cpu_s_per_GiB': 6.0,
                   'multi_conn': (True, True)}]}]
    b.images = {'bench-dense': {'size': 1 << 30, 'allocated': 1 << 30,
                                'runs': 1}}
    b.downtime = {'size': 1 << 28, 'guest_rate': 500,
                  'downtime_ms': [3.0, 4.0], 'p50_ms': 3.0, 'p99_ms': 4.0,
                  'max_ms': 4.0, 'guest_verify': {'verified': True}}
    b.memory = [{'group': 'dense idle', 'peak_kib': {'a': 1024, 'b': 1024},
                 'rss_kib': {'a': 1024, 'b': 1024}}]
    return b


def text(b):
    out = io.StringIO()
    b.report(out)
    return out.getvalue()


class OwnTargetsTest(base.TestCase):

    def test_the_targets_are_issue_18s(self):
        self.assertIs(mig_bench.TARGETS, report.TARGETS_18)
        self.assertEqual(
            {'switch_over_p99_ms': 20.0, 'copy_ratio': 3.0, 'rss_mib': 128.0},
            {k: report.TARGETS_18[k]
             for k in ('switch_over_p99_ms', 'copy_ratio', 'rss_mib')})

    def test_output_names_them(self):
        out = text(bench(2.9))
        self.assertIn('target p99 <= 20)', out)
        self.assertIn('target < 128)', out)
        self.assertNotIn('< 50', out)
        self.assertNotIn('< 256', out)

    def test_a_ratio_under_3_is_marked(self):
        self.assertIn(' 2.90! ', text(bench(2.9)))
        self.assertIn(' 3.00 ', text(bench(3.0)))
