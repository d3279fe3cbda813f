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

import os

from tests import base
from xsm_driver.core import exception
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod

MiB = 1 << 20


class TestHost(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.top = self.make_tempdir()
        self.host = self.make_host()

    def make_host(self):
        host = host_mod.Host.from_config(
            'h1', ['v:vhd:%s' % os.path.join(self.top, 'v'),
                   'r:raw:%s' % os.path.join(self.top, 'r')],
            os.path.join(self.top, 'state'))
        self.addCleanup(host.close)
        return host

    def test_sr_specs_are_checked(self):
        for bad in ('nocolons', 'a:vhd', ':vhd:/x', 'a::/x'):
            exc = self.assertRaises(exception.XSMError,
                                    host_mod.parse_sr_spec, bad)
            self.assertIn(repr(bad), str(exc))
        self.assertEqual(('a', 'vhd', '/x:y'),
                         host_mod.parse_sr_spec('a:vhd:/x:y'))

    def test_unknown_sr_and_vm_are_named(self):
        exc = self.assertRaises(host_mod.SRNotFound, self.host.sr, 'nope')
        self.assertIn('nope', str(exc))
        self.assertIn('r, v', str(exc))
        exc = self.assertRaises(host_mod.VMNotFound, self.host.vm, 'ghost')
        self.assertIn('ghost', str(exc))

    def test_vm_life_cycle_snapshots_and_guest(self):
        vm = self.host.create_vm('vm1', [{'sr': 'v', 'size': 4 * MiB},
                                         {'sr': 'r', 'size': 2 * MiB}],
                                 vifs=['net0'])
        self.assertEqual(['xvda', 'xvdb'], [d.name for d in vm.disks])
        self.assertIs(vm, self.host.vm('vm1'))
        self.host.start_vm(vm.uuid)
        self.host.guest_start(vm.uuid, rate=500, fill=0.5)
        sr = self.host.sr('v')
        # a raw disk has no snapshots: none of the disks is snapshotted
        exc = self.assertRaises(exception.XSMError, self.host.snapshot_vm,
                                vm.uuid)
        self.assertIn('xvdb', str(exc))
        self.assertEqual(1, len(sr.chain(vm.disks[0].vdi)))
        result = self.host.guest_verify(vm.uuid)
        self.assertTrue(result['verified'], result)
        self.assertEqual(6 * MiB, result['bytes_verified'])
        # records survive the host; a running VM comes back halted
        again = self.make_host()
        self.assertEqual('halted', again.vm('vm1').power_state)
        self.assertEqual([d.to_dict() for d in vm.disks],
                         [d.to_dict() for d in again.vm('vm1').disks])
        self.host.destroy_vm(vm.uuid)
        self.assertEqual([], sr.list())
        self.assertEqual([], self.host.sr('r').list())
        self.assertRaises(host_mod.VMNotFound, self.make_host().vm, 'vm1')

    def test_live_snapshot_grows_the_chain_and_keeps_the_data(self):
        vm = self.host.create_vm('vm2', [{'sr': 'v', 'size': 4 * MiB}])
        self.host.start_vm(vm.uuid)
        self.host.guest_start(vm.uuid, rate=1000, fill=0.5)
        for depth in (2, 3):
            bases = self.host.snapshot_vm(vm.uuid)
            self.assertEqual(1, len(bases))
            self.assertEqual(depth, len(self.host.sr('v').chain(
                vm.disks[0].vdi)))
        self.assertTrue(self.host.guest_verify(vm.uuid)['verified'])
        self.host.destroy_vm(vm.uuid)
        self.assertEqual([], self.host.sr('v').list())

    def test_guest_needs_a_running_vm(self):
        vm = self.host.create_vm('vm3', [{'sr': 'v', 'size': 2 * MiB}])
        exc = self.assertRaises(host_mod.InvalidVMState,
                                self.host.guest_start, vm.uuid)
        self.assertIn('halted', str(exc))

    def test_a_failed_create_leaves_no_disk(self):
        self.assertRaises(host_mod.SRNotFound, self.host.create_vm, 'vm4',
                          [{'sr': 'v', 'size': 2 * MiB},
                           {'sr': 'missing', 'size': 2 * MiB}])
        self.assertEqual([], self.host.sr('v').list())

    def test_close_stops_the_guest_and_releases_the_files(self):
        vm = self.host.create_vm('vm5', [{'sr': 'v', 'size': 2 * MiB}])
        self.host.start_vm(vm.uuid)
        self.host.guest_start(vm.uuid, rate=1000)
        guest = vm.workload
        threads = list(guest._threads)
        self.assertTrue(guest.running)
        self.host.close()
        self.assertFalse(guest.running)
        self.assertEqual([False], [t.is_alive() for t in threads])
        self.assertIsNone(vm.disks[0].counter)
        exc = self.assertRaises(errors.JournalError, self.host.journal.list)
        self.assertIn('the journal is closed', str(exc))
        self.host.close()                   # a second time does nothing
        # the records were left as they were: it comes back halted
        self.assertEqual('halted', self.make_host().vm('vm5').power_state)
