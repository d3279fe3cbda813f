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

"""Every service its own process: the deployment an operator runs.

Two ``xsm-agent`` processes on the real RabbitMQ (see
:mod:`tests.functional.core.migration.fixtures`) and an
``xsm-cloudstack-api`` process configured by its config file, driven by
the ``cs`` client over HTTP on loopback. In CI a missing broker fails
this test; elsewhere it is skipped.
"""

import os
import re
import signal
import subprocess
import sys
import time

import cs

from tests import base
from tests.functional.core.migration import fixtures
from xsm_driver.cloudstack import inventory

MiB = fixtures.MiB
KEY, SECRET = 'ops-key', 'ops-secret-0123456789'
_READY = re.compile(r'serving http://127\.0\.0\.1:(\d+)/client/api')


class TestCloudStackServiceProcess(fixtures.RabbitAgentsFixture):

    def setUp(self):
        super().setUp()
        self.port = self.start_api()

    def start_api(self):
        folder = os.path.join(self.root, 'cloudstack-api')
        os.makedirs(folder)
        config = os.path.join(folder, 'xsm-driver.conf')
        with open(config, 'w') as f:
            f.write('\n'.join([
                '[DEFAULT]', 'transport_url = %s' % fixtures.RABBIT_URL,
                'control_exchange = %s' % self.exchange,
                'rpc_response_timeout = 30', '', '[cloudstack]',
                'listen_address = 127.0.0.1', 'listen_port = 0',
                'api_keys = %s:%s' % (KEY, SECRET),
                'hosts = %s,%s' % (self.agents['a'].name,
                                   self.agents['b'].name),
                'rpc_timeout = 30', ''] +
                # the operator key the agents trust
                fixtures.keyring(self.exchange).client_lines() + ['']))
        out = os.path.join(folder, 'out.log')
        err = os.path.join(folder, 'err.log')
        env = dict(os.environ, PYTHONUNBUFFERED='1',
                   PYTHONPATH=os.pathsep.join(
                       [base.REPO_TOP] + [p for p in [os.environ.get(
                           'PYTHONPATH')] if p]))
        with open(out, 'wb') as o, open(err, 'wb') as e:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'xsm_driver.cmd.cloudstack_api',
                 '--config-file', config], stdin=subprocess.DEVNULL,
                stdout=o, stderr=e, cwd=base.REPO_TOP, env=env)
        self.addCleanup(self._stop, proc)
        deadline = time.monotonic() + fixtures.START_TIMEOUT
        while time.monotonic() < deadline:
            with open(out) as f:
                match = _READY.search(f.read())
            if match:
                return int(match.group(1))
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        with open(err, errors='replace') as f:
            self.fail('xsm-cloudstack-api did not serve (status %s):\n%s'
                      % (proc.poll(), f.read()[-3000:]))

    @staticmethod
    def _stop(proc):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def test_cs_moves_a_running_vm_with_root_and_data_volumes(self):
        api = cs.CloudStack(endpoint='http://127.0.0.1:%d/client/api'
                            % self.port, key=KEY, secret=SECRET,
                            fetch_result=True, poll_interval=0.1,
                            timeout=30, job_timeout=120)
        vm = self.a.vm_create('i-2-7-VM', [{'sr': 'sr-a', 'size': 8 * MiB},
                                           {'sr': 'sr-a', 'size': 12 * MiB}],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=300, fill=0.5)
        self.a.vm_snapshot(vm['uuid'])
        dest = self.agents['b'].name
        volumes = api.listVolumes(virtualmachineid=vm['uuid'],
                                  fetch_list=True)
        pools = {p['name']: p['id'] for p in api.listStoragePools(
            fetch_list=True)}
        result = api.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], hostid=inventory.host_id(dest),
            migrateto=[{'volume': volumes[0]['id'], 'pool': pools['sr-b']},
                       {'volume': volumes[1]['id'],
                        'pool': pools['raw-b']}])
        self.assertEqual(dest, result['virtualmachine']['hostname'])
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual([(d['vdi'], d['sr']) for d in moved['disks']],
                         [(v['path'], v['storage'])
                          for v in result['volume']])
        self.assertEqual(['sr-b', 'raw-b'],
                         [d['sr'] for d in moved['disks']])
        self.assertEqual([], self.a.vm_list())
        check = self.b.guest_verify(vm['uuid'])
        self.assertTrue(check['verified'], check)
        self.assertEqual(20 * MiB, check['bytes_verified'])
        exc = self.assertRaises(
            cs.CloudStackApiException,
            cs.CloudStack(endpoint=api.endpoint, key=KEY,
                          secret='wrong').listVirtualMachines)
        self.assertEqual(401, exc.response.status_code)

    def test_concurrent_migrations_of_one_vm_get_one_job(self):
        # over the real broker remote errors carry the agent's traceback:
        # none may reach a client, and only one job may start
        import threading
        vm = self.a.vm_create('i-2-8-VM', [{'sr': 'sr-a', 'size': 8 * MiB}],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=300, fill=0.5)
        endpoint = 'http://127.0.0.1:%d/client/api' % self.port
        dest = inventory.host_id(self.agents['b'].name)
        started, refused = [], []

        def migrate():
            api = cs.CloudStack(endpoint=endpoint, key=KEY, secret=SECRET,
                                timeout=60)
            try:
                started.append(api.migrateVirtualMachineWithVolume(
                    virtualmachineid=vm['uuid'], hostid=dest))
            except cs.CloudStackApiException as exc:
                refused.append(exc)
        threads = [threading.Thread(target=migrate) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(1, len(started), [e.error for e in refused])
        for exc in refused:
            self.assertEqual(431, exc.response.status_code)
            self.assertEqual({'uuidList': [], 'errorcode': 431,
                              'cserrorcode': 9999, 'errortext':
                              'VM ID: %s is not in Running state to '
                              'migrate it to new host' % vm['uuid']},
                             exc.error)
        api = cs.CloudStack(endpoint=endpoint, key=KEY, secret=SECRET,
                            fetch_result=True, poll_interval=0.1,
                            timeout=30, job_timeout=120)
        deadline = time.monotonic() + 120
        while True:
            job = api.queryAsyncJobResult(jobid=started[0]['jobid'],
                                          fetch_result=False)
            if job['jobstatus'] != 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(1, job['jobstatus'], job)
        self.assertNotIn('Traceback', str(job))
        self.assertEqual(self.agents['b'].name,
                         job['jobresult']['virtualmachine']['hostname'])
        # a VM that is nowhere now: CloudStack's 431, no traceback
        exc = self.assertRaises(
            cs.CloudStackApiException, api.migrateVirtualMachineWithVolume,
            virtualmachineid=vm['uuid'], hostid=dest)
        self.assertEqual(431, exc.error['errorcode'])
        self.assertIn('Cannot migrate VM as it is already present on host',
                      exc.error['errortext'])
