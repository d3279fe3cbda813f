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

"""The CloudStack API commands that move VMs with their volumes.

``migrateVirtualMachineWithVolume`` runs as an asynchronous job that does
what CloudStack's management server does for XenServer hosts of two
clusters (XenServerStorageMotionStrategy.migrateVmWithVolumesAcrossCluster):
it builds the ``VirtualMachineTO`` and ``VolumeTO`` s, sends
``MigrateWithStorageReceiveCommand`` to the destination's resource,
``MigrateWithStorageSendCommand`` to the source's and
``MigrateWithStorageCompleteCommand`` to the destination's, each as
CloudStack's Gson JSON, and reads the new volume paths from the last
answer. The helpers list what there is (``listVirtualMachines``,
``listVolumes``, ``listHosts``, ``listStoragePools``) and where it may go
(``findHostsForMigration``, ``findStoragePoolsForMigration``).
"""

import logging
import re
import threading

import oslo_messaging as messaging

from xsm_driver.cloudstack import commands as cmds
from xsm_driver.cloudstack import gson
from xsm_driver.cloudstack import inventory
from xsm_driver.cloudstack import jobs as jobs_mod
from xsm_driver.cloudstack import resource as resource_mod
from xsm_driver.core.migration import errors

LOG = logging.getLogger(__name__)

MIGRATE_CMD = ('org.apache.cloudstack.api.command.admin.vm.'
               'MigrateVirtualMachineWithVolumeCmd')

_MIGRATE_TO = re.compile(r'^migrateto\[(\d+)\]\.(volume|pool)$', re.I)


class ApiError(Exception):
    """An API call CloudStack would refuse with ``errorcode``.

    ``cserrorcode`` is 9999 by default: CloudStack's ApiServer answers a
    refused call with the ServerApiException that wraps the cause, and
    ApiServer.getSerializedApiError copies that exception's CS error code,
    CSExceptionErrorCode's 9999 for ServerApiException (what a real
    management server answers, e.g. ``{"cserrorcode": 9999, "errorcode":
    431, "errortext": "Unable to execute API command listvolumes due to
    invalid value. Invalid parameter ..."}``).
    """

    def __init__(self, code, text, cserrorcode=jobs_mod.CS_SERVER_API):
        super().__init__(text)
        self.code = code
        self.text = text
        self.cserrorcode = cserrorcode


def error_code(exc):
    """CloudStack's ApiErrorCode for an engine or command error."""
    if isinstance(exc, errors.InsufficientSpace):
        return jobs_mod.INSUFFICIENT_CAPACITY_ERROR
    if isinstance(exc, (errors.TooManyMigrations,
                        messaging.MessagingTimeout)):
        return jobs_mod.RESOURCE_UNAVAILABLE_ERROR
    if isinstance(exc, (errors.VDINotInMap, errors.VIFNotInMap,
                        cmds.CommandError)):
        return jobs_mod.PARAM_ERROR
    return jobs_mod.INTERNAL_ERROR


#: CSExceptionErrorCode of the exception CloudStack raises for each code
_CS_CODES = {
    jobs_mod.INSUFFICIENT_CAPACITY_ERROR: jobs_mod.CS_INSUFFICIENT_CAPACITY,
    jobs_mod.RESOURCE_UNAVAILABLE_ERROR: jobs_mod.CS_RESOURCE_UNAVAILABLE,
    jobs_mod.PARAM_ERROR: jobs_mod.CS_INVALID_PARAMETER,
}


def cs_error_code(code):
    """The CS error code of a failed migration job with ``code``.

    >>> cs_error_code(533), cs_error_code(530)
    (4325, 4250)
    """
    return _CS_CODES.get(code, jobs_mod.CS_CLOUD_RUNTIME)


def _missing(command, name):
    """A required parameter not given, as CloudStack refuses it (431).

    ParamProcessWorker.processParameters names the command by its response
    name without "response", so in lower case.
    """
    return ApiError(jobs_mod.PARAM_ERROR, 'Unable to execute API command %s '
                    'due to missing parameter %s' % (command.lower(), name))


