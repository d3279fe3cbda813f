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

"""xsm-agent: the per-host service of xsm-driver.

``xsm-agent --config-file /etc/xsm-driver/xsm-driver.conf`` serves the
host's SRs and VMs over oslo.messaging (``[DEFAULT]transport_url``, topic
``xsm-agent``, server ``[agent]host``), first finishing or rolling back
whatever migration its journal says was under way. It prints one line
when it serves, and stops cleanly on SIGTERM or SIGINT.
"""

import functools
import logging
import signal
import sys
import threading

from oslo_config import cfg
import oslo_messaging as messaging

from xsm_driver.cmd import common
from xsm_driver import conf as xsm_conf
from xsm_driver.core import engine as engine_mod
from xsm_driver.core import exception
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api

LOG = logging.getLogger(__name__)

_cli_opts = [
    cfg.BoolOpt('debug', short='d', default=False,
                help='Log debug messages.'),
]


def load_config(argv, prog):
    conf = cfg.ConfigOpts()
    xsm_conf.register_opts(conf)
    conf.register_cli_opts(_cli_opts)
    messaging.set_transport_defaults('xsm-driver')
    conf(argv, project='xsm-driver', prog=prog)
    return conf


def main(argv=None):
    try:
        conf = load_config(sys.argv[1:] if argv is None else argv,
                           'xsm-agent')
    except cfg.Error as exc:
        print('xsm-agent: error: %s' % exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if conf.debug else logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s '
                        '%(message)s')
    common.tune_malloc()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        options = common.migration_options(conf)
        transport = api.get_transport(conf)
        agent = agent_mod.Agent(
            transport, None, options,
            notifier_transport=messaging.get_notification_transport(conf),
            progress_interval=conf.agent.progress_interval,
            engine=functools.partial(engine_mod.load, conf,
                                     options=options))
        host = agent.host
        srs = ', '.join(sorted(host.srs))
        agent.start()
    except (exception.XSMError, OSError, ValueError,
            messaging.MessagingException) as exc:
        print('xsm-agent: error: %s' % exc, file=sys.stderr)
        return 1
    print('xsm-agent: host %s ready, SRs: %s' % (host.name, srs),
          flush=True)
    stop.wait()
    LOG.info('stopping')
    agent.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
