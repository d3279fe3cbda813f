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
import shutil
import socket
import subprocess
import time

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.unit.xenapi import fixtures as xfix
from tests import xenapi_fake as fake
from xsm_driver.core.block import device
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.nbd import constants as nbd_c
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.sr import vhd as vhd_sr
from xsm_driver.core.xenapi import coldcopy
from xsm_driver.core.xenapi import errors

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

    def test_certificate_for_another_host_is_refused(self):
        # the right certificate, but the export claims another subject
        self.a.nbd_info[self.vdi] = [dict(self.info, subject='xs-a2')]
        status = self.wait(self.engine.migrate_vdi(
            self.uuid(self.a, 'VDI', self.vdi), 'backup'))
        self.assertEqual('aborted', status['phase'])
        self.assertIn("Hostname mismatch", status['error'])
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


class TestColdCopyFromXapiNBD(xfix.PoolsTestCase):
    """The copy from a server exactly as narrow as xapi-nbd.

    xapi-nbd knows no NBD_OPT_GO, structured replies or block status
    (xapi-project/nbd lib/server.ml): the engine chooses the export with
    NBD_OPT_EXPORT_NAME, reads every block and writes only the data.
    """

    def setUp(self):
        super().setUp()
        self.remote_sr = vhd_sr.VHDSR('remote', self.make_tempdir())
        vhd = self.remote_sr.create(32 * MiB, name='data')
        with self.remote_sr.attach(vhd.uuid, writable=True) as dev:
            dev.pwrite(b'\x5a' * MiB, 3 * MiB)
            dev.pwrite(b'\xa5' * 4096, 30 * MiB)
            dev.flush()
        self.export = self.remote_sr.attach(vhd.uuid)
        self.addCleanup(self.export.close)
        self.want = digest(self.export)
        self.cert, (cert_file, key_file) = self_signed(self.make_tempdir())
        self.tls = tls.server_context(cert_file, key_file)
        self.vdi = self.a.add_vdi(self.sr_a, 'data', 32 * MiB, 4 * MiB)
        self.a.add_vm('cold-3', [self.vdi], power_state='Halted')
        self.vdi_uuid = uuid_of(self.a, self.vdi)
        self.name = '/%s?session_id=OpaqueRef:secret-session' % self.vdi_uuid
        self.local = vhd_sr.VHDSR('backup', self.make_tempdir())

    def serve(self, tls_context):
        server = fake.XapiNBDServer({self.name: self.export},
                                    tls_context=tls_context).start()
        self.addCleanup(server.stop)
        self.a.nbd_info[self.vdi] = [{
            'address': '127.0.0.1', 'port': server.address[1],
            'cert': self.cert, 'exportname': self.name, 'subject': 'xs-a1'}]
        return server

    def test_copy_over_tls_is_bit_for_bit_and_sparse(self):
        server = self.serve(self.tls)
        self.engine = engine = self.make_engine(
            local_srs={'backup': self.local})
        status = self.wait(engine.migrate_vdi(self.vdi_uuid, 'backup'))
        self.assertEqual('done', status['phase'], status['error'])
        new = status['result']['vdis'][self.vdi_uuid]
        with self.local.attach(new) as dev:
            self.assertEqual(self.want, digest(dev))
        # every block was read: xapi-nbd has no block status ...
        self.assertEqual(32 * MiB, status['progress']['total'])
        self.assertIn(nbd_c.NBD_OPT_EXPORT_NAME, server.options_seen)
        # ... and only the two 2 MiB blocks holding data were written
        self.assertLessEqual(self.local.get(new).allocated, 2 * 2 * MiB)

    def test_insecure_nbd_network_is_refused_clearly(self):
        self.serve(None)                    # xapi-nbd without TLS
        self.engine = engine = self.make_engine(
            local_srs={'backup': self.local})
        status = self.wait(engine.migrate_vdi(self.vdi_uuid, 'backup'))
        self.assertEqual('aborted', status['phase'])
        self.assertIn('insecure_nbd', status['error'])
        self.assertIn('allow_insecure_nbd', status['error'])
        self.assertIn(self.vdi_uuid, status['error'])
        self.assertNotIn('secret-session', status['error'])
        self.assertEqual([], self.local.list())

    def test_insecure_nbd_network_when_allowed(self):
        self.serve(None)
        self.engine = engine = self.make_engine(
            local_srs={'backup': self.local}, allow_insecure_nbd=True)
        status = self.wait(engine.migrate_vdi(self.vdi_uuid, 'backup'))
        self.assertEqual('done', status['phase'], status['error'])
        new = status['result']['vdis'][self.vdi_uuid]
        with self.local.attach(new) as dev:
            self.assertEqual(self.want, digest(dev))


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

    def test_only_the_runs_holding_data_are_written(self):
        writes = []

        class Dev(device.BlockDevice):
            size = 1 << 20
            name = 'mem'

            def pread(self, offset, length):
                return bytes(length)

            def pwrite(self, data, offset, fua=False):
                writes.append((offset, len(data)))

        k = 1024
        data = bytearray(256 * k)
        data[10 * k] = 1                    # disk [64 KiB, 128 KiB)
        data[-70 * k] = 2                   # disk [192 KiB, 256 KiB) ...
        data[-1] = 3                        # ... and [256 KiB, 320 KiB)
        coldcopy.SkipZeros(Dev()).pwrite(memoryview(data), 64 * k)
        # pieces aligned on the disk; neighbouring ones written at once
        self.assertEqual([(64 * k, 64 * k), (192 * k, 128 * k)], writes)
        del writes[:]
        coldcopy.SkipZeros(Dev()).pwrite(bytes(256 * k), 0)
        self.assertEqual([], writes)


