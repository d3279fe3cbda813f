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

"""``XSMDriver``: a Nova compute driver whose live migration is xsm's.

Each compute host has an xsm agent named after the compute host, on
``[xsm]transport_url`` (nova's own message bus when unset), which opens
the host's SRs and runs its guests. With ``[xsm]agent = auto`` on a real
bus it is a process of its own that nova-compute starts at ``init_host``
when none answers and adopts when one does, and never stops: guests
outlive nova-compute (see :func:`agent_mode`). ``thread`` runs it in
nova-compute's threads (what ``auto`` means on ``fake://``, in tests;
green threads when nova-compute runs monkey-patched by eventlet) and
``process`` as a child ``xsm-agent`` process: both stop, with the
guests, when nova-compute stops. With ``external`` a separate
``xsm-agent`` service of the same host name does it. Either way every
call below goes through the agent's RPC API
(:class:`xsm_driver.core.rpc.api.AgentAPI`), to this host's agent or to
the other host's.

An instance is an xsm VM named after the instance's uuid; its disks are
VDIs in ``[xsm]instance_sr``, made from the flavor's root, ephemeral and
swap sizes; the root disk holds the instance's Glance image (``raw`` or
``vhd``), downloaded to ``[xsm]state_path``/images and written into the
VDI by the host's agent (``vdi_import``).

With ``[hypervisor]driver = qemu`` (nova.conf has xsm-agent's
``[hypervisor]`` group) the VM is a real QEMU guest of the flavor's
memory and vCPUs: it boots the kernel and ramdisk of the image's
``kernel_id`` / ``ramdisk_id`` properties (Glance images downloaded to
``[xsm]state_path``/instances/UUID/), or the host's guest kit. Its power
operations act on the QEMU process, ``get_info`` answers the power state
QMP reports, ``get_console_output`` the serial console, and a live
migration moves the running guest: its memory by QEMU's migration, its
disks by the engine, one switch-over.

``nova live-migration --block-migrate`` maps onto the engine so:

=========================================== ==============================
Nova calls (host)                           xsm
=========================================== ==============================
``check_can_live_migrate_destination`` (d)  the destination agent's
                                            receive preflight (SR, space,
                                            concurrency, VIF map) with the
                                            source's real VDI sizes;
                                            refusals become
                                            ``MigrationPreCheckError``;
                                            the destination SR goes into
                                            migrate_data
``check_can_live_migrate_source`` (s)       every VDI mapped, chain depth,
                                            room for the snapshot leaf
``pre_live_migration`` (d)                  the receive preflight again
``live_migration`` (s)                      ``migrate_vm``: the source
                                            agent prepares the receive on
                                            the destination's agent (the
                                            one-time export names and
                                            certificates go agent to
                                            agent, never through nova)
                                            and mirrors, snapshots,
                                            copies; polled to the end;
                                            progress saved; completion
                                            timeout; ``post_method`` /
                                            ``recover_method``; a
                                            migration ``in-doubt`` is
                                            neither: it is reported and
                                            watched until ``xsm-migrate
                                            resolve`` settles it
``live_migration_abort`` (s)                ``migration_abort``
``live_migration_force_complete`` (s)       ``migration_force_complete``
``rollback_live_migration_at_source`` (s)   the destination's
                                            ``receive_abort`` (idempotent)
``rollback_live_migration_at_destination``  ``receive_abort`` of this
(d)                                         host's receive; nova calls it
                                            for this driver's migrate_data
                                            (nova's own
                                            ``LibvirtLiveMigrateData``, see
                                            :mod:`xsm_driver.nova.
                                            migrate_data`), which ends the
                                            destination's
                                            ``live_migration_at_dest``
                                            task
=========================================== ==============================

The engine's migration of an instance is found, on either host, in the
source agent's ``migration_list`` by the VM's name (the instance's uuid)
and the destination host: nothing of it needs to travel in migrate_data,
which every nova service (the stock nova-conductor too) deserialises.

Nothing here imports eventlet. The monitor of a live migration uses
``time.sleep`` in the thread Nova runs ``live_migration`` in (a green
thread and a green sleep when nova-compute runs monkey-patched).
"""

import json
import os
import shutil
import sys
import threading
import time
import uuid as uuidlib

from oslo_concurrency import processutils
from oslo_log import log as logging
import oslo_messaging as messaging
from oslo_utils import versionutils

from nova.compute import power_state
from nova.compute import utils as compute_utils
import nova.conf
from nova import exception
from nova.objects import fields as obj_fields
from nova.virt import driver
from nova.virt import hardware
from nova.virt import images
import nova.virt.node

from xsm_driver.conf import nova as xsm_conf
from xsm_driver.core.block import backends
from xsm_driver.core import exception as xsm_exception
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import plan
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api as rpc_api
from xsm_driver.core.rpc import keys as rpc_keys
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.nova import agent_process
from xsm_driver.nova import decisions
from xsm_driver.nova import migrate_data as xsm_migrate_data

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF
xsm_conf.register_opts(CONF)

MiB = 1 << 20
GiB = 1 << 30

_POWER_STATES = {
    host_mod.RUNNING: power_state.RUNNING,
    host_mod.HALTED: power_state.SHUTDOWN,
    host_mod.PAUSED: power_state.PAUSED,
    # a QEMU guest's QMP status guest-panicked or internal-error
    'crashed': power_state.CRASHED,
}

#: the bytes of a guest's console get_console_output answers at most (as
#: nova's libvirt driver)
MAX_CONSOLE_BYTES = 100 * 1024

#: where an instance's kernel and ramdisk go, in [xsm]state_path
INSTANCE_FOLDER = 'instances'

# One transport per URL in a process: two computes of one process (Nova's
# functional tests) must share it to reach each other on ``fake://``.
_TRANSPORTS = {}
_TRANSPORTS_LOCK = threading.Lock()

#: seconds an abort or force-complete waits for live_migration() to have
#: started the engine's migration (Nova marks the migration running just
#: before it calls the driver)
_START_WAIT = 10.0


