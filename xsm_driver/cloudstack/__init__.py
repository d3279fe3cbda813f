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

"""Apache CloudStack on xsm-driver.

Two faces, one engine (the agents' public RPC API):

* :mod:`resource` -- a hypervisor resource that executes CloudStack's
  ``MigrateWithStorage*Command`` s, read and answered in CloudStack's own
  Gson JSON (:mod:`gson`, :mod:`commands`), as a Python API and over HTTP
  (:mod:`wsgi`).
* :mod:`api` -- the part of CloudStack's HTTP API that moves a VM with its
  volumes (``migrateVirtualMachineWithVolume`` and its helpers), signed
  as CloudStack signs (:mod:`signature`), run as asynchronous jobs
  (:mod:`jobs`) that drive the resource exactly as CloudStack's management
  server drives a XenServer host: Receive, Send, Complete.
"""
