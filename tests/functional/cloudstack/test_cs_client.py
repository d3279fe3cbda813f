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

"""xsm-cloudstack-api driven by the real ``cs`` client, on loopback.

Two hosts with real SRs and real agents on oslo.messaging's ``fake://``
transport (the same over RabbitMQ, with every service its own process, is
in test_processes.py); the API service's WSGI application serves on
127.0.0.1 in a thread; the ``cs`` package from PyPI signs the requests
(HMAC-SHA1, signatureVersion=3, expires) and polls the asynchronous jobs.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import cs
import requests

from tests import base
from tests.functional.hypervisor import test_qemu_guest as guest_tests
from tests.unit.cloudstack import fixtures
from xsm_driver.cloudstack import api as api_mod
from xsm_driver.cloudstack import inventory
from xsm_driver.cloudstack import jobs as jobs_mod
from xsm_driver.cloudstack import resource as resource_mod
from xsm_driver.cloudstack import wsgi
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import api
from xsm_driver.core import sr as sr_mod
from xsm_driver import hypervisor
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier
from xsm_driver.testing import harness

MiB = 1 << 20
KEY = 'xsm-test-api-key'
SECRET = 'xsm-test-secret-key'
TOKEN = 'xsm-test-command-token'
API = 'com.cloud.agent.api.'


def wait_job(client, jobid, timeout=60):
    """Poll queryAsyncJobResult until the job leaves jobstatus 0."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.queryAsyncJobResult(jobid=jobid, fetch_result=False)
        if job['jobstatus'] != 0 or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


