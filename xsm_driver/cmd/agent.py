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

Only trusted callers are served (see the README's trust model):

``xsm-agent init --config-file F``
    creates this host's identity key (``[agent]identity_key_file``, by
    default ``identity.key`` in ``state_path``, mode 0600) unless it
    exists, and prints the ``trusted_hosts`` entry every agent needs
    (the agent also creates a missing key at its first start, and logs
    that entry then).
``xsm-agent operator-key PATH [--name NAME]``
    creates an operator key pair at ``PATH`` (mode 0600) and prints the
    ``trusted_operators`` entry of the agents and the
    ``operator_key_file``/``operator_name`` lines of the operator tools.
"""

import functools
import logging
import os
import signal
import sys
import threading

from oslo_config import cfg
import oslo_messaging as messaging

from xsm_driver.cmd import common
from xsm_driver import conf as xsm_conf
from xsm_driver.conf import agent as agent_conf
from xsm_driver.core import engine as engine_mod
from xsm_driver.core import exception
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys

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


def cmd_init(argv):
    """``xsm-agent init``: this host's key, and what to trust it with."""
    try:
        conf = load_config(argv, 'xsm-agent init')
        key, path, created = keys.ensure_identity_key(conf.agent)
    except (cfg.Error, exception.XSMError) as exc:
        print('xsm-agent: error: %s' % exc, file=sys.stderr)
        return 2
    host, public = conf.agent.host, auth.public_text(key)
    print('%s the identity key of host %s: %s' % (
        'created' if created else 'kept', host, path))
    print('every agent and operator tool: [agent]trusted_hosts entry '
          '%s:%s' % (host, public))
    print('(or this line in trusted_hosts_file: %s %s)' % (host, public))
    return 0


def cmd_operator_key(argv):
    """``xsm-agent operator-key PATH [--name NAME]``."""
    import argparse
    parser = argparse.ArgumentParser(
        prog='xsm-agent operator-key',
        description='Create an operator key pair for xsm-migrate, the Nova '
                    'driver and the CloudStack API service.')
    parser.add_argument('path', help='the private key file to create')
    parser.add_argument('--name', default='operator',
                        help='the operator name the agents know it by')
    args = parser.parse_args(argv)
    try:
        key = keys.create_key_file(args.path)
    except FileExistsError:
        print('xsm-agent: error: %s exists; a key is never overwritten'
              % args.path, file=sys.stderr)
        return 2
    except OSError as exc:
        print('xsm-agent: error: %s: %s' % (args.path, exc.strerror),
              file=sys.stderr)
        return 2
    public = auth.public_text(key)
    print('created the operator key %s (%s)' % (args.path, args.name))
    print('every agent: [agent]trusted_operators = %s:%s'
          % (args.name, public))
    print('xsm-migrate and the CloudStack API service: [agent] '
          'operator_key_file = %s, operator_name = %s'
          % (os.path.abspath(args.path), args.name))
    print('nova-compute: [xsm] operator_key_file = %s, operator_name = %s'
          % (os.path.abspath(args.path), args.name))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == 'init':
        return cmd_init(argv[1:])
    if argv and argv[0] == 'operator-key':
        return cmd_operator_key(argv[1:])
    try:
        conf = load_config(argv, 'xsm-agent')
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
    # the bounds of the NBD servers this agent's migrations open
    nbd_server.set_defaults(**agent_conf.nbd_server_limits(conf))
    try:
        options = common.migration_options(conf)
        identity = keys.identity(conf.agent, conf.agent.host)
        transport = api.get_transport(conf)
        agent = agent_mod.Agent(
            transport, None, options,
            notifier_transport=messaging.get_notification_transport(conf),
            progress_interval=conf.agent.progress_interval,
            engine=functools.partial(engine_mod.load, conf,
                                     options=options),
            identity=identity)
        host = agent.host
        srs = ', '.join(sorted(host.srs))
        agent.start()
    except (exception.XSMError, OSError, ValueError,
            messaging.MessagingException) as exc:
        print('xsm-agent: error: %s' % exc, file=sys.stderr)
        return 1
    print('xsm-agent: host %s ready, SRs: %s' % (host.name, srs),
          flush=True)
    common.wait_until(stop)
    LOG.info('stopping')
    agent.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
