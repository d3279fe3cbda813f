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

"""Checks made from XenAPI records before anything changes.

Each check is a small pure function over the records xapi returns (dicts
as ``*.get_record`` gives them; 64-bit integers arrive as strings over
XML-RPC), raising a specific error that names the VDI, SR or host and says
what to do. The engine gathers the records and calls these in order; they
are tested alone, without a pool.
"""

from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.xenapi import errors

MiB = 1 << 20

#: SR types whose VHDs are thick (LVM): a copied disk takes its whole
#: virtual size on the destination.
THICK_SR_TYPES = frozenset(['lvm', 'lvmoiscsi', 'lvmohba', 'lvmofcoe'])

#: VM power states a storage migration accepts, and whether it is live.
POWER_STATES = {'Running': True, 'Halted': False}


def as_int(value):
    """A XenAPI int64 (a string over XML-RPC) as an int.

    >>> as_int('10737418240'), as_int(5), as_int('')
    (10737418240, 5, 0)
    """
    return int(value) if value not in (None, '') else 0


def label(kind, record):
    """How a message names an object: kind, uuid and name.

    >>> label('SR', {'uuid': 'c0ffee', 'name_label': 'Local storage'})
    "SR c0ffee 'Local storage'"
    """
    name = record.get('name_label')
    return '%s %s%s' % (kind, record.get('uuid', '?'),
                        " '%s'" % name if name else '')


def parse_destination(dest):
    """``POOL`` or ``POOL/HOST`` -> ``(pool, host or None)``.

    >>> parse_destination('pool-b/xs-b2'), parse_destination('pool-b')
    (('pool-b', 'xs-b2'), ('pool-b', None))
    """
    pool, _sep, host = dest.partition('/')
    return pool, host or None


def live(vm):
    """Whether the VM moves live; refuse power states xapi cannot move.

    :param vm: the VM record.
    """
    state = vm.get('power_state')
    if state not in POWER_STATES:
        raise errors.XenAPIError(
            code='VM_BAD_POWER_STATE', detail='%s is %s: start it (or shut '
            'it down) before a storage migration' % (label('VM', vm),
                                                     str(state).lower()))
    return POWER_STATES[state]


def check_allowed(vm, operation='migrate_send'):
    """The VM allows ``operation`` now (xapi's ``allowed_operations``)."""
    if operation not in vm.get('allowed_operations', ()):
        busy = sorted(set((vm.get('current_operations') or {}).values()))
        raise errors.XenAPIError(
            code='OPERATION_NOT_ALLOWED', detail='xapi does not allow %s '
            'on %s now%s' % (operation, label('VM', vm),
                             '; it is busy with %s' % ', '.join(busy)
                             if busy else ''))


def disk_vdis(vbds):
    """The VDI refs of a VM's disks, in device order.

    :param vbds: ``{vbd_ref: vbd record}`` of the VM.
    :raises XenAPIError: a CD is inserted (eject it first: an ISO does
        not move with the VM).
    """
    out = []
    for _ref, vbd in sorted(vbds.items(),
                            key=lambda kv: str(kv[1].get('userdevice'))):
        if vbd.get('empty'):
            continue
        if vbd.get('type') == 'CD':
            raise errors.XenAPIError(
                code='VBD_NOT_EMPTY', detail='the VM has a CD in drive %s; '
                'eject it first (xe vm-cd-eject), an ISO does not move '
                'with the VM' % vbd.get('userdevice'))
        out.append(vbd['VDI'])
    return out


