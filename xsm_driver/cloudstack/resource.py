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

"""The CloudStack hypervisor resource of an xsm host.

CloudStack's management server moves a VM with its volumes to a host of
another cluster in three commands (XenServerStorageMotionStrategy); this
resource executes each on xsm-driver's migration engine, where the source
host drives the whole migration:

``MigrateWithStorageReceiveCommand`` (to the destination)
    Validation only, nothing is made: the destination's agent answers, it
    has an SR for every volume's label and does not have the VM yet. The
    answer's ``volumeToSr`` and ``nicToNetwork`` name the destination SR
    and network of each volume and NIC, and its ``token`` names the
    destination host (XenServer's ``Host.migrate_receive`` token).
``MigrateWithStorageSendCommand`` (to the source)
    The migration itself: ``migrate_vm`` on the source's agent with the
    VDI and VIF maps built from the Receive answer, waited for until it
    ends. The engine's preflight refuses, before anything changes, what
    cannot work (space, unmapped disks, a chain too deep, too many
    migrations); on any failure the engine aborts, the VM keeps running on
    the source and the destination is left with nothing.
``MigrateWithStorageCompleteCommand`` (to the destination)
    Confirmation: the VM is on the destination; the answer's ``volumeTos``
    give each volume's new path (the VDI uuid on the destination SR).

The single-cluster ``MigrateWithStorageCommand`` does all three at once.
A command that fails answers ``result: false`` with a ``details`` message
naming what failed and what to do.
"""

import logging
import time
import uuid as uuidlib

import oslo_messaging as messaging

from xsm_driver.cloudstack import commands as cmds
from xsm_driver.cloudstack import gson
from xsm_driver.cloudstack import jobs
from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod

LOG = logging.getLogger(__name__)


class MigrationFailed(exception.XSMError):
    """A migration the engine started and that ended other than done."""

    msg_fmt = ("migration %(id)s of VM %(vm)s from host %(source)s to host "
               "%(dest)s %(phase)s: %(error)s. The VM keeps running on "
               "%(source)s and nothing of it is left on %(dest)s")


def strip_traceback(text):
    """``text`` without a (remote) traceback (see jobs.strip_traceback)."""
    return jobs.strip_traceback(text)


def describe(exc):
    """An operator's one-line message for any exception.

    Never a traceback: oslo.messaging appends the remote one to the
    message of an exception it rebuilds (and RemoteError carries it).
    """
    if isinstance(exc, messaging.RemoteError):
        text = 'remote error: %s: %s' % (exc.exc_type, exc.value)
    elif isinstance(exc, exception.XSMError):
        text = str(exc)
    elif isinstance(exc, messaging.MessagingTimeout):
        text = ('an xsm-agent did not answer in time (%s): check that '
                'xsm-agent runs on the host and reaches the message broker'
                % exc)
    elif isinstance(exc, messaging.MessagingException):
        text = 'control plane error: %s' % exc
    else:
        text = '%s: %s' % (type(exc).__name__, exc)
    return strip_traceback(text)