class CloudStackFixture(base.TestCase):
    """Two hosts behind xsm-cloudstack-api.

    ``host-a`` has SR ``sr-a``, ``host-b`` SRs ``sr-b`` and ``sr-b2``; the
    API is at ``self.endpoint``; ``self.cs`` is a ``cs.CloudStack``
    client with the right key.
    """

    check_leaks = True

    def sr_layout(self, root):
        return {'host-a': {'sr-a': os.path.join(root, 'a', 'sr-a')},
                'host-b': {'sr-b': os.path.join(root, 'b', 'sr-b'),
                           'sr-b2': os.path.join(root, 'b', 'sr-b2')}}

    def setUp(self):
        super().setUp()
        self.root = self.make_tempdir()
        layout = {name: {sr: ('vhd', path) for sr, path in srs.items()}
                  for name, srs in self.sr_layout(self.root).items()}
        local = harness.LocalHosts(
            self.root, layout,
            options=lambda name: manager_mod.Options(
                chunk=1 * MiB, leaf_headroom=1 * MiB),
            rpc_timeout=20,
            make_host=lambda name, specs, state, conf: self.make_host(
                name, specs, state))
        self.addCleanup(local.close)
        local.start()
        self.transport = local.transport
        self.hosts, self.agents = local.hosts, local.agents
        self.clients = {name: local.client(name) for name in layout}
        self.a, self.b = self.clients['host-a'], self.clients['host-b']
        names = sorted(self.clients)

        def resource(host):
            return resource_mod.Resource(host, self.clients.__getitem__,
                                         names, poll_interval=0.02)
        self.app = wsgi.Application(
            api_mod.API(self.clients, resource, jobs_mod.Jobs()),
            {KEY: SECRET}, command_token=TOKEN, max_expires=3600)
        server = wsgi.make_server(self.app, '127.0.0.1', 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.base_url = 'http://127.0.0.1:%d' % server.server_address[1]
        self.endpoint = self.base_url + '/client/api'
        self.cs = self.client()

    def make_host(self, name, specs, state_path):
        """Host ``name``: its guests are the model guest."""
        return host_mod.Host.from_config(name, specs, state_path)

    def client(self, **kwargs):
        kwargs.setdefault('key', KEY)
        kwargs.setdefault('secret', SECRET)
        kwargs.setdefault('timeout', 30)
        return cs.CloudStack(endpoint=self.endpoint, fetch_result=True,
                             poll_interval=0.05, **kwargs)

    def make_vm(self, sizes=(8 * MiB, 12 * MiB), rate=300, fill=0.5,
                snapshots=1):
        """A running VM on host-a: root and data disk, a verifying guest."""
        vm = self.a.vm_create('i-2-42-VM', [{'sr': 'sr-a', 'size': s}
                                            for s in sizes], vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=rate, fill=fill)
        for _ in range(snapshots):
            time.sleep(0.05)
            self.a.vm_snapshot(vm['uuid'])
        return self.a.vm_get(vm['uuid'])


class TestMigrateWithTheCsClient(CloudStackFixture):

    def test_running_vm_moves_with_its_volumes(self):
        vm = self.make_vm()
        host_b = inventory.host_id('host-b')
        [listed] = self.cs.listVirtualMachines(id=vm['uuid'],
                                               fetch_list=True)
        self.assertEqual(inventory.host_id('host-a'), listed['hostid'])
        self.assertEqual('Running', listed['state'])
        hosts = self.cs.findHostsForMigration(id=vm['uuid'])
        self.assertEqual([(host_b, True, True)],
                         [(h['id'], h['suitableformigration'],
                           h['requiresStorageMotion'])
                          for h in hosts['host']])
        volumes = self.cs.listVolumes(virtualmachineid=vm['uuid'],
                                      fetch_list=True)
        self.assertEqual(['ROOT', 'DATADISK'], [v['type'] for v in volumes])
        self.assertEqual([d['vdi'] for d in vm['disks']],
                         [v['path'] for v in volumes])
        pools = self.cs.findStoragePoolsForMigration(id=volumes[1]['id'])
        targets = {p['name']: p for p in pools['storagepool']}
        self.assertEqual({'sr-b', 'sr-b2'}, set(targets))
        self.assertTrue(targets['sr-b2']['suitableformigration'])

        result = self.cs.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], hostid=host_b,
            migrateto=[{'volume': volumes[0]['id'],
                        'pool': targets['sr-b']['id']},
                       {'volume': volumes[1]['id'],
                        'pool': targets['sr-b2']['id']}])

        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual(host_b, result['virtualmachine']['hostid'])
        self.assertEqual('host-b', result['virtualmachine']['hostname'])
        self.assertEqual('Running', result['virtualmachine']['state'])
        self.assertEqual(
            [(volumes[0]['id'], 'sr-b', moved['disks'][0]['vdi']),
             (volumes[1]['id'], 'sr-b2', moved['disks'][1]['vdi'])],
            [(v['id'], v['storage'], v['path'])
             for v in result['volume']])
        for old, new in zip(volumes, result['volume']):
            self.assertNotEqual(old['path'], new['path'])
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        # the verifying guest wrote while its disks were moving
        [migration] = [m for m in self.a.migration_list()
                       if m['vm'] == vm['uuid']]
        self.assertEqual(('done', 'host-b'),
                         (migration['phase'], migration['destination']))
        self.assertGreater(migration['guest_writes_during_migration'], 0)
        time.sleep(0.1)             # the guest goes on on host-b
        check = self.b.guest_verify(vm['uuid'])
        self.assertTrue(check['verified'], check)
        self.assertEqual(20 * MiB, check['bytes_verified'])
        self.assertGreater(check['writes'], 0)
        # and the API sees it where it is
        [listed] = self.cs.listVirtualMachines(id=vm['uuid'],
                                               fetch_list=True)
        self.assertEqual(host_b, listed['hostid'])

    def test_unmapped_volumes_go_to_the_roomiest_pool(self):
        vm = self.make_vm(snapshots=0)
        started = self.cs.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'],
            hostid=inventory.host_id('host-b'), fetch_result=False)
        job = wait_job(self.cs, started['jobid'])
        self.assertEqual((1, 0), (job['jobstatus'], job['jobresultcode']),
                         job)
        self.assertEqual('MigrateVirtualMachineWithVolumeCmd',
                         job['cmd'].rsplit('.', 1)[1])
        self.assertEqual(('VirtualMachine', vm['uuid']),
                         (job['jobinstancetype'], job['jobinstanceid']))
        result = job['jobresult']
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual(inventory.host_id('host-b'),
                         result['virtualmachine']['hostid'])
        # sr-b2 is as empty as sr-b: the roomiest is either, both disks
        # in it, with their new paths
        self.assertEqual([(d['vdi'], d['sr']) for d in moved['disks']],
                         [(v['path'], v['storage'])
                          for v in result['volume']])
        self.assertEqual(1, len({d['sr'] for d in moved['disks']}))
        self.assertTrue(self.b.guest_verify(vm['uuid'])['verified'])

    def test_a_pool_of_another_host_is_refused_at_once(self):
        vm = self.make_vm(snapshots=0)
        exc = self.assertRaises(
            cs.CloudStackApiException,
            self.cs.migrateVirtualMachineWithVolume,
            virtualmachineid=vm['uuid'], hostid=inventory.host_id('host-b'),
            migrateto=[{'volume': vm['disks'][0]['vdi'],
                        'pool': inventory.pool_id('host-a', 'sr-a')}])
        self.assertEqual(431, exc.response.status_code)
        self.assertEqual(431, exc.error['errorcode'])
        self.assertIn('not on the destination host host-b',
                      exc.error['errortext'])
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])


