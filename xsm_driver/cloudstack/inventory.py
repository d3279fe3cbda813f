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

"""What the xsm hosts hold, as CloudStack's API names it.

Ids are stable UUIDs derived from xsm-driver's names, so that they do not
change when a VM moves:

=================  =====================================================
host               ``uuid5(NS, "host/" + host name)``
storage pool       ``uuid5(NS, "pool/" + host + "/" + SR name)`` (every
                   xsm SR is a pool of scope HOST)
virtual machine    the VM's uuid (it keeps it when it moves)
volume             ``uuid5(NS, "volume/" + VM uuid + "/" + device name)``
                   for a VM's disk (its ``path`` is the VDI uuid, which
                   changes when it moves, as on XenServer); the VDI uuid
                   for a disk of no VM
=================  =====================================================
"""

import logging
import uuid as uuidlib

from xsm_driver.cloudstack import commands as cmds
from xsm_driver.cloudstack import gson
from xsm_driver.cloudstack import resource
from xsm_driver.core.migration import host as host_mod

LOG = logging.getLogger(__name__)

NAMESPACE = uuidlib.UUID('0d6f3f4c-2f4e-5b8e-9a57-2c0a1c8d7e31')

POWER_STATES = {'running': 'Running', 'halted': 'Stopped',
                'paused': 'Paused'}
POOL_TYPES = {'vhd': 'EXT', 'raw': 'Filesystem'}


def _id(kind, name):
    return str(uuidlib.uuid5(NAMESPACE, '%s/%s' % (kind, name)))


def host_id(host):
    return str(uuidlib.uuid5(NAMESPACE, 'host/' + host))


#: What a CloudStack response carries and xsm-driver has no notion of:
#: one zone, one pod, one cluster per host (so that CloudStack moves a VM
#: between them with the Receive/Send/Complete commands), the ROOT domain
#: and its admin account, one template and one service offering. Stable
#: ids, so that a client may compare them.
ZONE = {'zoneid': _id('zone', 'xsm'), 'zonename': 'xsm'}
POD = {'podid': _id('pod', 'xsm'), 'podname': 'xsm'}
OWNER = {'account': 'admin', 'domainid': _id('domain', 'ROOT'),
         'domain': 'ROOT'}
ACCOUNT_ID = _id('account', 'admin')      # (jobs.py has them too)
USER_ID = _id('user', 'admin')
TEMPLATE = {'templateid': _id('template', 'xsm'), 'templatename': 'xsm'}
OFFERING = {'serviceofferingid': _id('serviceoffering', 'xsm'),
            'serviceofferingname': 'xsm'}


def cluster(host):
    """The cluster fields of a host's things (one cluster per host)."""
    return {'clusterid': _id('cluster', host), 'clustername': host}


def nic_response(index, vif):
    """A NIC of a VM response: its network, and its MAC when it has one.

    >>> sorted(nic_response(1, '02:00:00:00:00:0a@vlan-7').items())
    [('deviceid', '1'), ('isdefault', False), ('macaddress', \
'02:00:00:00:00:0a'), ('networkname', 'vlan-7')]
    """
    network, mac = host_mod.vif_parts(vif)
    out = {'deviceid': str(index), 'networkname': network,
           'isdefault': index == 0}
    if mac:
        out['macaddress'] = mac
    return out


def placement(host):
    return dict(ZONE, **dict(POD, **cluster(host)))


def pool_id(host, sr):
    return str(uuidlib.uuid5(NAMESPACE, 'pool/%s/%s' % (host, sr)))


def volume_id(vm_uuid, device):
    return str(uuidlib.uuid5(NAMESPACE, 'volume/%s/%s' % (vm_uuid, device)))


def chain_allocated(vdis, uuid):
    """Bytes a VDI's chain holds (what a migration copies at most)."""
    by_uuid = {v['uuid']: v for v in vdis}
    total, seen = 0, set()
    while uuid is not None and uuid in by_uuid and uuid not in seen:
        seen.add(uuid)
        total += by_uuid[uuid].get('allocated') or 0
        uuid = by_uuid[uuid].get('parent')
    return total


