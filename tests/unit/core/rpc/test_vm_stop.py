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

"""vm_stop's ``clean`` and ``timeout`` (RPC 1.5): what is refused, where.

One agent on oslo.messaging's in-process ``fake://`` transport, its host
with a real VHD SR and the model guest (no QEMU: the clean stops of a
QEMU guest are in tests/functional/core/migration/test_qemu_stop.py).
"""

import os

from oslo_config import cfg

from tests import base
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import arguments

MiB = 1 << 20


class TestVMStopArguments(base.TestCase):

    def setUp(self):
        super().setUp()
        root = self.make_tempdir()
        self.transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
        self.host = host_mod.Host.from_config(
            'host-a', ['sr:vhd:%s' % os.path.join(root, 'sr')],
            os.path.join(root, 'state'))
        agent = agent_mod.Agent(self.transport, self.host,
                                manager_mod.Options(chunk=1 * MiB),
                                rpc_timeout=20).start()
        self.addCleanup(agent.stop)
        self.api = api.AgentAPI(self.transport, 'host-a', timeout=30)
        self.vm = self.api.vm_create('vm', [{'sr': 'sr', 'size': 4 * MiB}])
        self.api.vm_start(self.vm['uuid'])

    def test_the_client_refuses_what_it_cannot_mean(self):
        uuid = self.vm['uuid']
        for kwargs, text in (
                ({'clean': 'yes'}, "clean must be True or False, not 'yes'"),
                ({'clean': 1}, 'clean must be True or False, not 1'),
                ({'timeout': 5},
                 'a timeout is for a clean stop only (clean=True)'),
                ({'clean': False, 'timeout': 5},
                 'a timeout is for a clean stop only (clean=True)'),
                ({'clean': True, 'timeout': 0},
                 'timeout must be a number of seconds in (0, 600], not 0'),
                ({'clean': True, 'timeout': 601},
                 'timeout must be a number of seconds in (0, 600], not '
                 '601'),
                ({'clean': True, 'timeout': True},
                 'timeout must be a number of seconds in (0, 600], not '
                 'True'),
                ({'clean': True, 'timeout': '30'},
                 "timeout must be a number of seconds in (0, 600], not "
                 "'30'")):
            exc = self.assertRaises(ValueError, self.api.vm_stop, uuid,
                                    **kwargs)
            self.assertEqual(text, str(exc), kwargs)
        # nothing reached the agent: the VM still runs
        self.assertEqual('running', self.api.vm_get(uuid)['power_state'])

    def test_the_agent_refuses_what_it_cannot_mean(self):
        # (as a caller that does not check them sends them)
        uuid = self.vm['uuid']
        for kwargs, text in (
                ({'clean': 'yes'}, "clean must be a JSON boolean, not "
                 "'yes'"),
                ({'clean': 0}, 'clean must be a JSON boolean, not 0'),
                ({'timeout': 5}, 'give it with clean=true only'),
                ({'clean': False, 'timeout': 5},
                 'give it with clean=true only'),
                ({'clean': True, 'timeout': 0},
                 'timeout must be in (0, 600] seconds, not 0'),
                ({'clean': True, 'timeout': 1e9},
                 'timeout must be in (0, 600] seconds, not 1000000000.0'),
                ({'clean': True, 'timeout': 'soon'},
                 "argument timeout must be a JSON finite number, not "
                 "'soon'")):
            exc = self.assertRaises(
                arguments.InvalidArgument, self.api.call_with, 'vm_stop',
                dict(kwargs, vm=uuid), version='1.5')
            self.assertIn('RPC call vm_stop: ', str(exc), kwargs)
            self.assertIn(text, str(exc), kwargs)
        self.assertEqual('running', self.api.vm_get(uuid)['power_state'])

    def test_old_and_new_calls_stop_a_model_guest(self):
        uuid = self.vm['uuid']
        # a caller of before 1.5: the base version, no "clean" asked
        stopped = self.api.call('vm_stop', vm=uuid)
        self.assertEqual('halted', stopped['power_state'])
        self.assertTrue(stopped['clean'])         # nothing was killed
        self.api.vm_start(uuid)
        stopped = self.api.vm_stop(uuid, clean=True, timeout=0.5)
        self.assertEqual('halted', stopped['power_state'])
        self.assertTrue(stopped['clean'])
        self.assertEqual(host_mod.HALTED, self.host.vm(uuid).power_state)
        # a halted VM stops again, at once
        self.assertTrue(self.api.vm_stop(uuid, clean=False)['clean'])

    def test_the_versions(self):
        self.assertEqual('1.6', api.VERSION)
        self.assertEqual('1.6', agent_mod.AgentEndpoint.target.version)
        self.assertIn('* 1.5 - clean stops', api.__doc__)
