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

"""benchmarks/rtt_bench.py run for real, small: every client and server."""

import contextlib
import io
import json
import os
import signal

from tests import base


rtt = base.load_benchmark('rtt_bench')


class TestRun(base.TestCase):

    def setUp(self):
        super().setUp()
        # the benchmark's main turns SIGTERM into KeyboardInterrupt
        self.addCleanup(signal.signal, signal.SIGTERM,
                        signal.getsignal(signal.SIGTERM))

    def test_every_pair_is_measured_and_reported(self):
        for tool in ('qemu-io', 'qemu-nbd', 'nbdkit'):
            self.require_command(tool)
        out = os.path.join(self.make_tempdir(), 'rtt.json')
        status = rtt.main(['--size', '16M', '--writes', '20', '--rate',
                           '1000', '--repeat', '2', '--quiet',
                           '--workdir', self.make_tempdir(), '--json', out])
        self.assertEqual(0, status)
        with open(out) as f:
            result = json.load(f)
        self.assertEqual(1, result['paced_gap_ms'])
        self.assertEqual(len(rtt.CLIENTS) * len(rtt.SERVERS) *
                         len(rtt.PACINGS) * 2, len(result['runs']))
        for run in result['runs']:
            self.assertEqual(20, run['writes'], run)
            self.assertGreater(run['p50_us'], 0, run)
            self.assertGreaterEqual(run['p99_us'], run['p50_us'], run)
        self.assertEqual(
            {(c, s, p) for c in rtt.CLIENTS for s in rtt.SERVERS
             for p in rtt.PACINGS},
            {(r['client'], r['server'], r['pacing'])
             for r in result['summary']})

    def test_a_missing_work_folder_is_named(self):
        where = os.path.join(self.make_tempdir(), 'nowhere')
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = rtt.main(['--writes', '1', '--workdir', where])
        self.assertEqual(1, status)
        self.assertIn('no work folder in %s' % where, err.getvalue())
