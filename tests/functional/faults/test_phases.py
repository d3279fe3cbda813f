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

"""Faults that land in one chosen phase, between two namespaces.

Host a's agent has the test-only phase hook of :mod:`hooked_agent`: a
migration is held right after it enters a phase (journaled, the phase's
work not begun) while the test cancels it over RabbitMQ, or cuts the
migration link; then it is released and must end cleanly.

The in-process engine tests (``functional/core/migration/test_engine``)
cancel in every phase from inside the migration's thread. These add what
only separate hosts show: the cancel crosses the control plane from
another process while the guest keeps writing through the mirror, the
destination's export on the migration network is closed afterwards, and
no credentials are left on either host.

``preflight`` is not here: it runs inside the RPC call that starts the
migration, which returns the migration's id only when preflight is over,
so nobody outside can cancel a migration in preflight (the in-process
test covers the cancel path there).
"""

import os

from tests.functional.core.migration import fixtures as rabbit
from tests.functional.faults import fixtures
from tests.functional.faults import test_link
from xsm_driver.core.migration import errors

MiB = fixtures.MiB
chain_depth = rabbit.chain_depth


class PhaseTest(fixtures.NamespacedAgentsFixture):

    HOLD_PHASES = True
    SIZE = 16 * MiB

    def agent_options(self, role):
        return {'mirror_timeout': test_link.MIRROR_TIMEOUT}

    def assert_source_credentials_gone(self, mid):
        folder = os.path.join(self.agents['a'].state_path, 'migrations', mid)
        self.assertFalse(os.path.exists(folder), 'left: %s' % folder)


class TestCancelInEachPhase(PhaseTest):

    #: (phase, occurrence, what exists while the migration is held there)
    PHASES = (
        ('prepare-receive', 1, 'nothing yet'),
        ('mirror', 1, 'the receive'),
        ('snapshot', 2, 'mirror and snapshot'),
        ('copy', 1, 'mirror and snapshot'),
        ('compose', 1, 'the whole copy'),
    )

    def assert_held_state(self, vm, before_a, status, what):
        """What a migration held in its phase has made so far."""
        receiving = bool(self.b.vdi_list())
        ports = self.net.listening_ports('b', self.net.migration['b'])
        if what == 'nothing yet':
            self.assertFalse(receiving)
            self.assertEqual([], ports)
            return
        self.assertTrue(receiving, what)
        self.assertEqual(1, len(ports), what)
        vdis = self.a.vdi_list()
        for disk in vm['disks']:
            grown = 1 if what != 'the receive' else 0
            self.assertEqual(chain_depth(before_a, disk['vdi']) + grown,
                             chain_depth(vdis, disk['vdi']), what)
        if what == 'the whole copy':
            self.assertEqual(status['progress']['total'],
                             status['bytes_copied'])

    def test_cancel_over_rpc_in_each_phase(self):
        """Cancelled in each phase, then refused in switch-over.

        One VM for all rounds: after each cancel it is where it was, its
        guest goes on; the last migration completes.
        """
        vm = self.make_vm(sizes=(self.SIZE,), fill=0.5, snapshots=1)
        before_a = self.a.vdi_list()
        for phase, occurrence, what in self.PHASES:
            self.hold_at(phase, occurrence)
            mid = self.migrate(vm)
            status = self.wait_held(mid, phase)
            self.assert_held_state(vm, before_a, status, what)
            writes = self.a.vm_get(vm['uuid'])['guest']['writes']
            status = self.a.migration_abort(mid)
            self.assertEqual(phase, status['phase'])
            self.release()
            status = self.wait(self.a, mid)
            self.assertEqual('aborted', status['phase'],
                             'cancel in %s: %s%s' % (phase, status,
                                                     self.logs()))
            self.assertIn('cancelled by the operator', status['error'])
            # the source as before, nothing on b; the guest wrote on
            # through the cancel, saw no error, lost nothing; it goes on
            # for the next round where it stopped
            result = self.assert_rolled_back(vm, before_a, self.SIZE,
                                             'cancel in %s: ' % phase)
            self.assert_source_credentials_gone(mid)
            self.assertGreater(result['writes'], writes, phase)
            self.a.guest_start(vm['uuid'], rate=300)
        # switch-over: too late to cancel; the migration completes
        self.hold_at('switch-over')
        mid = self.migrate(vm)
        self.wait_held(mid, 'switch-over')
        exc = self.assertRaises(errors.InvalidPhase, self.a.migration_abort,
                                mid)
        self.assertIn('past the point where it can be aborted', str(exc))
        self.release()
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status, self.logs()))
        self.assertIsNone(status['error'])
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        self.assert_source_credentials_gone(mid)
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.b, vm, self.SIZE)


class TestLinkCutInPhase(test_link.LinkFaultTest):
    """The link is cut while the migration is held, then it goes on.

    One VM, cut in compose, then (link restored) at the start of the
    switch-over. That the VM migrates once the link is back is shown by
    test_link.
    """

    HOLD_PHASES = True

    def cut_in(self, vm, phase):
        before_a = self.a.vdi_list()
        self.hold_at(phase)
        mid = self.migrate(vm)
        self.wait_held(mid, phase)
        took = self.cut_and_check_abort(
            vm, mid, before_a, 'drop', 'mirroring to the destination failed',
            after_cut=self.release)
        self.assert_aborted_in_time(took)

    def test_cut_in_compose_then_in_switch_over(self):
        vm = self.make_dense_vm()
        self.cut_in(vm, 'compose')
        self.net.restore()
        self.a.guest_start(vm['uuid'], rate=300)
        self.cut_in(vm, 'switch-over')
