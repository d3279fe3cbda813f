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

"""VM lifecycle on a pool: the agent's facade and the fake's xapi rules.

:class:`TestFakeLifecycleRules` calls the fake pool directly, through the
real ``XenAPI`` client, and checks each refusal against xapi's (code and
parameter order, as ``xapi_vm_lifecycle.ml``, ``xapi_vm.ml``,
``xapi_vbd.ml``, ``xapi_vif_helpers.ml``, ``xapi_vdi.ml`` and
``import_raw_vdi.ml`` raise them). The other classes drive the agent's
:class:`~xsm_driver.core.xenapi.pool.PoolHost` against it and check the
calls xapi receives.
"""

import hashlib
import http.client
import os
import time
import urllib.parse

import XenAPI

from tests.unit.xenapi import fixtures as xfix
from tests import xenapi_fake as fake
from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops as vhd_ops
from xsm_driver.core.xenapi import engine as engine_mod
from xsm_driver.core.xenapi import errors

GiB, MiB = fake.GiB, fake.MiB


class LifecycleCase(xfix.PoolsTestCase):

    def setUp(self):
        super().setUp()
        self.host = self.engine.host
        self.client = self.make_pool('direct', self.server_a)
        self.addCleanup(self.client.logout)

    def failure(self, method, *args):
        exc = self.assertRaises(XenAPI.Failure, self.client.call, method,
                                *args)
        return [str(d) for d in exc.details]

    def calls(self, pool=None, prefix=''):
        return [m for m, _a in (pool or self.a).call_args
                if m.startswith(prefix)]

    def vm_ref(self, name):
        [ref] = [r for r, rec in self.a.db['VM'].items()
                 if rec['name_label'] == name and not rec['is_a_template']]
        return ref

    def new_vm(self, name='i-1', sizes=(GiB,), vifs=(), **qemu):
        return self.host.create_vm(
            name, [{'sr': 'NFS-A', 'size': s} for s in sizes], vifs,
            qemu or None)