def full_vdi_map(disks, snapshots, vdi_map):
    """Every VDI of the VM and of its snapshots, mapped to an SR.

    xapi requires the snapshots' VDIs in the map too; they go where the
    disk they are a snapshot of goes, unless mapped explicitly.

    :param disks: ``{uuid: snapshot_of uuid or None}`` of the VM's disks.
    :param snapshots: the same for the VDIs of the VM's snapshots.
    :param vdi_map: ``{VDI uuid: destination SR}`` as asked for.
    :returns: the complete map.
    :raises VDINotInMap: a disk, or a snapshot VDI whose disk is gone, is
        not mapped; every such VDI is named.
    :raises XenAPIError: the map names a VDI that is not the VM's.

    >>> full_vdi_map({'a': None}, {'s': 'a'}, {'a': 'sr2'})
    {'a': 'sr2', 's': 'sr2'}
    """
    foreign = sorted(set(vdi_map) - set(disks) - set(snapshots))
    if foreign:
        raise errors.XenAPIError(
            code='VDI_NOT_IN_VM', detail='VDI %s is not a disk of the VM '
            'or of its snapshots; map only the VM\'s disks'
            % ', '.join(foreign))
    out = dict(vdi_map)
    missing = sorted(u for u in disks if u not in out)
    for uuid, of in sorted(snapshots.items()):
        if uuid in out:
            continue
        if of in out and of in disks:
            out[uuid] = out[of]
        else:
            missing.append(uuid)
    if missing:
        raise errors.VDINotInMap(vdis=missing, code='VDI_NOT_IN_MAP')
    return out


def resolve_vifs(vifs, vif_map, cross_pool):
    """The VIF map by VIF uuid; keys may be uuid, device or MAC.

    :param vifs: ``{uuid: VIF record}`` of the VM.
    :param vif_map: ``{uuid | device | MAC: network}`` as asked for.
    :param cross_pool: the VM changes pool: every VIF must be mapped.
    :returns: ``{VIF uuid: network}``.

    >>> resolve_vifs({'v1': {'device': '0', 'MAC': 'aa:bb'}},
    ...              {'0': 'net-b'}, True)
    {'v1': 'net-b'}
    """
    out = {}
    known = set()
    for uuid, vif in vifs.items():
        keys = (uuid, str(vif.get('device')), str(vif.get('MAC')).lower())
        known.update(keys)
        for key in keys:
            for asked, network in vif_map.items():
                if str(asked).lower() == key:
                    out[uuid] = network
    unknown = sorted(str(k) for k in vif_map if str(k).lower() not in known)
    if unknown:
        raise errors.XenAPIError(
            code='VIF_NOT_IN_VM', detail='VIF %s is not a network interface '
            'of the VM (map VIFs by uuid, device number or MAC)'
            % ', '.join(unknown))
    if cross_pool:
        missing = sorted('%s (device %s)' % (u, v.get('device'))
                         for u, v in vifs.items() if u not in out)
        if missing:
            raise errors.VIFNotInMap(vifs=missing, code='VIF_NOT_IN_MAP')
    return out


