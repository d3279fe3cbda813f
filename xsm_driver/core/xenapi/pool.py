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

"""A pool's SRs, VDIs and VMs, as the agent's endpoint lists them.

:class:`PoolHost` stands where the native engine has a
:class:`~xsm_driver.core.migration.host.Host`: ``host_info``,
``vdi_list``, ``vm_list`` and ``vm_get`` read the pool through the XenAPI
each time they are called. SRs are named by their ``name_label`` when it
is unique in the pool, else ``name_label@host`` for a host's local SR,
else their uuid; VMs by uuid. The agent's local SRs (targets of cold
copies) are listed too.

With ``[xenapi]host`` the facade stands for one host of the pool (a Nova
compute node): it lists the VMs that run there, or halted ones whose
affinity is that host, and starts VMs there. Without it, the whole pool.

VM lifecycle, each call as xapi-project/xen-api (master, e2ee48d) defines
it in ``ocaml/idl/datamodel_vm.ml`` and checks it in
``xapi_vm_lifecycle.ml`` (allowed power states):

* :meth:`PoolHost.create_vm`: ``VM.clone`` of ``[xenapi]vm_template``,
  its ``other_config:disks`` removed (``VM.provision`` would make the
  template's own disks; ours are made here), ``VM.set_is_a_template``
  false, ``VM.set_memory_limits`` and ``VM.set_VCPUs_max`` /
  ``VM.set_VCPUs_at_startup`` (all need Halted), ``VDI.create`` on the
  named SR, ``VBD.create``, ``VIF.create``; anything made is destroyed
  again when a later step fails;
* ``vdi_import`` (:func:`~xsm_driver.core.migration.manager.import_image`
  writes through :meth:`PoolSR.attach`): the image's data becomes a
  dynamic VHD that is sent with an HTTP PUT to the master's
  ``/import_raw_vdi?format=vhd`` (import_raw_vdi.ml; only allocated
  blocks cross the network), its outcome read from the task;
* start (``VM.start_on`` this host / ``VM.start``), stop
  (``VM.clean_shutdown``, then ``VM.hard_shutdown`` after
  ``[xenapi]shutdown_timeout``), pause / resume (``VM.pause`` /
  ``VM.unpause``), reboot (``VM.clean_reboot``, then ``VM.hard_reboot``),
  destroy (halted first, then ``VM.destroy`` and ``VDI.destroy`` of its
  disks); the guest console is refused: xapi's consoles are VNC (RFB)
  sessions, not a serial log.
"""

import logging
import os
import tempfile
import time

import XenAPI

from xsm_driver.core.block import backends
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.sr import base as sr_base
from xsm_driver.core.vhd import ops as vhd_ops
from xsm_driver.core.xenapi import errors
from xsm_driver.core.xenapi import preflight

LOG = logging.getLogger(__name__)

NULL = 'OpaqueRef:NULL'
MiB = 1 << 20
#: the other_config key of a VIF that keeps the name it was created with
VIF_NAME_KEY = 'xsm-vif'

_POWER = {'Running': host_mod.RUNNING, 'Halted': host_mod.HALTED,
          'Paused': host_mod.PAUSED, 'Suspended': 'suspended'}


def sr_names(srs, pbds, hosts):
    """``{SR ref: name}`` for people; see the module docstring.

    >>> sr_names({'a': {'name_label': 'L', 'uuid': 'u1', 'PBDs': ['p']},
    ...           'b': {'name_label': 'L', 'uuid': 'u2', 'PBDs': []}},
    ...          {'p': {'host': 'h'}}, {'h': {'name_label': 'xs1'}})
    {'a': 'L@xs1', 'b': 'u2'}
    """
    count = {}
    for rec in srs.values():
        count[rec.get('name_label')] = count.get(rec.get('name_label'), 0) + 1
    out = {}
    for ref, rec in srs.items():
        name = rec.get('name_label')
        if name and count[name] == 1:
            out[ref] = name
            continue
        hosts_of = {pbds[p].get('host') for p in rec.get('PBDs', ())
                    if p in pbds}
        if name and len(hosts_of) == 1 and not rec.get('shared'):
            host = hosts.get(hosts_of.pop(), {}).get('name_label')
            if host:
                out[ref] = '%s@%s' % (name, host)
                continue
        out[ref] = rec.get('uuid')
    return out


