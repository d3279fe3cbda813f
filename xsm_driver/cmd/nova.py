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

"""``xsm-nova-shim``, behind this package's quiet warnings filter (see
:mod:`xsm_driver.cmd`).

(``xsm-nova-conductor`` is retired: the stock nova-conductor deserialises
the driver's migrate_data, nova's own ``LibvirtLiveMigrateData``.)"""


def shim(argv=None):
    from xsm_driver.nova import shim as shim_mod
    return shim_mod.main(argv)
