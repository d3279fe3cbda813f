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

from xsm_driver.conf import _util

sr_group = cfg.OptGroup(
    'sr',
    title='Storage repository options',
    help='Options that choose and place the storage repository (SR) that '
         'holds the virtual disk images (VDIs) of this host.')

sr_opts = [
    cfg.MultiStrOpt(
        'repositories',
        default=['local:vhd:/var/lib/xsm-driver/sr'],
        help='A storage repository of this host, as NAME:DRIVER:PATH: the '
             'SR name operators and VDI maps use, the driver (a stevedore '
             'plugin of the xsm_driver.sr namespace: vhd, a directory of VHD '
             'files like XenServer\'s EXT and NFS SRs, or raw, thick raw '
             'files) and its directory. Repeat the option for several SRs.'),
]


register_opts = _util.registrar(sr_group, sr_opts)


def list_opts():
    return {sr_group: sr_opts}
