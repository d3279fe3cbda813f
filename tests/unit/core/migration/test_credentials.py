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

"""Per-migration TLS credentials: each side trusts only the peer's CA."""

import os
import ssl
import stat

from cryptography import x509

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.migration import credentials
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
Credentials = credentials.Credentials


class CredentialsTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def make(self, name, role, hosts=('127.0.0.1',)):
        creds = Credentials.make(os.path.join(self.dir, name), role, hosts)
        self.addCleanup(creds.destroy)
        return creds

    def test_files_and_modes(self):
        creds = self.make('m1/server', 'server', ['10.0.0.5', 'host-a'])
        self.assertEqual(0o700, stat.S_IMODE(os.stat(creds.directory)
                                             .st_mode))
        self.assertEqual(0o600, stat.S_IMODE(os.stat(creds.key_file)
                                             .st_mode))
        self.assertTrue(creds.ca_pem.startswith('-----BEGIN CERTIFICATE'))
        self.assertIsInstance(creds.ca_pem, str)
        # The CA key is never written: the CA signs one certificate only.
        self.assertEqual(['ca-cert.pem', 'cert.pem', 'key.pem', 'role'],
                         sorted(os.listdir(creds.directory)))
        with open(creds.cert_file, 'rb') as f:
            cert_pem = f.read()
        self.assertEqual(tls.fingerprint(cert_pem), creds.fingerprint)
        self.assertEqual(32, len(creds.fingerprint.split(':')))
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(creds.ca_pem.encode())
        self.assertEqual(ca.subject, cert.issuer)
        alt = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(['host-a'], alt.get_values_for_type(x509.DNSName))

    def test_each_migration_has_its_own_ca(self):
        a, b = self.make('a', 'server'), self.make('b', 'server')
        self.assertNotEqual(a.ca_pem, b.ca_pem)
        self.assertNotEqual(a.fingerprint, b.fingerprint)

    def test_load(self):
        creds = self.make('m1', 'client')
        again = Credentials.load(creds.directory)
        self.assertEqual((creds.role, creds.ca_pem, creds.fingerprint),
                         (again.role, again.ca_pem, again.fingerprint))

    def test_destroy_is_idempotent(self):
        creds = self.make('m1', 'client')
        creds.destroy()
        self.assertFalse(os.path.exists(creds.directory))
        creds.destroy()

    def test_roles(self):
        self.assertRaises(ValueError, Credentials.make,
                          os.path.join(self.dir, 'x'), 'peer', ())
        server, client = self.make('s', 'server'), self.make('c', 'client')
        self.assertRaises(ValueError, server.client_context, client.ca_pem)
        self.assertRaises(ValueError, client.server_context, server.ca_pem)

    def test_contexts_are_tls13_with_peer_verification(self):
        server, client = self.make('s', 'server'), self.make('c', 'client')
        sctx = server.server_context(client.ca_pem)
        cctx = client.client_context(server.ca_pem)
        for ctx in (sctx, cctx):
            self.assertEqual(ssl.TLSVersion.TLSv1_3, ctx.minimum_version)
            self.assertEqual(ssl.CERT_REQUIRED, ctx.verify_mode)
        self.assertFalse(cctx.check_hostname)


class MutualTLSTest(base.TestCase):
    """Both sides over a real NBD export."""

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        path = os.path.join(self.dir, 'disk.vhd')
        ops.create(path, 8 * MiB)
        self.disk = backends.VHDDevice(path, writable=True)
        self.addCleanup(self.disk.close)
        self.server_creds = self.make('m1-dst', 'server')
        self.client_creds = self.make('m1-src', 'client')
        self.server = nbd_server.Server(
            {'m1': self.disk}, list_exports=False,
            tls_context=self.server_creds.server_context(
                self.client_creds.ca_pem))
        self.server.start()
        self.addCleanup(self.server.stop)

    def make(self, name, role):
        creds = Credentials.make(os.path.join(self.dir, name), role,
                                 ['127.0.0.1'])
        self.addCleanup(creds.destroy)
        return creds

    def connect(self, tls_context):
        dev = nbd_device.NBDDevice.connect(*self.server.address,
                                           export='m1', timeout=10,
                                           tls_context=tls_context)
        self.addCleanup(dev.close)
        return dev

    def test_the_two_sides_talk(self):
        dev = self.connect(self.client_creds.client_context(
            self.server_creds.ca_pem))
        dev.pwrite(b'migrate me' * 100, 4096)
        dev.flush()
        self.assertEqual(b'migrate me' * 100, bytes(dev.pread(4096, 1000)))
        self.assertEqual(b'migrate me' * 100,
                         bytes(self.disk.pread(4096, 1000)))

    def test_client_of_another_migration_is_refused(self):
        other = self.make('m2-src', 'client')
        self.assertRaises(device.BlockError, self.connect,
                          other.client_context(self.server_creds.ca_pem))

    def test_server_of_another_migration_is_not_trusted(self):
        other = self.make('m2-dst', 'server')
        err = self.assertRaises(device.BlockError, self.connect,
                                self.client_creds.client_context(
                                    other.ca_pem))
        self.assertIn('CERTIFICATE_VERIFY_FAILED', str(err))

    def test_client_without_certificate_is_refused(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=self.server_creds.ca_pem)
        self.assertRaises(device.BlockError, self.connect, ctx)

    def test_plain_client_is_refused(self):
        self.assertRaises(device.BlockError, self.connect, None)
