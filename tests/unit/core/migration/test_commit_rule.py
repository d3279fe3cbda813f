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

"""The switch-over's commit rule as pure decisions, and its two halves.

The decisions (plan.commit_outcome, switch_over_action, recovery_action)
are tested without any IO; the destination's refusals and the source's
in-doubt state with two managers on real SRs (see test_manager). Every
step of the switch-over meeting every fault is in
functional/core/migration/test_switch_over.py.
"""

import doctest
import time

import fixtures
import oslo_messaging as messaging

from tests import base
from tests.unit.core.migration import test_manager
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import source

MiB = 1 << 20


def load_tests(loader, tests, pattern):
    tests.addTests(doctest.DocTestSuite(plan))
    return tests


class TestCommitOutcome(base.TestCase):
    """Only the destination's durable records are knowledge."""

    def test_complete(self):
        self.assertEqual(plan.COMMITTED, plan.commit_outcome(
            'complete', {'vdis': {'s': 'd'}, 'vm': 'v'}))
        for error in (errors.MigrationAborted(id='m', reason='r'),
                      errors.LeaseExpired(id='m', host='b', silent=1,
                                          lease=1)):
            self.assertEqual(plan.ABORTED, plan.commit_outcome(
                'complete', error=error))
        # it may have committed before the error, or not: unknown
        for error in (TimeoutError('no reply'),
                      messaging.MessagingTimeout('timed out'),
                      ConnectionError('link down'),
                      errors.MigrationNotFound(id='m'),
                      errors.MigrationError('SR full'),
                      RuntimeError('anything else')):
            self.assertEqual(plan.UNKNOWN, plan.commit_outcome(
                'complete', error=error), error)
        self.assertEqual(plan.UNKNOWN, plan.commit_outcome('complete',
                                                           None))

    def test_abort(self):
        self.assertEqual(plan.COMMITTED,
                         plan.commit_outcome('abort', 'committed'))
        self.assertEqual(plan.ABORTED,
                         plan.commit_outcome('abort', 'aborted'))
        for answer in (None, '', 'done', {'phase': 'aborted'}):
            self.assertEqual(plan.UNKNOWN,
                             plan.commit_outcome('abort', answer))
        for error in (TimeoutError('lost'),
                      errors.MigrationAborted(id='m', reason='r')):
            # abort is the question; only its answer decides
            self.assertEqual(plan.UNKNOWN,
                             plan.commit_outcome('abort', error=error))

    def test_status(self):
        for answer, outcome in (
                ({'phase': 'done'}, plan.COMMITTED),
                ({'phase': 'switch-over', 'committed': True},
                 plan.COMMITTED),
                ({'phase': 'aborted'}, plan.ABORTED),
                ({'phase': 'compose', 'committed': False}, plan.UNKNOWN),
                ({'phase': None}, plan.UNKNOWN),
                (None, plan.UNKNOWN)):
            self.assertEqual(outcome, plan.commit_outcome('status', answer),
                             answer)
        self.assertEqual(plan.UNKNOWN, plan.commit_outcome(
            'status', error=TimeoutError('lost')))

    def test_unknown_call(self):
        self.assertRaises(ValueError, plan.commit_outcome, 'compose', None)


class TestSwitchOverAction(base.TestCase):

    def test_knowledge_acts_at_once_whatever_the_time(self):
        for elapsed in (0, 5, 1e9):
            self.assertEqual(plan.FINISH, plan.switch_over_action(
                plan.COMMITTED, elapsed, 10))
            self.assertEqual(plan.ROLL_BACK, plan.switch_over_action(
                plan.ABORTED, elapsed, 10))

    def test_silence_is_never_an_answer(self):
        self.assertEqual(plan.ASK_AGAIN,
                         plan.switch_over_action(plan.UNKNOWN, 0, 10))
        self.assertEqual(plan.ASK_AGAIN,
                         plan.switch_over_action(plan.UNKNOWN, 9.99, 10))
        self.assertEqual(plan.REPORT_IN_DOUBT,
                         plan.switch_over_action(plan.UNKNOWN, 10, 10))
        self.assertEqual(plan.REPORT_IN_DOUBT,
                         plan.switch_over_action(plan.UNKNOWN, 1e9, 10))
        # no answer ever leads to a roll-back
        for elapsed in range(0, 30):
            self.assertNotEqual(plan.ROLL_BACK, plan.switch_over_action(
                plan.UNKNOWN, elapsed, 10))

    def test_bad_outcome(self):
        self.assertRaises(ValueError, plan.switch_over_action, 'maybe', 0,
                          1)


