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

"""``XSMLiveMigrateData``: what the xsm driver's hosts tell each other.

Importing this module registers the class with Nova's object registry.
Every process that deserialises it must have done so: nova-compute does
when it loads the driver; nova-conductor never loads a compute driver, so
it runs as ``xsm-nova-conductor`` (see :mod:`xsm_driver.nova.conductor`),
else it fails with ``UnsupportedObjectError``.

Nova's compute manager only asks the destination to roll back, and the
source to clean up, for migrate_data classes it knows (libvirt, Hyper-V):
for this one it does neither, so the driver does its own clean-up (the
engine's abort, and ``rollback_live_migration_at_source``).
"""

from nova.objects import base as obj_base
from nova.objects import fields
from nova.objects import migrate_data


@obj_base.NovaObjectRegistry.register
class XSMLiveMigrateData(migrate_data.LiveMigrateData):
    """Destination check data and live migration data of the xsm driver.

    Filled by the destination's ``check_can_live_migrate_destination``
    (``dest_host`` .. ``vif_map``) and checked by the source; the source
    adds ``source_host`` and, once the engine runs it, ``migration_id``.
    """

    # Version 1.0: Initial version (LiveMigrateData 1.4)
    VERSION = '1.0'

    fields = {
        'block_migration': fields.BooleanField(),
        # the xsm agent of each side (= the nova-compute host name)
        'source_host': fields.StringField(nullable=True),
        'dest_host': fields.StringField(),
        # the destination SR the disks go to, and its free space when the
        # destination checked (bytes), next to what the copy needs
        'dest_sr': fields.StringField(),
        'disk_available_bytes': fields.IntegerField(),
        'disk_needed_bytes': fields.IntegerField(),
        # source VDI uuid -> destination SR name; VIF -> network
        'vdi_map': fields.DictOfStringsField(),
        'vif_map': fields.DictOfStringsField(),
        # where the destination's NBD server of this migration listens
        'migration_address': fields.StringField(nullable=True),
        # the engine's migration id, once the source started it
        'migration_id': fields.StringField(nullable=True),
    }
