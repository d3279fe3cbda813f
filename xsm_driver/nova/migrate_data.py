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

The one-time export names of a prepared receive are secrets: Nova logs
migrate_data at debug level (``'pre_live_migration result data is %s'``),
so they print as ``'<secret>'``; they travel only on the message bus.
"""

from nova.objects import base as obj_base
from nova.objects import fields
from nova.objects import migrate_data
from oslo_utils import versionutils
from oslo_versionedobjects import fields as ovo_fields


class SecretString(ovo_fields.String):
    """A string that never shows in a repr or a log line."""

    def stringify(self, value):
        return "'<secret>'"


class SecretStringField(ovo_fields.AutoTypedField):
    AUTO_TYPE = SecretString()


#: fields version 1.1 added: what the destination prepared
PREPARED_FIELDS = ('receive_request', 'receive_host', 'receive_port',
                   'server_ca_pem', 'server_fingerprint', 'receive_exports')


@obj_base.NovaObjectRegistry.register
class XSMLiveMigrateData(migrate_data.LiveMigrateData):
    """Destination check data and live migration data of the xsm driver.

    Filled by the destination's ``check_can_live_migrate_destination``
    (``dest_host`` .. ``vif_map``) and checked by the source; the source's
    ``check_can_live_migrate_source`` adds ``source_host``,
    ``migration_id`` and ``receive_request`` (it has begun the engine's
    migration); the destination's ``pre_live_migration`` prepares the
    receive and adds where and how to reach it (``receive_host`` ..
    ``receive_exports``), which the source's ``live_migration`` starts
    the engine with.
    """

    # Version 1.0: Initial version (LiveMigrateData 1.4)
    # Version 1.1: receive_request, receive_host, receive_port,
    #              server_ca_pem, server_fingerprint, receive_exports: the
    #              destination prepares the receive in pre_live_migration
    VERSION = '1.1'

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
        # the engine's migration id: picked by the source in
        # check_can_live_migrate_source (1.0: once the source started it)
        'migration_id': fields.StringField(nullable=True),
        # 1.1: the engine's receive request (JSON), from the source: the
        # VDIs and their sizes, the VM record, the source's client CA
        # certificate; nothing secret
        'receive_request': fields.StringField(nullable=True),
        # 1.1: the receive the destination prepared in pre_live_migration:
        # its NBD-over-TLS server (address, port), the server's CA
        # certificate and certificate fingerprint (SHA-256), and the
        # one-time export names of each VDI (JSON: {source VDI: {'base',
        # 'leaf', ...}}, secret)
        'receive_host': fields.StringField(nullable=True),
        'receive_port': fields.IntegerField(nullable=True),
        'server_ca_pem': fields.StringField(nullable=True),
        'server_fingerprint': fields.StringField(nullable=True),
        'receive_exports': SecretStringField(nullable=True),
    }

    def obj_make_compatible(self, primitive, target_version):
        super().obj_make_compatible(primitive, target_version)
        target = versionutils.convert_version_to_tuple(target_version)
        if target < (1, 1):
            # A 1.0 host starts the engine the old way: the source
            # prepares the receive.
            for name in PREPARED_FIELDS:
                primitive.pop(name, None)

    @property
    def prepared(self):
        """Whether the destination has prepared the receive (1.1)."""
        return all(self.obj_attr_is_set(n) and getattr(self, n) is not None
                   for n in PREPARED_FIELDS + ('migration_id',))
