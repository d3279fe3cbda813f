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

"""The Orchestrator Extension's translation, without IO."""

import doctest
import io
import json

import fixtures
import oslo_messaging as messaging

from tests import base
from xsm_driver.cloudstack import extension
from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod

MAC0 = '02:00:00:00:00:0a'
MAC1 = '02:00:00:00:00:0b'


def load_tests(loader, tests, ignore):
    tests.addTests(doctest.DocTestSuite(extension))
    # the VIF entries (MAC@NETWORK) the extension makes and matches
    tests.addTests(doctest.DocTestSuite(host_mod))
    return tests


class FakeAgent:

    def __init__(self, name, srs=('sr-a',)):
        self.name = name
        self.srs = list(srs)
        self.vms = {}
        self.migrations = []
        self.calls = []
        self.fail = {}
        self.qemu = True

    def _call(self, method, *args):
        self.calls.append((method,) + args)
        if method in self.fail:
            raise self.fail[method]

    def host_info(self):
        self._call('host_info')
        return {'name': self.name, 'srs': [{'name': s} for s in self.srs]}

    def vm_list(self):
        self._call('vm_list')
        return [dict(v) for v in self.vms.values()]

    def vm_create(self, name, disks, vifs=(), qemu=None):
        self._call('vm_create', name, disks, list(vifs), qemu)
        uuid = 'uuid-%s' % name
        self.vms[uuid] = {'uuid': uuid, 'name': name, 'vifs': list(vifs),
                          'power_state': 'halted', 'disks': [
                              {'name': 'xvd' + 'ab'[i], 'vdi': 'vdi-%d' % i,
                               'sr': d['sr']} for i, d in enumerate(disks)]}
        return dict(self.vms[uuid])

    def vm_get(self, vm):
        self._call('vm_get', vm)
        return dict(self.vms[vm])

    def vm_reboot(self, vm):
        self._call('vm_reboot', vm)
        if not self.qemu:
            raise host_mod.InvalidVMState(vm=vm, host=self.name,
                                          state='running', action='reboot',
                                          needed='running in QEMU')

    def vm_pause(self, vm):
        self._call('vm_pause', vm)
        self.vms[vm]['power_state'] = 'paused'
        return dict(self.vms[vm])

    def vm_resume(self, vm):
        self._call('vm_resume', vm)
        self.vms[vm]['power_state'] = 'running'
        return dict(self.vms[vm])

    def vm_start(self, vm):
        self._call('vm_start', vm)
        self.vms[vm]['power_state'] = 'running'

    def vm_stop(self, vm, clean=None, timeout=None):
        self._call('vm_stop', vm, clean, timeout)
        self.vms[vm]['power_state'] = 'halted'
        # (a guest that powers off by itself within any timeout)
        return dict(self.vms[vm], clean=clean is not False)

    def vm_destroy(self, vm):
        self._call('vm_destroy', vm)
        del self.vms[vm]

    def migration_list(self):
        self._call('migration_list')
        return list(self.migrations)

    def migrate_vm(self, vm, dest, vdi_map, vif_map):
        self._call('migrate_vm', vm, dest, vdi_map, vif_map)
        return 'mig-1'

    def migration_get(self, mid):
        self._call('migration_get', mid)
        return self.statuses.pop(0)

    def migration_abort(self, mid):
        self._call('migration_abort', mid)


def request(host='a', name='i-2-7-VM', parameters=None, **vm):
    data = {'externaldetails': {
        'extension': {'xsm_hosts': 'a,b', 'xsm_sr': 'sr-a'},
        'host': {'xsm_host': host}, 'virtualmachine': vm},
        'cloudstack.vm.details': {'name': name, 'cpus': 1,
                                  'minRam': 1 << 29, 'nics': [
                                      {'deviceId': 1, 'mac': MAC1.upper(),
                                       'broadcastUri': 'vlan://7'},
                                      {'deviceId': 0, 'mac': MAC0,
                                       'broadcastUri': 'vlan://untagged'}]}}
    if parameters is not None:
        data['parameters'] = parameters
    return data


