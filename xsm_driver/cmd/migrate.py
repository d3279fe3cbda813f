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

"""xsm-migrate: the operator's command for live storage migrations.

It talks to the agents over oslo.messaging (``--config-file`` with
``[DEFAULT]transport_url``, or ``--transport-url``), starts a migration on
the source host's agent, and follows it with a progress bar (phase, %,
rate, ETA) on a terminal, a line per phase otherwise, or one JSON object
with ``--json``. ``xsm-migrate demo`` needs no broker.
"""

import argparse
import json
import socket
import sys

from xsm_driver.cmd import common
from xsm_driver.cmd import progress
from xsm_driver.core.migration import errors

PROG = 'xsm-migrate'


def _mapping(text):
    key, sep, value = text.partition('=')
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError('%r is not KEY=VALUE' % text)
    return key, value


def _size(text):
    from xsm_driver.core.vhd import format as fmt
    try:
        return fmt.parse_size(text)
    except Exception:
        raise argparse.ArgumentTypeError('%r is not a size (e.g. 1G, '
                                         '512M, 1048576)' % text)


# -- commands talking to agents --------------------------------------------

def check_broker(conf, url, timeout=3.0):
    """Fail fast, in one line, when no broker of ``url`` answers.

    oslo.messaging retries a refused connection forever whatever the call
    timeout, which would leave the operator with a silent command.
    """
    import oslo_messaging as messaging
    parsed = messaging.TransportURL.parse(conf, url)
    if parsed.transport in ('fake', None) or not parsed.hosts:
        return
    problems = []
    for host in parsed.hosts:
        address = (host.hostname or '127.0.0.1', host.port or 5672)
        try:
            socket.create_connection(address, timeout).close()
            return
        except OSError as exc:
            problems.append('%s:%d (%s)' % (address[0], address[1],
                                            exc.strerror or exc))
    raise common.CommandError('no message broker answers at %s; check '
                              '[DEFAULT]transport_url or --transport-url'
                              % ', '.join(problems))


def _api(args, host):
    from oslo_config import cfg
    from xsm_driver.cmd import agent as agent_cmd
    from xsm_driver.core.rpc import api
    argv = []
    for f in args.config_file or []:
        argv += ['--config-file', f]
    try:
        conf = agent_cmd.load_config(argv, PROG)
    except cfg.Error as exc:
        raise common.CommandError(str(exc))
    transport = api.get_transport(conf, url=args.transport_url)
    check_broker(conf, args.transport_url or conf.transport_url)
    return api.AgentAPI(transport, host or conf.agent.host,
                        timeout=args.rpc_timeout)


#: exit status of a migration in doubt (see ``resolve``)
IN_DOUBT_STATUS = 3


def _start_and_follow(args, client, mid):
    status = progress.follow(
        client.migration_get, mid,
        progress.Follower(quiet=args.json or args.no_wait))
    progress.print_result(status, args.json)
    if status['phase'] == 'in-doubt':
        return IN_DOUBT_STATUS
    return 0 if status['phase'] == 'done' else 1


def cmd_vm(args):
    client = _api(args, args.host)
    options = {'bandwidth': args.bandwidth, 'copy': args.copy,
               'network': args.network}
    mid = client.migrate_vm(args.vm, args.to_host, dict(args.vdi_map),
                            dict(args.vif_map or []),
                            **{k: v for k, v in options.items() if v})
    if args.no_wait:
        print(mid)
        return 0
    return _start_and_follow(args, client, mid)


def cmd_vdi(args):
    client = _api(args, args.host)
    mid = client.migrate_vdi(args.vdi, args.to_sr,
                             **({'bandwidth': args.bandwidth}
                                if args.bandwidth else {}))
    if args.no_wait:
        print(mid)
        return 0
    return _start_and_follow(args, client, mid)


def cmd_list(args):
    rows = _api(args, args.host).migration_list()
    if args.json:
        print(json.dumps(rows, sort_keys=True))
        return 0
    for s in rows:
        print('%s %-8s %-12s %5.1f%% %s -> %s %s' % (
            s['id'], s['kind'], s['phase'], s['progress']['percent'] or 0,
            s['source'], s['destination'], s['error'] or ''))
    return 0


def cmd_show(args):
    status = _api(args, args.host).migration_get(args.id)
    print(json.dumps(status, sort_keys=True, indent=None if args.json
                     else 2))
    return 0


def cmd_abort(args):
    client = _api(args, args.host)
    client.migration_abort(args.id)
    if args.no_wait:
        return 0
    status = progress.follow(client.migration_get, args.id,
                             progress.Follower(quiet=True))
    progress.print_result(status, args.json)
    return 0 if status['phase'] == 'aborted' else 1


def resolved_line(status):
    """What ``resolve`` says of the migration it settled.

    >>> resolved_line({'id': 'm1', 'phase': 'done', 'source': 'a',
    ...                'destination': 'b'})  # doctest: +NORMALIZE_WHITESPACE
    'migration m1 resolved: host b had committed the switch-over; the VM
     runs there and the source copy on host a is retired'
    """
    mid, phase = status['id'], status['phase']
    src = status.get('source') or 'the source host'
    dst = status.get('destination') or 'the destination host'
    if src != 'the source host':
        src = 'host %s' % src
    if phase == 'done':
        where = 'host %s' % dst if dst != 'the destination host' else dst
        return ('migration %s resolved: %s had committed the switch-over; '
                'the VM runs there and the source copy on %s is retired'
                % (mid, where, src))
    if phase == 'aborted':
        return ('migration %s resolved: the destination had rolled the '
                'switch-over back (and refuses it from now on); the VM '
                'stays on %s, resumed (or halted, if that host restarted '
                'meanwhile)' % (mid, src))
    return 'migration %s is %s: %s' % (mid, phase, status.get('error'))