class TestRecoveryAction(base.TestCase):

    def test_source(self):
        for phase in ('preflight', 'prepare-receive', 'mirror', 'snapshot',
                      'copy', 'compose'):
            # the destination was never asked to commit
            self.assertEqual(plan.ROLL_BACK,
                             plan.recovery_action('source', phase), phase)
        for phase in ('switch-over', plan.IN_DOUBT):
            self.assertEqual(plan.ASK_AGAIN,
                             plan.recovery_action('source', phase), phase)
        self.assertEqual(plan.FINISH,
                         plan.recovery_action('source', 'clean-up'))

    def test_destination(self):
        self.assertEqual(plan.FINISH, plan.recovery_action(
            'destination', 'switch-over', committed=True))
        for phase in ('prepare-receive', 'compose', 'switch-over'):
            self.assertEqual(plan.ROLL_BACK, plan.recovery_action(
                'destination', phase, committed=False), phase)

    def test_in_doubt_is_past_the_point_of_no_return(self):
        self.assertFalse(plan.can_abort(plan.IN_DOUBT))
        self.assertEqual(plan.IN_DOUBT, plan.check_phase(plan.IN_DOUBT))
        self.assertNotIn(plan.IN_DOUBT, plan.TERMINAL)


class CommitRuleFixture(test_manager.ManagerFixture):

    check_leaks = False

    def options(self, name):
        return {'commit_timeout': 0.5, 'commit_retry_interval': 0.05}

    def prepared(self):
        """A receive on b, copied and composed, as a source leaves it."""
        vm = self.make_vm()
        begun = self.begin(vm)
        self.addCleanup(self.a.abort, begun['id'])
        mid = begun['id']
        self.b.receive_prepare(begun['request'])
        self.b.receive_compose(mid)
        return mid, vm


class TestDestinationHalf(CommitRuleFixture):

    def test_the_commit_is_journaled_before_the_vm_starts(self):
        mid, vm = self.prepared()
        seen = []
        start = self.b.host.start_vm

        def start_vm(ref, workload=None, **kwargs):
            entry = self.b.host.journal.get(mid, destination.ROLE)
            seen.append((entry.phase, entry.state.get('committed')))
            return start(ref, workload, **kwargs)
        self.b.host.start_vm = start_vm
        state = {'vm': {'uuid': vm.uuid, 'name': 'vm',
                        'disks': [d.to_dict() for d in vm.disks],
                        'vifs': ['net0']},
                 'power_state': 'running', 'workload': None}
        result = self.b.receive_complete(mid, state)
        self.assertEqual([('switch-over', True)], seen)
        self.assertEqual(vm.uuid, result['vm'])
        # after the commit, abort answers committed; complete answers the
        # same result again
        self.assertEqual('committed', self.b.receive_abort(mid))
        self.assertEqual(result, self.b.receive_complete(mid, state))
        self.assertEqual({'phase': 'done', 'committed': True},
                         {k: v for k, v in self.b.receive_status(
                             mid).items() if k in ('phase', 'committed')})
        self.b.host.stop_vm(vm.uuid)

    def test_after_the_abort_a_commit_is_refused(self):
        mid, vm = self.prepared()
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assertRaises(errors.MigrationAborted, self.b.receive_complete,
                          mid, None)
        self.assertRaises(errors.MigrationAborted, self.b.receive_compose,
                          mid)
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assertEqual([], self.records('b'))

    def test_an_abort_of_an_unknown_migration_is_recorded(self):
        # a late prepare of it is refused: "aborted" stays true
        self.assertEqual('aborted', self.b.receive_abort('never-seen'))
        entry = self.b.host.journal.get('never-seen', destination.ROLE)
        self.assertEqual('aborted', entry.phase)
        vm = self.make_vm()
        begun = self.begin(vm)
        self.addCleanup(self.a.abort, begun['id'])
        request = dict(begun['request'], id='never-seen')
        self.assertRaises(errors.InvalidPhase, self.b.receive_prepare,
                          request)

    def test_a_restart_past_the_commit_finishes_forward(self):
        mid, vm = self.prepared()
        rcv = self.b._receives[mid]

        def crash(**kwargs):
            raise KeyboardInterrupt('killed')     # not an Exception
        rcv._finish = crash
        state = {'vm': {'uuid': vm.uuid, 'name': 'vm',
                        'disks': [d.to_dict() for d in vm.disks],
                        'vifs': ['net0']},
                 'power_state': 'running', 'workload': None}
        self.assertRaises(KeyboardInterrupt, self.b.receive_complete, mid,
                          state)
        # the process dies: its server and open images go
        rcv._stop_server()
        for _sr, rec in rcv._receivers.values():
            rec.base.close()
            rec.leaf.close()
        entry = self.b.host.journal.get(mid, destination.ROLE)
        self.assertEqual(('switch-over', True),
                         (entry.phase, entry.state['committed']))
        self.assertEqual(plan.FINISH, plan.recovery_action(
            'destination', entry.phase, entry.state['committed']))
        self.assertEqual('committed', destination.recover(self.b.host,
                                                          entry))
        entry = self.b.host.journal.get(mid, destination.ROLE)
        self.assertEqual('done', entry.phase)
        moved = self.b.host.vms[vm.uuid]
        self.assertEqual(host_mod.HALTED, moved.power_state)
        sr = self.b.host.sr('sr-b')
        for disk in moved.disks:
            self.assertEqual(2, len(sr.chain(disk.vdi)))
            self.assertTrue(sr.get(sr.chain(disk.vdi)[1].uuid).read_only)


