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

"""A VDI copied out of a pool through its NBD export, bit for bit.

xapi's NBD export is played by our own NBD server with TLS, serving a
real VHD, behind the address, port, certificate, export name and subject
that the fake pool's ``VDI.get_nbd_info`` returns -- as xapi does, with a
self-signed host certificate and an export name that carries a session.
"""

import datetime
import hashlib
import ipaddress
import os
import socket

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography import x509
from cryptography.x509.oid import NameOID

from xsm_driver.core.block import device
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.sr import vhd as vhd_sr
from xsm_driver.core.xenapi import coldcopy
from xsm_driver.core.xenapi import engine as engine_mod
from xsm_driver.core.xenapi import errors
from xsm_driver.tests.unit.xenapi import fixtures as xfix

MiB = 1 << 20


def self_signed(directory, name='xs-a1'):
    """A host certificate like xapi's: self-signed, for ``name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name),
                x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    paths = (os.path.join(directory, 'cert.pem'),
             os.path.join(directory, 'key.pem'))
    with open(paths[0], 'wb') as f:
        f.write(pem)
    with open(paths[1], 'wb') as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return pem.decode(), paths


def digest(dev):
    h = hashlib.sha256()
    for offset in range(0, dev.size, 4 * MiB):
        h.update(dev.pread(offset, min(4 * MiB, dev.size - offset)))
    return h.hexdigest()


def closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class TestColdCopy(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        # the "pool's" storage: a real VHD with scattered data
        self.remote_sr = vhd_sr.VHDSR('remote', self.make_tempdir())
        self.vhd = self.remote_sr.create(64 * MiB, name='data')
        dev = self.remote_sr.attach(self.vhd.uuid, writable=True)
        for i, offset in enumerate((0, 9 * MiB + 512, 40 * MiB,
                                    63 * MiB + 4096)):
            dev.pwrite(bytes([i + 1]) * (3 * MiB // 2
                                         if offset < 60 * MiB else 4096),
                       offset)
        dev.flush()
        dev.close()
        self.vhd = self.remote_sr.get(self.vhd.uuid)
        self.export = self.remote_sr.attach(self.vhd.uuid)
        self.addCleanup(self.export.close)
        self.want = digest(self.export)
        # xapi's NBD server, played by ours with TLS
        cert, (cert_file, key_file) = self_signed(self.make_tempdir())
        self.session = 'OpaqueRef:%s' % self.vhd.uuid
        name = '/%s?session_id=%s' % (self.vhd.uuid, self.session)
        self.nbd = nbd_server.Server(
            {name: self.export}, tls_context=tls.server_context(
                cert_file, key_file)).start()
        self.addCleanup(self.nbd.stop)
        # the VDI in the fake pool: a halted VM's disk
        self.vdi = self.a.add_vdi(self.sr_a, 'data', 64 * MiB,
                                  self.vhd.allocated)
        self.a.add_vm('cold-1', [self.vdi], power_state='Halted')
        self.info = {'address': '127.0.0.1', 'port': self.nbd.address[1],
                     'cert': cert, 'exportname': name, 'subject': 'xs-a1'}
        self.a.nbd_info[self.vdi] = [
            dict(self.info, port=closed_port()), self.info]
        self.local = vhd_sr.VHDSR('backup', self.make_tempdir())
        self.engine = self.make_engine(local_srs={'backup': self.local})

    def test_copy_is_bit_for_bit_and_sparse(self):
        vdi_uuid = self.uuid(self.a, 'VDI', self.vdi)
        mid = self.engine.migrate_vdi(vdi_uuid, 'backup')
        status = self.wait(mid)
        self.assertEqual('done', status['phase'], status['error'])
        new = status['result']['vdis'][vdi_uuid]
        copy = self.local.get(new)
        self.assertEqual('data', copy.name)
        with self.local.attach(new) as dev:
            self.assertEqual(self.want, digest(dev))
        # sparse: only the allocated blocks were read and written
        written = 3 * (3 * MiB // 2) + 4096
        self.assertLessEqual(copy.allocated, self.vhd.allocated)
        self.assertEqual(written, status['progress']['total'])
        self.assertLess(copy.physical, 16 * MiB)
        self.assertEqual(status['progress']['done'],
                         status['progress']['total'])
        self.assertLess(status['progress']['total'], 16 * MiB)
        # the session in the export name never shows
        self.assertNotIn(self.session, str(status))

    def test_running_vm_disk_is_refused(self):
        exc = self.assertRaises(errors.XenAPIError, self.engine.migrate_vdi,
                                self.uuid(self.a, 'VDI', self.disk0),
                                'backup')
        self.assertIn('snapshot', str(exc))
        self.assertEqual([], self.local.list())

    def test_wrong_certificate_is_refused(self):
        other, _paths = self_signed(self.make_tempdir())
        self.a.nbd_info[self.vdi] = [dict(self.info, cert=other)]
        status = self.wait(self.engine.migrate_vdi(
            self.uuid(self.a, 'VDI', self.vdi), 'backup'))
        self.assertEqual('aborted', status['phase'])
        self.assertIn('CERTIFICATE_VERIFY_FAILED', status['error'])
        self.assertNotIn(self.session, status['error'])
        self.assertEqual([], self.local.list())

    def test_no_nbd_network(self):
        self.a.nbd_info[self.vdi] = []
        status = self.wait(self.engine.migrate_vdi(
            self.uuid(self.a, 'VDI', self.vdi), 'backup'))
        self.assertIn('purpose', status['error'])

    def test_abort_removes_the_partial_copy(self):
        mid = self.engine.migrate_vdi(self.uuid(self.a, 'VDI', self.vdi),
                                      'backup', bandwidth=2 * MiB)
        self.wait_for(lambda: self.engine.get(mid)['bytes_copied'] > 0,
                      what='some data')
        self.engine.abort(mid)
        status = self.wait(mid)
        self.assertEqual('aborted', status['phase'])
        self.assertEqual([], self.local.list())

    def test_space_is_checked_first(self):
        self.a.get('VDI', self.vdi)['physical_utilisation'] = 1 << 60
        self.assertRaises(mig_errors.InsufficientSpace,
                          self.engine.migrate_vdi,
                          self.uuid(self.a, 'VDI', self.vdi), 'backup')


class TestSkipZeros(xfix.base.TestCase):

    def test_zero_writes_are_dropped(self):
        writes = []

        class Dev(device.BlockDevice):
            size = 8192
            name = 'mem'

            def pread(self, offset, length):
                return bytes(length)

            def pwrite(self, data, offset, fua=False):
                writes.append((offset, bytes(data)))

        dst = coldcopy.SkipZeros(Dev())
        dst.pwrite(bytes(4096), 0)
        dst.pwrite(b'\0' * 4095 + b'x', 4096)
        self.assertEqual([4096], [o for o, _d in writes])

    def test_task_result_module_is_importable(self):
        self.assertTrue(engine_mod.ColdCopy)
