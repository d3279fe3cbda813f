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

import importlib.metadata
import os

import fixtures
from stevedore import extension

from tests import base
from xsm_driver.core import exception
from xsm_driver.core import sr
from xsm_driver.core.sr import raw
from xsm_driver.core.sr import vhd


class FakeSR:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


def _entry_point(name, value):
    return importlib.metadata.EntryPoint(name, value, sr.NAMESPACE)


class TestLoadDriver(base.TestCase):

    def setUp(self):
        super().setUp()
        self.entry_points = [
            _entry_point('fake', __name__ + ':FakeSR'),
            _entry_point('broken', 'tests.no_such_module:SR'),
        ]
        self.useFixture(fixtures.MockPatchObject(
            extension.ExtensionManager, 'list_entry_points',
            autospec=True, side_effect=lambda mgr: self.entry_points))

    def test_loads_and_invokes_the_named_driver(self):
        drv = sr.load_driver('fake', 'conf', pool='p1')
        self.assertIsInstance(drv, FakeSR)
        self.assertEqual(('conf',), drv.args)
        self.assertEqual({'pool': 'p1'}, drv.kwargs)

    def test_unknown_name_names_option_and_available_drivers(self):
        exc = self.assertRaises(sr.UnknownSRDriver, sr.load_driver, 'nope')
        self.assertIsInstance(exc, exception.XSMError)
        msg = str(exc)
        self.assertIn("'nope'", msg)
        self.assertIn('[sr]repositories', msg)
        self.assertIn('broken, fake', msg)

    def test_unknown_name_with_no_driver_installed(self):
        self.entry_points = []
        exc = self.assertRaises(sr.UnknownSRDriver, sr.load_driver, 'vhd')
        self.assertIn('(none)', str(exc))

    def test_driver_that_fails_to_import_raises(self):
        self.assertRaises(ImportError, sr.load_driver, 'broken')


class TestNamespace(base.TestCase):

    def test_real_namespace_unknown_name(self):
        exc = self.assertRaises(sr.UnknownSRDriver,
                                sr.load_driver, 'no-such-driver')
        self.assertIn("'no-such-driver'", str(exc))
        self.assertIn(sr.NAMESPACE, str(exc))

    def test_real_drivers_load(self):
        top = self.make_tempdir()
        for name, cls in (('vhd', vhd.VHDSR), ('raw', raw.RawSR)):
            path = os.path.join(top, name)
            drv = sr.load_driver(name, 'sr-' + name, path)
            self.assertIsInstance(drv, cls)
            self.assertEqual(('sr-' + name, path, name),
                             (drv.name, drv.path, drv.type))
            self.assertTrue(os.path.isdir(path))
            vdi = drv.create(4 * 1024 * 1024)
            self.assertEqual(name, vdi.type)

    def test_real_namespace_lists_both_drivers(self):
        exc = self.assertRaises(sr.UnknownSRDriver, sr.load_driver, 'nope')
        self.assertIn('raw', str(exc))
        self.assertIn('vhd', str(exc))