def device_name(vbd):
    """A disk's name: ``xvd`` and a letter for its device number.

    >>> device_name({'userdevice': '1'}), device_name({'userdevice': 'x'})
    ('xvdb', 'x')
    """
    dev = str(vbd.get('userdevice', ''))
    if dev.isdigit() and int(dev) < 26:
        return 'xvd' + chr(ord('a') + int(dev))
    return vbd.get('device') or dev


class PoolSR:
    """An SR of the pool, as the endpoint shows it."""

    def __init__(self, host, ref, rec, name):
        self._host = host
        self.ref = ref
        self.record = rec
        self.name = name
        self.type = rec.get('type')
        self.path = 'xapi:%s' % rec.get('uuid')

    def capacity(self):
        return {'size': preflight.as_int(self.record.get('physical_size')),
                'free': preflight.sr_free(self.record)}

    def list(self):
        call = self._host.call
        out = []
        for ref in call('SR.get_VDIs', self.ref):
            try:
                rec = call('VDI.get_record', ref)
            except errors.PoolUnreachable:
                raise
            except errors.XenAPIError:
                continue                        # removed while we looked
            vm = None
            for vbd in rec.get('VBDs', ()):
                try:
                    vm = call('VM.get_uuid', call('VBD.get_VM', vbd))
                except errors.PoolUnreachable:
                    raise
                except errors.XenAPIError:
                    pass
            sm = rec.get('sm_config') or {}
            out.append(sr_base.VDI(
                uuid=rec['uuid'], name=rec.get('name_label', ''),
                size=preflight.as_int(rec.get('virtual_size')),
                parent=sm.get('vhd-parent'),
                read_only=bool(rec.get('read_only')),
                hidden=not rec.get('managed', True), vm=vm, sr=self.name,
                type=sm.get('type', self.type),
                physical=preflight.as_int(rec.get('physical_utilisation')),
                allocated=preflight.as_int(rec.get('physical_utilisation'))))
        return sorted(out, key=lambda v: v.uuid)

    def attach(self, vdi, writable=False):
        """Where an image is written into a new VDI (``vdi_import``).

        Only for writing a whole image once: see :class:`ImportDevice`.
        """
        if not writable:
            raise errors.NotSupported(
                what='reading a VDI of the pool here', reason='use '
                'xsm-migrate vdi --to-sr to copy it to a local SR')
        ref = self._host.engine.find_vdi(vdi)
        rec = self._host.call('VDI.get_record', ref)
        return ImportDevice(self._host, ref, rec, self.name)


