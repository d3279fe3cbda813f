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
from xsm_driver.conf import agent
from xsm_driver.conf import opts
from xsm_driver.conf import sr


class TestOpts(base.TestCase):

    def test_list_opts_returns_the_original_objects(self):
        groups = dict(opts.list_opts())
        self.assertIs(sr.sr_opts, groups[sr.sr_group])
        self.assertIs(agent.agent_opts, groups[agent.agent_group])

    def test_register_opts_on_the_given_conf(self):
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf([])
        self.assertEqual(['local:vhd:/var/lib/xsm-driver/sr'],
                         conf.sr.repositories)
        self.assertEqual(3, conf.agent.max_concurrent_migrations)
        self.assertNotIn('sr', cfg.CONF)
