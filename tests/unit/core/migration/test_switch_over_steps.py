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

"""The switch-over's pause, step by step (``switch_over_steps_ms``).

Real migrations between two managers (real VHD SRs, real TLS NBD on
loopback, the destination called directly) report the steps of their
pause in the status; the steps add up to no more than the pause. Then the
pure parts: :func:`plan.switch_over_steps` and :class:`source.Steps`, and
the guest's vCPUs, which stop at once even between two paced I/Os.
"""

import json
import os
import threading
import time

import fixtures

from tests import base
from tests.unit.core.migration import test_manager
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import source
from xsm_driver.core.migration import workload as workload_mod
from xsm_driver.core.vhd import image as vhd_image

MiB = 1 << 20

SOURCE_VM_STEPS = {'vcpus_pause', 'disks_drain', 'state_export',
                   'mirrors_detach', 'hand_over'}
DEST_VM_STEPS = {'dest_' + s for s in plan.DESTINATION_STEPS}


class TestStepsOfARealSwitchOver(test_manager.ManagerFixture):

    def check_steps(self, status):
        steps = status['switch_over_steps_ms']
        self.assertIsInstance(steps, dict)
        # JSON-simple: names to numbers, and it goes through JSON as is
        self.assertEqual(steps, json.loads(json.dumps(steps)))
        for name, ms in steps.items():
            self.assertIsInstance(name, str)
            self.assertIsInstance(ms, float, name)
            self.assertGreaterEqual(ms, 0.0, name)
        # never more than the pause (each step is rounded down, to the
        # microsecond, as the pause is rounded to it)
        self.assertLessEqual(sum(steps.values()),
                             status['downtime_ms'] + 1e-6,
                             steps)
        self.assertGreater(status['downtime_ms'], 0)
        return steps

    def test_a_vm_move_reports_every_step_of_its_pause(self):
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        steps = self.check_steps(status)
        self.assertEqual(SOURCE_VM_STEPS | DEST_VM_STEPS |
                         {'commit_transport'}, set(steps))
        # the destination's answer is split out of the round trip: the
        # result itself carries no timings
        self.assertEqual({'vdis', 'vm'}, set(status['result']))
        # the journal keeps them for a status read after the migration is
        # no longer in memory
        entry = self.a.host.journal.get(mid, role=source.ROLE)
        self.assertEqual(steps, entry.state['switch_over_steps_ms'])
        self.assertEqual({'vdis', 'vm'},
                         set(self.b.receive_status(mid)['result']))
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_a_vdi_move_within_the_host_reports_its_steps(self):
        top = self.make_tempdir()
        host = host_mod.Host.from_config(
            'c', ['sr-c:vhd:%s' % os.path.join(top, 'sr-c'),
                  'sr-d:vhd:%s' % os.path.join(top, 'sr-d')],
            os.path.join(top, 'state'))
        self.addCleanup(host.close)
        mgr = manager_mod.Manager(host, options=manager_mod.Options(
            chunk=1 * MiB, leaf_headroom=1 * MiB))
        self.addCleanup(mgr.shutdown)
        vm = host.create_vm('vm', [{'sr': 'sr-c', 'size': 4 * MiB}], [])
        host.start_vm(vm.uuid)
        host.guest_start(vm.uuid, rate=200, fill=0.5)
        mid = mgr.migrate_vdi(vm.disks[0].vdi, 'sr-d')
        deadline = time.monotonic() + 60
        while mgr.get(mid).get('finished') is None:
            self.assertLess(time.monotonic(), deadline, 'not finished')
            time.sleep(0.02)
        status = mgr.get(mid)
        self.assertEqual('done', status['phase'], status['error'])
        steps = self.check_steps(status)
        # no guest state travels; the disk is re-pointed here
        self.assertNotIn('vcpus_pause', steps)
        self.assertNotIn('state_export', steps)
        self.assertNotIn('dest_guest_start', steps)
        self.assertLessEqual({'disks_drain', 'mirrors_detach',
                              'dest_commit_record', 'dest_compose',
                              'commit_transport', 'hand_over'}, set(steps))
        self.assertTrue(host.guest_verify(vm.uuid)['verified'])
        host.stop_vm(vm.uuid)


class SpyPeer(test_manager.DirectPeer):
    """The destination, its commits' guest states kept for the test."""

    def __init__(self, manager, staged=True):
        super().__init__(manager)
        self.states = []
        if not staged:
            self.stage_guest = None     # a destination older than API 1.6

    def complete(self, mid, vm_state):
        self.states.append(vm_state)
        return super().complete(mid, vm_state)


