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
copies) are listed too. Creating, starting and stopping VMs is xapi's
business (``xe``, XenCenter, Xen Orchestra): those calls are refused.
"""

from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.sr import base as sr_base
from xsm_driver.core.xenapi import errors
from xsm_driver.core.xenapi import preflight

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


class PoolVM:
    def __init__(self, rec, disks, vifs):
        self.uuid = rec['uuid']
        self.name = rec.get('name_label')
        self.power_state = _POWER.get(rec.get('power_state'),
                                      str(rec.get('power_state')).lower())
        self.disks = disks
        self.vifs = vifs

    def to_dict(self):
        return {'uuid': self.uuid, 'name': self.name, 'disks': self.disks,
                'vifs': self.vifs, 'power_state': self.power_state}


class PoolHost:
    """The source pool (and the agent's local SRs) of a xenapi engine."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name

    def call(self, method, *args):
        """A call on the pool; xapi's refusals translated for people."""
        return self.engine._call(self.engine.source, method, *args)

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

    def _vm(self, ref, rec, sr_name):
        call = self.call
        disks = []
        for vbd_ref in rec.get('VBDs', ()):
            vbd = call('VBD.get_record', vbd_ref)
            if vbd.get('type') != 'Disk' or vbd.get('empty'):
                continue
            vdi = call('VDI.get_record', vbd['VDI'])
            disks.append({'name': device_name(vbd), 'vdi': vdi['uuid'],
                          'sr': sr_name.get(vdi['SR'], vdi['SR'])})
        vifs = []
        for vif_ref in rec.get('VIFs', ()):
            vif = call('VIF.get_record', vif_ref)
            vifs.append(vif['uuid'])
        return PoolVM(rec, disks, vifs)

    @property
    def vms(self):
        sr_name = {sr.ref: name for name, sr in self._pool_srs().items()}
        out = {}
        for ref, rec in self.call('VM.get_all_records').items():
            if rec.get('is_a_template') or rec.get('is_a_snapshot') or \
                    rec.get('is_control_domain'):
                continue
            out[rec['uuid']] = self._vm(ref, rec, sr_name)
        return out

    def vm(self, ref):
        try:
            vm_ref = self.engine.find_vm(ref)
        except errors.PoolUnreachable:
            raise
        except errors.XenAPIError:
            raise host_mod.VMNotFound(vm=ref, host=self.name)
        sr_name = {sr.ref: name for name, sr in self._pool_srs().items()}
        return self._vm(vm_ref, self.call('VM.get_record', vm_ref), sr_name)

    def _refuse(self, *args, **kwargs):
        raise errors.NotSupported(
            what='managing VMs', reason='on a XenServer/XCP-ng pool, VMs '
            'are created, started and stopped with xe, XenCenter or Xen '
            'Orchestra; the agent only migrates them')

    create_vm = start_vm = stop_vm = destroy_vm = snapshot_vm = \
        guest_start = guest_verify = pause_vm = resume_vm = reboot_vm = \
        console_output = _refuse
