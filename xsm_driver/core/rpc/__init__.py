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

"""The control plane: xsm-agent's RPC API over oslo.messaging.

Topic ``xsm-agent@<control_exchange>`` (:func:`api.topic`: the deployment's
exchange is part of the queue names), one server per host (the host name);
every call signed and every answer sealed (:mod:`auth`); progress goes out
as notifications (``xsm.migration.progress`` and ``xsm.migration.end``,
publisher ``xsm-agent.<host>``).
"""

TOPIC = 'xsm-agent'
NOTIFICATION_TOPIC = 'xsm_notifications'

#: Modules whose exceptions cross the RPC boundary as themselves, so that a
#: caller sees the agent's own error and message.
ALLOWED_EXMODS = [
    'xsm_driver.core.exception',
    'xsm_driver.core.migration.errors',
    'xsm_driver.core.migration.host',
    'xsm_driver.core.migration.workload',
    'xsm_driver.core.sr.base',
    'xsm_driver.core.block.device',
    'xsm_driver.core.vhd.errors',
    'xsm_driver.core.xenapi.errors',
    'xsm_driver.hypervisor',
    'xsm_driver.hypervisor.base',
    'xsm_driver.hypervisor.qemu',
]
