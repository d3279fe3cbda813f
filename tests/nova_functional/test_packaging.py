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

"""How nova finds the driver and how its processes know the object."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from nova.objects import base as obj_base
from nova import test
from nova.virt import driver as nova_driver
from oslo_serialization import jsonutils

from xsm_driver.nova import driver as xsm_driver
from xsm_driver.nova import migrate_data as xsm_migrate_data
from xsm_driver.nova import shim

# A fresh interpreter: does it deserialise the primitive on stdin? With
# argument "conductor" it runs xsm-nova-conductor's main, whose
# nova.cmd.conductor.main is replaced by the same check.
_PROBE = '''
import json, sys
from unittest import mock
import nova.cmd.conductor
from nova import objects
from nova.objects import base
from oslo_versionedobjects import exception

def check():
    objects.register_all()
    try:
        obj = base.NovaObjectSerializer().deserialize_entity(
            None, json.loads(sys.stdin.read()))
    except exception.UnsupportedObjectError as exc:
        print('refused: %s' % exc)
        return 3
    print('%s %s' % (obj.obj_name(), obj.dest_sr))
    return 0

if sys.argv[1:] == ['conductor']:
    from xsm_driver.nova import conductor
    with mock.patch('nova.cmd.conductor.main', check):
        sys.exit(conductor.main())
sys.exit(check())
'''


def _probe(primitive, *args):
    env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='True')
    return subprocess.run([sys.executable, '-c', _PROBE] + list(args),
                          input=jsonutils.dumps(primitive), env=env,
                          capture_output=True, text=True, timeout=120)


class TestMigrateData(test.NoDBTestCase):

    def _data(self):
        return xsm_migrate_data.XSMLiveMigrateData(
            block_migration=True, source_host='host1', dest_host='host2',
            dest_sr='local', disk_available_bytes=1 << 30,
            disk_needed_bytes=1 << 20, vdi_map={'v1': 'local'},
            vif_map={}, migration_address='192.0.2.7', migration_id=None)

    def test_registered(self):
        classes = obj_base.NovaObjectRegistry.obj_classes()
        self.assertIn('XSMLiveMigrateData', classes)

    def test_round_trip(self):
        serializer = obj_base.NovaObjectSerializer()
        primitive = json.loads(jsonutils.dumps(
            serializer.serialize_entity(None, self._data())))
        obj = serializer.deserialize_entity(None, primitive)
        self.assertIsInstance(obj, xsm_migrate_data.XSMLiveMigrateData)
        self.assertEqual({'v1': 'local'}, obj.vdi_map)
        self.assertEqual('host2', obj.dest_host)
        self.assertIsNone(obj.migration_id)

    def _prepared(self):
        data = self._data()
        data.migration_id = 'm1'
        data.receive_request = '{"id": "m1"}'
        data.receive_host = '192.0.2.7'
        data.receive_port = 40123
        data.server_ca_pem = 'CA PEM'
        data.server_fingerprint = 'AB:CD'
        data.receive_exports = '{"v1": {"base": "SECRET-B", "leaf": ' \
                               '"SECRET-L"}}'
        return data

    def test_prepared_round_trip(self):
        serializer = obj_base.NovaObjectSerializer()
        primitive = json.loads(jsonutils.dumps(
            serializer.serialize_entity(None, self._prepared())))
        self.assertEqual('1.1', primitive['nova_object.version'])
        obj = serializer.deserialize_entity(None, primitive)
        self.assertTrue(obj.prepared)
        self.assertEqual(40123, obj.receive_port)
        self.assertEqual({'v1': {'base': 'SECRET-B', 'leaf': 'SECRET-L'}},
                         json.loads(obj.receive_exports))
        self.assertFalse(self._data().prepared)

    def test_export_names_never_show_in_a_repr(self):
        text = repr(self._prepared())
        self.assertIn("receive_exports='<secret>'", text)
        self.assertIn('receive_port=40123', text)
        self.assertNotIn('SECRET', text)

    def test_a_1_0_host_gets_the_old_fields_only(self):
        primitive = self._prepared().obj_to_primitive(target_version='1.0')
        self.assertEqual('1.0', primitive['nova_object.version'])
        data = primitive['nova_object.data']
        for name in xsm_migrate_data.PREPARED_FIELDS:
            self.assertNotIn(name, data)
        self.assertEqual('m1', data['migration_id'])
        self.assertEqual('host2', data['dest_host'])
        old = xsm_migrate_data.XSMLiveMigrateData.obj_from_primitive(
            primitive)
        self.assertFalse(old.prepared)

    def test_plain_conductor_refuses_it(self):
        """Why xsm-nova-conductor exists: nova-conductor alone fails."""
        primitive = obj_base.NovaObjectSerializer().serialize_entity(
            None, self._data())
        proc = _probe(primitive)
        self.assertEqual(3, proc.returncode, proc.stderr)
        self.assertIn('XSMLiveMigrateData', proc.stdout)

    def test_xsm_nova_conductor_knows_it(self):
        primitive = obj_base.NovaObjectSerializer().serialize_entity(
            None, self._data())
        proc = _probe(primitive, 'conductor')
        self.assertEqual(0, proc.returncode, proc.stdout + proc.stderr)
        self.assertEqual('XSMLiveMigrateData local', proc.stdout.strip())

    def test_console_script(self):
        script = shutil.which('xsm-nova-conductor',
                              path=os.path.dirname(sys.executable))
        self.assertIsNotNone(script, 'pip install -e . into this venv')


class TestShim(test.NoDBTestCase):

    def test_compute_driver_xsm_loads_the_driver(self):
        self.flags(compute_driver='xsm.XSMDriver')
        drv = nova_driver.load_compute_driver(None)
        self.assertIsInstance(drv, xsm_driver.XSMDriver)

    def test_installed_in_this_nova(self):
        self.assertTrue(shim.is_installed(), shim.shim_path())
        self.assertTrue(shim.shim_path().startswith(
            os.path.dirname(os.path.dirname(nova_driver.__file__))))

    def test_install_check_remove(self):
        base = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, base)
        self.assertFalse(shim.is_installed(base))
        path = shim.install(base)
        self.assertEqual(os.path.join(base, 'xsm', '__init__.py'), path)
        self.assertTrue(shim.is_installed(base))
        shim.install(base)                      # idempotent
        with open(path) as f:
            self.assertIn('from xsm_driver.nova.driver import XSMDriver',
                          f.read())
        shim.remove(base)
        self.assertFalse(os.path.exists(os.path.dirname(path)))
        shim.remove(base)                       # idempotent