def _transport(conf):
    url = conf.xsm.transport_url or None
    key = (url or conf.transport_url or '', conf.control_exchange)
    with _TRANSPORTS_LOCK:
        if key not in _TRANSPORTS:
            _TRANSPORTS[key] = rpc_api.get_transport(conf, url=url)
        return _TRANSPORTS[key]


def eventlet_patched():
    """Whether this process runs monkey-patched by eventlet.

    Asks nova, else eventlet if something imported it; never imports
    eventlet.
    """
    try:
        from nova import monkey_patch
        if monkey_patch.is_patched():
            return True
    except ImportError:
        pass
    patcher = sys.modules.get('eventlet.patcher')
    return bool(patcher and patcher.is_monkey_patched('thread'))


def agent_mode(option, url=None):
    """The ``[xsm]agent`` mode to use.

    ``auto`` is ``detached`` on a message bus other processes reach: the
    agent is a process of its own that nova-compute starts when none
    answers, adopts when one does, and never stops, so that its guests
    outlive nova-compute (see :mod:`xsm_driver.nova.agent_process`). On
    ``fake://`` (nova's functional tests: one process) ``auto`` is
    ``thread``, the agent in nova-compute's threads, which stops, and its
    guests with it, when nova-compute stops: safe in tests only.

    In threads under eventlet too: the engine's threads are then green
    threads and its NBD sockets green sockets, which it closes the way a
    green thread waiting on them notices (tests/unit/core/nbd/
    test_eventlet.py). Its blocking system calls (file reads and writes,
    fsync, unlink) then pause nova-compute's other green threads while
    they run; a process keeps the engine out of nova-compute.

    >>> agent_mode('auto', 'rabbit://h/'), agent_mode('auto', 'fake://')
    ('detached', 'thread')
    >>> agent_mode('auto'), agent_mode('process', 'rabbit://h/')
    ('thread', 'process')
    """
    if option != 'auto':
        return option
    return 'detached' if url and not url.startswith('fake:') else 'thread'


def _guest_options_refused(exc):
    """What the agent said when it refused a VM's ``qemu`` options.

    None for any other error. (An agent whose RPC layer does not rebuild
    the hypervisor's exceptions answers a RemoteError of that class.)
    """
    if isinstance(exc, hv_base.InvalidGuestOptions):
        return str(exc)
    if isinstance(exc, messaging.RemoteError) and \
            exc.exc_type == hv_base.InvalidGuestOptions.__name__:
        return exc.value
    return None


def _precheck_error(exc):
    return exception.MigrationPreCheckError(reason=str(exc))


class _LiveMigration:
    """What the source knows of one instance's running live migration."""

    def __init__(self):
        self.mid = None
        self.abort_requested = False
        self.force_requested = False
        self.in_doubt_reported = False
        self.started = threading.Event()