def invalid_text(command, name, value):
    """CloudStack's text for a UUID parameter that names nothing.

    ParamProcessWorker.translateUuidToInternalId raises
    InvalidParameterValueException with the second sentence, which
    ApiDispatcher prefixes with the first.
    """
    return ('Unable to execute API command %s due to invalid value. Invalid '
            'parameter %s value=%s due to incorrect long value format, or '
            'entity does not exist or due to incorrect parameter annotation '
            'for the field in api cmd class.'
            % (command.lower(), name, value))


def _invalid(command, name, value, what=None):
    """An id that names nothing, as CloudStack refuses it (431)."""
    return ApiError(jobs_mod.PARAM_ERROR, invalid_text(command, name, value))


def _unknown_vm(snap, command, name, vm_id):
    """The VM is nowhere: CloudStack's 431; hosts that did not answer named.

    (A management server knows every VM from its database; here a VM is
    known only when its host answers, so that is said.)
    """
    down = sorted(h for h, info in snap.hosts.items() if info is None)
    text = invalid_text(command, name, vm_id)
    if down:
        text += (' Host(s) %s do not answer (is their xsm-agent '
                 'running?): the VM may be there.' % ', '.join(down))
    return ApiError(jobs_mod.PARAM_ERROR, text)


def _page(items, params):
    """CloudStack's paging: ``page`` (from 1) and ``pagesize``."""
    try:
        page = int(params.get('page') or 0)
        size = int(params.get('pagesize') or 0)
    except ValueError:
        raise ApiError(jobs_mod.PARAM_ERROR, 'page and pagesize must be '
                       'integers')
    if page > 0 and size > 0:
        return items[(page - 1) * size:page * size]
    return items


def _listing(name, items, params):
    """``{"count": n, name: [...]}``; ``{}`` when empty, as CloudStack."""
    if not items:
        return {}
    return {'count': len(items), name: _page(items, params)}


#: ApiServer.verifyRequest's answer to a command it does not have (432,
#: named "errorresponse" by ApiServer.getSerializedApiError)
UNKNOWN_COMMAND = ('The given command does not exist or it is not '
                   'available for user')


def unknown_command():
    return ApiError(jobs_mod.UNSUPPORTED_ACTION_ERROR, UNKNOWN_COMMAND)