def vdi_need(vdi, sr_type, headroom=0):
    """Bytes a copy of ``vdi`` takes on an SR of type ``sr_type``.

    Thick (LVM) SRs hold the whole virtual size; thin ones (ext, nfs, ...)
    what the VDI uses now, plus ``headroom`` for a disk the guest writes
    during the migration, never more than the virtual size and its VHD
    metadata.

    >>> vdi_need({'virtual_size': '100', 'physical_utilisation': '40'},
    ...          'lvm'), vdi_need({'virtual_size': '100',
    ...                             'physical_utilisation': '40'}, 'ext', 8)
    (100, 48)
    """
    size = as_int(vdi.get('virtual_size'))
    if sr_type in THICK_SR_TYPES:
        return size
    used = as_int(vdi.get('physical_utilisation')) or size
    return min(used + headroom, size + size // 256 + 2 * MiB)


def sr_free(sr):
    """Free bytes of an SR: ``physical_size - physical_utilisation``.

    >>> sr_free({'physical_size': '1000', 'physical_utilisation': '300'})
    700
    """
    return max(0, as_int(sr.get('physical_size')) -
               as_int(sr.get('physical_utilisation')))


def check_space(sr, vdis, headroom=0, extra=0):
    """The SR can hold copies of ``vdis``; returns the bytes needed.

    :param sr: the destination SR record.
    :param vdis: the VDI records bound for it.
    :param headroom: added to each thin VDI (see :func:`vdi_need`).
    :param extra: added once (e.g. the growth of running disks).
    :raises InsufficientSpace: naming the SR, need and free space.
    """
    need = sum(vdi_need(v, sr.get('type'), headroom) for v in vdis) + extra
    free = sr_free(sr)
    if need > free:
        raise errors.InsufficientSpace(
            sr='%s (uuid %s)' % (sr.get('name_label'), sr.get('uuid')),
            needed=need, free=free, code='SR_BACKEND_FAILURE_44')
    return need


def check_source_space(sr, live_vdis, headroom):
    """The source SR has room for the snapshot xapi takes of each disk.

    A thin SR needs ``headroom`` per live disk, a thick one the disk's
    whole virtual size (its new leaf is inflated).
    """
    if not live_vdis:
        return
    if sr.get('type') in THICK_SR_TYPES:
        need = sum(as_int(v.get('virtual_size')) for v in live_vdis)
    else:
        need = headroom * len(live_vdis)
    free = sr_free(sr)
    if need > free:
        raise errors.XenAPIError(
            code='SR_SOURCE_SPACE_INSUFFICIENT', detail='%s has %s free but '
            'the snapshots that storage migration takes of %d disk(s) need '
            '%s; free space on it (delete old snapshots) and retry'
            % (label('source SR', sr), mig_errors.human_size(free),
               len(live_vdis), mig_errors.human_size(need)))


def check_sr_receives(sr):
    """The SR can be a migration's destination (it may create VDIs)."""
    if sr.get('content_type') == 'iso' or \
            'vdi_create' not in sr.get('allowed_operations', ()):
        raise errors.XenAPIError(
            code='SR_OPERATION_NOT_SUPPORTED', detail='%s (type %s) cannot '
            'receive a disk: it does not allow creating VDIs; choose '
            'another SR' % (label('SR', sr), sr.get('type')))


def check_sr_mirrors(sr):
    """The source SR can snapshot and mirror a running VM's disk."""
    ops = sr.get('allowed_operations', ())
    if 'vdi_snapshot' not in ops or 'vdi_mirror' not in ops:
        raise errors.XenAPIError(
            code='SR_DOES_NOT_SUPPORT_MIGRATION', detail='%s (type %s) does '
            'not support storage migration of a running VM (no snapshot or '
            'mirror); move the disk to an SR that can, or shut the VM down'
            % (label('SR', sr), sr.get('type')))


def check_host(host):
    """The destination host is enabled."""
    if not host.get('enabled', False):
        raise errors.XenAPIError(
            code='HOST_DISABLED', detail='destination %s is disabled (in '
            'maintenance mode, or being evacuated); enable it with "xe '
            'host-enable" or choose another host' % label('host', host))


def version_tuple(version):
    """``'3.2.10'`` -> ``(3, 2, 10)``; non-numeric parts count as 0.

    >>> version_tuple('8.2.1'), version_tuple('1.x')
    ((8, 2, 1), (1, 0))
    """
    out = []
    for part in str(version or '0').split('.'):
        digits = ''.join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def host_version(host):
    sw = host.get('software_version') or {}
    return sw.get('platform_version') or sw.get('product_version') or '0'


def check_versions(src_host, dest_host):
    """A VM moves only to the same or a newer xapi version."""
    src, dst = host_version(src_host), host_version(dest_host)
    if version_tuple(dst) < version_tuple(src):
        raise errors.XenAPIError(
            code='VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', detail='destination '
            '%s runs platform version %s, older than the source %s (%s): a '
            'VM can only move to the same or a newer version; update the '
            'destination pool first' % (label('host', dest_host), dst,
                                        label('host', src_host), src))


def resolve(kind, records, wanted, where='the pool'):
    """The ref of the record whose uuid, or unique name_label, is ``wanted``.

    :param records: ``{ref: record}``.
    :param where: the pool, for the message (e.g. ``"pool pool-b"``).
    :raises XenAPIError: none matches, or the name is ambiguous.
    """
    by_uuid = [r for r, rec in records.items() if rec.get('uuid') == wanted]
    if by_uuid:
        return by_uuid[0]
    named = sorted((rec.get('uuid'), r) for r, rec in records.items()
                   if rec.get('name_label') == wanted)
    if len(named) == 1:
        return named[0][1]
    if named:
        raise errors.XenAPIError(
            code='AMBIGUOUS_NAME', detail='%d %ss of %s are called %r (%s); '
            'name one by uuid' % (len(named), kind, where, wanted,
                                  ', '.join(u for u, _r in named)))
    raise errors.XenAPIError(code='UUID_INVALID', detail='no %s %r in %s '
                             '(give the uuid or the unique name of one)'
                             % (kind, wanted, where))
