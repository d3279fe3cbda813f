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

"""A host: its storage repositories, its VMs and its migration journal.

A VM here is what the hypervisor keeps of it: a name, its disks (each a
VDI in one of the host's SRs), its network interfaces, a power state and,
while running, the I/O stack of each disk -- ``Counter(Gate(device))`` --
that the migration engine reaches into to mirror, snapshot and switch.

What runs the guest is the host's hypervisor driver
(:mod:`xsm_driver.hypervisor`, ``[hypervisor]driver``). Without one, or
with ``model``, the guest's vCPU is the verifying :mod:`workload`, as
always. With ``qemu``, a running VM is a QEMU process: each disk's stack
is served by an NBD server of this agent on a unix socket in the guest's
folder, and QEMU's virtio-blk disk is that export -- every guest write
passes the gate (and the mirror the engine inserts). An agent that stops
leaves its QEMUs running; built again, the host finds them
(``driver.recover()``), serves their disks again on the same sockets
(QEMU reconnects) and marks them running or paused; a QEMU whose VM it
does not know is killed, never left an orphan.

VM records live in ``<state_path>/vms.json`` (replaced atomically); a VM
that was running when the host stopped is ``halted`` when it comes back.
"""

import errno
import json
import logging
import os
import re
import shutil
import threading
import uuid as uuidlib

from xsm_driver.core.block import device as device_mod
from xsm_driver.core.block import filters
from xsm_driver.core import exception
from xsm_driver.core.migration import journal as journal_mod
from xsm_driver.core.migration import workload as workload_mod
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core import sr as sr_mod
from xsm_driver.core.sr import base as sr_base
from xsm_driver import hypervisor as hv_mod
from xsm_driver.hypervisor import base as hv_base
from xsm_driver.hypervisor import qemu as hv_qemu
from xsm_driver.hypervisor import verifier

LOG = logging.getLogger(__name__)

RUNNING = 'running'
HALTED = 'halted'
PAUSED = 'paused'


class VMNotFound(exception.XSMError):
    msg_fmt = 'host %(host)s has no VM %(vm)s'


class SRNotFound(exception.XSMError):
    msg_fmt = 'host %(host)s has no SR %(sr)s (it has: %(have)s)'


class InvalidVIF(exception.XSMError):
    msg_fmt = 'VIF %(index)s of VM %(vm)s: %(reason)s'


#: a MAC address as a VIF entry carries it (lower case)
_MAC = re.compile(r'[0-9a-f]{2}(:[0-9a-f]{2}){5}')


def vif_entry(vif):
    """The record's form of a VIF: a network name, or ``MAC@NETWORK``.

    A VIF is given as a network name (as always) or as ``{'network': ..,
    'mac': ..}``; the record keeps one string either way, so that every
    agent -- one older than VIFs with MACs among them -- carries, maps
    (``vif_map`` keys are entries) and migrates it as the opaque name it
    always was.

    >>> vif_entry('guest')
    'guest'
    >>> vif_entry({'network': 'vlan-120', 'mac': '02:00:2A:00:00:01'})
    '02:00:2a:00:00:01@vlan-120'

    :raises ValueError: saying what is wrong with a dict.
    """
    if isinstance(vif, str):
        return vif
    if not isinstance(vif, dict):
        raise ValueError('a VIF is a network name or {"network", "mac"}, '
                         'not %.80r' % (vif,))
    unknown = sorted(set(vif) - {'network', 'mac'})
    if unknown:
        raise ValueError('unknown key %.80r (a VIF has network and mac)'
                         % unknown[0])
    network, mac = vif.get('network'), vif.get('mac')
    if not isinstance(network, str) or not network:
        raise ValueError('network must be a network name, not %.80r'
                         % (network,))
    if mac is None:
        return network
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.lower()):
        raise ValueError('mac must be a MAC address such as '
                         '02:00:00:00:00:01, not %.80r' % (mac,))
    return '%s@%s' % (mac.lower(), network)


def vif_parts(entry):
    """``(network, mac or None)`` of a VIF entry of a record.

    >>> vif_parts('02:00:2a:00:00:01@vlan-120')
    ('vlan-120', '02:00:2a:00:00:01')
    >>> vif_parts('guest')
    ('guest', None)
    """
    mac, sep, network = str(entry).partition('@')
    if sep and network and _MAC.fullmatch(mac):
        return network, mac
    return entry, None


class InvalidVMState(exception.XSMError):
    msg_fmt = 'VM %(vm)s on host %(host)s is %(state)s; %(action)s needs it ' \
              '%(needed)s'


class VMStopping(InvalidVMState):
    msg_fmt = 'VM %(vm)s on host %(host)s is stopping (a clean stop waits ' \
              'up to %(timeout)s s for its guest to power off); %(action)s ' \
              'needs it halted: try again once the stop has ended'


class Held(device_mod.BlockDevice):
    """What a paused gate holds until the disk it stands for exists.

    An incoming guest's disk (see :meth:`Host.prepare_incoming`): its size
    is known, its contents are not yet; nothing may read or write it (the
    gate stays paused until :meth:`Gate.resume` puts the composed VDI in
    its place). It announces what a VHD or raw VDI offers, so that the
    NBD export negotiated now stays true afterwards.
    """

    can_write = can_flush = can_fua = can_extents = True

    def __init__(self, size, name='held'):
        self._size = size
        self.name = name

    @property
    def size(self):
        return self._size

    def _refuse(self, *args, **kwargs):
        raise device_mod.BlockError(device=self.name, errno=errno.EIO,
                                    reason='the disk is not here yet')

    pread = read_into = pwrite = flush = extents = _refuse