class TestGuestStateStagedAhead(test_manager.ManagerFixture):
    """API 1.6: the guest's models go before the pause, not in it."""

    def migrate(self, peer):
        self.a._peer_factory = lambda name: peer
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        return vm, self.wait(mid)

    def test_the_commit_carries_only_the_changes(self):
        peer = SpyPeer(self.b)
        vm, status = self.migrate(peer)
        self.assertEqual('done', status['phase'], status['error'])
        [state] = peer.states
        guest = state['workload']
        self.assertNotIn('models', guest)
        self.assertEqual(2, guest[workload_mod.STAGED])
        self.assertEqual(2, len(guest['changes']))
        # the destination's guest goes on from the staged models
        self.assertTrue(self.b.host.vm(vm.uuid).workload.running)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_a_destination_older_than_1_6_gets_the_whole_state(self):
        peer = SpyPeer(self.b, staged=False)
        vm, status = self.migrate(peer)
        self.assertEqual('done', status['phase'], status['error'])
        [state] = peer.states
        self.assertNotIn(workload_mod.STAGED, state['workload'])
        self.assertEqual(2, len(state['workload']['models']))
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_a_failed_staging_sends_the_whole_state(self):
        class FailingPeer(SpyPeer):
            def stage_guest(self, mid, models):
                raise OSError('link down for a moment')

        peer = FailingPeer(self.b)
        vm, status = self.migrate(peer)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual(2, len(peer.states[0]['workload']['models']))
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_a_commit_without_its_staged_models_is_refused_before_it(self):
        # the destination said it took the models, but has none: it must
        # refuse the commit before its commit point, so that the source
        # learns "aborted" and its guest goes on there, nothing lost
        class LyingPeer(SpyPeer):
            def stage_guest(self, mid, models):
                return {'staged': len(models)}

        peer = LyingPeer(self.b)
        vm, status = self.migrate(peer)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('rolled the switch-over back', status['error'])
        self.assertEqual(host_mod.RUNNING, self.a.host.vm(vm.uuid).power_state)
        self.assertNotIn(vm.uuid, self.b.host.vms)
        self.assertTrue(self.a.host.guest_verify(vm.uuid)['verified'])
        self.assertEqual([], self.b.host.journal.unfinished())

    def test_staging_is_refused_once_committed(self):
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        self.assertEqual('done', self.wait(mid)['phase'])
        models = [workload_mod.DiskModel(0, 8).to_primitive()]
        exc = self.assertRaises(errors.InvalidPhase,
                                self.b.receive_stage_guest, mid, models)
        self.assertIn('committed already', str(exc))


class TestComposeAhead(test_manager.ManagerFixture):
    """The bases are finished at the compose phase, not in the pause."""

    def test_the_commit_opens_no_image(self):
        # compose and the guest's start reuse the leaves' open devices:
        # no image (no BAT) is read in the pause
        opened = []
        real_image = vhd_image.Image

        def image(path, *args, **kwargs):
            opened.append((threading.current_thread().name, path))
            return real_image(path, *args, **kwargs)

        class Peer(SpyPeer):
            def complete(self, mid, vm_state):
                with fixtures.MonkeyPatch(
                        'xsm_driver.core.vhd.image.Image', image):
                    me = threading.current_thread().name
                    try:
                        return super().complete(mid, vm_state)
                    finally:
                        self.opened = [p for t, p in opened if t == me]

        peer = Peer(self.b)
        self.a._peer_factory = lambda name: peer
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual([], peer.opened)
        moved = self.b.host.vm(vm.uuid)
        self.assertTrue(moved.workload.running)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])
        # the composed VDIs are normal ones once the VM stops
        self.b.host.stop_vm(vm.uuid)
        sr = self.b.host.sr('sr-b')
        for disk in moved.disks:
            record = sr.get(disk.vdi)
            self.assertFalse(record.hidden)
            self.assertTrue(sr.get(record.parent).hidden)
            self.assertTrue(sr.get(record.parent).read_only)
            sr.attach(disk.vdi, writable=True).close()

    def test_a_failure_finishing_a_base_rolls_back(self):
        vm = self.make_vm()
        before = sorted(v.uuid for v in self.b.host.sr('sr-b').list())

        def broken(*args, **kwargs):
            raise OSError(5, 'Input/output error')
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.vhd.ops.refresh_parent_timestamp', broken))
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('Input/output error', status['error'])
        self.assertEqual(host_mod.RUNNING,
                         self.a.host.vm(vm.uuid).power_state)
        self.assertTrue(self.a.host.guest_verify(vm.uuid)['verified'])
        self.assertEqual(before, sorted(
            v.uuid for v in self.b.host.sr('sr-b').list()))
        self.assertEqual([], self.b.host.journal.unfinished())


