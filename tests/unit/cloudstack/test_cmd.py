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

import contextlib
import io
import os

from oslo_config import cfg

from tests import base
from xsm_driver.cloudstack import wsgi
from xsm_driver.cmd import cloudstack_api
from xsm_driver import conf as xsm_conf
from xsm_driver.conf import cloudstack as cs_conf
from xsm_driver.core.rpc import api as rpc_api


class TestCommand(base.TestCase):

    def run_main(self, text):
        path = os.path.join(self.make_tempdir(), 'xsm-driver.conf')
        with open(path, 'w') as f:
            f.write(text)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cloudstack_api.main(['--config-file', path])
        return rc, err.getvalue()

    def test_no_hosts_is_a_configuration_error(self):
        rc, err = self.run_main('[cloudstack]\napi_keys = k:s\n')
        self.assertEqual(2, rc)
        self.assertIn('set [cloudstack]hosts', err)

    def test_a_bad_option_is_reported_in_one_line(self):
        rc, err = self.run_main('[cloudstack]\nhosts = a\n'
                                'listen_port = many\n')
        self.assertEqual(2, rc)
        self.assertIn('xsm-cloudstack-api: error:', err)
        self.assertIn('listen_port', err)


class TestBuild(base.TestCase):

    def test_the_application_follows_the_options(self):
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf(['--config-file', self._config()])
        transport = rpc_api.get_transport(conf, url='fake://')
        app = wsgi.build(conf, transport)
        self.assertEqual({'k1': 's1', 'k2': 's2'}, app.keys)
        self.assertEqual('/cs/api', app.api_path)
        self.assertEqual('tok', app.command_token)
        self.assertEqual(['host-a', 'host-b'], sorted(app.api.clients))
        resource = app.api.resource('host-a')
        self.assertEqual({'pool-uuid': 'sr-a'}, resource.sr_labels)
        self.assertIs(resource, app.api.resource('host-a'))
        self.assertEqual(600, app.api.jobs.retention)

    def _config(self):
        path = os.path.join(self.make_tempdir(), 'c.conf')
        with open(path, 'w') as f:
            f.write('[cloudstack]\napi_keys = k1:s1,k2:s2\n'
                    'api_path = cs/api\ncommand_token = tok\n'
                    'hosts = host-a,host-b\nsr_labels = pool-uuid:sr-a\n'
                    'job_retention = 600\n')
        return path


class TestSampleConfig(base.TestCase):
    """The generated sample has the [cloudstack] group, every option."""

    def test_every_cloudstack_option_is_in_the_sample(self):
        path = os.path.join(base.REPO_TOP, 'etc', 'xsm-driver',
                            'xsm-driver.conf.sample')
        with open(path) as f:
            text = f.read()
        self.assertIn('\n[cloudstack]\n', text)
        section = text.split('\n[cloudstack]\n', 1)[1].split('\n[', 1)[0]
        names = [opt.dest for opt in cs_conf.cloudstack_opts]
        self.assertEqual(16, len(names))
        for name in names:
            self.assertRegex(section, r'\n#%s =( |\n)' % name)
