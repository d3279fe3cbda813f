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

"""The pure decisions of benchmarks/soak.py: flat or growing, leftovers."""


from tests import base


soak = base.load_benchmark('soak')


class TestGrowth(base.TestCase):

    def test_constant_series_grows_by_nothing(self):
        self.assertEqual(0, soak.growth([10] * 20))

    def test_one_per_sample_leak_shows(self):
        series = list(range(10, 110))
        # windows of 25: medians 22 and 97 after a warm-up of 0
        self.assertEqual(75, soak.growth(series))
        self.assertFalse(soak.flat(series, warmup=10, absolute=4)[0])

    def test_warm_up_is_left_out(self):
        # a pool fills during the first five samples, then stays
        series = [5, 20, 40, 60, 70] + [70] * 30
        self.assertGreater(soak.growth(series), 4)
        self.assertEqual(0, soak.growth(series, warmup=5))
        self.assertTrue(soak.flat(series, warmup=5, absolute=2)[0])

    def test_period_compares_like_with_like(self):
        # an agent holding the VM every other sample has more fds then
        series = [10, 14] * 20
        self.assertEqual(0, soak.growth(series, period=2))
        self.assertTrue(soak.flat(series, absolute=1, period=2)[0])
        # with period 1 the alternation is not a trend either (medians)
        self.assertLessEqual(soak.growth(series), 4)

    def test_a_leak_in_one_phase_only_shows(self):
        series = []
        for i in range(40):
            series += [10, 14 + i]
        self.assertFalse(soak.flat(series, absolute=4, period=2)[0])

    def test_single_spikes_do_not_fail(self):
        series = [100] * 40
        series[-1] = 500        # one sample at the end
        series[3] = 400
        ok, grew, limit = soak.flat(series, absolute=4)
        self.assertTrue(ok)
        self.assertEqual(0, grew)

    def test_too_short_is_not_flat(self):
        ok, grew, limit = soak.flat([1, 1, 1], warmup=2, absolute=10,
                                    period=2)
        self.assertFalse(ok)
        self.assertIsNone(grew)

    def test_fraction_tolerance_scales_with_the_series(self):
        series = [100000] * 10 + [108000] * 10
        self.assertTrue(soak.flat(series, absolute=1024, fraction=0.1)[0])
        self.assertFalse(soak.flat(series, absolute=1024, fraction=0.05)[0])

    def test_bad_arguments(self):
        self.assertRaises(ValueError, soak.growth, [1, 2], period=0)
        self.assertRaises(ValueError, soak.growth, [1, 2], warmup=-1)


class TestSlopeAndWarmup(base.TestCase):

    def test_slope(self):
        self.assertAlmostEqual(2.0, soak.slope([1, 3, 5, 7, 9]))
        self.assertEqual(0.0, soak.slope([4]))
        self.assertAlmostEqual(0.0, soak.slope([9, 1, 1, 1, 1, 1], 1))

    def test_warmup_for(self):
        self.assertEqual(2, soak.warmup_for(6))
        self.assertEqual(5, soak.warmup_for(50))
        self.assertEqual(10, soak.warmup_for(100))
        self.assertEqual(10, soak.warmup_for(1000))


class TestLeftovers(base.TestCase):

    def test_new_files_other_than_the_vm_s_images_are_left_over(self):
        before = {'state/journal', 'xsm-driver.conf', 'agent.err'}
        after = before | {'sr-a/v1.vhd', 'sr-a/v1.json', 'sr-a/old.vhd',
                          'state/migrations/m1/key.pem', 'state/vms.json'}
        self.assertEqual(['sr-a/old.vhd', 'state/migrations/m1/key.pem'],
                         soak.leftovers(before, after,
                                        {'sr-a/v1.vhd', 'sr-a/v1.json'}))

    def test_nothing_left(self):
        self.assertEqual([], soak.leftovers({'a'}, {'a', 'b'}, {'b'}))


class TestSummary(base.TestCase):

    def records(self, count, leak=0):
        out = []
        for i in range(count):
            held = i % 2
            out.append({'seconds': 1.0 + i % 3, 'downtime_ms': 10.0 + i,
                        'agents': {
                            'a': {'fds': 10 + 4 * held + leak * i,
                                  'threads': 20, 'rss_kib': 70000},
                            'b': {'fds': 14 - 4 * held, 'threads': 20,
                                  'rss_kib': 70000 + 100 * i}}})
        return out

    def test_flat_soak_passes(self):
        base_sample = {'fds': 8, 'threads': 5, 'rss_kib': 60000}
        result = soak.summarise(self.records(20), {'a': base_sample,
                                                   'b': base_sample},
                                {'a': [], 'b': []}, 12.0)
        self.assertTrue(result['ok'], result)
        self.assertEqual(29.0, result['downtime_ms']['max'])
        self.assertEqual(29.0, result['downtime_ms']['p99'])
        self.assertIn('verdict: PASS', soak.format_summary(result))

    def test_leak_or_leftover_fails(self):
        base_sample = {'fds': 8, 'threads': 5, 'rss_kib': 60000}
        both = {'a': base_sample, 'b': base_sample}
        leaky = soak.summarise(self.records(20, leak=1), both,
                               {'a': [], 'b': []}, 12.0)
        self.assertFalse(leaky['ok'])
        self.assertFalse(leaky['resources']['a.fds']['flat'])
        self.assertTrue(leaky['resources']['b.fds']['flat'])
        left = soak.summarise(self.records(20), both,
                              {'a': ['sr-a/x.vhd'], 'b': []}, 12.0)
        self.assertFalse(left['ok'])
        self.assertIn('sr-a/x.vhd', soak.format_summary(left))


class TestConfig(base.TestCase):

    def test_parse_size(self):
        self.assertEqual(16 << 20, soak.parse_size('16M'))
        self.assertRaises(soak.argparse.ArgumentTypeError, soak.parse_size,
                          '3M')
