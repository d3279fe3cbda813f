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

"""The pure decisions of a migration."""

import os
import random

from tests import base
from xsm_driver.core.block import device
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
from xsm_driver.core.vhd import chain
from xsm_driver.core.vhd import format as vhd_format
from xsm_driver.core.vhd import ops

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
HOLE_ZERO = device.HOLE | device.ZERO


class PhasesTest(base.TestCase):

    def test_phases_in_order(self):
        self.assertEqual(('preflight', 'prepare-receive', 'mirror',
                          'snapshot', 'copy', 'compose', 'switch-over',
                          'clean-up', 'done'), plan.PHASES)
        self.assertEqual('aborted', plan.ABORTED)

    def test_can_abort_before_switch_over_only(self):
        for phase in plan.PHASES[:plan.PHASES.index('switch-over')]:
            self.assertTrue(plan.can_abort(phase), phase)
        for phase in ('switch-over', 'clean-up', 'done', 'aborted'):
            self.assertFalse(plan.can_abort(phase), phase)

    def test_next_phase(self):
        walk, phase = [], 'preflight'
        while phase != 'done':
            phase = plan.next_phase(phase)
            walk.append(phase)
        self.assertEqual(list(plan.PHASES[1:]), walk)

    def test_no_phase_after_the_end(self):
        for phase in ('done', 'aborted'):
            err = self.assertRaises(errors.InvalidPhase, plan.next_phase,
                                    phase)
            self.assertIn(phase, str(err))

    def test_unknown_phase(self):
        for func in (plan.can_abort, plan.next_phase, plan.check_phase):
            err = self.assertRaises(errors.InvalidPhase, func, 'copying')
            self.assertIn("'copying'", str(err))
            self.assertIn('prepare-receive', str(err))
        self.assertEqual('aborted', plan.check_phase('aborted'))


