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

"""The migrate_data of the xsm driver: nova's own ``LibvirtLiveMigrateData``.

Every nova service deserialises it, the stock nova-conductor included
(the driver registers no object of its own), and it is the class for
which nova's compute manager asks the destination to roll back a failed
or aborted live migration (``_live_migration_cleanup_flags``: with
``is_shared_instance_path`` False, ``rollback_live_migration_at_destination``
runs there and ends its ``live_migration_at_dest`` task), and the source
to clean up after a successful one. Nova's own fake driver uses the same
class; no nova service but the libvirt driver reads its libvirt fields.

What the xsm driver puts in it, nothing secret:

* ``block_migration`` True, ``disk_over_commit`` False,
  ``is_shared_instance_path`` and ``is_shared_block_storage`` False (the
  disks are in host-local SRs and are copied);
* ``disk_available_mb``: the destination SR's free space when it checked;
* ``instance_relative_path``: where the instance's disks go on the
  destination, the name of its SR (``[xsm]instance_sr``).

The source's ``live_migration`` starts the engine's migration, whose
source agent prepares the receive on the destination's agent and passes
the one-time export names and certificates agent to agent, over the
agents' own signed bus: none of it crosses nova's message bus or its
logs. The engine's migration is found again by the instance (its VM's
name) and the destination host (see ``XSMDriver``).
"""

from nova.objects import migrate_data as nova_migrate_data

MiB = 1 << 20

#: the class of the xsm driver's migrate_data
LiveMigrateData = nova_migrate_data.LibvirtLiveMigrateData


def check_data(dest_sr, free_bytes):
    """The destination's check data: copy the disks into ``dest_sr``."""
    return LiveMigrateData(
        block_migration=True, disk_over_commit=False,
        is_shared_instance_path=False, is_shared_block_storage=False,
        disk_available_mb=free_bytes // MiB,
        instance_relative_path=dest_sr)


def dest_sr(data):
    """The destination SR ``data`` names; None when it is not ours."""
    if not isinstance(data, LiveMigrateData) or \
            not data.obj_attr_is_set('instance_relative_path'):
        return None
    return data.instance_relative_path
