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

"""CloudStack's MigrateWithStorage commands as its Gson writes them.

Written by hand from CloudStack's Java classes (4.19): Command
(contextMap, wait, bypassHostMaintenance), VirtualMachineTO, DiskTO,
VolumeObjectTO (with a PrimaryDataStoreTO), NicTO and NetworkTO, VolumeTO,
StorageFilerTO, com.cloud.utils.Pair. Every field is here, also those
xsm-driver ignores; null fields are left out, as Gson leaves them out.
Placeholders (``$name``) are filled by :func:`render`.
"""

import json
import string

VOLUME_OBJECT = '''{"org.apache.cloudstack.storage.to.VolumeObjectTO": {
  "uuid": "$volume_uuid", "volumeType": "$volume_type",
  "dataStore": {"org.apache.cloudstack.storage.to.PrimaryDataStoreTO": {
    "uuid": "$pool_uuid", "name": "$source_sr", "poolType": "EXT",
    "host": "10.0.0.21", "path": "/$source_sr", "port": 0,
    "url": "EXT://10.0.0.21//$source_sr/?ROLE=Primary&STOREUUID=$pool_uuid",
    "id": 3, "isManaged": false, "details": {}}},
  "name": "$volume_name", "size": $size, "path": "$path",
  "volumeId": $volume_id, "vmName": "$vm_name", "accountId": 2,
  "format": "VHD", "provisioningType": "THIN", "poolId": 3,
  "id": $volume_id, "deviceId": $device, "bytesReadRate": 0,
  "bytesWriteRate": 0, "iopsReadRate": 0, "iopsWriteRate": 0,
  "cacheMode": "NONE", "hypervisorType": "XenServer",
  "directDownload": false, "deployAsIs": false}}'''

DISK = '''{"data": $data, "diskSeq": $device, "path": "$path",
  "type": "$volume_type",
  "_details": {"managed": "false", "storageHost": "10.0.0.21",
               "storagePort": "0", "volumeSize": "$size"}}'''

ISO_DISK = '''{"data": {"org.apache.cloudstack.storage.to.TemplateObjectTO": {
    "id": 0, "format": "ISO", "accountId": 0, "hvm": false,
    "bootable": false, "directDownload": false, "deployAsIs": false,
    "followRedirects": false}},
  "diskSeq": 3, "type": "ISO"}'''

NIC = '''{"deviceId": $device, "networkRateMbps": 200,
  "networkRateMulticastMbps": 10, "defaultNic": $default,
  "pxeDisable": false, "nicUuid": "6a0d8f43-3c2e-4b5a-9d61-8e1f0000000$device",
  "nicSecIps": [], "details": {"PromiscuousMode": "false",
  "MacAddressChanges": "true", "ForgedTransmits": "true",
  "MacLearning": "false"}, "dpdkDisabled": false, "mtu": 1500,
  "uuid": "0f1c2d3e-4a5b-4c6d-8e7f-90a1b2c3d4e5", "ip": "10.1.1.1$device",
  "netmask": "255.255.255.0", "gateway": "10.1.1.1",
  "mac": "02:00:3a:cf:00:0$device", "dns1": "10.1.1.1",
  "broadcastType": "Vlan", "type": "Guest",
  "broadcastUri": "vlan://100", "isolationUri": "vlan://100",
  "isSecurityGroupEnabled": false, "name": "$network"}'''

VM = '''{"id": 42, "name": "$vm_name", "bootloader": "PyGrub",
  "state": "Running", "type": "User", "cpus": 1, "speed": 500,
  "minSpeed": 500, "maxSpeed": 500, "minRam": 536870912,
  "maxRam": 536870912, "hostName": "web-1", "arch": "x86_64",
  "os": "CentOS 7", "platformEmulator": "CentOS 7",
  "bootArgs": " vm_name=web-1", "enableHA": false, "limitCpuUse": false,
  "enableDynamicallyScaleVm": false, "vncPassword": "gO2x9qB7",
  "vncAddr": "10.0.0.21",
  "params": {"platform": "viridian:true;acpi:1;apic:true;pae:true;nx:true",
             "Message.ReservedCapacityFreed.Flag": "false"},
  "uuid": "$vm_uuid", "disks": $disks, "nics": $nics,
  "configDriveLabel": "config-2", "guestOsDetails": {},
  "extraConfig": {}}'''

VOLUME_TO = '''{"id": $volume_id, "name": "$volume_name",
  "mountPoint": "/$source_sr", "path": "$path", "size": $size,
  "type": "$volume_type", "storagePoolType": "EXT",
  "storagePoolUuid": "$pool_uuid", "deviceId": $device,
  "chainInfo": "", "bytesReadRate": 0, "bytesWriteRate": 0,
  "iopsReadRate": 0, "iopsWriteRate": 0, "chainSize": 0}'''

