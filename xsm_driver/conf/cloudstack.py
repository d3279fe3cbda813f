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

cloudstack_group = cfg.OptGroup(
    'cloudstack',
    title='CloudStack adapter options',
    help='Options of xsm-cloudstack-api, the service that answers '
         'CloudStack\'s MigrateWithStorage commands and serves the part of '
         'CloudStack\'s API that moves VMs with their volumes between the '
         'hosts and storage repositories xsm-driver manages.')

cloudstack_opts = [
    cfg.HostAddressOpt(
        'listen_address',
        default='127.0.0.1',
        help='Address the HTTP service listens on. Use 0.0.0.0 to listen '
             'on every address of this machine.'),
    cfg.PortOpt(
        'listen_port',
        default=8080,
        help='TCP port the HTTP service listens on; 0 picks a free port '
             '(printed when the service is ready).'),
    cfg.StrOpt(
        'api_path',
        default='/client/api',
        help='URL path of the CloudStack API, as on a CloudStack '
             'management server.'),
    cfg.DictOpt(
        'api_keys',
        default={},
        secret=True,
        help='API key and secret key pairs allowed to call the API, as '
             'KEY:SECRET,KEY:SECRET. Every request must be signed with the '
             'secret key of its apiKey (HMAC-SHA1, as CloudStack signs). '
             'With no pair configured every API request is refused.'),
    cfg.BoolOpt(
        'require_expires',
        default=False,
        help='Refuse signed API requests that do not carry '
             'signatureVersion=3 and an expires time. CloudStack itself '
             'accepts them (and so does this service by default, so that '
             'clients written for CloudStack work), but such a signed URL '
             'can be replayed for ever: set it to true when every client '
             'sends expires.'),
    cfg.IntOpt(
        'max_expires_seconds',
        default=3600, min=0,
        help='Refuse API requests whose expires time is further than this '
             'many seconds in the future (0: no limit), so that a signed '
             'URL cannot be replayed for long.'),
    cfg.ListOpt(
        'hosts',
        default=[],
        help='Names of the xsm-agent hosts ([agent]host of each) this '
             'service manages: the hosts CloudStack API calls list and '
             'migrate between, and the hosts CloudStack commands may be '
             'addressed to.'),
    cfg.DictOpt(
        'sr_labels',
        default={},
        help='Storage repository names by the label CloudStack uses for '
             'them in commands (the storage pool UUID, as '
             'CitrixHelper.getSRNameLabel gives it), as LABEL:SR,LABEL:SR. '
             'A label that is not listed here is taken as the SR name.'),
    cfg.StrOpt(
        'command_token',
        secret=True,
        help='Bearer token a CloudStack plugin or agent must send '
             '(Authorization: Bearer TOKEN) to post MigrateWithStorage '
             'commands to /xsm/v1/hosts/HOST/commands. When it is not set, '
             'that endpoint is disabled.'),
    cfg.IntOpt(
        'job_retention',
        default=3600, min=60,
        help='Seconds a finished asynchronous job stays queryable with '
             'queryAsyncJobResult.'),
    cfg.IntOpt(
        'migration_timeout',
        default=3600, min=1,
        help='Seconds a MigrateWithStorageSendCommand waits for its '
             'migration to end (as CloudStack\'s migratewait); then the '
             'migration is aborted and the command fails.'),
    cfg.IntOpt(
        'rpc_timeout',
        default=60, min=1,
        help='Seconds to wait for an answer from an xsm-agent.'),
    cfg.IntOpt(
        'workers',
        default=16, min=1, max=1024,
        help='Threads that serve the HTTP connections. A connection keeps '
             'its thread until its answer is sent, and a '
             'MigrateWithStorageSendCommand waits for its migration, so '
             'keep a few more than the migrations you run at once.'),
    cfg.IntOpt(
        'max_connections',
        default=64, min=1, max=65536,
        help='HTTP connections queued or served at once. One more is '
             'answered 503 and closed at once; the refusals are logged '
             'once per burst.'),
    cfg.FloatOpt(
        'request_timeout',
        default=30.0, min=1.0, max=3600.0,
        help='Seconds a client has to send a whole HTTP request (request '
             'line, headers and body) once its connection is accepted, '
             'and each write of the answer has to go through; then the '
             'connection is closed. It does not bound the time the '
             'answer takes to compute.'),
    cfg.IntOpt(
        'max_api_body',
        default=64 * 1024, min=1024, max=16 * 1024 * 1024,
        help='Largest form body, in bytes, of a POSTed API request. The '
             'signature is among the parameters, so the body is read '
             'before it can be checked: a larger one is refused (413) '
             'without being read. CloudStack API requests carry a few '
             'short parameters.'),
]


register_opts = _util.registrar(cloudstack_group, cloudstack_opts)


def list_opts():
    return {cloudstack_group: cloudstack_opts}