class TestQemuGuestWithTheCsClient(CloudStackFixture):
    """The API on hosts whose VMs are QEMU guests (``qemu`` driver, TCG).

    The VM the agent made (two disks, a NIC with its MAC, 128 MiB) is
    listed with its memory and MAC, and migrateVirtualMachineWithVolume
    moves it running: memory with QEMU's migration, disks with ours; the
    in-guest verifier checks every block it wrote on the destination.
    """

    MAC = '02:00:2a:00:00:07'

    def setUp(self):
        if shutil.which(guest_tests.QEMU) is None:
            self.missing('command %s not found: install it with "apt-get '
                         'install -y qemu-system-x86"' % guest_tests.QEMU)
        if not os.path.isdir(guest_tests.KIT_DIR) or not os.listdir(
                guest_tests.KIT_DIR):
            self.missing('no guest kit in %s: build it with %s %s' % (
                guest_tests.KIT_DIR, guest_tests.KIT_SCRIPT,
                guest_tests.KIT_DIR))
        super().setUp()
        # a migration of a guest under TCG takes longer than 30 s at times
        self.cs = self.client(timeout=300)
        self.a = api.AgentAPI(self.transport, 'host-a', timeout=120)
        self.b = api.AgentAPI(self.transport, 'host-b', timeout=120)

    def make_host(self, name, specs, state_path):
        srs = {}
        for spec in specs:
            sr, driver, path = host_mod.parse_sr_spec(spec)
            srs[sr] = sr_mod.load_driver(driver, sr, path)
        drv = hypervisor.load('qemu', os.path.join(state_path, 'guests'),
                              accel='tcg', guest_kit=guest_tests.KIT_DIR,
                              memory_mib=128, shutdown_timeout=15)
        host = host_mod.Host(name, srs, state_path, drv)
        # last: nothing may be left of a QEMU of this host
        self.addCleanup(self.assert_no_qemu_left, drv)
        self.addCleanup(host.close)
        return host

    def assert_no_qemu_left(self, drv):
        left = guest_tests.qemu_processes(drv.state_dir)
        for pid in left:
            qemu.kill(pid)
        self.assertEqual([], left, 'QEMU processes left in %s'
                         % drv.state_dir)

    def test_a_running_qemu_guest_moves_with_its_volumes(self):
        vm = self.a.vm_create(
            'i-2-43-VM', [{'sr': 'sr-a', 'size': 16 * MiB},
                          {'sr': 'sr-a', 'size': 8 * MiB}],
            vifs=[{'network': 'net0', 'mac': self.MAC.upper()}],
            qemu={'memory_mib': 128, 'vcpus': 1,
                  'verifier': {'rate': 40, 'report_ms': 250}})
        self.assertEqual([self.MAC + '@net0'], vm['vifs'])
        self.a.vm_start(vm['uuid'])
        deadline = time.monotonic() + 120
        while True:
            rep = verifier.last(self.a.vm_console(vm['uuid']), 'progress')
            if rep is not None and rep['writes'] > 20:
                break
            self.assertLess(time.monotonic(), deadline, 'the guest did not '
                            'write on host-a')
            time.sleep(0.2)
        [listed] = self.cs.listVirtualMachines(id=vm['uuid'],
                                               fetch_list=True)
        self.assertEqual(('Running', 128, 1), (
            listed['state'], listed['memory'], listed['cpunumber']))
        self.assertEqual([('net0', self.MAC)], [
            (n['networkname'], n['macaddress']) for n in listed['nic']])
        volumes = self.cs.listVolumes(virtualmachineid=vm['uuid'],
                                      fetch_list=True)
        host_b = inventory.host_id('host-b')
        result = self.cs.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], hostid=host_b,
            migrateto=[{'volume': volumes[0]['id'],
                        'pool': inventory.pool_id('host-b', 'sr-b')},
                       {'volume': volumes[1]['id'],
                        'pool': inventory.pool_id('host-b', 'sr-b2')}])
        self.assertEqual(('Running', host_b), (
            result['virtualmachine']['state'],
            result['virtualmachine']['hostid']))
        [migration] = self.a.migration_list()
        self.assertEqual(('done', 'qemu'), (migration['phase'],
                                            migration['guest_kind']))
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], guest_tests.qemu_processes(
            self.hosts['host-a'].qemu.state_dir))
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual([self.MAC + '@net0'], moved['vifs'])
        self.assertEqual(['sr-b', 'sr-b2'], [d['sr'] for d in moved['disks']])
        check = self.b.guest_verify(vm['uuid'])
        self.assertEqual('qemu', check['kind'])
        self.assertTrue(check['verified'], check)
        self.assertGreater(check['blocks_checked'], 0)
        self.b.vm_stop(vm['uuid'])
        self.assertEqual([], guest_tests.qemu_processes(
            self.hosts['host-b'].qemu.state_dir))
        self.b.vm_destroy(vm['uuid'])