class API:
    """CloudStack API calls over the xsm hosts.

    :param clients: ``{host name: AgentAPI}`` of every managed host.
    :param resource: ``resource(host)`` gives the
        :class:`~xsm_driver.cloudstack.resource.Resource` of a host.
    :param jobs: the :class:`~xsm_driver.cloudstack.jobs.Jobs`.
    """

    def __init__(self, clients, resource, jobs):
        self.clients = clients
        self.resource = resource
        self.jobs = jobs
        self._lock = threading.Lock()
        self._migrating = set()     # uuids of VMs a job of ours moves
        self._commands = {
            'listvirtualmachines': self.list_virtual_machines,
            'listvolumes': self.list_volumes,
            'listhosts': self.list_hosts,
            'liststoragepools': self.list_storage_pools,
            'findhostsformigration': self.find_hosts_for_migration,
            'findstoragepoolsformigration':
                self.find_storage_pools_for_migration,
            'migratevirtualmachinewithvolume':
                self.migrate_virtual_machine_with_volume,
            'queryasyncjobresult': self.query_async_job_result,
        }

    @property
    def names(self):
        return sorted(self._commands)

    def call(self, command, params):
        """Run API ``command``; return its response value.

        :raises ApiError: with CloudStack's error code and text.
        """
        func = self._commands.get((command or '').lower())
        if func is None:
            raise unknown_command()
        return func(params)

    def knows(self, command):
        return (command or '').lower() in self._commands

    def snapshot(self):
        return inventory.Snapshot(self.clients)

    # -- listings ------------------------------------------------------------

    def list_virtual_machines(self, params):
        snap = self.snapshot()
        host = vm_uuid = None
        if params.get('hostid'):
            host = snap.find_host(params['hostid'])
            if host is None:
                raise _invalid('listVirtualMachines', 'hostid',
                               params['hostid'], 'host')
        if params.get('id'):
            found = snap.find_vm(params['id'])
            if found is None:
                raise _invalid('listVirtualMachines', 'id', params['id'],
                               'virtual machine')
            vm_uuid = found[1]['uuid']
        out = []
        for h, vms in snap.vms.items():
            for vm in vms:
                if host not in (None, h):
                    continue
                if vm_uuid not in (None, vm['uuid']):
                    continue
                if params.get('name') and params['name'] != vm['name']:
                    continue
                item = snap.vm_response(h, vm)
                with self._lock:
                    if vm['uuid'] in self._migrating:
                        item['state'] = 'Migrating'     # as CloudStack's
                out.append(item)
        return _listing('virtualmachine', out, params)

    def list_volumes(self, params):
        snap = self.snapshot()
        for name, find, what in (
                ('id', snap.find_volume, 'volume'),
                ('virtualmachineid', snap.find_vm, 'virtual machine'),
                ('storageid', snap.find_pool, 'storage pool')):
            if params.get(name) and find(params[name]) is None:
                raise _invalid('listVolumes', name, params[name], what)
        out = []
        for item in snap.volumes():
            vol = snap.volume_response(item)
            if any(params.get(k) and params[k] != vol.get(k) for k in (
                    'id', 'virtualmachineid', 'storageid', 'type')):
                continue
            out.append(vol)
        return _listing('volume', out, params)

    def list_hosts(self, params):
        snap = self.snapshot()
        if params.get('id') and snap.find_host(params['id']) is None:
            raise _invalid('listHosts', 'id', params['id'], 'host')
        out = [snap.host_response(h) for h in snap.hosts
               if params.get('id') in (None, '', inventory.host_id(h))
               and params.get('name') in (None, '', h)]
        return _listing('host', out, params)

    def list_storage_pools(self, params):
        snap = self.snapshot()
        if params.get('id') and snap.find_pool(params['id']) is None:
            raise _invalid('listStoragePools', 'id', params['id'],
                           'storage pool')
        out = [snap.pool_response(h, sr) for h, sr in snap.pools()]
        out = [p for p in out if params.get('id') in (None, '', p['id'])
               and params.get('name') in (None, '', p['name'])]
        return _listing('storagepool', out, params)

    # -- where may it go -----------------------------------------------------

    def find_hosts_for_migration(self, params):
        vm_id = params.get('id') or params.get('virtualmachineid')
        if not vm_id:
            raise _missing('findHostsForMigration', 'id')
        snap = self.snapshot()
        found = snap.find_vm(vm_id)
        if found is None:
            raise _unknown_vm(snap, 'findHostsForMigration', 'id', vm_id)
        source, vm = found
        needed = sum(snap.needed(source, d['vdi']) for d in vm['disks'])
        out = []
        for host, info in snap.hosts.items():
            if host == source:
                continue
            item = snap.host_response(host)
            free = max([sr['free'] for sr in (info or {}).get('srs', ())]
                       or [0])
            item['suitableformigration'] = info is not None and \
                free >= needed
            item['requiresStorageMotion'] = True
            out.append(item)
        return _listing('host', out, params)

    def find_storage_pools_for_migration(self, params):
        if not params.get('id'):
            raise _missing('findStoragePoolsForMigration', 'id')
        snap = self.snapshot()
        item = snap.find_volume(params['id'])
        if item is None:
            raise _invalid('findStoragePoolsForMigration', 'id', params['id'])
        host, _vm, _index, vdi = item
        needed = snap.needed(host, vdi['uuid'])
        out = []
        for h, sr in snap.pools():
            if h == host and sr['name'] == vdi.get('sr'):
                continue
            pool = snap.pool_response(h, sr)
            pool['suitableformigration'] = sr['free'] >= needed
            out.append(pool)
        return _listing('storagepool', out, params)

    # -- the migration ------------------------------------------------------

    def query_async_job_result(self, params):
        if not params.get('jobid'):
            raise _missing('queryAsyncJobResult', 'jobid')
        job = self.jobs.get(params['jobid'])
        if job is None:
            # jobid is a UUID parameter: CloudStack's usual 431 (finished
            # jobs are kept [cloudstack]job_retention seconds here)
            raise _invalid('queryAsyncJobResult', 'jobid', params['jobid'])
        return job.to_response()

    @staticmethod
    def _migrate_to(params):
        entries = {}
        for key, value in params.items():
            match = _MIGRATE_TO.match(key)
            if match:
                entries.setdefault(int(match.group(1)), {})[
                    match.group(2).lower()] = value
        out = []
        for index in sorted(entries):
            entry = entries[index]
            if not entry.get('volume') or not entry.get('pool'):
                raise ApiError(jobs_mod.PARAM_ERROR, 'migrateto[%d] needs '
                               'both volume and pool' % index)
            out.append((entry['volume'], entry['pool']))
        return out

    def migrate_virtual_machine_with_volume(self, params):
        """Check as CloudStack does, claim the VM, start the job.

        The checks and their texts are CloudStack's
        (MigrateVirtualMachineWithVolumeCmd.execute, then
        UserVmManagerImpl's getHostsForMigrateVmWithStorage and
        getVolumePoolMappingForMigrateVmWithStorage). CloudStack runs
        execute() in the job; here every check is made before a job
        starts, so a refused call gets its 431 at once. A VM that is
        migrating is in CloudStack's state Migrating, which the state
        checks refuse with their texts: so it is here, atomically, so that
        of concurrent calls for one VM one job at most starts.
        """
        command = 'migrateVirtualMachineWithVolume'
        vm_id = params.get('virtualmachineid')
        if not vm_id:
            raise _missing(command, 'virtualmachineid')
        snap = self.snapshot()
        found = snap.find_vm(vm_id)
        if found is None:
            raise _unknown_vm(snap, command, 'virtualmachineid', vm_id)
        source, vm = found
        dest = None
        if params.get('hostid'):
            dest = snap.find_host(params['hostid'])
            if dest is None:
                raise _invalid(command, 'hostid', params['hostid'])
        mapping = self._migrate_to(params)
        if dest is None and not mapping:
            # (sic: two spaces, as CloudStack's format string has them)
            raise ApiError(jobs_mod.PARAM_ERROR, 'Either hostid or migrateto '
                           ' must be passed for migrating the VM')
        migrating = self._migrating_now(source, vm)
        state = 'Migrating' if migrating else inventory.POWER_STATES.get(
            vm['power_state'], vm['power_state'])
        if dest is not None and state != 'Running':
            raise ApiError(jobs_mod.PARAM_ERROR, 'VM ID: %s is not in '
                           'Running state to migrate it to new host'
                           % vm['uuid'])
        if dest is None and state != 'Stopped':
            raise ApiError(jobs_mod.PARAM_ERROR, 'VM ID: %s is not in '
                           'Stopped state to migrate, use hostid parameter '
                           'to migrate it to a new host' % vm['uuid'])
        pools = []          # [(volume ref, (host, sr))], as given
        for volume_ref, pool_ref in mapping:
            if snap.find_volume(volume_ref) is None:
                raise ApiError(jobs_mod.PARAM_ERROR, 'There is no volume '
                               'present with the given id %s' % volume_ref)
            pool = snap.find_pool(pool_ref)
            if pool is None:
                raise ApiError(jobs_mod.PARAM_ERROR, 'There is no storage '
                               'pool present with the given id %s'
                               % pool_ref)
            pools.append((volume_ref, pool))
        if dest is None:
            # a stopped VM: CloudStack moves its volumes only
            # (vmStorageMigration); xsm pools are each one host's, so its
            # volumes and the VM (stopped) go to the pools' host together
            dests = {h for _, (h, _sr) in pools}
            if len(dests) != 1 or source in dests:
                raise ApiError(
                    jobs_mod.PARAM_ERROR, 'xsm-cloudstack-api moves the '
                    'volumes of stopped VM %s to the pools of one other '
                    'host (the VM goes with them); the pools given are on '
                    '%s' % (vm['name'], ', '.join(sorted(dests))))
            dest = dests.pop()
        if dest == source:
            raise ApiError(jobs_mod.PARAM_ERROR, 'Cannot migrate VM as it is '
                           'already present on host %s (ID: %s), please '
                           'specify valid destination host to migrate the '
                           'VM' % (dest, inventory.host_id(dest)))
        if snap.hosts.get(dest) is None:
            # a CloudRuntimeException in CloudStack: 530, CS code 4250
            raise ApiError(jobs_mod.INTERNAL_ERROR, 'Cannot migrate VM, '
                           'destination host %s (ID: %s) is not in correct '
                           'state, has status: Disconnected, state: Enabled '
                           '(its xsm-agent does not answer)'
                           % (dest, inventory.host_id(dest)),
                           jobs_mod.CS_CLOUD_RUNTIME)
        vdi_map = self._vdi_map(snap, source, vm, dest, pools)
        with self._lock:
            if vm['uuid'] in self._migrating:
                raise ApiError(jobs_mod.PARAM_ERROR, 'VM ID: %s is not in '
                               'Running state to migrate it to new host'
                               % vm['uuid'])
            self._migrating.add(vm['uuid'])
        try:
            job = self.jobs.submit(
                lambda: self._run_migration(source, vm, dest, vdi_map, snap),
                MIGRATE_CMD, 'VirtualMachine', vm['uuid'])
        except Exception:
            self._release(vm['uuid'])
            raise
        LOG.info('job %s: migrate VM %s (%s) from %s to %s, disks %s',
                 job.id, vm['name'], vm['uuid'], source, dest, vdi_map)
        return {'id': vm['uuid'], 'jobid': job.id}

    def _migrating_now(self, source, vm):
        """Whether the VM is being migrated (by this service or another)."""
        with self._lock:
            if vm['uuid'] in self._migrating:
                return True
        try:
            statuses = self.clients[source].migration_list()
        except Exception as exc:
            LOG.warning('host %s: migration_list failed: %s', source,
                        resource_mod.describe(exc))
            return False
        return any(s.get('vm') == vm['uuid'] and s.get('finished') is None
                   for s in statuses or ())

    def _release(self, vm_uuid):
        with self._lock:
            self._migrating.discard(vm_uuid)

    def _run_migration(self, source, vm, dest, vdi_map, snap):
        try:
            return self._migrate(source, vm, dest, vdi_map, snap)
        finally:
            self._release(vm['uuid'])

    @staticmethod
    def _vdi_map(snap, source, vm, dest, pools):
        """``{vdi: dest SR}``: the asked pools, the roomiest for the rest."""
        by_volume = {}
        for index, disk in enumerate(vm['disks']):
            by_volume[inventory.volume_id(vm['uuid'], disk['name'])] = disk
            by_volume[disk['vdi']] = disk
        vdi_map = {}
        for volume_ref, (host, sr) in pools:
            disk = by_volume.get(volume_ref)
            if disk is None:
                raise ApiError(jobs_mod.PARAM_ERROR, 'Volume %s doesn\'t '
                               'belong to the VM %s (ID: %s) that has to be '
                               'migrated' % (volume_ref, vm['name'],
                                             vm['uuid']))
            if disk['vdi'] in vdi_map:
                raise ApiError(jobs_mod.PARAM_ERROR, 'Volume %s of VM %s is '
                               'given twice in migrateto: map each volume '
                               'to one pool' % (volume_ref, vm['name']))
            if host != dest:
                raise ApiError(jobs_mod.PARAM_ERROR, 'Storage pool %s is on '
                               'host %s, not on the destination host %s: '
                               'the volumes of a VM that moves to %s go to '
                               'pools of %s' % (sr['name'], host, dest, dest,
                                                dest))
            vdi_map[disk['vdi']] = sr['name']
        srs = sorted(snap.hosts[dest]['srs'], key=lambda s: -s['free'])
        vdis = {v['uuid']: v for v in snap.vdis[source]}
        for disk in vm['disks']:
            if disk['vdi'] in vdi_map:
                continue
            kind = vdis.get(disk['vdi'], {}).get('type')
            same = [s for s in srs if s.get('type') == kind] or srs
            if not same:
                raise ApiError(jobs_mod.INSUFFICIENT_CAPACITY_ERROR,
                               'Host %s has no storage pool' % dest)
            vdi_map[disk['vdi']] = same[0]['name']
        return vdi_map

    def _execute(self, host, name, fields):
        """Send one command to a host's resource, as CloudStack's JSON."""
        [(name, fields)] = gson.decode(gson.encode([(name, fields)]))
        answer = self.resource(host).execute(name, fields)
        LOG.debug('%s answered %s', cmds.short_name(name), answer.to_gson())
        return answer

    def _migrate(self, source, vm, dest, vdi_map, snap):
        """The job: Receive, Send, Complete, as CloudStack's orchestration."""
        vdis = {v['uuid']: v for v in snap.vdis[source]}
        srs = {s['name']: s for s in snap.hosts[source]['srs']}
        to = inventory.vm_to(source, vm, vdis)
        volumes = []
        for index, disk in enumerate(vm['disks']):
            vdi = vdis.get(disk['vdi'], {'uuid': disk['vdi']})
            volumes.append(gson.pair(
                inventory.volume_to(source, vm, index, vdi,
                                    srs.get(disk['sr'], {}).get('type')),
                vdi_map[disk['vdi']]))
        base = dict(cmds.COMMAND_DEFAULTS, contextMap={})

        def fail(answer):
            code = error_code(answer.error)
            raise jobs_mod.JobFailed(
                code, 'Failed to migrate VM %s (%s) '
                'with its volumes from host %s to host %s: %s' % (
                    vm['name'], vm['uuid'], source, dest,
                    resource_mod.strip_traceback(answer.details)),
                cs_error_code(code))

        answer = self._execute(dest, cmds.RECEIVE, dict(
            base, vm=to, volumeToStorageUuid=volumes))
        if not answer.result:
            fail(answer)
        received = answer.to_fields()
        answer = self._execute(source, cmds.SEND, dict(
            base, vm=to, volumeToSr=received['volumeToSr'],
            nicToNetwork=received.get('nicToNetwork', []),
            token=received['token']))
        if not answer.result:
            fail(answer)
        answer = self._execute(dest, cmds.COMPLETE, dict(base, vm=to))
        if not answer.result:
            fail(answer)
        paths = {v['id']: v['path'] for v in answer.to_fields()['volumeTos']}
        after = inventory.Snapshot({dest: self.clients[dest]})
        found = after.find_vm(vm['uuid'])
        if found is None:
            raise jobs_mod.JobFailed(jobs_mod.INTERNAL_ERROR, 'VM %s is not '
                                     'on host %s after its migration'
                                     % (vm['uuid'], dest))
        volumes = [after.volume_response(item) for item in after.volumes()
                   if item[1] is not None and item[1]['uuid'] == vm['uuid']]
        for volume in volumes:
            if paths.get(volume['deviceid']) not in (None, volume['path']):
                raise jobs_mod.JobFailed(
                    jobs_mod.INTERNAL_ERROR, 'volume %s: the Complete answer '
                    'says path %s, host %s has %s' % (
                        volume['id'], paths[volume['deviceid']], dest,
                        volume['path']))
        return {'virtualmachine': after.vm_response(dest, found[1]),
                'volume': volumes}