class Disk:
    """One disk of a VM: which VDI, and its I/O stack while running."""

    def __init__(self, name, vdi, sr):
        self.name, self.vdi, self.sr = name, vdi, sr
        self.gate = None
        self.counter = None
        #: the unix-socket NBD server of a QEMU guest's disk
        self.server = None

    def to_dict(self):
        return {'name': self.name, 'vdi': self.vdi, 'sr': self.sr}

    def attach(self, sr, device=None):
        """Open the disk's I/O stack over its VDI.

        :param device: the VDI, attached for writing already (a
            migration's composed leaf); else it is attached now.
        """
        if device is None:
            device = sr.attach(self.vdi, writable=True)
        self.gate = filters.Gate(device)
        self.counter = filters.Counter(self.gate)

    def serve(self, path):
        """Serve the attached stack to a local QEMU on unix socket ``path``.

        :returns: the :class:`xsm_driver.hypervisor.base.DiskSpec`.
        """
        if self.server is None:
            self.server = nbd_server.Server({self.name: self.counter},
                                            path=path).start()
        return hv_base.DiskSpec(self.vdi, socket=path, export=self.name,
                                size=self.counter.size)

    def detach(self):
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.counter is not None:
            self.counter.close()
        self.gate = self.counter = None


class VM:
    """A VM record.

    :param qemu: what a QEMU guest needs besides its disks (``qemu``
        hypervisor driver): ``{'memory_mib': .., 'vcpus': ..,
        'verifier': {..}, 'kernel': .., 'initrd': .., 'cmdline': ..,
        'firmware': ..}``, each optional; kept in the record and sent
        with a migration (``firmware``: set at the first cold boot).
    """

    def __init__(self, uuid, name, disks, vifs=(), power_state=HALTED,
                 qemu=None):
        self.uuid, self.name = uuid, name
        self.disks = [Disk(**d) for d in disks]
        self.vifs = list(vifs)
        self.power_state = power_state
        self.qemu = dict(qemu) if qemu else None
        self.workload = None
        #: the guest runs as a QEMU process (the qemu driver's guest)
        self.in_qemu = False
        #: a clean stop that waits for the guest to power off, or None
        self.stopping = None
        self.lock = threading.RLock()

    def to_dict(self):
        out = {'uuid': self.uuid, 'name': self.name,
               'disks': [d.to_dict() for d in self.disks],
               'vifs': self.vifs, 'power_state': self.power_state}
        if self.qemu:
            out['qemu'] = dict(self.qemu)
        if self.workload is not None:
            out['guest'] = self.workload.counters()
        return out

    @property
    def devices(self):
        return [d.counter for d in self.disks]


