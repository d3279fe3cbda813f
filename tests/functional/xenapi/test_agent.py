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

"""An xsm-agent on the xenapi engine, as its clients see it.

The engine is loaded the way ``xsm-agent`` loads it (``[agent]engine =
xenapi``, stevedore, the ``[xenapi]`` options) and served over
oslo.messaging's ``fake://`` transport; the client is the same
:class:`~xsm_driver.core.rpc.api.AgentAPI` that xsm-migrate and the Nova
and CloudStack adapters use. The pools are fake xapi servers on loopback.
"""

import functools
import os
import time

from oslo_config import cfg

from tests.unit.xenapi import fixtures as xfix
from xsm_driver.cmd import common
from xsm_driver import conf as xsm_conf
from xsm_driver.core import engine as engine_mod
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.xenapi import engine as xenapi_engine
from xsm_driver.core.xenapi import errors


class TestAgentOnXenAPI(xfix.PoolsTestCase):

    def make_conf(self, **xenapi):
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf([], project='xsm-driver-test')
        conf.set_override('engine', 'xenapi', group='agent')
        conf.set_override('host', 'pool-a', group='agent')
        conf.set_override('state_path', self.make_tempdir(), group='agent')
        values = {'url': self.server_a.url, 'password': 'secret',
                  'destination_pools': ['pool-b,%s' % self.server_b.url],
                  'local_repositories': ['backup:vhd:%s'
                                         % self.make_tempdir()],
                  'poll_interval': 0.02}
        values.update(xenapi)
        for key, value in values.items():
            conf.set_override(key, value, group='xenapi')
        return conf

    def start_agent(self, conf):
        transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
        options = common.migration_options(conf)
        agent = agent_mod.Agent(
            transport, None, options,
            engine=functools.partial(engine_mod.load, conf,
                                     options=options)).start()
        self.addCleanup(agent.stop)
        return api.AgentAPI(transport, 'pool-a', timeout=10)

    def test_engine_plugin_from_config(self):
        engine = engine_mod.load(self.make_conf(), None, manager.Options())
        self.addCleanup(engine.shutdown)
        self.assertIsInstance(engine, xenapi_engine.XenAPIEngine)
        self.assertEqual(['pool-b'], list(engine.destinations))
        self.assertEqual(['backup'], list(engine.local_srs))

    def test_unknown_engine(self):
        exc = self.assertRaises(engine_mod.UnknownEngine, engine_mod.load,
                                self.make_conf(), name='hyperv')
        self.assertIn('native', str(exc))
        self.assertIn('xenapi', str(exc))

    def test_unconfigured_engine(self):
        self.assertRaises(errors.XenAPIError, engine_mod.load,
                          self.make_conf(url=None))

    def test_migration_through_the_agent_api(self):
        client = self.start_agent(self.make_conf())
        info = client.host_info()
        self.assertEqual('pool-a', info['name'])
        self.assertEqual(['Local storage', 'NFS-A', 'backup'],
                         sorted(s['name'] for s in info['srs']))
        [vm] = client.vm_list()
        self.assertEqual('web-1', vm['name'])
        self.assertEqual('running', vm['power_state'])
        self.assertEqual(['xvda', 'xvdb'], [d['name'] for d in vm['disks']])
        vdis = client.vdi_list('Local storage')
        self.assertEqual(4, len(vdis))          # disks and snapshot VDIs
        self.assertEqual(sorted(d['vdi'] for d in vm['disks']),
                         sorted(v['uuid'] for v in vdis
                                if v['vm'] == vm['uuid']))
        vdi_map = {d['vdi']: 'SR-B' for d in vm['disks']}
        mid = client.migrate_vm(vm['uuid'], 'pool-b', vdi_map, {'0': xfix.NET})
        status = self.follow(client, mid)
        self.assertEqual('done', status['phase'], status['error'])
        self.assertEqual(sorted(vdi_map), sorted(status['result']['vdis']))
        self.assertEqual([], client.vm_list())

    def test_errors_cross_the_rpc_boundary_as_themselves(self):
        client = self.start_agent(self.make_conf())
        [vm] = client.vm_list()
        exc = self.assertRaises(mig_errors.VDINotInMap, client.migrate_vm,
                                vm['uuid'], 'pool-b', {}, {'0': xfix.NET})
        self.assertIn(vm['disks'][0]['vdi'], str(exc))
        exc = self.assertRaises(errors.NotSupported, client.vm_snapshot,
                                vm['uuid'])
        self.assertIn('xe', str(exc))
        # a pool's VM has no serial console: the class Nova's driver
        # turns into "console not available"
        exc = self.assertRaises(errors.ConsoleNotSupported,
                                client.vm_console, vm['uuid'])
        self.assertIsInstance(exc, host_mod.InvalidVMState)
        self.assertIn('VNC', str(exc))

    def test_vm_lifecycle_through_the_agent_api(self):
        conf = self.make_conf(vm_network=xfix.NET, host='pool-a-master',
                              shutdown_timeout=5.0)
        client = self.start_agent(conf)
        vm = client.vm_create('i-1', [{'sr': 'NFS-A', 'size': 8 << 20}],
                              ['port-1'], qemu={'memory_mib': 300,
                                                'vcpus': 3})
        self.assertEqual(('halted', ['port-1'], 300, 3), (
            vm['power_state'], vm['vifs'], vm['memory_mib'], vm['vcpus']))
        folder = manager.image_folder(self.make_conf_host(conf))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'i-1.raw')
        with open(path, 'wb') as f:
            f.write(b'\x01' * 4096)
        self.assertEqual({'size': 4096, 'written': 4096}, client.vdi_import(
            vm['disks'][0]['vdi'], path, 'raw'))
        self.assertEqual('running', client.vm_start(vm['uuid'])[
            'power_state'])
        self.assertEqual('paused', client.vm_pause(vm['uuid'])[
            'power_state'])
        exc = self.assertRaises(host_mod.InvalidVMState, client.vm_pause,
                                vm['uuid'])
        self.assertIn('needs it running', str(exc))
        self.assertEqual('running', client.vm_resume(vm['uuid'])[
            'power_state'])
        self.assertEqual('halted', client.vm_stop(vm['uuid'])[
            'power_state'])
        client.vm_destroy(vm['uuid'])
        self.assertRaises(host_mod.VMNotFound, client.vm_get, vm['uuid'])
        self.assertEqual(['web-1'], [v['name'] for v in client.vm_list()])

    def make_conf_host(self, conf):
        """What the agent's host answers image_folder with."""
        class Host:
            state_path = conf.agent.state_path
        return Host

    def test_operator_mistakes_cross_the_rpc_boundary_as_themselves(self):
        # wrong password: a clear error on the client, not a RemoteError
        client = self.start_agent(self.make_conf(password='wrong'))
        exc = self.assertRaises(errors.PoolUnreachable, client.host_info)
        self.assertIn('user root was refused', str(exc))
        self.assertNotIn('Traceback', str(exc))

    def test_names_and_odd_answers_across_rpc(self):
        client = self.start_agent(self.make_conf())
        [vm] = client.vm_list()
        vdi_map = {d['vdi']: 'SR-B' for d in vm['disks']}
        exc = self.assertRaises(errors.XenAPIError, client.migrate_vm,
                                vm['uuid'], 'pool-b', vdi_map,
                                {'0': 'no-such-net'})
        self.assertIn("no network 'no-such-net' in pool pool-b", str(exc))
        exc = self.assertRaises(errors.XenAPIError, client.migrate_vm,
                                vm['uuid'], 'pool-z', vdi_map, {})
        self.assertIn("unknown destination pool 'pool-z'", str(exc))
        self.a.fail('SR.get_VDIs', 'SOMETHING_NEW', 'x')
        exc = self.assertRaises(errors.XenAPIError, client.vdi_list,
                                'Local storage')
        self.assertIn('SOMETHING_NEW x', str(exc))
        self.assertEqual(0, client.host_info()['active_migrations'])

    def test_bad_destination_pools_refused_at_load(self):
        for spec, why in (('pool-b,ftp://xs-b', "not 'ftp'"),
                          ('pool-b,https://u:hunter2@xs-b', 'user name'),
                          ('pool-a,https://xs-b', 'twice'),
                          (',https://xs-b,root,hunter2', 'no name')):
            exc = self.assertRaises(
                (errors.XenAPIError, ValueError), engine_mod.load,
                self.make_conf(destination_pools=[spec]), None,
                manager.Options())
            self.assertIn(why, str(exc))
            self.assertNotIn('hunter2', str(exc))

    def follow(self, client, mid, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = client.migration_get(mid)
            if status['finished'] is not None:
                return status
            time.sleep(0.02)
        self.fail('migration %s did not finish' % mid)