class XSMDriver(driver.ComputeDriver):
    """Instances on xsm SRs; live migration by xsm's native engine."""

    capabilities = dict(
        driver.ComputeDriver.capabilities,
        supports_image_type_raw=True,
        supports_image_type_vhd=True,
    )

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self._host = None
        self._node_uuid = None
        self._transport = None
        self._credential = None
        self._trust = None
        self._agent = None
        self._api = None
        self._sr = None
        self._state_path = None
        self._qemu = False
        self._resources = False
        self._migrations = {}
        self._lock = threading.Lock()

    # -- the host and its agent ---------------------------------------------

    def init_host(self, host):
        self._host = host
        self._node_uuid = nova.virt.node.get_local_node_uuid()
        self._state_path = os.path.abspath(CONF.xsm.state_path)
        # the host's guests are QEMU guests (the agent this driver runs
        # or starts has this [hypervisor]; an external one must match)
        self._qemu = host_mod.uses_qemu(CONF.hypervisor.driver)
        self._transport = _transport(CONF)
        # the operator key of [xsm]operator_key_file signs every call of
        # this driver; answers are checked against [xsm]trusted_hosts
        self._credential = rpc_keys.operator_credential(CONF.xsm)
        self._trust = rpc_keys.trust(CONF.xsm)
        self._api = self._agent_api(host)
        mode = agent_mode(CONF.xsm.agent,
                          CONF.xsm.transport_url or CONF.transport_url)
        if mode == 'thread' and self._qemu and eventlet_patched():
            # the agent serves a QEMU guest's disks on unix sockets, whose
            # green accept() a stop does not wake under eventlet: the
            # guest's stop, or the clean-up of its live migration, would
            # hang nova-compute
            raise exception.NovaException(
                'xsm host %s: [xsm]agent = %s runs the xsm agent in '
                'nova-compute\'s green threads, which cannot run QEMU '
                'guests ([hypervisor]driver = qemu) under eventlet; use '
                '[xsm]agent = process, external, or auto on a real message '
                'bus, or run nova-compute on native threads' % (
                    host, CONF.xsm.agent))
        if mode == 'thread':
            self._agent = self._thread_agent(host)
        elif mode in ('process', 'detached'):
            self._agent = self._process_agent(host,
                                              detached=mode == 'detached')
        info = self._api.host_info()
        # an agent that answers 'resources' (the xenapi engine) runs VMs
        # that take the flavor's memory and vCPUs, on hosts it measures
        self._resources = 'resources' in info
        srs = [s['name'] for s in info['srs']]
        self._sr = CONF.xsm.instance_sr or (srs[0] if srs else None)
        if self._sr not in srs:
            raise exception.NovaException(
                'xsm host %s has no SR %s for instance disks (it has: %s); '
                'check [xsm]instance_sr and [xsm]sr_repositories'
                % (host, self._sr, ', '.join(srs) or 'none'))
        LOG.info('xsm host %s: instance disks in SR %s, agent: %s%s, '
                 'guests: %s', host, self._sr, mode,
                 ' (green threads: eventlet)'
                 if mode == 'thread' and eventlet_patched() else '',
                 CONF.hypervisor.driver)

    def _thread_agent(self, host):
        xsm_host = host_mod.Host.from_config(
            host, CONF.xsm.sr_repositories, CONF.xsm.state_path, conf=CONF)
        options = manager_mod.Options(
            address=CONF.xsm.migration_address,
            max_concurrent=CONF.xsm.max_concurrent_migrations,
            leaf_headroom=CONF.xsm.leaf_headroom_mb * MiB)
        identity = None
        if self._trust or not (CONF.xsm.transport_url or CONF.transport_url
                               or '').startswith('fake:'):
            identity = rpc_keys.identity(CONF.xsm, host)
        return agent_mod.Agent(self._transport, xsm_host, options,
                               rpc_timeout=CONF.xsm.rpc_timeout,
                               identity=identity).start()

    def _process_agent(self, host, detached=False):
        url = CONF.xsm.transport_url or CONF.transport_url
        if not url or url.startswith('fake:'):
            raise exception.NovaException(
                '[xsm]agent = process needs a message bus other processes '
                'reach; the transport URL is %r' % url)
        text = agent_process.config_text(
            host, CONF.xsm.sr_repositories, CONF.xsm.state_path, url,
            CONF.control_exchange, CONF.xsm.migration_address,
            CONF.xsm.max_concurrent_migrations, CONF.xsm.leaf_headroom_mb,
            agent_process.auth_lines(CONF.xsm),
            agent_process.hypervisor_lines(CONF.hypervisor))
        ping = rpc_api.AgentAPI(self._transport, host, timeout=2,
                                credential=self._credential,
                                trust=self._trust).host_info
        return agent_process.AgentProcess(CONF.xsm.state_path, text,
                                          ping, detached=detached).start()

    def cleanup_host(self, host):
        if self._agent is not None:
            self._agent.stop()
            self._agent = None

    def _agent_api(self, host):
        return rpc_api.AgentAPI(self._transport, host,
                                timeout=CONF.xsm.rpc_timeout,
                                credential=self._credential,
                                trust=self._trust)

    def get_available_nodes(self, refresh=False):
        return [self._host]

    def get_nodenames_by_uuid(self, refresh=False):
        return {self._node_uuid: self._host}

    def get_host_ip_addr(self):
        return CONF.my_ip

    def get_host_uptime(self):
        """What ``uptime`` prints, as libvirt's driver answers it."""
        out, _err = processutils.execute('env', 'LANG=C', 'uptime')
        return out

    def _sr_info(self):
        for sr in self._api.host_info()['srs']:
            if sr['name'] == self._sr:
                return sr
        raise exception.NovaException('xsm SR %s is gone from host %s'
                                      % (self._sr, self._host))

    @staticmethod
    def _memory_mb():
        try:
            with open('/proc/meminfo') as f:
                for line in f:
                    if line.startswith('MemTotal:'):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // MiB

    def get_available_resource(self, nodename):
        info = self._api.host_info()
        sr = self._sr_info()
        local_gb = sr['size'] // GiB
        pool = info.get('resources') or {}
        return {
            'vcpus': pool.get('vcpus') or os.cpu_count() or 1,
            'memory_mb': pool.get('memory_mib') or self._memory_mb(),
            'local_gb': local_gb,
            'vcpus_used': 0,
            'memory_mb_used': 0,
            'local_gb_used': (sr['size'] - sr['free']) // GiB,
            'hypervisor_type': 'xsm',
            'hypervisor_version': versionutils.convert_version_to_int('1.0'),
            'hypervisor_hostname': nodename,
            'cpu_info': json.dumps({'arch': obj_fields.Architecture.X86_64}),
            'disk_available_least': sr['free'] // GiB,
            'supported_instances': [(obj_fields.Architecture.X86_64,
                                     obj_fields.HVType.XEN,
                                     obj_fields.VMMode.HVM)],
            'numa_topology': None,
            'uuid': self._node_uuid,
        }

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        res = self.get_available_resource(nodename)
        inv = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inv)
        inventory = {}
        for rc, total, reserved in (
                ('VCPU', res['vcpus'], CONF.reserved_host_cpus),
                ('MEMORY_MB', res['memory_mb'],
                 CONF.reserved_host_memory_mb),
                ('DISK_GB', res['local_gb'],
                 self._get_reserved_host_disk_gb_from_config())):
            if total > 0:
                inventory[rc] = {'total': total, 'min_unit': 1,
                                 'max_unit': total, 'step_size': 1,
                                 'allocation_ratio': ratios[rc],
                                 'reserved': min(reserved, total)}
        provider_tree.update_inventory(nodename, inventory)

    # -- instances -----------------------------------------------------------

    def _vm(self, instance, api=None):
        try:
            return (api or self._api).vm_get(decisions.vm_name(
                instance.uuid))
        except host_mod.VMNotFound:
            raise exception.InstanceNotFound(instance_id=instance.uuid)

    def list_instances(self):
        return [vm['name'] for vm in self._api.vm_list()]

    def list_instance_uuids(self):
        return self.list_instances()

    def instance_exists(self, instance):
        try:
            self._vm(instance)
            return True
        except exception.InstanceNotFound:
            return False

    def get_info(self, instance, use_cache=True):
        """The power state the agent sees now (a QEMU guest's: QMP's)."""
        vm = self._vm(instance)
        return hardware.InstanceInfo(
            state=_POWER_STATES.get(vm['power_state'], power_state.NOSTATE))

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        try:
            vm, qemu = self._spawn(context, instance, image_meta,
                                   network_info, power_on)
        except Exception:
            self._remove_boot_files(instance)
            raise
        LOG.info('xsm VM %s made with disks %s in SR %s%s', vm['uuid'],
                 ', '.join(d['vdi'] for d in vm['disks']), self._sr,
                 '; a QEMU guest (%s)' % ', '.join(
                     '%s=%s' % item for item in sorted(qemu.items()))
                 if qemu else '', instance=instance)

    def _spawn(self, context, instance, image_meta, network_info, power_on):
        flavor = instance.flavor
        qemu = None
        if self._qemu:
            qemu = self._guest_options(context, instance, image_meta)
        elif self._resources:
            qemu = {'memory_mib': flavor.memory_mb, 'vcpus': flavor.vcpus}
        image = self._fetch_image(context, instance, image_meta)
        try:
            image_size = (image['size'] if image is not None else
                          getattr(image_meta, 'size', 0) if image_meta
                          else 0)
            sizes = decisions.disk_sizes(
                flavor.root_gb, flavor.ephemeral_gb, flavor.swap,
                image_size)
            vifs = [vif['id'] for vif in network_info or []]
            try:
                vm = self._api.vm_create(
                    decisions.vm_name(instance.uuid),
                    [{'sr': self._sr, 'size': s} for s in sizes], vifs,
                    qemu=qemu)
            except Exception as exc:
                refused = _guest_options_refused(exc)
                if refused is None:
                    raise
                # the flavor's or image's value the agent refused, named
                raise exception.InvalidInput(
                    reason='host %s cannot run instance %s: %s'
                           % (self._host, instance.uuid, refused))
            try:
                if image is not None:
                    self._write_image(instance, image, vm['disks'][0]['vdi'])
                if power_on:
                    self._api.vm_start(vm['uuid'])
            except Exception:
                self._api.vm_destroy(vm['uuid'])
                raise
        finally:
            if image is not None:
                self._remove_image_file(image['path'])
        return vm, qemu

    # -- QEMU guests ---------------------------------------------------------

    def _instance_folder(self, instance):
        return os.path.join(self._state_path, INSTANCE_FOLDER,
                            instance.uuid)

    def _guest_options(self, context, instance, image_meta):
        """The ``qemu`` options of the instance's VM (see vm_create).

        The flavor's memory and vCPUs; the kernel and ramdisk of the
        image's ``kernel_id`` / ``ramdisk_id`` (fetched here), else none:
        the agent boots its guest kit; the image's ``os_command_line``.
        """
        flavor = instance.flavor
        options = {'memory_mib': flavor.memory_mb, 'vcpus': flavor.vcpus}
        options.update(self._fetch_boot_files(context, instance))
        props = image_meta.properties if (
            image_meta is not None and
            image_meta.obj_attr_is_set('properties')) else None
        cmdline = props.get('os_command_line') if props is not None else None
        if cmdline:
            options['cmdline'] = cmdline
        return options

    def _fetch_boot_files(self, context, instance):
        """Download the instance's kernel and ramdisk images, if it has.

        To ``[xsm]state_path``/instances/UUID/ (``kernel``, ``ramdisk``);
        a file already there is kept (pre_live_migration on a host that
        shares the folder, a second spawn after a failure).

        :returns: ``{'kernel': path, 'initrd': path}``, each when the
            instance has the image.
        """
        wanted = [(key, name, image_id) for key, name, image_id in (
            ('kernel', 'kernel', instance.kernel_id),
            ('initrd', 'ramdisk', instance.ramdisk_id)) if image_id]
        if not wanted:
            return {}
        folder = self._instance_folder(instance)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        found = {}
        for key, name, image_id in wanted:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                part = path + '.part'
                try:
                    images.fetch(context, image_id, part,
                                 trusted_certs=instance.trusted_certs)
                    if os.path.getsize(part) == 0:
                        raise exception.ImageUnacceptable(
                            image_id=image_id,
                            reason='the %s image of instance %s has no '
                                   'data' % (name, instance.uuid))
                    os.rename(part, path)
                except Exception:
                    self._remove_image_file(part)
                    raise
                LOG.info('%s image %s downloaded to %s (%d bytes)', name,
                         image_id, path, os.path.getsize(path),
                         instance=instance)
            found[key] = path
        return found

    def _remove_boot_files(self, instance):
        shutil.rmtree(self._instance_folder(instance), ignore_errors=True)

    def get_console_output(self, context, instance):
        """The last 100 KiB of the guest's serial console, as bytes.

        Asked by the VM's name, with no ``vm_get`` first: the console is a
        file the agent reads, and ``vm_get`` asks the guest's QEMU for its
        power state (QMP), which a busy QEMU may answer after the agent's
        QMP timeout; the API would answer that with a 500.
        """
        try:
            text = self._api.vm_console(decisions.vm_name(instance.uuid),
                                        limit=MAX_CONSOLE_BYTES)
        except host_mod.VMNotFound:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        except host_mod.InvalidVMState as exc:
            # a host whose guests are not QEMU guests has no console
            LOG.debug('no console: %s', exc, instance=instance)
            raise exception.ConsoleNotAvailable()
        return text.encode('utf-8', 'replace')

    def _fetch_image(self, context, instance, image_meta):
        """Download the instance's image next to the agent; None: none.

        :returns: ``{'id', 'path', 'format', 'size'}``, ``size`` being the
            virtual size of the disk the image holds; None when the
            instance has no image (boot from volume) or its image has no
            data.
        :raises exception.ImageUnacceptable: a format the root disk cannot
            take as it is (only raw and vhd).
        """
        image_id = instance.image_ref
        if not image_id:
            return None
        meta = image_meta
        disk_format = (meta.disk_format if meta is not None and
                       meta.obj_attr_is_set('disk_format') else None)
        container = (meta.container_format if meta is not None and
                     meta.obj_attr_is_set('container_format') else None)
        try:
            fmt = decisions.image_format(disk_format, container)
        except ValueError as exc:
            raise exception.ImageUnacceptable(image_id=image_id,
                                              reason=str(exc))
        # the one folder the agent writes images from (the agent's
        # state_path is [xsm]state_path, unless agent = external)
        folder = os.path.join(self._state_path, manager_mod.IMAGE_FOLDER)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, '%s.%s.part' % (instance.uuid, fmt))
        try:
            images.fetch(context, image_id, path,
                         trusted_certs=instance.trusted_certs)
            length = os.path.getsize(path)
            if length == 0:
                LOG.warning('image %s has no data (Glance gave 0 bytes); the '
                            'root disk starts empty', image_id,
                            instance=instance)
                self._remove_image_file(path)
                return None
            size = length
            if fmt == 'vhd':
                size = self._vhd_size(image_id, path)
        except Exception:
            self._remove_image_file(path)
            raise
        LOG.info('image %s (%s): %d bytes downloaded, a disk of %d bytes',
                 image_id, fmt, length, size, instance=instance)
        return {'id': image_id, 'path': path, 'format': fmt, 'size': size}

    @staticmethod
    def _vhd_size(image_id, path):
        try:
            dev = backends.VHDDevice(path)
        except Exception as exc:
            raise exception.ImageUnacceptable(
                image_id=image_id, reason='its data is not a VHD this host '
                'reads: %s' % exc)
        try:
            return dev.size
        finally:
            dev.close()

    def _write_image(self, instance, image, vdi):
        try:
            result = self._api.vdi_import(vdi, image['path'],
                                          image['format'])
        except xsm_exception.XSMError as exc:
            raise exception.ImageUnacceptable(image_id=image['id'],
                                              reason=str(exc))
        LOG.info('image %s written into root disk %s (%d bytes of data)',
                 image['id'], vdi, result['written'], instance=instance)

    @staticmethod
    def _remove_image_file(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        try:
            vm = self._vm(instance)
        except exception.InstanceNotFound:
            LOG.debug('no xsm VM to destroy', instance=instance)
            return
        if destroy_disks:
            self._api.vm_destroy(vm['uuid'])
            self._remove_boot_files(instance)
        else:
            self._api.vm_stop(vm['uuid'])

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        if destroy_disks:
            self.destroy(context, instance, network_info, block_device_info)

    def power_off(self, instance, timeout=0, retry_interval=0):
        """Stop the guest, as nova's contract (and libvirt's driver) says.

        ``timeout`` > 0 (nova's ``shutdown_timeout``, or the image's
        ``os_shutdown_timeout``): a clean shutdown. The guest is asked to
        power off (the ACPI power button; agent RPC 1.5, ``vm_stop`` with
        ``clean``) and its QEMU is killed only when it has not powered
        off within ``timeout`` seconds (at most
        :data:`~xsm_driver.core.rpc.api.MAX_STOP_TIMEOUT`: a longer one
        is cut to that). The button is pressed once: ``retry_interval``
        is not used. ``timeout`` 0: a hard stop, the QEMU is killed at
        once. Either way the disks keep every write the guest completed.
        (A xenapi engine's pool: VM.clean_shutdown within its own
        ``[xenapi]shutdown_timeout``, or VM.hard_shutdown.)
        """
        vm = self._vm(instance)['uuid']
        if not timeout or timeout <= 0:
            self._api.vm_stop(vm, clean=False)
            return
        if timeout > rpc_api.MAX_STOP_TIMEOUT:
            LOG.warning('shutdown timeout %s s cut to %d s, the most the '
                        'xsm agent waits', timeout, rpc_api.MAX_STOP_TIMEOUT,
                        instance=instance)
            timeout = rpc_api.MAX_STOP_TIMEOUT
        result = self._api.vm_stop(vm, clean=True, timeout=timeout)
        if result.get('clean') is False:
            LOG.warning('the guest did not power off within %s s: its '
                        'process was killed', timeout, instance=instance)
        else:
            LOG.info('the guest powered off (clean shutdown)',
                     instance=instance)

    def power_on(self, context, instance, network_info,
                 block_device_info=None, accel_info=None, share_info=None):
        self._api.vm_start(self._vm(instance)['uuid'])

    def reboot(self, context, instance, network_info, reboot_type,
               block_device_info=None, bad_volumes_callback=None,
               accel_info=None, share_info=None):
        """Reboot the guest; either way it runs afterwards.

        HARD: a running QEMU guest is reset (its process stays); another
        guest is stopped and started again.

        SOFT, as libvirt's driver does it: a running guest is asked to
        shut down (the ACPI power button: a clean ``vm_stop``, agent RPC
        1.5) and gets nova's ``[libvirt]wait_soft_reboot_seconds`` (120
        by default; at most
        :data:`~xsm_driver.core.rpc.api.MAX_STOP_TIMEOUT`) to power off;
        then it is started again (a new QEMU). A guest that does not
        power off in that time is killed at its end and started again,
        with a warning in the log: the hard reboot libvirt falls back to
        (it destroys and re-creates the domain), so the reboot takes up
        to that many seconds more than the boot. A guest that is not
        running (paused: it cannot hear the button), or
        ``wait_soft_reboot_seconds`` 0: stopped at once (the host's own
        way) and started again.
        """
        vm = self._vm(instance)
        uuid = vm['uuid']
        running = vm['power_state'] == host_mod.RUNNING
        if reboot_type == 'HARD' and self._qemu and running:
            self._api.vm_reboot(uuid)
            return
        wait = CONF.libvirt.wait_soft_reboot_seconds
        if reboot_type == 'SOFT' and running and wait > 0:
            if wait > rpc_api.MAX_STOP_TIMEOUT:
                LOG.warning('[libvirt]wait_soft_reboot_seconds %d cut to '
                            '%d s, the most the xsm agent waits', wait,
                            rpc_api.MAX_STOP_TIMEOUT, instance=instance)
                wait = rpc_api.MAX_STOP_TIMEOUT
            result = self._api.vm_stop(uuid, clean=True, timeout=wait)
            if result.get('clean') is False:
                LOG.warning('the guest did not power off within %d s of '
                            'the soft reboot\'s request: it was killed '
                            '(a hard reboot)', wait, instance=instance)
            else:
                LOG.info('the guest shut down for the soft reboot',
                         instance=instance)
            self._api.vm_start(uuid)
            return
        self._api.vm_stop(uuid)
        self._api.vm_start(uuid)

    def pause(self, instance):
        self._api.vm_pause(self._vm(instance)['uuid'])

    def unpause(self, instance):
        self._api.vm_resume(self._vm(instance)['uuid'])

    def plug_vifs(self, instance, network_info):
        """Nothing to plug: xsm VIFs are names the VM record carries."""

    def unplug_vifs(self, instance, network_info):
        """Nothing to unplug (see :meth:`plug_vifs`)."""

    def get_volume_connector(self, instance):
        return {'ip': CONF.my_block_storage_ip, 'host': self._host,
                'initiator': None}

    def instance_on_disk(self, instance):
        return False

    def _disks(self, vm, api=None):
        """The VM's disks with virtual size and allocated bytes of chain."""
        vdis = {v['uuid']: v for v in (api or self._api).vdi_list()}
        disks = []
        for disk in vm['disks']:
            allocated, uuid = 0, disk['vdi']
            while uuid is not None:
                allocated += vdis[uuid]['allocated']
                uuid = vdis[uuid]['parent']
            rec = vdis[disk['vdi']]
            disks.append({'device': disk['name'], 'vdi': disk['vdi'],
                          'sr': disk['sr'], 'type': rec['type'],
                          'virt_disk_size': rec['size'],
                          'disk_size': allocated})
        return disks

    def get_instance_disk_info(self, instance, block_device_info=None):
        return json.dumps(self._disks(self._vm(instance)))

    # -- live migration: checks ----------------------------------------------

    def _receive_spec(self, instance, vm, disks, vif_map):
        """What the destination's preflight checks (see core.destination)."""
        return {
            # a uuid of its own (the agent takes migration uuids only),
            # never one of a real migration
            'id': str(uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                    'xsm-nova-precheck:%s' % instance.uuid)),
            'source_host': instance.host,
            'vm': {k: vm[k] for k in ('uuid', 'name', 'disks', 'vifs')},
            'vif_map': vif_map, 'cross_pool': True,
            'vdis': [{'uuid': d['vdi'], 'size': d['virt_disk_size'],
                      'allocated': d['disk_size'], 'name': d['device'],
                      'sr': self._sr,
                      'mirror': vm['power_state'] == host_mod.RUNNING}
                     for d in disks],
        }

    def _preflight_here(self, spec):
        """Run this host's receive preflight.

        Its refusals, which name SR, need and free space, become Nova's
        ``MigrationPreCheckError``.
        """
        try:
            rpc_api.RemotePeer(self._api).preflight(spec)
        except xsm_exception.XSMError as exc:
            raise _precheck_error(exc)

    def check_can_live_migrate_destination(self, context, instance,
                                           src_compute_info, dst_compute_info,
                                           block_migration=False,
                                           disk_over_commit=False):
        if block_migration is False:
            raise exception.MigrationPreCheckError(
                reason='the disks of instance %s are in host-local xsm SRs: '
                       'a live migration must copy them; use '
                       '--block-migrate (or block_migration auto)'
                       % instance.uuid)
        source = self._agent_api(instance.host)
        try:
            vm = self._vm(instance, source)
            disks = self._disks(vm, source)
        except exception.InstanceNotFound:
            raise exception.MigrationPreCheckError(
                reason='host %s has no xsm VM for instance %s'
                       % (instance.host, instance.uuid))
        if vm.get('qemu') and vm['power_state'] == host_mod.RUNNING and \
                not self._qemu:
            raise exception.MigrationPreCheckError(
                reason='instance %s runs in QEMU on host %s; host %s runs '
                       'no QEMU guests ([hypervisor]driver = %s)'
                       % (instance.uuid, instance.host, self._host,
                          CONF.hypervisor.driver))
        vif_map = {v: v for v in vm['vifs']}
        spec = self._receive_spec(instance, vm, disks, vif_map)
        self._preflight_here(spec)
        sr = self._sr_info()
        data = xsm_migrate_data.check_data(self._sr, sr['free'])
        LOG.info('xsm: host %s can receive instance %s: %d bytes needed, '
                 '%d free in SR %s', self._host, instance.uuid,
                 plan.space_needed(spec['vdis'],
                                   CONF.xsm.leaf_headroom_mb * MiB),
                 sr['free'], self._sr, instance=instance)
        return data

    def cleanup_live_migration_destination_check(self, context,
                                                 dest_check_data):
        """Nothing to undo: the destination check reserves nothing."""

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data, block_device_info=None):
        dest_sr = xsm_migrate_data.dest_sr(dest_check_data)
        if dest_sr is None:
            raise exception.MigrationPreCheckError(
                reason='the destination is not an xsm host (its check data '
                       'is %s without a destination SR)'
                       % type(dest_check_data).__name__)
        vm = self._vm(instance)
        if vm['power_state'] != host_mod.RUNNING:
            # (nova may still show it ACTIVE: its power-state sync has not
            # run since the guest stopped)
            raise exception.MigrationPreCheckError(
                reason='instance %s is not running on host %s (its xsm VM '
                       'is %s): a live migration moves a running guest; '
                       'start it, or migrate it cold'
                       % (instance.uuid, self._host, vm['power_state']))
        try:
            plan.check_vdi_map([d['vdi'] for d in vm['disks']],
                               self._vdi_map(vm, dest_sr))
            if vm['power_state'] == host_mod.RUNNING:
                free = {s['name']: s['free']
                        for s in self._api.host_info()['srs']}
                vdis = {v['uuid']: v for v in self._api.vdi_list()}
                for disk in vm['disks']:
                    depth, uuid = 0, disk['vdi']
                    while uuid is not None:
                        depth += 1
                        uuid = vdis[uuid]['parent']
                    plan.check_chain_depth(disk['vdi'], depth + 1)
                    plan.check_space(disk['sr'],
                                     CONF.xsm.leaf_headroom_mb * MiB,
                                     free[disk['sr']], host=self._host)
        except xsm_exception.XSMError as exc:
            raise _precheck_error(exc)
        return dest_check_data

    @staticmethod
    def _vdi_map(vm, dest_sr):
        """Every disk of the VM to the destination's SR."""
        return {d['vdi']: dest_sr for d in vm['disks']}

    @staticmethod
    def _vif_map(vm):
        return {v: v for v in vm['vifs']}

    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        """Check once more that this host can receive the instance.

        The receive itself is prepared when the source's
        ``live_migration`` starts the engine: the source agent asks this
        host's agent for it, and the one-time export names and
        certificates stay between the two agents.
        """
        if xsm_migrate_data.dest_sr(migrate_data) is None:
            return migrate_data
        source = self._agent_api(instance.host)
        try:
            vm = self._vm(instance, source)
            disks = self._disks(vm, source)
        except exception.InstanceNotFound:
            raise exception.MigrationError(
                reason='host %s has no xsm VM for instance %s'
                       % (instance.host, instance.uuid))
        spec = self._receive_spec(instance, vm, disks, self._vif_map(vm))
        try:
            rpc_api.RemotePeer(self._api).preflight(spec)
        except xsm_exception.XSMError as exc:
            raise exception.MigrationError(
                reason='host %s cannot receive instance %s: %s'
                       % (self._host, instance.uuid, exc))
        if vm.get('qemu') and self._qemu:
            # the QEMU that receives the guest starts with the kernel
            # and ramdisk it booted (the record's paths, the same
            # [xsm]state_path on every host)
            self._fetch_boot_files(context, instance)
        return migrate_data

    # -- live migration: the run ---------------------------------------------

    def _tracked(self, instance, create=False, wait=0.0):
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                lm = self._migrations.get(instance.uuid)
                if lm is None and create:
                    lm = self._migrations[instance.uuid] = _LiveMigration()
            if lm is not None or time.monotonic() >= deadline:
                return lm
            time.sleep(0.05)

    def live_migration(self, context, instance, dest, post_method,
                       recover_method, block_migration=False,
                       migrate_data=None):
        lm = self._tracked(instance, create=True)
        try:
            self._live_migration(context, instance, dest, post_method,
                                 recover_method, block_migration,
                                 migrate_data, lm)
        finally:
            with self._lock:
                self._migrations.pop(instance.uuid, None)

    def _live_migration(self, context, instance, dest, post_method,
                        recover_method, block_migration, migrate_data, lm):
        def recover(status='failed'):
            recover_method(context, instance, dest, migrate_data,
                           migration_status=status)

        if lm.abort_requested:
            lm.started.set()
            return recover('cancelled')
        try:
            vm = self._vm(instance)
            dest_sr = xsm_migrate_data.dest_sr(migrate_data)
            if dest_sr is None:
                raise exception.MigrationError(
                    reason='no xsm destination SR in the migrate_data (%s)'
                           % type(migrate_data).__name__)
            mid = self._api.migrate_vm(
                vm['uuid'], dest, self._vdi_map(vm, dest_sr),
                self._vif_map(vm),
                bandwidth=decisions.bandwidth(CONF.xsm.bandwidth_limit))
        except Exception as exc:
            LOG.error('xsm live migration to %s could not start: %s', dest,
                      exc, instance=instance)
            lm.started.set()
            return recover()
        lm.mid = mid
        lm.started.set()
        LOG.info('xsm live migration %s to %s started', mid, dest,
                 instance=instance)
        if lm.abort_requested:
            self._abort(lm, instance)
        if lm.force_requested:
            self._api.migration_force_complete(mid)

        status = self._monitor(context, instance, migrate_data, lm)
        result = decisions.outcome(status, lm.abort_requested)
        LOG.info('xsm live migration %s: %s (phase %s, %s bytes copied, '
                 'downtime %s ms%s)', mid, result, status['phase'],
                 status.get('bytes_copied'), status.get('downtime_ms'),
                 ', error: %s' % status['error'] if status.get('error')
                 else '', instance=instance)
        if result == decisions.SUCCEEDED:
            post_method(context, instance, dest, block_migration,
                        migrate_data)
        elif result == decisions.CANCELLED:
            recover('cancelled')
        else:
            recover()

    def _monitor(self, context, instance, migrate_data, lm):
        """Poll the engine until the migration ends; returns its status."""
        started = time.monotonic()
        reported = None
        action_taken = False
        failures = 0
        while True:
            try:
                status = self._api.migration_get(lm.mid)
                failures = 0
            except Exception as exc:
                failures += 1
                LOG.warning('xsm live migration %s: cannot read its status '
                            '(%s)', lm.mid, exc, instance=instance)
                if failures >= 5:
                    raise
                time.sleep(CONF.xsm.progress_interval)
                continue
            snapshot = status.get('progress') or {}
            progress = decisions.progress(snapshot)
            if progress != reported:
                self._save_progress(instance, migrate_data, progress)
                reported = progress
            result = decisions.outcome(status)
            if result == decisions.IN_DOUBT:
                self._report_in_doubt(context, instance, lm, status)
                time.sleep(CONF.xsm.progress_interval)
                continue
            if result != decisions.RUNNING:
                return status
            timeout = decisions.completion_timeout(
                CONF.xsm.completion_timeout, progress[0])
            if decisions.should_trigger_timeout_action(
                    time.monotonic() - started, timeout):
                action = decisions.timeout_action(
                    CONF.xsm.completion_timeout_action, action_taken)
                if action is not None:
                    action_taken = True
                    LOG.warning('xsm live migration %s: not done after %.0f '
                                's (completion timeout): %s', lm.mid,
                                timeout, action, instance=instance)
                    if action == 'abort':
                        self._abort(lm, instance)
                    else:
                        self._api.migration_force_complete(lm.mid)
            time.sleep(CONF.xsm.progress_interval)

    def _report_in_doubt(self, context, instance, lm, status):
        """Say once, loud and clear, that nobody knows where it runs.

        The switch-over's commit was neither confirmed nor refused (see
        doc/source/switch-over.rst): the guest is paused on the source
        and may run on the destination. Nothing is guessed: no rollback,
        no post-migration; the migration stays ``running`` in Nova and
        this watches it until ``xsm-migrate resolve`` settles it.
        """
        if lm.in_doubt_reported:
            return
        lm.in_doubt_reported = True
        dest = status.get('destination')
        # first what to do (an instance fault's message holds 255
        # characters), then why
        short = ('xsm live migration %s is in doubt; settle it with '
                 '"xsm-migrate resolve %s" on host %s' % (lm.mid, lm.mid,
                                                          self._host))
        LOG.error('%s: the commit on host %s was neither confirmed nor '
                  'refused; the guest is paused here and may run on %s. '
                  'Nova keeps the migration running; resolve asks the '
                  'destination and finishes or rolls back by its '
                  'answer%s', short, dest, dest,
                  ' (%s)' % status['error'] if status.get('error') else '',
                  instance=instance)
        try:
            compute_utils.add_instance_fault_from_exc(
                context, instance, exception.MigrationError(reason=short))
        except Exception as exc:
            LOG.warning('could not record the instance fault: %s', exc,
                        instance=instance)

    def _save_progress(self, instance, migrate_data, progress):
        total, done, remaining, percent = progress
        if 'migration' in migrate_data:
            migration = migrate_data.migration
            # nova's API answers null or at least 1 for each
            for name, value in decisions.migration_progress(
                    progress).items():
                setattr(migration, name, value)
            migration.save()
        instance.progress = percent
        instance.save()

    def _abort(self, lm, instance):
        try:
            self._api.migration_abort(lm.mid)
        except mig_errors.InvalidPhase as exc:
            LOG.warning('xsm live migration %s cannot be aborted any more: '
                        '%s', lm.mid, exc, instance=instance)
            return False
        return True

    def live_migration_abort(self, instance):
        lm = self._tracked(instance, wait=_START_WAIT)
        if lm is None:
            LOG.warning('no xsm live migration of this instance to abort',
                        instance=instance)
            return
        lm.abort_requested = True
        lm.started.wait(_START_WAIT)
        if lm.mid is not None:
            self._abort(lm, instance)

    def live_migration_force_complete(self, instance):
        """Lift the bandwidth limit: the copy ends as fast as it can.

        The engine mirrors guest writes synchronously, so there is no
        dirty-page convergence to force: the switch-over follows the copy.
        """
        lm = self._tracked(instance, wait=_START_WAIT)
        if lm is None:
            LOG.warning('no xsm live migration of this instance to '
                        'force-complete', instance=instance)
            return
        lm.force_requested = True
        lm.started.wait(_START_WAIT)
        if lm.mid is not None:
            self._api.migration_force_complete(lm.mid)

    # -- live migration: afterwards ------------------------------------------

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        """The engine's clean-up already removed the VM and its VDIs.

        What is left here: the instance's kernel and ramdisk files.
        """
        if self.instance_exists(instance):
            LOG.warning('the xsm VM is still on the source after its live '
                        'migration (the engine\'s clean-up failed; the '
                        'agent finishes it at its next start)',
                        instance=instance)
            return
        self._remove_boot_files(instance)

    def post_live_migration_at_source(self, context, instance, network_info):
        """Nothing to unplug (see :meth:`unplug_vifs`)."""

    def post_live_migration_at_destination(self, context, instance,
                                           network_info,
                                           block_migration=False,
                                           block_device_info=None):
        vm = self._vm(instance)
        LOG.info('xsm VM %s is %s here with disks %s', vm['uuid'],
                 vm['power_state'],
                 ', '.join('%s:%s' % (d['sr'], d['vdi'])
                           for d in vm['disks']), instance=instance)

    def _engine_migration(self, api, instance, dest_host):
        """The latest engine migration of the instance to ``dest_host``.

        Asked of the source's agent (``api``); None when it lists none
        that did not complete.
        """
        name = decisions.vm_name(instance.uuid)
        found = [m for m in api.migration_list()
                 if m.get('vm_name') == name and
                 m.get('destination') == dest_host and
                 m.get('phase') != 'done']
        if not found:
            return None
        return max(found, key=lambda m: m.get('started') or 0)

    def _roll_back_receive(self, dest_api, mid, dest_host, instance):
        answer = rpc_api.RemotePeer(dest_api).abort(mid)
        if answer == 'committed':
            LOG.error('xsm live migration %s had committed on host %s: the '
                      'instance runs there', mid, dest_host,
                      instance=instance)
        else:
            LOG.info('xsm live migration %s: host %s holds nothing of it '
                     '(%s)', mid, dest_host, answer, instance=instance)
        return answer

    def rollback_live_migration_at_source(self, context, instance,
                                          migrate_data):
        """Make sure the destination holds nothing of a failed migration.

        The engine's abort has already asked it; this asks again (it is
        idempotent).
        """
        dest = None
        if 'migration' in migrate_data:
            dest = migrate_data.migration.dest_compute
        if dest is None:
            return
        try:
            mig = self._engine_migration(self._api, instance, dest)
            if mig is not None and mig['phase'] != plan.IN_DOUBT:
                self._roll_back_receive(self._agent_api(dest), mig['id'],
                                        dest, instance)
        except Exception as exc:
            LOG.error('xsm: host %s could not be asked to roll back: %s '
                      '(its agent rolls back a receive whose lease runs '
                      'out, or at its next start)', dest, exc,
                      instance=instance)

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info,
                                               block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        """Roll back this host's receive of a failed or aborted migration.

        Nova calls it for this driver's migrate_data; its return ends
        the destination's ``live_migration_at_dest`` task. The source's
        agent names the engine's migration; a receive that committed is
        kept (the instance runs here).
        """
        source = instance.host
        try:
            mig = self._engine_migration(self._agent_api(source), instance,
                                         self._host)
            if mig is None:
                LOG.debug('xsm: no migration of this instance from host %s '
                          'to roll back', source, instance=instance)
            elif mig['phase'] == plan.IN_DOUBT:
                LOG.error('xsm live migration %s is in doubt: nothing is '
                          'rolled back here; "xsm-migrate resolve %s" '
                          'settles it', mig['id'], mig['id'],
                          instance=instance)
            else:
                self._roll_back_receive(self._api, mig['id'], self._host,
                                        instance)
            if destroy_disks and (mig is None or
                                  mig['phase'] != plan.IN_DOUBT) and \
                    not self.instance_exists(instance):
                # what pre_live_migration fetched
                self._remove_boot_files(instance)
        except Exception as exc:
            LOG.error('xsm: could not roll back the receive of this '
                      'instance from host %s: %s (this agent rolls back a '
                      'receive whose lease runs out, or at its next start)',
                      source, exc, instance=instance)