class Host:
    """What one agent manages.

    :param name: the host name (the agent's RPC server name).
    :param srs: mapping of SR name to an :class:`xsm_driver.core.sr.base.SR`.
    :param state_path: directory for the journal, VM records and
        per-migration credentials.
    :param hypervisor: a hypervisor driver (:mod:`xsm_driver.hypervisor`)
        that runs the guests; None or a ``model`` driver: the verifying
        workload thread plays each guest, as it always did.
    """

    def __init__(self, name, srs, state_path, hypervisor=None):
        self.name = name
        self.srs = dict(srs)
        self.state_path = state_path
        os.makedirs(state_path, mode=0o700, exist_ok=True)
        self.journal = journal_mod.Journal(os.path.join(state_path,
                                                        'journal.sqlite'))
        self._vms_file = os.path.join(state_path, 'vms.json')
        self._lock = threading.RLock()
        self.hypervisor = hypervisor
        #: incoming QEMU guests: VM uuid -> their Disks (held gates)
        self._incoming = {}
        #: close() has begun: an incoming QEMU that ends its start now is
        #: dropped at once
        self._closing = False
        try:
            self.vms = self._load_vms()
            if self.qemu is not None:
                self._recover_guests()
        except BaseException:
            self.journal.close()
            raise

    @classmethod
    def from_config(cls, name, sr_specs, state_path, conf=None):
        """Build a host from ``NAME:DRIVER:PATH`` SR specifications.

        :param conf: with a ``[hypervisor]`` group: its driver runs the
            guests (``model``, the default, keeps today's workload).
        """
        srs = {}
        for spec in sr_specs:
            sr_name, driver, path = parse_sr_spec(spec)
            srs[sr_name] = sr_mod.load_driver(driver, sr_name, path)
        hypervisor = None
        if conf is not None and uses_qemu(conf.hypervisor.driver):
            hypervisor = hv_mod.from_config(
                conf, os.path.join(state_path, 'guests'))
        return cls(name, srs, state_path, hypervisor)

    @property
    def qemu(self):
        """The qemu hypervisor driver, or None (the workload plays)."""
        if self.hypervisor is not None and uses_qemu(self.hypervisor.name):
            return self.hypervisor
        return None

    def _disk_socket(self, vm_uuid, disk_name):
        path = os.path.join(self.qemu.paths(vm_uuid).folder,
                            'nbd-%s.sock' % disk_name)
        if len(os.fsencode(path)) > hv_qemu.MAX_SOCKET_PATH:
            raise hv_qemu.QemuError(
                'socket path %s of VM %s is longer than %d bytes, the most a '
                'unix socket address holds: give host %s a shorter state '
                'path' % (path, vm_uuid, hv_qemu.MAX_SOCKET_PATH, self.name))
        return path

    def close(self):
        """Release what the host holds: the agent is stopping.

        Each running VM's guest is stopped and its disks detached (their
        files closed), and the journal is closed. The VM records are left
        as they are: a VM running now is ``halted`` when the host is built
        again, as after a crash. Calling it again does nothing.
        """
        with self._lock:
            self._closing = True
            vms = list(self.vms.values())
            incoming = list(self._incoming)
        for uuid in incoming:
            # not committed: a restarted agent rolls its receive back
            self.discard_incoming(uuid)
        for vm in vms:
            with vm.lock:
                # a QEMU guest keeps running: the next agent finds it
                if vm.workload is not None:
                    try:
                        vm.workload.stop()
                    except Exception:
                        LOG.exception('host %s: stopping the guest of VM '
                                      '%s failed', self.name, vm.uuid)
                for disk in vm.disks:
                    try:
                        disk.detach()
                    except Exception:
                        LOG.exception('host %s: detaching disk %s of VM %s '
                                      'failed', self.name, disk.name,
                                      vm.uuid)
        if self.hypervisor is not None:
            self.hypervisor.close()
        self.journal.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- records -----------------------------------------------------------

    def _load_vms(self):
        try:
            with open(self._vms_file) as f:
                records = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise exception.XSMError('%s is not valid JSON: %s'
                                     % (self._vms_file, exc))
        vms = {}
        for rec in records:
            if rec.get('power_state') != HALTED:
                LOG.warning('VM %s (%s) was %s when host %s stopped; it is '
                            'halted now', rec['uuid'], rec['name'],
                            rec.get('power_state'), self.name)
            rec['power_state'] = HALTED
            vms[rec['uuid']] = VM(**rec)
        return vms

    def save(self):
        with self._lock:
            records = [{k: v for k, v in vm.to_dict().items()
                        if k != 'guest'} for vm in self.vms.values()]
            tmp = self._vms_file + '.tmp'
            with open(tmp, 'w') as f:
                json.dump(records, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._vms_file)

    # -- lookups -----------------------------------------------------------

    def sr(self, name):
        try:
            return self.srs[name]
        except KeyError:
            raise SRNotFound(host=self.name, sr=name,
                             have=', '.join(sorted(self.srs)) or 'none')

    def vm(self, ref):
        """A VM by uuid or by name."""
        with self._lock:
            if ref in self.vms:
                return self.vms[ref]
            named = [vm for vm in self.vms.values() if vm.name == ref]
        if len(named) == 1:
            return named[0]
        raise VMNotFound(host=self.name, vm=ref)

    def find_vdi(self, vdi):
        """The SR holding VDI ``vdi``."""
        for sr in self.srs.values():
            try:
                sr.get(vdi)
                return sr
            except sr_base.VDINotFound:
                continue
        raise sr_base.VDINotFound(
            'host %s: VDI %s is in none of its SRs (%s)'
            % (self.name, vdi, ', '.join(sorted(self.srs)) or 'it has none'),
            sr=None, uuid=vdi)

    # -- VM life cycle -----------------------------------------------------

    def create_vm(self, name, disks, vifs=(), qemu=None):
        """Create a halted VM with new, empty disks.

        :param disks: list of ``{'sr': name, 'size': bytes}``, one per disk.
        :param vifs: each a network name or ``{'network', 'mac'}`` (kept
            as :func:`vif_entry` makes it).
        :param qemu: the options of its QEMU guest (see :class:`VM`),
            checked here (``InvalidGuestOptions`` names a wrong one).
        """
        qemu = hv_base.guest_options(qemu)
        entries = []
        for i, vif in enumerate(vifs):
            try:
                entries.append(vif_entry(vif))
            except ValueError as exc:
                raise InvalidVIF(index=i, vm=name, reason=exc)
        vm_uuid = str(uuidlib.uuid4())
        made = []
        try:
            for i, spec in enumerate(disks):
                sr = self.sr(spec['sr'])
                vdi = sr.create(int(spec['size']), name='%s disk %d'
                                % (name, i), vm=vm_uuid)
                made.append({'name': 'xvd' + chr(ord('a') + i),
                             'vdi': vdi.uuid, 'sr': sr.name})
        except Exception:
            for d in made:
                self.srs[d['sr']].destroy(d['vdi'])
            raise
        vm = VM(vm_uuid, name, made, entries, qemu=qemu)
        with self._lock:
            self.vms[vm_uuid] = vm
        self.save()
        return vm

    def adopt_vm(self, record, power_state, save=True):
        """Register a VM whose disks already are in this host's SRs.

        :param save: False: the caller saves the records itself soon
            (:meth:`take_incoming` does).
        """
        vm = VM(record['uuid'], record['name'], record['disks'],
                record.get('vifs', ()), power_state, record.get('qemu'))
        with self._lock:
            self.vms[vm.uuid] = vm
        if save:
            self.save()
        return vm

    def start_vm(self, ref, workload=None, paused=False, save=True,
                 staged=None, devices=None):
        """Attach the disks and run; ``workload`` is a guest state.

        With the qemu driver: each disk's stack is served on a unix
        socket and a QEMU boots on them (``paused``: its vCPUs stopped).

        :param save: False: the caller saves the VM records (:meth:`save`)
            itself, later.
        :param staged: the guest's models, decoded ahead (see
            :func:`workload.stage`), when ``workload`` left them out.
        :param devices: VDI uuid -> its device, attached for writing
            already; a disk takes (pops) its own instead of attaching it.
        """
        vm = self.vm(ref)
        with vm.lock:
            if vm.stopping is not None:
                raise VMStopping(vm=vm.uuid, host=self.name,
                                 timeout=vm.stopping.timeout,
                                 action='starting it')
            if vm.power_state == RUNNING:
                return vm
            attached = []
            try:
                for disk in vm.disks:
                    disk.attach(self.sr(disk.sr), (devices or {}).pop(
                        disk.vdi, None))
                    attached.append(disk)
                if self.qemu is not None:
                    vm.qemu = cold_boot_options(vm.qemu)
                    self.qemu.start(self._guest_spec(vm), paused=paused)
                    vm.in_qemu = True
            except Exception:
                for disk in attached:
                    disk.detach()
                raise
            vm.power_state = PAUSED if vm.in_qemu and paused else RUNNING
            if workload is not None and not vm.in_qemu:
                vm.workload = workload_mod.Workload.from_state(
                    vm.devices, workload, staged).start()
        if save:
            self.save()
        return vm

    def _guest_spec(self, vm):
        """The GuestSpec of a QEMU guest, its disks' exports started."""
        folder = self.qemu.paths(vm.uuid).folder
        os.makedirs(folder, mode=0o700, exist_ok=True)
        disks = [d.serve(self._disk_socket(vm.uuid, d.name))
                 for d in vm.disks]
        return guest_spec(vm.uuid, disks, vm.qemu)

    def stop_vm(self, ref, clean=False, timeout=None):
        """Stop the guest and detach the disks.

        :param clean: a QEMU guest is asked to power off (ACPI) first and
            killed only when it has not powered off within ``timeout``
            seconds (None: the driver's ``[hypervisor]shutdown_timeout``);
            otherwise its process is killed at once.
        :returns: the VM. Its ``stopped_clean`` says how this stop went:
            False when a QEMU process was killed (not asked to power off,
            or it did not in time), True when nothing was (the guest
            powered itself off, or no QEMU ran).

        A clean stop holds no lock while it waits for the guest: the VM's
        power state, QMP commands and the other VMs answer meanwhile (the
        guest is running, or paused, until its QEMU ends; then halted),
        and :meth:`start_vm` is refused (:class:`VMStopping`). A second
        stop of the VM meanwhile joins the first: a hard one kills the
        QEMU at once, a clean one when the first has not ended within its
        own ``timeout``; it answers once the first has ended.
        """
        vm = self.vm(ref)
        owner = False
        with vm.lock:
            pending = vm.stopping
            if pending is None:
                if vm.workload is not None:
                    vm.workload.stop()
                if vm.in_qemu:
                    # First let go of what waits at a held gate (the
                    # switch-over committed elsewhere): a QEMU that waits
                    # for its last I/O ignores SIGTERM and dies only by
                    # SIGKILL, seconds later.
                    for disk in vm.disks:
                        release_held(disk.gate)
                    if clean and self._request_power_off(vm):
                        if timeout is None:
                            timeout = self.qemu.shutdown_timeout
                        pending = vm.stopping = _Stopping(timeout)
                        owner = True
                if pending is None:
                    # a hard stop, or nothing to wait for
                    stopped_clean = True
                    if vm.in_qemu:
                        stopped_clean = self._stop_qemu(vm, clean)
                    self._halt(vm, stopped_clean)
        if pending is None:
            self.save()
            return vm
        if owner:
            return self._wait_power_off(vm, pending)
        return self._join_stop(vm, pending, clean, timeout)

    def _request_power_off(self, vm):
        """Press the ACPI button (VM locked); False: its QEMU is gone."""
        try:
            return self.qemu.request_power_off(vm.uuid)
        except hv_base.GuestNotFound:
            return False

    def _wait_power_off(self, vm, pending):
        """A clean stop's wait, no lock held, and its end (VM locked)."""
        try:
            gone = self.qemu.wait_power_off(vm.uuid, pending.timeout)
            with vm.lock:
                stopped_clean = True
                if vm.in_qemu:
                    stopped_clean = self._stop_qemu(
                        vm, True, None if gone else pending.timeout)
                # (a hard stop that joined killed it)
                stopped_clean = stopped_clean and not pending.killed
                if stopped_clean:
                    LOG.info('host %s: VM %s powered off (ACPI)', self.name,
                             vm.uuid)
                self._halt(vm, stopped_clean)
        finally:
            with vm.lock:
                vm.stopping = None
            pending.done.set()
        self.save()
        return vm

    def _join_stop(self, vm, pending, clean, timeout):
        """Another stop of ``vm`` waits for its guest: end with it."""
        LOG.info('host %s: VM %s is stopping already; this %s stop joins '
                 'that one', self.name, vm.uuid,
                 'clean' if clean else 'hard')
        if clean:
            wait = self.qemu.shutdown_timeout if timeout is None else timeout
            if pending.done.wait(wait):
                return self._joined(vm)
        with vm.lock:
            if vm.stopping is pending and vm.in_qemu:
                try:
                    if not self.qemu.end_power_off(vm.uuid):
                        pending.killed = True
                except hv_base.GuestNotFound:
                    pass
        pending.done.wait()
        return self._joined(vm)

    def _joined(self, vm):
        with vm.lock:
            if vm.power_state != HALTED:
                raise exception.XSMError(
                    'VM %s on host %s: the stop this one joined failed; '
                    'the VM is %s' % (vm.uuid, self.name, vm.power_state))
            return vm

    def _halt(self, vm, stopped_clean):
        """The guest is gone (VM locked): detach the disks, halted."""
        for disk in vm.disks:
            disk.detach()
        vm.power_state = HALTED
        vm.stopped_clean = stopped_clean

    def _stop_qemu(self, vm, clean=False, timeout=None):
        """End the VM's QEMU; True when it powered off by itself.

        :param clean: its power-off wait is over (or it is gone): killed
            when it still runs (``timeout``: that wait's, for the log);
            False: killed at once.
        """
        powered_off = True
        try:
            if clean:
                powered_off = self.qemu.end_power_off(vm.uuid, timeout)
            else:
                self.qemu.destroy(vm.uuid)
                powered_off = False
        except hv_base.GuestNotFound:
            pass
        self.qemu.forget(vm.uuid)
        vm.in_qemu = False
        return powered_off

    def vm_power_state(self, ref):
        """The VM's power state, from its QEMU when it runs in one.

        A QEMU that is gone (the guest powered itself off, or its process
        died) leaves the VM halted, its disks detached.
        """
        vm = self.vm(ref)
        with vm.lock:
            if vm.in_qemu:
                try:
                    state = self.qemu.power_state(vm.uuid)
                except hv_base.GuestNotFound:
                    state = HALTED
                if state == HALTED:
                    if vm.stopping is not None:
                        return HALTED      # the stop under way ends it
                    if self._migrating_from_here(vm.uuid):
                        return HALTED      # the migration rolls it back
                    LOG.warning('the QEMU of VM %s on host %s is gone: the '
                                'VM is halted', vm.uuid, self.name)
                    self.stop_vm(vm.uuid)
                elif state == hv_base.CRASHED:
                    return state            # (until it is stopped)
                elif state in (RUNNING, PAUSED) and state != vm.power_state:
                    vm.power_state = state
            return vm.power_state

    def _migrating_from_here(self, vm_uuid):
        return any(e.role == 'source' and e.state.get('vm') == vm_uuid
                   for e in self.journal.unfinished())

    def reboot_vm(self, ref):
        """Reset a running QEMU guest (as its reset button)."""
        vm = self._qemu_vm(ref, 'rebooting')
        self.qemu.reboot(vm.uuid)
        return vm

    def console_output(self, ref, limit=1 << 20):
        """The last ``limit`` bytes of a QEMU guest's serial console."""
        vm = self.vm(ref)
        if self.qemu is None:
            raise InvalidVMState(vm=vm.uuid, host=self.name,
                                 state='without a console',
                                 action='reading its console',
                                 needed='a QEMU guest')
        return self.qemu.console_output(vm.uuid, limit)

    def _qemu_vm(self, ref, action):
        vm = self.vm(ref)
        if not vm.in_qemu or self.vm_power_state(vm.uuid) not in (RUNNING,
                                                                  PAUSED):
            raise InvalidVMState(vm=vm.uuid, host=self.name,
                                 state=vm.power_state, action=action,
                                 needed='running in QEMU')
        return vm

    def pause_vm(self, ref):
        vm = self.vm(ref)
        with vm.lock:
            if vm.in_qemu:
                self.qemu.pause(vm.uuid)
            elif vm.workload is not None:
                vm.workload.suspend()
            vm.power_state = PAUSED
        self.save()
        return vm

    def resume_vm(self, ref):
        vm = self.vm(ref)
        with vm.lock:
            if vm.in_qemu:
                self.qemu.resume(vm.uuid)
            elif vm.workload is not None:
                vm.workload.resume()
            vm.power_state = RUNNING
        self.save()
        return vm

    def _recover_guests(self):
        """Find the QEMUs that kept running while no agent ran.

        A VM whose QEMU runs gets its disks served again on the same
        sockets (QEMU reconnects, its I/O waited meanwhile); a QEMU of no
        VM of this host (a migration's incoming guest, say) is killed, and
        so is the QEMU of a VM an unfinished migration moves from here:
        that VM comes back halted, as every VM of a restarted host did,
        for the journal's recovery (doc/source/switch-over.rst) to roll
        back or finish under no running guest.
        """
        found = self.qemu.recover()
        for name, state in sorted(found.items()):
            vm = self.vms.get(name)
            if state not in (RUNNING, PAUSED):
                self.qemu.forget(name)
                if vm is None:
                    self._remove_orphan_folder(name)
                continue
            action = readopt_action(name in self.vms,
                                    self._migrating_from_here(name))
            if action != READOPT:
                LOG.warning('host %s: QEMU of guest %s %s: killing it',
                            self.name, name,
                            'belongs to no VM here (an unfinished incoming '
                            'migration?)' if action == KILL_ORPHAN else
                            'is the guest of an unfinished migration from '
                            'here; the VM is halted')
                self.qemu.destroy(name)
                self.qemu.forget(name)
                if action == KILL_ORPHAN:
                    self._remove_orphan_folder(name)
                continue
            try:
                for disk in vm.disks:
                    disk.attach(self.sr(disk.sr))
                    disk.serve(self._disk_socket(vm.uuid, disk.name))
            except Exception:
                LOG.exception('host %s: cannot serve the disks of VM %s '
                              'again: killing its QEMU', self.name, name)
                for disk in vm.disks:
                    disk.detach()
                self.qemu.destroy(name)
                self.qemu.forget(name)
                continue
            vm.in_qemu = True
            vm.power_state = state
            LOG.info('host %s: VM %s (%s) runs on in its QEMU (%s)',
                     self.name, vm.uuid, vm.name, state)
        self.save()

    def _remove_orphan_folder(self, name):
        """Remove the folder of a guest of no VM of this host.

        An incoming guest's folder (an unfinished migration to here) holds
        its console, its spec and the migration's TLS credentials, its
        server key included: nothing of this host uses them any more.
        """
        LOG.warning('host %s: removing the folder of guest %s, of no VM '
                    'here', self.name, name)
        shutil.rmtree(self.qemu.paths(name).folder, ignore_errors=True)

    # -- an incoming QEMU guest (live migration, destination side) --------

    def prepare_incoming(self, record, sizes, address, tls=None):
        """Start the QEMU that receives a migrating guest, paused.

        Its disks are exports on unix sockets of gates that stay paused
        on a :class:`Held` device until :meth:`take_incoming` puts each
        composed VDI there: no guest write reaches this host's disks
        before the migration's commit.

        :param record: the VM record (uuid, disks by name, ``qemu``).
        :param sizes: disk name -> virtual size.
        :param address: where QEMU listens for the guest's state.
        :param tls: the migration's server credentials for QEMU's stream
            (see :meth:`QemuDriver.listen_incoming`); None: plain TCP.
        :returns: ``{'host': .., 'port': ..}`` for the source's QEMU.
        """
        uuid = record['uuid']
        if uuid in self.vms:
            raise exception.XSMError('host %s already has VM %s'
                                     % (self.name, uuid))
        folder = self.qemu.paths(uuid).folder
        os.makedirs(folder, mode=0o700, exist_ok=True)
        disks = []
        try:
            for d in record['disks']:
                disk = Disk(d['name'], d['vdi'], None)
                disk.gate = filters.Gate(Held(sizes[d['name']], d['name']))
                disk.gate.pause()
                disk.counter = filters.Counter(disk.gate)
                disks.append(disk)
            specs = [d.serve(self._disk_socket(uuid, d.name))
                     for d in disks]
            self.qemu.start(guest_spec(uuid, specs, record.get('qemu')),
                            paused=True, incoming=True)
            port = self.qemu.listen_incoming(uuid, address, tls=tls)
        except BaseException:
            self._drop_incoming(uuid, disks)
            raise
        with self._lock:
            closing = self._closing
            if not closing:
                self._incoming[uuid] = disks
        if closing:
            # (close() ran while this QEMU started: nothing else drops it)
            self._drop_incoming(uuid, disks)
            raise exception.XSMError('host %s is stopping: VM %s cannot '
                                     'move here now' % (self.name, uuid))
        return {'host': address, 'port': port}

    def _drop_incoming(self, uuid, disks):
        try:
            self.qemu.destroy(uuid)
        except hv_base.GuestNotFound:
            pass
        self.qemu.forget(uuid)
        for disk in disks:
            if disk.gate is not None and disk.gate.paused:
                disk.gate.resume()
            disk.detach()
        shutil.rmtree(self.qemu.paths(uuid).folder, ignore_errors=True)

    def discard_incoming(self, uuid):
        """Kill an incoming guest and remove what it had; idempotent."""
        with self._lock:
            disks = self._incoming.pop(uuid, None)
        if disks is None:
            if self.qemu is not None and uuid not in self.vms:
                self._drop_incoming(uuid, [])
            return
        self._drop_incoming(uuid, disks)

    def take_incoming(self, uuid, save=True, devices=None):
        """The migration committed: the incoming guest is VM ``uuid``'s.

        Each gate resumes on the VM's composed VDI; the guest stays
        paused until its QEMU has the whole state (:meth:`resume_incoming`).

        :param save: False: the caller saves the VM records itself, later.
        :param devices: VDI uuid -> its device, open for writing (the
            compose's kept leaf: no image is opened here); the gates take
            (and pop) those they use, and attach the others.
        """
        with self._lock:
            disks = self._incoming.pop(uuid, None)
        if disks is None:
            return False
        vm = self.vm(uuid)
        devices = {} if devices is None else devices
        with vm.lock:
            by_name = {d.name: d for d in disks}
            for disk in vm.disks:
                held = by_name[disk.name]
                device = devices.pop(disk.vdi, None)
                if device is None:
                    device = self.sr(disk.sr).attach(disk.vdi,
                                                     writable=True)
                held.gate.resume(device)
                disk.gate, disk.counter = held.gate, held.counter
                disk.server = held.server
            vm.in_qemu = True
            vm.power_state = PAUSED
        if save:
            self.save()
        return True

    def resume_incoming(self, uuid, timeout=120.0):
        """Run the migrated guest once its QEMU has all of its state.

        :returns: True when it runs; False when QEMU's migration failed
            (the guest is then killed: the VM is halted here, its disks
            are the committed ones).
        """
        vm = self.vm(uuid)
        try:
            info = self.qemu.wait_incoming(uuid, timeout)
        except Exception as exc:
            LOG.error('host %s: the migrated guest of VM %s did not get '
                      'its state (%s); it is halted', self.name, uuid, exc)
            self.stop_vm(uuid)
            return False
        finally:
            self.qemu.drop_tls(uuid)
        with vm.lock:
            self.qemu.resume(uuid)
            vm.power_state = RUNNING
        self.save()
        LOG.info('host %s: VM %s runs here (%s)', self.name, uuid, info)
        return True

    def forget_vm(self, ref):
        """Drop the VM record (its disks stay).

        A QEMU guest's folder goes too (console log, sockets, keys).
        """
        vm = self.vm(ref)
        with self._lock:
            self.vms.pop(vm.uuid, None)
        self.save()
        if self.qemu is not None and not vm.in_qemu:
            shutil.rmtree(self.qemu.paths(vm.uuid).folder,
                          ignore_errors=True)

    def destroy_vm(self, ref):
        """Stop the VM, destroy its disks and their chains, forget it."""
        vm = self.stop_vm(ref)
        for disk in vm.disks:
            destroy_chain(self.sr(disk.sr), disk.vdi)
        self.forget_vm(vm.uuid)

    def snapshot_vm(self, ref, pause_timeout=10.0):
        """Snapshot every disk, live: each VDI's chain grows by one.

        :returns: the uuids of the new read-only bases.
        """
        vm = self.vm(ref)
        bases = []
        with vm.lock:
            raw = [d.name for d in vm.disks if self.sr(d.sr).type == 'raw']
            if raw:
                raise exception.XSMError(
                    'VM %s: disk %s is in a raw SR, which has no snapshots; '
                    'nothing was snapshotted' % (vm.uuid, ', '.join(raw)))
            for disk in vm.disks:
                sr = self.sr(disk.sr)
                if disk.gate is None:
                    bases.append(sr.snapshot(disk.vdi).uuid)
                    continue
                with disk.gate.paused_io(pause_timeout):
                    disk.gate.next.flush()
                    bases.append(sr.snapshot(disk.vdi).uuid)
                    disk.gate.resume(sr.attach(disk.vdi,
                                               writable=True)).close()
        return bases

    # -- the guest (a verifying workload stands in for the VM's vCPUs) ----

    def guest_start(self, ref, rate=None, read_ratio=1.0, fill=0.0):
        """Start the verifying guest; ``fill`` pre-writes that fraction.

        A QEMU guest's verifier runs from its boot: it writes on (at
        ``rate`` blocks per second per disk when given); ``read_ratio``
        and ``fill`` are the model guest's only.
        """
        vm = self.vm(ref)
        if vm.in_qemu:
            return self._qemu_guest_start(vm, rate, read_ratio, fill)
        with vm.lock:
            if vm.power_state != RUNNING:
                raise InvalidVMState(vm=vm.uuid, host=self.name,
                                     state=vm.power_state,
                                     action='starting its guest',
                                     needed=RUNNING)
            if vm.workload is not None and vm.workload.running:
                return vm
            if vm.workload is not None:     # it goes on where it stopped
                models = vm.workload.models
            else:
                models = []
                for i, dev in enumerate(vm.devices):
                    model = workload_mod.DiskModel(i, dev.size //
                                                   workload_mod.BLOCK)
                    if fill:
                        workload_mod.fill(dev, model, fill)
                    models.append(model)
            vm.workload = workload_mod.Workload(
                vm.devices, models, rate=rate, read_ratio=read_ratio).start()
        return vm

    def _qemu_guest_start(self, vm, rate, read_ratio, fill):
        if fill or read_ratio != 1.0:
            raise InvalidVMState(vm=vm.uuid, host=self.name,
                                 state='running a QEMU guest',
                                 action='starting a guest with fill or '
                                 'read_ratio', needed='a model guest')
        self._qemu_vm(vm.uuid, 'starting its guest')
        if rate is not None:
            self.qemu.guest_request(vm.uuid, 'rate %d' % rate, 'progress')
        self.qemu.guest_request(vm.uuid, verifier.START, 'progress')
        return vm

    def _qemu_guest_verify(self, vm):
        """The in-guest verifier stops writing and checks every disk.

        ``verified``: the check found every block as the guest wrote it
        and the guest saw no mismatch nor I/O error since it booted.
        """
        self._qemu_vm(vm.uuid, 'verifying its guest')
        size = sum(d.counter.size for d in vm.disks if d.counter)
        self.qemu.guest_request(vm.uuid, verifier.STOP, 'progress')
        check = self.qemu.guest_request(vm.uuid, verifier.VERIFY, 'verify',
                                        timeout=60.0 + size / (4 << 20))
        status = self.qemu.guest_request(vm.uuid, verifier.STATUS,
                                         'progress')
        ok = (verifier.verified(check) and status['mismatches'] == 0 and
              status['io_errors'] == 0)
        return {'kind': 'qemu', 'verified': ok,
                'writes': status['writes'], 'reads': status['reads'],
                'mismatches': status['mismatches'],
                'io_errors': status['io_errors'],
                'blocks_checked': check.get('checked', 0),
                'bytes_verified': check.get('checked', 0) * 4096,
                'max_stall_ms': status.get('max_stall_ms'),
                'max_wall_stall_ms': status.get('max_wall_stall_ms'),
                'error': None if ok else check.line}

    def guest_verify(self, ref):
        """Stop the guest and check every disk against what it wrote."""
        vm = self.vm(ref)
        if vm.in_qemu:
            return self._qemu_guest_verify(vm)
        with vm.lock:
            if vm.workload is None:
                raise InvalidVMState(vm=vm.uuid, host=self.name,
                                     state='without a guest',
                                     action='verifying', needed='running '
                                     'a guest')
            vm.workload.stop()
            result = dict(vm.workload.counters(), verified=False,
                          bytes_verified=0)
            if vm.workload.error is not None:
                return result
            try:
                for dev, model in zip(vm.devices, vm.workload.models):
                    result['bytes_verified'] += workload_mod.verify(dev,
                                                                    model)
            except Exception as exc:
                result['error'] = str(exc)
                return result
            result['verified'] = True
            return result


