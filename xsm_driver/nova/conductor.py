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

"""``xsm-nova-conductor``: nova-conductor that knows XSMLiveMigrateData.

nova-conductor deserialises the migrate_data of every live migration it
runs (the destination's check data, passed on to the source) but never
loads a compute driver, so it has never imported
:mod:`xsm_driver.nova.migrate_data` and refuses the object with
``UnsupportedObjectError``. Run this instead of ``nova-conductor``; it
takes the same arguments::

    xsm-nova-conductor --config-file /etc/nova/nova.conf

It is ``nova.cmd.conductor.main`` with the object registered first.
Eventlet patching stays nova's business: ``nova.cmd.conductor`` applies
it (or not, per ``OS_NOVA_DISABLE_EVENTLET_PATCHING`` and
``concurrency_backend``) when imported, before anything of ours is.
"""

import sys


def register():
    """Register xsm-driver's Nova objects; returns their names."""
    from xsm_driver.nova import migrate_data
    return [migrate_data.XSMLiveMigrateData.obj_name()]


def main():
    # nova.cmd.conductor decides on monkey patching when imported: first.
    from nova.cmd import conductor
    register()
    return conductor.main()


if __name__ == '__main__':
    sys.exit(main())
