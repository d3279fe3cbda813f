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

"""The API service's pieces without hosts: jobs, errors, HTTP shapes."""

import datetime
import doctest
import io
import json
from urllib import parse

import oslo_messaging as messaging

from tests import base
from xsm_driver.cloudstack import api as api_mod
from xsm_driver.cloudstack import inventory
from xsm_driver.cloudstack import jobs as jobs_mod
from xsm_driver.cloudstack import resource as resource_mod
from xsm_driver.cloudstack import signature
from xsm_driver.cloudstack import wsgi
from xsm_driver.core import exception
from xsm_driver.core.migration import errors


def load_tests(loader, tests, ignore):
    for module in (api_mod, inventory, jobs_mod, resource_mod):
        tests.addTests(doctest.DocTestSuite(module))
    return tests


NOW = datetime.datetime(2026, 11, 26, 12, 0, 0,
                        tzinfo=datetime.timezone.utc)


class TestJobs(base.TestCase):

    check_leaks = True

    def run_job(self, func):
        jobs = jobs_mod.Jobs(retention=60)
        job = jobs.submit(func, 'Cmd', 'VirtualMachine', 'vm-1')
        self.assertTrue(job.done.wait(10))
        self.assertIs(job, jobs.get(job.id))
        return job.to_response()

    def test_success(self):
        out = self.run_job(lambda: {'virtualmachine': {'id': 'vm-1'}})
        self.assertEqual((1, 0, {'virtualmachine': {'id': 'vm-1'}}),
                         (out['jobstatus'], out['jobresultcode'],
                          out['jobresult']))
        self.assertEqual(('VirtualMachine', 'vm-1'),
                         (out['jobinstancetype'], out['jobinstanceid']))

    def test_failure_with_a_code(self):
        def fail():
            raise jobs_mod.JobFailed(533, 'no room')
        out = self.run_job(fail)
        # CloudStack's ExceptionResponse: uuidList, errorcode, cserrorcode,
        # errortext (was errorcode and errortext only)
        self.assertEqual((2, 533, {'uuidList': [], 'errorcode': 533,
                                   'cserrorcode': 4250,
                                   'errortext': 'no room'}),
                         (out['jobstatus'], out['jobresultcode'],
                          out['jobresult']))

    def test_an_unexpected_error_is_530(self):
        out = self.run_job(lambda: 1 / 0)
        self.assertEqual(530, out['jobresult']['errorcode'])
        self.assertEqual(4250, out['jobresult']['cserrorcode'])
        self.assertIn('ZeroDivisionError', out['jobresult']['errortext'])

    def test_a_remote_traceback_never_reaches_the_result(self):
        def fail():
            raise RuntimeError('no room\nTraceback (most recent call '
                               'last):\n  File "/usr/lib/x.py", line 1')
        out = self.run_job(fail)
        self.assertEqual('RuntimeError: no room',
                         out['jobresult']['errortext'])

    def test_pending_jobs_have_no_result_and_old_ones_go(self):
        jobs = jobs_mod.Jobs(retention=60)
        job = jobs_mod.Job('Cmd')
        jobs._jobs[job.id] = job
        self.assertEqual(0, job.to_response()['jobstatus'])
        self.assertNotIn('jobresult', job.to_response())
        job.completed = jobs_mod._now() - datetime.timedelta(seconds=61)
        self.assertIsNone(jobs.get(job.id))


