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

"""Nova on XenServer/XCP-ng pools: ``[agent]engine = xenapi``.

Nova's real API, conductor, scheduler, placement and three nova-compute
services (``compute_driver = xsm.XSMDriver``, ``[xsm]agent =
external``), each served by an xsm agent on the xenapi engine that
stands for one host of a fake pool (tests/xenapi_fake.py: xapi's XML-RPC
and its ``/import_raw_vdi`` handler on loopback, xapi's rules):

* pool A: hosts ``xs1`` and ``xs2`` (the Nova computes of the same
  names), shared SR ``Shared-A``;
* pool B: host ``xsb1``, shared SR ``Shared-B``.

Checked through Nova's API and in the fake pools' records of the calls
xapi would have received: boot (the template cloned with the flavor's
memory and vCPUs, the Glance image imported into the root VDI), power
operations, live migration within pool A (``VM.pool_migrate``, the disks
stay) and to pool B (``--block-migrate``: ``VM.migrate_send`` with the
VDI map), an abort (``task.cancel``: the VM stays on xs1) and a
force-complete.

The agent answers the pool host's memory and CPUs in ``host_info``
(``resources``): the driver reports them to placement, and gives each VM
the flavor's memory and vCPUs.
"""

import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import fixtures

from nova.compute import power_state
from nova import context as nova_context
from nova import objects
from nova.tests.functional import integrated_helpers
from oslo_utils.fixture import uuidsentinel as uuids
from oslo_utils import uuidutils

from tests.nova_functional import base
from tests import xenapi_fake as fake
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.xenapi import engine as engine_mod
from xsm_driver.core.xenapi import session
from xsm_driver.nova import decisions
from xsm_driver.nova import driver as xsm_driver

MiB, GiB = base.MiB, base.GiB
NET = 'Pool-wide network associated with eth0'
XS1, XS2, XSB1 = 'xs1', 'xs2', 'xsb1'
IMAGE_MIB = 4


