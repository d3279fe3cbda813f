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

"""The xsm-nbd command, run as an operator runs it."""

import contextlib
import errno
import io
import os
import re
import select
import signal
import socket
import subprocess
import sys

from cryptography import x509

from tests import base
from xsm_driver.cmd import nbd as cmd
from xsm_driver.core.block import device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
HOLE = device.HOLE | device.ZERO
TIMEOUT = 20
LISTENING = re.compile(r"^xsm-nbd: serving (VHD|raw) image .* on (\S+) "
                       r"port (\d+), export '(.*)', (TLS [^:]*): "
                       r"(nbds?://\S+)$")


class XsmNbdTestCase(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def path(self, name):
        return os.path.join(self.dir, name)

    def run_main(self, *argv):
        """Run main() in this process; a serve that starts is a failure."""
        def too_long(_signum, _frame):
            raise AssertionError('xsm-nbd %s did not return' % ' '.join(argv))

        out, err = io.StringIO(), io.StringIO()
        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(TIMEOUT)
        try:
            with contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err):
                try:
                    rc = cmd.main(list(argv))
                except SystemExit as exc:
                    rc = exc.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *argv):
        rc, out, err = self.run_main(*argv)
        self.assertEqual(0, rc, 'xsm-nbd %s: %s' % (' '.join(argv), err))
        return out

    def fails(self, *argv, rc=1):
        got, out, err = self.run_main(*argv)
        self.assertEqual(rc, got, out + err)
        self.assertNotIn('Traceback', err)
        self.assertEqual(1, len([line for line in err.splitlines()
                                 if ': error: ' in line]), err)
        return err

    def make_vhd(self, name='disk.vhd', size=64 * MiB):
        return ops.create(self.path(name), size)

    def serve(self, image, *options):
        """Start ``xsm-nbd serve`` and parse the line it prints."""
        proc = subprocess.Popen(
            [sys.executable, '-m', 'xsm_driver.cmd.nbd', 'serve', image,
             '--port', '0'] + list(options),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=base.REPO_TOP)
        self.addCleanup(self._reap, proc)
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        line = proc.stdout.readline() if ready else ''
        match = LISTENING.match(line.strip())
        if match is None:
            proc.kill()
            self.fail('xsm-nbd serve printed %r; stderr: %s'
                      % (line, proc.communicate(timeout=TIMEOUT)[1]))
        return proc, match

    @staticmethod
    def _reap(proc):
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)

    def stop(self, proc, sig=signal.SIGTERM):
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(0, proc.returncode, err)
        self.assertNotIn('Traceback', err)
        return out, err

    def connect(self, port, export='', **kwargs):
        client = nbd_client.Client('127.0.0.1', port, export, timeout=10,
                                   **kwargs)
        client.connect()
        self.addCleanup(client.close)
        return client


class HelpTest(XsmNbdTestCase):

    def test_help_everywhere(self):
        rc, out, _err = self.run_main('--help')
        self.assertEqual(0, rc)
        self.assertIn('serve', out)
        self.assertIn('make-certs', out)
        rc, out, _err = self.run_main('serve', '--help')
        self.assertEqual(0, rc)
        for option in ('--bind', '--port', '--export-name', '--read-only',
                       '--tls-cert', '--tls-key', '--tls-ca'):
            self.assertIn(option, out)
        rc, out, _err = self.run_main('make-certs', '--help')
        self.assertEqual(0, rc)
        self.assertIn('--host', out)

    def test_defaults_are_qemu_nbd_like(self):
        args = cmd.build_parser().parse_args(['serve', 'x.vhd'])
        self.assertEqual(('127.0.0.1', 10809, '', False),
                         (args.bind, args.port, args.export_name,
                          args.read_only))

    def test_bounds_are_parsed(self):
        args = cmd.build_parser().parse_args(
            ['serve', 'x.vhd', '--max-connections', '3',
             '--max-handshakes', '2', '--handshake-timeout', '5',
             '--request-timeout', '9.5'])
        self.assertEqual((3, 2, 5.0, 9.5),
                         (args.max_connections, args.max_handshakes,
                          args.handshake_timeout, args.request_timeout))

    def test_no_command_is_a_usage_error(self):
        rc, _out, err = self.run_main()
        self.assertEqual(2, rc)
        self.assertIn('usage:', err)