class Snapshot:
    """One look at every host: its SRs, VMs and VDIs.

    :param clients: ``{host name: AgentAPI}``.
    """

    def __init__(self, clients):
        self.hosts = {}         # name -> host_info, or None if unreachable
        self.vms = {}           # name -> [vm records]
        self.vdis = {}          # name -> [vdi records]
        for name, client in clients.items():
            try:
                self.hosts[name] = client.host_info()
                self.vms[name] = client.vm_list()
                self.vdis[name] = client.vdi_list()
            except Exception as exc:
                LOG.warning('host %s does not answer: %s', name,
                            resource.describe(exc))
                self.hosts[name], self.vms[name], self.vdis[name] = \
                    None, [], []

    # -- lookups -------------------------------------------------------------

    # CloudStack's API takes ids (UUIDs) only: a name in an id parameter
    # names nothing (ParamProcessWorker.translateUuidToInternalId).

    def find_vm(self, vm_id):
        """``(host, record)`` of a VM by id (its uuid), or None."""
        for host, vms in self.vms.items():
            for vm in vms:
                if vm['uuid'] == vm_id:
                    return host, vm
        return None

    def find_host(self, ref):
        """A host name by id, or None."""
        for name in self.hosts:
            if ref == host_id(name):
                return name
        return None

    def find_pool(self, ref):
        """``(host, sr record)`` of a pool by id, or None."""
        for name, info in self.hosts.items():
            for sr in (info or {}).get('srs', ()):
                if ref == pool_id(name, sr['name']):
                    return name, sr
        return None

    def volumes(self):
        """``[(host, vm record or None, device index, vdi record)]``."""
        out = []
        for host, vms in self.vms.items():
            vdis = {v['uuid']: v for v in self.vdis[host]}
            attached = set()
            for vm in vms:
                for index, disk in enumerate(vm['disks']):
                    attached.add(disk['vdi'])
                    out.append((host, vm, index, vdis.get(disk['vdi'], {
                        'uuid': disk['vdi'], 'sr': disk['sr'],
                        'name': disk['name'], 'size': 0})))
            for vdi in self.vdis[host]:
                if vdi['uuid'] not in attached and not vdi['hidden'] and \
                        not vdi['read_only']:
                    out.append((host, None, None, vdi))
        return out

    def find_volume(self, ref):
        for item in self.volumes():
            if ref in (self._volume_id(item), item[3]['uuid']):
                return item
        return None

    @staticmethod
    def _volume_id(item):
        host, vm, index, vdi = item
        if vm is None:
            return vdi['uuid']
        return volume_id(vm['uuid'], vm['disks'][index]['name'])

    def needed(self, host, vdi_uuid):
        return chain_allocated(self.vdis.get(host, ()), vdi_uuid)

    # -- CloudStack's responses ------------------------------------------

    def host_response(self, name):
        info = self.hosts.get(name)
        out = {'id': host_id(name), 'name': name, 'type': 'Routing',
               'hypervisor': 'XenServer',
               'state': 'Up' if info is not None else 'Disconnected',
               'resourcestate': 'Enabled'}
        out.update(placement(name))
        if info is not None:
            out['ipaddress'] = name
            out['activemigrations'] = info.get('active_migrations', 0)
            out['disksizetotal'] = sum(s['size'] for s in info['srs'])
            out['disksizeallocated'] = sum(s['size'] - s['free']
                                           for s in info['srs'])
        return out

    def pool_response(self, host, sr):
        return {'id': pool_id(host, sr['name']), 'name': sr['name'],
                'type': POOL_TYPES.get(sr.get('type'), 'Filesystem'),
                'scope': 'HOST', 'hypervisor': 'XenServer',
                'hostid': host_id(host), 'hostname': host,
                'ipaddress': host, 'path': sr.get('path'),
                'disksizetotal': sr['size'],
                'disksizeused': sr['size'] - sr['free'],
                'state': 'Up', **placement(host)}

    def pools(self, host=None):
        return [(h, sr) for h, info in self.hosts.items()
                if host in (None, h)
                for sr in (info or {}).get('srs', ())]

    def vm_response(self, host, vm):
        guest = vm.get('qemu') or {}
        return {'id': vm['uuid'], 'name': vm['name'],
                'displayname': vm['name'], 'instancename': vm['name'],
                'state': POWER_STATES.get(vm['power_state'],
                                          vm['power_state']),
                'hostid': host_id(host), 'hostname': host,
                'hypervisor': 'XenServer',
                'cpunumber': guest.get('vcpus') or vm.get('cpus') or 1,
                'memory': guest.get('memory_mib') or vm.get('memory') or 0,
                'nic': [nic_response(i, vif)
                        for i, vif in enumerate(vm.get('vifs') or ())],
                **placement(host), **TEMPLATE, **OFFERING, **OWNER}

    def volume_response(self, item):
        host, vm, index, vdi = item
        sr = vdi.get('sr')
        out = {'id': self._volume_id(item), 'name': vdi.get('name'),
               'path': vdi['uuid'], 'size': vdi.get('size'),
               'physicalsize': vdi.get('physical'),
               'storageid': pool_id(host, sr), 'storage': sr,
               'storagetype': 'local', 'state': 'Ready',
               'hypervisor': 'XenServer', 'format': 'VHD'
               if vdi.get('type') == 'vhd' else 'RAW',
               **placement(host), **OWNER}
        if vm is not None:
            out.update(type='ROOT' if index == 0 else 'DATADISK',
                       deviceid=index, virtualmachineid=vm['uuid'],
                       vmname=vm['name'], vmstate=POWER_STATES.get(
                           vm['power_state'], vm['power_state']))
        else:
            out['type'] = 'DATADISK'
        return out


