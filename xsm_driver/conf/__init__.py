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

"""Configuration options of xsm-driver, one module per option group."""

from xsm_driver.conf import agent
from xsm_driver.conf import cloudstack
from xsm_driver.conf import hypervisor
from xsm_driver.conf import nova
from xsm_driver.conf import sr
from xsm_driver.conf import xenapi

MODULES = (agent, sr, cloudstack, nova, xenapi, hypervisor)


def register_opts(conf):
    """Register every option group of xsm-driver on ``conf``.

    :param conf: an ``oslo_config.cfg.ConfigOpts`` instance.
    """
    for module in MODULES:
        module.register_opts(conf)