class XenAPIPoolTestCase(base.PatientStateWaits, base.MigrationPolling,
                         integrated_helpers.ProviderUsageBaseTestCase):

    compute_driver = 'xsm.XSMDriver'
    MEMORY_MB, VCPUS = 512, 2

    def setUp(self):
        self.flags(api_paste_config=os.path.join(
            sys.prefix, 'etc', 'nova', 'api-paste.ini'), group='wsgi')
        super().setUp()
        self.root = tempfile.mkdtemp(prefix='xsm-nova-xenapi-')
        self.addCleanup(subprocess.call, ['rm', '-rf', self.root])
        self.make_pools()
        self.flags(group='xsm', agent='external',
                   transport_url='fake://xsm-%s/'
                   % uuidutils.generate_uuid(),
                   progress_interval=0.1, rpc_timeout=30, leaf_headroom_mb=8)
        self.engines = {}
        self.xsm = {}
        for host, pool, server, sr, dests in (
                (XS1, self.a, self.server_a, 'Shared-A', {XSB1: 'b'}),
                (XS2, self.a, self.server_a, 'Shared-A', {XSB1: 'b'}),
                (XSB1, self.b, self.server_b, 'Shared-B', {})):
            self.start_agent(host, server, dests)
            self.start_compute(host, sr)
        flavor_id = self._create_flavor(
            name='xen.small', memory_mb=self.MEMORY_MB, vcpu=self.VCPUS,
            disk=1, ephemeral=0)
        self.flavor = self.admin_api.get_flavor(flavor_id)
        # targeted at cell1, where the instances and migrations are: an
        # untargeted context reads the cell nova's CellDatabases fixture
        # used last, cell0 while another thread (the migration poller's
        # GET /os-migrations, over every cell) targets it: the instance
        # was then not found (InstanceNotFound, seen at load ~18)
        self.ctxt = nova_context.get_admin_context()
        nova_context.set_target_cell(self.ctxt, self.cell_mappings['cell1'])

    # -- the pools, their agents and the computes ----------------------------

    def make_pools(self):
        self.a = fake.FakePool('nova-pool-a-%s' % uuidutils.generate_uuid(),
                               task_seconds=0.5)
        self.a.get('host', self.a.master)['name_label'] = XS1
        self.xs2 = self.a.add_host(XS2)
        self.sr_a = self.a.add_sr('Shared-A', type='nfs')
        self.b = fake.FakePool('nova-pool-b-%s' % uuidutils.generate_uuid(),
                               task_seconds=0.5)
        self.b.get('host', self.b.master)['name_label'] = XSB1
        self.sr_b = self.b.add_sr('Shared-B', type='nfs')
        self.server_a = fake.XenAPIServer(self.a).start()
        self.addCleanup(self.server_a.stop)
        self.server_b = fake.XenAPIServer(self.b).start()
        self.addCleanup(self.server_b.stop)

    def state_path(self, host):
        return os.path.join(self.root, host, 'state')

    def start_agent(self, host, server, dests):
        servers = {'b': self.server_b}

        def pool(name, srv):
            return session.Pool(name, srv.url, 'root', 'secret',
                                timeout=10, retry_interval=0.01)

        def engine(peer_factory):
            eng = engine_mod.XenAPIEngine(
                host, pool(host, server),
                {name: pool(name, servers[key])
                 for name, key in dests.items()},
                options=manager_mod.Options(),
                state_path=self.state_path(host), poll_interval=0.05,
                pool_host=host, vm_network=NET, shutdown_timeout=2.0)
            self.engines[host] = eng
            return eng

        os.makedirs(self.state_path(host), exist_ok=True)
        # the transport the drivers use (one per URL in this process)
        transport = xsm_driver._transport(xsm_driver.CONF)
        agent = agent_mod.Agent(transport, None, engine=engine).start()
        self.addCleanup(agent.stop)

    def start_compute(self, host, sr):
        self.flags(group='xsm', instance_sr=sr,
                   state_path=self.state_path(host))
        with mock.patch('nova.virt.node.get_local_node_uuid',
                        return_value=str(getattr(uuids, 'node_%s' % host))):
            compute = self._start_compute(host)
        self.xsm[host] = compute.manager.driver._agent_api(host)
        return compute

    # -- helpers -------------------------------------------------------------

    def create_image(self):
        self.image_data = os.urandom(MiB) + bytes((IMAGE_MIB - 1) * MiB)
        image_id = uuidutils.generate_uuid()
        self.glance.create(None, {
            'id': image_id, 'name': 'xen-raw', 'status': 'active',
            'disk_format': 'raw', 'container_format': 'bare',
            'size': len(self.image_data), 'min_disk': 0, 'min_ram': 0,
            'is_public': True, 'properties': {}},
            data=io.BytesIO(self.image_data))
        return image_id

    def boot(self, host=XS1, networks='none'):
        request = self._build_server(image_uuid=self.create_image(),
                                     flavor_id=self.flavor['id'],
                                     networks=networks)
        request['availability_zone'] = 'nova:%s' % host
        server = self._wait_for_state_change(
            self.api.post_server({'server': request}), 'ACTIVE')
        self.assertEqual(host, server['OS-EXT-SRV-ATTR:host'])
        return server

    def vm_ref(self, pool, server):
        name = decisions.vm_name(server['id'])
        found = [r for r, rec in pool.db['VM'].items()
                 if rec['name_label'] == name and not rec['is_a_template']]
        self.assertEqual(1, len(found), found)
        return found[0]

    def disk_bytes(self, pool, vdi, length):
        disk = bytearray(length)
        for offset, chunk in pool.contents.get(vdi, {}).items():
            if offset < length:
                disk[offset:offset + len(chunk)] = chunk[:length - offset]
        return bytes(disk)

    def live_migrate(self, server, host, block_migration):
        self.poll_migrations(server)
        self.api.post_server_action(server['id'], {
            'os-migrateLive': {'host': host,
                               'block_migration': block_migration}})

    def wait_for(self, what, predicate, timeout=60, interval=0.1):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail('timed out after %s s waiting for %s'
                          % (timeout, what))
            time.sleep(interval)

    def wait_for_server(self, server, host, status='ACTIVE', timeout=60):
        def check():
            s = self.api.get_server(server['id'])
            if s['OS-EXT-SRV-ATTR:host'] == host and \
                    s['status'] == status and \
                    s['OS-EXT-STS:task_state'] is None:
                return s
            return None
        return self.wait_for('server %s %s on %s' % (server['id'], status,
                                                     host), check, timeout)

    def migration_record(self, server, statuses=None):
        for mig in self.admin_api.api_get('/os-migrations').body[
                'migrations']:
            if mig['instance_uuid'] == server['id'] and (
                    statuses is None or mig['status'] in statuses):
                return mig
        return None

    def wait_for_migration(self, server, statuses, timeout=60):
        return self.wait_for(
            'migration of %s in %s' % (server['id'], statuses),
            lambda: self.migration_record(server, statuses), timeout)

    def driver_state(self, server, host):
        instance = objects.Instance.get_by_uuid(self.ctxt, server['id'])
        return self.computes[host].manager.driver.get_info(instance).state