class _Stopping:
    """A clean stop of a VM that waits for its guest (``VM.stopping``)."""

    def __init__(self, timeout):
        #: seconds the guest has to power off
        self.timeout = timeout
        #: set once the stop has ended (or failed)
        self.done = threading.Event()
        #: a hard stop that joined killed the QEMU
        self.killed = False


def release_held(gate):
    """Let a paused gate's held requests fail (EIO): their guest is gone.

    A QEMU killed while its disks' gates were paused (its migration
    committed elsewhere) may have left a request waiting there (QEMU's
    last flush); nothing may reach the disk any more.
    """
    if gate is not None and gate.paused:
        gate.resume(Held(gate.size, gate.name)).close()


# readopt_action(): what a restarted host does with a QEMU it finds
READOPT = 'readopt'
KILL_ORPHAN = 'kill-orphan'
KILL_MIGRATING = 'kill-migrating'


def readopt_action(known_vm, migrating):
    """What a restarted host does with a running QEMU it found.

    :param known_vm: the QEMU's guest is a VM of this host.
    :param migrating: an unfinished migration (source side, in the
        journal) moves that VM.

    >>> readopt_action(True, False), readopt_action(False, False)
    ('readopt', 'kill-orphan')
    >>> readopt_action(True, True)
    'kill-migrating'
    """
    if not known_vm:
        return KILL_ORPHAN
    return KILL_MIGRATING if migrating else READOPT