class NoAnswerPeer(test_manager.DirectPeer):
    """The destination; ``lost`` calls are lost after (or before) it."""

    def __init__(self, manager):
        super().__init__(manager)
        self.lost = set()
        self.before = set()

    def _maybe(self, name, func, *args):
        if name in self.before:
            raise TimeoutError('request %s lost' % name)
        answer = func(*args)
        if name in self.lost:
            raise TimeoutError('reply to %s lost' % name)
        return answer

    def complete(self, mid, vm_state):
        return self._maybe('complete', super().complete, mid, vm_state)

    def abort(self, mid, timeout=None):
        return self._maybe('abort', super().abort, mid)


class TestSourceHalf(CommitRuleFixture):

    def setUp(self):
        super().setUp()
        self.peer = NoAnswerPeer(self.b)
        self.a._peer_factory = lambda name: self.peer

    def start(self):
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        return mid, vm

    def wait_phase(self, mid, phases, timeout=60):
        deadline = time.monotonic() + timeout
        while self.a.get(mid)['phase'] not in phases:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        return self.a.get(mid)

    def test_no_answer_keeps_the_guest_paused_then_in_doubt(self):
        self.peer.lost = {'complete', 'abort'}
        mid, vm = self.start()
        status = self.wait_phase(mid, (plan.IN_DOUBT, 'done', 'aborted'))
        self.assertEqual(plan.IN_DOUBT, status['phase'], status)
        self.assertIsNotNone(status['finished'])
        self.assertIn("xsm-migrate resolve %s" % mid, status['error'])
        self.assertEqual(host_mod.PAUSED, vm.power_state)
        writes = vm.workload.writes
        time.sleep(0.1)
        self.assertEqual(writes, vm.workload.writes)
        # the VM in doubt counts as moving: it cannot move again, nor be
        # started here
        self.assertEqual({vm.uuid}, self.a.in_doubt_vms())
        self.assertRaises(errors.MigrationError, self.a.migrate_vm,
                          vm.uuid, 'b', self.vdi_map(vm), {'net0': 'net0'})
        # still no answer: resolve changes nothing, abort is refused
        self.assertRaises(errors.InDoubt, self.a.resolve, mid)
        exc = self.assertRaises(errors.InvalidPhase, self.a.abort, mid)
        self.assertIn('xsm-migrate resolve %s' % mid, str(exc))
        self.assertEqual(plan.IN_DOUBT, self.a.get(mid)['phase'])
        # the answers come back: committed (the destination had)
        self.peer.lost = set()
        status = self.a.resolve(mid)
        self.assertEqual('done', status['phase'], status)
        self.assertEqual({}, self.a.host.vms)
        self.assertEqual([], self.records('a'))
        result = self.b.host.guest_verify(vm.uuid)
        self.assertTrue(result['verified'], result)
        self.assertEqual(set(), self.a.in_doubt_vms())

    def test_resolve_resumes_the_source_when_the_destination_aborted(self):
        self.peer.before = {'complete'}
        self.peer.lost = {'abort'}
        mid, vm = self.start()
        status = self.wait_phase(mid, (plan.IN_DOUBT, 'done', 'aborted'))
        self.assertEqual(plan.IN_DOUBT, status['phase'], status)
        # it had decided at the first abort: rolled back, refuses commit
        self.assertEqual('aborted', self.b.receive_status(mid)['phase'])
        self.assertNotIn(vm.uuid, self.b.host.vms)
        self.peer.lost = set()
        status = self.a.resolve(mid)
        self.assertEqual('aborted', status['phase'], status)
        self.assertEqual(host_mod.RUNNING, vm.power_state)
        time.sleep(0.1)
        result = self.a.host.guest_verify(vm.uuid)
        self.assertTrue(result['verified'], result)
        self.assertEqual(10 * MiB, result['bytes_verified'])
        self.assertEqual('aborted',
                         self.a.host.journal.get(mid, 'source').phase)

    def test_resolve_of_what_is_not_in_doubt(self):
        mid, vm = self.start()
        status = self.wait_phase(mid, ('done', 'aborted'))
        self.assertEqual('done', status['phase'])
        self.assertEqual('done', self.a.resolve(mid)['phase'])
        self.assertRaises(errors.MigrationNotFound, self.a.resolve, 'nope')

    def test_a_failure_after_the_commit_never_rolls_back(self):
        # (the source's own steps after a known commit may fail: it must
        # not resume a guest the destination runs)
        def broken(mig, paused):
            raise RuntimeError('repointing failed')
        self.useFixture(fixtures.MockPatchObject(source.Migration,
                                                 '_committed', broken))
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        mig = self.a._sources[mid]
        mig.thread.join(60)
        self.assertEqual('repointing failed', str(mig.error))
        # left where a restart finishes it (it asks, learns committed)
        self.assertEqual('switch-over', mig.phase)
        self.assertEqual('switch-over',
                         self.a.host.journal.get(mid, 'source').phase)
        self.assertEqual('done', self.b.receive_status(mid)['phase'])
        self.assertEqual('committed', self.b.receive_abort(mid))
        self.assertEqual('running', self.b.host.vms[vm.uuid].power_state)
        self.b.host.stop_vm(vm.uuid)
