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

"""The native engine as ``xsm-agent`` loads it: the [hypervisor] driver."""

import os

from oslo_config import cfg

from tests import base
from xsm_driver import conf as xsm_conf
from xsm_driver.core import engine as engine_mod
from xsm_driver.core.migration import manager


class TestNativeEngine(base.TestCase):

    def make_conf(self, **hypervisor):
        root = self.make_tempdir()
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf([], project='xsm-driver-test', default_config_files=[],
             default_config_dirs=[])
        conf.set_override('host', 'h1', group='agent')
        conf.set_override('state_path', os.path.join(root, 'state'),
                          group='agent')
        conf.set_override('repositories',
                          ['sr-1:vhd:%s' % os.path.join(root, 'sr-1')],
                          group='sr')
        for name, value in hypervisor.items():
            conf.set_override(name, value, group='hypervisor')
        return conf

    def engine(self, conf):
        engine = engine_mod.load(conf, None, manager.Options())
        self.addCleanup(engine.shutdown)
        return engine

    def test_the_configured_driver_runs_the_guests(self):
        engine = self.engine(self.make_conf(driver='qemu', accel='tcg'))
        self.assertIsNotNone(engine.host.qemu)
        self.assertEqual('qemu', engine.host.hypervisor.name)

    def test_model_by_default(self):
        engine = self.engine(self.make_conf())
        self.assertIsNone(engine.host.qemu)
