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

import socket

from oslo_config import cfg

from xsm_driver.conf import _util

agent_group = cfg.OptGroup(
    'agent',
    title='Agent options',
    help='Options of xsm-agent, the service that runs on every host, owns '
         'its VMs and storage repositories and takes part in migrations.')

agent_opts = [
    cfg.StrOpt(
        'engine',
        default='native',
        help='What runs the migrations of this agent: a stevedore plugin of '
             'the xsm_driver.engine namespace. native: our own data path '
             'under the VMs of this host (its [sr]repositories); xenapi: '
             'a XenServer or XCP-ng pool, whose xapi migrates its VMs '
             '(see the [xenapi] options).'),
    cfg.StrOpt(
        'host',
        default=socket.gethostname(),
        sample_default='<hostname>',
        help='Name of this host: the RPC server name other agents and '
             'xsm-migrate use to reach this agent.'),
    cfg.StrOpt(
        'state_path',
        default='/var/lib/xsm-driver/state',
        help='Directory for the migration journal (SQLite), the VM records '
             'and per-migration TLS credentials. Keep it on local storage '
             'that survives a reboot.'),
    cfg.StrOpt(
        'migration_address',
        default='127.0.0.1',
        help='Address the NBD server of an incoming migration listens on. '
             'Set it to this host\'s address on the migration network; '
             'migration data never uses another address.'),
    cfg.IntOpt(
        'max_concurrent_migrations',
        default=3, min=1,
        help='Migrations this host takes part in at once, as source or '
             'destination. One more is refused before anything changes '
             '(XenServer refuses the fourth with TOO_MANY_STORAGE_MIGRATES).'),
    cfg.IntOpt(
        'bandwidth_limit',
        default=0, min=0,
        help='Default copy rate limit of one migration, in bytes per second; '
             '0 means unlimited. A migration request may set its own.'),
    cfg.IntOpt(
        'leaf_headroom_mb',
        default=64, min=0,
        help='Free space, in MiB, a disk\'s new leaf may need on the source '
             'SR while its snapshot is copied, and on the destination SR on '
             'top of the copied data.'),
    cfg.FloatOpt(
        'pause_timeout',
        default=10.0, min=0.1,
        help='Seconds a snapshot or switch-over waits for in-flight guest '
             'I/O to finish before it gives up (the migration then aborts '
             'and the guest goes on).'),
    cfg.FloatOpt(
        'mirror_timeout',
        default=30.0, min=0.1,
        help='Seconds a mirrored guest write waits for the destination; '
             'after that the mirror is dropped, the guest\'s write succeeds '
             'locally and the migration aborts.'),
    cfg.IntOpt(
        'copy_chunk_mb',
        default=4, min=1, max=32,
        help='Size of one copy request, in MiB.'),
    cfg.IntOpt(
        'copy_depth',
        default=8, min=1, max=64,
        help='Copy requests in flight per disk (see also copy_buffer_mb). '
             'The disks of one VM share copy_buffer_mb: each disk\'s copy '
             'has at most twice its share of those buffers in worker '
             'threads (and never fewer than its connections).'),
    cfg.IntOpt(
        'copy_buffer_mb',
        default=32, min=4, max=4096,
        help='Copy data one migration holds in memory at a time, all its '
             'disks together, in MiB (at least one request of '
             'copy_chunk_mb), so that the agents\' memory does not grow '
             'with the number of disks a VM has.'),
    cfg.IntOpt(
        'copy_connections',
        default=4, min=1, max=8,
        help='TLS connections the copy of one disk uses (the destination '
             'offers at most 8). One connection is encrypted by one thread '
             'and decrypted by one, so several use several cores. The copy '
             'of a VM of several disks opens no more per disk than the '
             'disk\'s share of copy_buffer_mb holds requests (at least '
             'one).'),
    cfg.FloatOpt(
        'receive_lease_timeout',
        default=120.0, min=0,
        help='Seconds this host, as the destination of a migration, keeps '
             'receiving it without hearing from its source. A source renews '
             'its lease on the receive every quarter of this time while the '
             'migration runs; when no renewal came for this long (the '
             'source host was lost, or cut off from this one), the receive '
             'is rolled back: its disks, NBD server and TLS credentials '
             'are removed and it no longer counts against '
             'max_concurrent_migrations. A receive this host was told to '
             'complete is never rolled back. Sources older than this '
             'release do not renew and hold no lease. Keep it well above '
             'the time a message takes on a slow or busy bus; 0 disables '
             'the lease.'),
    # -- the switch-over's commit rule (doc/source/switch-over.rst) --
    cfg.FloatOpt(
        'commit_timeout',
        default=60.0, min=1.0,
        help='Seconds this host, as the source of a migration, keeps its '
             'guest paused and keeps asking the destination whether it '
             'committed the switch-over, when the destination\'s answer was '
             'lost (a lost message, a broken link, a restarted agent). The '
             'guest resumes here only when the destination answers that it '
             'rolled back (after which it refuses to commit), and the '
             'migration finishes as soon as it answers that it committed. '
             'With no certain answer for this long, the migration is '
             'reported in phase in-doubt: the guest stays paused, and '
             '"xsm-migrate resolve ID" asks the destination again and '
             'finishes or rolls back the migration by its answer. It is '
             'the longest downtime a lost answer causes before an '
             'operator is needed.'),
    cfg.FloatOpt(
        'progress_interval',
        default=2.0, min=0.1,
        help='Seconds between two migration progress notifications '
             '(event type xsm.migration.progress).'),
]

