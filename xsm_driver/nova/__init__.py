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

"""The Nova adapter: ``compute_driver = xsm.XSMDriver``.

* :mod:`.driver` -- the compute driver (imports nova).
* :mod:`.migrate_data` -- the driver's migrate_data, nova's own
  ``LibvirtLiveMigrateData`` (imports nova): stock nova services only.
* :mod:`.decisions` -- pure decisions of the driver (no nova, no I/O).
* :mod:`.shim` -- ``xsm-nova-shim``, installs ``nova/virt/xsm/``.

This package itself imports nothing, so that the pure parts can be used
and tested where nova is not installed.
"""
