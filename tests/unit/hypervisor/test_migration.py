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

"""The qemu driver's live-migration decisions and files, without QEMU."""

import fractions
import math
import os
import stat
import warnings

from cryptography.hazmat.primitives import serialization

from tests import base
from xsm_driver.core.block import device
from xsm_driver.core.block import filters
from xsm_driver.core.migration import host as host_mod
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.hypervisor import qemu


class TestMigrationStep(base.TestCase):

    def test_source_waits_for_pre_switchover(self):
        want = 'pre-switchover'
        for status in ('setup', 'active', 'device', 'wait-unplug'):
            self.assertEqual(qemu.WAIT, qemu.migration_step(status, want))
        self.assertEqual(qemu.SWITCH,
                         qemu.migration_step('pre-switchover', want))
        self.assertEqual(qemu.DONE, qemu.migration_step('completed', want))
        for status in ('failed', 'cancelled', 'cancelling', 'none'):
            self.assertEqual(qemu.FAILED, qemu.migration_step(status, want))

    def test_waiting_for_completion(self):
        want = 'completed'
        # the destination's QEMU says 'none' until the stream begins
        for status in ('none', 'setup', 'active', 'pre-switchover'):
            self.assertEqual(qemu.WAIT, qemu.migration_step(status, want))
        self.assertEqual(qemu.DONE, qemu.migration_step('completed', want))
        self.assertEqual(qemu.FAILED, qemu.migration_step('failed', want))


class TestCommandLine(base.TestCase):

    def argv(self, incoming=False, size=None):
        spec = hv_base.GuestSpec('vm-1', [hv_base.DiskSpec(
            'd0', socket='/s/d0.sock', export='xvda', size=size)])
        return qemu.command_line('q', spec, qemu.Paths('/g/vm-1'), 'tcg',
                                 'k', 'i', 64, paused=incoming,
                                 incoming=incoming)

    def test_incoming_defer_and_paused(self):
        argv = self.argv(incoming=True)
        at = argv.index('-incoming')
        self.assertEqual('defer', argv[at + 1])
        self.assertIn('-S', argv)
        self.assertNotIn('-incoming', self.argv())

    def test_geometry_from_the_size_spares_qemu_a_read(self):
        device = [a for a in self.argv(size=16 << 20)
                  if a.startswith('virtio-blk-pci')][0]
        self.assertIn(',cyls=32,heads=16,secs=63', device)
        device = [a for a in self.argv() if a.startswith('virtio-blk-pci')]
        self.assertNotIn('cyls=', device[0])

    def test_chs_within_qemus_bounds(self):
        for size in (0, 512, 1 << 20, 16 << 20, 1 << 30, 1 << 42):
            cyls, heads, secs = qemu.chs(size)
            self.assertTrue(1 <= cyls <= 65535)
            self.assertEqual((16, 63), (heads, secs))