class MakeCertsTest(XsmNbdTestCase):

    def test_files_for_qemu_and_private_keys(self):
        pki = self.path('pki')
        out = self.ok('make-certs', pki)
        names = sorted(os.listdir(pki))
        self.assertEqual(sorted([tls.CA_CERT, tls.SERVER_CERT,
                                 tls.SERVER_KEY, tls.CLIENT_CERT,
                                 tls.CLIENT_KEY, 'ca-key.pem']), names)
        for name in names:
            self.assertIn(os.path.join(pki, name), out)
            mode = os.stat(os.path.join(pki, name)).st_mode & 0o777
            self.assertEqual(0o600 if name.endswith('key.pem') else 0o644,
                             mode, name)
        self.assertIn('localhost, 127.0.0.1', out)

    def test_hosts(self):
        pki = self.path('pki')
        self.ok('make-certs', pki, '--host', 'nbd.example.org',
                '--host', '192.0.2.7')
        with open(os.path.join(pki, tls.SERVER_CERT), 'rb') as f:
            cert = x509.load_pem_x509_certificate(f.read())
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        self.assertEqual(['nbd.example.org'],
                         names.get_values_for_type(x509.DNSName))
        self.assertEqual(['192.0.2.7'], [
            str(a) for a in names.get_values_for_type(x509.IPAddress)])

    def test_existing_credentials_are_not_overwritten(self):
        pki = self.path('pki')
        self.ok('make-certs', pki)
        with open(os.path.join(pki, tls.CA_CERT), 'rb') as f:
            before = f.read()
        err = self.fails('make-certs', pki)
        self.assertIn('xsm-nbd make-certs: error: ', err)
        self.assertIn(os.path.join(pki, tls.CA_CERT), err)
        with open(os.path.join(pki, tls.CA_CERT), 'rb') as f:
            self.assertEqual(before, f.read())


class ServeTest(XsmNbdTestCase):

    def test_vhd_chain_read_write_and_clean_stop(self):
        base_vhd = self.make_vhd('base.vhd')
        with vhd_chain.Chain(base_vhd, writable=True) as chain:
            chain.pwrite(b'parent' * 1000, 5 * MiB + 3)
        leaf = self.path('leaf.vhd')
        ops.snapshot(leaf, base_vhd)
        proc, match = self.serve(leaf, '--export-name', 'disk')
        self.assertEqual(('VHD', '127.0.0.1', 'disk', 'TLS off'),
                         match.group(1, 2, 4, 5))
        port = int(match.group(3))
        self.assertEqual('nbd://127.0.0.1:%d/disk' % port, match.group(6))
        client = self.connect(port, 'disk')
        self.assertEqual(64 * MiB, client.size)
        self.assertEqual(b'parent' * 1000,
                         bytes(client.pread(5 * MiB + 3, 6000)))
        client.pwrite(b'leaf' * 1000, 7 * MiB + 1)
        client.flush()
        # Block status: a hole in the chain, data where the leaf was written.
        self.assertEqual(HOLE, client.block_status(0, 4096)[0][1])
        self.assertEqual(0, client.block_status(7 * MiB, 4096)[0][1])
        client.close()
        self.stop(proc)
        with vhd_chain.Chain(leaf) as chain:
            self.assertEqual(b'leaf' * 1000,
                             bytes(chain.pread(7 * MiB + 1, 4000)))
            self.assertEqual(b'parent' * 1000,
                             bytes(chain.pread(5 * MiB + 3, 6000)))
        self.assertEqual([], vhd_check.check(leaf, chain=True))

    def test_raw_read_only_with_default_export_name(self):
        raw = self.path('disk.raw')
        with open(raw, 'wb') as f:
            f.truncate(8 * MiB)
            f.seek(MiB)
            f.write(b'raw!' * 256)
        proc, match = self.serve(raw, '--read-only')
        self.assertEqual(('raw', ''), match.group(1, 4))
        self.assertIn('read-only', match.group(0))
        client = self.connect(int(match.group(3)))
        self.assertEqual(8 * MiB, client.size)
        self.assertEqual(b'raw!' * 256, bytes(client.pread(MiB, 1024)))
        err = self.assertRaises(nbd_client.NBDError, client.pwrite, b'x', 0)
        self.assertEqual(errno.EPERM, err.errno)
        client.close()
        self.stop(proc)
        with open(raw, 'rb') as f:
            self.assertEqual(bytes(4), f.read(4))

    def test_sigint_with_a_client_connected_stops_cleanly(self):
        vhd = self.make_vhd()
        proc, match = self.serve(vhd)
        client = self.connect(int(match.group(3)))
        client.pwrite(b'z' * 4096, 0)
        self.stop(proc, signal.SIGINT)
        # The server hung up on the client.
        self.assertRaises(nbd_client.NBDError, client.pread, 0, 512)
        self.assertEqual([], vhd_check.check(vhd))

    def test_mutual_tls(self):
        vhd = self.make_vhd()
        creds = tls.make_credentials(self.path('pki'))
        proc, match = self.serve(
            vhd, '--export-name', 'secret',
            '--tls-cert', creds[tls.SERVER_CERT],
            '--tls-key', creds[tls.SERVER_KEY],
            '--tls-ca', creds[tls.CA_CERT])
        self.assertEqual('TLS on, client certificates required',
                         match.group(5))
        self.assertTrue(match.group(6).startswith('nbds://'))
        port = int(match.group(3))
        client = self.connect(port, 'secret', tls_context=tls.client_context(
            creds[tls.CA_CERT], creds[tls.CLIENT_CERT],
            creds[tls.CLIENT_KEY]), server_hostname='localhost')
        client.pwrite(b'tls' * 100, 512)
        self.assertEqual(b'tls' * 100, bytes(client.pread(512, 300)))
        # No TLS, or TLS without a client certificate: refused.
        self.assertRaises(nbd_client.NBDError, self.connect, port, 'secret')
        self.assertRaises(nbd_client.NBDError, self.connect, port, 'secret',
                          tls_context=tls.client_context(creds[tls.CA_CERT]),
                          server_hostname='localhost')
        client.close()
        self.stop(proc)

    def test_tls_without_client_certificates(self):
        vhd = self.make_vhd()
        creds = tls.make_credentials(self.path('pki'))
        proc, match = self.serve(vhd, '--tls-cert', creds[tls.SERVER_CERT],
                                 '--tls-key', creds[tls.SERVER_KEY])
        self.assertEqual('TLS on', match.group(5))
        client = self.connect(int(match.group(3)),
                              tls_context=tls.client_context(
                                  creds[tls.CA_CERT]),
                              server_hostname='127.0.0.1')
        self.assertEqual(64 * MiB, client.size)
        client.close()
        self.stop(proc)


