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

"""Our NBD server and client against peers nobody here wrote.

qemu-img, qemu-io and qemu-nbd (Debian qemu-utils), nbdinfo and nbdcopy
(libnbd-bin) and nbdkit read and write our exports, with and without TLS,
and our client reads and writes theirs. Every tool is required: CI fails
when one is missing.
"""

import errno
import json
import logging
import os
import random
import re
import select
import socket
import subprocess
import sys
import time

import fixtures

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
SIZE = 64 * MiB
HOLE = device.HOLE | device.ZERO
TIMEOUT = 30           # any one tool run
START_TIMEOUT = 10     # a server subprocess starting to listen


def read_file(path):
    with open(path, 'rb') as f:
        return f.read()


class PeerTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def path(self, name):
        return os.path.join(self.dir, name)

    # -- external tools -----------------------------------------------------

    def run_tool(self, *argv, expect_ok=True):
        self.require_command(argv[0])
        result = subprocess.run(argv, capture_output=True, text=True,
                                timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        if expect_ok:
            self.assertEqual(0, result.returncode, '%s failed:\n%s%s' % (
                ' '.join(argv), result.stdout, result.stderr))
        return result

    @staticmethod
    def free_port():
        with socket.create_server(('127.0.0.1', 0)) as sock:
            return sock.getsockname()[1]

    def start_daemon(self, make_argv):
        """Start a server subprocess on a free port; returns the port.

        ``make_argv(port)`` gives its command line. The port is picked
        free just before, so another process may take it first: then the
        daemon fails and is started again on another port.
        """
        self.require_command(make_argv(0)[0])
        for _attempt in range(3):
            port = self.free_port()
            proc = subprocess.Popen(make_argv(port), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            self.addCleanup(self._reap, proc)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(('127.0.0.1', port),
                                             timeout=1).close()
                    return port
                except OSError:
                    time.sleep(0.02)
            if proc.poll() is None:
                self.fail('%s did not listen within %d s'
                          % (make_argv(port)[0], START_TIMEOUT))
            err = proc.communicate(timeout=TIMEOUT)[1]
            if 'in use' not in err:
                self.fail('%s exited with %d: %s'
                          % (' '.join(make_argv(port)), proc.returncode, err))
        self.fail('no free port found for %s' % make_argv(0)[0])

    @staticmethod
    def _reap(proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.communicate(timeout=TIMEOUT)

    def qemu_nbd(self, image, name, fmt='raw', *options):
        # --shared: qemu-nbd serves one client at a time by default.
        return self.start_daemon(lambda port: [
            'qemu-nbd', '-f', fmt, '-b', '127.0.0.1', '-p', str(port),
            '-x', name, '--persistent', '--shared=8'] + list(options)
            + [image])

    # -- our side -----------------------------------------------------------

    def serve(self, dev, name='disk', tls_context=None):
        server = nbd_server.Server({name: dev}, tls_context=tls_context)
        server.start()
        self.addCleanup(server.stop)
        return server, server.address[1]

    def open_vhd(self, path, writable=False):
        dev = backends.VHDDevice(path, writable=writable)
        self.addCleanup(dev.close)
        return dev

    def make_chain(self, depth=3, seed=0):
        """A ``depth``-deep VHD chain with data at unaligned places.

        :returns: the leaf path.
        """
        rng = random.Random(seed)
        path = ops.create(self.path('level0.vhd'), SIZE)
        for level in range(depth):
            if level:
                parent = path
                path = ops.snapshot(self.path('level%d.vhd' % level), parent)
            with vhd_chain.Chain(path, writable=True) as chain:
                for _ in range(5):
                    length = rng.randrange(1, 300000)
                    offset = rng.randrange(0, SIZE - length)
                    chain.pwrite(rng.randbytes(length), offset)
                # Across a 2 MiB block boundary, and the very last byte.
                chain.pwrite(bytes([level + 1]) * 1001,
                             (2 * level + 2) * MiB - 500)
                chain.pwrite(bytes([0x80 + level]), SIZE - 1)
        return path

    def export(self, vhd):
        """The whole virtual disk as raw bytes, by our own exporter."""
        return read_file(ops.export(vhd, self.path('export-%s.raw'
                                                   % os.path.basename(vhd))))

    def vhd_bytes(self, vhd):
        with vhd_chain.Chain(vhd) as chain:
            return bytes(chain.pread(0, chain.size))

    def sparse_raw(self, name, size=SIZE, seed=1):
        """A sparse raw file with a few 4 KiB-aligned data runs."""
        rng = random.Random(seed)
        path = self.path(name)
        with open(path, 'wb') as f:
            f.truncate(size)
            for offset, length in ((MiB, 64 * 1024), (9 * MiB + 4096, 12288),
                                   (size - 8192, 8192)):
                f.seek(offset)
                f.write(rng.randbytes(length))
        return path

    def credentials(self, name='pki'):
        return tls.make_credentials(self.path(name))

    def tls_server_context(self, creds):
        return tls.server_context(creds[tls.SERVER_CERT],
                                  creds[tls.SERVER_KEY], creds[tls.CA_CERT])

    @staticmethod
    def qemu_tls(creds_dir, port, export, endpoint='client'):
        """qemu options to reach our TLS export: --object, --image-opts."""
        return ['--object', 'tls-creds-x509,id=tls0,endpoint=%s,dir=%s'
                % (endpoint, creds_dir), '--image-opts',
                'driver=nbd,host=127.0.0.1,port=%d,export=%s,tls-creds=tls0'
                % (port, export)]

    def assert_qemu_io_ok(self, result):
        # qemu-io reports a failed command on its output as well.
        for bad in ('failed', 'error', 'Pattern verification'):
            self.assertNotIn(bad, result.stdout + result.stderr)


class QemuAgainstOurServerTest(PeerTestCase):

    def test_qemu_img_convert_and_compare(self):
        leaf = self.make_chain()
        expected = self.export(leaf)
        _server, port = self.serve(self.open_vhd(leaf))
        url = 'nbd://127.0.0.1:%d/disk' % port
        out = self.path('out.raw')
        self.run_tool('qemu-img', 'convert', '-f', 'raw', '-O', 'raw', url,
                      out)
        self.assertEqual(expected, read_file(out))
        result = self.run_tool('qemu-img', 'compare', '-f', 'raw', '-F',
                               'raw', url,
                               self.path('export-%s.raw'
                                         % os.path.basename(leaf)))
        self.assertIn('Images are identical', result.stdout)

    def test_qemu_io_writes_land_in_the_vhd(self):
        leaf = self.make_chain()
        expected = bytearray(self.export(leaf))
        dev = self.open_vhd(leaf, writable=True)
        server, port = self.serve(dev)
        writes = ((0xa5, 3 * MiB + 333, 100000),      # unaligned, in a hole
                  (0x5a, 4 * MiB - 7, 14),            # across a block
                  (0x3c, SIZE - 4097, 4097))          # to the very end
        commands = []
        for pattern, offset, length in writes:
            where = '0x%x %d %d' % (pattern, offset, length)
            commands += ['-c', 'write -P ' + where, '-c', 'read -P ' + where]
            expected[offset:offset + length] = bytes([pattern]) * length
        self.assert_qemu_io_ok(self.run_tool(
            'qemu-io', '-f', 'raw', *commands,
            'nbd://127.0.0.1:%d/disk' % port))
        server.stop()
        dev.close()
        self.assertEqual(bytes(expected), self.vhd_bytes(leaf))
        self.assertEqual([], check.check(leaf, chain=True))

    def test_qemu_io_sub_sector_writes_in_flight(self):
        # We advertise a minimum block size of 1, so qemu sends writes of a
        # few bytes as they are, many at once. Writes that share a sector
        # without overlapping must all land (NBD only leaves overlapping
        # writes in flight unordered).
        vhd = ops.create(self.path('disk.vhd'), SIZE)
        dev = self.open_vhd(vhd, writable=True)
        server, port = self.serve(dev)
        count, length = 512, 64
        commands = []
        for i in range(count):
            commands += ['-c', 'aio_write -P 0x%x %d %d'
                         % (1 + i % 250, MiB + i * length, length)]
        self.assert_qemu_io_ok(self.run_tool(
            'qemu-io', '-f', 'raw', *commands, '-c', 'aio_flush',
            'nbd://127.0.0.1:%d/disk' % port))
        server.stop()
        dev.close()
        with vhd_chain.Chain(vhd) as chain:
            got = bytes(chain.pread(MiB, count * length))
        lost = [MiB + i * length for i in range(count)
                if got[i * length:(i + 1) * length] !=
                bytes([1 + i % 250]) * length]
        self.assertEqual([], lost, '%d of %d writes of %d bytes lost'
                         % (len(lost), count, length))


class QemuOverTLSTest(PeerTestCase):

    def setUp(self):
        super().setUp()
        self.creds = self.credentials()
        self.pki = os.path.dirname(self.creds[tls.CA_CERT])
        self.logger = self.useFixture(fixtures.FakeLogger(
            name='xsm_driver.core.nbd.server', level=logging.DEBUG))

    def test_qemu_img_convert_with_mutual_tls(self):
        leaf = self.make_chain()
        expected = self.export(leaf)
        _server, port = self.serve(self.open_vhd(leaf), 'secret',
                                   self.tls_server_context(self.creds))
        out = self.path('out.raw')
        self.run_tool('qemu-img', 'convert',
                      *self.qemu_tls(self.pki, port, 'secret'), '-O', 'raw',
                      out)
        self.assertEqual(expected, read_file(out))
        result = self.run_tool('qemu-img', 'compare',
                               *self.qemu_tls(self.pki, port, 'secret'),
                               'driver=raw,file.filename=%s' % self.path(
                                   'export-%s.raw' % os.path.basename(leaf)))
        self.assertIn('Images are identical', result.stdout)

    def test_qemu_io_with_mutual_tls(self):
        leaf = self.make_chain(depth=2)
        expected = bytearray(self.export(leaf))
        dev = self.open_vhd(leaf, writable=True)
        server, port = self.serve(dev, 'secret',
                                  self.tls_server_context(self.creds))
        offset, length = 17 * MiB + 1, 3 * MiB + 3
        expected[offset:offset + length] = b'\xc3' * length
        self.assert_qemu_io_ok(self.run_tool(
            'qemu-io', *self.qemu_tls(self.pki, port, 'secret'),
            '-c', 'write -P 0xc3 %d %d' % (offset, length),
            '-c', 'read -P 0xc3 %d %d' % (offset, length)))
        server.stop()
        dev.close()
        self.assertEqual(bytes(expected), self.vhd_bytes(leaf))
        self.assertEqual([], check.check(leaf, chain=True))

    def test_xsm_nbd_command_with_qemu_img(self):
        # The README example: xsm-nbd make-certs, serve, qemu-img.
        leaf = self.make_chain(depth=2)
        expected = self.export(leaf)
        pki = self.path('cmd-pki')
        subprocess.run([sys.executable, '-m', 'xsm_driver.cmd.nbd',
                        'make-certs', pki], check=True, timeout=TIMEOUT,
                       capture_output=True, cwd=base.REPO_TOP)
        proc = subprocess.Popen(
            [sys.executable, '-m', 'xsm_driver.cmd.nbd', 'serve', leaf,
             '--port', '0', '--export-name', 'disk', '--read-only',
             '--tls-cert', os.path.join(pki, tls.SERVER_CERT),
             '--tls-key', os.path.join(pki, tls.SERVER_KEY),
             '--tls-ca', os.path.join(pki, tls.CA_CERT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=base.REPO_TOP)
        self.addCleanup(self._reap, proc)
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else ''
        match = re.search(r' port (\d+),', line)
        self.assertIsNotNone(match, 'xsm-nbd printed %r' % line)
        port = int(match.group(1))
        out = self.path('out.raw')
        self.run_tool('qemu-img', 'convert',
                      *self.qemu_tls(pki, port, 'disk'), '-O', 'raw', out)
        self.assertEqual(expected, read_file(out))
        proc.terminate()
        _out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(0, proc.returncode, err)

    def _qemu_img_info(self, creds_dir, port):
        return self.run_tool('qemu-img', 'info',
                             *self.qemu_tls(creds_dir, port, 'secret'),
                             expect_ok=False)

    def test_client_certificate_of_another_ca_is_refused(self):
        _server, port = self.serve(self.open_vhd(ops.create(
            self.path('disk.vhd'), SIZE)), 'secret',
            self.tls_server_context(self.creds))
        # The intruder trusts our CA (so it accepts our server) but its own
        # certificate is signed by another one, which qemu also trusts so
        # that it presents it: only our server can refuse it.
        other_ca, other_key = tls.make_ca('Another CA')
        cert, key = tls.make_cert(other_ca, other_key, 'intruder',
                                  client=True)
        intruder = self.path('intruder')
        os.mkdir(intruder)
        for name, data in ((tls.CA_CERT, read_file(self.creds[tls.CA_CERT])
                            + other_ca),
                           (tls.CLIENT_CERT, cert), (tls.CLIENT_KEY, key)):
            with open(os.path.join(intruder, name), 'wb') as f:
                f.write(data)
        result = self._qemu_img_info(intruder, port)
        self.assertNotEqual(0, result.returncode)
        self.assertNotIn('virtual size', result.stdout)
        for _ in range(100):            # the server logs after qemu exits
            if 'CERTIFICATE_VERIFY_FAILED' in self.logger.output:
                break
            time.sleep(0.02)
        self.assertIn('CERTIFICATE_VERIFY_FAILED', self.logger.output)
        # A client of a wholly different PKI refuses our server as well.
        other = self.credentials('other-pki')
        result = self._qemu_img_info(os.path.dirname(other[tls.CA_CERT]),
                                     port)
        self.assertNotEqual(0, result.returncode)
        # which of the two TLS errors qemu reports depends on timing
        self.assertTrue(any(text in result.stderr for text in
                            ('not trusted', 'TLS handshake failed')),
                        result.stderr)
        # Without TLS qemu is told TLS is required.
        result = self.run_tool('qemu-img', 'info',
                               'nbd://127.0.0.1:%d/secret' % port,
                               expect_ok=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('TLS', result.stderr)
        # And the right credentials still work.
        self.assertIn('virtual size: 64 MiB',
                      self._qemu_img_info(self.pki, port).stdout)


class LibnbdAgainstOurServerTest(PeerTestCase):

    def test_nbdinfo_map_equals_vhd_extents(self):
        leaf = self.make_chain()
        dev = self.open_vhd(leaf)
        expected = dev.extents(0, SIZE)
        self.assertGreater(len(expected), 10)
        _server, port = self.serve(dev)
        url = 'nbd://127.0.0.1:%d/disk' % port
        result = self.run_tool('nbdinfo', '--map', '--json', url)
        got = [(e['offset'], e['length'], e['type'])
               for e in json.loads(result.stdout)]
        self.assertEqual(expected, got)
        result = self.run_tool('nbdinfo', '--map', url)
        lines = [line.split() for line in result.stdout.splitlines()]
        self.assertEqual([(o, n, f) for o, n, f in expected],
                         [(int(o), int(n), int(f)) for o, n, f, _ in lines])
        result = self.run_tool('nbdinfo', '--json', url)
        facts = json.loads(result.stdout)
        self.assertEqual(SIZE, facts['exports'][0]['export-size'])
        self.assertIn('base:allocation', facts['exports'][0]['contexts'])

    def test_nbdcopy_out_of_our_export(self):
        leaf = self.make_chain()
        expected = self.export(leaf)
        _server, port = self.serve(self.open_vhd(leaf))
        out = self.path('out.raw')
        self.run_tool('nbdcopy', 'nbd://127.0.0.1:%d/disk' % port, out)
        self.assertEqual(expected, read_file(out))

    def _copy_into_our_vhd(self, src_url, expected):
        # The target's parent holds garbage everywhere nbdcopy will find
        # holes in the source: zeros must really be written.
        parent = ops.create(self.path('target-base.vhd'), SIZE)
        with vhd_chain.Chain(parent, writable=True) as chain:
            for pos in range(0, SIZE, 8 * MiB):
                chain.pwrite(b'\xee' * MiB, pos + 3 * MiB)
        target = ops.snapshot(self.path('target.vhd'), parent)
        dev = self.open_vhd(target, writable=True)
        server, port = self.serve(dev, 'target')
        self.run_tool('nbdcopy', src_url,
                      'nbd://127.0.0.1:%d/target' % port)
        server.stop()
        dev.close()
        self.assertEqual(expected, self.vhd_bytes(target))
        self.assertEqual([], check.check(target, chain=True))

    def test_nbdcopy_from_qemu_nbd_raw_into_our_vhd(self):
        src = self.sparse_raw('src.raw')
        port = self.qemu_nbd(src, 'src', 'raw', '--read-only')
        self._copy_into_our_vhd('nbd://127.0.0.1:%d/src' % port,
                                read_file(src))

    def test_nbdcopy_from_qemu_nbd_vpc_into_our_vhd(self):
        # qemu's own VHD driver reads a (dynamic) VHD we wrote.
        src = ops.create(self.path('src.vhd'), SIZE)
        rng = random.Random(7)
        with vhd_chain.Chain(src, writable=True) as chain:
            for offset in (5, 2 * MiB - 100, 33 * MiB + 4097):
                chain.pwrite(rng.randbytes(150000), offset)
        expected = self.export(src)
        port = self.qemu_nbd(src, 'src', 'vpc', '--read-only')
        self._copy_into_our_vhd('nbd://127.0.0.1:%d/src' % port, expected)


class OurClientAgainstOtherServersTest(PeerTestCase):

    def connect(self, port, export='', **kwargs):
        client = nbd_client.Client('127.0.0.1', port, export, timeout=10,
                                   **kwargs)
        client.connect()
        self.addCleanup(client.close)
        return client

    def test_qemu_nbd_read_write_and_block_status(self):
        path = self.sparse_raw('disk.raw')
        original = read_file(path)
        with backends.RawDevice(path) as raw:
            expected_extents = raw.extents(0, SIZE)
        self.assertEqual(6, len(expected_extents))
        port = self.qemu_nbd(path, 'name')
        client = self.connect(port, 'name')
        self.assertEqual(SIZE, client.size)
        self.assertTrue(client.structured)
        self.assertTrue(client.has_allocation_map)
        remote = nbd_device.NBDDevice(client)
        self.assertEqual(expected_extents, remote.extents(0, SIZE))
        # More than qemu-nbd's 32 MiB request limit, in one call.
        self.assertEqual(original, bytes(client.pread(0, SIZE)))
        data = random.Random(3).randbytes(5 * MiB + 3)
        client.pwrite(data, 20 * MiB - 1, fua=True)
        client.zero(MiB, 4096)
        client.flush()
        self.assertEqual(data, bytes(client.pread(20 * MiB - 1, len(data))))
        self.assertEqual(bytes(4096), bytes(client.pread(MiB, 4096)))
        err = self.assertRaises(nbd_client.NBDError, client.pread,
                                SIZE - 1, 2)
        self.assertIn(err.errno, (errno.EINVAL, errno.EIO))
        self.assertEqual(bytes(16), bytes(client.pread(0, 16)))
        client.close()
        on_disk = read_file(path)
        self.assertEqual(data, on_disk[20 * MiB - 1:25 * MiB + 2])
        self.assertEqual(bytes(4096), on_disk[MiB:MiB + 4096])
        self.assertEqual(original[MiB + 4096:20 * MiB - 1],
                         on_disk[MiB + 4096:20 * MiB - 1])

    def test_qemu_nbd_with_mutual_tls(self):
        creds = self.credentials()
        pki = os.path.dirname(creds[tls.CA_CERT])
        path = self.sparse_raw('disk.raw')
        port = self.qemu_nbd(path, 'secret', 'raw',
                             '--object', 'tls-creds-x509,id=tls0,'
                             'endpoint=server,dir=%s' % pki,
                             '--tls-creds', 'tls0')
        client = self.connect(port, 'secret', tls_context=tls.client_context(
            creds[tls.CA_CERT], creds[tls.CLIENT_CERT],
            creds[tls.CLIENT_KEY]), server_hostname='localhost')
        client.pwrite(b'over tls' * 512, 3 * MiB)
        self.assertEqual(b'over tls' * 512, bytes(client.pread(3 * MiB,
                                                               4096)))
        self.assertEqual(read_file(path)[MiB:MiB + 65536],
                         bytes(client.pread(MiB, 65536)))
        # qemu-nbd refuses us without TLS, and without a certificate.
        self.assertRaises(nbd_client.NBDError, self.connect, port, 'secret')
        self.assertRaises(nbd_client.NBDError, self.connect, port, 'secret',
                          tls_context=tls.client_context(creds[tls.CA_CERT]),
                          server_hostname='localhost')

    def test_nbdkit_memory(self):
        port = self.start_daemon(lambda port: [
            'nbdkit', '-f', '--exit-with-parent', '-i', '127.0.0.1',
            '-p', str(port), 'memory', '64M'])
        client = self.connect(port)
        self.assertEqual(SIZE, client.size)
        self.assertEqual(bytes(MiB), bytes(client.pread(7 * MiB, MiB)))
        data = random.Random(5).randbytes(3 * MiB + 11)
        client.pwrite(data, 10 * MiB - 5)
        client.flush()
        self.assertEqual(data, bytes(client.pread(10 * MiB - 5, len(data))))
        remote = nbd_device.NBDDevice(client)
        extents = remote.extents(0, SIZE)
        self.assertEqual(0, extents[0][0])
        # Holes before and after the data, data in between.
        self.assertEqual(HOLE, extents[0][2] & HOLE)
        self.assertEqual(HOLE, extents[-1][2] & HOLE)
        written = [(o, n) for o, n, flags in extents if not flags & HOLE]
        self.assertLessEqual(written[0][0], 10 * MiB - 5)
        self.assertGreaterEqual(written[-1][0] + written[-1][1],
                                13 * MiB + 6)
        client.zero(10 * MiB, MiB, may_trim=True)
        client.trim(12 * MiB, MiB)
        self.assertEqual(bytes(MiB), bytes(client.pread(10 * MiB, MiB)))
        self.assertEqual(data[MiB + 5:2 * MiB + 5],
                         bytes(client.pread(11 * MiB, MiB)))
        # Many requests in flight at once.
        pendings = [client.aio_pwrite(bytes([i]) * 65536, i * 65536)
                    for i in range(1, 65)]
        for pending in pendings:
            pending.wait(10)
        self.assertEqual(b''.join(bytes([i]) * 65536 for i in range(1, 65)),
                         bytes(client.pread(65536, 64 * 65536)))