class TestBootAndPower(XenAPIPoolTestCase):

    def test_boot_power_and_delete(self):
        server = self.boot()
        ref = self.vm_ref(self.a, server)
        rec = self.a.get('VM', ref)
        # the template cloned, with the flavor's memory and vCPUs, on xs1
        self.assertEqual([[self.a.template, decisions.vm_name(server['id'])]],
                         self.a.args_of('VM.clone'))
        self.assertEqual((self.MEMORY_MB * MiB, self.MEMORY_MB * MiB),
                         (rec['memory_dynamic_max'],
                          rec['memory_static_max']))
        self.assertEqual((self.VCPUS, self.VCPUS),
                         (rec['VCPUs_max'], rec['VCPUs_at_startup']))
        self.assertEqual('Running', rec['power_state'])
        self.assertEqual(self.a.master, rec['resident_on'])
        self.assertEqual([[ref, self.a.master, False, False]],
                         self.a.args_of('VM.start_on'))
        # the root disk: 1 GiB on Shared-A, the image imported into it
        [vbd] = rec['VBDs']
        vdi = self.a.get('VBD', vbd)['VDI']
        self.assertEqual((self.sr_a, GiB), (
            self.a.get('VDI', vdi)['SR'],
            self.a.get('VDI', vdi)['virtual_size']))
        [(imported, fmt, _written)] = self.a.imports
        self.assertEqual((vdi, 'vhd'), (imported, fmt))
        self.assertEqual(self.image_data, self.disk_bytes(
            self.a, vdi, len(self.image_data)))
        # what Nova sees
        self.assertEqual(power_state.RUNNING, self.driver_state(server, XS1))
        self.assertEqual([decisions.vm_name(server['id'])],
                         self.computes[XS1].manager.driver.list_instances())
        self.assertEqual([], self.computes[XS2].manager.driver.
                         list_instances())
        # power operations, each the call xapi takes
        server = self._stop_server(server)
        self.assertEqual('Halted', self.a.get('VM', ref)['power_state'])
        self.assertEqual(1, len(self.a.args_of('Async.VM.clean_shutdown')))
        server = self._start_server(server)
        self.assertEqual('Running', self.a.get('VM', ref)['power_state'])
        self.api.post_server_action(server['id'], {'pause': None})
        self._wait_for_state_change(server, 'PAUSED')
        self.assertEqual('Paused', self.a.get('VM', ref)['power_state'])
        self.api.post_server_action(server['id'], {'unpause': None})
        self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual([[ref]], self.a.args_of('VM.unpause'))
        boots = self.a.boots[ref]
        self.api.post_server_action(server['id'],
                                    {'reboot': {'type': 'HARD'}})
        self._wait_for_state_change(server, 'ACTIVE')
        self.wait_for('the reboot', lambda: self.a.boots[ref] > boots)
        # a pool VM has no serial console: nova's "not available" (404)
        resp = self.api.api_post('/servers/%s/action' % server['id'],
                                 {'os-getConsoleOutput': {}},
                                 check_response_status=False)
        self.assertEqual(404, resp.status)
        self.assertIn('Guest does not have a console available',
                      str(resp.body))
        self._delete_server(server)
        self.assertNotIn(ref, self.a.db['VM'])
        self.assertNotIn(vdi, self.a.db['VDI'])
        self.assertEqual([[vdi]], self.a.args_of('VDI.destroy'))

    def test_resources_of_the_pool_host(self):
        # placement: the SR's size for DISK_GB, the pool host's memory and
        # CPUs (not those of the machine nova-compute runs on)
        rp = self._get_provider_uuid_by_host(XS1)
        inventory = self._get_provider_inventory(rp)
        self.assertEqual(100, inventory['DISK_GB']['total'])
        self.assertEqual(16 * 1024, inventory['MEMORY_MB']['total'])
        self.assertEqual(8, inventory['VCPU']['total'])
        info = self.engines[XS1].host.resources()
        self.assertEqual({'memory_mib': 16 * 1024, 'memory_free_mib':
                          16 * 1024, 'vcpus': 8, 'hosts': [XS1]}, info)


