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
The guest's vCPU is the verifying :mod:`workload`.

VM records live in ``<state_path>/vms.json`` (replaced atomically); a VM
that was running when the host stopped is ``halted`` when it comes back.
"""

import json
import logging
import os
import threading
import uuid as uuidlib

from xsm_driver.core.block import filters
from xsm_driver.core import exception
from xsm_driver.core.migration import journal as journal_mod
from xsm_driver.core.migration import workload as workload_mod
from xsm_driver.core import sr as sr_mod
from xsm_driver.core.sr import base as sr_base

LOG = logging.getLogger(__name__)

RUNNING = 'running'
HALTED = 'halted'
PAUSED = 'paused'


class VMNotFound(exception.XSMError):
    msg_fmt = 'host %(host)s has no VM %(vm)s'


class SRNotFound(exception.XSMError):
    msg_fmt = 'host %(host)s has no SR %(sr)s (it has: %(have)s)'


class InvalidVMState(exception.XSMError):
    msg_fmt = 'VM %(vm)s on host %(host)s is %(state)s; %(action)s needs it ' \
              '%(needed)s'


class Disk:
    """One disk of a VM: which VDI, and its I/O stack while running."""

    def __init__(self, name, vdi, sr):
        self.name, self.vdi, self.sr = name, vdi, sr
        self.gate = None
        self.counter = None

    def to_dict(self):
        return {'name': self.name, 'vdi': self.vdi, 'sr': self.sr}

    def attach(self, sr):
        self.gate = filters.Gate(sr.attach(self.vdi, writable=True))
        self.counter = filters.Counter(self.gate)

    def detach(self):
        if self.counter is not None:
            self.counter.close()
        self.gate = self.counter = None


class VM:

    def __init__(self, uuid, name, disks, vifs=(), power_state=HALTED):
        self.uuid, self.name = uuid, name
        self.disks = [Disk(**d) for d in disks]
        self.vifs = list(vifs)
        self.power_state = power_state
        self.workload = None
        self.lock = threading.RLock()

    def to_dict(self):
        out = {'uuid': self.uuid, 'name': self.name,
               'disks': [d.to_dict() for d in self.disks],
               'vifs': self.vifs, 'power_state': self.power_state}
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
    """

    def __init__(self, name, srs, state_path):
        self.name = name
        self.srs = dict(srs)
        self.state_path = state_path
        os.makedirs(state_path, mode=0o700, exist_ok=True)
        self.journal = journal_mod.Journal(os.path.join(state_path,
                                                        'journal.sqlite'))
        self._vms_file = os.path.join(state_path, 'vms.json')
        self._lock = threading.RLock()
        try:
            self.vms = self._load_vms()
        except BaseException:
            self.journal.close()
            raise

    @classmethod
    def from_config(cls, name, sr_specs, state_path):
        """Build a host from ``NAME:DRIVER:PATH`` SR specifications."""
        srs = {}
        for spec in sr_specs:
            sr_name, driver, path = parse_sr_spec(spec)
            srs[sr_name] = sr_mod.load_driver(driver, sr_name, path)
        return cls(name, srs, state_path)

    def close(self):
        """Release what the host holds: the agent is stopping.

        Each running VM's guest is stopped and its disks detached (their
        files closed), and the journal is closed. The VM records are left
        as they are: a VM running now is ``halted`` when the host is built
        again, as after a crash. Calling it again does nothing.
        """
        with self._lock:
            vms = list(self.vms.values())
        for vm in vms:
            with vm.lock:
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

    def create_vm(self, name, disks, vifs=()):
        """Create a halted VM with new, empty disks.

        :param disks: list of ``{'sr': name, 'size': bytes}``, one per disk.
        """
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
        vm = VM(vm_uuid, name, made, vifs)
        with self._lock:
            self.vms[vm_uuid] = vm
        self.save()
        return vm

    def adopt_vm(self, record, power_state):
        """Register a VM whose disks already are in this host's SRs."""
        vm = VM(record['uuid'], record['name'], record['disks'],
                record.get('vifs', ()), power_state)
        with self._lock:
            self.vms[vm.uuid] = vm
        self.save()
        return vm

    def start_vm(self, ref, workload=None):
        """Attach the disks and run; ``workload`` is a guest state."""
        vm = self.vm(ref)
        with vm.lock:
            if vm.power_state == RUNNING:
                return vm
            attached = []
            try:
                for disk in vm.disks:
                    disk.attach(self.sr(disk.sr))
                    attached.append(disk)
            except Exception:
                for disk in attached:
                    disk.detach()
                raise
            vm.power_state = RUNNING
            if workload is not None:
                vm.workload = workload_mod.Workload.from_state(
                    vm.devices, workload).start()
        self.save()
        return vm

    def stop_vm(self, ref):
        vm = self.vm(ref)
        with vm.lock:
            if vm.workload is not None:
                vm.workload.stop()
            for disk in vm.disks:
                disk.detach()
            vm.power_state = HALTED
        self.save()
        return vm

    def forget_vm(self, ref):
        """Drop the VM record (its disks stay)."""
        vm = self.vm(ref)
        with self._lock:
            self.vms.pop(vm.uuid, None)
        self.save()

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
        """Start the verifying guest; ``fill`` pre-writes that fraction."""
        vm = self.vm(ref)
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

    def guest_verify(self, ref):
        """Stop the guest and check every disk against what it wrote."""
        vm = self.vm(ref)
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