# -- transfer objects, as the management server builds them ------------------

def volume_to(host, vm, index, vdi, sr_type=None):
    """A ``VolumeTO`` of one disk of ``vm`` (all its fields)."""
    return {'id': index, 'name': vdi.get('name') or vm['disks'][index]['name'],
            'mountPoint': None, 'path': vdi['uuid'],
            'size': vdi.get('size') or 0,
            'type': 'ROOT' if index == 0 else 'DATADISK',
            'storagePoolType': POOL_TYPES.get(sr_type, 'EXT'),
            'storagePoolUuid': pool_id(host, vm['disks'][index]['sr']),
            'deviceId': index, 'chainInfo': None}


def vm_to(host, vm, vdis):
    """A ``VirtualMachineTO`` of ``vm`` on ``host``.

    :param vdis: ``{uuid: vdi record}`` of the host.
    """
    disks = []
    for index, disk in enumerate(vm['disks']):
        vdi = vdis.get(disk['vdi'], {})
        volume = {'uuid': volume_id(vm['uuid'], disk['name']),
                  'volumeType': 'ROOT' if index == 0 else 'DATADISK',
                  'name': vdi.get('name') or disk['name'],
                  'size': vdi.get('size'), 'path': disk['vdi'],
                  'volumeId': index, 'vmName': vm['name'],
                  'accountId': 0, 'format': 'VHD', 'id': index,
                  'deviceId': index, 'hypervisorType': 'XenServer',
                  'directDownload': False, 'deployAsIs': False}
        disks.append({'data': gson.wrap(cmds.VOLUME_OBJECT_TO, volume),
                      'diskSeq': index, 'path': disk['vdi'],
                      'type': 'ROOT' if index == 0 else 'DATADISK'})
    nics = []
    for i, vif in enumerate(vm.get('vifs') or ()):
        network, mac = host_mod.vif_parts(vif)
        nics.append(dict({'deviceId': i, 'name': network, 'defaultNic': i == 0,
                          'pxeDisable': True, 'dpdkDisabled': False,
                          'mtu': 0, 'isSecurityGroupEnabled': False,
                          'type': 'Guest'}, **({'mac': mac} if mac else {})))
    guest = vm.get('qemu') or {}
    ram = (guest.get('memory_mib') or 0) * (1 << 20)
    return {'id': 0, 'name': vm['name'], 'uuid': vm['uuid'],
            'type': 'User', 'state': POWER_STATES.get(vm['power_state']),
            'cpus': guest.get('vcpus') or 1, 'minRam': ram, 'maxRam': ram,
            'enableHA': False,
            'limitCpuUse': False, 'enableDynamicallyScaleVm': False,
            'disks': disks, 'nics': nics, 'guestOsDetails': {},
            'extraConfig': {}}
