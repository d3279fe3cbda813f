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

"""The ``xenapi`` engine: migrations on real XenServer and XCP-ng pools.

On a XenServer or XCP-ng host, xapi and tapdisk own the disks: our data
path cannot sit under a VM there. The ``xenapi`` engine (a stevedore plugin
of the ``xsm_driver.engine`` namespace, chosen with ``[agent]engine``)
drives xapi's own Storage XenMotion through the public XenAPI instead,
behind the same agent API as the native engine, so that ``xsm-migrate``
and the Nova and CloudStack adapters work unchanged on either:

* :mod:`.session` -- logging in to a pool master, calls retried where that
  is safe;
* :mod:`.preflight` -- the checks made from XenAPI data before anything
  changes (small pure functions);
* :mod:`.errors` -- xapi's error codes turned into messages that say which
  VDI, SR or host and what to do;
* :mod:`.engine` -- the engine: ``Host.migrate_receive``,
  ``VM.assert_can_migrate``, ``Async.VM.migrate_send``,
  ``Async.VDI.pool_migrate``, ``Async.VM.pool_migrate``, task polling,
  ``task.cancel``, queueing;
* :mod:`.pool` -- the pool's SRs, VDIs and VMs as the agent lists them,
  and their lifecycle through xapi (create from a template, image
  import, start, stop, pause, reboot, destroy) for Nova;
* :mod:`.coldcopy` -- a VDI copied out of a pool through xapi's NBD
  export into a local SR, allocated data only.
"""