class TestSignature(CloudStackFixture):

    def assert_refused(self, call, words=()):
        exc = self.assertRaises(cs.CloudStackApiException, call)
        self.assertEqual(401, exc.response.status_code)
        self.assertEqual(401, exc.error['errorcode'])
        self.assertEqual([], exc.error['uuidList'])
        self.assertIn('unable to verify user credentials and/or request '
                      'signature', exc.error['errortext'])
        for word in words:
            self.assertIn(word, exc.error['errortext'])
        return exc

    def test_the_right_secret_is_accepted(self):
        self.assertEqual({}, self.cs.listVirtualMachines())

    def test_a_wrong_secret_gets_401(self):
        exc = self.assert_refused(
            self.client(secret='not-the-secret').listVirtualMachines)
        self.assertEqual({'listvirtualmachinesresponse': exc.error},
                         exc.response.json())

    def test_an_unknown_key_gets_401(self):
        self.assert_refused(self.client(key='nobody').listVolumes)

    def test_an_expired_request_is_refused(self):
        # CloudStack's fixed text only (ApiServer.verifyRequest logs why):
        # it used to add "the request expired at ..."
        exc = self.assert_refused(
            lambda: self.cs.listVirtualMachines(
                expires='2020-01-01T00:00:00+0000', signatureVersion='3'))
        self.assertEqual({'uuidList': [], 'errorcode': 401,
                          'errortext': 'unable to verify user credentials '
                          'and/or request signature'}, exc.error)

    def test_a_request_without_expires_is_accepted(self):
        # expiration < 0: cs signs without signatureVersion and expires;
        # CloudStack accepts it (it checks expires with signatureVersion=3
        # only): it used to be refused with 401
        self.assertEqual({}, self.client(
            expiration=-1).listVirtualMachines())

    def test_a_request_without_expires_is_refused_when_required(self):
        self.app.require_expires = True
        self.assert_refused(self.client(expiration=-1).listVirtualMachines)

    def test_an_unsigned_request_is_refused(self):
        self.assert_refused(self.client(secret=None).listVirtualMachines)
        response = requests.get(self.endpoint, params={
            'command': 'listVolumes', 'response': 'json'}, timeout=10)
        self.assertEqual(401, response.status_code)
        self.assertEqual(401, response.json()['listvolumesresponse'][
            'errorcode'])

    def test_a_changed_parameter_breaks_the_signature(self):
        prepared = self.cs._prepare_request('listVolumes', id='a')[1]
        cs.client.transform(prepared)
        self.cs._sign(prepared)
        prepared['id'] = 'b'
        response = requests.get(self.endpoint, params=prepared, timeout=10)
        self.assertEqual(401, response.status_code)

    def test_an_unknown_command_is_432(self):
        # ApiServer.verifyRequest: CloudStack's fixed text, in
        # "errorresponse" (it used to name our commands, in
        # "deployvirtualmachineresponse")
        exc = self.assertRaises(cs.CloudStackApiException,
                                self.cs.deployVirtualMachine)
        self.assertEqual(432, exc.response.status_code)
        self.assertEqual({'errorresponse': {
            'uuidList': [], 'errorcode': 432, 'cserrorcode': 9999,
            'errortext': 'The given command does not exist or it is not '
                         'available for user'}}, exc.response.json())