def cmd_resolve(args):
    """Settle a migration in doubt by asking its destination again."""
    client = _api(args, args.host)
    try:
        status = client.migration_resolve(args.id)
    except errors.InDoubt as exc:
        print('%s resolve: %s' % (PROG, common.first_line(exc)),
              file=sys.stderr)
        return IN_DOUBT_STATUS
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        print(resolved_line(status))
    if status['phase'] == 'in-doubt':
        return IN_DOUBT_STATUS
    return 0 if status['phase'] in ('done', 'aborted') else 1


def cmd_demo(args):
    from xsm_driver.cmd import demo
    common.tune_malloc()
    return demo.run(args)


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split(
        '\n\n')[0])
    parser.add_argument('--debug', action='store_true',
                        help='log debug messages')
    sub = parser.add_subparsers(dest='command', required=True)

    def talking(p):
        p.add_argument('--config-file', action='append',
                       help='xsm-driver.conf with [DEFAULT]transport_url '
                       '(repeatable)')
        p.add_argument('--transport-url', help='oslo.messaging URL of the '
                       'control plane, e.g. rabbit://guest:guest@host:5672/')
        p.add_argument('--host', help='the source host\'s agent (default: '
                       '[agent]host of the config file)')
        p.add_argument('--rpc-timeout', type=float, default=60,
                       help='seconds to wait for an agent')
        p.add_argument('--json', action='store_true',
                       help='print one JSON object')
        p.add_argument('--no-wait', action='store_true',
                       help='print the migration id and return')

    p = sub.add_parser('vm', help='move a VM and all its disks to another '
                       'host, live')
    talking(p)
    p.add_argument('--vm', required=True, help='VM uuid or name')
    p.add_argument('--to-host', required=True, help='destination host')
    p.add_argument('--vdi-map', type=_mapping, action='append',
                   required=True, metavar='VDI=SR',
                   help='destination SR of a VDI (one per VDI)')
    p.add_argument('--vif-map', type=_mapping, action='append',
                   metavar='VIF=NETWORK', help='destination network of a '
                   'VIF')
    p.add_argument('--network', help='destination address migration data '
                   'uses')
    p.add_argument('--bandwidth', type=_size, help='copy rate limit, '
                   'bytes/s (K, M, G suffixes)')
    p.add_argument('--copy', action='store_true', help='copy the disks; '
                   'the VM stays where it is')
    p.set_defaults(func=cmd_vm)

    p = sub.add_parser('vdi', help='move a VDI to another SR of its host, '
                       'live')
    talking(p)
    p.add_argument('--vdi', required=True)
    p.add_argument('--to-sr', required=True)
    p.add_argument('--bandwidth', type=_size)
    p.set_defaults(func=cmd_vdi)

    p = sub.add_parser('list', help='migrations of a host')
    talking(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser('show', help='one migration, as JSON')
    talking(p)
    p.add_argument('id')
    p.set_defaults(func=cmd_show)

    p = sub.add_parser('abort', help='abort a migration and restore both '
                       'sides')
    talking(p)
    p.add_argument('id')
    p.set_defaults(func=cmd_abort)

    p = sub.add_parser('resolve', help='settle a migration in doubt: ask '
                       'its destination whether it committed, then finish '
                       'the migration (committed) or resume the VM on the '
                       'source (rolled back); without a certain answer '
                       'nothing changes (exit status 3)')
    talking(p)
    p.add_argument('id')
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser('demo', help='two hosts in a scratch folder, a VM '
                       'with a verifying guest (a QEMU guest by default), '
                       'a live migration')
    p.add_argument('--guest', choices=('qemu', 'model'), default='qemu',
                   help='qemu (default): a real QEMU guest booted from the '
                   'guest kit, its in-guest verifier writing and checking '
                   'every disk; model: the agent\'s verifying thread plays '
                   'the guest (no QEMU needed)')
    p.add_argument('--guest-kit', metavar='DIR',
                   help='the guest kit (vmlinuz, initramfs.cpio.gz; built '
                   'by tools/guest-kit/build.sh) the QEMU guest boots '
                   '(default: [hypervisor]guest_kit when it holds a kit, '
                   'else the checkout\'s .guest-kit)')
    p.add_argument('--config-file', action='append',
                   help='xsm-driver.conf whose [hypervisor] options '
                   '(qemu_binary, accel, guest_kit, ...) the QEMU guest\'s '
                   'hosts use (repeatable)')
    p.add_argument('--workdir', help='keep the hosts\' SRs in this folder')
    p.add_argument('--size', type=_size,
                   help='virtual size of each disk (default 64M for the '
                   'QEMU guest, 256M for the model guest)')
    p.add_argument('--disks', type=int, default=2, help='disks of the VM '
                   '(default 2)')
    p.add_argument('--write-rate', type=int,
                   help='guest writes (4 KiB) per second per disk (default '
                   '100 for the QEMU guest, 200 for the model guest); 0: as '
                   'fast as it can (model guest only)')
    p.add_argument('--fill', type=float,
                   help='fraction of each disk written before migrating '
                   '(model guest only; default 0.5)')
    p.add_argument('--json', action='store_true',
                   help='print one JSON object')
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from oslo_messaging import exceptions as msg_exc
    return common.run(PROG, args, errors=(msg_exc.MessagingException,
                                          errors.MigrationError))


if __name__ == '__main__':
    sys.exit(main())