class ImportDevice:
    """A new VDI of the pool, written once through xapi's HTTP import.

    :func:`~xsm_driver.core.migration.manager.import_image` writes the
    image's non-zero data with :meth:`pwrite`; it lands in a dynamic VHD
    of the VDI's size in the agent's state folder; :meth:`flush` sends
    that VHD to ``/import_raw_vdi?format=vhd`` (import_raw_vdi.ml
    ``localhost_handler``: ``vhd-tool`` writes its allocated blocks into
    the VDI), :meth:`close` removes the file. A refusal (the VDI in use by
    a running VM, an image larger than the VDI: ``VDI_IO_ERROR``) is read
    from the import's task and raised in words.
    """

    def __init__(self, host, ref, rec, sr_name):
        self._host = host
        self.ref = ref
        self.uuid = rec['uuid']
        self.size = preflight.as_int(rec.get('virtual_size'))
        self.sr = sr_name
        folder = os.path.join(host.state_path, 'xenapi-imports')
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, self._path = tempfile.mkstemp(prefix=self.uuid, suffix='.vhd',
                                          dir=folder)
        os.close(fd)
        os.unlink(self._path)
        self._dev = None
        try:
            vhd_ops.create(self._path, self.size)
            self._dev = backends.VHDDevice(self._path, writable=True)
        except Exception:
            self.close()
            raise
        if self._dev.size != self.size:
            self.close()
            raise errors.NotSupported(
                what='importing into VDI %s' % self.uuid,
                reason='its size, %d bytes, is not a whole number of VHD '
                'blocks (2 MiB)' % self.size)

    def pwrite(self, data, offset):
        self._dev.pwrite(data, offset)

    def flush(self):
        self._dev.flush()
        self._dev.close()
        self._dev = None
        self._host.put_vdi(self.ref, self.uuid, self._path, 'vhd')

    def close(self):
        if self._dev is not None:
            self._dev.close()
            self._dev = None
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class PoolVM:
    def __init__(self, rec, disks, vifs):
        self.uuid = rec['uuid']
        self.name = rec.get('name_label')
        self.power_state = _POWER.get(rec.get('power_state'),
                                      str(rec.get('power_state')).lower())
        self.disks = disks
        self.vifs = vifs
        self.memory_mib = preflight.as_int(
            rec.get('memory_dynamic_max')) // MiB
        self.vcpus = preflight.as_int(rec.get('VCPUs_at_startup'))

    def to_dict(self):
        return {'uuid': self.uuid, 'name': self.name, 'disks': self.disks,
                'vifs': self.vifs, 'power_state': self.power_state,
                'memory_mib': self.memory_mib, 'vcpus': self.vcpus}


def vif_name(vif):
    """A VIF's name in the agent's API: the one it was made with, else uuid.

    >>> vif_name({'uuid': 'u', 'other_config': {'xsm-vif': 'port-1'}})
    'port-1'
    """
    return (vif.get('other_config') or {}).get(VIF_NAME_KEY) or vif['uuid']


def memory_limits(memory_mib, template):
    """``VM.set_memory_limits`` arguments for ``memory_mib`` MiB.

    static_min stays the template's unless that is larger; the dynamic
    range and static_max are the memory asked for (no ballooning).

    >>> memory_limits(512, {'memory_static_min': str(128 << 20)})
    (134217728, 536870912, 536870912, 536870912)
    """
    size = int(memory_mib) * MiB
    static_min = min(preflight.as_int(template.get('memory_static_min')),
                     size)
    return static_min, size, size, size