class TestBadInput(CloudStackFixture):
    """What an operator may get wrong: a clear 431, never a stack."""

    def test_unknown_ids_and_bad_mappings_are_refused(self):
        vm = self.make_vm(snapshots=0)
        host_b = inventory.host_id('host-b')
        pool_b = inventory.pool_id('host-b', 'sr-b')
        disk = vm['disks'][0]['vdi']

        def invalid(command, name, value):
            # ParamProcessWorker's text for a UUID that names nothing
            return ('Unable to execute API command %s due to invalid value. '
                    'Invalid parameter %s value=%s due to incorrect long '
                    'value format, or entity does not exist or due to '
                    'incorrect parameter annotation for the field in api '
                    'cmd class.' % (command.lower(), name, value))
        migrate = 'migrateVirtualMachineWithVolume'
        cases = [
            ('listVirtualMachines', {'id': 'no-vm'},
             invalid('listVirtualMachines', 'id', 'no-vm')),
            ('listVirtualMachines', {'hostid': 'no-host'},
             invalid('listVirtualMachines', 'hostid', 'no-host')),
            # names where CloudStack takes ids only
            ('listVirtualMachines', {'id': 'i-2-42-VM'},
             invalid('listVirtualMachines', 'id', 'i-2-42-VM')),
            ('listVirtualMachines', {'hostid': 'host-a'},
             invalid('listVirtualMachines', 'hostid', 'host-a')),
            ('listVolumes', {'id': 'no-vol'},
             invalid('listVolumes', 'id', 'no-vol')),
            ('listVolumes', {'virtualmachineid': 'no-vm'},
             invalid('listVolumes', 'virtualmachineid', 'no-vm')),
            ('listVolumes', {'storageid': 'no-pool'},
             invalid('listVolumes', 'storageid', 'no-pool')),
            ('listHosts', {'id': 'host-a'},
             invalid('listHosts', 'id', 'host-a')),
            ('listStoragePools', {'id': 'sr-a'},
             invalid('listStoragePools', 'id', 'sr-a')),
            ('listVolumes', {'page': 'one', 'pagesize': '2'},
             'page and pagesize must be integers'),
            ('findHostsForMigration', {},
             'Unable to execute API command findhostsformigration due to '
             'missing parameter id'),
            ('findHostsForMigration', {'id': 'no-vm'},
             invalid('findHostsForMigration', 'id', 'no-vm')),
            ('findStoragePoolsForMigration', {'id': 'no-vol'},
             invalid('findStoragePoolsForMigration', 'id', 'no-vol')),
            ('queryAsyncJobResult', {'jobid': 'no-job'},
             invalid('queryAsyncJobResult', 'jobid', 'no-job')),
            (migrate, {'hostid': host_b},
             'Unable to execute API command migratevirtualmachinewithvolume '
             'due to missing parameter virtualmachineid'),
            (migrate, {'virtualmachineid': 'no-vm', 'hostid': host_b},
             invalid(migrate, 'virtualmachineid', 'no-vm')),
            (migrate, {'virtualmachineid': 'i-2-42-VM', 'hostid': host_b},
             invalid(migrate, 'virtualmachineid', 'i-2-42-VM')),
            (migrate, {'virtualmachineid': vm['uuid'], 'hostid': 'no-host'},
             invalid(migrate, 'hostid', 'no-host')),
            (migrate, {'virtualmachineid': vm['uuid'], 'hostid': 'host-b'},
             invalid(migrate, 'hostid', 'host-b')),
            (migrate, {'virtualmachineid': vm['uuid']},
             'Either hostid or migrateto  must be passed for migrating the '
             'VM'),
            (migrate,
             {'virtualmachineid': vm['uuid'], 'hostid': host_b,
              'migrateto': [{'volume': 'no-vol', 'pool': pool_b}]},
             'There is no volume present with the given id no-vol'),
            (migrate,
             {'virtualmachineid': vm['uuid'], 'hostid': host_b,
              'migrateto': [{'volume': disk, 'pool': 'no-pool'}]},
             'There is no storage pool present with the given id no-pool'),
            (migrate,
             {'virtualmachineid': vm['uuid'], 'hostid': host_b,
              'migrateto[0].volume': disk},
             'migrateto[0] needs both volume and pool'),
            (migrate,
             {'virtualmachineid': vm['uuid'], 'hostid': host_b,
              'migrateto': [{'volume': disk, 'pool': pool_b},
                            {'volume': disk, 'pool': inventory.pool_id(
                                'host-b', 'sr-b2')}]},
             'is given twice in migrateto'),
            (migrate,
             {'virtualmachineid': vm['uuid'],
              'hostid': inventory.host_id('host-a')},
             'Cannot migrate VM as it is already present on host host-a '
             '(ID: %s), please specify valid destination host to migrate '
             'the VM' % inventory.host_id('host-a')),
        ]
        for command, params, words in cases:
            exc = self.assertRaises(cs.CloudStackApiException,
                                    getattr(self.cs, command),
                                    fetch_result=False, **params)
            self.assertEqual(431, exc.response.status_code, command)
            body = exc.response.json()
            self.assertEqual(['%sresponse' % command.lower()], list(body))
            self.assertEqual(431, exc.error['errorcode'])
            self.assertEqual(9999, exc.error['cserrorcode'])
            self.assertEqual([], exc.error['uuidList'])
            self.assertIn(words, exc.error['errortext'], (command, params))
            self.assertNotIn('Traceback', exc.response.text)
        # nothing was started
        self.assertEqual([], self.a.migration_list())
        self.assertEqual([], self.b.vdi_list())
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])

    def test_a_source_host_that_does_not_answer_is_named(self):
        vm = self.make_vm(snapshots=0)
        # the API's client of host-a now calls a server nobody listens on
        self.clients['host-a'] = api.AgentAPI(self.transport, 'host-a-gone',
                                              timeout=1)
        exc = self.assertRaises(
            cs.CloudStackApiException,
            self.cs.migrateVirtualMachineWithVolume,
            virtualmachineid=vm['uuid'], hostid=inventory.host_id('host-b'))
        self.assertEqual(431, exc.error['errorcode'])
        self.assertIn('Host(s) host-a do not answer (is their xsm-agent '
                      'running?)', exc.error['errortext'])


