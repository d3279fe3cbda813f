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

"""A short soak: the invariants of benchmarks/soak.py, in the suite.

Two ``xsm-agent`` processes on the real RabbitMQ; a VM with two small
disks migrates back and forth 8 times while its verifying guest writes
and reads; every migration is verified, nothing is left behind, and the
agents' file descriptors, threads and RSS are flat after a warm-up of two
migrations. oslo.messaging's RPC thread pool is held to 8 threads so that
it is full after the warm-up (by default it grows to 64, which takes more
migrations than this test makes; the full soak uses the default). In CI a
missing broker fails this test; elsewhere it is skipped.
"""


from tests import base
from tests.functional.core.migration import fixtures

MiB = 1 << 20
MIGRATIONS = 8


class TestShortSoak(base.TestCase):

    def setUp(self):
        super().setUp()
        problem = fixtures.broker_problem()
        if problem:
            self.missing(problem)
        self.soak_mod = base.load_benchmark('soak')

    def test_back_and_forth_under_load_leaves_nothing_and_stays_flat(self):
        soak = self.soak_mod.Soak(
            self.make_tempdir(), MIGRATIONS, sizes=(16 * MiB, 24 * MiB),
            rate=300, read_ratio=0.5, fill=0.5, timeout=60,
            defaults={'executor_thread_pool_size': 8})
        self.addCleanup(soak.stop)
        try:
            soak.start()
            result = soak.run()
        except self.soak_mod.SoakError as exc:
            self.fail(str(exc))
        summary = self.soak_mod.format_summary(result)
        self.assertEqual(MIGRATIONS, result['migrations'], summary)
        self.assertEqual(MIGRATIONS, len(soak.records))
        self.assertTrue(result['final_verified'], summary)
        self.assertEqual({'a': [], 'b': []}, result['leftovers'], summary)
        for name, verdict in result['resources'].items():
            self.assertTrue(verdict['flat'], '%s is not flat:\n%s'
                            % (name, summary))
        self.assertTrue(result['ok'], summary)
        # every migration moved data and paused the guest briefly
        for record in soak.records:
            self.assertGreater(record['bytes_copied'], 0)
            self.assertGreater(record['downtime_ms'], 0)
            self.assertGreater(record['guest_writes'], 0)
