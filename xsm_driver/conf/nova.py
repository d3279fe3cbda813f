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

"""The ``[xsm]`` group of nova.conf, read by ``compute_driver=xsm.XSMDriver``.

nova.conf also has the ``[hypervisor]`` group of xsm-agent
(:mod:`xsm_driver.conf.hypervisor`), the same options under the same
name: what runs the host's guests (``driver = qemu``: real QEMU guests),
given to the agent nova-compute runs or starts. One definition, one
meaning in both files, and the sample documents it once; nova has no
group of that name. (With ``[xsm]agent = external`` the agent's own
configuration decides; keep nova.conf's ``[hypervisor]driver`` the same,
the driver reads it to know whether its guests are QEMU guests.)

This module must not import nova: the option list is also what
oslo-config-generator documents in xsm-driver's sample configuration.
"""

from oslo_config import cfg

from xsm_driver.conf import _util
from xsm_driver.conf import agent as agent_conf
from xsm_driver.conf import hypervisor as hypervisor_conf

xsm_group = cfg.OptGroup(
    'xsm',
    title='xsm-driver options of nova-compute',
    help='Options of the xsm-driver compute driver (compute_driver = '
         'xsm.XSMDriver in nova.conf): where the instances\' disks live and '
         'how live migrations with --block-migrate run.')

TIMEOUT_ACTIONS = ('abort', 'force_complete')

xsm_opts = [
    cfg.StrOpt(
        'transport_url',
        secret=True,
        help='oslo.messaging URL of the xsm-driver control plane (the '
             'xsm-agent topic). Unset, the compute driver uses nova\'s own '
             '[DEFAULT]transport_url, so the agents of all compute hosts '
             'meet on nova\'s message bus.'),
    cfg.StrOpt(
        'agent',
        default='auto',
        choices=[
            ('auto', 'on a real message bus, xsm-agent as a process of its '
                     'own, configured from this group and [hypervisor]: '
                     'started when no '
                     'agent of this host answers, adopted when one does, '
                     'never stopped by nova-compute, so guests outlive '
                     'restarts of nova-compute (under systemd, give '
                     'nova-compute\'s unit KillMode=process); on fake:// '
                     '(tests only), thread.'),
            ('thread', 'nova-compute is the xsm agent of its host: it serves '
                       'the host\'s SRs, VMs and migrations in its own '
                       'threads (its guests run as [hypervisor] says), '
                       'and its guests stop with it.'),
            ('process', 'nova-compute starts xsm-agent as a child process '
                        'configured from this group and [hypervisor], and '
                        'stops it with the '
                        'service; needs a real message bus (not fake://).'),
            ('external', 'a separate xsm-agent service with the same host '
                         'name serves this host on the same transport; the '
                         'options of this group that describe the agent '
                         '(SRs, state, address, limits) are not used.'),
        ],
        help='Where the xsm agent of this host runs. Only auto (on a real '
             'bus) and external keep guests running when nova-compute '
             'stops. Inside nova-compute (thread) works on native threads '
             'and under eventlet; under '
             'eventlet the engine\'s blocking file I/O (fsync, unlink) '
             'briefly holds nova-compute\'s green threads, which process '
             'or external avoid.'),
    cfg.MultiStrOpt(
        'sr_repositories',
        default=['local:vhd:/var/lib/xsm-driver/sr'],
        help='A storage repository of this host, as NAME:DRIVER:PATH (see '
             '[sr]repositories of xsm-agent). Repeat the option for several '
             'SRs. Not used with agent = external.'),
    cfg.StrOpt(
        'instance_sr',
        help='Name of the SR that holds the disks of new instances and '
             'receives the disks of instances live-migrated to this host. '
             'Unset: the first of sr_repositories.'),
    cfg.StrOpt(
        'state_path',
        default='/var/lib/xsm-driver/state',
        help='Directory for the migration journal, the VM records and '
             'per-migration TLS credentials of the agent, and the '
             'configuration and log of a child agent; with '
             '[hypervisor]driver = qemu also the QEMU guests\' folders and '
             'the kernel and ramdisk of each instance whose image has '
             'kernel_id / ramdisk_id properties (instances/UUID/). Keep it '
             'on local storage that survives a reboot, at the same path on '
             'every compute host: a live-migrated guest\'s QEMU is started '
             'on the destination with the source\'s kernel and ramdisk '
             'paths.'),
    cfg.StrOpt(
        'migration_address',
        default='127.0.0.1',
        help='Address the NBD server of an incoming live migration listens '
             'on: this host\'s address on the migration network. Not used '
             'with agent = external.'),
    cfg.IntOpt(
        'max_concurrent_migrations',
        default=3, min=1,
        help='Live migrations this host takes part in at once, as source or '
             'destination; one more is refused at the pre-check. Not used '
             'with agent = external.'),
    cfg.IntOpt(
        'leaf_headroom_mb',
        default=64, min=0,
        help='Free space, in MiB, a disk\'s mirrored leaf may need on the '
             'source and destination SRs during a live migration, on top '
             'of the copied data.'),
    cfg.IntOpt(
        'bandwidth_limit',
        default=0, min=0,
        help='Copy rate limit of one live migration, in MiB per second; 0 '
             'means unlimited. A force-complete lifts it.'),
    cfg.IntOpt(
        'completion_timeout',
        default=800, min=0,
        help='Seconds a live migration may take, per GiB of disk data to '
             'copy (at least 2 GiB are counted), before the timeout action '
             'is taken; 0 disables the timeout. Example: 800 and 5 GiB of '
             'allocated disk data give 4000 s.'),
    cfg.StrOpt(
        'completion_timeout_action',
        default='abort',
        choices=[
            ('abort', 'Abort the live migration: the instance stays on '
                      'the source and the destination SR is left as it '
                      'was.'),
            ('force_complete', 'Lift the bandwidth limit so that the copy '
                               'ends as soon as it can. The mirror of guest '
                               'writes is synchronous, so the switch-over '
                               'follows the copy at once.'),
        ],
        help='What to do when a live migration reaches its completion '
             'timeout.'),
    cfg.IntOpt(
        'prepared_receive_timeout',
        default=300, min=1,
        deprecated_for_removal=True,
        deprecated_reason='The destination no longer prepares its receive '
                          'in pre_live_migration: the source agent prepares '
                          'it when the live migration starts (the stock '
                          'nova-conductor carries no secrets), and an '
                          'unclaimed receive is rolled back by the agents\' '
                          'own lease ([agent]receive_lease_timeout).',
        help='Unused since the stock nova-conductor runs xsm live '
             'migrations (see the deprecation reason).'),
    cfg.FloatOpt(
        'progress_interval',
        default=1.0, min=0.05,
        help='Seconds between two looks at a running live migration: its '
             'progress is saved on the migration record and the instance '
             'then, and the completion timeout checked.'),
    cfg.IntOpt(
        'rpc_timeout',
        default=60, min=1,
        help='Seconds to wait for an xsm agent to answer a call.'),
]


# who may call the host's agent, and what the driver signs its calls with:
# the options of xsm-agent's [agent] group, here in [xsm]
xsm_opts.extend(agent_conf.auth_opts)


_register_xsm = _util.registrar(xsm_group, xsm_opts)


def register_opts(conf):
    """Register ``[xsm]`` and xsm-agent's ``[hypervisor]`` on ``conf``.

    (``[hypervisor]`` is documented with xsm-agent's options: its
    :func:`list_opts` is :mod:`xsm_driver.conf.hypervisor`'s.)
    """
    _register_xsm(conf)
    hypervisor_conf.register_opts(conf)


def list_opts():
    return {xsm_group: xsm_opts}
