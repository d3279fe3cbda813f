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

"""The source's lease on the destination's receive, at the manager level.

Two hosts with real VHD SRs, each with its manager, leases of one second;
the data crosses real mutual-TLS NBD connections on loopback. The same
with two agent processes over RabbitMQ is in
functional/core/migration/test_lease.py.
"""

import doctest
import socket
import threading
import time

import oslo_messaging as messaging

from tests.unit.core.migration import test_manager
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import source as source_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import arguments

MiB = 1 << 20
LEASE = 1.0
#: how late past its lease a silent source's receive may be rolled back
MARGIN = 5.0


def load_tests(loader, tests, pattern):
    tests.addTests(doctest.DocTestSuite(source_mod))
    return tests


class PartitionablePeer(test_manager.DirectPeer):
    """The destination, whose renewals can be cut off (as by a partition)."""

    def __init__(self, manager):
        super().__init__(manager)
        self.cut = threading.Event()
        self.renewals = 0
        self.failed = 0
        self.delay = 0              # seconds each renewal takes

    def renew(self, mid, timeout=None):
        if self.cut.is_set():
            self.failed += 1
            raise TimeoutError('no answer from host b within %s s' % timeout)
        time.sleep(self.delay)
        self.renewals += 1
        return super().renew(mid, timeout)


class LeaseFixture(test_manager.ManagerFixture):

    def options(self, name):
        return {'receive_lease_timeout': LEASE}

    def setUp(self):
        super().setUp()
        self.peer = PartitionablePeer(self.b)
        self.a._peer_factory = lambda name: self.peer

    def prepare(self, renews=True):
        """Prepare a receive on b as a source would; ``(id, answer)``."""
        vm = self.make_vm()
        begun = self.begin(vm)
        # the begun migration only lends its request (and its client CA)
        self.addCleanup(self.a.abort, begun['id'])
        request = dict(begun['request'])
        self.assertIs(True, request['renews'])
        if not renews:
            del request['renews']       # a source older than API 1.2
        return begun['id'], self.b.receive_prepare(request)

    def assert_nothing_left(self, mid, answer):
        self.assertEqual([], self.records('b'))
        self.assertEqual([], self.left('b'))
        self.assertEqual(0, self.b.active())
        self.assertEqual({}, self.b._leases)
        entry = self.b.host.journal.get(mid, role=destination.ROLE)
        self.assertEqual('aborted', entry.phase)
        self.assertEqual([], self.b.host.journal.unfinished())
        # its NBD server is gone: nothing listens on its port
        self.assertRaises(ConnectionRefusedError, socket.create_connection,
                          (answer['host'], answer['port']), 2)

    def wait_rolled_back(self, mid, within):
        self.wait_for('the receive to be rolled back',
                      lambda: self.b.receive_status(mid)['phase'] ==
                      'aborted' and not self.b._leases, timeout=within)