class TestColdCopyFromAnExportWithoutHoles(xfix.PoolsTestCase):
    """nbdkit, with TLS, as an NBD export that reports every block as data.

    xapi's NBD servers differ in what they report: this one (nbdkit's
    ``noextents`` filter) says everything is allocated, so the copy reads
    the whole disk -- and must still write only the data.
    """

    def setUp(self):
        super().setUp()
        nbdkit = self.require_command('nbdkit')
        folder = self.make_tempdir()
        self.image = os.path.join(folder, 'disk.raw')
        with open(self.image, 'wb') as f:
            f.truncate(48 * MiB)
            for i, offset in enumerate((MiB + 512, 20 * MiB, 47 * MiB)):
                f.seek(offset)
                f.write(bytes([0x40 + i]) * (MiB // 2))
        with open(self.image, 'rb') as f:
            self.want = hashlib.sha256(f.read()).hexdigest()
        certs = self.make_tempdir()
        cert, (cert_file, key_file) = self_signed(certs)
        # nbdkit's GnuTLS wants these names; the host cert is its own CA
        shutil.copy(cert_file, os.path.join(certs, 'server-cert.pem'))
        shutil.copy(cert_file, os.path.join(certs, 'ca-cert.pem'))
        shutil.copy(key_file, os.path.join(certs, 'server-key.pem'))
        port = closed_port()
        log = open(os.path.join(folder, 'nbdkit.log'), 'wb')
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [nbdkit, '-f', '--exit-with-parent', '-i', '127.0.0.1',
             '-p', str(port), '--tls=require',
             '--tls-certificates=%s' % certs, '--filter=noextents',
             'file', self.image], stdout=log, stderr=log)
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.terminate)
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), 1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    with open(log.name) as f:
                        self.fail('nbdkit did not start: %s' % f.read())
                time.sleep(0.05)
        self.vdi = self.a.add_vdi(self.sr_a, 'backup-me', 48 * MiB, 48 * MiB)
        self.a.add_vm('cold-2', [self.vdi], power_state='Halted')
        self.a.nbd_info[self.vdi] = [{
            'address': '127.0.0.1', 'port': port, 'cert': cert,
            'exportname': '/%s?session_id=OpaqueRef:s' % uuid_of(
                self.a, self.vdi), 'subject': 'xs-a1'}]
        self.local = vhd_sr.VHDSR('backup', self.make_tempdir())
        self.engine = self.make_engine(local_srs={'backup': self.local})

    def test_copy_is_bit_for_bit_and_sparse(self):
        vdi_uuid = uuid_of(self.a, self.vdi)
        status = self.wait(self.engine.migrate_vdi(vdi_uuid, 'backup'))
        self.assertEqual('done', status['phase'], status['error'])
        new = status['result']['vdis'][vdi_uuid]
        with self.local.attach(new) as dev:
            self.assertEqual(self.want, digest(dev))
        # every block was read (the server hides its holes) ...
        self.assertEqual(48 * MiB, status['progress']['total'])
        # ... but only the three 2 MiB blocks holding data were written
        self.assertLessEqual(self.local.get(new).allocated, 3 * 2 * MiB)
        self.assertLess(self.local.get(new).physical, 8 * MiB)


def uuid_of(pool, ref):
    return pool.get('VDI', ref)['uuid']
