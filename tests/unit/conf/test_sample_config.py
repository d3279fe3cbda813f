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

import os
import subprocess
import sys

from tests import base

GENERATOR_CONF = os.path.join(
    base.REPO_TOP, 'etc', 'xsm-driver', 'xsm-driver-config-generator.conf')


class TestSampleConfig(base.TestCase):

    def test_committed_sample_is_current(self):
        # In a fresh interpreter: other tests change option defaults in
        # this one (oslo.messaging's set_transport_defaults, for one).
        fresh = os.path.join(self.make_tempdir(), 'xsm-driver.conf.sample')
        subprocess.run([sys.executable, '-m', 'oslo_config.generator',
                        '--config-file', GENERATOR_CONF,
                        '--output-file', fresh],
                       check=True, cwd=base.REPO_TOP, capture_output=True)
        with open(os.path.join(base.REPO_TOP, 'etc', 'xsm-driver',
                               'xsm-driver.conf.sample')) as f:
            committed = f.read()
        with open(fresh) as f:
            self.assertEqual(
                f.read(), committed,
                'etc/xsm-driver/xsm-driver.conf.sample is stale: '
                'run "tox -e genconfig" and commit the result.')