class TestErrorCodes(base.TestCase):

    def test_engine_errors_map_to_cloudstack_codes(self):
        self.assertEqual(533, api_mod.error_code(errors.InsufficientSpace(
            sr='s', needed=2, free=1)))
        self.assertEqual(534, api_mod.error_code(errors.TooManyMigrations(
            host='h', active=3, limit=3)))
        self.assertEqual(431, api_mod.error_code(errors.VDINotInMap(
            vdis=['v'])))
        self.assertEqual(530, api_mod.error_code(RuntimeError()))

    def test_remote_tracebacks_are_cut_from_messages(self):
        # oslo.messaging rebuilds a remote XSMError with the remote
        # traceback appended to its message
        remote = type('XSMError_Remote', (exception.XSMError,), {
            '__str__': lambda self: 'no room\nTraceback (most recent call '
            'last):\n  File "/usr/lib/python3/x.py", line 1'})('no room')
        self.assertEqual('no room', resource_mod.describe(remote))
        err = messaging.RemoteError('KeyError', "'x'", ['Traceback ...'])
        self.assertEqual("remote error: KeyError: 'x'",
                         resource_mod.describe(err))
        self.assertEqual(4325, api_mod.cs_error_code(533))
        self.assertEqual(4250, api_mod.cs_error_code(530))

    def test_a_nic_is_matched_by_mac_then_name_then_device(self):
        from xsm_driver.cloudstack import commands as cmds

        def nic(**fields):
            return cmds.Nic(fields, cmds.SEND)
        vifs = ['guest', '02:00:00:00:00:0a', 'storage']
        self.assertEqual('02:00:00:00:00:0a', resource_mod.nic_vif(
            vifs, nic(deviceId=0, mac='02:00:00:00:00:0A')))
        self.assertEqual('storage', resource_mod.nic_vif(
            vifs, nic(deviceId=0, name='storage', mac='02:ff')))
        self.assertEqual('guest', resource_mod.nic_vif(vifs, nic(deviceId=0)))
        self.assertIsNone(resource_mod.nic_vif(vifs, nic(deviceId=5)))

    def test_migrateto_is_read_in_index_order(self):
        params = {'migrateto[1].volume': 'v1', 'migrateto[1].pool': 'p1',
                  'migrateto[0].volume': 'v0', 'migrateto[0].pool': 'p0',
                  'MIGRATETO[10].Volume': 'v10', 'migrateto[10].pool': 'p10'}
        self.assertEqual([('v0', 'p0'), ('v1', 'p1'), ('v10', 'p10')],
                         api_mod.API._migrate_to(params))
        exc = self.assertRaises(api_mod.ApiError, api_mod.API._migrate_to,
                                {'migrateto[0].volume': 'v0'})
        self.assertEqual(431, exc.code)


class FakeAgent:

    def host_info(self):
        return {'name': 'host-a', 'srs': [{'name': 'sr-a', 'type': 'vhd',
                                           'size': 100, 'free': 100}]}

    def vm_list(self):
        return [{'uuid': 'vm-1', 'name': 'i-2-1-VM', 'vifs': [],
                 'power_state': 'running', 'disks': []}]

    def vdi_list(self):
        return []

    def migration_list(self):
        return []


class TestMigratingState(base.TestCase):

    def test_a_vm_a_job_of_ours_moves_is_listed_migrating(self):
        api = api_mod.API({'host-a': FakeAgent()}, None, jobs_mod.Jobs())
        [vm] = api.call('listVirtualMachines', {})['virtualmachine']
        self.assertEqual('Running', vm['state'])
        api._migrating.add('vm-1')
        [vm] = api.call('listVirtualMachines', {})['virtualmachine']
        self.assertEqual('Migrating', vm['state'])
        exc = self.assertRaises(api_mod.ApiError, api.call,
                                'migrateVirtualMachineWithVolume',
                                {'virtualmachineid': 'vm-1',
                                 'hostid': inventory.host_id('host-a')})
        self.assertEqual((431, 9999, 'VM ID: vm-1 is not in Running state '
                          'to migrate it to new host'),
                         (exc.code, exc.cserrorcode, exc.text))


class FakeAPI:
    clients = {'host-a': None}

    def knows(self, command):
        return command in ('listVolumes', 'listHosts')

    def call(self, command, params):
        if command == 'listVolumes':
            return {}
        raise api_mod.ApiError(431, 'Unable to execute API command '
                               'listhosts due to invalid value.')

    def resource(self, host):
        raise AssertionError('not called')


