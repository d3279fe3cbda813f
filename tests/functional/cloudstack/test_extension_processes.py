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

"""The Orchestrator Extension executable, run as CloudStack runs it.

Each action is a separate ``xsm-cloudstack-extension ACTION FILE TIMEOUT``
process (the console script installed beside this interpreter) given a
JSON file shaped as CloudStack's management server writes it
(``cloudstack.vm.details``,
``externaldetails.extension/host/virtualmachine``, ``parameters``,
``virtualmachinename``, ``caller``), against two xsm-agent processes on the
real RabbitMQ.
"""

import json
import os
import subprocess
import sys
import uuid as uuidlib

import oslo_messaging as messaging

from tests import base
from tests.functional.core.migration import fixtures

MiB = fixtures.MiB


MAC = '02:00:2a:00:00:01'


class ExtensionCase(fixtures.RabbitAgentsFixture):
    """Two agents, and the extension run as CloudStack runs it."""

    def setUp(self):
        super().setUp()
        self.folder = os.path.join(self.root, 'extension')
        os.makedirs(self.folder)
        self.config = os.path.join(self.folder, 'xsm-driver.conf')
        with open(self.config, 'w') as f:
            f.write('\n'.join(
                ['[DEFAULT]', 'transport_url = %s' % fixtures.RABBIT_URL,
                 'control_exchange = %s' % self.exchange,
                 'rpc_response_timeout = 30', ''] +
                fixtures.keyring(self.exchange).client_lines() + ['']))
        self.host_a = self.agents['a'].name
        self.host_b = self.agents['b'].name
        self.vm_uuid = str(uuidlib.uuid4())
        self.calls = 0

    def payload(self, host, parameters=None, vm_details=None, nics=None,
                min_ram=512 * MiB):
        """A JSON file's content, as CloudStack writes it."""
        if nics is None:
            nics = [{'deviceId': 0, 'mac': MAC, 'broadcastUri': 'vlan://120',
                     'defaultNic': True, 'ip': '10.1.1.42'}]
        data = {
            'externaldetails': {
                'extension': {'xsm_config_file': self.config,
                              'xsm_hosts': '%s,%s' % (self.host_a,
                                                      self.host_b)},
                'host': {'xsm_host': host, 'xsm_sr': 'sr-' + (
                    'a' if host == self.host_a else 'b')},
                'virtualmachine': dict({'xsm_disks': 'sr-a:8M,sr-a:4M'},
                                       **(vm_details or {})),
            },
            'virtualmachineid': self.vm_uuid,
            'virtualmachinename': 'i-2-42-VM',
            'cloudstack.vm.details': {
                'id': 42, 'name': 'i-2-42-VM', 'uuid': self.vm_uuid,
                'type': 'User', 'cpus': 1, 'minRam': min_ram,
                'maxRam': min_ram, 'arch': 'x86_64', 'nics': nics,
                'details': {}},
            'caller': {'name': 'admin', 'roletype': 'Admin',
                       'type': 'ADMIN', 'rolename': 'Root Admin'},
        }
        if parameters is not None:
            data['parameters'] = parameters
        return json.dumps(data)

    def run_action(self, action, text, timeout=120):
        """``(exit status, answer)`` of one extension process."""
        self.calls += 1
        path = os.path.join(self.folder, '%d-%s.json' % (self.calls, action))
        with open(path, 'w') as f:
            f.write(text)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [base.REPO_TOP] + [p for p in [os.environ.get('PYTHONPATH')]
                               if p]))
        script = os.path.join(os.path.dirname(sys.executable),
                              'xsm-cloudstack-extension')
        if not os.path.exists(script):
            self.missing('xsm-cloudstack-extension is not installed beside '
                         '%s: pip install -e .' % sys.executable)
        proc = subprocess.run(
            [script, action, path, str(timeout)], stdin=subprocess.DEVNULL,
            capture_output=True, text=True, cwd=base.REPO_TOP, env=env,
            timeout=timeout + 30)
        lines = proc.stdout.strip().splitlines()
        self.assertEqual(1, len(lines), 'one JSON line expected on stdout '
                         'of %s, got %r; stderr: %s' % (action, proc.stdout,
                                                        proc.stderr))
        answer = json.loads(lines[0])
        self.assertNotIn('Traceback', proc.stdout)
        return proc.returncode, answer

    def ok(self, action, text):
        status, answer = self.run_action(action, text)
        self.assertEqual(0, status, answer)
        self.assertEqual('success', answer.get('status'), answer)
        return answer

    def refused(self, action, text):
        status, answer = self.run_action(action, text)
        self.assertNotEqual(0, status, answer)
        self.assertEqual(['error'], list(answer), answer)
        self.assertIsInstance(answer['error'], str)
        self.assertNotIn('Traceback', answer['error'])
        return answer['error']


