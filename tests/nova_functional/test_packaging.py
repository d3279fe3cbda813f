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
from unittest import mock

from nova.compute import manager
from nova.objects import base as obj_base
from nova.objects import migrate_data as nova_migrate_data
from nova import test
from nova.virt import driver as nova_driver
from oslo_serialization import jsonutils

from xsm_driver.nova import driver as xsm_driver
from xsm_driver.nova import migrate_data as xsm_migrate_data
from xsm_driver.nova import shim

# A fresh interpreter with nova alone (nothing of xsm-driver imported), as
# the stock nova-conductor is: does it deserialise the primitive on stdin?
_PROBE = '''
import json, sys
from nova import objects
from nova.objects import base
from oslo_versionedobjects import exception

objects.register_all()
assert not [m for m in sys.modules if m.startswith('xsm_driver')]
try:
    obj = base.NovaObjectSerializer().deserialize_entity(
        None, json.loads(sys.stdin.read()))
except exception.UnsupportedObjectError as exc:
    print('refused: %s' % exc)
    sys.exit(3)
print('%s %s' % (obj.obj_name(), obj.instance_relative_path))
'''


def _probe(primitive):
    env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING='True')
    return subprocess.run([sys.executable, '-c', _PROBE],
                          input=jsonutils.dumps(primitive), env=env,
                          capture_output=True, text=True, timeout=120)


class TestMigrateData(test.NoDBTestCase):
    """The driver's migrate_data is nova's own: stock services only."""

    def _data(self):
        return xsm_migrate_data.check_data('local', 5 << 30)

    def test_registers_no_object_of_its_own(self):
        classes = obj_base.NovaObjectRegistry.obj_classes()
        self.assertNotIn('XSMLiveMigrateData', classes)
        self.assertIs(nova_migrate_data.LibvirtLiveMigrateData,
                      type(self._data()))

    def test_round_trip(self):
        serializer = obj_base.NovaObjectSerializer()
        primitive = json.loads(jsonutils.dumps(
            serializer.serialize_entity(None, self._data())))
        obj = serializer.deserialize_entity(None, primitive)
        self.assertEqual('local', xsm_migrate_data.dest_sr(obj))
        self.assertEqual(5 << 10, obj.disk_available_mb)
        self.assertTrue(obj.block_migration)

    def test_nova_rolls_back_at_the_destination_for_it(self):
        # nova's manager asks the destination to roll back (and so ends
        # its live_migration_at_dest task) only for the classes it knows
        do_cleanup, destroy_disks = \
            manager.ComputeManager._live_migration_cleanup_flags(
                mock.Mock(), self._data())
        self.assertTrue(do_cleanup)
        self.assertTrue(destroy_disks)

    def test_not_ours(self):
        self.assertIsNone(xsm_migrate_data.dest_sr(None))
        self.assertIsNone(xsm_migrate_data.dest_sr(
            nova_migrate_data.LibvirtLiveMigrateData()))

    def test_stock_conductor_deserialises_it(self):
        primitive = obj_base.NovaObjectSerializer().serialize_entity(
            None, self._data())
        proc = _probe(primitive)
        self.assertEqual(0, proc.returncode, proc.stdout + proc.stderr)
        self.assertEqual('LibvirtLiveMigrateData local',
                         proc.stdout.strip())

    def test_no_conductor_of_its_own(self):
        from xsm_driver.cmd import nova as cmd_nova
        self.assertFalse(hasattr(cmd_nova, 'conductor'))
        self.assertRaises(ImportError, __import__,
                          'xsm_driver.nova.conductor')


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