class TestFakeLifecycleRules(LifecycleCase):
    """The fake refuses what xapi refuses, with xapi's parameters."""

    def test_power_state_errors_name_vm_expected_actual(self):
        vm = self.vm                                # running
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'halted', 'running'],
                         self.failure('VM.start', vm, False, False))
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'halted, suspended',
                          'running'], self.failure('VM.destroy', vm))
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'paused', 'running'],
                         self.failure('VM.unpause', vm))
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'halted', 'running'],
                         self.failure('VM.set_memory_limits', vm, '1', '2',
                                      '2', '2'))
        self.client.call('VM.hard_shutdown', vm, safe=False)
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'running', 'halted'],
                         self.failure('VM.pause', vm))
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'paused, running',
                          'halted'], self.failure('VM.hard_reboot', vm))
        self.assertEqual(['VM_BAD_POWER_STATE', vm,
                          'paused, suspended, running', 'halted'],
                         self.failure('VM.hard_shutdown', vm))
        self.assertEqual(['VM_BAD_POWER_STATE', vm, 'running', 'halted'],
                         self.failure('VM.pool_migrate', vm, self.a.master,
                                      {'live': 'true'}))

    def test_templates_and_handles(self):
        tpl = self.a.template
        self.assertEqual(['VM_IS_TEMPLATE', tpl, 'start'],
                         self.failure('VM.start', tpl, False, False))
        # a default template is never destroyed (check_template)
        self.assertEqual(['VM_IS_TEMPLATE', tpl, 'destroy'],
                         self.failure('VM.destroy', tpl))
        bad = 'OpaqueRef:00000000-0000-0000-0000-000000000000'
        self.assertEqual(['HANDLE_INVALID', 'VM', bad],
                         self.failure('VM.start', bad, False, False))

    def test_provision_only_of_a_template(self):
        clone = self.client.call('VM.clone', self.a.template, 'c', safe=False)
        self.client.call('VM.set_is_a_template', clone, False, safe=False)
        self.assertEqual(['ONLY_PROVISION_TEMPLATE'],
                         self.failure('VM.provision', clone))

    def test_memory_and_vcpu_limits(self):
        clone = self.client.call('VM.clone', self.a.template, 'c', safe=False)
        self.assertEqual(['MEMORY_CONSTRAINT_VIOLATION_ORDER'],
                         self.failure('VM.set_memory_limits', clone,
                                      str(GiB), str(MiB), str(GiB),
                                      str(GiB)))
        self.assertEqual('INVALID_VALUE',
                         self.failure('VM.set_VCPUs_at_startup', clone,
                                      '2')[0])
        self.assertEqual(['INVALID_VALUE', 'VCPU values must satisfy: 0 < '
                          'VCPUs_at_startup \u2264 VCPUs_max', '0'],
                         self.failure('VM.set_VCPUs_max', clone, '0'))

    def test_devices(self):
        clone = self.client.call('VM.clone', self.a.template, 'c', safe=False)
        vdi = self.client.call('VDI.create', {
            'SR': self.sr_a2, 'virtual_size': str(GiB), 'type': 'user',
            'name_label': 'd'}, safe=False)
        vbd = {'VM': clone, 'VDI': vdi, 'userdevice': '0', 'bootable': True,
               'mode': 'RW', 'type': 'Disk', 'empty': False}
        self.client.call('VBD.create', vbd, safe=False)
        self.assertEqual(['DEVICE_ALREADY_EXISTS', '0'],
                         self.failure('VBD.create', vbd))
        vif = {'VM': clone, 'network': self.a.network, 'device': '0',
               'MAC': 'zz:00:00:00:00:01'}
        self.assertEqual(['MAC_INVALID', 'zz:00:00:00:00:01'],
                         self.failure('VIF.create', vif))
        vif['MAC'] = ''
        self.client.call('VIF.create', vif, safe=False)
        self.assertEqual(['DEVICE_ALREADY_EXISTS', '0'],
                         self.failure('VIF.create', vif))
        self.a.sm_features('ext', ['VDI_DELETE'])
        self.assertEqual(['SR_OPERATION_NOT_SUPPORTED', self.sr_a],
                         self.failure('VDI.create', {
                             'SR': self.sr_a, 'virtual_size': '1'}))

    def test_vdi_in_use(self):
        self.assertEqual(['VDI_IN_USE', self.disk0, 'destroy'],
                         self.failure('VDI.destroy', self.disk0))

    def test_boot_checks(self):
        h2 = self.a.add_host('pool-a-h2', memory=GiB)
        # web-1's disks are on the master's local SR
        self.assertEqual(['VM_REQUIRES_SR', self.vm, self.sr_a],
                         self.failure('VM.pool_migrate', self.vm, h2, {}))
        shared = self.a.add_sr('Shared', type='nfs')
        disk = self.a.add_vdi(shared, 'root')
        vm = self.a.add_vm('big', [disk], [self.a.network])
        self.a.get('VM', vm).update(memory_dynamic_max=2 * GiB,
                                    memory_static_max=2 * GiB)
        self.assertEqual(['HOST_NOT_ENOUGH_FREE_MEMORY', str(2 * GiB),
                          str(GiB)],
                         self.failure('VM.pool_migrate', vm, h2, {}))
        self.a.get('host', h2)['enabled'] = False
        self.assertEqual(['HOST_DISABLED', h2],
                         self.failure('VM.pool_migrate', vm, h2, {}))
        self.client.call('VM.hard_shutdown', vm, safe=False)
        self.assertEqual(['HOST_DISABLED', h2],
                         self.failure('VM.start_on', vm, h2, False, False))

    def put(self, query, body=b'', headers=None):
        url = urllib.parse.urlsplit(self.server_a.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
        self.addCleanup(conn.close)
        conn.putrequest('PUT', '/import_raw_vdi?' +
                        urllib.parse.urlencode(query))
        for key, value in (headers or {'Content-Length':
                                       str(len(body))}).items():
            conn.putheader(key, value)
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    def import_task(self, vdi, fmt, body, **extra):
        session = self.client._session._session if self.client._session \
            else None
        if session is None:
            self.client.call('pool.get_all')
            session = self.client._session._session
        task = self.client.call('task.create', 'import', '', safe=False)
        query = dict({'session_id': session, 'vdi': vdi, 'format': fmt,
                      'task_id': task}, **extra)
        status = self.put(query, body)
        return status, self.a.get('task', task)

    def test_import_endpoint(self):
        clone = self.client.call('VM.clone', self.a.template, 'c', safe=False)
        vdi = self.client.call('VDI.create', {
            'SR': self.sr_a2, 'virtual_size': str(4 * MiB)}, safe=False)
        self.client.call('VBD.create', {
            'VM': clone, 'VDI': vdi, 'userdevice': '0', 'type': 'Disk'},
            safe=False)
        # no session: refused before anything (xapi_http.ml)
        self.assertEqual(403, self.put({'vdi': vdi, 'format': 'raw'}))
        status, task = self.import_task(vdi, 'qcow3', b'x')
        self.assertEqual((404, ['INTERNAL_ERROR', 'Unknown format qcow3']),
                         (status, task['error_info']))
        status, task = self.import_task(vdi, 'vhd', b'x', chunked='true')
        self.assertEqual((404, ['INTERNAL_ERROR', 'Cannot handle chunked '
                                'VHD']), (status, task['error_info']))
        # the stream is larger than the VDI: vhd-tool's write fails
        status, task = self.import_task(vdi, 'raw', b'\1' * (5 * MiB))
        self.assertEqual((200, ['VDI_IO_ERROR', 'Device I/O errors']),
                         (status, task['error_info']))
        status, task = self.import_task(vdi, 'vhd', b'not a vhd' * 100)
        self.assertEqual((200, ['VDI_IO_ERROR', 'Device I/O errors']),
                         (status, task['error_info']))
        status, task = self.import_task(vdi, 'raw', b'\7' * 4096)
        self.assertEqual((200, 'success'), (status, task['status']))
        self.assertEqual({0: b'\7' * 4096}, self.a.contents[vdi])
        self.assertEqual([(vdi, 'raw', 4096)], self.a.imports)

    def test_import_needs_a_length_and_no_transfer_encoding(self):
        self.client.call('pool.get_all')
        session = self.client._session._session
        vdi = self.disk1
        task = self.client.call('task.create', 'import', '', safe=False)
        status = self.put({'session_id': session, 'vdi': vdi,
                           'format': 'raw', 'task_id': task}, headers={
                               'Transfer-Encoding': 'chunked'})
        self.assertEqual(404, status)
        self.assertEqual(['INTERNAL_ERROR', 'Cannot handle encoding: '
                          'chunked'], self.a.get('task', task)['error_info'])


class TestCreate(LifecycleCase):

    def test_create_from_the_template(self):
        self.host.vm_network = xfix.NET
        vm = self.new_vm(sizes=(GiB, 2 * GiB), vifs=[
            'port-1', {'network': 'port-2', 'mac': '02:AA:00:00:00:02'}],
            memory_mib=512, vcpus=2)
        self.assertEqual('halted', vm.power_state)
        self.assertEqual(['port-1', 'port-2'], vm.vifs)
        self.assertEqual((512, 2), (vm.memory_mib, vm.vcpus))
        ref = self.vm_ref('i-1')
        rec = self.a.get('VM', ref)
        self.assertFalse(rec['is_a_template'])
        self.assertNotIn('disks', rec['other_config'])
        self.assertEqual([512 * MiB] * 3, [
            rec['memory_dynamic_min'], rec['memory_dynamic_max'],
            rec['memory_static_max']])
        self.assertEqual(128 * MiB, rec['memory_static_min'])
        self.assertEqual((2, 2), (rec['VCPUs_max'], rec['VCPUs_at_startup']))
        vbds = [self.a.get('VBD', b) for b in rec['VBDs']]
        self.assertEqual([('0', True), ('1', False)],
                         [(b['userdevice'], b['bootable']) for b in vbds])
        sizes = [self.a.get('VDI', b['VDI'])['virtual_size'] for b in vbds]
        self.assertEqual([GiB, 2 * GiB], sizes)
        self.assertEqual({self.sr_a2}, {self.a.get('VDI', b['VDI'])['SR']
                                        for b in vbds})
        self.assertEqual([d['vdi'] for d in vm.disks], [
            self.a.get('VDI', b['VDI'])['uuid'] for b in vbds])
        vifs = [self.a.get('VIF', v) for v in rec['VIFs']]
        self.assertEqual([self.a.network] * 2, [v['network'] for v in vifs])
        self.assertEqual('02:aa:00:00:00:02', vifs[1]['MAC'])
        self.assertEqual(
            ['VM.clone', 'VM.remove_from_other_config',
             'VM.set_is_a_template', 'VM.set_memory_limits',
             'VM.set_VCPUs_max', 'VM.set_VCPUs_at_startup', 'VDI.create',
             'VBD.create', 'VDI.create', 'VBD.create', 'VIF.create',
             'VIF.create'],
            [m for m in self.calls() if m.split('.')[1].startswith((
                'clone', 'remove_from', 'set_', 'create'))])
        self.assertEqual([[self.a.template, 'i-1']], self.a.args_of(
            'VM.clone'))

    def test_fewer_vcpus_than_the_template_lowers_at_startup_first(self):
        tpl = self.a.get('VM', self.a.template)
        tpl.update(VCPUs_max=4, VCPUs_at_startup=4)
        self.new_vm(vcpus=2)
        self.assertEqual(['VM.set_VCPUs_at_startup', 'VM.set_VCPUs_max'],
                         self.calls(prefix='VM.set_VCPUs'))

    def test_a_failed_step_leaves_nothing(self):
        vms, vdis = dict(self.a.db['VM']), dict(self.a.db['VDI'])
        self.a.fail('VBD.create', 'DEVICE_ALREADY_EXISTS', '0')
        self.assertRaises(errors.XenAPIError, self.new_vm)
        self.assertEqual(sorted(vms), sorted(self.a.db['VM']))
        self.assertEqual(sorted(vdis), sorted(self.a.db['VDI']))
        self.assertEqual(1, len(self.a.args_of('VDI.destroy')))

    def test_refusals(self):
        exc = self.assertRaises(errors.NotSupported, self.new_vm,
                                kernel='/boot/vmlinuz')
        self.assertIn('kernel', str(exc))
        exc = self.assertRaises(errors.NotSupported, self.new_vm,
                                memory_mib=0)
        self.assertIn('memory_mib=0', str(exc))
        # a VIF name that is no network, and no [xenapi]vm_network
        exc = self.assertRaises(host_mod.InvalidVIF, self.new_vm,
                                vifs=['port-1'])
        self.assertIn("'port-1' is not a network of pool pool-a", str(exc))
        self.assertRaises(host_mod.SRNotFound, self.host.create_vm, 'x',
                          [{'sr': 'nope', 'size': GiB}])
        self.host.vm_template = 'Windows 95'
        exc = self.assertRaises(errors.XenAPIError, self.new_vm)
        self.assertIn("no template 'Windows 95'", str(exc))
        self.assertEqual([], self.a.args_of('VM.clone'))

    def test_vif_on_a_named_network(self):
        vm = self.new_vm(vifs=[xfix.NET])
        [vif] = self.a.get('VM', self.vm_ref('i-1'))['VIFs']
        self.assertEqual(self.a.network, self.a.get('VIF', vif)['network'])
        self.assertEqual([xfix.NET], vm.vifs)


class TestImport(LifecycleCase):

    def image(self, data, name='img.raw', at=0):
        folder = manager.image_folder(self.host)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, 'wb') as f:
            f.seek(at)
            f.write(data)
        return path

    def test_raw_image_goes_as_a_sparse_vhd(self):
        vm = self.new_vm(sizes=(64 * MiB,))
        vdi = vm.disks[0]['vdi']
        path = self.image(b'\5' * MiB, at=8 * MiB)
        result = manager.import_image(self.host, vdi, path, 'raw')
        self.assertEqual({'size': 9 * MiB, 'written': MiB}, result)
        [(ref, fmt, written)] = self.a.imports
        self.assertEqual(('vhd', MiB), (fmt, written))
        self.assertEqual(vdi, self.a.get('VDI', ref)['uuid'])
        # what xapi wrote, byte by byte: the image's data at its offset
        disk = bytearray(64 * MiB)
        for offset, chunk in self.a.contents[ref].items():
            disk[offset:offset + len(chunk)] = chunk
        expected = bytearray(64 * MiB)
        expected[8 * MiB:9 * MiB] = b'\5' * MiB
        self.assertEqual(hashlib.sha256(expected).hexdigest(),
                         hashlib.sha256(disk).hexdigest())
        [(method, query)] = [c for c in self.a.call_args
                             if c[0] == 'PUT /import_raw_vdi']
        self.assertEqual(('vhd', ref), (query['format'], query['vdi']))
        # the task was ours, and is gone
        self.assertNotIn(query['task_id'], self.a.db['task'])
        self.assertEqual([], os.listdir(os.path.join(
            self.host.state_path, 'xenapi-imports')))

    def test_vhd_image(self):
        vm = self.new_vm(sizes=(64 * MiB,))
        folder = manager.image_folder(self.host)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'img.vhd')
        vhd_ops.create(path, 16 * MiB)
        from xsm_driver.core.block import backends
        dev = backends.VHDDevice(path, writable=True)
        dev.pwrite(b'\3' * 4096, 2 * MiB)
        dev.flush()
        dev.close()
        result = manager.import_image(self.host, vm.disks[0]['vdi'], path,
                                      'vhd')
        self.assertEqual(4096, result['written'])
        [(ref, fmt, _w)] = self.a.imports
        blob = b''.join(c for _o, c in sorted(self.a.contents[ref].items()))
        self.assertEqual(b'\3' * 4096, blob.strip(b'\0'))

    def test_xapi_refusal_is_read_from_the_task(self):
        # web-1 runs: its disk is attached, xapi cannot import into it
        vdi = self.uuid(self.a, 'VDI', self.disk1)
        path = self.image(b'\1' * 4096)
        exc = self.assertRaises(errors.XenAPIError, manager.import_image,
                                self.host, vdi, path, 'raw')
        self.assertIn('VDI_IN_USE', str(exc))
        self.assertEqual([], self.a.imports)

    def test_image_larger_than_the_vdi(self):
        vm = self.new_vm(sizes=(4 * MiB,))
        path = self.image(b'\1' * 4096, at=5 * MiB)
        self.assertRaises(exception.XSMError, manager.import_image,
                          self.host, vm.disks[0]['vdi'], path, 'raw')
        self.assertEqual([], self.calls(prefix='PUT'))