class PoolHost:
    """The source pool (and the agent's local SRs) of a xenapi engine.

    :param engine: the :class:`~.engine.XenAPIEngine`.
    :param host: name_label (or uuid) of the pool host this agent stands
        for; None: the whole pool.
    :param vm_template: name_label (or uuid) of the template new VMs are
        cloned from.
    :param vm_network: network (uuid or unique name) of a new VIF whose
        own name is not a network of the pool (Nova's port ids); None:
        such a VIF is refused.
    :param shutdown_timeout: seconds a clean shutdown or reboot may take
        before the VM is forced (hard_shutdown / hard_reboot).
    """

    def __init__(self, engine, host=None, vm_template='Other install media',
                 vm_network=None, shutdown_timeout=60.0):
        self.engine = engine
        self.name = engine.name
        self.state_path = engine.state_path
        self.pool_host = host
        self.vm_template = vm_template
        self.vm_network = vm_network
        self.shutdown_timeout = shutdown_timeout

    def call(self, method, *args):
        """A call on the pool; xapi's refusals translated for people."""
        return self.engine._call(self.engine.source, method, *args)

    def change(self, method, *args, context=''):
        """A call that changes something: never sent twice blindly."""
        pool = self.engine.source
        try:
            return pool.call(method, *args, safe=False)
        except XenAPI.Failure as exc:
            raise self._refusal(exc, context)

    def _refusal(self, exc, context=''):
        details = [str(d) for d in exc.details]
        if details[0] == 'VM_BAD_POWER_STATE' and len(details) >= 4:
            # [vm; expected; actual] (xapi_vm_lifecycle.ml
            # report_power_state_error)
            return host_mod.InvalidVMState(
                vm=self._vm_uuid(details[1]), host=self.name,
                state=details[3], action=context or 'this',
                needed=details[2])
        return self.engine.translate(exc, context, self.engine.source)

    def _vm_uuid(self, ref):
        try:
            return self.engine.source.call('VM.get_uuid', ref)
        except Exception:
            return ref

    # -- resources ---------------------------------------------------------

    def _host_ref(self):
        """The pool host this agent stands for (None: the pool)."""
        if not self.pool_host:
            return None
        hosts = self.call('host.get_all_records')
        return preflight.resolve('host', hosts, self.pool_host,
                                 'pool %s ([xenapi]host)' % self.name)

    def resources(self):
        """Memory and CPUs of this host (or of all the pool's hosts).

        From ``host_metrics`` (memory_total, memory_free) and the
        ``host_CPUs`` of each host (``cpu_info:cpu_count`` when a host
        lists none).
        """
        hosts = self.call('host.get_all_records')
        mine = self._host_ref()
        total = free = cpus = 0
        for ref, rec in hosts.items():
            if mine is not None and ref != mine:
                continue
            metrics = self.call('host_metrics.get_record', rec['metrics'])
            total += preflight.as_int(metrics.get('memory_total'))
            free += preflight.as_int(metrics.get('memory_free'))
            count = len(rec.get('host_CPUs') or ())
            if not count:
                count = preflight.as_int(
                    (rec.get('cpu_info') or {}).get('cpu_count'))
            cpus += count
        return {'memory_mib': total // MiB, 'memory_free_mib': free // MiB,
                'vcpus': cpus,
                'hosts': sorted(rec['name_label'] for ref, rec in
                                hosts.items() if mine in (None, ref))}

    # -- SRs -----------------------------------------------------------------

    def _pool_srs(self):
        call = self.call
        srs = {r: rec for r, rec in call('SR.get_all_records').items()
               if rec.get('content_type') not in ('iso', 'udev')}
        names = sr_names(srs, call('PBD.get_all_records'),
                         call('host.get_all_records'))
        return {names[r]: PoolSR(self, r, rec, names[r])
                for r, rec in srs.items()}

    @property
    def srs(self):
        out = self._pool_srs()
        out.update(self.engine.local_srs)
        return out

    def sr(self, name):
        srs = self.srs
        if name in srs:
            return srs[name]
        for sr in srs.values():
            if getattr(sr, 'record', {}).get('uuid') == name:
                return sr
        raise host_mod.SRNotFound(sr=name, host=self.name,
                                  have=', '.join(sorted(srs)) or 'none')

    def find_vdi(self, vdi):
        """The SR (of the pool or local) that holds VDI ``vdi`` (uuid)."""
        try:
            ref = self.engine.source.call('VDI.get_by_uuid', vdi)
        except XenAPI.Failure:
            for sr in self.engine.local_srs.values():
                if any(v.uuid == vdi for v in sr.list()):
                    return sr
            raise errors.XenAPIError(code='UUID_INVALID', detail='no VDI '
                                     '%s in pool %s' % (vdi, self.name))
        sr_ref = self.call('VDI.get_SR', ref)
        for sr in self._pool_srs().values():
            if sr.ref == sr_ref:
                return sr
        raise errors.XenAPIError(code='UUID_INVALID', detail='VDI %s is '
                                 'not in an SR of pool %s the agent lists'
                                 % (vdi, self.name))

    # -- VMs -----------------------------------------------------------------

    def _vm(self, ref, rec, sr_name):
        call = self.call
        disks = []
        for vbd_ref in rec.get('VBDs', ()):
            vbd = call('VBD.get_record', vbd_ref)
            if vbd.get('type') != 'Disk' or vbd.get('empty'):
                continue
            vdi = call('VDI.get_record', vbd['VDI'])
            disks.append({'name': device_name(vbd), 'vdi': vdi['uuid'],
                          'sr': sr_name.get(vdi['SR'], vdi['SR']),
                          'userdevice': str(vbd.get('userdevice'))})
        disks.sort(key=lambda d: int(d['userdevice'])
                   if d['userdevice'].isdigit() else 99)
        for d in disks:
            d.pop('userdevice')
        vifs = []
        for vif_ref in rec.get('VIFs', ()):
            vif = call('VIF.get_record', vif_ref)
            vifs.append((preflight.as_int(vif.get('device')),
                         vif_name(vif)))
        return PoolVM(rec, disks, [name for _d, name in sorted(vifs)])

    def _mine(self, rec, host):
        """Whether a VM belongs to this agent's pool host."""
        if host is None:
            return True
        if rec.get('power_state') in ('Running', 'Paused'):
            return rec.get('resident_on') == host
        return rec.get('affinity') == host

    @property
    def vms(self):
        sr_name = {sr.ref: name for name, sr in self._pool_srs().items()}
        host = self._host_ref()
        out = {}
        for ref, rec in self.call('VM.get_all_records').items():
            if rec.get('is_a_template') or rec.get('is_a_snapshot') or \
                    rec.get('is_control_domain'):
                continue
            if not self._mine(rec, host):
                continue
            out[rec['uuid']] = self._vm(ref, rec, sr_name)
        return out

    def _find(self, ref):
        try:
            vm_ref = self.engine.find_vm(ref)
        except errors.PoolUnreachable:
            raise
        except errors.XenAPIError:
            raise host_mod.VMNotFound(vm=ref, host=self.name)
        rec = self.call('VM.get_record', vm_ref)
        if not self._mine(rec, self._host_ref()):
            raise host_mod.VMNotFound(vm=ref, host=self.name)
        return vm_ref, rec

    def vm(self, ref):
        vm_ref, rec = self._find(ref)
        sr_name = {sr.ref: name for name, sr in self._pool_srs().items()}
        return self._vm(vm_ref, rec, sr_name)

    # -- making VMs --------------------------------------------------------

    def _template(self):
        refs = [r for r, rec in self.call('VM.get_all_records').items()
                if rec.get('is_a_template') and not rec.get('is_a_snapshot')
                and self.vm_template in (rec.get('name_label'),
                                         rec.get('uuid'))]
        if len(refs) != 1:
            raise errors.XenAPIError(
                code='NOT_CONFIGURED', detail='%s template %r in pool %s; '
                'set [xenapi]vm_template to the name or uuid of one template'
                % ('no' if not refs else '%d templates are called'
                   % len(refs), self.vm_template, self.name))
        return refs[0]

    def _vif_network(self, index, vm_name, spec, nets):
        """``(network ref, MAC, name)`` of VIF ``spec`` (see create_vm)."""
        try:
            host_mod.vif_entry(spec)            # checks a dict's keys
        except ValueError as exc:
            raise host_mod.InvalidVIF(index=index, vm=vm_name, reason=exc)
        if isinstance(spec, dict):
            name, mac = spec['network'], spec.get('mac') or ''
        else:
            name, mac = spec, ''
        try:
            return preflight.resolve('network', nets, name,
                                     'pool %s' % self.name), mac, name
        except errors.XenAPIError:
            if not self.vm_network:
                raise host_mod.InvalidVIF(
                    index=index, vm=vm_name, reason='%r is not a network '
                    'of pool %s (it has: %s) and [xenapi]vm_network is not '
                    'set' % (name, self.name, ', '.join(sorted(
                        r.get('name_label', '') for r in nets.values()))))
        return preflight.resolve('network', nets, self.vm_network,
                                 'pool %s ([xenapi]vm_network)'
                                 % self.name), mac, name

    def create_vm(self, name, disks, vifs=(), qemu=None):
        """A halted VM with new, empty disks, cloned from the template.

        :param disks: ``[{'sr': name, 'size': bytes}]``; the first is
            bootable.
        :param vifs: each a network (uuid or name) or ``{'network',
            'mac'}``; a name that is no network of the pool (Nova's port
            ids) goes on ``[xenapi]vm_network``, and stays the VIF's name.
        :param qemu: only ``memory_mib`` and ``vcpus`` apply to a Xen VM;
            the guest-kit options are refused.
        """
        qemu = dict(qemu or {})
        extra = sorted(set(qemu) - {'memory_mib', 'vcpus'})
        if extra:
            raise errors.NotSupported(
                what='guest option %s' % ', '.join(extra), reason='a VM of '
                'a XenServer/XCP-ng pool boots from its own disks; only '
                'memory_mib and vcpus apply')
        for key in ('memory_mib', 'vcpus'):
            if key in qemu and (not isinstance(qemu[key], int) or
                                isinstance(qemu[key], bool) or
                                qemu[key] < 1):
                raise errors.NotSupported(
                    what='%s=%r' % (key, qemu[key]),
                    reason='it must be a positive integer')
        srs = {}
        for i, spec in enumerate(disks):
            sr = self.sr(spec['sr'])
            if not isinstance(sr, PoolSR):
                raise errors.NotSupported(
                    what='a disk in local SR %s' % sr.name,
                    reason='a VM of the pool has its disks in SRs of the '
                    'pool')
            srs[i] = sr
        nets = self.call('network.get_all_records')
        vif_specs = [self._vif_network(i, name, v, nets)
                     for i, v in enumerate(vifs)]
        host = self._host_ref()
        template = self._template()
        what = 'creating VM %s' % name
        vm = self.change('VM.clone', template, name, context=what)
        made = []
        try:
            self.change('VM.remove_from_other_config', vm, 'disks',
                        context=what)
            self.change('VM.set_is_a_template', vm, False, context=what)
            if host is not None:
                self.change('VM.set_affinity', vm, host, context=what)
            rec = self.call('VM.get_record', vm)
            if 'memory_mib' in qemu:
                limits = [str(v) for v in memory_limits(qemu['memory_mib'],
                                                        rec)]
                self.change('VM.set_memory_limits', vm, *limits,
                            context=what)
            if 'vcpus' in qemu:
                count = str(qemu['vcpus'])
                order = ['VM.set_VCPUs_max', 'VM.set_VCPUs_at_startup']
                if qemu['vcpus'] < preflight.as_int(rec.get('VCPUs_max')):
                    order.reverse()     # 0 < at_startup <= max throughout
                for method in order:
                    self.change(method, vm, count, context=what)
            for i, spec in enumerate(disks):
                vdi = self.change('VDI.create', {
                    'name_label': '%s disk %d' % (name, i),
                    'name_description': 'made by xsm-agent %s' % self.name,
                    'SR': srs[i].ref, 'virtual_size': str(int(spec['size'])),
                    'type': 'user', 'sharable': False, 'read_only': False,
                    'other_config': {}, 'xenstore_data': {},
                    'sm_config': {}, 'tags': []}, context=what)
                made.append(vdi)
                self.change('VBD.create', {
                    'VM': vm, 'VDI': vdi, 'userdevice': str(i),
                    'bootable': i == 0, 'mode': 'RW', 'type': 'Disk',
                    'unpluggable': False, 'empty': False,
                    'other_config': {}, 'qos_algorithm_type': '',
                    'qos_algorithm_params': {}}, context=what)
            for i, (net, mac, vname) in enumerate(vif_specs):
                self.change('VIF.create', {
                    'device': str(i), 'network': net, 'VM': vm, 'MAC': mac,
                    'MTU': '1500', 'other_config': {VIF_NAME_KEY: vname},
                    'qos_algorithm_type': '', 'qos_algorithm_params': {}},
                    context=what)
        except Exception:
            self._undo_create(vm, made)
            raise
        LOG.info('VM %s made in pool %s from template %s: disks %s',
                 name, self.name, self.vm_template,
                 ', '.join(str(d['size']) for d in disks))
        sr_name = {sr.ref: sr.name for sr in srs.values()}
        return self._vm(vm, self.call('VM.get_record', vm), sr_name)

    def _undo_create(self, vm, vdis):
        for method, ref in [('VM.destroy', vm)] + [('VDI.destroy', v)
                                                   for v in vdis]:
            try:
                self.change(method, ref)
            except Exception as exc:
                LOG.error('pool %s: %s %s after a failed create: %s',
                          self.name, method, ref, exc)

    def put_vdi(self, ref, uuid, path, fmt):
        """Send an image file to xapi's ``/import_raw_vdi``.

        The import runs under a task of ours (``task_id``): xapi answers
        200 before it reads the body, and its outcome is the task's.
        """
        pool = self.engine.source
        task = self.change('task.create', 'xsm import of VDI %s' % uuid,
                           'vdi_import')
        try:
            status = pool.put('/import_raw_vdi', {
                'vdi': ref, 'format': fmt, 'task_id': task}, path)
            # xapi ends the task as it ends the connection; give it the
            # time of a call to say so
            deadline = time.monotonic() + pool.timeout
            while True:
                rec = self.call('task.get_record', task)
                if rec.get('status') != 'pending' or \
                        time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            if rec.get('status') == 'failure':
                raise self._refusal(XenAPI.Failure(rec.get('error_info')),
                                    'importing an image into VDI %s' % uuid)
            if status != 200 or rec.get('status') != 'success':
                raise errors.XenAPIError(
                    code='IMPORT_FAILED', detail='xapi answered HTTP %s to '
                    'the import into VDI %s (task %s)' % (
                        status, uuid, rec.get('status')))
        finally:
            try:
                self.call('task.destroy', task)
            except Exception as exc:
                LOG.debug('task.destroy %s: %s', task, exc)

    # -- power -------------------------------------------------------------

    def start_vm(self, ref, workload=None, paused=False):
        vm_ref, rec = self._find(ref)
        if rec['power_state'] in ('Running', 'Paused'):
            return self.vm(ref)
        host = self._host_ref()
        what = 'starting VM %s' % rec['uuid']
        if host is not None:
            self.change('VM.start_on', vm_ref, host, bool(paused), False,
                        context=what)
        else:
            self.change('VM.start', vm_ref, bool(paused), False,
                        context=what)
        return self.vm(rec['uuid'])

    def _clean_or_hard(self, vm_ref, uuid, clean, hard, action):
        """``Async.<clean>``; after shutdown_timeout: cancel, ``hard``."""
        pool = self.engine.source
        what = '%s VM %s' % (action, uuid)
        task = self.change('Async.' + clean, vm_ref, context=what)
        deadline = time.monotonic() + self.shutdown_timeout
        cancelled = False
        try:
            while True:
                rec = self.call('task.get_record', task)
                status = rec.get('status')
                if status == 'success':
                    return
                if status in ('failure', 'cancelled'):
                    details = rec.get('error_info') or ['UNKNOWN_ERROR']
                    if details[0] != 'TASK_CANCELLED':
                        raise self._refusal(XenAPI.Failure(details), what)
                    break
                if time.monotonic() >= deadline:
                    if cancelled:
                        # xapi's hard operation cancels the clean one too
                        # (message_forwarding.ml VM.hard_shutdown)
                        break
                    LOG.warning('%s: the guest did not finish within %g s '
                                '([xenapi]shutdown_timeout); forcing it '
                                'with %s', what, self.shutdown_timeout,
                                hard)
                    try:
                        self.change('task.cancel', task, context=what)
                    except errors.XenAPIError as exc:
                        LOG.warning('%s: task.cancel: %s; %s cancels it',
                                    what, exc, hard)
                        break
                    cancelled = True
                    deadline = time.monotonic() + max(
                        self.engine.source.timeout, 1.0)
                time.sleep(min(0.05, max(self.engine.poll_interval, 0.01)))
            # (before the task is destroyed: the hard operation ends a
            # clean one still running)
            self.change(hard, vm_ref, context=what)
        finally:
            try:
                pool.call('task.destroy', task)
            except Exception as exc:
                LOG.debug('task.destroy %s: %s', task, exc)

    def stop_vm(self, ref, clean=True):
        vm_ref, rec = self._find(ref)
        state = rec['power_state']
        if state == 'Halted':
            return self.vm(ref)
        if state == 'Running' and clean:
            self._clean_or_hard(vm_ref, rec['uuid'], 'VM.clean_shutdown',
                                'VM.hard_shutdown', 'shutting down')
        else:
            self.change('VM.hard_shutdown', vm_ref,
                        context='shutting down VM %s' % rec['uuid'])
        return self.vm(rec['uuid'])

    def reboot_vm(self, ref):
        vm_ref, rec = self._find(ref)
        if rec['power_state'] == 'Running':
            self._clean_or_hard(vm_ref, rec['uuid'], 'VM.clean_reboot',
                                'VM.hard_reboot', 'rebooting')
        else:
            self.change('VM.hard_reboot', vm_ref,
                        context='rebooting VM %s' % rec['uuid'])
        return self.vm(rec['uuid'])

    def pause_vm(self, ref):
        vm_ref, rec = self._find(ref)
        self.change('VM.pause', vm_ref, context='pausing VM %s'
                    % rec['uuid'])
        return self.vm(rec['uuid'])

    def resume_vm(self, ref):
        vm_ref, rec = self._find(ref)
        self.change('VM.unpause', vm_ref, context='resuming VM %s'
                    % rec['uuid'])
        return self.vm(rec['uuid'])

    def destroy_vm(self, ref):
        """Force the VM off, destroy it and the VDIs of its disks.

        (``VM.destroy`` needs Halted or Suspended and keeps the VDIs;
        CDs' ISOs are not the VM's and stay.)
        """
        vm_ref, rec = self._find(ref)
        what = 'destroying VM %s' % rec['uuid']
        if rec['power_state'] != 'Halted':
            self.change('VM.hard_shutdown', vm_ref, context=what)
        vdis = []
        for vbd in self.call('VM.get_VBDs', vm_ref):
            vrec = self.call('VBD.get_record', vbd)
            if vrec.get('type') == 'Disk' and not vrec.get('empty'):
                vdis.append(vrec['VDI'])
        self.change('VM.destroy', vm_ref, context=what)
        for vdi in vdis:
            self.change('VDI.destroy', vdi, context=what)

    def console_output(self, ref, limit=1 << 20):
        vm_ref, rec = self._find(ref)
        raise errors.ConsoleNotSupported(
            what='reading the console of VM %s' % rec['uuid'],
            reason='xapi\'s consoles are VNC (RFB) sessions '
            '(console.location), not a serial log')

    def _refuse(self, *args, **kwargs):
        raise errors.NotSupported(
            what='snapshots and the verifying guest', reason='on a '
            'XenServer/XCP-ng pool, snapshot VMs with xe or XenCenter; a '
            'pool\'s guests are real ones')

    snapshot_vm = guest_start = guest_verify = _refuse
