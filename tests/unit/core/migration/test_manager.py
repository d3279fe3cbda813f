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

"""The manager's API for a receive prepared ahead (Nova's order).

Two hosts with real VHD SRs in a temporary folder, each with its manager;
the source reaches the destination's manager directly (no RPC: the same
over RabbitMQ is in functional/core/migration/test_rabbit_prepared.py),
and the disks cross real mutual-TLS NBD connections on loopback.
"""

import doctest
import json
import os
import shutil
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core import exception
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import plan

MiB = 1 << 20


def load_tests(loader, tests, pattern):
    tests.addTests(doctest.DocTestSuite(manager_mod))
    return tests


class DirectPeer(manager_mod.LocalPeer):
    """The other host's destination role, called directly."""

    def preflight(self, spec):
        return self._m.receive_preflight(spec)


class ManagerFixture(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.top = self.make_tempdir()
        self.managers = {}
        for name in ('a', 'b'):
            sr_path = os.path.join(self.top, name, 'sr')
            host = host_mod.Host.from_config(
                name, ['sr-%s:vhd:%s' % (name, sr_path)],
                os.path.join(self.top, name, 'state'))
            self.addCleanup(host.close)
            mgr = manager_mod.Manager(
                host, peer_factory=lambda n: DirectPeer(self.managers[n]),
                options=manager_mod.Options(chunk=1 * MiB,
                                            leaf_headroom=1 * MiB,
                                            **self.options(name)))
            self.addCleanup(mgr.shutdown)
            self.managers[name] = mgr
        self.a, self.b = self.managers['a'], self.managers['b']

    def options(self, name):
        return {}

    def make_vm(self, sizes=(4 * MiB, 6 * MiB)):
        host = self.a.host
        vm = host.create_vm('vm', [{'sr': 'sr-a', 'size': s}
                                   for s in sizes], ['net0'])
        host.start_vm(vm.uuid)
        host.guest_start(vm.uuid, rate=200, fill=0.5)
        return vm

    def vdi_map(self, vm):
        return {d.vdi: 'sr-b' for d in vm.disks}

    def begin(self, vm, timeout=None):
        return self.a.migrate_vm_begin(vm.uuid, 'b', self.vdi_map(vm),
                                       {'net0': 'net0'},
                                       prepared_timeout=timeout)

    def wait(self, mid, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.a.get(mid)
            if status.get('finished') is not None:
                return status
            time.sleep(0.02)
        self.fail('migration %s did not end within %s s' % (mid, timeout))

    def wait_for(self, what, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail('timed out waiting for %s' % what)
            time.sleep(0.02)

    def left(self, name):
        """Files left in a host's per-migration folder."""
        top = os.path.join(self.managers[name].host.state_path, 'migrations')
        return sorted(os.path.relpath(os.path.join(d, n), top)
                      for d, dirs, files in os.walk(top)
                      for n in dirs + files)

    def records(self, name):
        return sorted((v.uuid, v.parent, v.hidden, v.size)
                      for sr in self.managers[name].host.srs.values()
                      for v in sr.list())


class TestPreparedAhead(ManagerFixture):

    def test_the_migration_runs_on_the_receive_prepared_ahead(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        mid, request = begun['id'], begun['request']
        # the request holds the client's CA (public), and nothing secret
        self.assertIn('BEGIN CERTIFICATE', request['client_ca_pem'])
        self.assertEqual(mid, request['id'])
        self.assertEqual('a', request['source_host'])
        self.assertEqual(set(self.vdi_map(vm)),
                         {v['uuid'] for v in request['vdis']})
        self.assertNotIn('PRIVATE KEY', json.dumps(request))
        self.assertEqual(['%s/source' % mid] + [
            '%s/source/%s' % (mid, n) for n in
            ('ca-cert.pem', 'cert.pem', 'key.pem', 'role')],
            [p for p in self.left('a') if p != mid])
        self.assertEqual([], self.records('b'))

        receive = self.b.receive_prepare_ahead(request)
        self.assertEqual(300.0, receive['prepared_timeout'])   # the default
        self.assertEqual('127.0.0.1', receive['host'])
        self.assertGreater(receive['port'], 0)
        self.assertRegex(receive['fingerprint'], r'^([0-9A-F]{2}:){31}'
                         r'[0-9A-F]{2}$')
        self.assertEqual(set(self.vdi_map(vm)), set(receive['exports']))
        self.assertEqual(4, len(self.records('b')))    # base + leaf each
        self.assertEqual(1, self.b.active())

        started = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                    {'net0': 'net0'}, migration_id=mid,
                                    receive=receive)
        self.assertEqual(mid, started)
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertGreater(status['bytes_copied'], 0)
        self.assertGreater(status['guest_writes_during_migration'], 0)
        self.assertEqual({}, self.a.host.vms)
        self.assertEqual([], self.records('a'))
        result = self.b.host.guest_verify(vm.uuid)
        self.assertTrue(result['verified'], result)
        self.assertEqual(10 * MiB, result['bytes_verified'])
        self.assertEqual([], self.left('a'))
        self.assertEqual([], self.left('b'))
        self.assertEqual('done', self.b.receive_status(mid)['phase'])
        # claimed: nothing expires it any more, nothing can claim it again
        self.assertEqual({}, self.b._unclaimed)
        self.assertRaises(errors.InvalidPhase, self.b.receive_claim, mid,
                          'a')

    def test_a_receive_is_claimed_once_and_by_its_source_only(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        mid = begun['id']
        self.b.receive_prepare_ahead(begun['request'])
        exc = self.assertRaises(errors.InvalidPhase, self.b.receive_claim,
                                mid, 'c')
        self.assertIn('prepared for host a, not for host c', str(exc))
        self.b.receive_claim(mid, 'a')
        exc = self.assertRaises(errors.InvalidPhase, self.b.receive_claim,
                                mid, 'a')
        self.assertIn('claimed already', str(exc))
        self.assertEqual('aborted', self.b.receive_abort(mid))

    def test_a_second_start_with_the_same_id_is_refused(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        receive = self.b.receive_prepare_ahead(begun['request'])
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'},
                                migration_id=begun['id'], receive=receive)
        # at once, while the VM is still here
        exc = self.assertRaises(
            errors.InvalidPhase, self.a.migrate_vm, vm.uuid, 'b',
            self.vdi_map(vm), migration_id=mid, receive=receive)
        self.assertIn('no begun migration', str(exc))
        self.assertEqual('done', self.wait(mid)['phase'])

    def test_an_unclaimed_receive_is_rolled_back_after_its_timeout(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        mid = begun['id']
        receive = self.b.receive_prepare_ahead(begun['request'],
                                               prepared_timeout=0.3)
        self.assertEqual(0.3, receive['prepared_timeout'])
        self.assertNotEqual([], self.records('b'))
        self.wait_for('the receive to expire',
                      lambda: self.b.receive_status(mid)['phase'] ==
                      'aborted')
        self.assertEqual([], self.records('b'))
        self.assertEqual([], self.left('b'))
        self.assertEqual(0, self.b.active())
        # the source comes too late: refused, and its side is clean
        before = self.records('a')
        exc = self.assertRaises(
            errors.MigrationError, self._start_and_wait, vm, mid, receive)
        self.assertIn('timed out', str(exc))
        self.assertEqual(before, self.records('a'))
        self.assertEqual([], self.left('a'))
        self.assertEqual('running', self.a.host.vm(vm.uuid).power_state)
        self.assertTrue(self.a.host.guest_verify(vm.uuid)['verified'])

    def _start_and_wait(self, vm, mid, receive):
        self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm), {'net0': 'net0'},
                          migration_id=mid, receive=receive)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        raise errors.MigrationError(status['error'])

    def test_a_begun_migration_is_dropped_after_its_timeout(self):
        vm = self.make_vm()
        begun = self.begin(vm, timeout=0.2)
        mid = begun['id']
        self.wait_for('the begun migration to expire',
                      lambda: self.left('a') == [])
        self.wait_for('its journal entry to end', lambda: self.a.host.
                      journal.get(mid, role='source').phase == 'aborted')
        exc = self.assertRaises(
            errors.InvalidPhase, self.a.migrate_vm, vm.uuid, 'b',
            self.vdi_map(vm), migration_id=mid, receive={'exports': {}})
        self.assertIn('longer than its timeout', str(exc))

    def test_abort_drops_a_begun_migration(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        status = self.a.abort(begun['id'])
        self.assertEqual('aborted', status['phase'])
        self.assertEqual([], self.left('a'))
        self.assertRaises(errors.MigrationNotFound, self.a.abort,
                          begun['id'])

    def test_a_receive_that_does_not_fit_is_refused_and_rolled_back(self):
        vm = self.make_vm()
        before = self.records('a')
        begun = self.begin(vm)
        receive = self.b.receive_prepare_ahead(begun['request'])
        wrong = dict(receive, exports=dict(receive['exports']))
        missing = sorted(wrong['exports'])[0]
        del wrong['exports'][missing]
        exc = self.assertRaises(
            errors.MigrationError, self.a.migrate_vm, vm.uuid, 'b',
            self.vdi_map(vm), {'net0': 'net0'}, migration_id=begun['id'],
            receive=wrong)
        self.assertIn('no exports for VDI %s' % missing, str(exc))
        # nothing is left of it, on either host
        self.assertEqual([], self.records('b'))
        self.assertEqual([], self.left('b'))
        self.assertEqual({}, self.b._unclaimed)
        self.assertEqual(before, self.records('a'))
        self.assertEqual([], self.left('a'))
        self.assertEqual('aborted', self.a.host.journal.get(
            begun['id'], role='source').phase)

    def test_the_id_and_the_receive_go_together(self):
        vm = self.make_vm()
        exc = self.assertRaises(errors.MigrationError, self.a.migrate_vm,
                                vm.uuid, 'b', self.vdi_map(vm),
                                migration_id='m1')
        self.assertIn('got only the id', str(exc))

    def test_rollback_cancels_the_expiry(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        mid = begun['id']
        self.b.receive_prepare_ahead(begun['request'])
        self.assertEqual('aborted', self.b.receive_abort(mid))
        self.assertEqual({}, self.b._unclaimed)
        self.assertEqual([], self.records('b'))
        self.assertRaises(errors.InvalidPhase, self.b.receive_claim, mid,
                          'a')

    def test_shutdown_rolls_back_what_waits(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        self.b.receive_prepare_ahead(begun['request'])
        self.a.shutdown()
        self.b.shutdown()
        self.assertEqual([], self.records('b'))
        self.assertEqual([], self.left('a'))
        self.assertEqual([], self.left('b'))

    def test_the_old_order_still_works(self):
        vm = self.make_vm()
        mid = self.a.migrate_vm(vm.uuid, 'b', self.vdi_map(vm),
                                {'net0': 'net0'})
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual({}, self.b._unclaimed)
        self.assertTrue(self.b.host.guest_verify(vm.uuid)['verified'])


class TestConcurrency(ManagerFixture):

    def options(self, name):
        return {'max_concurrent': 1}

    def test_the_prepared_receive_does_not_count_against_itself(self):
        vm = self.make_vm()
        begun = self.begin(vm)
        request = begun['request']
        self.b.receive_prepare_ahead(request)
        self.assertEqual(1, self.b.active())
        self.b.receive_preflight(request)         # its own: passes
        other = dict(request, id='another')
        self.assertRaises(errors.TooManyMigrations,
                          self.b.receive_preflight, other)
        self.assertRaises(errors.TooManyMigrations,
                          self.b.receive_prepare_ahead, other)
        self.assertEqual(4, len(self.records('b')))
        self.b.receive_abort(begun['id'])
        self.a.abort(begun['id'])


class TestCheckReceive(base.TestCase):

    GOOD = {'host': 'h', 'port': 10809, 'server_ca_pem': 'PEM',
            'exports': {'v1': {'base': 'b1', 'leaf': 'l1'},
                        'v2': {'base': 'b2', 'bases': ['b2', 'b3'],
                               'leaf': 'l2'}}}

    def test_a_receive_that_fits(self):
        manager_mod.check_receive('m', self.GOOD, ['v1', 'v2'])

    def test_every_problem_is_named(self):
        bad = dict(self.GOOD, port=None, exports={
            'v1': {'base': 'b1'}, 'v3': {'base': 'b', 'leaf': 'l'}})
        exc = self.assertRaises(errors.MigrationError,
                                manager_mod.check_receive, 'm', bad,
                                ['v1', 'v2'])
        self.assertEqual(
            'migration m: the receive prepared ahead does not fit: it has '
            'no port; it has no exports for VDI v1, v2; it has exports for '
            'VDI v3, which does not move', str(exc))


class TestImportImage(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.top = self.make_tempdir()
        self.host = host_mod.Host.from_config(
            'h', ['v:vhd:%s' % os.path.join(self.top, 'v'),
                  'r:raw:%s' % os.path.join(self.top, 'r')],
            os.path.join(self.top, 'state'))
        self.addCleanup(self.host.close)

    def image(self, data, name='image.raw'):
        folder = manager_mod.image_folder(self.host)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    def read(self, sr, vdi, length):
        dev = self.host.sr(sr).attach(vdi)
        try:
            return bytes(dev.pread(0, length)), dev.size
        finally:
            dev.close()

    def test_raw_image_into_a_vhd_vdi(self):
        data = (b'\x00' * MiB + os.urandom(MiB + 1000) + b'\x00' * (3 * MiB)
                + b'tail')
        vdi = self.host.sr('v').create(16 * MiB).uuid
        result = manager_mod.import_image(self.host, vdi, self.image(data),
                                          'raw', chunk=MiB)
        self.assertEqual(len(data), result['size'])
        # the zero chunks were not written
        self.assertLess(result['written'], 4 * MiB)
        got, size = self.read('v', vdi, 16 * MiB)
        self.assertEqual(16 * MiB, size)
        self.assertEqual(data + bytes(16 * MiB - len(data)), got)
        allocated = self.host.sr('v').get(vdi).allocated
        self.assertLess(allocated, 8 * MiB)

    def test_vhd_image_into_a_raw_vdi(self):
        data = os.urandom(3 * MiB)
        image = self.host.sr('v').create(4 * MiB)
        dev = self.host.sr('v').attach(image.uuid, writable=True)
        dev.pwrite(data, MiB)
        dev.close()
        vdi = self.host.sr('r').create(8 * MiB).uuid
        path = self.image(b'', name='image.vhd')
        shutil.copyfile(self.host.sr('v').vdi_path(image.uuid), path)
        result = manager_mod.import_image(self.host, vdi, path, 'vhd')
        self.assertEqual(4 * MiB, result['size'])
        self.assertEqual(3 * MiB, result['written'])
        got, _size = self.read('r', vdi, 8 * MiB)
        self.assertEqual(bytes(MiB) + data + bytes(4 * MiB), got)

    def test_an_image_larger_than_the_vdi_is_refused(self):
        vdi = self.host.sr('v').create(2 * MiB).uuid
        path = self.image(b'x' * (3 * MiB))
        exc = self.assertRaises(exception.XSMError,
                                manager_mod.import_image, self.host, vdi,
                                path, 'raw')
        self.assertIn('image %s is %d bytes, larger than VDI %s of SR v'
                      % (path, 3 * MiB, vdi), str(exc))
        self.assertEqual(bytes(2 * MiB), self.read('v', vdi, 2 * MiB)[0])

    def test_unknown_format_and_missing_file(self):
        vdi = self.host.sr('v').create(2 * MiB).uuid
        exc = self.assertRaises(exception.XSMError,
                                manager_mod.import_image, self.host, vdi,
                                self.image(b'x'), 'qcow2')
        self.assertIn("disk format 'qcow2' cannot be written into VDI %s"
                      % vdi, str(exc))
        missing = os.path.join(manager_mod.image_folder(self.host),
                               'nothing')
        exc = self.assertRaises(exception.XSMError,
                                manager_mod.import_image, self.host, vdi,
                                missing, 'raw')
        self.assertIn('image %s (raw) cannot be read' % missing, str(exc))

    def test_only_files_of_the_image_folder_are_read(self):
        vdi = self.host.sr('v').create(2 * MiB).uuid
        outside = os.path.join(self.top, 'secret')
        with open(outside, 'wb') as f:
            f.write(b'not for the message bus')
        link = self.image(b'', name='link.raw')
        os.unlink(link)
        os.symlink(outside, link)
        for path in (outside, link, os.path.join(
                manager_mod.image_folder(self.host), '..', 'secret')):
            exc = self.assertRaises(exception.XSMError,
                                    manager_mod.import_image, self.host,
                                    vdi, path, 'raw')
            self.assertIn('is not in %s' % os.path.realpath(
                manager_mod.image_folder(self.host)), str(exc))
        self.assertEqual(bytes(2 * MiB), self.read('v', vdi, 2 * MiB)[0])

    def test_split_extents_skips_holes_of_a_sparse_image(self):
        # what import_image relies on: a sparse raw file's holes are not
        # read at all
        path = os.path.join(self.top, 'sparse.raw')
        with open(path, 'wb') as f:
            f.truncate(64 * MiB)
            f.seek(32 * MiB)
            f.write(b'data')
        dev = backends.RawDevice(path)
        try:
            ranges = plan.split_extents(dev.extents(0, dev.size), MiB)
        finally:
            dev.close()
        self.assertLessEqual(sum(n for _o, n in ranges), 4 * MiB)
