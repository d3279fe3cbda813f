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

"""The destination's exports: several one-shot base names per VDI."""

import errno
import json
import logging
import os
import threading
import time
import uuid as uuidlib

import fixtures

from tests import base
from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import source
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.sr import base as sr_base

MiB = 1 << 20


def server_threads():
    """The NBD server threads alive in this process.

    (Not the client's: of this test's clients, or of another test's in
    this process.)
    """
    return [t.name for t in threading.enumerate()
            if t.name.startswith('xsm-nbd-') and
            t.name not in nbd_client.THREADS]


class TestCopyConnections(base.TestCase):

    def test_what_the_source_asks_within_bounds(self):
        self.assertEqual(1, destination.copy_connections(None))
        self.assertEqual(4, destination.copy_connections(4))
        self.assertEqual(1, destination.copy_connections(0))
        self.assertEqual(1, destination.copy_connections(-3))
        self.assertEqual(destination.MAX_COPY_CONNECTIONS,
                         destination.copy_connections(10 ** 6))
        self.assertEqual(1, destination.copy_connections('many'))
        self.assertEqual(1, destination.copy_connections([2]))

    def test_source_picks_at_most_what_is_offered_and_needed(self):
        names = {'base': 'a', 'bases': ['a', 'b', 'c'], 'leaf': 'l'}
        self.assertEqual(['a', 'b', 'c'], source.copy_exports(names, 4, 100))
        self.assertEqual(['a', 'b'], source.copy_exports(names, 2, 100))
        self.assertEqual(['a'], source.copy_exports(names, 4, 1))
        self.assertEqual(['a'], source.copy_exports(names, 4, 0))
        # a destination that offers a single base name
        self.assertEqual(['a'], source.copy_exports({'base': 'a',
                                                     'leaf': 'l'}, 4, 9))


class ReceiveCase(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.top = self.make_tempdir()
        self.host = host_mod.Host.from_config(
            'dest', ['sr-b:vhd:%s' % os.path.join(self.top, 'sr-b')],
            os.path.join(self.top, 'state'))
        self.addCleanup(self.host.close)
        self.client = credentials.Credentials.make(
            os.path.join(self.top, 'client'), 'client')
        self.logs = self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))


class TestReceiveExports(ReceiveCase):

    def receive(self, connections, vdis=1):
        spec = {'id': str(uuidlib.uuid4()), 'source_host': 'src', 'vm': None,
                'vif_map': {}, 'cross_pool': False, 'network': None,
                'client_ca_pem': self.client.ca_pem,
                'vdis': [{'uuid': str(uuidlib.uuid4()), 'size': 4 * MiB,
                          'allocated': 0, 'name': 'd%d' % i, 'sr': 'sr-b',
                          'mirror': True} for i in range(vdis)]}
        if connections is not None:
            spec['copy_connections'] = connections
        rec = destination.Receive(self.host, spec, '127.0.0.1')
        self.addCleanup(rec.abort)
        return rec, rec.prepare()

    def connect(self, remote, name):
        dev = nbd_device.NBDDevice.connect(
            remote['host'], remote['port'], name, timeout=10,
            tls_context=self.client.client_context(remote['server_ca_pem']),
            label='test')
        self.addCleanup(dev.close)
        return dev

    def test_one_unguessable_name_per_connection_each_once(self):
        rec, remote = self.receive(3, vdis=2)
        all_names = []
        for src, names in remote['exports'].items():
            self.assertEqual(3, len(names['bases']))
            self.assertEqual(names['base'], names['bases'][0])
            all_names += names['bases'] + [names['leaf']]
        self.assertEqual(len(all_names), len(set(all_names)))
        for name in all_names:
            self.assertGreaterEqual(len(name), 32)
        names = next(iter(remote['exports'].values()))
        devs = [self.connect(remote, n) for n in names['bases']]
        # all of them write the same base
        devs[1].pwrite(b'\x5a' * 4096, 8192)
        devs[2].flush()
        self.assertEqual(b'\x5a' * 4096, bytes(devs[0].pread(8192, 4096)))
        # a replayed name is refused, even while its first user is on
        for name in names['bases']:
            self.assertRaises(device.BlockError, self.connect, remote,
                              name)
        # the secrets appear in no log line of the server, at any level
        for name in all_names:
            self.assertNotIn(name, self.logs.output)

    def test_a_source_that_asks_nothing_gets_one_base_name(self):
        rec, remote = self.receive(None)
        names = next(iter(remote['exports'].values()))
        self.assertEqual([names['base']], names['bases'])

    def test_abort_closes_every_connection(self):
        rec, remote = self.receive(4)
        names = next(iter(remote['exports'].values()))
        devs = [self.connect(remote, n) for n in names['bases']]
        server = rec._server
        self.assertEqual(4, server.connections)
        self.assertEqual('aborted', rec.abort())
        self.assertEqual(0, server.connections)
        self.assertEqual([], self.host.sr('sr-b').list())
        for dev in devs:
            self.assertRaises(device.BlockError, dev.pwrite, b'x' * 512,
                              0)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and server_threads():
            time.sleep(0.02)
        self.assertEqual([], server_threads())