class TestExtensionProcesses(ExtensionCase):
    """Agents whose guests are the model guest (no QEMU)."""

    def test_lifecycle_and_live_migration_with_volumes(self):
        on_a = self.payload(self.host_a)
        answer = self.ok('prepare', on_a)
        self.assertEqual({'xsm_host': self.host_a}, answer['details'])
        self.ok('create', on_a)
        [vm] = self.a.vm_list()
        self.assertEqual('i-2-42-VM', vm['name'])
        self.assertEqual('running', vm['power_state'])
        # the NIC's VIF keeps its MAC
        self.assertEqual([MAC + '@vlan-120'], vm['vifs'])
        self.assertEqual({'memory_mib': 512, 'vcpus': 1}, vm['qemu'])
        self.assertEqual([('sr-a', 8 * MiB), ('sr-a', 4 * MiB)], [
            (d['sr'], v['size']) for d in vm['disks']
            for v in self.a.vdi_list() if v['uuid'] == d['vdi']])
        self.assertEqual('poweron', self.ok('status', on_a)['power_state'])
        self.assertEqual('poweroff', self.ok('stop', on_a)['power_state'])
        self.assertEqual('poweroff', self.ok('status', on_a)['power_state'])
        self.ok('start', on_a)
        # a model guest is rebooted by stop and start
        self.ok('reboot', on_a)
        self.assertEqual('poweron', self.ok('status', on_a)['power_state'])
        self.ok('suspend', on_a)
        self.assertEqual('paused', self.a.vm_get(vm['uuid'])['power_state'])
        self.ok('resume', on_a)
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.a.guest_start(vm['uuid'], rate=200, fill=0.5)

        answer = self.ok('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': self.host_b,
                                     'pools': 'sr-b,raw-b'}))
        self.assertEqual('true', answer['printmessage'])
        self.assertEqual('done', answer['message']['phase'])
        self.assertEqual(self.host_b, answer['host'])
        self.assertEqual([], self.a.vm_list())
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual(['sr-b', 'raw-b'], [d['sr'] for d in moved['disks']])
        self.assertEqual('running', moved['power_state'])
        # the VIF moved with its MAC (found by it among CloudStack's NICs)
        self.assertEqual([MAC + '@vlan-120'], moved['vifs'])
        check = self.b.guest_verify(vm['uuid'])
        self.assertTrue(check['verified'], check)

        status = self.ok('migrationstatus', on_a)
        self.assertEqual('done', status['message']['phase'])
        self.assertEqual(answer['migration'], status['migration'])
        self.assertIn('no running migration',
                      self.refused('abortmigration', on_a))

        on_b = self.payload(self.host_b)
        answer = self.ok('status', on_b)
        self.assertEqual('poweron', answer['power_state'])
        self.assertEqual(self.host_b, answer['host'])
        # CloudStack still names the old host: the VM is found where it is
        answer = self.ok('status', on_a)
        self.assertEqual(self.host_b, answer['host'])
        self.assertEqual('poweroff', self.ok('stop', on_b)['power_state'])
        self.assertEqual('halted', self.b.vm_get(vm['uuid'])['power_state'])
        self.ok('delete', on_b)
        self.assertEqual([], self.b.vm_list())
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], [v for v in self.b.vdi_list()
                              if v['uuid'] in {d['vdi']
                                               for d in moved['disks']}])
        # deleting again is no error, as CloudStack's own extensions answer
        self.ok('delete', on_b)
        self.assertIn('none of the hosts', self.refused('status', on_b))

    def test_refusals_are_one_json_error_and_a_nonzero_exit(self):
        self.assertIn('not valid JSON', self.refused('status', '{"bad'))
        self.assertIn('one JSON object', self.refused('status', '[1, 2]'))
        self.assertIn('unknown action', self.refused(
            'hibernate', self.payload(self.host_a)))
        error = self.refused('status', self.payload('no-such-host'))
        self.assertIn('no-such-host', error)
        error = self.refused('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': self.host_b, 'pool': 'sr-b'}))
        self.assertIn('none of the hosts', error)
        self.ok('create', self.payload(self.host_a))
        error = self.refused('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': 'no-such-host',
                                     'pool': 'sr-b'}))
        self.assertIn('no-such-host', error)
        error = self.refused('migratevmwithvolume', self.payload(
            self.host_a, parameters={'host': self.host_b, 'pool': 'nope'}))
        self.assertIn('has no SR nope', error)
        self.assertIn('already has a VM', self.refused(
            'create', self.payload(self.host_a)))
        self.assertIn('xsm_host', self.refused('status', json.dumps(
            {'cloudstack.vm.details': {'name': 'i-2-42-VM'},
             'externaldetails': {'host': {}}})))
        status, answer = self.run_action('status', '{}')
        self.assertNotEqual(0, status)
        # the agent itself refuses a VIF with a wrong MAC, naming it (an
        # error of the agent's argument checks comes as a RemoteError)
        exc = self.assertRaises(messaging.RemoteError, self.a.vm_create,
                                'i-2-43-VM', [], [{'network': 'guest',
                                                   'mac': '02:00:zz'}])
        self.assertEqual('InvalidArgument', exc.exc_type)
        self.assertIn("vifs[0]: mac must be a MAC address", exc.value)
        self.assertIn("'02:00:zz'", exc.value)
        # the VM is where it was, untouched
        [vm] = self.a.vm_list()
        self.assertEqual('running', vm['power_state'])