class TestTLSFiles(base.TestCase):

    def test_ca_bundle_has_the_peers_ca_then_ours(self):
        bundle = qemu.tls_ca_bundle(b'PEER\n', 'OWN')
        self.assertEqual('PEER\nOWN\n', bundle)
        self.assertEqual('PEER\n', qemu.tls_ca_bundle('PEER'))

    def test_folder_in_qemus_layout_key_private(self):
        tmp = self.make_tempdir()
        cert, key = os.path.join(tmp, 'cert.pem'), os.path.join(tmp, 'k')
        for path, data in ((cert, b'CERT'), (key, b'KEY')):
            with open(path, 'wb') as f:
                f.write(data)
        folder = qemu.write_tls_dir(os.path.join(tmp, 'tls'), 'client',
                                    'CA', cert, key)
        self.assertEqual(['ca-cert.pem', 'client-cert.pem',
                          'client-key.pem'], sorted(os.listdir(folder)))
        self.assertEqual(0o700, stat.S_IMODE(os.stat(folder).st_mode))
        self.assertEqual(0o600, stat.S_IMODE(os.stat(
            os.path.join(folder, 'client-key.pem')).st_mode))
        with open(os.path.join(folder, 'client-key.pem'), 'rb') as f:
            self.assertEqual(b'KEY', f.read())
        server = qemu.write_tls_dir(os.path.join(tmp, 'srv'), 'server',
                                    'CA', cert, key)
        self.assertEqual(['ca-cert.pem', 'dh-params.pem', 'server-cert.pem',
                          'server-key.pem'], sorted(os.listdir(server)))
        with open(os.path.join(server, 'dh-params.pem'), 'rb') as f:
            self.assertEqual(qemu.FFDHE2048_PEM, f.read())

    def test_dh_params_are_rfc7919_ffdhe2048(self):
        with warnings.catch_warnings():     # cryptography: FFDH deprecated
            warnings.simplefilter('ignore')
            numbers = serialization.load_pem_parameters(
                qemu.FFDHE2048_PEM).parameter_numbers()
        # RFC 7919 appendix A.1: g = 2 and p = 2^2048 - 2^1984 +
        # (floor(2^1918 * e) + 560316) * 2^64 - 1 (e from its series)
        e = sum(fractions.Fraction(1, math.factorial(k)) for k in range(400))
        middle = math.floor(2 ** 1918 * e) + 560316
        self.assertEqual(2, numbers.g)
        self.assertEqual(2 ** 2048 - 2 ** 1984 + middle * 2 ** 64 - 1,
                         numbers.p)


class TestHeldDisk(base.TestCase):
    """An incoming guest's disk before the commit."""

    def test_held_refuses_io_and_keeps_its_size(self):
        held = host_mod.Held(1 << 20, 'xvda')
        self.assertEqual(1 << 20, held.size)
        self.assertTrue(held.can_flush and held.can_write)
        for call in (lambda: held.pread(0, 512),
                     lambda: held.pwrite(b'x', 0), held.flush):
            self.assertRaises(device.BlockError, call)

    def test_release_held_lets_a_waiting_request_fail(self):
        gate = filters.Gate(host_mod.Held(4096))
        gate.pause()
        host_mod.release_held(gate)
        self.assertFalse(gate.paused)
        self.assertRaises(device.BlockError, gate.flush)
        host_mod.release_held(gate)          # not paused: nothing to do
        host_mod.release_held(None)

    def test_readopt_action(self):
        self.assertEqual(host_mod.READOPT,
                         host_mod.readopt_action(True, False))
        self.assertEqual(host_mod.KILL_ORPHAN,
                         host_mod.readopt_action(False, False))
        self.assertEqual(host_mod.KILL_ORPHAN,
                         host_mod.readopt_action(False, True))
        self.assertEqual(host_mod.KILL_MIGRATING,
                         host_mod.readopt_action(True, True))

    def test_uses_qemu_and_guest_spec(self):
        self.assertTrue(host_mod.uses_qemu('qemu'))
        self.assertFalse(host_mod.uses_qemu('model'))
        spec = host_mod.guest_spec('vm-1', [], {'memory_mib': 96,
                                                'verifier': {'rate': 5}})
        self.assertEqual((96, 1, {'rate': 5}),
                         (spec.memory_mib, spec.vcpus, spec.verifier))
        # a record without a firmware is of a guest that ran SeaBIOS
        self.assertEqual('seabios', spec.firmware)
        self.assertEqual('qboot', host_mod.guest_spec(
            'vm-1', [], {'firmware': 'qboot'}).firmware)

    def test_a_cold_boot_sets_the_firmware_a_record_lacks(self):
        self.assertEqual({'firmware': 'qboot'},
                         host_mod.cold_boot_options(None))
        record = {'vcpus': 2}
        self.assertEqual({'vcpus': 2, 'firmware': 'qboot'},
                         host_mod.cold_boot_options(record))
        self.assertEqual({'vcpus': 2}, record)          # a copy
        self.assertEqual({'firmware': 'seabios'},
                         host_mod.cold_boot_options({'firmware': 'seabios'}))
