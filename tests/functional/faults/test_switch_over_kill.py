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

"""Agent processes killed or frozen at the switch-over (the commit rule).

Real agent processes in network namespaces, on the real RabbitMQ. Host
a's agent holds its migration where the test asks (:mod:`hooked_agent`:
in ``switch-over``, journaled, before the guest is paused and the
destination asked to commit); host b's agent is
:mod:`switch_over_agent`, which holds its destination role when a commit
request arrived (``complete``) or right after it journaled its commit
(``commit``). An agent is killed with ``kill -9`` or frozen with
``SIGSTOP`` (a host that does not answer, its messages waiting on the
broker). Every step of the switch-over meeting every fault, in one
process and in seconds, is in
functional/core/migration/test_switch_over.py; these cases take what
only real processes and a real broker show: requests that wait in a dead
or frozen agent's queue, timeouts of real calls, errors rebuilt from the
bus, journals read back by restarted processes.

* **source killed before the commit request**: the restarted source asks
  the destination, learns it rolled back, rolls back too; the VM is
  halted on the source (its host stopped), intact, and starts.
* **destination killed before the commit request**: the source's mirror
  fails, it never asked to commit, so it rolls back at once: the guest
  goes on on the source; the restarted destination rolls back too.
* **source killed after the destination committed**: the destination
  starts the VM; the restarted source learns ``committed`` and retires
  its copy. The guest verifies on the destination.
* **destination frozen after its commit**: the source keeps the guest
  paused, asks again, reports ``in-doubt``; the VM cannot be started on
  the source and ``resolve`` changes nothing while the destination is
  frozen. Thawed, the destination finishes; ``resolve`` learns
  ``committed`` and retires the source copy. The guest verifies on the
  destination.
* **destination frozen before it decided**: the same in doubt; thawed,
  the destination answers ``resolve``'s abort (it decides: roll back),
  the guest resumes on the source and verifies, and the commit request
  that waited is refused.
"""

import os
import signal
import time

import fixtures as test_fixtures

from tests.functional.faults import fixtures
from tests.functional.faults import switch_over_agent
from xsm_driver.core import exception
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import journal

MiB = fixtures.MiB
#: the agents' [agent]commit_timeout in these tests
COMMIT_TIMEOUT = 3
#: and their rpc_response_timeout
RPC_TIMEOUT = 6