FILER = '''{"id": 4, "uuid": "$label", "host": "10.0.0.22",
  "path": "/$label", "userInfo": "", "port": 0, "type": "EXT"}'''

BASE = '"contextMap": {"logid": "5e2e8c41"}, "wait": 0, ' \
       '"bypassHostMaintenance": false'

RECEIVE = '''[{"com.cloud.agent.api.MigrateWithStorageReceiveCommand": {
  "vm": $vm, "volumeToStorageUuid": $volume_pairs, %s}}]''' % BASE

SEND = '''[{"com.cloud.agent.api.MigrateWithStorageSendCommand": {
  "vm": $vm, "volumeToSr": $volume_to_sr, "nicToNetwork": $nic_to_network,
  "token": $token, %s}}]''' % BASE

COMPLETE = '''[{"com.cloud.agent.api.MigrateWithStorageCompleteCommand": {
  "vm": $vm, %s}}]''' % BASE

MIGRATE = '''[{"com.cloud.agent.api.MigrateWithStorageCommand": {
  "vm": $vm, "volumeToFilerAsList": $filer_pairs, %s}}]''' % BASE


def render(template, **values):
    return string.Template(template).substitute(
        {k: v if isinstance(v, str) else json.dumps(v)
         for k, v in values.items()})


def volume_values(vm, index, disk, vdi_size, pool_uuid, source_sr):
    return dict(volume_uuid='9a5c%04d-1b2c-4d3e-8f40-5a6b7c8d9e0f' % index,
                volume_type='ROOT' if index == 0 else 'DATADISK',
                pool_uuid=pool_uuid, source_sr=source_sr,
                volume_name='%s-%d' % ('ROOT' if index == 0 else 'DATA',
                                       42 + index),
                size=vdi_size, path=disk['vdi'], volume_id=100 + index,
                vm_name=vm['name'], device=index)


def vm_json(vm, sizes, source_sr='sr-a', networks=None,
            pool_uuid='7d5a16c5-9f3b-3c4e-8a2d-1e0f9b8c7d6a'):
    """A ``VirtualMachineTO`` of an xsm VM record (and an ISO drive)."""
    disks = []
    for index, disk in enumerate(vm['disks']):
        values = volume_values(vm, index, disk, sizes[index], pool_uuid,
                               source_sr)
        data = render(VOLUME_OBJECT, **values)
        disks.append(render(DISK, data=data, **values))
    disks.append(ISO_DISK)
    nics = [render(NIC, device=str(i), default='true' if i == 0 else 'false',
                   network=(networks or {}).get(vif, vif))
            for i, vif in enumerate(vm.get('vifs') or ())]
    return render(VM, vm_name=vm['name'], vm_uuid=vm['uuid'],
                  disks='[%s]' % ', '.join(disks),
                  nics='[%s]' % ', '.join(nics))


def volume_to_json(vm, index, size, source_sr='sr-a',
                   pool_uuid='7d5a16c5-9f3b-3c4e-8a2d-1e0f9b8c7d6a'):
    return render(VOLUME_TO, **volume_values(vm, index, vm['disks'][index],
                                             size, pool_uuid, source_sr))


def receive(vm, sizes, labels, source_sr='sr-a'):
    pairs = ['{"t": %s, "u": %s}' % (volume_to_json(vm, i, sizes[i],
                                                    source_sr),
                                     json.dumps(labels[i]))
             for i in range(len(vm['disks']))]
    return render(RECEIVE, vm=vm_json(vm, sizes, source_sr),
                  volume_pairs='[%s]' % ', '.join(pairs))


def send(vm, sizes, receive_answer, source_sr='sr-a'):
    """The Send command CloudStack builds from a Receive answer."""
    fields = receive_answer['com.cloud.agent.api.'
                            'MigrateWithStorageReceiveAnswer']
    return render(SEND, vm=vm_json(vm, sizes, source_sr),
                  volume_to_sr=json.dumps(fields['volumeToSr']),
                  nic_to_network=json.dumps(fields['nicToNetwork']),
                  token=json.dumps(fields['token']))


def complete(vm, sizes, source_sr='sr-a'):
    return render(COMPLETE, vm=vm_json(vm, sizes, source_sr))


def migrate(vm, sizes, labels, source_sr='sr-a'):
    pairs = ['{"t": %s, "u": %s}' % (volume_to_json(vm, i, sizes[i],
                                                    source_sr),
                                     render(FILER, label=labels[i]))
             for i in range(len(vm['disks']))]
    return render(MIGRATE, vm=vm_json(vm, sizes, source_sr),
                  filer_pairs='[%s]' % ', '.join(pairs))