def nic_vif(vifs, nic):
    """The VIF of a VM a CloudStack ``NicTO`` names, or None.

    XenServer's resource finds a NIC's VIF by its MAC address. An xsm VM's
    VIF keeps its MAC (``MAC@NETWORK``, see
    :func:`xsm_driver.core.migration.host.vif_entry`) or is a name: the
    VIF with the NIC's ``mac`` (case aside; or named by it) is taken
    first, then the one on its ``name`` (the network), and only then the
    VIF at the NIC's ``deviceId``, as before.

    >>> nic_vif(['net0', '02:00:00:00:00:0a'],
    ...         cmds.Nic({'deviceId': 0, 'mac': '02:00:00:00:00:0A'}, 'c'))
    '02:00:00:00:00:0a'
    >>> nic_vif(['02:00:00:00:00:01@a', '02:00:00:00:00:0a@b'],
    ...         cmds.Nic({'deviceId': 0, 'mac': '02:00:00:00:00:0A'}, 'c'))
    '02:00:00:00:00:0a@b'
    >>> nic_vif(['a', 'b'], cmds.Nic({'deviceId': 0, 'name': 'b'}, 'c'))
    'b'
    >>> nic_vif(['a', 'b'], cmds.Nic({'deviceId': 1}, 'c'))
    'b'
    >>> nic_vif(['a'], cmds.Nic({'deviceId': 3}, 'c')) is None
    True
    """
    if isinstance(nic.mac, str) and nic.mac:
        for vif in vifs:
            if isinstance(vif, str) and nic.mac.lower() in (
                    vif.lower(), host_mod.vif_parts(vif)[1]):
                return vif
    if isinstance(nic.name, str):
        named = [v for v in vifs if isinstance(v, str) and
                 host_mod.vif_parts(v)[0] == nic.name]
        if len(named) == 1:
            return named[0]
    if nic.device is not None and 0 <= nic.device < len(vifs):
        return vifs[nic.device]
    return None