class TestFullPool(CloudStackFixture):
    """sr-b is a 24 MiB tmpfs: a VM with 40 MiB of data does not fit."""

    TMPFS_SIZE = 24 * MiB

    def sr_layout(self, root):
        layout = super().sr_layout(root)
        tmpfs = os.path.join(root, 'tmpfs')
        os.makedirs(tmpfs)
        self.require_command('mount')
        proc = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=%dm,mode=0700'
             % (self.TMPFS_SIZE // MiB), 'tmpfs', tmpfs],
            capture_output=True, text=True)
        if proc.returncode != 0:
            self.missing('cannot mount a tmpfs on %s (this test needs root '
                         'and mount(8)): %s' % (tmpfs, proc.stderr.strip()))
        self.addCleanup(lambda: subprocess.run(['umount', '-l', tmpfs],
                                               capture_output=True))
        layout['host-b']['sr-b'] = os.path.join(tmpfs, 'sr-b')
        return layout

    def sr_b_files(self):
        return sorted(os.listdir(os.path.join(self.root, 'tmpfs', 'sr-b')))

    def test_no_space_fails_the_job_and_leaves_nothing(self):
        vm = self.make_vm(sizes=(8 * MiB, 40 * MiB), fill=1.0, snapshots=0)
        before_a = sorted(v['uuid'] for v in self.a.vdi_list())
        before_b = self.sr_b_files()
        self.assertEqual([], [n for n in before_b if not n.startswith('.')])
        pool = inventory.pool_id('host-b', 'sr-b')
        started = self.client().migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], hostid=inventory.host_id('host-b'),
            migrateto=[{'volume': d['vdi'], 'pool': pool}
                       for d in vm['disks']], fetch_result=False)
        self.assertEqual(vm['uuid'], started['id'])
        job = wait_job(self.cs, started['jobid'])
        self.assertEqual(2, job['jobstatus'], job)
        self.assertEqual(533, job['jobresultcode'])
        self.assertEqual(533, job['jobresult']['errorcode'])
        # CloudStack's ExceptionResponse shape; InsufficientCapacity's code
        self.assertEqual(4325, job['jobresult']['cserrorcode'])
        self.assertEqual([], job['jobresult']['uuidList'])
        text = job['jobresult']['errortext']
        self.assertNotIn('Traceback', text)
        for word in ('Failed to migrate VM i-2-42-VM', 'from host host-a to '
                     'host host-b', "SR 'sr-b' on host host-b needs",
                     'free'):
            self.assertIn(word, text)
        # nothing on the destination, the source as it was
        self.assertEqual([], self.b.vdi_list())
        self.assertEqual([], self.b.vm_list())
        # every file, hidden ones too (a temporary or journal file left
        # behind would be one)
        self.assertEqual(before_b, self.sr_b_files())
        self.assertEqual(before_a, sorted(v['uuid']
                                          for v in self.a.vdi_list()))
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])
        # with fetch_result the cs client raises the job's error
        exc = self.assertRaises(
            cs.CloudStackApiException,
            self.cs.migrateVirtualMachineWithVolume,
            virtualmachineid=vm['uuid'], hostid=inventory.host_id('host-b'),
            migrateto=[{'volume': d['vdi'], 'pool': pool}
                       for d in vm['disks']])
        self.assertEqual(533, exc.error['errorcode'])

    def test_a_failed_migrate_with_storage_command_leaves_nothing(self):
        vm = self.make_vm(sizes=(8 * MiB, 40 * MiB), fill=1.0, snapshots=0)
        before_a = sorted(v['uuid'] for v in self.a.vdi_list())
        before_b = self.sr_b_files()
        self.assertEqual([], [n for n in before_b if not n.startswith('.')])
        response = requests.post(
            '%s/xsm/v1/hosts/host-b/commands' % self.base_url,
            data=fixtures.migrate(vm, [8 * MiB, 40 * MiB], ['sr-b', 'sr-b']),
            headers={'Authorization': 'Bearer %s' % TOKEN}, timeout=60)
        self.assertEqual(200, response.status_code, response.text)
        [answer] = response.json()
        fields = answer[API + 'MigrateWithStorageAnswer']
        self.assertIs(False, fields['result'])
        self.assertNotIn('volumeTos', fields)
        for word in ('MigrateWithStorageCommand on host host-b failed',
                     "SR 'sr-b' on host host-b needs", 'free'):
            self.assertIn(word, fields['details'])
        self.assertEqual([], self.b.vdi_list())
        self.assertEqual([], self.b.vm_list())
        # every file, hidden ones too (a temporary or journal file left
        # behind would be one)
        self.assertEqual(before_b, self.sr_b_files())
        self.assertEqual(before_a, sorted(v['uuid']
                                          for v in self.a.vdi_list()))
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])