class TestImportOverHTTPS(LifecycleCase):
    """The PUT goes with the pool's TLS settings and session."""

    def setUp(self):
        super().setUp()
        pki = tls.make_credentials(self.make_tempdir())
        self.ca = pki[tls.CA_CERT]
        self.https = self.start_server(self.a, tls.server_context(
            pki[tls.SERVER_CERT], pki[tls.SERVER_KEY]))

    def engine_on(self, **pool_args):
        engine = engine_mod.XenAPIEngine(
            'pool-a', self.make_pool('pool-a', self.https, **pool_args),
            state_path=self.make_tempdir(), poll_interval=0.02)
        self.addCleanup(engine.shutdown)
        return engine

    def image(self, host):
        folder = manager.image_folder(host)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'img.raw')
        with open(path, 'wb') as f:
            f.write(b'\x09' * 8192)
        return path

    def test_import_over_https(self):
        host = self.engine_on(ca_file=self.ca).host
        vm = host.create_vm('i-s', [{'sr': 'NFS-A', 'size': 8 * MiB}])
        result = manager.import_image(host, vm.disks[0]['vdi'],
                                      self.image(host), 'raw')
        self.assertEqual(8192, result['written'])
        [(ref, fmt, _w)] = self.a.imports
        self.assertEqual(vm.disks[0]['vdi'], self.a.get('VDI', ref)['uuid'])
        # the session of the XML-RPC calls
        [(_m, query)] = [c for c in self.a.call_args if c[0].startswith(
            'PUT')]
        self.assertIn(query['session_id'], self.a.sessions)

    def test_untrusted_master(self):
        trusted = self.engine_on(ca_file=self.ca).host
        vm = trusted.create_vm('i-s', [{'sr': 'NFS-A', 'size': 8 * MiB}])
        host = self.engine_on().host
        exc = self.assertRaises(errors.PoolUnreachable, host.put_vdi,
                                'OpaqueRef:x', vm.disks[0]['vdi'],
                                self.image(trusted), 'raw')
        self.assertIn('[xenapi]ca_file', str(exc))
        self.assertEqual([], self.calls(prefix='PUT'))


