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

"""What an eavesdropper or an intruder on the migration network gets.

* ``tshark`` captures host b's migration link while a disk full of a
  known pattern migrates: the pattern is nowhere in the capture (the
  data channel is TLS), although the capture holds the NBD connections
  (their plain-text greeting) and more bytes than the disk.
* Clients without the migration's certificate -- plain NBD (our client
  and ``nbdinfo``), TLS without a client certificate, TLS with another
  migration's certificate -- are refused, during a real migration that
  goes on unaffected, and against an export prepared by the test itself.
* A one-time export name is taken by the first client that presents the
  right certificate; replayed, it is refused; refused attempts do not use
  it up.
"""

import json
import os
import subprocess
import sys
import uuid as uuidlib

from testtools import content

from tests import base
from tests.functional.faults import fixtures
from tests.functional.faults import netns
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import workload
from xsm_driver.core.rpc import api

MiB = fixtures.MiB
#: bytes of a pattern block searched for in a capture
SLICE = 64


def probe(test, role, host, port, attempts, timeout=10):
    """Run :mod:`nbd_probe` in host ``role``'s namespace; its results."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [base.REPO_TOP] + [p for p in [env.get('PYTHONPATH')] if p])
    proc = subprocess.run(
        test.net.argv(role, sys.executable, '-m',
                      'tests.functional.faults.nbd_probe'),
        input=json.dumps({'host': host, 'port': port, 'timeout': timeout,
                          'attempts': attempts}),
        capture_output=True, text=True, timeout=120, cwd=base.REPO_TOP,
        env=env)
    test.assertEqual(0, proc.returncode, proc.stderr)
    results = json.loads(proc.stdout)
    test.addDetail('probe-%d' % len(test.getDetails()),
                   content.text_content(json.dumps(results, indent=1)))
    return {r['name']: r for r in results}


class TestCapture(fixtures.NamespacedAgentsFixture):

    SIZE = 8 * MiB

    def setUp(self):
        super().setUp()
        self.require_command('tshark')

    def pattern_slices(self, path, count=32):
        """Slices of the guest's pattern blocks that ``path`` holds.

        The guest filled disk 0 with generation 1 of every block and
        then wrote a few blocks again: only slices found in the source
        VHD file are kept, which also shows the search would find them.
        """
        with open(path, 'rb') as f:
            image = f.read()
        blocks = self.SIZE // workload.BLOCK
        slices = []
        for i in range(count):
            block = (i * blocks) // count
            data = workload.pattern(0, block, 1)
            piece = data[workload.BLOCK // 2:workload.BLOCK // 2 + SLICE]
            if piece in image:
                slices.append((block, piece))
        self.assertGreaterEqual(len(slices), count // 2,
                                'the disk does not hold its pattern')
        return slices

    def test_pattern_never_crosses_the_link_in_clear(self):
        vm = self.make_vm(sizes=(self.SIZE,), rate=1, fill=1.0,
                          snapshots=0)
        self.assert_guest_verifies(self.a, vm, self.SIZE)     # stops it
        disk = vm['disks'][0]['vdi']
        slices = self.pattern_slices(os.path.join(
            self.agents['a'].sr_path('sr-a'), disk + '.vhd'))
        capture = netns.Capture(self.net, 'b',
                                os.path.join(self.root, 'mig-b.pcapng'))
        try:
            capture.start()
        except netns.NetworkError as exc:
            self.fail(str(exc))
        self.addCleanup(capture.stop)
        # the guest goes on writing: its writes are mirrored too
        self.a.guest_start(vm['uuid'], rate=50)
        mid = self.migrate(vm, bandwidth=2 * MiB)
        self.wait_phase(self.a, mid, 'copy')
        # an intruder on the migration network, during the copy
        address = self.net.migration['b']
        ports = self.net.listening_ports('b', address)
        self.assertEqual(1, len(ports), 'listening on %s: %s'
                         % (address, ports))
        other = credentials.Credentials.make(
            os.path.join(self.root, 'intruder'), 'client')
        results = probe(self, 'a', address, ports[0], [
            {'name': 'plain', 'export': ''},
            {'name': 'no client certificate', 'export': '', 'tls': {}},
            {'name': 'other migration', 'export': '',
             'tls': {'cert': other.cert_file, 'key': other.key_file}}])
        # refused by the server it reached, not by a closed port
        self.assertIn('TLS is required', results['plain']['error'])
        # TLS 1.3 sends the server's refusal after the client's handshake
        # is done: the client sees the alert or just the connection end
        for name, alert in (('no client certificate', 'CERTIFICATE_REQUIRED'),
                            ('other migration', 'UNKNOWN_CA')):
            self.assertTrue(any(word in results[name]['error']
                                for word in (alert, 'EOF')), results[name])
        for result in results.values():
            self.assertFalse(result['accepted'], result)
        status = self.wait(self.a, mid, timeout=60)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        summary = capture.stop()
        self.addDetail('capture', content.text_content(summary))
        data = capture.data()
        # the capture saw the migration: the NBD greeting and options
        # (plain text before STARTTLS) and more bytes than the disk
        self.assertIn(b'NBDMAGIC', data)
        self.assertIn(b'IHAVEOPT', data)
        self.assertGreater(len(data), self.SIZE)
        found = [block for block, piece in slices if piece in data]
        self.assertEqual([], found, 'pattern blocks seen in clear on the '
                         'migration link')
        self.assert_guest_verifies(self.b, vm, self.SIZE)


class TestRefusals(fixtures.NamespacedAgentsFixture):
    """The test is the source: it asks host b to prepare a receive."""

    SIZE = 4 * MiB

    def prepare(self):
        mid = str(uuidlib.uuid4())
        vdi = str(uuidlib.uuid4())
        # the test is the source, in the name of host a (agents take
        # receives from trusted hosts only)
        spec = {'id': mid, 'source_host': self.agents['a'].name, 'vm': None,
                'vif_map': {}, 'cross_pool': False, 'network': None,
                'vdis': [{'uuid': vdi, 'size': self.SIZE, 'allocated': 0,
                          'name': 'refusals', 'sr': 'sr-b',
                          'mirror': True}]}
        peer = api.RemotePeer(self.b)
        peer.preflight(spec)
        self.creds = credentials.Credentials.make(
            os.path.join(self.root, 'client'), 'client')
        remote = peer.prepare(dict(spec, client_ca_pem=self.creds.ca_pem))
        self.addCleanup(peer.abort, mid)
        self.server_ca = os.path.join(self.root, 'server-ca.pem')
        with open(self.server_ca, 'w') as f:
            f.write(remote['server_ca_pem'])
        return peer, mid, remote, remote['exports'][vdi]

    def test_only_the_migration_client_gets_in_and_only_once(self):
        self.require_command('nbdinfo')
        peer, mid, remote, exports = self.prepare()
        host, port = remote['host'], remote['port']
        self.assertEqual(self.net.migration['b'], host)
        self.assertEqual([port], self.net.listening_ports('b', host))
        other = credentials.Credentials.make(
            os.path.join(self.root, 'other'), 'client')
        valid = {'ca': self.server_ca, 'cert': self.creds.cert_file,
                 'key': self.creds.key_file}
        base_name, leaf = exports['base'], exports['leaf']
        results = probe(self, 'a', host, port, [
            {'name': 'plain', 'export': base_name},
            {'name': 'no client certificate', 'export': base_name,
             'tls': {'ca': self.server_ca}},
            {'name': 'other migration', 'export': base_name,
             'tls': {'ca': self.server_ca, 'cert': other.cert_file,
                     'key': other.key_file}},
            {'name': 'unknown export', 'export': leaf[::-1], 'tls': valid},
            {'name': 'leaf', 'export': leaf, 'tls': valid},
            {'name': 'leaf replayed', 'export': leaf, 'tls': valid},
            {'name': 'base', 'export': base_name, 'tls': valid},
            {'name': 'base replayed', 'export': base_name, 'tls': valid}])
        for name in ('plain', 'no client certificate', 'other migration',
                     'unknown export', 'leaf replayed', 'base replayed'):
            self.assertFalse(results[name]['accepted'], results[name])
        # the refused attempts did not use up the base's one-time name
        for name in ('leaf', 'base'):
            self.assertTrue(results[name]['accepted'], results[name])
            self.assertEqual(self.SIZE, results[name]['size'])
        # a real tool, without TLS, on the name it could have sniffed
        proc = subprocess.run(
            self.net.argv('a', 'nbdinfo', 'nbd://%s:%d/%s'
                          % (host, port, base_name)),
            capture_output=True, text=True, timeout=30)
        self.assertNotEqual(0, proc.returncode, proc.stdout)
        self.assertNotIn('export-size', proc.stdout)
        self.addDetail('nbdinfo', content.text_content(proc.stderr))
        # the receive is still whole: the test, as source, aborts it
        self.assertEqual('aborted', peer.abort(mid))
        self.assert_nothing_received()
        self.assertEqual([], self.net.listening_ports('b', host))