class Resource:
    """Execute CloudStack's MigrateWithStorage commands for one host.

    :param host: the host the commands are addressed to (an ``[agent]host``
        name).
    :param client: ``client(host)`` returns an
        :class:`xsm_driver.core.rpc.api.AgentAPI` of that host.
    :param hosts: every host a token or ``tgtHost`` may name (empty: any).
    :param sr_labels: SR names by CloudStack's label for them.
    :param migration_timeout: seconds a migration may take.
    """

    def __init__(self, host, client, hosts=(), sr_labels=None,
                 migration_timeout=3600, poll_interval=0.2):
        self.host = host
        self._client = client
        self.hosts = list(hosts)
        self.sr_labels = dict(sr_labels or {})
        self.migration_timeout = migration_timeout
        self.poll_interval = poll_interval
        self._handlers = {cmds.RECEIVE: self.receive, cmds.SEND: self.send,
                          cmds.COMPLETE: self.complete,
                          cmds.MIGRATE: self.migrate}

    # -- entry points --------------------------------------------------------

    def handle(self, text):
        """Gson commands in, Gson answers out (one answer per command).

        :raises gson.GsonError: the text is not CloudStack's agent JSON.
        """
        answers = [self.execute(name, fields)
                   for name, fields in gson.decode(text)]
        return gson.encode([(a.name, a.to_fields()) for a in answers])

    def execute(self, name, fields):
        """Execute one command; never raises.

        :returns: a :class:`~xsm_driver.cloudstack.commands.Answer`.
        """
        handler = self._handlers.get(name)
        if handler is None:
            return cmds.failure(name, cmds.CommandError(
                command=cmds.short_name(name),
                reason='unsupported command issued to host %s: the xsm-driver '
                'CloudStack resource executes %s' % (self.host, ', '.join(
                    cmds.short_name(n) for n in self._handlers))))
        LOG.info('host %s: %s', self.host, cmds.short_name(name))
        try:
            return handler(fields)
        except Exception as exc:
            if not isinstance(exc, (exception.XSMError,
                                    messaging.MessagingException)):
                LOG.exception('host %s: %s failed', self.host,
                              cmds.short_name(name))
            reason = exc.kwargs['reason'] if isinstance(
                exc, cmds.CommandError) else describe(exc)
            details = '%s on host %s failed: %s' % (
                cmds.short_name(name), self.host, reason)
            LOG.warning('%s', details)
            return cmds.failure(name, exc, details)

    # -- helpers -------------------------------------------------------------

    def client(self, host=None):
        return self._client(host or self.host)

    def sr_name(self, label, srs=(), host=None):
        """The SR of CloudStack's storage label for it.

        The management server labels a pool's SR with the pool's uuid
        (CitrixHelper.getSRNameLabel); the pools xsm-cloudstack-api lists
        have uuids derived from host and SR names (inventory.pool_id), so
        those are known without [cloudstack]sr_labels; any other label is
        looked up there, else taken as the SR's name.
        """
        if label in self.sr_labels:
            return self.sr_labels[label]
        if host is not None:
            from xsm_driver.cloudstack import inventory   # (it imports us)
            for name in srs:
                if label == inventory.pool_id(host, name):
                    return name
        return label

    def _check_host(self, host, what):
        if not host:
            raise cmds.CommandError(command=what, reason='no destination '
                                    'host given')
        if self.hosts and host not in self.hosts:
            raise cmds.CommandError(
                command=what, reason='host %r is not managed here (hosts: '
                '%s); add it to [cloudstack]hosts' % (host,
                                                      ', '.join(self.hosts)))
        return host

    def _find_vm(self, host, vm):
        """The record of ``vm`` on ``host``, or None.

        By name, as XenServer's resource finds a VM by its name-label (the
        instance name); by uuid among namesakes, or when no name matches.
        """
        records = self.client(host).vm_list()
        named = [r for r in records if r['name'] == vm.name]
        if len(named) == 1:
            return named[0]
        for record in named or records:
            if vm.uuid is not None and record['uuid'] == vm.uuid:
                return record
        return None

    def _srs(self, host):
        return {s['name']: s for s in self.client(host).host_info()['srs']}

    def _dest_srs(self, command, host, labels):
        """SR names on ``host`` for CloudStack's SR labels; refuse unknown."""
        have = self._srs(host)
        out = []
        for label in labels:
            name = self.sr_name(label, have, host)
            if name not in have:
                raise cmds.CommandError(
                    command=cmds.short_name(command),
                    reason='host %s has no SR %r for storage label %r (it '
                    'has: %s); create the SR or map the label in '
                    '[cloudstack]sr_labels' % (host, name, label,
                                               ', '.join(sorted(have))))
            out.append(name)
        return out

    def _migrate(self, record, dest, vdi_map, vif_map):
        """Run a migration on this (the source) host until it ends."""
        agent = self.client(self.host)
        mid = agent.migrate_vm(record['uuid'], dest, vdi_map, vif_map)
        LOG.info('migration %s of VM %s (%s) from %s to %s started', mid,
                 record['uuid'], record['name'], self.host, dest)
        deadline = time.monotonic() + self.migration_timeout
        while True:
            status = agent.migration_get(mid)
            if status.get('finished') is not None:
                break
            if time.monotonic() > deadline:
                LOG.warning('migration %s: no end after %s s, aborting', mid,
                            self.migration_timeout)
                agent.migration_abort(mid)
                self._wait_end(agent, mid)
                raise MigrationFailed(
                    id=mid, vm=record['name'], source=self.host, dest=dest,
                    phase='timed out', error='it did not end within %d s '
                    '([cloudstack]migration_timeout) and was aborted'
                    % self.migration_timeout)
            time.sleep(self.poll_interval)
        if status['phase'] != 'done':
            raise MigrationFailed(id=mid, vm=record['name'],
                                  source=self.host, dest=dest,
                                  phase='ended ' + str(status['phase']),
                                  error=status.get('error') or 'no reason')
        LOG.info('migration %s done, downtime %s ms', mid,
                 status.get('downtime_ms'))
        return status

    def _wait_end(self, agent, mid, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if agent.migration_get(mid).get('finished') is not None:
                return
            time.sleep(self.poll_interval)

    @staticmethod
    def _vif_map(record, nic_pairs, command):
        vifs = list(record.get('vifs') or ())
        out = {}
        for nic, target in nic_pairs:
            vif = nic_vif(vifs, nic)
            if vif is None:
                raise cmds.CommandError(
                    command=cmds.short_name(command),
                    reason='NIC with deviceId %s: VM %s has %d network '
                    'interfaces' % (nic.device, record['name'], len(vifs)))
            network = target.get('network') if isinstance(target, dict) \
                else target
            if network is not None and not isinstance(network, str):
                raise cmds.CommandError(
                    command=cmds.short_name(command),
                    reason='NIC with deviceId %s: the network must be a '
                    'string, not %s' % (nic.device, gson.short(network)))
            mac = host_mod.vif_parts(vif)[1]
            if network and mac:
                # the VIF keeps its MAC on the new network
                network = host_mod.vif_entry({'network': network,
                                              'mac': mac})
            out[vif] = network or vif
        return out

    # -- the commands --------------------------------------------------------

    def receive(self, fields):
        """Destination: check it can receive; answer the maps and token."""
        vm = cmds.vm_of(cmds.RECEIVE, fields)
        if fields.get('volumeToStorageUuid') is not None:
            pairs = cmds.volume_pairs(cmds.RECEIVE, fields,
                                      'volumeToStorageUuid')
            for volume, label in pairs:
                if not isinstance(label, str) or not label:
                    raise cmds.CommandError(
                        command='MigrateWithStorageReceiveCommand',
                        reason='volumeToStorageUuid: the storage label of '
                        'volume %s must be a string (the destination '
                        'pool\'s uuid), not %s'
                        % (volume.path, gson.short(label)))
        elif fields.get('volumeToFiler') is not None:
            # CloudStack before 4.9: StorageFilerTO
            pairs = cmds.filer_pairs(cmds.RECEIVE, fields, 'volumeToFiler')
        else:
            raise cmds.CommandError(
                command='MigrateWithStorageReceiveCommand',
                reason='field \'volumeToStorageUuid\' (or, before '
                'CloudStack 4.9, \'volumeToFiler\') is missing: it maps '
                'each volume to its destination storage')
        srs = self._dest_srs(cmds.RECEIVE, self.host, [u for _, u in pairs])
        if self._find_vm(self.host, vm) is not None:
            raise cmds.CommandError(
                command='MigrateWithStorageReceiveCommand',
                reason='VM %s (%s) is already on host %s' % (
                    vm.name, vm.uuid, self.host))
        token = {'host': self.host, 'id': str(uuidlib.uuid4()),
                 'vm': vm.name}
        return cmds.success(
            cmds.RECEIVE,
            volumeToSr=[gson.pair(v.fields, {'host': self.host, 'sr': sr})
                        for (v, _), sr in zip(pairs, srs)],
            nicToNetwork=[gson.pair(n.fields, {'host': self.host,
                                               'network': n.name})
                          for n in vm.nics],
            token=token)

    def send(self, fields):
        """Source: run the migration to the token's host; wait for it."""
        vm = cmds.vm_of(cmds.SEND, fields)
        token = fields.get('token') or {}
        if not isinstance(token, dict) or not isinstance(
                token.get('host'), (str, type(None))):
            raise cmds.CommandError(
                command='MigrateWithStorageSendCommand',
                reason='token must be the map the '
                'MigrateWithStorageReceiveAnswer gave, with a "host" '
                'string; got %s' % gson.short(token))
        dest = self._check_host(token.get('host'),
                                'MigrateWithStorageSendCommand')
        vdi_map = {}
        for volume, target in cmds.volume_pairs(cmds.SEND, fields,
                                                'volumeToSr'):
            sr = target.get('sr') if isinstance(target, dict) else target
            if not sr or not isinstance(sr, str):
                raise cmds.CommandError(
                    command='MigrateWithStorageSendCommand',
                    reason='volume %s has no destination SR in volumeToSr '
                    '(expected the SR the MigrateWithStorageReceiveAnswer '
                    'gave, got %s)' % (volume.path, gson.short(target)))
            vdi_map[volume.path] = self.sr_name(sr)
        record = self._find_vm(self.host, vm)
        if record is None:
            raise cmds.CommandError(
                command='MigrateWithStorageSendCommand',
                reason='host %s has no VM %s (%s)'
                % (self.host, vm.name, vm.uuid))
        vif_map = self._vif_map(record, cmds.nic_pairs(cmds.SEND, fields),
                                cmds.SEND)
        status = self._migrate(record, dest, vdi_map, vif_map)
        new = (status.get('result') or {}).get('vdis') or {}
        return cmds.success(
            cmds.SEND,
            volumeToSet=[dict(v.fields, path=new.get(v.path, v.path))
                         for v, _ in cmds.volume_pairs(cmds.SEND, fields,
                                                       'volumeToSr')])

    def complete(self, fields):
        """Destination: the VM is here; answer its volumes' new paths."""
        vm = cmds.vm_of(cmds.COMPLETE, fields)
        record = self._find_vm(self.host, vm)
        if record is None:
            raise cmds.CommandError(
                command='MigrateWithStorageCompleteCommand',
                reason='VM %s (%s) is not on host %s: the '
                'MigrateWithStorageSendCommand did not move it here'
                % (vm.name, vm.uuid, self.host))
        return cmds.success(cmds.COMPLETE,
                            volumeTos=self._volume_tos(vm, record, self.host,
                                                       cmds.COMPLETE))

    @staticmethod
    def _volume_tos(vm, record, host, command):
        """The ``VolumeObjectTO`` s of the VM's volumes on ``host``.

        CloudStack's volumes in device order, zipped with the host's disks
        (in device order too).
        """
        volumes = sorted((d for d in vm.disks if d.is_volume),
                         key=lambda d: (d.seq is None, d.seq))
        disks = record['disks']
        if len(volumes) != len(disks):
            raise cmds.CommandError(
                command=cmds.short_name(command),
                reason='VM %s has %d disks on host %s but CloudStack '
                'describes %d volumes' % (record['name'], len(disks), host,
                                          len(volumes)))
        return [cmds.volume_object(v.volume_id, d['vdi'])
                for v, d in zip(volumes, disks)]

    def migrate(self, fields):
        """One command for the whole migration (within a cluster)."""
        vm = cmds.vm_of(cmds.MIGRATE, fields)
        if fields.get('volumeToFilerAsList') is not None:
            pairs = cmds.filer_pairs(cmds.MIGRATE, fields,
                                     'volumeToFilerAsList')
        else:
            raise cmds.CommandError(
                command='MigrateWithStorageCommand',
                reason='volumeToFilerAsList is missing (a volumeToFiler map '
                'has VolumeTO keys, which Gson writes as text and cannot '
                'be read back)')
        if fields.get('tgtHost') is not None and not isinstance(
                fields['tgtHost'], str):
            raise cmds.CommandError(
                command='MigrateWithStorageCommand',
                reason='tgtHost must be a host name, not %s'
                % gson.short(fields['tgtHost']))
        if fields.get('tgtHost'):
            source = self.host
            dest = self._check_host(fields['tgtHost'],
                                    'MigrateWithStorageCommand')
        else:                   # sent to the destination (CloudStack 4.9+)
            dest, source = self.host, None
            for host in self.hosts:
                if host != dest and self._find_vm(host, vm) is not None:
                    source = host
                    break
            if source is None:
                raise cmds.CommandError(
                    command='MigrateWithStorageCommand',
                    reason='no host of %s has VM %s (%s)' % (
                        ', '.join(self.hosts) or '[cloudstack]hosts',
                        vm.name, vm.uuid))
        srs = self._dest_srs(cmds.MIGRATE, dest, [u for _, u in pairs])
        runner = self if source == self.host else Resource(
            source, self._client, self.hosts, self.sr_labels,
            self.migration_timeout, self.poll_interval)
        record = runner._find_vm(source, vm)
        if record is None:
            raise cmds.CommandError(
                command='MigrateWithStorageCommand',
                reason='host %s has no VM %s (%s)'
                % (source, vm.name, vm.uuid))
        vdi_map = {v.path: sr for (v, _), sr in zip(pairs, srs)}
        vif_map = {vif: vif for vif in record.get('vifs') or ()}
        status = runner._migrate(record, dest, vdi_map, vif_map)
        new = (status.get('result') or {}).get('vdis') or {}
        return cmds.success(
            cmds.MIGRATE,
            volumeTos=[cmds.volume_object(v.id, new.get(v.path, v.path))
                       for v, _ in pairs])