class TestCommandEndpoint(CloudStackFixture):
    """The three commands posted as CloudStack's JSON, over HTTP."""

    def post(self, host, text, token=TOKEN):
        response = requests.post(
            '%s/xsm/v1/hosts/%s/commands' % (self.base_url, host),
            data=text, headers={'Authorization': 'Bearer %s' % token,
                                'Content-Type': 'application/json'},
            timeout=60)
        return response

    def answer(self, host, text):
        response = self.post(host, text)
        self.assertEqual(200, response.status_code, response.text)
        [answer] = response.json()
        return answer, next(iter(answer.values()))

    def test_receive_send_complete_move_the_vm(self):
        vm = self.make_vm()
        sizes = [8 * MiB, 12 * MiB]
        received, fields = self.answer('host-b', fixtures.receive(
            vm, sizes, ['sr-b', 'sr-b2']))
        self.assertIs(True, fields['result'], fields.get('details'))
        self.assertEqual([], self.b.vdi_list())     # Receive makes nothing
        _, fields = self.answer('host-a', fixtures.send(vm, sizes, received))
        self.assertIs(True, fields['result'], fields.get('details'))
        _, fields = self.answer('host-b', fixtures.complete(vm, sizes))
        self.assertIs(True, fields['result'], fields.get('details'))
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual([(100, moved['disks'][0]['vdi']),
                          (101, moved['disks'][1]['vdi'])],
                         [(v['id'], v['path']) for v in fields['volumeTos']])
        self.assertEqual(['sr-b', 'sr-b2'], [d['sr'] for d in moved['disks']])
        self.assertTrue(self.b.guest_verify(vm['uuid'])['verified'])

    def test_a_failed_send_leaves_nothing_on_the_destination(self):
        vm = self.make_vm(snapshots=0)
        sizes = [8 * MiB, 12 * MiB]
        received, fields = self.answer('host-b', fixtures.receive(
            vm, sizes, ['sr-b', 'sr-b2']))
        # CloudStack's Send maps only the root volume: VDI_NOT_IN_MAP
        name = API + 'MigrateWithStorageReceiveAnswer'
        received[name]['volumeToSr'] = received[name]['volumeToSr'][:1]
        _, fields = self.answer('host-a', fixtures.send(vm, sizes, received))
        self.assertIs(False, fields['result'])
        self.assertIn('VDI_NOT_IN_MAP', fields['details'])
        self.assertIn(vm['disks'][1]['vdi'], fields['details'])
        self.assertEqual([], self.b.vdi_list())
        self.assertEqual([], self.b.vm_list())
        self.assertTrue(self.a.guest_verify(vm['uuid'])['verified'])

    def test_migrate_with_storage_command_moves_the_vm(self):
        vm = self.make_vm()
        sizes = [8 * MiB, 12 * MiB]
        name, fields = self.answer('host-b', fixtures.migrate(
            vm, sizes, ['sr-b2', 'sr-b']))
        self.assertEqual([API + 'MigrateWithStorageAnswer'], list(name))
        self.assertIs(True, fields['result'], fields.get('details'))
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual(['sr-b2', 'sr-b'], [d['sr'] for d in moved['disks']])
        self.assertEqual([(100, moved['disks'][0]['vdi']),
                          (101, moved['disks'][1]['vdi'])],
                         [(v['id'], v['path']) for v in fields['volumeTos']])
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        check = self.b.guest_verify(vm['uuid'])
        self.assertTrue(check['verified'], check)

    def test_the_endpoint_needs_the_token(self):
        response = self.post('host-a', '[]', token='wrong')
        self.assertEqual(401, response.status_code)
        response = self.post('host-z', '[]')
        self.assertEqual(404, response.status_code)
        response = self.post('host-a', 'not json')
        self.assertEqual(400, response.status_code)
        self.assertIn('invalid JSON', json.loads(response.text)['errortext'])