class TestDestinationLease(LeaseFixture):

    def test_a_silent_source_loses_its_receive(self):
        mid, answer = self.prepare()
        self.assertEqual(4, len(self.records('b')))
        self.assertEqual(1, self.b.active())
        self.assertEqual({'lease_timeout': LEASE}, self.b.receive_renew(mid))
        started = time.monotonic()
        self.wait_rolled_back(mid, LEASE + MARGIN)
        self.assertGreaterEqual(time.monotonic() - started, LEASE * 0.9)
        self.assert_nothing_left(mid, answer)
        expired = self.b.receive_status(mid)['expired']
        self.assertGreaterEqual(expired['silent'], LEASE)
        self.assertEqual(LEASE, expired['lease'])
        # the source, back, hears why from any call on the receive
        for call in (self.b.receive_renew, self.b.receive_compose,
                     lambda m: self.b.receive_complete(m, None)):
            exc = self.assertRaises(errors.LeaseExpired, call, mid)
            self.assertIn('migration %s aborted: destination host b rolled '
                          'back its receive after' % mid, str(exc))
            self.assertIn('without a lease renewal from the source',
                          str(exc))
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assert_nothing_left(mid, answer)

    def test_renewals_keep_the_receive_across_several_leases(self):
        mid, answer = self.prepare()
        deadline = time.monotonic() + 3.5 * LEASE
        while time.monotonic() < deadline:
            self.assertEqual({'lease_timeout': LEASE},
                             self.b.receive_renew(mid))
            time.sleep(LEASE / 4)
        self.assertEqual('prepare-receive',
                         self.b.receive_status(mid)['phase'])
        self.assertEqual(4, len(self.records('b')))
        socket.create_connection((answer['host'], answer['port']), 2).close()
        # silent from now on
        self.wait_rolled_back(mid, LEASE + MARGIN)
        self.assert_nothing_left(mid, answer)

    def test_a_source_that_does_not_renew_holds_no_lease(self):
        mid, answer = self.prepare(renews=False)
        self.assertEqual({}, self.b._leases)
        time.sleep(2.5 * LEASE)
        self.assertEqual('prepare-receive',
                         self.b.receive_status(mid)['phase'])
        self.assertEqual(4, len(self.records('b')))
        self.assertEqual({'lease_timeout': None}, self.b.receive_renew(mid))
        # its own abort still rolls it back
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assert_nothing_left(mid, answer)
        self.assertIsNone(self.b.receive_status(mid)['expired'])

    def test_no_lease_when_the_option_is_zero(self):
        self.b.options.receive_lease_timeout = 0
        mid, answer = self.prepare()
        self.assertEqual({'lease_timeout': None}, self.b.receive_renew(mid))
        time.sleep(2 * LEASE)
        self.assertEqual(4, len(self.records('b')))
        self.assertEqual('aborted', self.b.receive_abort(mid))

    def test_the_abort_stops_the_lease(self):
        mid, answer = self.prepare()
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assert_nothing_left(mid, answer)
        exc = self.assertRaises(errors.MigrationAborted,
                                self.b.receive_renew, mid)
        self.assertNotIsInstance(exc, errors.LeaseExpired)
        self.assertIn('already rolled it back', str(exc))
        self.assertRaises(errors.MigrationNotFound, self.b.receive_renew,
                          '00000000-0000-4000-8000-000000000000')

    def test_a_prepared_ahead_receive_is_leased_from_its_claim(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        self.addCleanup(self.a.abort, begun['id'])
        mid = begun['id']
        answer = self.b.receive_prepare_ahead(begun['request'])
        self.assertEqual({}, self.b._leases)    # prepared_timeout rules
        time.sleep(1.5 * LEASE)
        self.assertEqual(4, len(self.records('b')))
        self.b.receive_claim(mid, 'a')
        self.assertEqual([mid], list(self.b._leases))
        self.wait_rolled_back(mid, LEASE + MARGIN)
        self.assert_nothing_left(mid, answer)


class TestExpiryRacingComplete(LeaseFixture):
    """The lease expiring while the destination completes: never half."""

    def hold_until_expiring(self, mid):
        """Hold the receive's lock until the lease timer has decided."""
        rcv = self.b._receives[mid]
        rcv._lock.acquire()
        self.addCleanup(lambda: rcv._lock._is_owned() and
                        rcv._lock.release())
        self.wait_for('the lease to run out', lambda: not self.b._leases or
                      self.b._leases[mid].expiring, timeout=LEASE + MARGIN)
        self.assertTrue(self.b._leases[mid].expiring)
        return rcv

    def test_complete_first_wins(self):
        mid, answer = self.prepare()
        self.b.receive_compose(mid)
        rcv = self.hold_until_expiring(mid)
        # the lease timer now waits for the receive's lock; complete
        # (this thread holds the lock) goes first
        result = self.b.receive_complete(mid, None)
        rcv._lock.release()
        self.wait_for('the lease to be dropped', lambda: not self.b._leases)
        self.assertEqual('done', self.b.receive_status(mid)['phase'])
        self.assertIsNone(self.b.receive_status(mid)['expired'])
        # committed: the composed VDIs stay, nothing else
        records = self.records('b')
        self.assertEqual(sorted(result['vdis'].values()),
                         sorted(r[0] for r in records if not r[2]))
        self.assertEqual([], self.left('b'))
        self.assertEqual([], self.b.host.journal.unfinished())
        self.assertEqual(0, self.b.active())
        self.assertRaises(ConnectionRefusedError, socket.create_connection,
                          (answer['host'], answer['port']), 2)
        self.assertEqual('committed', self.b.receive_abort(mid))
        self.assertEqual({'lease_timeout': None}, self.b.receive_renew(mid))

    def test_lease_first_wins(self):
        mid, answer = self.prepare()
        self.b.receive_compose(mid)
        rcv = self.hold_until_expiring(mid)
        # a renewal now is refused: the roll-back is decided
        self.assertRaises(errors.LeaseExpired, self.b.receive_renew, mid)
        outcome = {}

        def complete():
            try:
                outcome['result'] = self.b.receive_complete(mid, None)
            except Exception as exc:
                outcome['error'] = exc
        # the expiry thread waits for the lock; let it in first, then
        # complete
        rcv._lock.release()
        self.wait_rolled_back(mid, MARGIN)
        thread = threading.Thread(target=complete)
        thread.start()
        thread.join(10)
        self.assertNotIn('result', outcome)
        self.assertIsInstance(outcome['error'], errors.LeaseExpired)
        self.assert_nothing_left(mid, answer)

    def test_both_at_once_end_in_one_whole_state(self):
        mid, answer = self.prepare()
        self.b.receive_compose(mid)
        rcv = self.hold_until_expiring(mid)
        outcome = {}

        def complete():
            try:
                outcome['result'] = self.b.receive_complete(mid, None)
            except errors.LeaseExpired as exc:
                outcome['error'] = exc
        thread = threading.Thread(target=complete)
        thread.start()
        time.sleep(0.05)                # both wait for the lock now
        rcv._lock.release()
        thread.join(10)
        self.wait_for('the lease to be dropped', lambda: not self.b._leases)
        phase = self.b.receive_status(mid)['phase']
        if 'result' in outcome:
            self.assertEqual('done', phase)
            self.assertEqual(sorted(outcome['result']['vdis'].values()),
                             sorted(r[0] for r in self.records('b')
                                    if not r[2]))
            self.assertEqual('committed', self.b.receive_abort(mid))
        else:
            self.assertIn('error', outcome)
            self.assertEqual('aborted', phase)
            self.assert_nothing_left(mid, answer)
        self.assertEqual([], self.b.host.journal.unfinished())
        self.assertEqual([], self.left('b'))


class TestSourceRenews(LeaseFixture):

    def test_a_migration_renews_its_lease_until_it_is_done(self):
        vm = self.make_vm()
        # slow enough to outlast the lease several times
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'}, bandwidth=1 * MiB)
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertGreater(time.time() - status['started'], 2 * LEASE)
        self.assertGreaterEqual(self.peer.renewals, 6)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])
        self.assertEqual({}, self.b._leases)
        self.assertEqual([], self.left('b'))
        # the renewer has stopped
        renewals = self.peer.renewals
        time.sleep(LEASE)
        self.assertEqual(renewals, self.peer.renewals)
        self.assertFalse([t for t in threading.enumerate()
                          if t.name.startswith('xsm-renew-')])

    def test_failed_renewals_alone_do_not_abort(self):
        # The destination's lease is long: the renewals fail, the lease
        # holds, the migration goes on.
        self.b.options.receive_lease_timeout = 60
        self.peer.cut.set()
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'}, bandwidth=2 * MiB)
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertGreater(self.peer.failed, 1)
        self.assertEqual(0, self.peer.renewals)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_slow_renewals_keep_the_lease(self):
        # every answer takes more than the renewal interval (a slow bus),
        # yet comes within the lease
        self.peer.delay = 0.6 * LEASE
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'}, bandwidth=512 * 1024)
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertGreater(time.time() - status['started'], 3 * LEASE)
        self.assertGreaterEqual(self.peer.renewals, 3)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])

    def test_a_source_cut_off_too_long_aborts_with_the_reason(self):
        vm = self.make_vm()
        before = self.records('a')
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'}, bandwidth=512 * 1024)
        self.wait_for('the copy', lambda: self.a.get(mid)['phase'] == 'copy')
        self.assertGreater(self.peer.renewals, 0)
        self.peer.cut.set()
        self.wait_for('the destination to roll back',
                      lambda: self.b.receive_status(mid)['phase'] ==
                      'aborted', timeout=LEASE + MARGIN)
        self.peer.cut.clear()           # the source comes back
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertIn('migration %s aborted: destination host b rolled back '
                      'its receive after' % mid, status['error'])
        self.assertIn('without a lease renewal from the source',
                      status['error'])
        # the VM stays here, its data intact, its chains as before
        self.assertEqual(before, self.records('a'))
        self.assertEqual('running', self.a.host.vm(vm.uuid).power_state)
        result = self.a.host.guest_verify(vm.uuid)
        self.assertTrue(result['verified'], result)
        self.assertEqual([], self.left('a'))
        self.assertEqual([], self.records('b'))
        self.assertEqual([], self.left('b'))
        self.assertEqual(0, self.b.active())
        self.assertEqual([], self.a.host.journal.unfinished())
        self.assertEqual([], self.b.host.journal.unfinished())

    def test_a_destination_without_leases_is_not_renewed(self):
        # a destination older than API 1.2: its peer has no renew
        class OldPeer(test_manager.DirectPeer):
            renew = None

        peer = OldPeer(self.b)
        self.a._peer_factory = lambda name: peer
        self.b.options.receive_lease_timeout = 0
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])


