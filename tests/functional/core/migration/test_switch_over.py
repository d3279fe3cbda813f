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

"""The switch-over under lost messages and dead agents: never two copies.

Every named step of the switch-over, from the first gate pause to the
clean-up, meets every fault that can hit it (see
:class:`switch_over.FaultyPeer`): a lost request, a lost reply, the
source's or the destination's agent killed, the link cut. Each case is
one test method, ``test_<step>__<fault>``, made from :data:`MATRIX`. In
each: exactly one copy of the VM afterwards -- running, unless the agent
of its host was killed (then halted, as every VM of a host that stops) --
or, while the link is cut, a paused source in doubt and a destination
that has not started the VM; every guest write in the copy; journals that
agree. A migration in doubt is then resolved (``Manager.resolve``) once
the link is back, and must end the same way.
"""

import fixtures

from tests.functional.core.migration import switch_over
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan

#: the steps of the switch-over, in order, as the source meets them:
#: ``(name, what precedes the fault: {(call, n): fault}, the faulted call
#: or point)``
STEPS = [
    # before the pause: the guest's models go to the destination (API 1.6)
    ('stage', {}, ('stage_guest', 1)),
    # the gates are paused, the destination has not been asked yet
    ('pause', {}, ('complete', 1)),
    # the source asks the destination to commit
    ('complete', {}, ('complete', 1)),
    # the commit's answer was lost, the destination had committed: the
    # first question (abort) -- the split brain of issue 15 was here
    ('abort', {('complete', 1): 'drop-reply'}, ('abort', 1)),
    # the commit request was lost, the destination had not committed:
    # the first question makes it decide (roll back)
    ('abort-undecided', {('complete', 1): 'drop-request'}, ('abort', 1)),
    # the destination answered committed: the source asks for the result
    ('status', {('complete', 1): 'drop-reply'}, ('status', 1)),
    # inside the destination: its commit is journaled, nothing else yet
    ('commit', {}, 'destination-commit'),
    # inside the destination: its commit is journaled, its NBD exports
    # are being shut off (the mirrors' connections still open)
    ('seal', {}, 'destination-seal'),
    # inside the destination: the VM started, "done" not journaled yet
    ('start', {}, 'destination-start'),
    # inside the destination, after a lost commit request: its roll-back
    # is journaled, nothing removed yet
    ('roll-back', {('complete', 1): 'drop-request'},
     'destination-roll-back'),
    # the source retires its copy
    ('clean-up', {}, 'source-clean-up'),
]

MESSAGE_FAULTS = ('drop-request', 'drop-reply', 'crash-source',
                  'crash-destination-before', 'crash-destination',
                  'cut-link')

#: ``(step, fault) -> outcome``: ``done`` (the VM ends on the
#: destination) or ``aborted`` (on the source); ``in-doubt/X``: the
#: source is in doubt while the link is cut, then resolves to X
EXPECTED = {
    # a staging lost either way: the commit carries the whole state; a
    # destination restarted meanwhile rolled back and refuses the commit
    ('stage', 'drop-request'): 'done',
    ('stage', 'drop-reply'): 'done',
    ('stage', 'crash-source'): 'aborted',
    ('stage', 'crash-destination-before'): 'aborted',
    ('stage', 'crash-destination'): 'aborted',
    ('stage', 'cut-link'): 'in-doubt/aborted',
    ('pause', 'crash-source-before'): 'aborted',
    ('pause', 'cut-link-before'): 'in-doubt/aborted',
    ('complete', 'drop-request'): 'aborted',
    ('complete', 'drop-reply'): 'done',
    ('complete', 'crash-source'): 'done',
    ('complete', 'crash-destination-before'): 'aborted',
    ('complete', 'crash-destination'): 'done',
    ('complete', 'cut-link'): 'in-doubt/done',
    ('abort', 'drop-request'): 'done',
    ('abort', 'drop-reply'): 'done',
    ('abort', 'crash-source'): 'done',
    ('abort', 'crash-destination-before'): 'done',
    ('abort', 'crash-destination'): 'done',
    ('abort', 'cut-link'): 'in-doubt/done',
    ('abort-undecided', 'drop-request'): 'aborted',
    ('abort-undecided', 'drop-reply'): 'aborted',
    ('abort-undecided', 'crash-source'): 'aborted',
    ('abort-undecided', 'crash-destination-before'): 'aborted',
    ('abort-undecided', 'crash-destination'): 'aborted',
    ('abort-undecided', 'cut-link'): 'in-doubt/aborted',
    # the committed answer was known: a lost result changes nothing
    ('status', 'drop-request'): 'done',
    ('status', 'drop-reply'): 'done',
    ('status', 'crash-source'): 'done',
    ('status', 'crash-destination-before'): 'done',
    ('status', 'crash-destination'): 'done',
    ('status', 'cut-link'): 'done',
    ('commit', 'crash-destination'): 'done',
    ('seal', 'crash-destination'): 'done',
    ('start', 'crash-destination'): 'done',
    ('roll-back', 'crash-destination'): 'aborted',
    ('clean-up', 'crash-source'): 'done',
}


