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

from oslo_config import cfg

from tests import base
from xsm_driver import conf as xsm_conf
from xsm_driver.conf import hypervisor as hv_conf
from xsm_driver.conf import opts
from xsm_driver import hypervisor
from xsm_driver.hypervisor import model
from xsm_driver.hypervisor import qemu


class TestOptions(base.TestCase):

    def conf(self, **overrides):
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf([])
        for name, value in overrides.items():
            conf.set_override(name, value, group='hypervisor')
        return conf

    def test_listed_for_the_generator(self):
        groups = dict(opts.list_opts())
        self.assertIs(hv_conf.hypervisor_opts,
                      groups[hv_conf.hypervisor_group])

    def test_defaults(self):
        h = self.conf().hypervisor
        self.assertEqual('model', h.driver)
        self.assertEqual('qemu-system-x86_64', h.qemu_binary)
        self.assertEqual('auto', h.accel)
        self.assertEqual(256, h.default_memory_mib)
        self.assertEqual(30, h.shutdown_timeout)
        self.assertEqual(60, h.nbd_reconnect_delay)

    def test_accel_choices(self):
        self.assertRaises(ValueError, self.conf, accel='xen')

    def test_from_config(self):
        tmp = self.make_tempdir()
        self.assertIsInstance(hypervisor.from_config(self.conf(), tmp),
                              model.ModelDriver)
        drv = hypervisor.from_config(
            self.conf(driver='qemu', accel='tcg', default_memory_mib=128,
                      shutdown_timeout=5, qemu_binary='/x/qemu',
                      nbd_reconnect_delay=90), tmp)
        self.addCleanup(drv.close)
        self.assertIsInstance(drv, qemu.QemuDriver)
        self.assertEqual(('/x/qemu', 'tcg', 128, 5, 90),
                         (drv.binary, drv.accel, drv.memory_mib,
                          drv.shutdown_timeout, drv.reconnect_delay))

    def test_reconnect_delay_bounds(self):
        self.assertRaises(ValueError, self.conf, nbd_reconnect_delay=-1)
        self.assertRaises(ValueError, self.conf, nbd_reconnect_delay=3601)
