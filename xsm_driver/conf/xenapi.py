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

from oslo_config import cfg

from xsm_driver.conf import _util

xenapi_group = cfg.OptGroup(
    'xenapi',
    title='XenServer / XCP-ng pool options',
    help='Options of the xenapi engine ([agent]engine = xenapi): the agent '
         'then serves a XenServer or XCP-ng pool and has xapi run the '
         'migrations (Storage XenMotion) through the XenAPI.')

xenapi_opts = [
    cfg.URIOpt(
        'url',
        schemes=['https', 'http'],
        help='URL of the master of the pool this agent serves, e.g. '
             'https://xs-pool-a.example.com (https or http, without a user '
             'name or password in it). A pool member\'s URL works too: the '
             'agent follows it to the master.'),
    cfg.StrOpt(
        'username',
        default='root',
        help='User the agent logs in to its pool as: root, or a user whose '
             'RBAC role may migrate VMs (Pool Operator or better).'),
    cfg.StrOpt(
        'password',
        secret=True,
        help='Password of that user. It is never logged.'),
    cfg.MultiStrOpt(
        'destination_pools',
        default=[],
        secret=True,
        help='A pool VMs may move to, as NAME,URL[,USERNAME[,PASSWORD]]; '
             'the user name and password default to this pool\'s. NAME is '
             'what a migration request gives as its destination (NAME, or '
             'NAME/HOST for a given host of that pool; the agent\'s own '
             'name, [agent]host, means a move within this pool). Repeat '
             'the option for several pools.'),
    cfg.StrOpt(
        'ca_file',
        help='CA bundle that signs the pool masters\' HTTPS certificates. '
             'Default: the system\'s trusted CAs.'),
    cfg.BoolOpt(
        'insecure',
        default=False,
        help='Do not check the pool masters\' HTTPS certificates. Only for '
             'tests: anybody on the path could read the password.'),
    cfg.StrOpt(
        'migration_network',
        help='Network (uuid or unique name) of the destination pool that '
             'carries migration traffic (the network of '
             'Host.migrate_receive). Default: the destination host\'s '
             'management network. A request may name another.'),
    cfg.BoolOpt(
        'compress',
        default=False,
        help='Ask xapi to compress migration traffic (XenServer 8 and '
             'XCP-ng 8.3; older versions refuse the option).'),
    cfg.MultiStrOpt(
        'local_repositories',
        default=[],
        help='A local SR of the agent, as NAME:DRIVER:PATH (like '
             '[sr]repositories), that VDIs of the pool can be copied to '
             'through xapi\'s NBD export: xsm-migrate vdi VDI --to-sr '
             'NAME. Repeat the option for several SRs.'),
    cfg.BoolOpt(
        'allow_insecure_nbd',
        default=False,
        help='Copy a VDI to a local SR from an NBD export without TLS '
             '(xapi\'s NBD server on a network with the insecure_nbd '
             'purpose). By default such a copy is refused, since the disk '
             'would cross the network in clear text; give the network the '
             'nbd purpose instead.'),
    cfg.FloatOpt(
        'poll_interval',
        default=1.0, min=0.01,
        help='Seconds between two looks at a running xapi task.'),
    cfg.FloatOpt(
        'call_timeout',
        default=60.0, min=1.0,
        help='Seconds to connect to a pool master and for one XenAPI call.'),
    cfg.IntOpt(
        'call_retries',
        default=3, min=0,
        help='Attempts again of a XenAPI call that changes nothing after '
             'the connection to the master was lost or refused. A call the '
             'master did not answer within call_timeout is not tried again '
             '(a running migration keeps polling for lost_timeout). A call '
             'that starts something is never blindly sent again: the agent '
             'first asks xapi whether it started.'),
    cfg.FloatOpt(
        'lost_timeout',
        default=300.0, min=1.0,
        help='Seconds a running migration waits for a pool master that '
             'cannot be reached before it reports the migration as failed '
             'with an unknown outcome (xapi may still finish it; the next '
             'agent follows the task).'),
    cfg.FloatOpt(
        'busy_wait',
        default=10.0, min=0.1,
        help='Seconds to wait before trying again when xapi refuses a '
             'migration because other clients already run its maximum '
             '(TOO_MANY_STORAGE_MIGRATES).'),
    cfg.StrOpt(
        'host',
        help='The host of the pool (its name_label or uuid) this agent '
             'stands for, as a Nova compute node does for one XenServer '
             'host: the agent lists the VMs that run there (or, halted, '
             'have it as affinity), starts VMs there, and another host of '
             'the pool is a migration destination by its name. Default: '
             'the agent stands for the whole pool.'),
    cfg.StrOpt(
        'vm_template',
        default='Other install media',
        help='Template (name_label or uuid) new VMs are cloned from '
             '(VM.clone); the VM gets the memory, vCPUs, disks and VIFs '
             'asked for, not the template\'s disks.'),
    cfg.StrOpt(
        'vm_network',
        help='Network (uuid or unique name_label) of the pool that a new '
             'VIF goes on when the name it is given is not a network of '
             'the pool (Nova gives Neutron port ids). Default: such a VIF '
             'is refused.'),
    cfg.FloatOpt(
        'shutdown_timeout',
        default=60.0, min=0.0,
        help='Seconds a guest may take to shut down or reboot cleanly '
             '(VM.clean_shutdown, VM.clean_reboot) before it is forced '
             '(VM.hard_shutdown, VM.hard_reboot).'),
]


register_opts = _util.registrar(xenapi_group, xenapi_opts)


def list_opts():
    return {xenapi_group: xenapi_opts}