class SwitchOverMatrix(switch_over.SwitchOverFixture):
    """One test per step and fault (methods made below)."""

    def run_case(self, step, fault):
        before, at = {s: (b, a) for s, b, a in STEPS}[step]
        self.faults.update(before)
        a_crash_at = None
        if isinstance(at, tuple):
            # a message: the fault hits it (the "-before" forms of the
            # pause step hit the first message, before it is sent)
            self.faults[at] = fault
        elif at == 'destination-commit':
            self._crash_b_in(destination.Receive, '_finish')
        elif at == 'destination-seal':
            self._crash_b_in(destination.Receive, '_seal_exports')
        elif at == 'destination-start':
            self._crash_b_after(destination, 'adopt')
        elif at == 'destination-roll-back':
            self._crash_b_in(destination.Receive, '_stop_server')
        elif at == 'source-clean-up':
            a_crash_at = 'clean-up'

        def hook(mig, phase):
            if a_crash_at is not None and phase == a_crash_at:
                raise switch_over.Crash('source agent killed in %s' % phase)
        self.phase_hook(hook)

        vm, mid, mig = self.migrate_to_the_switch_over()
        expected = EXPECTED[(step, fault)]
        if expected.startswith('in-doubt/'):
            final = expected.split('/')[1]
            self.assertEqual(plan.IN_DOUBT, mig.phase, mig.error)
            self.assertEqual(final, self.assert_in_doubt_and_safe(mid,
                                                                  vm.uuid))
            # while the link is cut, resolving changes nothing
            self.assertRaises(errors.InDoubt, self.managers['a'].resolve,
                              mid)
            self.assert_in_doubt_and_safe(mid, vm.uuid)
            self.heal()
            status = self.managers['a'].resolve(mid)
            self.assertEqual(final, status['phase'], status)
        else:
            final = expected
            if 'crash-source' in fault or a_crash_at:
                self.assertIn(mig.phase, ('switch-over', 'clean-up'),
                              '%s; calls: %s' % (mig.error, self.calls))
                outcomes = self.restart_a()
                self.assertEqual([(mid, 'source', final)], outcomes)
            else:
                self.assertEqual(final, mig.phase, mig.error)
        self.assert_one_copy(mid, vm.uuid, final)

    def _crash_b_in(self, owner, name):
        """b's agent dies when it enters ``owner.name`` the first time."""
        original = getattr(owner, name)
        fired = []

        def crashing(*args, **kwargs):
            if not fired:
                fired.append(True)
                raise switch_over.Crash('destination killed in %s' % name)
            return original(*args, **kwargs)
        self.useFixture(fixtures.MonkeyPatch(
            '%s.%s.%s' % (owner.__module__, owner.__name__, name)
            if isinstance(owner, type) else
            '%s.%s' % (owner.__name__, name), crashing))

    def _crash_b_after(self, module, name):
        """b's agent dies when ``module.name`` returns the first time."""
        original = getattr(module, name)
        fired = []

        def crashing(*args, **kwargs):
            result = original(*args, **kwargs)
            if not fired:
                fired.append(True)
                raise switch_over.Crash('destination killed after %s'
                                        % name)
            return result
        self.useFixture(fixtures.MonkeyPatch(
            '%s.%s' % (module.__name__, name), crashing))


def _make(step, fault):
    def test(self):
        self.run_case(step, fault)
    test.__name__ = 'test_%s__%s' % (step.replace('-', '_'),
                                     fault.replace('-', '_'))
    test.__doc__ = 'switch-over step %s, fault %s' % (step, fault)
    return test


for _step, _fault in sorted(EXPECTED):
    _test = _make(_step, _fault)
    setattr(SwitchOverMatrix, _test.__name__, _test)
del _step, _fault, _test


class TestIssue15SplitBrain(switch_over.SwitchOverFixture):
    """The split brain issue 15 found, exactly as it was found."""

    def test_a_late_committed_answer_finishes_the_migration(self):
        # The destination commits and starts the VM, its reply is lost;
        # the source's first abort request times out; a later abort
        # answers "committed". Before the commit rule, the source resumed
        # its guest after the first abort failed and ignored the later
        # "committed": the VM ran on both hosts, the source's journal
        # said aborted and the destination's done.
        self.faults[('complete', 1)] = 'drop-reply'
        self.faults[('abort', 1)] = 'drop-reply'
        self.phase_hook()
        vm, mid, mig = self.migrate_to_the_switch_over()
        self.assertEqual('done', mig.phase, mig.error)
        self.assertEqual([('complete', 1, 'drop-reply'),
                          ('abort', 1, 'drop-reply'),
                          ('abort', 2, None)],
                         [c for c in self.calls
                          if c[0] in ('complete', 'abort')][:3])
        self.assertEqual({'b': 'running'}, self.where(vm.uuid))
        self.assert_one_copy(mid, vm.uuid, 'done')


class TestInDoubtAcrossRestarts(switch_over.SwitchOverFixture):
    """A source in doubt that restarts stays in doubt, and resolves."""

    def test_restarted_in_doubt_then_resolved_from_the_journal(self):
        self.faults[('complete', 1)] = 'cut-link'
        self.phase_hook()
        vm, mid, mig = self.migrate_to_the_switch_over()
        self.assertEqual(plan.IN_DOUBT, mig.phase, mig.error)
        # the source's agent dies while in doubt, the link still cut
        self.assertEqual([(mid, 'source', plan.IN_DOUBT)], self.restart_a())
        a = self.managers['a']
        self.assertEqual(plan.IN_DOUBT, a.get(mid)['phase'])
        self.assertIsNotNone(a.get(mid)['finished'])
        self.assertIn('xsm-migrate resolve %s' % mid, a.get(mid)['error'])
        self.assertEqual({vm.uuid}, a.in_doubt_vms())
        self.assertEqual('done',
                         self.assert_in_doubt_and_safe(mid, vm.uuid))
        self.assertRaises(errors.InvalidPhase, a.abort, mid)
        self.assertRaises(errors.InDoubt, a.resolve, mid)
        self.heal()
        status = a.resolve(mid)
        self.assertEqual('done', status['phase'], status)
        self.assertEqual(set(), a.in_doubt_vms())
        self.assert_one_copy(mid, vm.uuid, 'done')
