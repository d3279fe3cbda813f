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

"""TLS credentials and mutual authentication."""

import os
import socket
import ssl
import stat
import threading

from cryptography import x509

from tests import base
from xsm_driver.core.nbd import tls


class TLSTest(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.files = tls.make_credentials(self.dir)

    def handshake(self, server_ctx, client_ctx):
        """Run a TLS handshake over a socket pair; return both outcomes."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        outcome = {}

        def serve():
            try:
                conn = server_ctx.wrap_socket(a, server_side=True)
                outcome['server'] = conn.recv(5)
                conn.sendall(b'hello')
                outcome['version'] = conn.version()
            except (ssl.SSLError, OSError) as exc:
                outcome['server'] = exc
                a.close()

        t = threading.Thread(target=serve)
        t.start()
        try:
            conn = client_ctx.wrap_socket(b, server_hostname='localhost')
            conn.sendall(b'howdy')
            outcome['client'] = conn.recv(5)
        except (ssl.SSLError, OSError) as exc:
            outcome['client'] = exc
        t.join(10)
        return outcome

    def test_files_as_qemu_reads_them(self):
        for name in (tls.CA_CERT, tls.SERVER_CERT, tls.SERVER_KEY,
                     tls.CLIENT_CERT, tls.CLIENT_KEY):
            self.assertTrue(os.path.isfile(os.path.join(self.dir, name)))
        mode = stat.S_IMODE(os.stat(self.files[tls.SERVER_KEY]).st_mode)
        self.assertEqual(0o600, mode)
        with open(self.files[tls.SERVER_CERT], 'rb') as f:
            cert = x509.load_pem_x509_certificate(f.read())
        alt = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(['localhost'], alt.get_values_for_type(x509.DNSName))
        self.assertEqual('127.0.0.1', str(alt.get_values_for_type(
            x509.IPAddress)[0]))

    def test_mutual_authentication_tls13(self):
        f = self.files
        outcome = self.handshake(
            tls.server_context(f[tls.SERVER_CERT], f[tls.SERVER_KEY],
                               f[tls.CA_CERT]),
            tls.client_context(f[tls.CA_CERT], f[tls.CLIENT_CERT],
                               f[tls.CLIENT_KEY]))
        self.assertEqual(b'howdy', outcome['server'])
        self.assertEqual(b'hello', outcome['client'])
        self.assertEqual('TLSv1.3', outcome['version'])

    def test_client_without_certificate_is_refused(self):
        f = self.files
        outcome = self.handshake(
            tls.server_context(f[tls.SERVER_CERT], f[tls.SERVER_KEY],
                               f[tls.CA_CERT]),
            tls.client_context(f[tls.CA_CERT]))
        self.assertIsInstance(outcome['server'], (ssl.SSLError, OSError))

    def test_client_of_another_ca_is_refused(self):
        f = self.files
        other = tls.make_credentials(os.path.join(self.dir, 'other'))
        outcome = self.handshake(
            tls.server_context(f[tls.SERVER_CERT], f[tls.SERVER_KEY],
                               f[tls.CA_CERT]),
            tls.client_context(f[tls.CA_CERT], other[tls.CLIENT_CERT],
                               other[tls.CLIENT_KEY]))
        self.assertIsInstance(outcome['server'], (ssl.SSLError, OSError))

    def test_client_refuses_a_server_of_another_ca(self):
        f = self.files
        other = tls.make_credentials(os.path.join(self.dir, 'other'))
        outcome = self.handshake(
            tls.server_context(other[tls.SERVER_CERT],
                               other[tls.SERVER_KEY]),
            tls.client_context(f[tls.CA_CERT]))
        self.assertIsInstance(outcome['client'], ssl.SSLCertVerificationError)

    def test_fingerprint(self):
        with open(self.files[tls.SERVER_CERT], 'rb') as f:
            pem = f.read()
        fp = tls.fingerprint(pem)
        self.assertRegex(fp, r'^([0-9A-F]{2}:){31}[0-9A-F]{2}$')
        self.assertEqual(fp, tls.fingerprint(pem))

    def test_never_overwrites(self):
        self.assertRaises(FileExistsError, tls.make_credentials, self.dir)