class TestIncomingStart(ReceiveCase):
    """A QEMU guest's incoming QEMU: started during the copy when asked.

    (The host's QEMU part is replaced here: this is the order of the
    receive's steps; tests/functional/core/migration/test_qemu_migration.py
    runs it with real QEMU.)
    """

    def setUp(self):
        super().setUp()
        # this host runs QEMU guests
        self.useFixture(fixtures.MockPatchObject(host_mod.Host, 'qemu',
                                                 object()))
        self.release = threading.Event()
        self.events = []
        self.start_error = None

        def prepare_incoming(record, sizes, address, tls=None):
            self.events.append('start')
            self.assertTrue(self.release.wait(10))
            if self.start_error is not None:
                raise self.start_error
            self.events.append('started')
            return {'host': address, 'port': 4444}

        def discard_incoming(uuid):
            self.events.append('discard')
        self.host.prepare_incoming = prepare_incoming
        self.host.discard_incoming = discard_incoming

    def receive_vm(self, incoming_at):
        vdi = str(uuidlib.uuid4())
        spec = {'id': str(uuidlib.uuid4()), 'source_host': 'src',
                'vif_map': {}, 'cross_pool': False, 'network': None,
                'client_ca_pem': self.client.ca_pem, 'guest': 'qemu',
                'vm': {'uuid': str(uuidlib.uuid4()), 'vifs': [],
                       'disks': [{'name': 'xvda', 'vdi': vdi}]},
                'vdis': [{'uuid': vdi, 'size': 4 * MiB, 'allocated': 0,
                          'name': 'xvda', 'sr': 'sr-b', 'mirror': True}]}
        if incoming_at:
            spec['incoming_at'] = incoming_at
        rec = destination.Receive(self.host, spec, '127.0.0.1')
        self.addCleanup(rec.abort)
        self.addCleanup(self.release.set)
        return rec

    def test_started_during_the_copy_its_address_in_composes_answer(self):
        rec = self.receive_vm(destination.INCOMING_AT_COMPOSE)
        answer = rec.prepare()          # returns while QEMU still starts
        self.assertEqual(destination.INCOMING_AT_COMPOSE,
                         answer['incoming_at'])
        self.assertNotIn('incoming', answer)
        self.assertEqual(['start'], self.events)
        self.release.set()
        self.assertEqual({'incoming': {'host': '127.0.0.1', 'port': 4444}},
                         rec.compose())

    def test_a_source_that_does_not_ask_gets_it_from_prepare(self):
        rec = self.receive_vm(None)
        self.release.set()
        answer = rec.prepare()
        self.assertEqual({'host': '127.0.0.1', 'port': 4444},
                         answer['incoming'])
        self.assertIsNone(rec.compose())

    def test_an_abort_discards_a_qemu_still_starting_once_started(self):
        rec = self.receive_vm(destination.INCOMING_AT_COMPOSE)
        rec.prepare()
        threading.Timer(0.3, self.release.set).start()
        self.assertEqual('aborted', rec.abort())
        self.assertEqual(['start', 'started', 'discard'], self.events)

    def test_a_start_that_failed_fails_compose_naming_it(self):
        self.start_error = RuntimeError('qemu: no such machine q99')
        rec = self.receive_vm(destination.INCOMING_AT_COMPOSE)
        rec.prepare()
        self.release.set()
        exc = self.assertRaises(destination.errors.MigrationError,
                                rec.compose)
        self.assertIn('did not start: qemu: no such machine q99', str(exc))
        self.assertIn('host dest', str(exc))