class ServeErrorsTest(XsmNbdTestCase):

    def test_missing_image(self):
        err = self.fails('serve', self.path('nope.vhd'), '--port', '0')
        self.assertIn('xsm-nbd serve: error: cannot open image %s'
                      % self.path('nope.vhd'), err)

    def test_directory_as_image(self):
        err = self.fails('serve', self.dir, '--port', '0')
        self.assertIn(self.dir, err)

    def test_corrupt_vhd(self):
        vhd = self.make_vhd()
        with open(vhd, 'r+b') as f:
            f.seek(-512 + 67, os.SEEK_END)       # last byte of the checksum
            last = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([last ^ 0xff]))
        err = self.fails('serve', vhd, '--port', '0')
        self.assertIn('cannot open VHD image %s' % vhd, err)

    def test_read_write_snapshot_parent(self):
        parent = self.make_vhd('parent.vhd')
        ops.snapshot(self.path('leaf.vhd'), parent)
        err = self.fails('serve', parent, '--port', '0')
        self.assertIn(parent, err)
        self.assertIn('read-only', err)

    def test_port_in_use(self):
        vhd = self.make_vhd()
        busy = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        err = self.fails('serve', vhd, '--port', str(port))
        self.assertIn('cannot listen on 127.0.0.1 port %d: Address already '
                      'in use' % port, err)

    def test_bad_port(self):
        err = self.fails('serve', self.make_vhd(), '--port', '65536', rc=2)
        self.assertIn('--port', err)

    def test_bounds_out_of_range_are_usage_errors(self):
        vhd = self.make_vhd()
        for option, value in (('--max-connections', '0'),
                              ('--max-handshakes', 'many'),
                              ('--handshake-timeout', '0.5'),
                              ('--request-timeout', '7200')):
            err = self.fails('serve', vhd, '--port', '0', option, value,
                             rc=2)
            self.assertIn(option, err)
            self.assertIn('is not a number from', err)

    def test_cert_without_key_is_a_usage_error(self):
        creds = tls.make_credentials(self.path('pki'))
        err = self.fails('serve', self.make_vhd(), '--port', '0',
                         '--tls-cert', creds[tls.SERVER_CERT], rc=2)
        self.assertIn('usage:', err)
        self.assertIn('--tls-cert and --tls-key go together', err)
        err = self.fails('serve', self.path('disk.vhd'), '--tls-ca',
                         creds[tls.CA_CERT], rc=2)
        self.assertIn('--tls-ca needs', err)

    def test_unreadable_key(self):
        creds = tls.make_credentials(self.path('pki'))
        missing = self.path('pki/nope-key.pem')
        err = self.fails('serve', self.make_vhd(), '--port', '0',
                         '--tls-cert', creds[tls.SERVER_CERT],
                         '--tls-key', missing)
        self.assertIn('cannot read TLS key %s' % missing, err)

    def test_certificate_that_is_no_certificate(self):
        creds = tls.make_credentials(self.path('pki'))
        # A key given as the certificate, a directory as the CA.
        err = self.fails('serve', self.make_vhd(), '--port', '0',
                         '--tls-cert', creds[tls.SERVER_KEY],
                         '--tls-key', creds[tls.SERVER_KEY])
        self.assertIn('cannot use TLS certificate %s'
                      % creds[tls.SERVER_KEY], err)
        err = self.fails('serve', self.path('disk.vhd'), '--port', '0',
                         '--tls-cert', creds[tls.SERVER_CERT],
                         '--tls-key', creds[tls.SERVER_KEY],
                         '--tls-ca', self.dir)
        self.assertIn('cannot read TLS CA certificate %s' % self.dir, err)

    def test_errors_of_a_subprocess(self):
        # As scripts see it: one line, exit 1, nothing on stdout.
        result = subprocess.run(
            [sys.executable, '-m', 'xsm_driver.cmd.nbd', 'serve',
             self.path('nope.raw')], capture_output=True, text=True,
            timeout=TIMEOUT, cwd=base.REPO_TOP)
        self.assertEqual(1, result.returncode)
        self.assertEqual('', result.stdout)
        self.assertEqual(1, len(result.stderr.splitlines()), result.stderr)
        self.assertTrue(result.stderr.startswith('xsm-nbd serve: error: '))