class TestExtension(base.TestCase):

    def setUp(self):
        super().setUp()
        self.agents = {'a': FakeAgent('a'),
                       'b': FakeAgent('b', ('sr-b', 'raw-b'))}
        self.now = [0.0]

    def client(self, host):
        if host not in self.agents:
            raise exception.XSMError('host %s is not a trusted host' % host)
        return self.agents[host]

    def ext(self, timeout=600):
        def sleep(seconds):
            self.now[0] += seconds
        return extension.Extension(self.client, timeout=timeout,
                                   clock=lambda: self.now[0], sleep=sleep)

    def run_action(self, action, req):
        return self.ext().run(action, req)

    def created(self):
        self.run_action('create', request())
        return self.agents['a'].vms['uuid-i-2-7-VM']

    def test_create_starts_the_vm_with_nics_in_device_order(self):
        answer = self.run_action('create', request())
        self.assertEqual('success', answer['status'])
        vm = self.agents['a'].vms['uuid-i-2-7-VM']
        self.assertEqual('running', vm['power_state'])
        self.assertEqual([MAC0 + '@guest', MAC1 + '@vlan-7'], vm['vifs'])
        call = self.agents['a'].calls[1]
        self.assertEqual(1 << 30, call[2][0]['size'])
        # the offering's memory (bytes) and vCPUs: the QEMU guest's
        self.assertEqual({'memory_mib': 512, 'vcpus': 1}, call[4])

    def test_wrong_memory_cpus_or_mac_are_refused_before_any_call(self):
        for key, value, text in (
                ('minRam', 'lots', 'minRam must be a positive number of '
                 'bytes'),
                ('cpus', True, 'cpus must be a positive number'),
                ('nics', [{'deviceId': 0, 'mac': 'zz'}],
                 "MAC 'zz', which is not a MAC address")):
            req = request()
            req['cloudstack.vm.details'][key] = value
            exc = self.assertRaises(extension.ExtensionError,
                                    self.run_action, 'create', req)
            self.assertIn(text, exc.message)
        self.assertEqual([], [c for c in self.agents['a'].calls
                              if c[0] == 'vm_create'])

    def test_disks_from_the_vms_own_details(self):
        req = request()
        req['cloudstack.vm.details']['details'] = {'xsm_disks': 'sr-a:2M'}
        self.assertEqual([{'sr': 'sr-a', 'size': 2 << 20}],
                         extension.disks_of(req, {}))
        exc = self.assertRaises(extension.ExtensionError, extension.disks_of,
                                request(xsm_disks='sr-a'), {})
        self.assertIn('is not SR:SIZE', exc.message)
        exc = self.assertRaises(extension.ExtensionError, extension.disks_of,
                                request(xsm_disks='sr-a:lots'), {})
        self.assertIn('xsm_disks', exc.message)

    def test_main_refuses_wrong_calls_with_one_json_error(self):
        from xsm_driver.cmd import cloudstack_extension as cmd
        out = io.StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', out))
        self.assertEqual(2, cmd.main(['status']))
        self.assertEqual(1, cmd.main(['status', '/nonexistent/x.json']))
        answers = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([['error'], ['error']], [list(a) for a in answers])
        self.assertIn('cannot read the JSON file', answers[1]['error'])

    def test_create_destroys_what_it_made_when_start_fails(self):
        self.agents['a'].fail['vm_start'] = exception.XSMError('no space')
        status, answer = extension.answer(
            'create', json.dumps(request()), lambda conf: self.client)
        self.assertEqual(1, status)
        self.assertEqual({'error': 'no space'}, answer)
        self.assertEqual({}, self.agents['a'].vms)

    def test_status_stop_delete(self):
        self.created()
        self.assertEqual('poweron', self.run_action(
            'status', request())['power_state'])
        self.run_action('stop', request())
        self.assertEqual('poweroff', self.run_action(
            'status', request())['power_state'])
        self.run_action('delete', request())
        self.assertEqual({}, self.agents['a'].vms)
        self.assertEqual('success', self.run_action(
            'delete', request())['status'])

    def test_stop_is_clean_within_xsm_stop_timeout(self):
        vm = self.created()

        def stops():
            return [c[2:] for c in self.agents['a'].calls
                    if c[0] == 'vm_stop']
        answer = self.run_action('stop', request())
        self.assertEqual('Instance stopped (powered off)', answer['message'])
        self.assertEqual([(True, extension.DEFAULT_STOP_TIMEOUT)], stops())
        # the VM's detail wins over the extension's; 0: killed at once
        self.agents['a'].calls = []
        req = request(xsm_stop_timeout='0')
        req['externaldetails']['extension']['xsm_stop_timeout'] = '90'
        self.run_action('stop', req)
        self.assertEqual([(False, None)], stops())
        # the host's; cut to what CloudStack's timeout leaves (60 - 5 -
        # 20 s)
        self.agents['a'].calls = []
        req = request()
        req['externaldetails']['host']['xsm_stop_timeout'] = 600
        self.ext(timeout=60).run('stop', req)
        self.assertEqual([(True, 35)], stops())
        # a guest that was killed after the timeout: said so
        self.agents['a'].calls = []
        self.agents['a'].vm_stop = lambda uuid, clean=None, timeout=None: \
            dict(vm, clean=False)
        answer = self.run_action('stop', request(xsm_stop_timeout='7'))
        self.assertEqual('Instance stopped (killed: no power-off within '
                         '7 s)', answer['message'])

    def test_a_wrong_xsm_stop_timeout_is_refused_by_name(self):
        self.created()
        for value in ('-1', '601', 'soon', '1.5', True):
            exc = self.assertRaises(extension.ExtensionError,
                                    self.run_action, 'stop',
                                    request(xsm_stop_timeout=value))
            self.assertIn('xsm_stop_timeout must be a whole number of '
                          'seconds in [0, 600], not %r' % (value,),
                          exc.message)
        self.assertEqual([], [c for c in self.agents['a'].calls
                              if c[0] == 'vm_stop'])

    def test_a_vm_that_moved_is_found_on_another_host(self):
        vm = self.created()
        self.agents['b'].vms[vm['uuid']] = self.agents['a'].vms.pop(
            vm['uuid'])
        answer = self.run_action('status', request('a'))
        self.assertEqual(('b', 'poweron'), (answer['host'],
                                            answer['power_state']))

    def test_unknown_action(self):
        status, answer = extension.answer(
            'hibernate', json.dumps(request()), lambda conf: self.client)
        self.assertEqual(1, status)
        self.assertEqual(['error'], list(answer))

    def test_suspend_resume_and_reboot(self):
        vm = self.created()
        self.run_action('suspend', request())
        self.assertEqual('paused', vm['power_state'])
        self.run_action('resume', request())
        self.assertEqual('running', vm['power_state'])
        self.run_action('reboot', request())
        self.assertEqual(['vm_pause', 'vm_resume', 'vm_reboot'], [
            c[0] for c in self.agents['a'].calls
            if c[0] in ('vm_pause', 'vm_resume', 'vm_reboot', 'vm_stop')])
        # a model guest (no QEMU): stop and start
        self.agents['a'].qemu = False
        self.agents['a'].calls = []
        self.run_action('reboot', request())
        self.assertEqual(['vm_reboot', 'vm_stop', 'vm_start'],
                         [c[0] for c in self.agents['a'].calls
                          if c[0].startswith('vm_') and c[0] not in (
                              'vm_list', 'vm_get')])

    def test_a_remote_traceback_never_reaches_the_answer(self):
        # as oslo.messaging rebuilds a remote error: the remote traceback
        # appended to its message
        text = 'boom\nTraceback (most recent call last):\n  File "/opt/x.py"'
        remote = type('XSMError_Remote', (exception.XSMError,),
                      {'__str__': lambda self: text})('boom')
        self.agents['a'].fail['vm_list'] = remote
        status, answer = extension.answer(
            'status', json.dumps(request()), lambda conf: self.client)
        self.assertEqual(1, status)
        self.assertNotIn('Traceback', answer['error'])
        self.assertNotIn('/opt/x.py', answer['error'])
        err = messaging.RemoteError('ValueError', 'bad', 'Traceback ...')
        self.assertEqual('ValueError: bad', extension.describe(err))

    def test_unknown_host_is_an_error(self):
        status, answer = extension.answer(
            'status', json.dumps(request('zz')), lambda conf: self.client)
        self.assertEqual(1, status)
        self.assertIn('zz', answer['error'])

    def test_migrate_waits_for_the_end(self):
        vm = self.created()
        self.agents['a'].statuses = [
            {'id': 'mig-1', 'phase': 'copy', 'finished': None},
            {'id': 'mig-1', 'phase': 'done', 'finished': 5.0,
             'result': {'vdis': {'vdi-0': 'new-0'}}}]
        answer = self.run_action('migratevmwithvolume', request(
            parameters={'Host': 'b', 'pools': 'xvda=raw-b', 'sr': 'sr-b'}))
        call = [c for c in self.agents['a'].calls if c[0] == 'migrate_vm'][0]
        self.assertEqual((vm['uuid'], 'b', {'vdi-0': 'raw-b'},
                          {MAC1 + '@vlan-7': MAC1 + '@vlan-7',
                           MAC0 + '@guest': MAC0 + '@guest'}), call[1:])
        self.assertEqual('done', answer['message']['phase'])
        self.assertEqual({'vdi-0': 'new-0'}, answer['message']['volumes'])

    def test_migrate_refusals(self):
        self.created()
        for params, text in (
                ({}, 'needs the parameter host'),
                ({'host': 'a', 'pool': 'sr-b'}, 'already on host a'),
                ({'host': 'b'}, 'no destination storage'),
                ({'host': 'b', 'pool': 'nope'}, 'has no SR nope'),
                ({'host': 'b', 'pools': 'sr-b,sr-b,sr-b'}, 'names 3 SRs')):
            exc = self.assertRaises(
                extension.ExtensionError, self.run_action,
                'migratevmwithvolume', request(parameters=params))
            self.assertIn(text, exc.message)
        self.agents['a'].migrations = [{'id': 'm0', 'vm': 'uuid-i-2-7-VM',
                                        'phase': 'copy', 'finished': None}]
        exc = self.assertRaises(
            extension.ExtensionError, self.run_action,
            'migratevmwithvolume', request(parameters={'host': 'b',
                                                       'pool': 'sr-b'}))
        self.assertIn('already migrating', exc.message)

    def test_migrate_failure_and_in_doubt_are_errors(self):
        self.created()
        for status, text in (
                ({'id': 'mig-1', 'phase': 'aborted', 'finished': 1,
                  'error': 'no space\nTraceback (most recent call last):'},
                 'ended aborted: no space'),
                ({'id': 'mig-1', 'phase': 'in-doubt', 'finished': 1,
                  'source': 'a'}, 'xsm-migrate resolve mig-1')):
            self.agents['a'].statuses = [status]
            exc = self.assertRaises(
                extension.ExtensionError, self.run_action,
                'migratevmwithvolume', request(parameters={'host': 'b',
                                                           'pool': 'sr-b'}))
            self.assertIn(text, exc.message)
            self.assertNotIn('Traceback', exc.message)

    def test_migrate_answers_before_cloudstack_gives_up(self):
        self.created()
        self.agents['a'].statuses = [
            {'id': 'mig-1', 'phase': 'copy', 'finished': None}] * 1000
        answer = self.ext(timeout=10).run('migratevmwithvolume', request(
            parameters={'host': 'b', 'pool': 'sr-b'}))
        self.assertIn('migrationstatus', answer['note'])
        self.assertLessEqual(self.now[0], 10)

    def test_status_and_abort_of_a_migration(self):
        self.created()
        running = {'id': 'm0', 'vm': 'uuid-i-2-7-VM', 'vm_name': 'i-2-7-VM',
                   'phase': 'copy', 'finished': None, 'started': 1,
                   'progress': {'done': 1, 'total': 4}}
        self.agents['a'].migrations = [running]
        answer = self.run_action('migrationstatus', request())
        self.assertEqual(25.0, answer['message']['percent'])
        self.agents['a'].statuses = [dict(running, phase='aborted',
                                          finished=2)]
        answer = self.run_action('abortmigration', request())
        self.assertIn(('migration_abort', 'm0'), self.agents['a'].calls)
        self.assertEqual('aborted', answer['message']['phase'])

    def test_migrate_matches_nics_by_mac(self):
        vm = self.created()
        self.agents['a'].statuses = [
            {'id': 'mig-1', 'phase': 'done', 'finished': 5.0}]
        # CloudStack lists the NICs the other way round, the first now on
        # VLAN 9: each VIF follows the NIC of its MAC, not its position
        req = request(parameters={'host': 'b', 'pool': 'sr-b'})
        req['cloudstack.vm.details']['nics'] = [
            {'deviceId': 0, 'mac': MAC1, 'broadcastUri': 'vlan://7'},
            {'deviceId': 1, 'mac': MAC0, 'broadcastUri': 'vlan://9'}]
        self.run_action('migratevmwithvolume', req)
        call = [c for c in self.agents['a'].calls if c[0] == 'migrate_vm'][0]
        self.assertEqual({MAC0 + '@guest': MAC0 + '@vlan-9',
                          MAC1 + '@vlan-7': MAC1 + '@vlan-7'}, call[4])
        self.assertEqual(vm['uuid'], call[1])

    def test_migrate_refuses_macs_that_match_nothing(self):
        self.created()
        for nics, text in (
                ([{'deviceId': 0, 'mac': MAC0},
                  {'deviceId': 1, 'mac': '02:00:00:00:00:ff'}],
                 'VIF with MAC %s (network vlan-7) that matches no NIC'
                 % MAC1),
                ([{'deviceId': 0, 'mac': MAC0}, {'deviceId': 1, 'mac': MAC1},
                  {'deviceId': 2, 'mac': '02:00:00:00:00:ff'}],
                 'deviceId 2 and MAC 02:00:00:00:00:ff of '
                 'cloudstack.vm.details.nics matches no VIF')):
            req = request(parameters={'host': 'b', 'pool': 'sr-b'})
            req['cloudstack.vm.details']['nics'] = nics
            exc = self.assertRaises(extension.ExtensionError,
                                    self.run_action, 'migratevmwithvolume',
                                    req)
            self.assertIn(text, exc.message)
        self.assertEqual([], [c for c in self.agents['a'].calls
                              if c[0] == 'migrate_vm'])

    def test_vifs_without_macs_keep_their_network(self):
        vm = self.created()
        vm['vifs'] = ['guest', 'vlan-7']        # made before MACs were kept
        self.agents['a'].statuses = [
            {'id': 'mig-1', 'phase': 'done', 'finished': 5.0}]
        self.run_action('migratevmwithvolume', request(
            parameters={'host': 'b', 'pool': 'sr-b'}))
        call = [c for c in self.agents['a'].calls if c[0] == 'migrate_vm'][0]
        self.assertEqual({'guest': 'guest', 'vlan-7': 'vlan-7'}, call[4])

    def test_memory_the_host_refuses_is_named(self):
        # as the agent's refusal comes over a real bus
        self.agents['a'].fail['vm_create'] = messaging.RemoteError(
            'InvalidGuestOptions', 'invalid guest options: memory_mib must '
            'be int in [16, 1048576], not 4', 'Traceback ...')
        status, answer = extension.answer(
            'create', json.dumps(request()), lambda conf: self.client)
        self.assertEqual(1, status)
        self.assertEqual(
            'host a refuses the memory or vCPUs of VM i-2-7-VM (minRam '
            '536870912 bytes, cpus 1): InvalidGuestOptions: invalid guest '
            'options: memory_mib must be int in [16, 1048576], not 4',
            answer['error'])
        # any other error is not about memory
        self.agents['a'].fail['vm_create'] = exception.XSMError('no space')
        status, answer = extension.answer(
            'create', json.dumps(request()), lambda conf: self.client)
        self.assertEqual({'error': 'no space'}, answer)