def uses_qemu(driver_name):
    """Whether hypervisor driver ``driver_name`` runs QEMU guests."""
    return driver_name == 'qemu'


def guest_spec(uuid, disks, qemu=None):
    """A QEMU guest's :class:`GuestSpec` from a VM record's ``qemu``."""
    qemu = dict(qemu or {})
    return hv_base.GuestSpec(
        uuid, disks, memory_mib=qemu.get('memory_mib'),
        vcpus=qemu.get('vcpus', 1), verifier=qemu.get('verifier'),
        kernel=qemu.get('kernel'), initrd=qemu.get('initrd'),
        cmdline=qemu.get('cmdline', ''),
        firmware=qemu.get('firmware', hv_base.LEGACY_FIRMWARE))


def cold_boot_options(qemu):
    """A VM record's ``qemu`` options for a boot from cold.

    A record without a firmware gets the default one: the firmware can
    change at a cold boot only (a live migration's destination runs the
    source's, whose state it receives; a record without one is of a guest
    that runs the legacy firmware, see :func:`guest_spec`).
    """
    return dict(qemu or {}, firmware=(qemu or {}).get(
        'firmware', hv_base.DEFAULT_FIRMWARE))


def parse_sr_spec(spec):
    """``NAME:DRIVER:PATH`` -> (name, driver, path)."""
    parts = spec.split(':', 2)
    if len(parts) != 3 or not all(parts):
        raise exception.XSMError('SR specification %r is not NAME:DRIVER:'
                                 'PATH (for example local:vhd:/var/lib/'
                                 'xsm-driver/sr)' % spec)
    return tuple(parts)


def destroy_chain(sr, vdi):
    """Destroy a VDI and every ancestor no other VDI still needs."""
    chain = sr.chain(vdi)
    for record in chain:
        if record.uuid != vdi and not record.hidden:
            break                       # a VDI someone can see: keep it
        try:
            sr.destroy(record.uuid)
        except sr_base.VDIInUse:
            break                       # another child still uses it