# -- NBD server bounds (the server an incoming migration listens on) --------
# A separate block. The process that runs migrations hands these to
# xsm_driver.core.nbd.server.set_defaults(**nbd_server_limits(conf)).

nbd_server_opts = [
    cfg.IntOpt(
        'nbd_max_connections',
        default=256, min=1, max=65536,
        help='Connections the NBD server of an incoming migration accepts '
             'at once. One more is closed as soon as it is accepted, and '
             'the refusals are logged once per burst. A migration opens '
             'copy_connections + 1 of them per disk.'),
    cfg.IntOpt(
        'nbd_max_handshakes',
        default=64, min=1, max=65536,
        help='Connections to the NBD server of an incoming migration that '
             'may be in their handshake (before and during TLS, not yet '
             'authenticated) at once. A new connection over this limit '
             'takes the place of the oldest one still in its handshake, so '
             'that a flood of connections that never authenticate keeps a '
             'bounded number of threads and cannot lock the source host '
             'out.'),
    cfg.FloatOpt(
        'nbd_handshake_timeout',
        default=30.0, min=1.0, max=600.0,
        help='Seconds a connection to the NBD server of an incoming '
             'migration has to finish its handshake, TLS included; then '
             'it is closed.'),
    cfg.FloatOpt(
        'nbd_request_timeout',
        default=60.0, min=1.0, max=3600.0,
        help='Seconds an NBD request that has begun to arrive (its header, '
             'or the data of a write) has to arrive whole, and a reply has '
             'to go out, on an authenticated connection; then the '
             'connection is closed. A connection may stay idle between '
             'requests for any time.'),
]
agent_opts.extend(nbd_server_opts)


def nbd_server_limits(conf):
    """Keyword arguments of the NBD server's set_defaults()."""
    opts = conf.agent
    return {'max_connections': opts.nbd_max_connections,
            'max_handshakes': opts.nbd_max_handshakes,
            'handshake_timeout': opts.nbd_handshake_timeout,
            'request_timeout': opts.nbd_request_timeout}


#: who may call whom (xsm_driver.core.rpc.auth, README "Trust between
#: hosts"); nova.conf's [xsm] group has the same options
auth_opts = [
    cfg.StrOpt(
        'identity_key_file',
        help='This host\'s Ed25519 private key (PEM, mode 0600), which '
             'signs its agent\'s calls to other agents and its answers. '
             'Unset, it is identity.key in state_path. "xsm-agent init" '
             'creates it and prints its public key; the agent (xsm-agent, '
             'or nova-compute\'s xsm driver) also creates it at its first '
             'start when it is missing, and logs its public key.'),
    cfg.DictOpt(
        'trusted_hosts',
        default={},
        help='The agents this host trusts, as host name:public key '
             '(base64, as "xsm-agent init" prints it), comma separated. '
             'Only these hosts may call this agent\'s receive methods, and '
             'migrations go only to them. Give every host the same list '
             '(config management can write it from the keys the hosts '
             'printed); a host trusts itself without being listed.'),
    cfg.StrOpt(
        'trusted_hosts_file',
        help='A file with more trusted hosts, one "host-name public-key" '
             'pair a line ("#" starts a comment), read at start. Its hosts '
             'are added to trusted_hosts.'),
    cfg.DictOpt(
        'trusted_operators',
        default={},
        help='The operator keys this agent obeys, as operator name:public '
             'key (base64, as "xsm-agent operator-key" prints it), comma '
             'separated. A call signed with one of these keys may call '
             'every method of the agent; xsm-migrate, the Nova driver and '
             'the CloudStack API service sign with such a key.'),
    cfg.StrOpt(
        'operator_key_file',
        help='The operator private key (PEM, mode 0600) that operators\' '
             'tools reading this file (xsm-migrate, the CloudStack API '
             'service, nova-compute\'s xsm driver) sign their calls to '
             'agents with, made by "xsm-agent operator-key". Agents trust '
             'it through their trusted_operators option. Unset, the calls '
             'are unsigned and every agent refuses them.'),
    cfg.StrOpt(
        'operator_name',
        default='operator',
        help='The name the operator key of operator_key_file has in the '
             'agents\' trusted_operators option.'),
    cfg.FloatOpt(
        'clock_skew',
        default=60.0, min=1.0,
        help='Seconds a signed call\'s timestamp may differ from this '
             'host\'s clock; an older (or newer) call is refused, so that '
             'a recorded call cannot be played again later. Keep the hosts\' '
             'clocks in step (NTP).'),
    cfg.IntOpt(
        'replay_cache_size',
        default=100000, min=100,
        help='Signed calls this agent remembers (for two clock_skew '
             'windows at most) to refuse one that is played again; when '
             'full, further calls are refused until older ones expire.'),
]


agent_opts.extend(auth_opts)


register_opts = _util.registrar(agent_group, agent_opts)


def list_opts():
    return {agent_group: agent_opts}
