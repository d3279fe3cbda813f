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

"""``receive_stage_guest`` (API 1.6) over a real RPC server on ``fake://``.

A destination of 1.6 takes the guest's models; one of before 1.6 (an
endpoint at 1.5) answers that it does not know the call, which the source
takes as "send them with the commit", as before.
"""

from oslo_config import cfg
import oslo_messaging as messaging

from tests import base
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import arguments


class _Manager:
    """What the endpoint calls: records the staged models."""

    def __init__(self):
        self.staged = []

    def receive_stage_guest(self, mid, models):
        self.staged.append((mid, models))
        return {'staged': len(models)}


class _OldEndpoint:
    """An agent of API 1.5: no receive_stage_guest."""

    target = messaging.Target(version='1.5')

    def receive_status(self, context, migration):
        return {'phase': 'compose'}


class TestStageGuest(base.TestCase):

    def setUp(self):
        super().setUp()
        conf = cfg.ConfigOpts()
        self.transport = api.get_transport(conf, url='fake://')
        self.addCleanup(self.transport.cleanup)

    def serve(self, name, endpoint):
        server = messaging.get_rpc_server(
            self.transport, messaging.Target(
                topic=api.transport_topic(self.transport), server=name),
            [endpoint], executor='threading')
        server.start()

        def stop():
            server.stop()
            server.wait()
        self.addCleanup(stop)
        return api.RemotePeer(api.AgentAPI(
            self.transport, name, timeout=10, credential=None, trust=None))

    def test_a_1_6_destination_takes_the_models(self):
        manager = _Manager()
        endpoint = agent_mod.AgentEndpoint.__new__(agent_mod.AgentEndpoint)
        endpoint.manager, endpoint._guard = manager, None
        peer = self.serve('new', endpoint)
        models = [{'index': 0, 'generations': 'eJwDAAAAAAE='}]
        self.assertEqual({'staged': 1}, peer.stage_guest('m1', models))
        self.assertEqual([('m1', models)], manager.staged)
        # models that are not a list are refused by name
        exc = self.assertRaises(arguments.InvalidArgument,
                                peer.stage_guest, 'm1', {'index': 0})
        self.assertIn('models', str(exc))
        self.assertEqual(1, len(manager.staged))

    def test_an_older_destination_answers_none(self):
        peer = self.serve('old', _OldEndpoint())
        self.assertIsNone(peer.stage_guest('m1', [{'index': 0}]))
        # (and it still answers what it knows)
        self.assertEqual({'phase': 'compose'}, peer.status('m1'))
