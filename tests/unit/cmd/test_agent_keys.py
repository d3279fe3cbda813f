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

"""``xsm-agent init`` and ``xsm-agent operator-key``; queue names; the
agent's NBD server bounds."""

import contextlib
import io
import os
import stat
from unittest import mock

import fixtures

from tests import base
from xsm_driver.cmd import agent as agent_cmd
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = agent_cmd.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


class TestInit(base.TestCase):

    def setUp(self):
        super().setUp()
        self.root = self.make_tempdir()
        self.state = os.path.join(self.root, 'state')
        self.conf = os.path.join(self.root, 'xsm-driver.conf')
        with open(self.conf, 'w') as f:
            f.write('[agent]\nhost = h7\nstate_path = %s\n' % self.state)

    def test_init_creates_the_key_once_and_prints_its_entry(self):
        rc, out, err = run('init', '--config-file', self.conf)
        self.assertEqual((0, ''), (rc, err))
        path = os.path.join(self.state, 'identity.key')
        self.assertEqual(0o600, stat.S_IMODE(os.stat(path).st_mode))
        public = auth.public_text(keys.load_key_file(path))
        self.assertIn('created the identity key of host h7: %s' % path, out)
        self.assertIn('trusted_hosts entry h7:%s' % public, out)
        self.assertIn('trusted_hosts_file: h7 %s' % public, out)
        rc, again, err = run('init', '--config-file', self.conf)
        self.assertEqual(0, rc)
        self.assertIn('kept the identity key', again)
        self.assertIn(public, again)

    def test_init_names_an_unusable_key(self):
        os.makedirs(self.state)
        path = os.path.join(self.state, 'identity.key')
        with open(path, 'w') as f:
            f.write('not a key')
        os.chmod(path, 0o600)
        rc, out, err = run('init', '--config-file', self.conf)
        self.assertEqual(2, rc)
        self.assertIn('xsm-agent: error: %s: not an Ed25519' % path, err)
        self.assertEqual(1, len(err.splitlines()))

    def test_operator_key(self):
        path = os.path.join(self.root, 'ops.key')
        rc, out, err = run('operator-key', path, '--name', 'ops')
        self.assertEqual((0, ''), (rc, err))
        public = auth.public_text(keys.load_key_file(path))
        self.assertIn('[agent]trusted_operators = ops:%s' % public, out)
        self.assertIn('operator_key_file = %s, operator_name = ops' % path,
                      out)
        rc, out, err = run('operator-key', path)
        self.assertEqual(2, rc)
        self.assertIn('exists; a key is never overwritten', err)


class TestQueueNames(base.TestCase):

    def test_the_exchange_is_in_the_topic(self):
        self.assertEqual('xsm-agent@nova.compute-1',
                         api.queue_name('nova', 'compute-1'))
        self.assertNotEqual(api.queue_name('a', 'h'),
                            api.queue_name('b', 'h'))

    def test_dots_cannot_make_two_deployments_meet(self):
        self.assertNotEqual(api.queue_name('x.y', 'z'),
                            api.queue_name('x', 'y.z'))
        self.assertEqual('xsm-agent@x%2Ey', api.topic('x.y'))
        self.assertEqual('xsm-agent@50%25%2E', api.topic('50%.'))


class TestNBDBounds(base.TestCase):

    def test_the_agent_s_nbd_servers_follow_its_options(self):
        root = self.make_tempdir()
        path = os.path.join(root, 'xsm-driver.conf')
        with open(path, 'w') as f:
            f.write('[agent]\nhost = h7\nstate_path = %s\n'
                    'nbd_max_connections = 7\nnbd_max_handshakes = 3\n'
                    'nbd_handshake_timeout = 9\nnbd_request_timeout = 11\n'
                    % os.path.join(root, 'state'))
        names = ('MAX_CONNECTIONS', 'MAX_HANDSHAKES', 'HANDSHAKE_TIMEOUT',
                 'REQUEST_TIMEOUT')
        for name in names:
            self.useFixture(fixtures.MonkeyPatch(
                'xsm_driver.core.nbd.server.' + name,
                getattr(nbd_server, name)))
        # stop at the first step after the bounds are set
        with mock.patch.object(agent_cmd.common, 'migration_options',
                               side_effect=ValueError('stop here')):
            rc, out, err = run('--config-file', path)
        self.assertEqual(1, rc)
        self.assertIn('stop here', err)
        self.assertEqual((7, 3, 9, 11),
                         tuple(getattr(nbd_server, n) for n in names))