class TestCommitSettlesAfterItsAnswer(ReceiveCase):
    """The commit answers before ``done`` is recorded.

    ``complete`` answers once the commit record is durable and the disks
    composed; ``done`` is recorded after the answer, once what the compose
    wrote is durable (none of it in the source's pause).
    """

    receive = TestReceiveExports.receive

    def hold_settling(self):
        """Make each ``make_durable`` wait until the returned Event."""
        go = threading.Event()
        entered = threading.Event()
        real = sr_base.Receiver.make_durable

        def make_durable(rcv):
            entered.set()
            self.assertTrue(go.wait(30))
            return real(rcv)
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.sr.base.Receiver.make_durable', make_durable))
        self.addCleanup(go.set)
        return go, entered

    def phase(self, rec):
        return self.host.journal.get(rec.id, role=destination.ROLE)

    def test_done_is_recorded_after_the_answer(self):
        rec, _remote = self.receive(2, vdis=2)
        rec.compose()
        go, entered = self.hold_settling()
        answer = rec.complete(None)
        self.assertEqual({'vdis', 'vm', 'steps_ms'}, set(answer))
        self.assertNotIn('done_record', answer['steps_ms'])
        entry = self.phase(rec)
        # committed, durably; not done yet: a restart now goes forward
        self.assertEqual('switch-over', entry.phase)
        self.assertTrue(entry.state['committed'])
        self.assertTrue(entered.wait(30))
        self.assertTrue(rec.committed)
        # asked again meanwhile: the same result, once settled
        again = []
        asker = threading.Thread(target=lambda: again.append(
            rec.complete(None)))
        asker.start()
        time.sleep(0.05)
        self.assertEqual([], again)         # (waits for the settling)
        go.set()
        asker.join(30)
        rec.wait_settled(30)
        entry = self.phase(rec)
        self.assertEqual('done', entry.phase)
        self.assertEqual({k: answer[k] for k in ('vdis', 'vm')},
                         entry.state['result'])
        self.assertEqual([{k: answer[k] for k in ('vdis', 'vm')}],
                         [{k: a[k] for k in ('vdis', 'vm')} for a in again])
        # the composed VDIs read as normal VDIs of the SR
        sr = self.host.sr('sr-b')
        for vdi in answer['vdis'].values():
            self.assertFalse(sr.get(vdi).hidden)
        self.assertEqual(destination.COMMITTED, rec.abort())

    def test_an_abort_while_settling_answers_committed(self):
        rec, _remote = self.receive(1)
        rec.compose()
        go, entered = self.hold_settling()
        rec.complete(None)
        self.assertTrue(entered.wait(30))
        answers = []
        aborter = threading.Thread(target=lambda: answers.append(
            rec.abort()))
        aborter.start()
        go.set()
        aborter.join(30)
        self.assertEqual([destination.COMMITTED], answers)
        rec.wait_settled(30)
        self.assertEqual('done', self.phase(rec).phase)

    def test_commit_shuts_the_exports_off_and_stops_the_server_later(self):
        rec, remote = self.receive(1)
        names = next(iter(remote['exports'].values()))
        leaf = TestReceiveExports.connect(self, remote, names['leaf'])
        leaf.pwrite(b'\x11' * 4096, 0)
        rec.compose()
        server = rec._server
        # the settling (which stops the server) waits for the test
        go, entered = threading.Event(), threading.Event()
        real = destination.Receive._stop_server

        def stop_server(receive):
            entered.set()
            self.assertTrue(go.wait(30))
            return real(receive)
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.migration.destination.Receive._stop_server',
            stop_server))
        self.addCleanup(go.set)
        answer = rec.complete(None)
        self.assertIn('exports_seal', answer['steps_ms'])
        self.assertNotIn('server_stop', answer['steps_ms'])
        # answered with the mirror's connection still open: a write on it
        # now is refused, clearly, and lands nowhere
        self.assertEqual(1, server.connections)
        err = self.assertRaises(device.BlockError, leaf.pwrite,
                                b'\x22' * 4096, 0)
        self.assertEqual(errno.ESHUTDOWN, err.errno)
        self.assertTrue(entered.wait(30))
        go.set()
        rec.wait_settled(30)
        # the server stopped after the answer, every thread of it ended
        self.assertIsNone(rec._server)
        self.assertEqual(0, server.connections)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and server_threads():
            time.sleep(0.02)
        self.assertEqual([], server_threads())
        self.assertEqual('done', self.phase(rec).phase)
        vdi = next(iter(answer['vdis'].values()))
        dev = self.host.sr('sr-b').attach(vdi)
        self.addCleanup(dev.close)
        self.assertEqual(b'\x11' * 4096, bytes(dev.pread(0, 4096)))

    def test_a_write_inside_at_the_commit_lands_before_the_compose(self):
        rec, remote = self.receive(1)
        names = next(iter(remote['exports'].values()))
        leaf = TestReceiveExports.connect(self, remote, names['leaf'])
        rec.compose()
        (_sr, rcv), = rec._receivers.values()
        inside, release = threading.Event(), threading.Event()
        real = rcv.leaf.pwrite

        def slow_pwrite(data, offset, fua=False):
            inside.set()
            self.assertTrue(release.wait(30))
            return real(data, offset, fua)
        rcv.leaf.pwrite = slow_pwrite
        writer = threading.Thread(target=leaf.pwrite,
                                  args=(b'\x33' * 4096, 8192))
        writer.start()
        self.addCleanup(writer.join, 30)
        self.addCleanup(release.set)
        self.assertTrue(inside.wait(30))
        answers = []
        committer = threading.Thread(target=lambda: answers.append(
            rec.complete(None)))
        committer.start()
        time.sleep(0.2)
        # committed, durably; the compose waits for the write inside
        self.assertTrue(self.phase(rec).state['committed'])
        self.assertEqual([], answers)
        release.set()
        committer.join(30)
        writer.join(30)
        rec.wait_settled(30)
        vdi = next(iter(answers[0]['vdis'].values()))
        dev = self.host.sr('sr-b').attach(vdi)
        self.addCleanup(dev.close)
        self.assertEqual(b'\x33' * 4096, bytes(dev.pread(8192, 4096)))

    def test_the_vm_record_is_saved_before_done(self):
        vm_uuid = str(uuidlib.uuid4())
        spec = {'id': str(uuidlib.uuid4()), 'source_host': 'src',
                'vif_map': {}, 'cross_pool': True, 'network': None,
                'client_ca_pem': self.client.ca_pem,
                'vdis': [{'uuid': str(uuidlib.uuid4()), 'size': 4 * MiB,
                          'allocated': 0, 'name': 'd0', 'sr': 'sr-b',
                          'mirror': True}]}
        record = {'uuid': vm_uuid, 'name': 'moved', 'vifs': [],
                  'disks': [{'name': 'xvda', 'vdi': spec['vdis'][0]['uuid'],
                             'sr': 'sr-a'}]}
        spec['vm'] = record
        rec = destination.Receive(self.host, spec, '127.0.0.1')
        self.addCleanup(rec.abort)
        rec.prepare()
        rec.compose()
        go, entered = self.hold_settling()
        vms_file = os.path.join(self.top, 'state', 'vms.json')

        def saved():
            if not os.path.exists(vms_file):
                return []
            with open(vms_file) as f:
                return [v['uuid'] for v in json.load(f)]
        answer = rec.complete({'vm': record, 'power_state': 'halted',
                               'workload': None})
        self.assertEqual(vm_uuid, answer['vm'])
        # registered here, its record not written yet (a restart adopts
        # it again from the commit record)
        self.assertIn(vm_uuid, self.host.vms)
        self.assertNotIn(vm_uuid, saved())
        self.assertTrue(entered.wait(30))
        go.set()
        rec.wait_settled(30)
        self.assertEqual('done', self.phase(rec).phase)
        self.assertIn(vm_uuid, saved())
