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

"""The harness's process side on the real RabbitMQ: nothing is left."""

import os
import uuid as uuidlib

import amqp
import amqp.exceptions

from tests import base
from xsm_driver.testing import harness


def queue_exists(queue):
    conn = amqp.Connection(host='%s:%d' % harness.BROKER, userid='guest',
                           password='guest', connect_timeout=5)
    conn.connect()
    try:
        conn.channel().queue_declare(queue, passive=True)
        return True
    except amqp.exceptions.NotFound:
        return False
    finally:
        conn.close()


class TestDeployment(base.TestCase):

    def setUp(self):
        super().setUp()
        problem = harness.broker_problem()
        if problem:
            self.missing(problem)

    def test_agent_serves_then_close_leaves_no_process_and_no_queue(self):
        deployment = harness.one_agent(self.make_tempdir(),
                                       uuidlib.uuid4().hex[:10],
                                       rpc_timeout=15)
        agent = deployment.agents['a']
        self.addCleanup(deployment.close)
        deployment.start()
        [queue] = harness.queue_names(deployment.exchange, agent.name)
        info = deployment.clients['a'].host_info()
        self.assertEqual(['sr-a'], [sr['name'] for sr in info['srs']])
        self.assertTrue(queue_exists(queue))
        pid = agent.pid
        deployment.close()
        self.assertEqual(0, agent.proc.returncode, agent.tail())
        self.assertFalse(os.path.exists('/proc/%d' % pid))
        self.assertFalse(queue_exists(queue))
        deployment.close()              # again: nothing

    def test_an_agent_that_cannot_start_is_named(self):
        root = self.make_tempdir()
        folder = os.path.join(root, 'a')
        agent = harness.AgentProcess(
            'host-bad', folder, {'sr-a': ('nosuchdriver', folder)},
            'xsm-test-bad-%s' % uuidlib.uuid4().hex[:10])
        deployment = harness.Deployment(root, agent.exchange, {'a': agent})
        self.addCleanup(deployment.close)
        exc = self.assertRaises(harness.HarnessError, deployment.start)
        self.assertIn('agent host-bad exited with status 1 before it was '
                      'ready', str(exc))
        self.assertIn('nosuchdriver', str(exc))
