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

import base64
import os
import random
import threading
import tracemalloc
import zlib

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.migration import workload


def _raw(test, size):
    path = os.path.join(test.make_tempdir(), 'disk.raw')
    with open(path, 'wb') as f:
        f.truncate(size)
    dev = backends.RawDevice(path, writable=True)
    test.addCleanup(dev.close)
    return dev


class TestPattern(base.TestCase):

    def test_generation_zero_is_zeros(self):
        self.assertEqual(bytes(workload.BLOCK), workload.pattern(0, 5, 0))

    def test_patterns_differ_by_disk_block_and_generation(self):
        seen = {workload.pattern(d, b, g)
                for d in range(2) for b in range(3) for g in range(1, 4)}
        self.assertEqual(18, len(seen))
        self.assertEqual(workload.BLOCK, len(workload.pattern(1, 2, 3)))

    def test_describe_names_what_is_there(self):
        self.assertEqual('zeros', workload.describe(bytes(4096), 0))
        self.assertEqual('block 7 generation 2',
                         workload.describe(workload.pattern(0, 7, 2), 0))
        self.assertEqual('foreign data', workload.describe(b'x' * 4096, 0))


class TestModel(base.TestCase):

    def test_check_names_the_block_and_both_generations(self):
        model = workload.DiskModel(0, 16)
        model.gen[3] = 2
        exc = self.assertRaises(workload.GuestDataError, model.check, 3,
                                workload.pattern(0, 3, 1))
        self.assertIn('block 3', str(exc))
        self.assertIn('generation 1', str(exc))
        self.assertIn('generation 2', str(exc))

    def test_generations_wrap_past_zero(self):
        model = workload.DiskModel(0, 4)
        model.gen[2] = 254
        self.assertEqual([255, 1, 2], [model.bump(2) for _ in range(3)])

    def test_state_round_trip(self):
        model = workload.DiskModel(1, 1000)
        model.gen[10] = 5
        back = workload.DiskModel.from_primitive(model.to_primitive())
        self.assertEqual(1, back.index)
        self.assertEqual(list(model.gen), list(back.gen))

    def test_a_model_of_several_pieces_round_trips(self):
        blocks = 3 * workload.INFLATE_PIECE + 5
        model = workload.DiskModel(2, blocks)
        for block in (0, workload.INFLATE_PIECE - 1, workload.INFLATE_PIECE,
                      blocks - 1):
            model.bump(block)
        encoded = model.to_primitive()
        for known in (None, blocks):
            back = workload.DiskModel.from_primitive(encoded, known)
            self.assertEqual(model.gen, back.gen)
        exc = self.assertRaises(ValueError,
                                workload.DiskModel.from_primitive, encoded,
                                blocks - 1)
        self.assertIn('not of %d blocks' % (blocks - 1), str(exc))

    def test_a_model_cut_short_is_refused(self):
        model = workload.DiskModel(0, 3 * workload.INFLATE_PIECE)
        model.gen[-1] = 9
        raw = base64.b64decode(model.to_primitive()['generations'])
        cut = dict(model.to_primitive(), generations=base64.b64encode(
            raw[:len(raw) // 2]).decode('ascii'))
        for known, says in ((None, 'cut short'),
                            (model.blocks, 'not of %d blocks'
                             % model.blocks)):
            exc = self.assertRaises(ValueError,
                                    workload.DiskModel.from_primitive, cut,
                                    known)
            self.assertIn(says, str(exc))

    def test_a_large_model_is_never_held_twice(self):
        # a 64 GiB disk's: 16 MiB, which the agent once held two or three
        # times over while it sent or received it
        blocks = 16 << 20
        model = workload.DiskModel(0, blocks)
        model.gen[12345] = 7
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        encoded = model.to_primitive()
        _now, sent = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _peak = tracemalloc.get_traced_memory()
        back = workload.DiskModel.from_primitive(encoded, blocks)
        _now, received = tracemalloc.get_traced_memory()
        self.assertLess(sent, blocks // 4)
        self.assertLess(received - before, blocks * 5 // 4)
        self.assertEqual(7, back.gen[12345])
        self.assertEqual(blocks, back.blocks)


class TestGenerations(base.TestCase):

    def test_sparse_until_one_block_in_dense_at_is_written(self):
        blocks = 64 * workload.DENSE_AT
        gen = workload.Generations(blocks)
        written = {b * 37 % blocks: b % 255 + 1 for b in range(64)}
        for block, g in written.items():
            gen[block] = g
        self.assertIsNone(gen._dense)
        gen[1] = 3                  # the 65th: more than 1 in DENSE_AT
        self.assertIsNotNone(gen._dense)
        written[1] = 3
        self.assertEqual([written.get(b, 0) for b in range(blocks)],
                         list(gen))

    def test_indexes_and_values_are_an_arrays(self):
        gen = workload.Generations(1000)
        gen[-1] = 255
        self.assertEqual(255, gen[999])
        gen[999] = 0
        self.assertEqual(0, gen[-1])
        self.assertEqual({}, gen._sparse)
        for bad in (1000, -1001):
            self.assertRaises(IndexError, gen.__getitem__, bad)
            self.assertRaises(IndexError, gen.__setitem__, bad, 1)
        self.assertRaises(OverflowError, gen.__setitem__, 0, 256)
        self.assertRaises(OverflowError, gen.__setitem__, 0, -1)

    def test_the_encoded_form_is_the_dense_one_either_way(self):
        blocks = 3 * workload.INFLATE_PIECE + 5
        sparse = workload.DiskModel(1, blocks)
        for block in (0, workload.INFLATE_PIECE, blocks - 1):
            sparse.bump(block)
        expected = bytearray(blocks)
        expected[0] = expected[workload.INFLATE_PIECE] = 1
        expected[-1] = 1
        encoded = sparse.to_primitive()
        self.assertEqual(expected, zlib.decompress(
            base64.b64decode(encoded['generations'])))
        dense = workload.DiskModel(1, 0, workload.Generations(blocks))
        dense.gen._densify()
        for block in (0, workload.INFLATE_PIECE, blocks - 1):
            dense.bump(block)
        self.assertEqual(sparse.gen, dense.gen)
        for known in (None, blocks):
            back = workload.DiskModel.from_primitive(encoded, known)
            self.assertIsNone(back.gen._dense)
            self.assertEqual(sparse.gen, back.gen)

    def test_a_model_written_all_over_comes_back_dense(self):
        model = workload.DiskModel(0, 4096)
        for block in range(0, 4096, 2):
            model.bump(block)
        back = workload.DiskModel.from_primitive(model.to_primitive())
        self.assertIsNotNone(back.gen._dense)
        self.assertEqual(model.gen, back.gen)

    def test_encoding_while_the_guest_writes_it_dense(self):
        # the guest goes on writing while export_ahead encodes the model
        model = workload.DiskModel(0, 1 << 16)
        done = threading.Event()

        def write():
            for block in range(0, 1 << 16, 16):
                model.bump(block)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        self.addCleanup(writer.join)
        encodings = 0
        while not done.is_set() or not encodings:
            back = workload.DiskModel.from_primitive(model.to_primitive())
            self.assertEqual(1 << 16, back.blocks)
            encodings += 1
        writer.join()
        self.assertIsNotNone(model.gen._dense)
        self.assertEqual(model.gen, workload.DiskModel.from_primitive(
            model.to_primitive()).gen)

    def test_a_few_writes_to_a_64_gib_disk_hold_little(self):
        # one byte per 4 KiB block would be 16 MiB in the agent
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        model = workload.DiskModel(0, 16 << 20)
        rng = random.Random(5)
        for _ in range(5000):
            model.bump(rng.randrange(model.blocks))
        held, _peak = tracemalloc.get_traced_memory()
        self.assertLess(held, 1 << 20)
        self.assertIsNone(model.gen._dense)


class TestWorkload(base.TestCase):

    def test_fill_then_verify(self):
        dev = _raw(self, 8 << 20)
        model = workload.DiskModel(0, dev.size // workload.BLOCK)
        written = workload.fill(dev, model, 0.5)
        self.assertGreater(written, 0)
        self.assertEqual(dev.size, workload.verify(dev, model))

    def test_verify_finds_a_lost_write(self):
        dev = _raw(self, 4 << 20)
        model = workload.DiskModel(0, dev.size // workload.BLOCK)
        workload.fill(dev, model, 1.0)
        dev.pwrite(workload.pattern(0, 9, 0), 9 * workload.BLOCK)
        exc = self.assertRaises(workload.GuestDataError, workload.verify,
                                dev, model)
        self.assertIn('block 9', str(exc))
        self.assertIn('zeros', str(exc))

    def test_run_suspend_export_resume_elsewhere(self):
        src = _raw(self, 4 << 20)
        dst = _raw(self, 4 << 20)
        models = [workload.DiskModel(0, src.size // workload.BLOCK)]
        guest = workload.Workload([src], models, seed=1).start()
        self.addCleanup(guest.stop)
        while guest.writes < 200:
            threading.Event().wait(0.01)
        guest.suspend()
        writes = guest.writes
        threading.Event().wait(0.05)
        self.assertEqual(writes, guest.writes)      # really paused
        state = guest.export()
        guest.stop()
        dst.pwrite(src.pread(0, src.size), 0)       # "the migration"
        moved = workload.Workload.from_state([dst], state).start()
        self.addCleanup(moved.stop)
        while moved.writes < writes + 100:
            threading.Event().wait(0.01)
        moved.stop()
        self.assertIsNone(moved.error)
        workload.verify(dst, moved.models[0])

    def test_state_taken_ahead_then_completed_in_the_pause(self):
        src = _raw(self, 4 << 20)
        dst = _raw(self, 4 << 20)
        models = [workload.DiskModel(0, src.size // workload.BLOCK)]
        guest = workload.Workload([src], models, seed=3).start()
        self.addCleanup(guest.stop)
        while guest.writes < 100:
            threading.Event().wait(0.01)
        ahead = guest.export_ahead()            # the guest still writes
        before = guest.writes
        while guest.writes < before + 100:
            threading.Event().wait(0.01)
        guest.suspend()
        state = guest.export(ahead)
        changed = state['changes'][0]
        self.assertGreater(len(changed), 0)     # what came after ``ahead``
        self.assertLess(len(changed), models[0].blocks)
        guest.end_ahead()
        self.assertIsNone(models[0].dirty)
        dst.pwrite(src.pread(0, src.size), 0)
        moved = workload.Workload.from_state([dst], state)
        # the model rebuilt from ``ahead`` + the changes is the source's
        self.assertEqual(models[0].gen, moved.models[0].gen)
        # and without the changes it is not: they are needed
        stale = workload.Workload.from_state(
            [dst], dict(state, changes=None))
        self.assertNotEqual(models[0].gen, stale.models[0].gen)
        guest.stop()
        workload.verify(dst, moved.models[0])

    def test_state_staged_ahead_then_swapped_in_the_pause(self):
        # API 1.6: the models go (and are decoded) before the pause; the
        # pause's state names them and carries only the changes
        src = _raw(self, 4 << 20)
        dst = _raw(self, 4 << 20)
        models = [workload.DiskModel(0, src.size // workload.BLOCK)]
        guest = workload.Workload([src], models, seed=5).start()
        self.addCleanup(guest.stop)
        while guest.writes < 100:
            threading.Event().wait(0.01)
        ahead = guest.export_ahead()
        staged = workload.stage(ahead, [src.size])  # the destination
        before = guest.writes
        while guest.writes < before + 100:
            threading.Event().wait(0.01)
        guest.suspend()
        state = guest.export(ahead, staged=True)
        guest.end_ahead()
        self.assertNotIn('models', state)
        self.assertEqual(1, state[workload.STAGED])
        self.assertGreater(len(state['changes'][0]), 0)
        dst.pwrite(src.pread(0, src.size), 0)
        moved = workload.Workload.from_state([dst], state, staged)
        self.assertIs(staged[0], moved.models[0])   # swapped in, no copy
        self.assertEqual(models[0].gen, moved.models[0].gen)
        guest.stop()
        workload.verify(dst, moved.models[0])
        # the same state without the staged models cannot be rebuilt
        for wrong in (None, staged + staged):
            exc = self.assertRaises(ValueError, workload.Workload.from_state,
                                    [dst], state, wrong)
            self.assertIn('staged disk models', str(exc))

    def test_stage_refuses_what_is_not_the_disks_models(self):
        size = 8 * workload.BLOCK
        good = workload.DiskModel(0, 8).to_primitive()
        # a model of 1 GiB of zeros: 1 MiB of blocks in 1 KiB compressed
        huge = workload.DiskModel(0, 1 << 20).to_primitive()
        for bad, says in (([], 'list of the 1 disks\' models, got 0'),
                          ([good, good], 'got 2 models'),
                          ({'index': 0}, 'got dict'),
                          ([{'index': 0}], 'cannot be decoded'),
                          ([dict(good, generations='!!')],
                           'cannot be decoded'),
                          ([dict(good, generations='AAAA')],
                           'cannot be decoded'),
                          ([huge], 'not of 8 blocks'),
                          ([workload.DiskModel(0, 7).to_primitive()],
                           'not of 8 blocks')):
            exc = self.assertRaises(ValueError, workload.stage, bad, [size])
            self.assertIn(says, str(exc))
        self.assertEqual(8, workload.stage([good], [size])[0].blocks)

    def test_a_wrong_read_stops_the_guest_with_the_error(self):
        dev = _raw(self, 1 << 20)
        model = workload.DiskModel(0, dev.size // workload.BLOCK)
        for block in range(model.blocks):
            model.gen[block] = 1
        guest = workload.Workload([dev], [model], seed=2).start()
        self.addCleanup(guest.stop)
        for _ in range(500):
            if guest.error is not None:
                break
            threading.Event().wait(0.01)
        self.assertIsInstance(guest.error, workload.GuestDataError)
        self.assertIn('error', guest.counters())
        guest.suspend(timeout=1)    # a dead guest does not hang a pause