class SwitchOverKillTest(fixtures.NamespacedAgentsFixture):

    HOLD_PHASES = True
    SIZE = 8 * MiB

    def agent_options(self, role):
        return {'commit_timeout': COMMIT_TIMEOUT}

    def agent_sections(self, role):
        # both agents' calls to each other time out in RPC_TIMEOUT s
        # (not the fixture's 30)
        return {'DEFAULT': {'rpc_response_timeout': RPC_TIMEOUT}}

    def setUp(self):
        super().setUp()
        # Host b's agent with the destination holds.
        self.b_holds = os.path.join(self.root, 'b-holds')
        os.makedirs(self.b_holds)
        self.useFixture(test_fixtures.EnvironmentVariable(
            switch_over_agent.ENV, self.b_holds))
        self._stop_agents()
        self.agents['b'].module = switch_over_agent.__name__
        self.start_agents(*self.agents.values())

    def hold_b(self, point):
        with open(os.path.join(self.b_holds, 'hold-' + point), 'w'):
            pass

    def wait_b_held(self, mid, point, timeout=30):
        held = os.path.join(self.b_holds, 'held-' + point)
        deadline = time.monotonic() + timeout
        while not os.path.exists(held):
            self.assertLess(time.monotonic(), deadline,
                            'host b not held at %s%s' % (point, self.logs()))
            time.sleep(0.02)
        with open(held) as f:
            self.assertEqual(mid, f.read().strip())

    def release_b(self, point):
        try:
            os.remove(os.path.join(self.b_holds, 'hold-' + point))
        except FileNotFoundError:
            pass

    def signal_b(self, sig):
        self.agents['b'].proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            self.addCleanup(self.signal_b, signal.SIGCONT)

    def migrate_to_b(self):
        vm = self.make_vm(sizes=(self.SIZE,), fill=0.5, snapshots=1)
        before_a = self.a.vdi_list()
        return vm, before_a, self.migrate(vm)

    def assert_in_doubt(self, mid, vm):
        """Paused on a, in doubt; resolve changes nothing yet."""
        status = self.wait(self.a, mid, timeout=120)
        self.assertEqual('in-doubt', status['phase'], self.logs())
        self.assertIn('xsm-migrate resolve %s' % mid, status['error'])
        self.assertEqual('paused',
                         self.a.vm_get(vm['uuid'])['power_state'])
        writes = self.a.vm_get(vm['uuid'])['guest']['writes']
        time.sleep(0.3)
        self.assertEqual(writes,
                         self.a.vm_get(vm['uuid'])['guest']['writes'],
                         'the guest in doubt went on writing')
        self.assertRaises(exception.XSMError, self.a.vm_start, vm['uuid'])
        self.assertRaises(errors.InDoubt, self.a.migration_resolve, mid)
        self.assertEqual('in-doubt', self.a.migration_get(mid)['phase'])
        self.assertEqual(('in-doubt', 'switch-over' if self.b_committed(mid)
                          else 'compose'), self.journal_phases(mid))

    def b_committed(self, mid):
        path = os.path.join(self.agents['b'].state_path, 'journal.sqlite')
        with journal.Journal(path) as jnl:
            return bool(jnl.get(mid, role='destination').state.get(
                'committed'))

    def assert_moved(self, mid, vm):
        """The VM runs on b with every write; nothing of it is left on a."""
        self.assertEqual(('done', 'done'), self.journal_phases(mid))
        self.assertEqual([], self.a.vm_list(), self.logs())
        self.assertEqual([], self.a.vdi_list(), self.logs())
        self.assertEqual('running',
                         self.b.vm_get(vm['uuid'])['power_state'])
        time.sleep(0.2)         # the guest goes on there
        self.assert_guest_verifies(self.b, vm, self.SIZE)

    def held_at_the_switch_over(self):
        vm = self.make_vm(sizes=(self.SIZE,), fill=0.5, snapshots=1)
        before_a = self.a.vdi_list()
        self.hold_at('switch-over')
        mid = self.migrate(vm)
        self.wait_held(mid, 'switch-over')
        return vm, before_a, mid

    def journal_phases(self, mid):
        """``(source's phase, destination's phase)`` of ``mid``."""
        phases = []
        for role, state in (('a', 'source'), ('b', 'destination')):
            path = os.path.join(self.agents[role].state_path,
                                'journal.sqlite')
            with journal.Journal(path) as jnl:
                entry = jnl.get(mid, role=state)
                phases.append(entry.phase if entry else None)
        return tuple(phases)

    def assert_source_as_before(self, vm, before_a):
        after_a = self.a.vdi_list()
        self.assertEqual(fixtures.fixtures.records(before_a),
                         fixtures.fixtures.records(after_a), self.logs())
        for disk in vm['disks']:
            self.assertEqual(
                fixtures.fixtures.chain_depth(before_a, disk['vdi']),
                fixtures.fixtures.chain_depth(after_a, disk['vdi']))

    def test_source_killed_at_the_switch_over(self):
        vm, before_a, mid = self.held_at_the_switch_over()
        source = self.agents['a']
        source.kill()
        self.release()
        self.start_agents(source)
        self.assertIn('aborted after a restart', source.log())
        self.assertEqual('aborted', self.a.migration_get(mid)['phase'])
        self.assertEqual(('aborted', 'aborted'), self.journal_phases(mid))
        self.assert_nothing_received()
        self.assert_source_as_before(vm, before_a)
        self.assertEqual('halted',
                         self.a.vm_get(vm['uuid'])['power_state'])
        # not in doubt: it starts
        self.assertEqual('running',
                         self.a.vm_start(vm['uuid'])['power_state'])

    def test_destination_killed_before_the_commit_request(self):
        vm, before_a, mid = self.held_at_the_switch_over()
        dest = self.agents['b']
        dest.kill()
        self.release()
        status = self.wait(self.a, mid, timeout=60)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertEqual('running',
                         self.a.vm_get(vm['uuid'])['power_state'])
        self.start_agents(dest)
        self.assertIn('aborted after a restart', dest.log())
        self.assertEqual(('aborted', 'aborted'), self.journal_phases(mid))
        self.assert_nothing_received()
        self.assert_source_as_before(vm, before_a)
        self.assert_guest_verifies(self.a, vm, self.SIZE)

    def test_source_killed_after_the_destination_committed(self):
        self.hold_b('commit')
        vm, _before_a, mid = self.migrate_to_b()
        self.wait_b_held(mid, 'commit')
        source = self.agents['a']
        source.kill()
        self.release_b('commit')
        self.start_agents(source)
        self.assertIn('done after a restart', source.log())
        self.assertEqual('done', self.a.migration_get(mid)['phase'])
        self.assert_moved(mid, vm)

    def test_destination_frozen_after_its_commit_then_resolve(self):
        self.hold_b('commit')
        vm, _before_a, mid = self.migrate_to_b()
        self.wait_b_held(mid, 'commit')
        self.signal_b(signal.SIGSTOP)
        self.assert_in_doubt(mid, vm)
        self.signal_b(signal.SIGCONT)
        self.release_b('commit')
        status = self.a.migration_resolve(mid)
        self.assertEqual('done', status['phase'], self.logs())
        self.assert_moved(mid, vm)

    def test_destination_frozen_before_it_decided_then_resolve(self):
        self.hold_b('complete')
        vm, before_a, mid = self.migrate_to_b()
        self.wait_b_held(mid, 'complete')
        self.signal_b(signal.SIGSTOP)
        self.assert_in_doubt(mid, vm)
        self.signal_b(signal.SIGCONT)
        # resolve's question makes the destination decide: roll back
        status = self.a.migration_resolve(mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertEqual('running',
                         self.a.vm_get(vm['uuid'])['power_state'])
        # the commit request that waited is refused now
        self.release_b('complete')
        time.sleep(1.0)
        self.assertEqual(('aborted', 'aborted'), self.journal_phases(mid))
        time.sleep(0.2)
        self.assert_source_as_before(vm, before_a)
        self.assert_nothing_received()
        self.assert_guest_verifies(self.a, vm, self.SIZE)