class TestPower(LifecycleCase):

    def test_start_stop_pause_resume_reboot_destroy(self):
        vm = self.new_vm()
        ref = self.vm_ref('i-1')
        self.assertEqual('running', self.host.start_vm(vm.uuid).power_state)
        self.assertEqual([[ref, False, False]], self.a.args_of('VM.start'))
        # started again: nothing (as the native host)
        self.host.start_vm(vm.uuid)
        self.assertEqual(1, self.a.boots[ref])
        self.assertEqual('paused', self.host.pause_vm(vm.uuid).power_state)
        self.assertEqual('running',
                         self.host.resume_vm(vm.uuid).power_state)
        self.host.reboot_vm(vm.uuid)
        self.assertEqual(2, self.a.boots[ref])
        self.assertEqual(1, len(self.a.args_of('Async.VM.clean_reboot')))
        self.assertEqual('halted', self.host.stop_vm(vm.uuid).power_state)
        self.assertEqual([], self.a.args_of('VM.hard_shutdown'))
        self.assertEqual(1, len(self.a.args_of('Async.VM.clean_shutdown')))
        self.host.stop_vm(vm.uuid)                  # halted: nothing
        self.assertEqual(1, len(self.a.args_of('Async.VM.clean_shutdown')))
        self.host.start_vm(vm.uuid)
        vdis = [self.a.get('VBD', b)['VDI']
                for b in self.a.get('VM', ref)['VBDs']]
        self.host.destroy_vm(vm.uuid)
        self.assertNotIn(ref, self.a.db['VM'])
        self.assertEqual([[ref]], self.a.args_of('VM.hard_shutdown'))
        self.assertEqual([[v] for v in vdis], self.a.args_of('VDI.destroy'))
        self.assertFalse(set(vdis) & set(self.a.db['VDI']))
        self.assertRaises(host_mod.VMNotFound, self.host.vm, vm.uuid)

    def test_unresponsive_guest_is_forced(self):
        vm = self.new_vm()
        ref = self.vm_ref('i-1')
        self.host.start_vm(vm.uuid)
        self.host.shutdown_timeout = 0.3
        self.a.unresponsive.add(ref)
        start = time.monotonic()
        self.assertEqual('halted', self.host.stop_vm(vm.uuid).power_state)
        self.assertGreaterEqual(time.monotonic() - start, 0.3)
        self.assertEqual(1, len(self.a.args_of('task.cancel')))
        self.assertEqual([[ref]], self.a.args_of('VM.hard_shutdown'))
        self.host.start_vm(vm.uuid)
        self.host.reboot_vm(vm.uuid)
        self.assertEqual([[ref]], self.a.args_of('VM.hard_reboot'))
        self.assertEqual('running', self.host.vm(vm.uuid).power_state)

    def test_a_refused_cancel_still_forces_the_guest(self):
        vm = self.new_vm()
        ref = self.vm_ref('i-1')
        self.host.start_vm(vm.uuid)
        self.host.shutdown_timeout = 0.2
        self.a.unresponsive.add(ref)
        self.a.fail('task.cancel', 'INTERNAL_ERROR', 'no')
        self.assertEqual('halted', self.host.stop_vm(vm.uuid).power_state)
        self.assertEqual([[ref]], self.a.args_of('VM.hard_shutdown'))
        # xapi's hard_shutdown cancelled the clean one: its task ended
        [task] = [t for t in self.a.db['task'].values()
                  if t['name_label'] == 'Async.VM.clean_shutdown'] or [None]
        self.assertIsNone(task)             # and the facade destroyed it

    def test_bad_power_state_in_words(self):
        vm = self.new_vm()
        exc = self.assertRaises(host_mod.InvalidVMState, self.host.pause_vm,
                                vm.uuid)
        self.assertEqual('VM %s on host pool-a is halted; pausing VM %s '
                         'needs it running' % (vm.uuid, vm.uuid), str(exc))

    def test_console_is_not_a_serial_log(self):
        exc = self.assertRaises(errors.ConsoleNotSupported,
                                self.host.console_output, 'web-1')
        self.assertIn('VNC', str(exc))

    def test_agent_for_one_host_of_the_pool(self):
        h2 = self.a.add_host('pool-a-h2')
        shared = self.a.add_sr('Shared', type='nfs')
        self.host.pool_host = 'pool-a-h2'
        self.assertEqual({}, self.host.vms)         # web-1 runs on master
        self.assertRaises(host_mod.VMNotFound, self.host.vm, 'web-1')
        vm = self.host.create_vm('i-2', [{'sr': 'Shared', 'size': GiB}])
        ref = self.vm_ref('i-2')
        self.assertEqual(h2, self.a.get('VM', ref)['affinity'])
        self.assertEqual(['i-2'], [v.name for v in self.host.vms.values()])
        self.host.start_vm(vm.uuid)
        self.assertEqual([[ref, h2, False, False]],
                         self.a.args_of('VM.start_on'))
        self.assertEqual(h2, self.a.get('VM', ref)['resident_on'])
        res = self.host.resources()
        self.assertEqual({'memory_mib': 16 * 1024,
                          'memory_free_mib': 16 * 1024 - 256, 'vcpus': 8,
                          'hosts': ['pool-a-h2']}, res)
        del shared

    def test_resources_of_the_pool(self):
        self.a.add_host('pool-a-h2', memory=8 * GiB, cpus=4)
        res = self.host.resources()
        # web-1 (256 MiB) runs on the master
        self.assertEqual({'memory_mib': 24 * 1024,
                          'memory_free_mib': 24 * 1024 - 256, 'vcpus': 12,
                          'hosts': ['pool-a-h2', 'pool-a-master']}, res)