class TestRecovery(LeaseFixture):

    def test_a_restarted_destination_rolls_back_what_it_received(self):
        # Manager.recover rolls back every receive before its
        # switch-over: a lease has nothing to wait for after a restart.
        mid, answer = self.prepare()
        rcv = self.b._receives[mid]
        self.b.shutdown()               # stops the lease, keeps the receive
        self.assertEqual({}, self.b._leases)
        # the process ends: its server and open images go
        rcv._stop_server()
        for _sr, rec in rcv._receivers.values():
            rec.base.close()
            rec.leaf.close()
        # and starts again, on the same state and SR
        host = host_mod.Host.from_config(
            'b', ['sr-b:vhd:%s' % self.b.host.sr('sr-b').path],
            self.b.host.state_path)
        self.addCleanup(host.close)
        restarted = manager_mod.Manager(
            host, options=manager_mod.Options(receive_lease_timeout=LEASE))
        self.addCleanup(restarted.shutdown)
        outcomes = restarted.recover()
        self.assertIn((mid, 'destination', 'aborted'), outcomes)
        self.assertEqual([], [v for v in host.sr('sr-b').list()])
        self.assertEqual([], self.left('b'))
        self.assertEqual({}, restarted._leases)
        exc = self.assertRaises(errors.MigrationAborted,
                                restarted.receive_renew, mid)
        self.assertIn('already rolled it back', str(exc))