class TestSwitchOverSteps(base.TestCase):
    """:func:`plan.switch_over_steps`, pure."""

    def test_the_round_trip_is_split_into_the_destinations_steps(self):
        steps = plan.switch_over_steps(
            {'vcpus_pause': 0.0001, 'disks_drain': 0.002,
             'mirrors_detach': 0.0, 'commit': 0.012, 'hand_over': 0.0005},
            {'commit_record': 1.5, 'compose': 4.25, 'guest_start': 2.0})
        self.assertEqual({'vcpus_pause': 0.1, 'disks_drain': 2.0,
                          'mirrors_detach': 0.0,
                          'dest_commit_record': 1.5, 'dest_compose': 4.25,
                          'dest_guest_start': 2.0,
                          'commit_transport': 4.25, 'hand_over': 0.5},
                         steps)
        self.assertEqual(14.6, round(sum(steps.values()), 6))

    def test_without_the_destinations_steps_the_commit_is_one_step(self):
        self.assertEqual({'disks_drain': 1.0, 'commit': 9.0},
                         plan.switch_over_steps({'disks_drain': 0.001,
                                                 'commit': 0.009}, None))
        # (a destination that answered with no timings in it)
        self.assertEqual({'commit': 9.0}, plan.switch_over_steps(
            {'commit': 0.009}, {'x': 'not a number', 'y': True}))

    def test_the_destination_cannot_take_longer_than_the_round_trip(self):
        # another host's clock: its steps are scaled into the round trip
        steps = plan.switch_over_steps({'commit': 0.010},
                                       {'compose': 15.0, 'done_record': 5.0})
        self.assertEqual({'dest_compose': 7.5, 'dest_done_record': 2.5,
                          'commit_transport': 0.0}, steps)

    def test_rounded_down_so_the_sum_never_exceeds_the_pause(self):
        seconds = {'disks_drain': 0.0012345678, 'commit': 0.0033333333,
                   'hand_over': 0.0001119}
        steps = plan.switch_over_steps(seconds, {'compose': 1.1111111})
        pause_ms = round(sum(seconds.values()) * 1000, 3)
        self.assertLessEqual(sum(steps.values()), pause_ms + 1e-9)
        self.assertEqual(1.234, steps['disks_drain'])
        self.assertEqual(0.111, steps['hand_over'])
        # negative durations (a clock stepping back) count as nothing
        self.assertEqual({'disks_drain': 0.0},
                         plan.switch_over_steps({'disks_drain': -0.5}))


class FakeClock:

    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


class TestSteps(base.TestCase):

    def test_each_mark_ends_the_step_under_way(self):
        steps = source.Steps(clock=FakeClock(10.0, 10.5, 10.75, 11.0,
                                             12.0))
        self.assertEqual(10.0, steps.start)
        self.assertEqual(10.5, steps.mark('disks_drain'))
        steps.mark('commit')
        steps.mark('commit')             # a step marked twice adds up
        self.assertEqual(12.0, steps.mark('hand_over'))
        self.assertEqual({'disks_drain': 0.5, 'commit': 0.5,
                          'hand_over': 1.0}, steps.seconds)
        self.assertEqual(['disks_drain', 'commit', 'hand_over'],
                         list(steps.seconds))


class NullDevice:
    """A disk that takes writes and answers reads with the model's data."""

    def __init__(self, model):
        self.model = model

    def pwrite(self, data, offset):
        pass

    def pread(self, offset, length):
        block = offset // workload_mod.BLOCK
        return workload_mod.pattern(self.model.index, block,
                                    self.model.gen[block])


class TestGuestPausesBetweenTwoPacedIOs(base.TestCase):

    def test_suspend_does_not_wait_for_the_pacing(self):
        # one write every 2 s per disk: before, a pause waited up to 2 s
        # for the vCPU to come back from its pacing sleep
        models = [workload_mod.DiskModel(i, 64) for i in range(2)]
        guest = workload_mod.Workload([NullDevice(m) for m in models],
                                      models, rate=0.5, read_ratio=1.0)
        guest.start()
        self.addCleanup(guest.stop)
        deadline = time.monotonic() + 10
        while guest.writes < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(2, guest.writes)   # both threads now pace
        time.sleep(0.1)
        start = time.monotonic()
        guest.suspend(timeout=5)
        took = time.monotonic() - start
        self.assertLess(took, 1.0)
        # parked: no I/O while paused, even past the next paced one
        writes = guest.writes
        time.sleep(2.2)
        self.assertEqual(writes, guest.writes)
        guest.resume()
        deadline = time.monotonic() + 10
        while guest.writes == writes and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertGreater(guest.writes, writes)
        self.assertIsNone(guest.error)

    def test_stop_ends_the_pacing_at_once(self):
        models = [workload_mod.DiskModel(0, 64)]
        guest = workload_mod.Workload([NullDevice(models[0])], models,
                                      rate=0.2).start()
        deadline = time.monotonic() + 10
        while guest.writes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        stopper = threading.Thread(target=guest.stop)
        stopper.start()
        stopper.join(10)
        self.assertFalse(stopper.is_alive())
        self.assertLess(time.monotonic() - start, 1.0)   # not 5 s


class TestPace(base.TestCase):

    def test_the_wait_may_end_early(self):
        waited = []
        now = time.monotonic()
        next_at = workload_mod.pace(now + 10, 1.0, wait=waited.append)
        self.assertEqual(now + 11, next_at)
        self.assertEqual(1, len(waited))
        self.assertGreater(waited[0], 10.0)
        # behind: no wait, starts again from now
        self.assertGreaterEqual(workload_mod.pace(now - 10, 1.0,
                                                  wait=waited.append), now)
        self.assertEqual(1, len(waited))