class TestCloudStacksAnswers(CloudStackFixture):
    """Each point where the API answered otherwise than CloudStack does.

    The texts are CloudStack's (MigrateVirtualMachineWithVolumeCmd.execute,
    UserVmManagerImpl, ApiServer), the codes its ApiErrorCode and
    CSExceptionErrorCode values.
    """

    def refused(self, **params):
        exc = self.assertRaises(
            cs.CloudStackApiException, self.cs.migrateVirtualMachineWithVolume,
            fetch_result=False, **params)
        self.assertEqual(431, exc.response.status_code)
        self.assertEqual(['migratevirtualmachinewithvolumeresponse'],
                         list(exc.response.json()))
        self.assertEqual((431, 9999, []), (exc.error['errorcode'],
                                           exc.error['cserrorcode'],
                                           exc.error['uuidList']))
        return exc.error['errortext']

    def test_a_stopped_vm_given_hostid_is_refused(self):
        vm = self.make_vm(snapshots=0)
        self.a.vm_stop(vm['uuid'])
        self.assertEqual(
            'VM ID: %s is not in Running state to migrate it to new host'
            % vm['uuid'], self.refused(virtualmachineid=vm['uuid'],
                                       hostid=inventory.host_id('host-b')))
        self.assertEqual([], self.a.migration_list())

    def test_a_running_vm_given_only_migrateto_is_refused(self):
        vm = self.make_vm(snapshots=0)
        volumes = self.cs.listVolumes(virtualmachineid=vm['uuid'],
                                      fetch_list=True)
        self.assertEqual(
            'VM ID: %s is not in Stopped state to migrate, use hostid '
            'parameter to migrate it to a new host' % vm['uuid'],
            self.refused(virtualmachineid=vm['uuid'], migrateto=[
                {'volume': v['id'],
                 'pool': inventory.pool_id('host-b', 'sr-b')}
                for v in volumes]))
        self.assertEqual([], self.a.migration_list())
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])

    def test_a_stopped_vm_given_migrateto_moves_its_volumes(self):
        vm = self.make_vm(snapshots=0)
        self.a.vm_stop(vm['uuid'])
        volumes = self.cs.listVolumes(virtualmachineid=vm['uuid'],
                                      fetch_list=True)
        result = self.cs.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], migrateto=[
                {'volume': volumes[0]['id'],
                 'pool': inventory.pool_id('host-b', 'sr-b')},
                {'volume': volumes[1]['id'],
                 'pool': inventory.pool_id('host-b', 'sr-b2')}])
        self.assertEqual('Stopped', result['virtualmachine']['state'])
        moved = self.b.vm_get(vm['uuid'])
        self.assertEqual('halted', moved['power_state'])
        self.assertEqual(['sr-b', 'sr-b2'], [d['sr'] for d in moved['disks']])
        self.assertEqual([], self.a.vm_list())

    def test_concurrent_migrations_of_one_vm_get_one_job(self):
        vm = self.make_vm(snapshots=0)
        answers, errors = [], []

        def migrate():
            try:
                answers.append(self.client().migrateVirtualMachineWithVolume(
                    virtualmachineid=vm['uuid'], fetch_result=False,
                    hostid=inventory.host_id('host-b')))
            except cs.CloudStackApiException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=migrate) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(1, len(answers), [e.error for e in errors])
        self.assertEqual(2, len(errors))
        for exc in errors:
            # refused at the API, before a job: CloudStack's text for a VM
            # in state Migrating
            self.assertEqual(431, exc.response.status_code)
            self.assertEqual({'uuidList': [], 'errorcode': 431,
                              'cserrorcode': 9999,
                              'errortext': 'VM ID: %s is not in Running '
                              'state to migrate it to new host'
                              % vm['uuid']}, exc.error)
        job = wait_job(self.cs, answers[0]['jobid'])
        self.assertEqual(1, job['jobstatus'], job)
        self.assertNotIn('Traceback', json.dumps(job))
        self.assertEqual(1, len(self.a.migration_list()))

    def test_a_vm_another_tool_migrates_is_refused(self):
        vm = self.make_vm(snapshots=0)
        mid = self.a.migrate_vm(
            vm['uuid'], 'host-b', {d['vdi']: 'sr-b' for d in vm['disks']},
            {'net0': 'net0'}, bandwidth=2 * MiB)
        self.addCleanup(self.wait_end, mid)
        self.assertEqual(
            'VM ID: %s is not in Running state to migrate it to new host'
            % vm['uuid'], self.refused(virtualmachineid=vm['uuid'],
                                       hostid=inventory.host_id('host-b')))
        self.assertIsNone(self.a.migration_get(mid)['finished'])
        self.a.migration_abort(mid)

    def wait_end(self, mid):
        deadline = time.monotonic() + 60
        while self.a.migration_get(mid).get('finished') is None and \
                time.monotonic() < deadline:
            time.sleep(0.05)

    def test_responses_carry_cloudstacks_fields(self):
        vm = self.make_vm(snapshots=0)
        [listed] = self.cs.listVirtualMachines(id=vm['uuid'],
                                               fetch_list=True)
        for key in ('zoneid', 'podid', 'clusterid', 'templateid',
                    'serviceofferingid', 'cpunumber', 'memory', 'account',
                    'domainid'):
            self.assertIn(key, listed)
        self.assertEqual(inventory.cluster('host-a')['clusterid'],
                         listed['clusterid'])
        for host in self.cs.listHosts(fetch_list=True):
            for key in ('zoneid', 'podid', 'clusterid'):
                self.assertIn(key, host)
        for pool in self.cs.listStoragePools(fetch_list=True):
            for key in ('zoneid', 'podid', 'clusterid'):
                self.assertIn(key, pool)
        for volume in self.cs.listVolumes(fetch_list=True):
            for key in ('zoneid', 'account', 'domainid'):
                self.assertIn(key, volume)
        started = self.cs.migrateVirtualMachineWithVolume(
            virtualmachineid=vm['uuid'], hostid=inventory.host_id('host-b'),
            fetch_result=False)
        job = wait_job(self.cs, started['jobid'])
        self.assertEqual(1, job['jobstatus'], job)
        self.assertIn('accountid', job)
        self.assertIn('userid', job)
        self.assertEqual(inventory.cluster('host-b')['clusterid'],
                         job['jobresult']['virtualmachine']['clusterid'])

    def test_our_own_pool_ids_are_storage_labels(self):
        # the management server labels a pool's SR with the pool's uuid:
        # ours are known without [cloudstack]sr_labels
        vm = self.make_vm(snapshots=0)
        response = requests.post(
            '%s/xsm/v1/hosts/host-b/commands' % self.base_url,
            data=fixtures.receive(vm, [8 * MiB, 12 * MiB], [
                inventory.pool_id('host-b', 'sr-b'),
                inventory.pool_id('host-b', 'sr-b2')]),
            headers={'Authorization': 'Bearer %s' % TOKEN}, timeout=60)
        self.assertEqual(200, response.status_code, response.text)
        [answer] = response.json()
        fields = next(iter(answer.values()))
        self.assertIs(True, fields['result'], fields.get('details'))
        self.assertEqual(['sr-b', 'sr-b2'],
                         [p['u']['sr'] for p in fields['volumeToSr']])
