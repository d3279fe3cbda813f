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

Each rule cites the xapi source that sets it (xapi-project/xen-api
master, ``ocaml/...``), so that we refuse exactly what xapi would refuse,
only earlier and in words, and never what it allows.
"""

import logging

from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.xenapi import errors

LOG = logging.getLogger(__name__)

MiB = 1 << 20

#: SR types whose VHDs are thick (LVM): a copied disk takes its whole
#: virtual size on the destination.
THICK_SR_TYPES = frozenset(['lvm', 'lvmoiscsi', 'lvmohba', 'lvmofcoe'])

#: VM power states a storage migration accepts, and whether it is live:
#: xapi_vm_lifecycle.ml ``allowed_power_states`` (`migrate_send ->
#: Halted, Suspended, Running); a Paused VM is refused.
POWER_STATES = {'Running': True, 'Halted': False, 'Suspended': False}

#: SM features a VDI's SR needs to move it, and the destination SR's
#: (xapi_vm_migrate.ml ``assert_can_migrate``: required_src_sr_operations,
#: required_dst_sr_operations, checked by ``assert_sr_support_operations``
#: for every VDI that changes SR, whatever the power state).
SOURCE_FEATURES = ('VDI_SNAPSHOT', 'VDI_MIRROR')
DEST_FEATURES = ('VDI_SNAPSHOT', 'VDI_MIRROR_IN')

#: software_version keys that must not decrease on a migration
#: (helpers.ml ``Checks.Migration.version_keys``)
VERSION_KEYS = ('platform_version', 'xapi_build', 'xen')


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
            code='VM_BAD_POWER_STATE', detail='%s is %s: xapi moves only '
            'halted, suspended or running VMs; %s it first'
            % (label('VM', vm), str(state).lower(),
               'unpause' if state == 'Paused' else 'start or shut down'))
    return POWER_STATES[state]


def check_copy(vm, copy, force, cross_pool):
    """Whether xapi allows ``copy`` of this VM here.

    * within a pool, never (xapi_vm_migrate.ml ``migrate_send'``:
      OPERATION_NOT_ALLOWED, "Copy mode is disallowed on intra pool
      storage migration");
    * across pools, of a VM that is not halted only with ``force``
      (``assert_can_migrate``, cross_pool: VM_BAD_POWER_STATE).
    """
    if not copy:
        return
    if not cross_pool:
        raise errors.XenAPIError(
            code='OPERATION_NOT_ALLOWED', detail='xapi does not copy a VM '
            'within its pool (copy=True); use "xe vm-copy" there, or copy '
            'it to another pool')
    state = vm.get('power_state')
    if state != 'Halted' and not force:
        raise errors.XenAPIError(
            code='VM_BAD_POWER_STATE', detail='%s is %s: xapi copies only a '
            'halted VM to another pool, unless forced; shut it down, or '
            'ask again with force=True' % (label('VM', vm),
                                           str(state).lower()))


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

    Empty drives and CDs are left out, as xapi does
    (xapi_vm_migrate.ml ``vdi_filter``): xapi ejects an inserted CD itself
    before it moves the VM (``find_cds_to_eject``, ``eject_cds``).

    :param vbds: ``{vbd_ref: vbd record}`` of the VM.
    """
    out = []
    for _ref, vbd in sorted(vbds.items(),
                            key=lambda kv: str(kv[1].get('userdevice'))):
        if vbd.get('empty') or vbd.get('type') == 'CD':
            continue
        out.append(vbd['VDI'])
    return out


def inserted_cds(vbds):
    """Drives (userdevice) of the VM that hold a CD xapi will eject."""
    return sorted(str(v.get('userdevice')) for v in vbds.values()
                  if v.get('type') == 'CD' and not v.get('empty'))


def full_vdi_map(disks, snapshots, vdi_map, default_sr=None,
                 suspend=(), suspend_sr=None):
    """Every VDI of the VM, of its snapshots and suspend images, mapped.

    xapi requires every disk of the VM in the map (xapi_vm_migrate.ml
    ``check_vdi_map``). The others it places itself in ``migrate_send'``:
    a VDI of a snapshot goes where the VDI it is a snapshot of goes; one
    whose original is gone (or not mapped), to the destination pool's
    default SR; a suspend image to the pool's (or host's) suspend-image
    SR, else the default SR; with no such SR, VDI_NOT_IN_MAP. We place
    them the same way, explicitly.

    :param disks: ``{uuid: None}`` of the VM's disks.
    :param snapshots: ``{uuid: snapshot_of uuid or None}`` of the VDIs of
        the VM's snapshots.
    :param vdi_map: ``{VDI uuid: destination SR}`` as asked for.
    :param default_sr: the destination pool's default SR, or None.
    :param suspend: uuids of suspend-image VDIs (of the VM, snapshots).
    :param suspend_sr: the destination's suspend-image SR, or None.
    :returns: the complete map.
    :raises VDINotInMap: a disk, or a VDI xapi could not place, is not
        mapped; every such VDI is named.
    :raises XenAPIError: the map names a VDI that is not the VM's.

    >>> full_vdi_map({'a': None}, {'s': 'a', 'o': 'gone'}, {'a': 'sr2'},
    ...              default_sr='d')
    {'a': 'sr2', 'o': 'd', 's': 'sr2'}
    """
    foreign = sorted(set(vdi_map) - set(disks) - set(snapshots) -
                     set(suspend))
    if foreign:
        raise errors.XenAPIError(
            code='VDI_NOT_IN_VM', detail='VDI %s is not a disk of the VM '
            'or of its snapshots; map only the VM\'s disks'
            % ', '.join(foreign))
    out = dict(vdi_map)
    missing = sorted(u for u in disks if u not in out)
    extra = sorted([(u, of, False) for u, of in snapshots.items()] +
                   [(u, None, True) for u in suspend])
    for uuid, of, is_suspend in extra:
        if uuid in vdi_map:
            continue
        if of in vdi_map:
            out[uuid] = vdi_map[of]
        elif is_suspend and suspend_sr:
            out[uuid] = suspend_sr
        elif default_sr:
            out[uuid] = default_sr
        else:
            missing.append(uuid)
    if missing:
        raise errors.VDINotInMap(vdis=missing, code='VDI_NOT_IN_MAP')
    return dict(sorted(out.items()))


def resolve_vifs(vifs, vif_map, cross_pool, snapshot_vifs=None):
    """The VIF map by VIF uuid; keys may be uuid, device or MAC.

    Within a pool xapi refuses any VIF map (xapi_vm_migrate.ml
    ``assert_can_migrate``, intra_pool: OPERATION_NOT_ALLOWED, "all VIFs
    must be on the same network"): the map is resolved here and
    :func:`intra_pool_vif_map` keeps only what would change, to refuse it.
    Across pools every VIF of the VM *and
    of its snapshots* must be mapped, or share its MAC with a mapped VIF
    (``infer_vif_map``): a snapshot's VIF follows the VIF of the VM with
    its MAC, as xapi infers it, and is sent explicitly.

    :param vifs: ``{uuid: VIF record}`` of the VM.
    :param vif_map: ``{uuid | device | MAC: network}`` as asked for; a
        snapshot's VIF may be named by uuid or MAC (devices repeat).
    :param cross_pool: the VM changes pool.
    :param snapshot_vifs: ``{uuid: VIF record}`` of the VM's snapshots
        (a ``snapshot`` key names the snapshot in messages).
    :returns: ``{VIF uuid: network}``.

    >>> resolve_vifs({'v1': {'device': '0', 'MAC': 'aa:bb'}},
    ...              {'0': 'net-b'}, True, {'s1': {'MAC': 'AA:BB'}})
    {'v1': 'net-b', 's1': 'net-b'}
    """
    snapshot_vifs = snapshot_vifs or {}
    out = {}
    known = set()
    for group, with_device in ((vifs, True), (snapshot_vifs, False)):
        for uuid, vif in group.items():
            keys = (uuid, str(vif.get('MAC')).lower()) + (
                (str(vif.get('device')),) if with_device else ())
            known.update(keys)
            for key in keys:
                for asked, network in vif_map.items():
                    if str(asked).lower() == key:
                        out[uuid] = network
    unknown = sorted(str(k) for k in vif_map if str(k).lower() not in known)
    if unknown:
        raise errors.XenAPIError(
            code='VIF_NOT_IN_VM', detail='VIF %s is not a network interface '
            'of the VM or of its snapshots (map VIFs by uuid, device number '
            'or MAC)' % ', '.join(unknown))
    if not cross_pool:
        return out
    missing = sorted('%s (device %s)' % (u, v.get('device'))
                     for u, v in vifs.items() if u not in out)
    by_mac = {str(vifs[u].get('MAC')).lower(): n for u, n in out.items()
              if u in vifs}
    for uuid, vif in sorted(snapshot_vifs.items()):
        if uuid in out:
            continue
        mac = str(vif.get('MAC')).lower()
        if mac in by_mac:
            out[uuid] = by_mac[mac]
        else:
            missing.append('%s (of snapshot %s, MAC %s)' % (
                uuid, vif.get('snapshot', '?'), vif.get('MAC')))
    if missing:
        raise errors.VIFNotInMap(vifs=missing, code='VIF_NOT_IN_MAP')
    return out


def named_vif_map(vif_map, vifs, net_names):
    """A VIF map given with the VIFs' own names, as xapi VIF keys.

    A VIF the agent made keeps the name it was made with
    (``other_config:xsm-vif``, e.g. a Neutron port id, what the agent's
    VM lists); such a key becomes the VIF's uuid. An entry that maps a
    VIF to its own name (Nova's "the same network") keeps the VIF on the
    network of the same name (name_label) in the destination pool.

    :param vif_map: ``{key: network}`` as asked for.
    :param vifs: ``{uuid: VIF record}`` of the VM.
    :param net_names: ``{network ref: name_label}`` of those VIFs.

    >>> named_vif_map({'port-1': 'port-1', '1': 'n2'},
    ...               {'u1': {'other_config': {'xsm-vif': 'port-1'},
    ...                       'network': 'N1'}}, {'N1': 'guests'})
    {'u1': 'guests', '1': 'n2'}
    """
    by_name = {}
    for uuid, vif in vifs.items():
        name = (vif.get('other_config') or {}).get('xsm-vif')
        if name:
            by_name[name] = uuid
    out = {}
    for key, network in vif_map.items():
        uuid = by_name.get(key)
        if uuid is None:
            out[key] = network
            continue
        if network == key:
            network = net_names.get(vifs[uuid].get('network'), network)
        out[uuid] = network
    return out


def intra_pool_vif_map(vif_map, vifs):
    """The VIF map to send within a pool: always empty.

    xapi refuses any VIF map within a pool (xapi_vm_migrate.ml
    ``assert_can_migrate``, intra_pool: OPERATION_NOT_ALLOWED). Entries
    that keep a VIF on its network change nothing and are dropped; any
    other is refused here, in words.

    :param vif_map: ``{VIF ref: network ref}`` as asked for.
    :param vifs: ``{VIF ref: VIF record}`` (``network``, ``device``).

    >>> intra_pool_vif_map({'v': 'n1'}, {'v': {'network': 'n1'}})
    {}
    """
    moving = sorted('device %s' % vifs[v].get('device')
                    for v, n in vif_map.items()
                    if vifs[v].get('network') != n)
    if moving:
        raise errors.XenAPIError(
            code='OPERATION_NOT_ALLOWED', detail='xapi cannot move a VIF '
            'to another network while the VM moves within its pool (%s); '
            'leave the VIF map empty, and change the network of the VIF '
            'by itself' % ', '.join(moving))
    return {}


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


def sm_features(sm_records):
    """``{SR type: set of SM feature names}`` from ``SM.get_all_records``.

    The SM record's ``features`` map (``{"VDI_MIRROR": "2", ...}``) is
    what xapi checks (xapi_sr_operations.ml ``features_of_sr``); not
    ``SR.allowed_operations``, which xapi empties while any operation
    (scan, snapshot, backup) runs on the SR.

    >>> sm_features({'r': {'type': 'nfs', 'features': {'VDI_MIRROR': '2'}}})
    {'nfs': {'VDI_MIRROR'}}
    """
    out = {}
    for rec in sm_records.values():
        names = set(rec.get('features') or {})
        # "VDI_MIRROR/2" in the legacy form (smint.ml parse_string_int64)
        names = {n.split('/')[0] for n in names}
        out.setdefault(rec.get('type'), set()).update(names)
    return out


def missing_features(features, needed):
    """Features of ``needed`` the set lacks.

    VDI_MIRROR gives VDI_MIRROR_IN (smint.ml ``Feature.has_capability``).

    >>> missing_features({'VDI_MIRROR'}, DEST_FEATURES)
    ['VDI_SNAPSHOT']
    """
    have = set(features or ())
    if 'VDI_MIRROR' in have:
        have.add('VDI_MIRROR_IN')
    return [f for f in needed if f not in have]


def _check_features(sr, features, needed, role):
    missing = missing_features(features.get(sr.get('type')), needed)
    if missing:
        raise errors.XenAPIError(
            code='SR_DOES_NOT_SUPPORT_MIGRATION', detail='%s (type %s) '
            'cannot %s a disk in a storage migration: its storage driver '
            'lacks %s; choose an SR whose driver can (ext, nfs, lvm, '
            'lvmoiscsi, lvmohba)' % (label('SR', sr), sr.get('type'), role,
                                     ', '.join(missing)))


def check_sr_receives(sr, features):
    """The SR can receive a moving VDI.

    SM features VDI_SNAPSHOT and VDI_MIRROR_IN (xapi_vm_migrate.ml
    ``assert_sr_support_operations``).

    :param features: :func:`sm_features` of the SR's pool.
    """
    _check_features(sr, features, DEST_FEATURES, 'receive')


def check_sr_mirrors(sr, features):
    """A VDI of this SR can move.

    SM features VDI_SNAPSHOT and VDI_MIRROR, whatever the VM's power
    state (xapi_vm_migrate.ml ``assert_sr_support_operations``).

    :param features: :func:`sm_features` of the SR's pool.
    """
    _check_features(sr, features, SOURCE_FEATURES, 'send')


def check_migration_network(host, network, pifs):
    """The destination host has an address on the migration network.

    xapi_host.ml ``migrate_receive``: a PIF of the network on that host
    (else HOST_CANNOT_ATTACH_NETWORK), with an IP (else
    PIF_HAS_NO_NETWORK_CONFIGURATION when its mode is None,
    INTERFACE_HAS_NO_IP otherwise). Only the destination is checked, as
    xapi does.

    :param host: the destination host's record (``uuid`` and name).
    :param network: the network's record.
    :param pifs: records of the PIFs of that network on that host.
    """
    where = '%s on %s' % (label('network', network), label('host', host))
    if not pifs:
        raise errors.XenAPIError(
            code='HOST_CANNOT_ATTACH_NETWORK', detail='%s: the host has no '
            'interface on that network to receive the migration; choose '
            'another migration network or give the host a PIF on it'
            % where)
    pif = pifs[0]
    if pif.get('IP'):
        return
    if pif.get('primary_address_type') == 'IPv6':
        if [a for a in pif.get('IPv6') or () if a and
                not a.lower().startswith('fe80')]:
            return
        mode = pif.get('ipv6_configuration_mode')
    else:
        mode = pif.get('ip_configuration_mode')
    if mode == 'None':
        raise errors.XenAPIError(
            code='PIF_HAS_NO_NETWORK_CONFIGURATION', detail='%s: its '
            'interface %s has no IP configuration; configure one ("xe '
            'pif-reconfigure-ip") or choose another migration network'
            % (where, pif.get('device') or pif.get('uuid')))
    raise errors.XenAPIError(
        code='INTERFACE_HAS_NO_IP', detail='%s: its interface %s has no IP '
        'address yet (DHCP?); fix it or choose another migration network'
        % (where, pif.get('device') or pif.get('uuid')))


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


def xapi_version(text):
    """A version as xapi compares it.

    helpers.ml ``Checks.version_numbers_of_string``: ``A.B.C-P.Q`` ->
    ``[A, B, C, P, Q]``, parts that are not numbers dropped; a missing
    key is ``0.0.0``.

    >>> xapi_version('4.17.5-20'), xapi_version('25.6.0-1.x')
    ([4, 17, 5, 20], [25, 6, 0, 1])
    >>> xapi_version(None)
    [0, 0, 0]
    """
    parts = str(text if text is not None else '0.0.0').split('-')
    words = parts[0].split('.') + (parts[1].split('.') if len(parts) > 1
                                   else [])
    out = []
    for word in words:
        try:
            out.append(int(word))
        except ValueError:
            pass
    return out


def host_version(host, key='platform_version'):
    sw = host.get('software_version') or {}
    return sw.get(key)


def check_versions(src_host, dest_host, cross_pool=True):
    """A VM moves only to hosts whose versions do not decrease.

    helpers.ml ``Checks.Migration.host_versions_not_decreasing`` compares
    ``platform_version``, ``xapi_build`` and ``xen``; xapi_vm_migrate.ml
    ``assert_can_migrate`` refuses with VM_HOST_INCOMPATIBLE_VERSION_MIGRATE
    across pools, NOT_SUPPORTED_DURING_UPGRADE within one.
    """
    for key in VERSION_KEYS:
        src, dst = host_version(src_host, key), host_version(dest_host, key)
        if xapi_version(dst) >= xapi_version(src):
            continue
        what = '%s %s is older than %s\'s %s' % (
            key, dst or 'unknown', label('host', src_host), src)
        if cross_pool:
            raise errors.XenAPIError(
                code='VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', detail='the '
                'destination %s runs an older version (%s): a VM can only '
                'move to the same or a newer version; update the '
                'destination pool first' % (label('host', dest_host), what))
        raise errors.XenAPIError(
            code='NOT_SUPPORTED_DURING_UPGRADE', detail='%s is not updated '
            'yet (%s): within a pool a VM moves only to a host as new as '
            'its own; finish the pool\'s update first'
            % (label('host', dest_host), what))


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