class SpaceTest(base.TestCase):

    def test_vhd_metadata_matches_what_create_writes(self):
        tmp = self.make_tempdir()
        for size in (2 * MiB, 100 * MiB, 3 * GiB):
            path = os.path.join(tmp, '%d.vhd' % size)
            ops.create(path, size)
            # A new dynamic image is its metadata; the first block goes
            # at the first 4 KiB-aligned place after it.
            lay = vhd_format.layout(size, False)
            self.assertEqual(os.path.getsize(path),
                             lay.metadata_end + vhd_format.SECTOR)
            self.assertEqual(lay.first_block + vhd_format.SECTOR,
                             plan.vhd_metadata(size))
            self.assertGreaterEqual(plan.vhd_metadata(size),
                                    os.path.getsize(path))

    def test_block_cost_matches_what_a_write_allocates(self):
        path = os.path.join(self.make_tempdir(), 'd.vhd')
        ops.create(path, 64 * MiB)
        with chain.Chain(path, writable=True) as c:
            for block in (0, 5, 9):
                c.pwrite(b'x' * 512, block * 2 * MiB + 4096)
        # Each block is its bitmap, padding to 4 KiB and 2 MiB of data
        # (the first block's padding is in the metadata): the estimate is
        # an upper bound, tight to one padding.
        estimate = (plan.vhd_metadata(64 * MiB) +
                    3 * (2 * MiB + plan.BLOCK_OVERHEAD))
        self.assertLessEqual(os.path.getsize(path), estimate)
        self.assertLess(estimate - os.path.getsize(path), 4096)
        self.assertEqual(3, plan.blocks_touched(
            [(4096, 512), (10 * MiB + 4096, 512), (18 * MiB + 4096, 512)]))
        self.assertLessEqual(os.path.getsize(path), plan.vdi_space(
            64 * MiB, 3 * 512, 0, blocks=3))

    def test_space_needed_sums_data_metadata_and_headroom(self):
        size, allocated = 10 * GiB, 3 * GiB
        blocks = allocated // (2 * MiB)
        meta = (plan.vhd_metadata(size, False) +
                plan.vhd_metadata(size, True))
        headroom = 256 * MiB
        one = (allocated + blocks * 4096 + meta + headroom +
               headroom // (2 * MiB) * 4096)
        self.assertEqual(one, plan.vdi_space(size, allocated, headroom))
        vdis = [{'uuid': 'a', 'size': size, 'allocated': allocated},
                {'uuid': 'b', 'size': size, 'allocated': allocated}]
        self.assertEqual(2 * one, plan.space_needed(vdis, headroom))
        self.assertEqual(0, plan.space_needed([], headroom))

    def test_space_counts_whole_blocks(self):
        # One byte of data still takes a whole 2 MiB block.
        self.assertEqual(plan.vdi_space(GiB, 2 * MiB, 0),
                         plan.vdi_space(GiB, 1, 0))
        # Scattered data takes every block it touches.
        self.assertEqual(plan.vdi_space(GiB, 10 * 2 * MiB, 0),
                         plan.vdi_space(GiB, 10 * 4096, 0, blocks=10))

    def test_differencing_metadata_has_locators(self):
        self.assertGreater(plan.vhd_metadata(10 * MiB, True),
                           plan.vhd_metadata(10 * MiB, False))
        self.assertGreaterEqual(plan.vhd_metadata(GiB, True),
                                plan.vhd_metadata(GiB, False))

    def test_headroom_capped_at_the_virtual_size(self):
        self.assertEqual(plan.vdi_space(4 * MiB, 0, 4 * MiB),
                         plan.vdi_space(4 * MiB, 0, GiB))

    def test_empty_vdi_needs_its_metadata(self):
        self.assertEqual(plan.vhd_metadata(GiB) +
                         plan.vhd_metadata(GiB, True),
                         plan.vdi_space(GiB, 0, 0))

    def test_check_space(self):
        plan.check_space('fast', 3 * GiB, 3 * GiB)
        err = self.assertRaises(errors.InsufficientSpace, plan.check_space,
                                'fast', 3 * GiB, GiB)
        self.assertEqual("SR 'fast' needs 3.0 GiB (3221225472 bytes) but "
                         "has 1.0 GiB free", str(err))
        self.assertEqual({'sr': 'fast', 'needed': 3 * GiB, 'free': GiB},
                         {k: err.kwargs[k] for k in ('sr', 'needed',
                                                     'free')})
        self.assertIsInstance(err, errors.MigrationError)

    def test_human_size(self):
        self.assertEqual('0 B', errors.human_size(0))
        self.assertEqual('1023 B', errors.human_size(1023))
        self.assertEqual('1.0 KiB', errors.human_size(1024))
        self.assertEqual('1.5 MiB', errors.human_size(MiB + MiB // 2))
        self.assertEqual('2.0 TiB', errors.human_size(2 * 1024 * GiB))


class PreflightTest(base.TestCase):

    def test_vdi_map(self):
        plan.check_vdi_map(['a', 'b'], {'a': 'sr1', 'b': 'sr2', 'c': 'x'})
        plan.check_vdi_map([], {})
        err = self.assertRaises(errors.VDINotInMap, plan.check_vdi_map,
                                ['a', 'b', 'c', 'b'], {'a': 'sr1', 'c': ''})
        self.assertEqual(['b', 'c'], err.kwargs['vdis'])
        self.assertIn('b, c', str(err))
        self.assertIn('VDI_NOT_IN_MAP', str(err))

    def test_vif_map_only_across_pools(self):
        plan.check_vif_map(['v1', 'v2'], {}, cross_pool=False)
        plan.check_vif_map(['v1'], {'v1': 'net'}, cross_pool=True)
        err = self.assertRaises(errors.VIFNotInMap, plan.check_vif_map,
                                ['v1', 'v2'], {'v1': 'net'}, True)
        self.assertEqual(['v2'], err.kwargs['vifs'])
        self.assertIn('v2', str(err))

    def test_chain_depth(self):
        plan.check_chain_depth('vdi-1', 30)
        err = self.assertRaises(errors.ChainTooDeep, plan.check_chain_depth,
                                'vdi-1', 31)
        self.assertIn('vdi-1', str(err))
        self.assertIn('31', str(err))
        self.assertIn('30', str(err))
        self.assertRaises(errors.ChainTooDeep, plan.check_chain_depth,
                          'vdi-1', 6, limit=5)

    def test_concurrency(self):
        plan.check_concurrency('h1', 2, 3)
        err = self.assertRaises(errors.TooManyMigrations,
                                plan.check_concurrency, 'h1', 3, 3)
        self.assertIn('h1', str(err))
        self.assertIn('TOO_MANY_STORAGE_MIGRATES', str(err))
        plan.check_concurrency('h1', 100, 0)
        plan.check_concurrency('h1', 100, None)

    def test_order_vdis(self):
        vdis = [{'uuid': 'c', 'allocated': 5},
                {'uuid': 'a', 'allocated': 1},
                {'uuid': 'b', 'allocated': 5},
                {'uuid': 'd', 'allocated': 9}]
        self.assertEqual(['d', 'b', 'c', 'a'],
                         [v['uuid'] for v in plan.order_vdis(vdis)])
        self.assertEqual('c', vdis[0]['uuid'])      # not sorted in place


class SplitExtentsTest(base.TestCase):

    def test_skips_zero_extents_merges_and_cuts(self):
        extents = [(0, 1 * MiB, HOLE_ZERO),
                   (1 * MiB, 3 * MiB, 0),
                   (4 * MiB, 6 * MiB, 0),          # adjacent: merged
                   (10 * MiB, 2 * MiB, device.ZERO),
                   (12 * MiB, 512, 0)]
        self.assertEqual([(1 * MiB, 3 * MiB), (4 * MiB, 4 * MiB),
                          (8 * MiB, 2 * MiB), (12 * MiB, 512)],
                         plan.split_extents(extents, 4 * MiB))

    def test_hole_not_known_as_zero_is_copied(self):
        self.assertEqual([(0, 4096)], plan.split_extents(
            [(0, 4096, device.HOLE)], MiB))

    def test_cuts_align_to_chunks(self):
        out = plan.split_extents([(3 * KiB, 20 * KiB, 0)], 8 * KiB)
        self.assertEqual([(3 * KiB, 5 * KiB), (8 * KiB, 8 * KiB),
                          (16 * KiB, 7 * KiB)], out)
        for offset, length in out:
            self.assertLessEqual(length, 8 * KiB)

    def test_covers_exactly_the_data(self):
        rnd = random.Random(7)
        pos, extents, want = 0, [], set()
        for _ in range(200):
            n = rnd.randrange(1, 5) * 512
            flags = rnd.choice([0, 0, HOLE_ZERO, device.ZERO, device.HOLE])
            extents.append((pos, n, flags))
            if not flags & device.ZERO:
                want.update(range(pos // 512, (pos + n) // 512))
            pos += n
        ranges = plan.split_extents(extents, 4096)
        got = set()
        for offset, length in ranges:
            self.assertLessEqual(length, 4096)
            self.assertEqual(offset // 4096, (offset + length - 1) // 4096)
            got.update(range(offset // 512, (offset + length) // 512))
        self.assertEqual(want, got)
        self.assertEqual(sorted(ranges), ranges)

    def test_empty_and_bad_chunk(self):
        self.assertEqual([], plan.split_extents([], MiB))
        self.assertEqual([], plan.split_extents([(0, 0, 0)], MiB))
        self.assertRaises(ValueError, plan.split_extents, [], 0)

    def test_blocks_touched(self):
        self.assertEqual(0, plan.blocks_touched([]))
        self.assertEqual(1, plan.blocks_touched([(0, 512), (4096, 512)]))
        self.assertEqual(2, plan.blocks_touched([(2 * MiB - 1, 2)]))
        self.assertEqual(3, plan.blocks_touched(
            [(0, 4 * MiB), (4 * MiB, 1)]))


class PacingTest(base.TestCase):

    def test_pace_delay(self):
        self.assertEqual(0.0, plan.pace_delay(10 * MiB, 0.0, None))
        self.assertEqual(0.0, plan.pace_delay(10 * MiB, 0.0, 0))
        self.assertEqual(0.0, plan.pace_delay(MiB, 2.0, MiB))
        self.assertAlmostEqual(1.5, plan.pace_delay(4 * MiB, 0.5, 2 * MiB))
        self.assertEqual(0.0, plan.pace_delay(4 * MiB, 2.0, 2 * MiB))

    def test_rate_and_eta(self):
        self.assertEqual(0.0, plan.rate(100, 0))
        self.assertEqual(50.0, plan.rate(100, 2))
        self.assertIsNone(plan.eta(0, 100, 5))
        self.assertIsNone(plan.eta(10, 100, 0))
        self.assertEqual(9.0, plan.eta(10, 100, 1))
        self.assertEqual(0.0, plan.eta(100, 100, 3))
        self.assertEqual(0.0, plan.eta(0, 0, 0))

    def test_completion_action(self):
        self.assertEqual('continue', plan.completion_action(5, 10, 'abort'))
        self.assertEqual('abort', plan.completion_action(10, 10, 'abort'))
        self.assertEqual('force-complete',
                         plan.completion_action(11, 10, 'force-complete'))
        self.assertEqual('force-complete',
                         plan.completion_action(11, 10, 'force_complete'))
        self.assertEqual('continue', plan.completion_action(1e9, 0, 'abort'))
        self.assertEqual('continue',
                         plan.completion_action(1e9, None, 'abort'))
        self.assertRaises(ValueError, plan.completion_action, 1, 10, 'wait')


class ErrorsTest(base.TestCase):

    def test_messages_name_what_failed(self):
        self.assertEqual("migration phase 'x': bad",
                         str(errors.InvalidPhase(phase='x', reason='bad')))
        self.assertEqual("migration m1: phase 'copy': too late",
                         str(errors.InvalidPhase(id='m1', phase='copy',
                                                 reason='too late')))
        self.assertEqual('migration m1 not found',
                         str(errors.MigrationNotFound(id='m1')))
        self.assertEqual('migration m1 not found on host h1',
                         str(errors.MigrationNotFound(id='m1', host='h1')))
        self.assertEqual('migration m1 aborted: cancelled',
                         str(errors.MigrationAborted(id='m1',
                                                     reason='cancelled')))
        self.assertEqual('free text', str(errors.MigrationError('free text')))
        for cls in (errors.InsufficientSpace, errors.VDINotInMap,
                    errors.VIFNotInMap, errors.ChainTooDeep,
                    errors.TooManyMigrations, errors.MigrationAborted,
                    errors.MigrationNotFound, errors.InvalidPhase,
                    errors.JournalError):
            self.assertTrue(issubclass(cls, errors.MigrationError))