class TestRenewArguments(LeaseFixture):
    """The RPC endpoint checks what a renewal and a request carry."""

    def call(self, method, **kwargs):
        """Call the endpoint as oslo.messaging does; raise its error."""
        try:
            return getattr(agent_mod.AgentEndpoint(self.b), method)(
                {}, **kwargs)
        except messaging.ExpectedException as exc:
            raise exc.exc_info[1]

    def test_checked_arguments(self):
        exc = self.assertRaises(arguments.InvalidArgument,
                                self.call, 'receive_renew', migration=42)
        self.assertIn('RPC call receive_renew: argument migration must be',
                      str(exc))
        vm = self.make_vm()
        begun = self.begin(vm)
        self.addCleanup(self.a.abort, begun['id'])
        request = dict(begun['request'], renews='yes')
        exc = self.assertRaises(arguments.InvalidArgument,
                                self.call, 'receive_prepare',
                                spec=request)
        self.assertIn('spec.renews must be a JSON boolean', str(exc))
        self.assertEqual([], self.records('b'))
        exc = self.assertRaises(arguments.InvalidArgument,
                                self.call, 'migrate_vm', vm=vm.uuid,
                                dest_host='b', vdi_map=self.vdi_map(vm),
                                options={'receive_lease_timeout': -1})
        self.assertIn('option receive_lease_timeout', str(exc))
        mid = begun['id']
        self.b.receive_prepare(dict(begun['request']))
        self.assertEqual({'lease_timeout': LEASE},
                         self.call('receive_renew', migration=mid))
        self.assertEqual('aborted',
                         self.call('receive_abort', migration=mid))
