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

"""``xsm-agent`` with ``[agent]engine = xenapi``, a real process on RabbitMQ.

The pools are fake xapi servers in the test process; the agent is started
as operators start it, from a config file, and reached by the same client
xsm-migrate and the adapters use.
"""

import time
import uuid as uuidlib

from tests.functional.core.migration import fixtures as mfix
from tests.unit.xenapi import fixtures as xfix
from xsm_driver.testing import harness


class TestAgentProcess(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        problem = mfix.broker_problem()
        if problem:
            self.missing(problem)
        self.exchange = 'xsm-test-%s' % uuidlib.uuid4().hex[:10]
        folder = self.make_tempdir()
        self.agent = mfix.AgentProcess(
            'pool-a', folder, {}, self.exchange, {'engine': 'xenapi'},
            sections={'xenapi': {
                'url': self.server_a.url, 'password': 'secret',
                'destination_pools': 'pool-b,%s' % self.server_b.url,
                'poll_interval': 0.05}})
        deployment = harness.Deployment(folder, self.exchange,
                                        {'a': self.agent})
        # clean-up: the agent stops, the broker is tidied
        self.addCleanup(deployment.close)
        problem = harness.start_all([self.agent])
        if problem:
            self.fail(problem)
        self.client = deployment.connect()['a']

    def test_migrate_through_the_agent_process(self):
        [vm] = self.client.vm_list()
        vdi_map = {d['vdi']: 'SR-B' for d in vm['disks']}
        mid = self.client.migrate_vm(vm['uuid'], 'pool-b', vdi_map,
                                     {'0': xfix.NET})
        end = time.monotonic() + 30
        while time.monotonic() < end:
            status = self.client.migration_get(mid)
            if status['finished'] is not None:
                break
            time.sleep(0.05)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertTrue(self.b.find('VM', uuid=vm['uuid']))
        self.assertEqual(0, self.agent.stop())
        log = self.agent.log()
        self.assertNotIn('secret', log)
        self.assertIn('logged in', log)


class TestAgentStartErrors(xfix.PoolsTestCase):
    """``xsm-agent`` refuses a wrong [xenapi] setup in one line, at once.

    The agent reads its pool before it serves, so these end before it
    touches the message bus: no broker is needed.
    """

    def start(self, xenapi):
        folder = self.make_tempdir()
        agent = mfix.AgentProcess('pool-a', folder, {}, 'xsm-unused',
                                  {'engine': 'xenapi'},
                                  sections={'xenapi': xenapi})
        self.addCleanup(agent.stop)
        agent.start()
        rc = agent.proc.wait(30)
        with open(agent.stderr, errors='replace') as f:
            err = f.read()
        self.assertEqual(1, rc, err)
        self.assertNotIn('Traceback', err)
        [line] = [x for x in err.splitlines()
                  if x.startswith('xsm-agent: error:')]
        return line

    def test_wrong_password(self):
        line = self.start({'url': self.server_a.url,
                           'password': 'hunter2-wrong'})
        self.assertIn('pool pool-a', line)
        self.assertIn('user root was refused', line)
        self.assertNotIn('hunter2', line)

    def test_master_that_is_down(self):
        line = self.start({'url': 'http://127.0.0.1:9/', 'password': 'x',
                           'call_retries': 0})
        self.assertIn('cannot reach the pool master', line)

    def test_unusable_destination_url(self):
        line = self.start({'url': self.server_a.url, 'password': 'secret',
                           'destination_pools': 'pool-b,xs-b.example.net'})
        self.assertIn('pool pool-b', line)
        self.assertIn('the pool URL is unusable', line)

    def test_no_url(self):
        line = self.start({'password': 'secret'})
        self.assertIn('[xenapi]url', line)
