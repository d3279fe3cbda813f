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

"""What the option modules share."""

from oslo_config import cfg


def registrar(group, opts):
    """A ``register_opts(conf)`` for one option group.

    It registers a fresh copy of ``group`` each time: an OptGroup object
    keeps the options (and their overrides) of the ConfigOpts it was first
    registered with, which would leak into every other one.
    """
    def register_opts(conf):
        fresh = cfg.OptGroup(group.name, title=group.title, help=group.help)
        conf.register_group(fresh)
        conf.register_opts(opts, group=fresh)
    return register_opts