class TestApplication(base.TestCase):

    check_leaks = True

    def request(self, params, method='GET', path='/client/api', body=b'',
                headers=None, token=None):
        app = wsgi.Application(FakeAPI(), {'K': 'S'}, command_token=token,
                               now=lambda: NOW)
        environ = {'REQUEST_METHOD': method, 'PATH_INFO': path,
                   'QUERY_STRING': parse.urlencode(params),
                   'wsgi.input': io.BytesIO(body),
                   'CONTENT_LENGTH': str(len(body)),
                   'CONTENT_TYPE': 'application/x-www-form-urlencoded'}
        environ.update(headers or {})
        seen = {}

        def start_response(status, headers):
            seen['status'] = status
            seen['headers'] = dict(headers)
        data = b''.join(app(environ, start_response))
        self.assertEqual('application/json; charset=UTF-8',
                         seen['headers']['Content-Type'])
        return int(seen['status'].split()[0]), json.loads(data)

    @staticmethod
    def sign(params):
        params = dict(params, apiKey='K', signatureVersion='3',
                      expires='2026-11-26T12:05:00+0000', response='json')
        params['signature'] = signature.sign(params, 'S')
        return params

    def test_a_signed_call(self):
        self.assertEqual((200, {'listvolumesresponse': {}}),
                         self.request(self.sign({'command': 'listVolumes'})))

    def test_a_signed_post(self):
        body = parse.urlencode(self.sign({'command': 'listVolumes'}))
        self.assertEqual(200, self.request({}, 'POST',
                                           body=body.encode())[0])

    def test_401_has_cloudstacks_shape(self):
        params = self.sign({'command': 'listVolumes'})
        params['signature'] = 'AAAA'
        self.assertEqual((401, {'listvolumesresponse': {
            'uuidList': [], 'errorcode': 401,
            'errortext': signature.MESSAGE}}), self.request(params))

    def test_api_errors_use_their_code_as_http_status(self):
        code, body = self.request(self.sign({'command': 'listHosts'}))
        self.assertEqual((431, {'listhostsresponse': {
            'uuidList': [], 'errorcode': 431, 'cserrorcode': 9999,
            'errortext': 'Unable to execute API command listhosts due to '
                         'invalid value.'}}), (code, body))

    def test_an_unknown_command_is_432_before_the_signature(self):
        # ApiServer.verifyRequest: UNSUPPORTED_ACTION_ERROR, fixed text,
        # "errorresponse" (ApiServer.getSerializedApiError)
        expected = (432, {'errorresponse': {
            'uuidList': [], 'errorcode': 432, 'cserrorcode': 9999,
            'errortext': 'The given command does not exist or it is not '
                         'available for user'}})
        self.assertEqual(expected, self.request(
            self.sign({'command': 'rebootRouter'})))
        self.assertEqual(expected, self.request({'command': 'rebootRouter'}))
        self.assertEqual(expected, self.request({}))

    def test_the_command_endpoint_is_off_without_a_token(self):
        code, body = self.request({}, 'POST', '/xsm/v1/hosts/host-a/commands')
        self.assertEqual(403, code)
        self.assertIn('command_token', body['errortext'])

    def test_unknown_paths_are_404(self):
        self.assertEqual(404, self.request({}, path='/')[0])

    def test_a_body_that_is_not_utf8_gets_cloudstacks_error_shape(self):
        code, body = self.request({}, 'POST',
                                  body=b'command=listVolumes&name=\xff')
        self.assertEqual(431, code)
        self.assertEqual(431, body['errorresponse']['errorcode'])
        self.assertIn('the request body is not UTF-8 form data',
                      body['errorresponse']['errortext'])

    def test_a_body_too_large_is_413(self):
        code, body = self.request({}, 'POST', headers={
            'CONTENT_LENGTH': str(wsgi.MAX_BODY + 1)})
        self.assertEqual(413, code)
        self.assertIn('larger than', body['errorresponse']['errortext'])
        code, body = self.request({}, 'POST', '/xsm/v1/hosts/host-a/commands',
                                  token='T', headers={
                                      'CONTENT_LENGTH': str(wsgi.MAX_BODY + 1),
                                      'HTTP_AUTHORIZATION': 'Bearer T'})
        self.assertEqual(413, code)
        self.assertIn('larger than', body['errortext'])

    def test_other_methods_are_405(self):
        self.assertEqual((405, {'errortext': 'use GET or POST'}),
                         self.request({}, 'PUT'))