class TestLiveMigration(XenAPIPoolTestCase):

    def test_within_the_pool(self):
        server = self.boot()
        ref = self.vm_ref(self.a, server)
        [vbd] = self.a.get('VM', ref)['VBDs']
        vdi = self.a.get('VBD', vbd)['VDI']
        self.live_migrate(server, XS2, 'auto')
        self.wait_for_server(server, XS2)
        self.wait_for_migration(server, ['completed'])
        self.assertEqual([[ref, self.xs2, {'live': 'true'}]],
                         self.a.args_of('Async.VM.pool_migrate'))
        self.assertEqual([], self.a.args_of('Async.VM.migrate_send'))
        rec = self.a.get('VM', ref)
        self.assertEqual((self.xs2, 'Running'),
                         (rec['resident_on'], rec['power_state']))
        # the same disk, on the same shared SR
        self.assertEqual(vdi, self.a.get('VBD', vbd)['VDI'])
        self.assertEqual([], self.computes[XS1].manager.driver.
                         list_instances())
        self.assertEqual(power_state.RUNNING, self.driver_state(server, XS2))

    def test_across_pools_block_migrate(self):
        # a Neutron port: the VIF is made on [xenapi]vm_network, named by
        # the port's id
        server = self.boot(networks=[
            {'uuid': self.neutron.network_1['id']}])
        ref = self.vm_ref(self.a, server)
        uuid = self.a.get('VM', ref)['uuid']
        [vbd] = self.a.get('VM', ref)['VBDs']
        vdi = self.a.get('VBD', vbd)['VDI']
        [vif] = self.a.get('VM', ref)['VIFs']
        [port] = self.neutron.list_ports(
            True, device_id=server['id'])['ports']
        self.assertEqual({'xsm-vif': port['id']},
                         self.a.get('VIF', vif)['other_config'])
        self.assertEqual(self.a.network, self.a.get('VIF', vif)['network'])
        self.live_migrate(server, XSB1, True)
        self.wait_for_server(server, XSB1)
        record = self.wait_for_migration(server, ['completed'])
        # the calls xapi would have received, with the maps
        [receive] = self.b.args_of('host.migrate_receive')
        self.assertEqual([self.b.master, self.b.network, {}], receive)
        [send] = self.a.args_of('Async.VM.migrate_send')
        self.assertEqual(ref, send[0])
        self.assertTrue(send[2])                        # live
        self.assertEqual({vdi: self.sr_b}, send[3])
        # the port's VIF to pool B's network of the same name
        self.assertEqual({vif: self.b.network}, send[4])
        self.assertEqual([], self.a.args_of('Async.VM.pool_migrate'))
        self.assertNotIn(ref, self.a.db['VM'])
        new = self.vm_ref(self.b, server)
        [new_vif] = self.b.get('VM', new)['VIFs']
        self.assertEqual(self.b.network,
                         self.b.get('VIF', new_vif)['network'])
        self.assertEqual((uuid, 'Running', self.b.master), (
            self.b.get('VM', new)['uuid'],
            self.b.get('VM', new)['power_state'],
            self.b.get('VM', new)['resident_on']))
        self.assertEqual(power_state.RUNNING,
                         self.driver_state(server, XSB1))
        # the progress Nova recorded: xapi's task over the disk's bytes
        migration = objects.Migration.get_by_id(self.ctxt, record['id'])
        self.assertGreater(migration.disk_total, 0)
        self.assertEqual(migration.disk_total, migration.disk_processed)

    def running_migration(self, server):
        record = self.wait_for_migration(server, ['running'])
        self.wait_for('xapi\'s task', lambda: [
            t for t in self.a.db['task'].values()
            if t['name_label'] == 'Async.VM.migrate_send'])
        return record

    def test_abort(self):
        server = self.boot()
        ref = self.vm_ref(self.a, server)
        self.a.hold(0.3)
        self.addCleanup(self.a.release)
        self.live_migrate(server, XSB1, True)
        record = self.running_migration(server)
        self.api.api_delete('/servers/%s/migrations/%s'
                            % (server['id'], record['id']))
        self.wait_for_migration(server, ['cancelled'])
        self.wait_for_server(server, XS1)
        self.assertEqual(1, len(self.a.args_of('task.cancel')))
        # xapi rolled back: the VM runs on xs1, nothing in pool B
        rec = self.a.get('VM', ref)
        self.assertEqual(('Running', self.a.master),
                         (rec['power_state'], rec['resident_on']))
        self.assertEqual([], [r for r, v in self.b.db['VM'].items()
                              if not v['is_a_template']])
        self.assertEqual([], self.b.get('SR', self.sr_b)['VDIs'])
        [status] = self.xsm[XS1].migration_list()
        self.assertEqual('aborted', status['phase'])

    def test_force_complete(self):
        server = self.boot()
        self.a.hold(0.3)
        self.addCleanup(self.a.release)
        forced = []
        engine = self.engines[XS1]
        real = engine.force_complete

        def force_complete(mid):
            forced.append(mid)
            answer = real(mid)
            # xapi decides the switch-over itself: nothing to lift; the
            # task goes on to its end
            threading.Timer(0.2, self.a.release).start()
            return answer

        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.xenapi.engine.XenAPIEngine.force_complete',
            lambda self_, mid: force_complete(mid)))
        self.live_migrate(server, XSB1, True)
        record = self.running_migration(server)
        self.admin_api.force_complete_migration(server['id'], record['id'])
        self.wait_for_server(server, XSB1)
        self.wait_for_migration(server, ['completed'])
        [status] = self.xsm[XS1].migration_list()
        self.assertEqual([status['id']], forced)
        self.assertEqual('done', status['phase'])
        self.assertEqual(1, len(self.a.args_of('Async.VM.migrate_send')))
