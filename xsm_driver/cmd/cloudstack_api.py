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

"""xsm-cloudstack-api: CloudStack's API and agent commands on xsm-driver.

``xsm-cloudstack-api --config-file /etc/xsm-driver/xsm-driver.conf``
serves, on ``[cloudstack]listen_address:listen_port``, the CloudStack API
calls that move VMs with their volumes between the ``[cloudstack]hosts``
(signed with the ``[cloudstack]api_keys``) and, when
``[cloudstack]command_token`` is set, the MigrateWithStorage commands of
CloudStack's agents. It talks to the hosts' xsm-agents over
``[DEFAULT]transport_url``. It prints one line when it serves, and stops
on SIGTERM or SIGINT.
"""

import logging
import signal
import sys
import threading

from oslo_config import cfg
import oslo_messaging as messaging

from xsm_driver.cloudstack import wsgi
from xsm_driver.cmd import agent as agent_cmd
from xsm_driver.cmd import common
from xsm_driver.conf import cloudstack as cs_conf
from xsm_driver.core.rpc import api as rpc_api

LOG = logging.getLogger(__name__)

PROG = 'xsm-cloudstack-api'


def main(argv=None):
    try:
        conf = agent_cmd.load_config(sys.argv[1:] if argv is None else argv,
                                     PROG)
        for opt in cs_conf.cloudstack_opts:     # report bad values now
            getattr(conf.cloudstack, opt.dest)
    except cfg.Error as exc:
        print('%s: error: %s' % (PROG, exc), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if conf.debug else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s '
                        '%(message)s')
    if not conf.cloudstack.hosts:
        print('%s: error: no host to manage: set [cloudstack]hosts'
              % PROG, file=sys.stderr)
        return 2
    if not conf.cloudstack.api_keys:
        LOG.warning('[cloudstack]api_keys is empty: every API request will '
                    'be refused')
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        transport = rpc_api.get_transport(conf)
        opts = conf.cloudstack
        server = wsgi.make_server(wsgi.build(conf, transport),
                                  opts.listen_address, opts.listen_port,
                                  workers=opts.workers,
                                  max_connections=opts.max_connections,
                                  request_timeout=opts.request_timeout)
    except (OSError, ValueError, messaging.MessagingException) as exc:
        print('%s: error: %s' % (PROG, exc), file=sys.stderr)
        return 1
    thread = threading.Thread(target=server.serve_forever,
                              name='xsm-cloudstack-api', daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print('%s: serving http://%s:%d%s for hosts %s' % (
        PROG, host, port, '/' + conf.cloudstack.api_path.strip('/'),
        ', '.join(conf.cloudstack.hosts)), flush=True)
    common.wait_until(stop)
    LOG.info('stopping')
    server.shutdown()
    server.server_close()
    transport.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
