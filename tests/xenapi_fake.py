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

"""A XenServer pool that speaks the XenAPI's XML-RPC on loopback.

:class:`FakePool` holds a pool's objects (hosts, SRs, VDIs, VBDs, VMs,
VIFs, networks, PIFs, tasks) as xapi's records, and implements exactly
the calls the ``xenapi`` engine makes, with xapi's own envelopes
(``{"Status": "Success", "Value": ...}`` / ``{"Status": "Failure",
"ErrorDescription": [...]}``), opaque references, sessions that can
expire, 64-bit integers sent as strings, and ``Async.*`` methods that
return a task whose progress moves until it succeeds, fails or is
cancelled.

It models the xapi of xapi-project/xen-api master at commit e2ee48d
(August 2026), read for this purpose, and is exactly as strict as that
xapi on the rules of storage migration (older releases may differ in
details); each check names the function that sets the rule:

* power states: ``VM.migrate_send`` and ``VDI.pool_migrate`` (which runs
  as the VM's ``migrate_send``) accept Halted, Suspended and Running VMs
  (xapi_vm_lifecycle.ml ``allowed_power_states``), else
  ``VM_BAD_POWER_STATE [vm; "halted, suspended, running"; actual]``;
* every disk of the VM (not CDs, not empty drives) is in the VDI map,
  else ``VDI_NOT_IN_MAP`` (xapi_vm_migrate.ml ``check_vdi_map``); the VDIs
  of snapshots and suspend images may be left out: they go where the VDI
  they are a snapshot of goes, else to the suspend-image SR (suspend VDIs)
  or the destination pool's default SR, else ``VDI_NOT_IN_MAP``
  (``migrate_send'``);
* every VDI that changes SR needs SM features ``VDI_SNAPSHOT`` and
  ``VDI_MIRROR`` on its SR, ``VDI_SNAPSHOT`` and ``VDI_MIRROR_IN`` (or
  ``VDI_MIRROR``) on the destination's, whatever the power state, else
  ``SR_DOES_NOT_SUPPORT_MIGRATION [sr; missing]``
  (``assert_sr_support_operations``; smint.ml ``has_capability``);
  ``SR.allowed_operations`` plays no part;
* host versions ``platform_version``, ``xapi_build`` and ``xen`` must not
  decrease (helpers.ml ``Checks.Migration``): across pools
  ``VM_HOST_INCOMPATIBLE_VERSION_MIGRATE [vm; host]`` -- in that order,
  though datamodel_errors.ml documents ``[host; vm]`` -- within a pool
  ``NOT_SUPPORTED_DURING_UPGRADE``;
* across pools: ``copy`` of a VM that is not halted needs ``force``
  (``VM_BAD_POWER_STATE``); the destination host is enabled
  (``HOST_DISABLED``); every VIF of the VM and of its snapshots is mapped,
  or shares its MAC with a mapped VIF (``infer_vif_map``), else
  ``VIF_NOT_IN_MAP`` (``assert_can_migrate``);
* within a pool: a non-empty VIF map is ``OPERATION_NOT_ALLOWED``
  (``assert_can_migrate``), so is ``copy`` (``migrate_send'``); a disabled
  destination host is ``HOST_DISABLED`` unless a running VM stays on it
  (xapi_vm_helpers.ml ``assert_can_boot_here``); a suspend image stays
  where the destination host sees it;
* inserted CDs of a VM that is not suspended are ejected by xapi
  (``find_cds_to_eject``, ``eject_cds``): :attr:`FakePool.ejected`;
* ``Host.migrate_receive`` needs a PIF of the network on the host
  (``HOST_CANNOT_ATTACH_NETWORK [host; network]``) with an IP, else
  ``PIF_HAS_NO_NETWORK_CONFIGURATION`` (mode None) or
  ``INTERFACE_HAS_NO_IP`` (xapi_host.ml ``migrate_receive``);
* ``VDI.pool_migrate`` needs a VBD (``VDI_NEEDS_VM_FOR_MIGRATE``,
  message_forwarding.ml); a VM that is not running gets a host that sees
  the SRs (``choose_host``);
* at most 3 storage migrations per host (``TOO_MANY_STORAGE_MIGRATES``);
  :attr:`FakePool.peak_storage` records the most that ever ran at once.

VM lifecycle (what the agent does for Nova), each call checked in xapi's
order (xapi_vm_lifecycle.ml ``check_operation_error``): the power state
first, ``VM_BAD_POWER_STATE [vm; expected; actual]`` with the states of
``allowed_power_states`` (start/start_on, clone, provision, memory and
vCPU limits: halted; pause, clean_shutdown, clean_reboot, pool_migrate:
running; unpause: paused; hard_reboot: paused, running; hard_shutdown:
paused, suspended, running; destroy: halted, suspended); then
``OTHER_OPERATION_IN_PROGRESS ["VM"; vm; op; task]`` (a hard_shutdown
may interrupt a clean one); then ``VM_IS_TEMPLATE [vm; op]`` for a
template (``check_template``: a default template is never destroyed);
``HANDLE_INVALID [class; ref]`` for an unknown reference:

* ``VM.clone`` (the clone of a template is a template),
  ``VM.set_is_a_template``, ``VM.provision`` (templates only:
  ``ONLY_PROVISION_TEMPLATE``), ``VM.set_memory_limits``
  (``MEMORY_CONSTRAINT_VIOLATION_ORDER``, vm_memory_constraints.ml),
  ``VM.set_VCPUs_max`` / ``set_VCPUs_at_startup`` (``INVALID_VALUE``
  unless 0 < at_startup <= max, xapi_vm.ml);
* ``VDI.create`` (``SR_OPERATION_NOT_SUPPORTED`` without the SM's
  VDI_CREATE), ``VDI.destroy`` (``VDI_IN_USE [vdi; "destroy"]`` while
  attached), ``VBD.create`` / ``VIF.create`` (``DEVICE_ALREADY_EXISTS
  [device]``, ``MAC_INVALID [mac]``, xapi_vbd.ml, xapi_vif_helpers.ml);
* ``VM.start`` / ``VM.start_on`` / ``VM.pool_migrate``: the host must
  pass ``assert_can_boot_here`` (xapi_vm_helpers.ml): enabled
  (``HOST_DISABLED``), sees the VM's SRs (``VM_REQUIRES_SR [vm; sr]``)
  and networks (``VM_REQUIRES_NET``), has the memory
  (``HOST_NOT_ENOUGH_FREE_MEMORY [needed; available]``, dynamic_max
  against ``host_metrics``); ``VM.start`` tries the affinity host first
  (``NO_HOSTS_AVAILABLE`` when none will do);
* ``VM.clean_shutdown`` / ``VM.clean_reboot`` run as tasks; a guest in
  :attr:`FakePool.unresponsive` never obeys and the task runs until it is
  cancelled;
* ``PUT /import_raw_vdi`` (import_raw_vdi.ml ``localhost_handler``): 403
  without a session, 404 for an unknown format, for ``chunked`` with a
  VHD and for a ``Transfer-Encoding``; otherwise 200 at once and the
  outcome in the task (``task_id``): ``VDI_IO_ERROR`` for data past the
  VDI's end or a VHD vhd-tool would not read (parsed with xsm's reader),
  ``VDI_IN_USE`` for an attached VDI; :attr:`FakePool.contents` and
  :attr:`FakePool.imports` keep what was written.

``VM.migrate_send``, ``VDI.pool_migrate``, ``VM.pool_migrate``,
``VM.clean_shutdown`` and ``VM.clean_reboot`` run as tasks; called
without ``Async.`` they answer when the task ends, as xapi does.

Not modelled: licences, CBT and encrypted VDIs, ``on_boot=reset`` VDIs,
vGPUs, CPU features, ballooning, HA, ``VM.provision`` of a template's
``other_config:disks``, the tar and qcow2 imports and xapi's
``chunked`` import protocol.

Failure injection: :meth:`FakePool.fail` (the next call of a method is
refused with an error), :meth:`FakePool.fail_task` (the next task of a
method fails part-way), :meth:`FakePool.drop` (the connection breaks
before or after a call runs), :meth:`FakePool.hold` (tasks stop at a
given progress until released), :meth:`FakePool.expire_sessions`.

:class:`XenAPIServer` serves a pool over HTTP (or HTTPS); the real
``XenAPI`` client from PyPI talks to it. :class:`XapiNBDServer` is xapi's
NBD server (xapi-nbd, built on xapi-project/nbd master at commit b71e1be)
exactly as narrow as it is: what ``VDI.get_nbd_info`` points at.
"""

import collections
import http.server
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import uuid as uuidlib
import xmlrpc.client

GiB = 1 << 30
MiB = 1 << 20

#: pools by name, so that a migration can reach the destination pool
REGISTRY = {}

SR_OPS = ['vdi_create', 'vdi_destroy', 'vdi_snapshot', 'vdi_clone',
          'vdi_mirror', 'scan']
#: SM features of a driver that can do storage migration (ext, nfs, lvm..)
SM_FEATURES = {'SR_PROBE': 1, 'SR_UPDATE': 1, 'VDI_CREATE': 1,
               'VDI_DELETE': 1, 'VDI_ATTACH': 1, 'VDI_DETACH': 1,
               'VDI_SNAPSHOT': 1, 'VDI_CLONE': 1, 'VDI_MIRROR': 1,
               'VDI_ACTIVATE': 1, 'VDI_DEACTIVATE': 1}
NULL = 'OpaqueRef:NULL'
#: xapi_vm_lifecycle.ml allowed_power_states `migrate_send
MIGRATE_SEND_STATES = ('Halted', 'Suspended', 'Running')
VM_OPS = ['migrate_send', 'pool_migrate', 'clean_shutdown', 'snapshot']
#: memory and vCPUs of a VM made by add_vm or add_template
VM_RESOURCES = {'memory_static_min': 128 * (1 << 20),
                'memory_dynamic_min': 256 * (1 << 20),
                'memory_dynamic_max': 256 * (1 << 20),
                'memory_static_max': 256 * (1 << 20),
                'VCPUs_max': 1, 'VCPUs_at_startup': 1}
#: xapi_vm_lifecycle.ml allowed_power_states, for the calls modelled
POWER_STATES = {
    'start': ('Halted',), 'start_on': ('Halted',),
    'clone': ('Halted',), 'copy': ('Halted',), 'provision': ('Halted',),
    'changing_memory_limits': ('Halted',), 'changing_VCPUs': ('Halted',),
    'unpause': ('Paused',),
    'clean_reboot': ('Running',), 'clean_shutdown': ('Running',),
    'pause': ('Running',), 'pool_migrate': ('Running',),
    'destroy': ('Halted', 'Suspended'),
    'hard_reboot': ('Paused', 'Running'),
    'hard_shutdown': ('Paused', 'Suspended', 'Running'),
}
#: xapi_vm_lifecycle.ml check_template: what a template allows
TEMPLATE_OPS = ('changing_dynamic_range', 'changing_static_range',
                'changing_memory_limits', 'changing_shadow_memory',
                'changing_VCPUs', 'changing_NVRAM', 'clone', 'copy',
                'export', 'metadata_export', 'provision')


class Failure(Exception):
    def __init__(self, *details):
        super().__init__(details)
        self.details = [str(d) for d in details]


def _ref():
    return 'OpaqueRef:%s' % uuidlib.uuid4()


def _wire(value):
    """xapi's XML-RPC: int64 as strings, None as ''."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_wire(v) for v in value]
    if value is None:
        return ''
    return value


class FakePool:
    """One pool's objects and the calls on them."""

    CLASSES = ('pool', 'host', 'SR', 'PBD', 'VDI', 'VBD', 'VM', 'VIF',
               'network', 'PIF', 'task', 'SM', 'host_metrics', 'host_cpu')
    #: calls that run as a task, also when called without ``Async.``
    TASKED = ('VM.migrate_send', 'VDI.pool_migrate', 'VM.pool_migrate',
              'VM.clean_shutdown', 'VM.clean_reboot')

    def __init__(self, name, username='root', password='secret',
                 version='3.4.0', task_seconds=0.3, steps=10):
        self.name = name
        self.username, self.password = username, password
        self.version = version
        self.task_seconds = task_seconds
        self.steps = steps
        self.db = {cls: {} for cls in self.CLASSES}
        self.lock = threading.RLock()
        self.sessions = set()
        self.logins = 0
        self.calls = []
        #: ``(method, args)`` of every call but logins (args without the
        #: session)
        self.call_args = []
        self._fail = collections.defaultdict(list)
        self._fail_task = collections.defaultdict(list)
        self._drop = collections.defaultdict(list)
        self._hold_at = None
        self._released = threading.Event()
        self._task_threads = []
        self.storage = collections.Counter()     # running, per host ref
        self.peak_storage = 0
        self.max_storage = 3
        self.nbd_info = {}
        self.leave_on_failure = False
        #: VBDs xapi ejected (their CD) before a storage migration
        self.ejected = []
        REGISTRY[name] = self
        self.pool = self._add('pool', name_label=name, master='',
                              default_SR=NULL, suspend_image_SR=NULL)
        self.network = self.add_network('Pool-wide network associated '
                                        'with eth0')
        self.master = self.add_host('%s-master' % name, version=version)
        self.db['pool'][self.pool]['master'] = self.master
        #: VMs whose guest ignores a clean shutdown or reboot request (the
        #: task runs until it is cancelled)
        self.unresponsive = set()
        #: boots of each VM ref (VM.start, start_on, reboots)
        self.boots = collections.Counter()
        #: ``(vdi ref, format, bytes of disk written)`` of each import
        self.imports = []
        #: ``{vdi ref: {offset: bytes}}`` written by imports
        self.contents = {}
        self.template = self.add_template('Other install media')

    # -- building the pool -------------------------------------------------

    def _add(self, cls, **fields):
        ref = _ref()
        fields.setdefault('uuid', str(uuidlib.uuid4()))
        fields.setdefault('name_label', '')
        fields.setdefault('current_operations', {})
        fields.setdefault('other_config', {})
        self.db[cls][ref] = fields
        return ref

    def add_network(self, name):
        return self._add('network', name_label=name, PIFs=[], VIFs=[])

    def add_host(self, name, enabled=True, version=None,
                 xapi_build='25.33.1', xen='4.17.5-20', memory=16 * GiB,
                 cpus=8):
        metrics = self._add('host_metrics', memory_total=memory,
                            memory_free=memory, live=True)
        host = self._add('host', name_label=name, enabled=enabled,
                         address='127.0.0.1', PIFs=[], metrics=metrics,
                         host_CPUs=[], cpu_info={
                             'cpu_count': str(cpus), 'socket_count': '1',
                             'vendor': 'GenuineIntel'},
                         suspend_image_sr=NULL, software_version={
                             'platform_version': version or self.version,
                             'product_version': '8.2.1',
                             'xapi_build': xapi_build, 'xen': xen})
        for number in range(cpus):
            cpu = self._add('host_cpu', host=host, number=number,
                            vendor='GenuineIntel', speed=2400)
            self.db['host'][host]['host_CPUs'].append(cpu)
        self.add_pif(host, self.network, management=True, device='eth0')
        return host

    def add_pif(self, host, network, ip='127.0.0.1', mode=None,
                management=False, device='eth1'):
        """A PIF of ``host`` on ``network``; ``ip=''`` has no address."""
        pif = self._add('PIF', host=host, network=network,
                        management=management, device=device, IP=ip,
                        ip_configuration_mode=mode or (
                            'Static' if ip else 'None'),
                        primary_address_type='IPv4',
                        currently_attached=True)
        self.db['host'][host]['PIFs'].append(pif)
        self.db['network'][network]['PIFs'].append(pif)
        return pif

    def sm_features(self, sr_type, features):
        """The SM driver of ``sr_type`` has (only) these features."""
        self._sm(sr_type)['features'] = {f: 1 for f in features}

    def _sm(self, sr_type):
        for rec in self.db['SM'].values():
            if rec['type'] == sr_type:
                return rec
        features = {} if sr_type in ('iso', 'udev') else dict(SM_FEATURES)
        ref = self._add('SM', type=sr_type, name_label=sr_type,
                        features=features)
        return self.db['SM'][ref]

    def set_default_sr(self, sr):
        self.db['pool'][self.pool]['default_SR'] = sr

    def add_sr(self, name, type='ext', size=100 * GiB, used=0, host=None,
               ops=None, content_type='user'):
        self._sm(type)
        sr = self._add('SR', name_label=name, type=type, physical_size=size,
                       physical_utilisation=used, VDIs=[], PBDs=[],
                       shared=host is None, content_type=content_type,
                       allowed_operations=list(SR_OPS if ops is None
                                               else ops))
        for h in [host] if host else list(self.db['host']):
            pbd = self._add('PBD', host=h, SR=sr, currently_attached=True)
            self.db['SR'][sr]['PBDs'].append(pbd)
        return sr

    def add_vdi(self, sr, name, size=1 * GiB, used=None, snapshot_of=None):
        used = size // 4 if used is None else used
        vdi = self._add('VDI', name_label=name, SR=sr, virtual_size=size,
                        physical_utilisation=used, VBDs=[],
                        is_a_snapshot=snapshot_of is not None,
                        snapshot_of=snapshot_of or 'OpaqueRef:NULL',
                        snapshots=[], read_only=snapshot_of is not None,
                        managed=True, sm_config={}, type='user',
                        allowed_operations=['mirror', 'copy', 'snapshot'])
        self.db['SR'][sr]['VDIs'].append(vdi)
        self.db['SR'][sr]['physical_utilisation'] += used
        if snapshot_of:
            self.db['VDI'][snapshot_of]['snapshots'].append(vdi)
        return vdi

    def _add_vbd(self, vm, vdi, device, attached, type='Disk'):
        vbd = self._add('VBD', VM=vm, VDI=vdi, type=type,
                        empty=vdi == 'OpaqueRef:NULL', userdevice=str(device),
                        device='xvd' + chr(ord('a') + device), mode='RW',
                        currently_attached=attached)
        self.db['VM'][vm]['VBDs'].append(vbd)
        if vdi in self.db['VDI']:
            self.db['VDI'][vdi]['VBDs'].append(vbd)
        return vbd

    def add_vm(self, name, disks, networks=(), power_state='Running',
               host=None, uuid=None, suspend_vdi=None):
        host = host or self.master
        running = power_state in ('Running', 'Paused')
        vm = self._add('VM', name_label=name, power_state=power_state,
                       is_a_template=False, is_a_snapshot=False,
                       is_control_domain=False, snapshots=[],
                       snapshot_of='OpaqueRef:NULL', VBDs=[], VIFs=[],
                       resident_on=host if running else 'OpaqueRef:NULL',
                       suspend_VDI=NULL, allowed_operations=list(VM_OPS),
                       is_default_template=False, affinity=NULL,
                       **dict(VM_RESOURCES),
                       **({'uuid': uuid} if uuid else {}))
        for i, vdi in enumerate(disks):
            self._add_vbd(vm, vdi, i, running)
        if suspend_vdi:
            self.db['VM'][vm]['suspend_VDI'] = suspend_vdi
        elif power_state == 'Suspended' and disks:
            rec = self.db['VDI'][disks[0]]
            self.db['VM'][vm]['suspend_VDI'] = self.add_vdi(
                rec['SR'], 'Suspend image', 64 * MiB, 64 * MiB)
        for i, net in enumerate(networks):
            vif = self._add('VIF', VM=vm, network=net, device=str(i),
                            MAC='02:00:00:00:%02x:%02x' % (len(self.db['VIF'])
                                                           % 256, i))
            self.db['VM'][vm]['VIFs'].append(vif)
        self._refresh_metrics()
        return vm

    def insert_cd(self, vm, iso_vdi, device=3):
        """A CD drive of the VM holding ``iso_vdi``."""
        running = self.db['VM'][vm]['power_state'] == 'Running'
        return self._add_vbd(vm, iso_vdi, device, running, type='CD')

    def snapshot_vm(self, vm, name='snap'):
        """A snapshot of the VM: a snapshot VDI of each disk, its VIFs."""
        snap = self._add('VM', name_label=name, power_state='Halted',
                         is_a_template=True, is_a_snapshot=True,
                         is_control_domain=False, snapshots=[],
                         snapshot_of=vm, VBDs=[], VIFs=[],
                         resident_on='OpaqueRef:NULL', allowed_operations=[])
        self.db['VM'][vm]['snapshots'].append(snap)
        for i, vbd in enumerate(self.db['VM'][vm]['VBDs']):
            vdi = self.db['VBD'][vbd]['VDI']
            rec = self.db['VDI'][vdi]
            copy = self.add_vdi(rec['SR'], rec['name_label'] + ' (snap)',
                                rec['virtual_size'], 4 * MiB,
                                snapshot_of=vdi)
            self._add_vbd(snap, copy, i, False)
        for vif in self.db['VM'][vm]['VIFs']:
            rec = self.db['VIF'][vif]
            copy = self._add('VIF', VM=snap, network=rec['network'],
                             device=rec['device'], MAC=rec['MAC'])
            self.db['VM'][snap]['VIFs'].append(copy)
        return snap

    def add_template(self, name):
        """A default template like xapi's "Other install media" (HVM).

        Its ``other_config:disks`` asks ``VM.provision`` for a disk, as
        xapi's own templates do; it has no VBD.
        """
        return self._add('VM', name_label=name, power_state='Halted',
                         is_a_template=True, is_default_template=True,
                         is_a_snapshot=False, is_control_domain=False,
                         snapshots=[], snapshot_of=NULL, VBDs=[], VIFs=[],
                         resident_on=NULL, suspend_VDI=NULL, affinity=NULL,
                         allowed_operations=['clone', 'copy', 'provision'],
                         HVM_boot_params={'order': 'dc'},
                         other_config={
                             'default_template': 'true',
                             'disks': '<provision><disk device="0" '
                                      'size="34359738368" sr="" '
                                      'bootable="true" type="system"/>'
                                      '</provision>'},
                         **dict(VM_RESOURCES))

    def args_of(self, method):
        """The arguments of every call of ``method``, oldest first."""
        return [args for m, args in list(self.call_args) if m == method]

    def find(self, cls, **match):
        return [r for r, rec in self.db[cls].items()
                if all(rec.get(k) == v for k, v in match.items())]

    def get(self, cls, ref):
        return self.db[cls][ref]

    # -- failure injection -------------------------------------------------

    def fail(self, method, *details, count=1):
        """The next ``count`` calls of ``method`` fail with ``details``."""
        self._fail[method].extend([list(details)] * count)

    def fail_task(self, method, *details, at=0.5):
        """The next task of ``Async.<method>`` fails at progress ``at``."""
        self._fail_task[method].append((at, list(details)))

    def drop(self, method, when='before', count=1, skip=0):
        """Break the connection of the next calls of ``method``.

        ``before``: the call does not run; ``after``: it runs, its answer
        is lost. The first ``skip`` calls go through.
        """
        self._drop[method].extend([None] * skip + [when] * count)

    def hold(self, at=0.5):
        """Tasks stop at progress ``at`` until :meth:`release`."""
        self._released.clear()
        self._hold_at = at

    def release(self):
        self._hold_at = None
        self._released.set()

    def expire_sessions(self):
        with self.lock:
            self.sessions.clear()

    def take_drop(self, method):
        with self.lock:
            if self._drop[method]:
                return self._drop[method].pop(0)
        return None

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, method, params):
        """The envelope of one call."""
        self.calls.append(method)
        if not method.startswith('session.'):
            self.call_args.append((method, list(params)[1:]))
        try:
            return {'Status': 'Success',
                    'Value': _wire(self._call(method, list(params)))}
        except Failure as exc:
            return {'Status': 'Failure', 'ErrorDescription': exc.details}

    def _call(self, method, params):
        with self.lock:
            if self._fail[method]:
                raise Failure(*self._fail[method].pop(0))
        if method == 'session.login_with_password':
            user, password = params[0], params[1]
            if (user, password) != (self.username, self.password):
                raise Failure('SESSION_AUTHENTICATION_FAILED', user,
                              'Authentication failure')
            session = _ref()
            with self.lock:
                self.sessions.add(session)
                self.logins += 1
            return session
        session, args = params[0], params[1:]
        with self.lock:
            if session not in self.sessions:
                raise Failure('SESSION_INVALID', session)
        if method == 'session.logout':
            with self.lock:
                self.sessions.discard(session)
            return ''
        is_async = method.startswith('Async.')
        name = method[len('Async.'):] if is_async else method
        cls, _sep, op = name.partition('.')
        special = getattr(self, '_%s_%s' % (cls, op), None)
        if special is not None:
            if is_async:
                return self._task(name, special, args)
            if name in self.TASKED:
                return self._sync(name, special, args)
            return special(*args)
        if cls not in self.db:
            raise Failure('MESSAGE_METHOD_UNKNOWN', method)
        return self._generic(cls, op, args)

    def _record(self, cls, ref):
        try:
            return self.db[cls][ref]
        except KeyError:
            raise Failure('HANDLE_INVALID', cls, ref)

    def _generic(self, cls, op, args):
        with self.lock:
            table = self.db[cls]
            if op == 'get_record':
                return dict(self._record(cls, args[0]))
            if op == 'get_all_records':
                return {r: dict(rec) for r, rec in table.items()}
            if op == 'get_all':
                return list(table)
            if op == 'get_by_uuid':
                for r, rec in table.items():
                    if rec['uuid'] == args[0]:
                        return r
                raise Failure('UUID_INVALID', cls, args[0])
            if op == 'get_by_name_label':
                return [r for r, rec in table.items()
                        if rec['name_label'] == args[0]]
            if op.startswith('get_'):
                rec = self._record(cls, args[0])
                field = op[4:]
                if field not in rec:
                    raise Failure('MESSAGE_METHOD_UNKNOWN',
                                  '%s.%s' % (cls, op))
                return rec[field]
        raise Failure('MESSAGE_METHOD_UNKNOWN', '%s.%s' % (cls, op))

    # -- tasks -------------------------------------------------------------

    def _task(self, name, func, args):
        task = self._add('task', name_label='Async.' + name,
                         status='pending', progress=0.0, result='',
                         error_info=[], created=time.time())
        plan = None
        with self.lock:
            if self._fail_task[name]:
                plan = self._fail_task[name].pop(0)
        thread = threading.Thread(target=self._run_task,
                                  args=(task, func, args, plan), daemon=True,
                                  name='fake-xapi-task')
        with self.lock:
            self._task_threads = [t for t in self._task_threads
                                  if t.is_alive()] + [thread]
        thread.start()
        return task

    def _sync(self, name, func, args):
        """A tasked call without ``Async.``: its task runs here, to its end.

        Its result is returned, or its failure raised, as xapi answers a
        synchronous call.
        """
        task = self._add('task', name_label=name, status='pending',
                         progress=0.0, result='', error_info=[],
                         created=time.time())
        plan = None
        with self.lock:
            if self._fail_task[name]:
                plan = self._fail_task[name].pop(0)
        self._run_task(task, func, args, plan)
        with self.lock:
            rec = self.db['task'].pop(task)
        if rec['status'] != 'success':
            raise Failure(*rec['error_info'])
        return rec['result'][len('<value>'):-len('</value>')]

    def stop_tasks(self, timeout=5.0):
        """Let the tasks still running end (a held one is released)."""
        self.release()
        with self.lock:
            threads, self._task_threads = self._task_threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run_task(self, task, func, args, fail_plan):
        rec = self.db['task'][task]
        try:
            result = func(task, *args, fail_plan=fail_plan)
            with self.lock:
                rec.update(status='success', progress=1.0,
                           result='<value>%s</value>' % result)
        except Failure as exc:
            with self.lock:
                status = 'cancelled' if exc.details[0] == 'TASK_CANCELLED' \
                    else 'failure'
                rec.update(status=status, error_info=exc.details)
        except Exception as exc:
            with self.lock:
                rec.update(status='failure',
                           error_info=['INTERNAL_ERROR', repr(exc)])
        rec['finished'] = time.time()

    def _progress(self, task, fail_plan):
        """Move a task's progress to 1, honouring cancel, hold, failure."""
        rec = self.db['task'][task]
        for step in range(1, self.steps + 1):
            fraction = step / float(self.steps)
            if self._hold_at is not None and fraction > self._hold_at:
                while not self._released.wait(0.02):
                    if rec['status'] == 'cancelling':
                        break
            if rec['status'] == 'cancelling':
                raise Failure('TASK_CANCELLED', task)
            if fail_plan is not None and fraction > fail_plan[0]:
                raise Failure(*fail_plan[1])
            time.sleep(self.task_seconds / self.steps)
            with self.lock:
                rec['progress'] = min(fraction, 0.99)
        if rec['status'] == 'cancelling':
            raise Failure('TASK_CANCELLED', task)

    def _task_cancel(self, task):
        with self.lock:
            rec = self._record('task', task)
            if rec['status'] == 'pending':
                rec['status'] = 'cancelling'
        return ''

    def _task_destroy(self, task):
        with self.lock:
            self.db['task'].pop(task, None)
        return ''

    # -- migration ---------------------------------------------------------

    def _host_migrate_receive(self, host, network, options):
        # xapi_host.ml migrate_receive
        with self.lock:
            self._record('host', host)
            pifs = [p for p in self._record('network', network)['PIFs']
                    if self.db['PIF'][p]['host'] == host]
            if not pifs:
                raise Failure('HOST_CANNOT_ATTACH_NETWORK', host, network)
            pif = self.db['PIF'][pifs[0]]
            if not pif.get('IP'):
                if pif.get('ip_configuration_mode') == 'None':
                    raise Failure('PIF_HAS_NO_NETWORK_CONFIGURATION',
                                  pifs[0])
                raise Failure('INTERFACE_HAS_NO_IP', pifs[0])
            session = _ref()
            self.sessions.add(session)
        return {'SM': 'http://%s/services/SM?session_id=%s'
                % (pif['IP'], session), 'host': host, 'master': '127.0.0.1',
                'session_id': session,
                'xenops': 'http://127.0.0.1/%s/services/xenops' % self.name}

    @staticmethod
    def _dest_of(token):
        return REGISTRY[token['xenops'].split('/')[3]]

    @staticmethod
    def _flag(options, key):
        # xapi: bool_of_string (List.assoc key options), false on error
        return (options or {}).get(key) == 'true'

    def _vm_disks(self, vm):
        """VDI refs of the VM's disks (xapi_vm_migrate.ml vdi_filter)."""
        out = []
        for vbd in self.db['VM'][vm]['VBDs']:
            rec = self.db['VBD'][vbd]
            if rec['empty'] or rec['type'] == 'CD':
                continue
            out.append(rec['VDI'])
        return out

    def _assert_power(self, vm, rec):
        # message_forwarding.ml with_vm_operation ~op:`migrate_send;
        # xapi_vm_lifecycle.ml allowed_power_states, report_power_state_error
        if rec['power_state'] not in MIGRATE_SEND_STATES:
            raise Failure('VM_BAD_POWER_STATE', vm,
                          ', '.join(p.lower() for p in MIGRATE_SEND_STATES),
                          rec['power_state'].lower())
        if 'migrate_send' not in rec['allowed_operations']:
            raise Failure('OPERATION_NOT_ALLOWED', 'migrate_send')

    @staticmethod
    def _versions(host_rec):
        """helpers.ml Checks.version_numbers_of_string, per version key."""
        out = []
        sw = host_rec.get('software_version', {})
        for key in ('platform_version', 'xapi_build', 'xen'):
            text = sw.get(key, '0.0.0')
            parts = text.split('-')
            words = (parts[0].split('.') + parts[1].split('.')
                     if len(parts) > 1 else parts[0].split('.'))
            nums = []
            for word in words:
                try:
                    nums.append(int(word))
                except ValueError:
                    pass
            out.append(nums)
        return out

    def _versions_not_decreasing(self, src_host, target, dest_host):
        # helpers.ml Checks.Migration.host_versions_not_decreasing
        return all(to >= frm for frm, to in zip(
            self._versions(self.db['host'][src_host]),
            self._versions(target.db['host'][dest_host])))

    def _sm_has(self, sr_type, needed):
        # smint.ml Feature.has_capability: VDI_MIRROR_IN <- VDI_MIRROR too
        features = self._sm(sr_type)['features']
        return [f for f in needed if f not in features and not (
            f == 'VDI_MIRROR_IN' and 'VDI_MIRROR' in features)]

    def _assert_sr_support(self, target, vdi_map):
        # xapi_vm_migrate.ml assert_sr_support_operations
        for vdi, sr in vdi_map.items():
            src_sr = self._record('VDI', vdi)['SR']
            if src_sr == sr:
                continue
            missing = self._sm_has(self.db['SR'][src_sr]['type'],
                                   ['VDI_SNAPSHOT', 'VDI_MIRROR'])
            if missing:
                raise Failure('SR_DOES_NOT_SUPPORT_MIGRATION', src_sr,
                              ';'.join(missing))
            missing = target._sm_has(target._record('SR', sr)['type'],
                                     ['VDI_SNAPSHOT', 'VDI_MIRROR_IN'])
            if missing:
                raise Failure('SR_DOES_NOT_SUPPORT_MIGRATION', sr,
                              ';'.join(missing))

    def _infer_vif_map(self, vifs, vif_map):
        # xapi_vm_migrate.ml infer_vif_map
        macs = [(self.db['VIF'][v]['MAC'], n) for v, n in vif_map.items()
                if v in self.db['VIF']]
        out = {}
        for vif in vifs:
            if vif in vif_map:
                out[vif] = vif_map[vif]
                continue
            mac = self.db['VIF'][vif]['MAC']
            same = [n for m, n in macs if m == mac]
            if not same:
                raise Failure('VIF_NOT_IN_MAP', vif)
            out[vif] = same[0]
        return out

    def _VM_assert_can_migrate(self, vm, dest, live, vdi_map, vif_map,
                               options, vgpu_map):
        # xapi_vm_migrate.ml assert_can_migrate
        target = self._dest_of(dest)
        force = self._flag(options, 'force')
        copy = self._flag(options, 'copy')
        with self.lock, target.lock:
            rec = self._record('VM', vm)
            host = rec['resident_on'] if rec['resident_on'] in \
                self.db['host'] else self.master
            for vdi in self._vm_disks(vm):          # check_vdi_map
                if vdi not in vdi_map:
                    raise Failure('VDI_NOT_IN_MAP', vdi)
            dest_host = dest['host']
            dst = target._record('host', dest_host)
            ok = self._versions_not_decreasing(host, target, dest_host)
            if target is self:
                if not ok:
                    raise Failure('NOT_SUPPORTED_DURING_UPGRADE')
                self._assert_sr_support(target, vdi_map)
                # xapi_vm_helpers.ml assert_can_boot_here: a disabled host
                # is refused, but for a running VM staying on its host
                local = rec['power_state'] == 'Running' and \
                    rec['resident_on'] == dest_host
                if not dst['enabled'] and not local:
                    raise Failure('HOST_DISABLED', dest_host)
                if vif_map:
                    raise Failure(
                        'OPERATION_NOT_ALLOWED', 'VIF mapping is not allowed '
                        'for intra-pool migration -all VIFs must be on the '
                        'same network')
                return ''
            if not ok:
                # [vm; host], as raised (datamodel_errors.ml says host; vm)
                raise Failure('VM_HOST_INCOMPATIBLE_VERSION_MIGRATE', vm,
                              dest_host)
            self._assert_sr_support(target, vdi_map)
            if not force and copy and rec['power_state'] != 'Halted':
                raise Failure('VM_BAD_POWER_STATE', vm, 'halted',
                              rec['power_state'].lower())
            if not dst['enabled']:
                raise Failure('HOST_DISABLED', dest_host)
            vifs = list(rec['VIFs'])
            for snap in rec['snapshots']:
                vifs += self.db['VM'][snap]['VIFs']
            self._infer_vif_map(vifs, vif_map)
            # inter_pool_metadata_transfer ~dry_run: the objects exist
            for sr in vdi_map.values():
                target._record('SR', sr)
            for net in vif_map.values():
                target._record('network', net)
        return ''

    def _complete_vdi_map(self, vm, vdi_map, target, dest_host):
        """The VDIs of snapshots and suspend images placed (migrate_send')."""
        rec = self.db['VM'][vm]
        pool = target.db['pool'][target.pool]
        default = pool['default_SR']
        suspend_sr = pool['suspend_image_SR']
        if suspend_sr == NULL:
            suspend_sr = target.db['host'][target.master]['suspend_image_sr']
        extra = []
        for v in [vm] + list(rec['snapshots']):
            image = self.db['VM'][v].get('suspend_VDI', NULL)
            if self.db['VM'][v]['power_state'] != 'Suspended' or \
                    image == NULL:
                continue
            # within the pool an image the destination host sees stays
            sr = self.db['VDI'][image]['SR']
            if target is self and any(
                    self.db['PBD'][p]['host'] == dest_host
                    for p in self.db['SR'][sr]['PBDs']):
                continue
            extra.append((image, True))
        for snap in rec['snapshots']:
            extra += [(vdi, False) for vdi in self._vm_disks(snap)]
        out = dict(vdi_map)
        for vdi, is_suspend in extra:
            of = self.db['VDI'][vdi].get('snapshot_of', NULL)
            if vdi in vdi_map:
                continue
            if of in vdi_map:
                out[vdi] = vdi_map[of]
            elif is_suspend and suspend_sr != NULL:
                out[vdi] = suspend_sr
            elif default != NULL:
                out[vdi] = default
            else:
                raise Failure('VDI_NOT_IN_MAP', vdi)
        return out

    def _storage_slot(self, host, delta):
        with self.lock:
            if delta > 0 and self.storage[host] >= self.max_storage:
                raise Failure('TOO_MANY_STORAGE_MIGRATES',
                              str(self.max_storage))
            self.storage[host] += delta
            self.peak_storage = max(self.peak_storage,
                                    sum(self.storage.values()))

    def _VM_migrate_send(self, task, vm, dest, live, vdi_map, vif_map,
                         options, vgpu_map, fail_plan=None):
        # message_forwarding.ml VM.migrate_send: the VM operation, then
        # assert_can_migrate; then xapi_vm_migrate.ml migrate_send'
        with self.lock:
            self._assert_power(vm, self._record('VM', vm))
        self._VM_assert_can_migrate(vm, dest, live, vdi_map, vif_map,
                                    options, vgpu_map)
        target = self._dest_of(dest)
        copy = self._flag(options, 'copy')
        if copy and target is self:
            raise Failure('OPERATION_NOT_ALLOWED', 'Copy mode is disallowed '
                          'on intra pool storage migration, try efficient '
                          'alternatives, for example, VM.copy/clone.')
        with self.lock, target.lock:
            full_map = self._complete_vdi_map(vm, vdi_map, target,
                                              dest['host'])
            if target is not self:
                rec = self.db['VM'][vm]
                vifs = list(rec['VIFs'])
                for snap in rec['snapshots']:
                    vifs += self.db['VM'][snap]['VIFs']
                vif_map = self._infer_vif_map(vifs, vif_map)
            self._eject_cds(vm, full_map)
        host = self.db['VM'][vm]['resident_on']
        self._storage_slot(host, +1)
        with self.lock:
            self.db['VM'][vm]['current_operations'][task] = 'migrate_send'
        try:
            if self.leave_on_failure and fail_plan is not None:
                sr = list(vdi_map.values())[0]
                target.add_vdi(sr, 'leftover', GiB, 0)
            self._progress(task, fail_plan)
            return self._move_vm(target, vm, dest['host'], full_map,
                                 vif_map, copy)
        finally:
            with self.lock:
                if vm in self.db['VM']:
                    self.db['VM'][vm]['current_operations'].pop(task, None)
            self._storage_slot(host, -1)

    def _eject_cds(self, vm, vdi_map):
        # xapi_vm_migrate.ml find_cds_to_eject: the VM's (not snapshots')
        # CDs that would move, unless the VM is suspended; eject_cds
        rec = self.db['VM'][vm]
        if rec['power_state'] == 'Suspended':
            return
        for vbd in rec['VBDs']:
            vrec = self.db['VBD'][vbd]
            if vrec['type'] != 'CD' or vrec['VDI'] not in self.db['VDI']:
                continue
            if self.db['VDI'][vrec['VDI']]['SR'] != vdi_map.get(vrec['VDI'],
                                                                NULL):
                self.db['VDI'][vrec['VDI']]['VBDs'].remove(vbd)
                vrec.update(VDI=NULL, empty=True)
                self.ejected.append(vbd)

    def _move_vm(self, target, vm, dest_host, vdi_map, vif_map, copy):
        with self.lock, target.lock:
            rec = dict(self.db['VM'][vm])
            nets = [vif_map.get(v, self.db['VIF'][v]['network'])
                    for v in rec['VIFs']]
            if target is self and not copy:
                # within the pool: the VM stays, its disks change SR
                for v in [vm] + list(rec['snapshots']):
                    for vbd in self.db['VM'][v]['VBDs']:
                        vdi = self.db['VBD'][vbd]['VDI']
                        if vdi not in vdi_map or \
                                self.db['VDI'][vdi]['SR'] == vdi_map[vdi]:
                            continue
                        old = self.db['VDI'][vdi]
                        copy_ref = self.add_vdi(
                            vdi_map[vdi], old['name_label'],
                            old['virtual_size'], old['physical_utilisation'])
                        self.db['VBD'][vbd]['VDI'] = copy_ref
                        self.db['VDI'][copy_ref]['VBDs'].append(vbd)
                        self._destroy_vdi(vdi)
                if rec['power_state'] == 'Running':
                    self.db['VM'][vm]['resident_on'] = dest_host
                return vm
            new_disks = []
            for vdi in self._vm_disks(vm):
                old = self.db['VDI'][vdi]
                new_disks.append(target.add_vdi(
                    vdi_map[vdi], old['name_label'], old['virtual_size'],
                    old['physical_utilisation']))
            moved = set(self._vm_disks(vm))
            suspend = None
            for vdi, sr in vdi_map.items():
                if vdi in moved or vdi not in self.db['VDI']:
                    continue
                old = self.db['VDI'][vdi]
                made = target.add_vdi(sr, old['name_label'],
                                      old['virtual_size'],
                                      old['physical_utilisation'])
                if vdi == rec.get('suspend_VDI'):
                    suspend = made
            new = target.add_vm(rec['name_label'], new_disks, nets,
                                rec['power_state'], host=dest_host,
                                uuid=None if copy else rec['uuid'],
                                suspend_vdi=suspend)
            if not copy:
                self._remove_vm(vm)
            return new

    def _remove_vm(self, vm, keep_record=False):
        rec = self.db['VM'][vm]
        self._destroy_vdi(rec.get('suspend_VDI', NULL))
        for v in [vm] + list(rec['snapshots']):
            for vbd in self.db['VM'][v]['VBDs']:
                vbd_rec = self.db['VBD'].pop(vbd)
                if vbd_rec['type'] == 'CD':
                    if vbd_rec['VDI'] in self.db['VDI']:
                        self.db['VDI'][vbd_rec['VDI']]['VBDs'].remove(vbd)
                    continue            # an ISO stays in its library
                self._destroy_vdi(vbd_rec['VDI'])
            for vif in self.db['VM'][v]['VIFs']:
                self.db['VIF'].pop(vif, None)
            if v != vm or not keep_record:
                self.db['VM'].pop(v)

    def _destroy_vdi(self, vdi):
        rec = self.db['VDI'].pop(vdi, None)
        if rec is not None:
            sr = self.db['SR'][rec['SR']]
            sr['VDIs'].remove(vdi)
            sr['physical_utilisation'] -= rec['physical_utilisation']

    def _VDI_pool_migrate(self, task, vdi, sr, options, fail_plan=None):
        # message_forwarding.ml VDI.pool_migrate, then xapi_vm_migrate.ml
        # vdi_pool_migrate (migrate_receive, assert_can_migrate, send)
        with self.lock:
            rec = self._record('VDI', vdi)
            self._record('SR', sr)
            vbds = list(rec['VBDs'])
            if not vbds:
                raise Failure('VDI_NEEDS_VM_FOR_MIGRATE', vdi)
            vm = self.db['VBD'][vbds[0]]['VM']
            vmrec = self.db['VM'][vm]
            self._assert_power(vm, vmrec)
            vdi_map = {v: self.db['VDI'][v]['SR']
                       for v in (self.db['VBD'][b]['VDI']
                                 for b in vmrec['VBDs'])
                       if v in self.db['VDI']}
            vdi_map[vdi] = sr
            if vmrec['power_state'] == 'Running':
                # the VM's own host: a local live migration, allowed on a
                # disabled host (xapi_vm_helpers.ml assert_can_boot_here)
                host = vmrec['resident_on']
            else:
                # choose_host: an enabled host that sees the SRs
                needed = set(vdi_map.values())
                hosts = [h for h in self.db['host']
                         if self.db['host'][h]['enabled'] and needed <= {
                             self.db['PBD'][p]['SR'] for p in self.db['PBD']
                             if self.db['PBD'][p]['host'] == h}]
                if not hosts:
                    raise Failure('NO_HOSTS_AVAILABLE')
                host = hosts[0]
            self._assert_sr_support(self, vdi_map)
        self._storage_slot(host, +1)
        with self.lock:
            rec['current_operations'][task] = 'mirror'
        try:
            self._progress(task, fail_plan)
            with self.lock:
                new = self.add_vdi(sr, rec['name_label'], rec['virtual_size'],
                                   rec['physical_utilisation'])
                for vbd in vbds:
                    self.db['VBD'][vbd]['VDI'] = new
                    self.db['VDI'][new]['VBDs'].append(vbd)
                self._destroy_vdi(vdi)
            return new
        finally:
            with self.lock:
                rec['current_operations'].pop(task, None)
            self._storage_slot(host, -1)

    def _VDI_get_nbd_info(self, vdi):
        with self.lock:
            self._record('VDI', vdi)
            return list(self.nbd_info.get(vdi, []))

    # -- VM lifecycle (Nova's calls) -----------------------------------------

    def _assert_op(self, vm, op):
        """xapi_vm_lifecycle.ml check_operation_error, in its order.

        The power state first (``VM_BAD_POWER_STATE [vm; expected;
        actual]``, report_power_state_error), then other operations in
        progress (``OTHER_OPERATION_IN_PROGRESS ["VM"; vm; op; task]``,
        report_concurrent_operations_error), then a template's
        (``VM_IS_TEMPLATE [vm; op]``, check_template).
        """
        rec = self._record('VM', vm)
        allowed = POWER_STATES[op]
        if rec['power_state'] not in allowed:
            raise Failure('VM_BAD_POWER_STATE', vm,
                          ', '.join(p.lower() for p in allowed),
                          rec['power_state'].lower())
        current = rec['current_operations']
        if current and not (op == 'hard_shutdown' and 'hard_shutdown'
                            not in current.values()):
            task, cop = sorted(current.items())[0]
            raise Failure('OTHER_OPERATION_IN_PROGRESS', 'VM', vm, cop, task)
        if rec.get('is_a_template') and not rec.get('is_a_snapshot'):
            default = rec.get('is_default_template') or \
                rec.get('other_config', {}).get('default_template') == 'true'
            if op not in TEMPLATE_OPS and not (op == 'destroy' and
                                               not default):
                raise Failure('VM_IS_TEMPLATE', vm, op)
        return rec

    @staticmethod
    def _int(value, name):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise Failure('FIELD_TYPE_ERROR', name)

    def _VM_clone(self, vm, new_name):
        # xapi_vm.ml clone (Xapi_vm_clone.clone Disk_op_clone): the VDIs
        # of the VM's disks are cloned, its VIFs copied with new MACs; the
        # clone of a template is a template (not a default one)
        with self.lock:
            rec = self._assert_op(vm, 'clone')
            new = self._add('VM', **{
                k: (dict(v) if isinstance(v, dict) else v)
                for k, v in rec.items()
                if k not in ('uuid', 'VBDs', 'VIFs', 'snapshots',
                             'current_operations', 'name_label')})
            nrec = self.db['VM'][new]
            nrec.update(name_label=new_name, VBDs=[], VIFs=[], snapshots=[],
                        is_default_template=False, resident_on=NULL)
            nrec['other_config'].pop('default_template', None)
            for vbd in rec['VBDs']:
                vrec = self.db['VBD'][vbd]
                vdi = vrec['VDI']
                if vdi in self.db['VDI']:
                    old = self.db['VDI'][vdi]
                    vdi = self.add_vdi(old['SR'], old['name_label'],
                                       old['virtual_size'], 0)
                self._add_vbd(new, vdi, int(vrec['userdevice']), False,
                              type=vrec['type'])
            return new

    def _VM_set_is_a_template(self, vm, value):
        # xapi_vm.ml set_is_a_template (Db): a running VM cannot become one
        # (xapi_vm_lifecycle.ml: make_into_template needs Halted)
        with self.lock:
            rec = self._record('VM', vm)
            if value and rec['power_state'] != 'Halted':
                raise Failure('VM_BAD_POWER_STATE', vm, 'halted',
                              rec['power_state'].lower())
            rec['is_a_template'] = bool(value)
            # xapi_vm_lifecycle.ml update_allowed_operations
            rec['allowed_operations'] = [] if value else list(VM_OPS)
            return ''

    def _map_field(self, cls, ref, field):
        rec = self._record(cls, ref)
        if not isinstance(rec.get(field), dict):
            raise Failure('MESSAGE_METHOD_UNKNOWN', '%s.%s' % (cls, field))
        return rec[field]

    def _VM_add_to_other_config(self, vm, key, value):
        # db_actions: a key already there is MAP_DUPLICATE_KEY
        with self.lock:
            other = self._map_field('VM', vm, 'other_config')
            if key in other:
                raise Failure('MAP_DUPLICATE_KEY', 'VM', 'other_config', vm,
                              key)
            other[key] = value
            return ''

    def _VM_remove_from_other_config(self, vm, key):
        with self.lock:
            self._map_field('VM', vm, 'other_config').pop(key, None)
            return ''

    def _VM_set_affinity(self, vm, host):
        with self.lock:
            rec = self._record('VM', vm)
            if host != NULL:
                self._record('host', host)
            rec['affinity'] = host
            return ''

    def _VM_provision(self, vm):
        # xapi_vm.ml provision: only a template (ONLY_PROVISION_TEMPLATE);
        # the disks of other_config:disks are made (not modelled: the
        # engine removes that key and makes its disks itself)
        with self.lock:
            rec = self._assert_op(vm, 'provision')
            if not rec['is_a_template']:
                raise Failure('ONLY_PROVISION_TEMPLATE')
            if rec['other_config'].get('disks'):
                raise Failure('INTERNAL_ERROR', 'the fake pool does not '
                              'provision other_config:disks')
            return ''

    def _VM_set_memory_limits(self, vm, static_min, static_max, dynamic_min,
                              dynamic_max):
        # xapi_vm.ml set_memory_limits: Halted (changing_memory_limits);
        # vm_memory_constraints.ml: static_min <= dynamic_min <=
        # dynamic_max <= static_max, else MEMORY_CONSTRAINT_VIOLATION_ORDER
        with self.lock:
            rec = self._assert_op(vm, 'changing_memory_limits')
            values = [self._int(v, n) for v, n in (
                (static_min, 'static_min'), (dynamic_min, 'dynamic_min'),
                (dynamic_max, 'dynamic_max'), (static_max, 'static_max'))]
            if values != sorted(values) or values[0] < 0:
                raise Failure('MEMORY_CONSTRAINT_VIOLATION_ORDER')
            rec.update(memory_static_min=values[0],
                       memory_dynamic_min=values[1],
                       memory_dynamic_max=values[2],
                       memory_static_max=values[3])
            return ''

    def _VM_set_VCPUs_max(self, vm, value):
        # xapi_vm.ml set_VCPUs_max: Halted; 0 < VCPUs_at_startup <= max
        with self.lock:
            rec = self._assert_op(vm, 'changing_VCPUs')
            value = self._int(value, 'value')
            if value < 1 or value < rec['VCPUs_at_startup']:
                raise Failure('INVALID_VALUE', 'VCPU values must satisfy: '
                              '0 < VCPUs_at_startup \u2264 VCPUs_max',
                              str(value))
            rec['VCPUs_max'] = value
            return ''

    def _VM_set_VCPUs_at_startup(self, vm, value):
        # xapi_vm.ml set_VCPUs_at_startup
        with self.lock:
            rec = self._assert_op(vm, 'changing_VCPUs')
            value = self._int(value, 'value')
            if value < 1 or value > rec['VCPUs_max']:
                raise Failure('INVALID_VALUE', 'VCPU values must satisfy: '
                              '0 < VCPUs_at_startup \u2264 VCPUs_max',
                              str(value))
            rec['VCPUs_at_startup'] = value
            return ''

    def _VDI_create(self, record):
        # xapi_vdi.ml create: the SR must be valid and its SM able to
        # create (SR_OPERATION_NOT_SUPPORTED [sr])
        with self.lock:
            sr = record.get('SR')
            srec = self._record('SR', sr)
            if 'VDI_CREATE' not in self._sm(srec['type'])['features']:
                raise Failure('SR_OPERATION_NOT_SUPPORTED', sr)
            size = self._int(record.get('virtual_size'), 'virtual_size')
            if size < 0:
                raise Failure('INVALID_VALUE', 'virtual_size', str(size))
            vdi = self.add_vdi(sr, record.get('name_label', ''), size, 0)
            rec = self.db['VDI'][vdi]
            rec.update(type=record.get('type', 'user'),
                       read_only=bool(record.get('read_only')),
                       sharable=bool(record.get('sharable')),
                       other_config=dict(record.get('other_config') or {}))
            return vdi

    def _VDI_destroy(self, vdi):
        # xapi_vdi.ml destroy: a VDI with an attached VBD is VDI_IN_USE
        # [vdi; "destroy"]; its other VBDs go with it
        with self.lock:
            rec = self._record('VDI', vdi)
            for vbd in rec['VBDs']:
                if self.db['VBD'][vbd].get('currently_attached'):
                    raise Failure('VDI_IN_USE', vdi, 'destroy')
            for vbd in list(rec['VBDs']):
                vrec = self.db['VBD'].pop(vbd)
                self.db['VM'][vrec['VM']]['VBDs'].remove(vbd)
            self._destroy_vdi(vdi)
            return ''

    def _VBD_create(self, record):
        # xapi_vbd.ml create: a valid VM and (unless empty) VDI; a
        # userdevice already used: DEVICE_ALREADY_EXISTS [userdevice]
        with self.lock:
            vm = record.get('VM')
            vmrec = self._record('VM', vm)
            empty = bool(record.get('empty'))
            vdi = record.get('VDI', NULL)
            if not empty:
                self._record('VDI', vdi)
            device = str(record.get('userdevice'))
            if not device.isdigit():
                raise Failure('INVALID_DEVICE', device)
            used = {self.db['VBD'][b]['userdevice'] for b in vmrec['VBDs']}
            if device in used:
                raise Failure('DEVICE_ALREADY_EXISTS', device)
            vbd = self._add_vbd(vm, vdi if not empty else NULL, int(device),
                                False, type=record.get('type', 'Disk'))
            self.db['VBD'][vbd].update(
                mode=record.get('mode', 'RW'),
                bootable=bool(record.get('bootable')))
            return vbd

    def _VIF_create(self, record):
        # xapi_vif_helpers.ml create: a valid network and VM, an integer
        # device not used yet (DEVICE_ALREADY_EXISTS [device]), a valid
        # MAC or '' for one xapi makes (MAC_INVALID [mac])
        with self.lock:
            vm = record.get('VM')
            vmrec = self._record('VM', vm)
            net = record.get('network')
            self._record('network', net)
            device = str(record.get('device'))
            if not device.isdigit():
                raise Failure('INVALID_DEVICE', device)
            if device in {self.db['VIF'][v]['device']
                          for v in vmrec['VIFs']}:
                raise Failure('DEVICE_ALREADY_EXISTS', device)
            mac = record.get('MAC', '')
            if not mac:
                mac = '02:%02x:%02x:%02x:%02x:%02x' % tuple(
                    uuidlib.uuid4().bytes[:5])
            parts = mac.split(':')
            if len(parts) != 6 or not all(
                    len(p) == 2 and all(c in '0123456789abcdefABCDEF'
                                        for c in p) for p in parts):
                raise Failure('MAC_INVALID', mac)
            vif = self._add('VIF', VM=vm, network=net, device=device,
                            MAC=mac.lower(), currently_attached=False,
                            other_config=dict(record.get('other_config')
                                              or {}))
            vmrec['VIFs'].append(vif)
            self.db['network'][net]['VIFs'].append(vif)
            return vif

    # hosts: what a VM may run on

    def _memory_needed(self, rec):
        # memory_check.ml vm_compute_start_memory: dynamic_max (no
        # ballooning modelled)
        return rec['memory_dynamic_max']

    def _memory_free(self, host):
        used = sum(self._memory_needed(r) for r in self.db['VM'].values()
                   if r.get('resident_on') == host and
                   r['power_state'] in ('Running', 'Paused'))
        metrics = self.db['host_metrics'][self.db['host'][host]['metrics']]
        return metrics['memory_total'] - used

    def _refresh_metrics(self):
        for host, rec in self.db['host'].items():
            self.db['host_metrics'][rec['metrics']]['memory_free'] = \
                self._memory_free(host)

    def _assert_can_boot_here(self, vm, host):
        # xapi_vm_helpers.ml assert_can_boot_here: an enabled host (but a
        # running VM staying on its host), that sees every SR of the VM's
        # disks (VM_REQUIRES_SR [vm; sr]) and network of its VIFs
        # (VM_REQUIRES_NET [vm; network]), with the memory the VM needs
        # (HOST_NOT_ENOUGH_FREE_MEMORY [needed; available])
        rec = self.db['VM'][vm]
        hrec = self._record('host', host)
        local = rec['power_state'] == 'Running' and \
            rec['resident_on'] == host
        if not hrec['enabled'] and not local:
            raise Failure('HOST_DISABLED', host)
        seen = {self.db['PBD'][p]['SR'] for p in self.db['PBD']
                if self.db['PBD'][p]['host'] == host}
        for vbd in rec['VBDs']:
            vrec = self.db['VBD'][vbd]
            if vrec['empty'] or vrec['VDI'] not in self.db['VDI']:
                continue
            sr = self.db['VDI'][vrec['VDI']]['SR']
            if sr not in seen:
                raise Failure('VM_REQUIRES_SR', vm, sr)
        nets = {self.db['PIF'][p]['network'] for p in hrec['PIFs']}
        for vif in rec['VIFs']:
            net = self.db['VIF'][vif]['network']
            if net not in nets:
                raise Failure('VM_REQUIRES_NET', vm, net)
        if not local:
            needed, free = self._memory_needed(rec), self._memory_free(host)
            if free < needed:
                raise Failure('HOST_NOT_ENOUGH_FREE_MEMORY', str(needed),
                              str(free))

    def _boot(self, vm, host, paused):
        rec = self.db['VM'][vm]
        rec.update(power_state='Paused' if paused else 'Running',
                   resident_on=host)
        for vbd in rec['VBDs']:
            self.db['VBD'][vbd]['currently_attached'] = True
        for vif in rec['VIFs']:
            self.db['VIF'][vif]['currently_attached'] = True
        self.boots[vm] += 1
        self._refresh_metrics()

    def _halt(self, vm):
        rec = self.db['VM'][vm]
        rec.update(power_state='Halted', resident_on=NULL)
        for vbd in rec['VBDs']:
            self.db['VBD'][vbd]['currently_attached'] = False
        for vif in rec['VIFs']:
            self.db['VIF'][vif]['currently_attached'] = False
        self._refresh_metrics()

    def _VM_start(self, vm, start_paused, force):
        # xapi_vm.ml start; message_forwarding.ml VM.start: the VM's
        # affinity host if it can boot there, else a host that can
        # (Xapi_vm_helpers.choose_host_for_vm); none: the error of the
        # affinity host, or NO_HOSTS_AVAILABLE
        with self.lock:
            rec = self._assert_op(vm, 'start')
            hosts = list(self.db['host'])
            if rec.get('affinity') in self.db['host']:
                hosts.remove(rec['affinity'])
                hosts.insert(0, rec['affinity'])
            first = None
            for host in hosts:
                try:
                    self._assert_can_boot_here(vm, host)
                except Failure as exc:
                    first = first or exc
                    continue
                self._boot(vm, host, bool(start_paused))
                return ''
            if rec.get('affinity') in self.db['host'] and first:
                raise first
            raise Failure('NO_HOSTS_AVAILABLE')

    def _VM_start_on(self, vm, host, start_paused, force):
        # message_forwarding.ml VM.start_on: assert_can_boot_here on host
        with self.lock:
            self._assert_op(vm, 'start_on')
            self._assert_can_boot_here(vm, host)
            self._boot(vm, host, bool(start_paused))
            return ''

    def _wait_guest(self, task, vm, fail_plan):
        """A guest asked to shut down or reboot: it does, or never does.

        A VM in :attr:`unresponsive` keeps the task running until it is
        cancelled (xapi's clean operations wait for the guest;
        ``task.cancel`` ends them with ``TASK_CANCELLED``).
        """
        rec = self.db['task'][task]
        if vm in self.unresponsive:
            # until cancelled, or the domain is gone (a hard shutdown)
            while rec['status'] != 'cancelling' and self.db['VM'].get(
                    vm, {}).get('power_state') in ('Running', 'Paused'):
                time.sleep(0.02)
            raise Failure('TASK_CANCELLED', task)
        self._progress(task, fail_plan)

    def _with_vm_op(self, task, vm, op):
        with self.lock:
            rec = self._assert_op(vm, op)
            rec['current_operations'][task] = op
        return rec

    def _end_vm_op(self, task, vm):
        with self.lock:
            if vm in self.db['VM']:
                self.db['VM'][vm]['current_operations'].pop(task, None)

    def _VM_clean_shutdown(self, task, vm, fail_plan=None):
        # xapi_vm.ml clean_shutdown (Running): the guest shuts down
        self._with_vm_op(task, vm, 'clean_shutdown')
        try:
            self._wait_guest(task, vm, fail_plan)
            with self.lock:
                self._halt(vm)
            return ''
        finally:
            self._end_vm_op(task, vm)

    def _VM_clean_reboot(self, task, vm, fail_plan=None):
        # xapi_vm.ml clean_reboot (Running)
        self._with_vm_op(task, vm, 'clean_reboot')
        try:
            self._wait_guest(task, vm, fail_plan)
            with self.lock:
                self.boots[vm] += 1
            return ''
        finally:
            self._end_vm_op(task, vm)

    def _VM_hard_shutdown(self, vm):
        # xapi_vm.ml hard_shutdown (Paused, Suspended, Running); allowed
        # while a clean shutdown runs (is_allowed_concurrently)
        with self.lock:
            rec = self._assert_op(vm, 'hard_shutdown')
            if rec['power_state'] == 'Suspended':
                self._destroy_vdi(rec.get('suspend_VDI', NULL))
                rec['suspend_VDI'] = NULL
            for task in list(rec['current_operations']):
                if task in self.db['task'] and \
                        self.db['task'][task]['status'] == 'pending':
                    self.db['task'][task]['status'] = 'cancelling'
            self._halt(vm)
            return ''

    def _VM_hard_reboot(self, vm):
        # xapi_vm.ml hard_reboot (Paused, Running): it runs afterwards
        with self.lock:
            rec = self._assert_op(vm, 'hard_reboot')
            rec['power_state'] = 'Running'
            self.boots[vm] += 1
            return ''

    def _VM_pause(self, vm):
        with self.lock:
            self._assert_op(vm, 'pause')['power_state'] = 'Paused'
            return ''

    def _VM_unpause(self, vm):
        with self.lock:
            self._assert_op(vm, 'unpause')['power_state'] = 'Running'
            return ''

    def _VM_destroy(self, vm):
        # xapi_vm.ml destroy (Halted, Suspended; a default template
        # never): the VM, its VBDs and VIFs go, its VDIs stay
        with self.lock:
            rec = self._assert_op(vm, 'destroy')
            for vbd in rec['VBDs']:
                vrec = self.db['VBD'].pop(vbd)
                if vrec['VDI'] in self.db['VDI']:
                    self.db['VDI'][vrec['VDI']]['VBDs'].remove(vbd)
            for vif in rec['VIFs']:
                vrec = self.db['VIF'].pop(vif)
                self.db['network'][vrec['network']]['VIFs'].remove(vif)
            self.db['VM'].pop(vm)
            return ''

    def _VM_pool_migrate(self, task, vm, host, options, fail_plan=None):
        # message_forwarding.ml VM.pool_migrate: the VM operation
        # pool_migrate (Running), then reserve_memory_for_vm
        # (assert_can_boot_here on host); xapi_vm_migrate.ml pool_migrate
        with self.lock:
            rec = self._assert_op(vm, 'pool_migrate')
            self._record('host', host)
            self._assert_can_boot_here(vm, host)
            rec['current_operations'][task] = 'pool_migrate'
        try:
            self._progress(task, fail_plan)
            with self.lock:
                rec['resident_on'] = host
                self._refresh_metrics()
            return ''
        finally:
            self._end_vm_op(task, vm)

    def _task_create(self, label, description):
        # a task a client makes for an HTTP handler (import_raw_vdi)
        return self._add('task', name_label=label, status='pending',
                         progress=0.0, result='', error_info=[],
                         created=time.time(), name_description=description)

    def import_raw_vdi(self, session, vdi, task, fmt, data):
        """import_raw_vdi.ml localhost_handler, once the body is read.

        Raises :class:`Failure` as the task's error (the HTTP answer
        was already 200).
        """
        with self.lock:
            rec = self._record('VDI', vdi)
            for vbd in rec['VBDs']:
                if self.db['VBD'][vbd].get('currently_attached'):
                    # Sm_fs_ops.with_block_attached_device: RW elsewhere
                    raise Failure('VDI_IN_USE', vdi, 'import')
            size = rec['virtual_size']
        if fmt == 'raw':
            if len(data) > size:
                # vhd-tool writes past the end: vhd_tool_wrapper.ml
                raise Failure('VDI_IO_ERROR', 'Device I/O errors')
            extents = [(0, data)]
        else:
            extents = _vhd_extents(data, size)
        written = sum(len(d) for _o, d in extents if d.strip(b'\0'))
        with self.lock:
            rec['physical_utilisation'] = max(rec['physical_utilisation'],
                                              written)
            self.contents[vdi] = self.contents.get(vdi, {})
            for offset, chunk in extents:
                if chunk.strip(b'\0'):
                    self.contents[vdi][offset] = chunk
            self.imports.append((vdi, fmt, written))
        return vdi


def _vhd_extents(data, vdi_size):
    """``[(offset, bytes)]`` of a VHD stream, as vhd-tool reads one.

    The stream is parsed with xsm's VHD reader; anything it refuses, a
    differencing VHD (vhd-tool's import needs no parent) or a virtual
    size larger than the VDI fails as vhd-tool fails: ``VDI_IO_ERROR``
    (vhd_tool_wrapper.ml run_vhd_tool).
    """
    import os
    import tempfile

    from xsm_driver.core.block import backends
    fd, path = tempfile.mkstemp(suffix='.vhd')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        try:
            dev = backends.VHDDevice(path)
        except Exception:
            raise Failure('VDI_IO_ERROR', 'Device I/O errors')
        try:
            if dev.size > vdi_size:
                raise Failure('VDI_IO_ERROR', 'Device I/O errors')
            out = []
            for offset, length, flags in dev.extents(0, dev.size):
                if length and not flags:
                    out.append((offset, bytes(dev.pread(offset, length))))
            return out
        finally:
            dev.close()
    finally:
        os.unlink(path)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        # headers and body go out as two writes: no Nagle delay between
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        length = int(self.headers.get('Content-Length', 0))
        params, method = xmlrpc.client.loads(self.rfile.read(length),
                                             use_builtin_types=False)
        pool = self.server.pool
        when = pool.take_drop(method)
        if when == 'before':
            return self._hang_up()
        response = pool.dispatch(method, params)
        if when == 'after':
            return self._hang_up()
        body = xmlrpc.client.dumps((response,), methodresponse=True,
                                   allow_none=True).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'text/xml')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        """The master's ``/import_raw_vdi`` (import_raw_vdi.ml).

        The session is checked first (xapi_http.ml ``with_context``: 403
        without a valid one); an unknown ``format`` is a 404, and so is
        ``chunked`` with a VHD or a body with ``Transfer-Encoding``
        ("Cannot handle encoding"), each failing the task; the body
        needs a Content-Length. Otherwise xapi answers 200 at once and
        the task (``task_id``, or one of its own) gets the outcome:
        success with the VDI, or the failure :meth:`FakePool.
        import_raw_vdi` raises.
        """
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        pool = self.server.pool
        pool.calls.append('PUT ' + url.path)
        pool.call_args.append(('PUT ' + url.path, query))
        if url.path != '/import_raw_vdi':
            return self._status(404)
        with pool.lock:
            if query.get('session_id') not in pool.sessions:
                return self._status(403)
            task = query.get('task_id')
            if task not in pool.db['task']:
                task = pool._task_create('import_raw_vdi', '')

        def fail(*details):
            with pool.lock:
                pool.db['task'][task].update(status='failure',
                                             error_info=list(details))

        fmt = query.get('format', 'raw').lower()
        if fmt not in ('raw', 'vhd', 'tar', 'qcow2'):
            fail('INTERNAL_ERROR', 'Unknown format ' + fmt)
            return self._status(404)
        if fmt != 'raw' and 'chunked' in query:
            fail('INTERNAL_ERROR', 'Cannot handle chunked VHD')
            return self._status(404)
        if self.headers.get('Transfer-Encoding'):
            fail('INTERNAL_ERROR', 'Cannot handle encoding: '
                 + self.headers['Transfer-Encoding'])
            return self._status(404)
        if fmt not in ('raw', 'vhd') or 'chunked' in query:
            fail('INTERNAL_ERROR', 'not modelled by the fake pool')
            return self._status(400)
        if self.headers.get('Content-Length') is None:
            fail('INTERNAL_ERROR', 'Not enough info supplied to import')
            return self._status(400)
        data = self.rfile.read(int(self.headers['Content-Length']))
        try:
            vdi = pool.import_raw_vdi(query['session_id'],
                                      query.get('vdi', NULL), task, fmt,
                                      data)
        except Failure as exc:
            fail(*exc.details)
        else:
            with pool.lock:
                pool.db['task'][task].update(
                    status='success', progress=1.0,
                    result='<value>%s</value>' % vdi)
        self.send_response(200)
        self.send_header('task-id', task)
        self.send_header('Content-Length', '0')
        self.end_headers()
        self.close_connection = True

    def _status(self, code):
        self.send_response(code)
        self.send_header('Content-Length', '0')
        self.end_headers()
        self.close_connection = True

    def _hang_up(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open = {}                 # connection -> its handler thread
        self._open_lock = threading.Lock()

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open[request] = threading.current_thread()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)

    def close_connections(self, timeout=5.0):
        """Hang up on every client (kept-alive ones wait in a read)."""
        with self._open_lock:
            items = list(self._open.items())
        for conn, _thread in items:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for _conn, thread in items:
            thread.join(max(0.0, deadline - time.monotonic()))


class XenAPIServer:
    """Serve a :class:`FakePool` on ``http://127.0.0.1:<port>/``."""

    def __init__(self, pool, tls_context=None):
        self.pool = pool
        self._server = _Server(('127.0.0.1', 0), _Handler)
        self._server.pool = pool
        self._scheme = 'http'
        if tls_context is not None:
            self._server.socket = tls_context.wrap_socket(
                self._server.socket, server_side=True)
            self._scheme = 'https'
        self._thread = None

    @property
    def url(self):
        return '%s://127.0.0.1:%d/' % (self._scheme,
                                       self._server.server_address[1])

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={'poll_interval': 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        # the handler threads of connections clients kept open
        self._server.close_connections()
        self.pool.stop_tasks()
        REGISTRY.pop(self.pool.name, None)


# -- xapi-nbd ----------------------------------------------------------------
#
# xapi's NBD server (xapi-nbd) is built on xapi-project/nbd. Every rule the
# double below enforces is that library's, at its master (b71e1be):
# lib/server.ml ``connect`` (negotiation), ``negotiate_end`` and ``serve``
# (transmission), lib/protocol.ml (``Option.of_int32``, ``DiskInfo``,
# ``PerExportFlag.to_int``); xapi-nbd itself (xen-api ocaml/nbd/src/main.ml
# ``handle_connection``) serves read-only, offers no export list, and fails
# the connection for an export name it cannot use; TLS or not follows the
# networks' nbd / insecure_nbd purpose (``xapi_says_use_tls``).

_NBDMAGIC = 0x4e42444d41474943
_IHAVEOPT = 0x49484156454f5054
_REP_MAGIC = 0x0003e889045565a9
_REQUEST_MAGIC = 0x25609513
_REPLY_MAGIC = 0x67446698
_OPT_EXPORT_NAME, _OPT_ABORT, _OPT_LIST, _OPT_STARTTLS = 1, 2, 3, 5
_REP_ACK = 1
_REP_ERR_UNSUP = 0x80000001
_REP_ERR_POLICY = 0x80000002
_REP_ERR_INVALID = 0x80000003
_REP_ERR_TLS_REQD = 0x80000005
_EPERM, _EINVAL = 1, 22


class _Hangup(Exception):
    """xapi-nbd fails the connection's thread: the socket is closed."""


def _read_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise _Hangup('end of stream')
        data += chunk
    return bytes(data)


class XapiNBDServer:
    """An NBD server exactly as narrow as xapi-nbd.

    * Greeting: fixed newstyle only, never NO_ZEROES (server.ml
      ``connect``: ``Negotiate.V2 [GlobalFlag.Fixed_newstyle]``).
    * With a TLS context (a network with the ``nbd`` purpose, FORCEDTLS):
      a client without fixed newstyle is hung up on; before STARTTLS,
      EXPORT_NAME and ABORT hang up, every other option gets
      ``NBD_REP_ERR_TLS_REQD`` (server.ml ``negotiate_tls``).
    * Without one (``insecure_nbd``) and after STARTTLS
      (server.ml ``generic_loop``): STARTTLS gets ``NBD_REP_ERR_POLICY`` in
      clear text and ``NBD_REP_ERR_INVALID`` under TLS; LIST gets
      ``NBD_REP_ERR_POLICY`` (xapi-nbd offers no list); ABORT an ACK, then
      the end; EXPORT_NAME chooses the export; every other option
      (STRUCTURED_REPLY, INFO, GO, SET_META_CONTEXT, ...) is
      ``Option.Unknown`` and gets ``NBD_REP_ERR_UNSUP``.
    * An unknown export name: xapi-nbd's handler fails and the connection
      closes, with no reply.
    * After EXPORT_NAME: size (u64), flags (u16: HAS_FLAGS, READ_ONLY when
      read-only) and 124 zero bytes (protocol.ml ``DiskInfo``).
    * Transmission (server.ml ``serve``): simple replies only; READ and
      WRITE whose offset or length is not a multiple of 512 get EINVAL;
      WRITE on a read-only export EPERM; DISC ends the session; every other
      command (FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, ...) EINVAL.

    :param exports: ``{name: device}`` (``size`` and ``pread``, and
        ``pwrite`` when not read-only).
    :attr options_seen: option numbers received, in order, for tests.
    """

    def __init__(self, exports, tls_context=None, read_only=True):
        self.exports = dict(exports)
        self.tls_context = tls_context
        self.read_only = read_only
        self.options_seen = []
        self.commands_seen = collections.Counter()
        self.errors = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(('127.0.0.1', 0))
        self._sock.listen(8)
        self.address = self._sock.getsockname()
        self._threads = []
        self._conns = []
        self._stopping = False
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._accept_loop,
                                        daemon=True, name='fake-xapi-nbd')
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self):
        while not self._stopping:
            try:
                conn, _addr = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve_one, args=(conn,),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve_one(self, conn):
        try:
            self._session(conn)
        except (_Hangup, OSError, ValueError) as exc:
            self.errors.append(str(exc))
        finally:
            try:
                conn.close()
            except OSError:
                pass

    @staticmethod
    def _reply(sock, option, reply, data=b''):
        sock.sendall(struct.pack('>QIII', _REP_MAGIC, option, reply,
                                 len(data)) + data)

    def _read_option(self, sock):
        magic, option, length = struct.unpack('>QII',
                                              _read_exactly(sock, 16))
        if magic != _IHAVEOPT:
            raise _Hangup('bad option magic')     # OptionRequestHeader
        data = _read_exactly(sock, length)
        self.options_seen.append(option)
        return option, data

    def _session(self, conn):
        conn.sendall(struct.pack('>QQH', _NBDMAGIC, _IHAVEOPT, 1))
        (client_flags,) = struct.unpack('>I', _read_exactly(conn, 4))
        sock, is_tls = conn, False
        if self.tls_context is not None:
            if not client_flags & 1:
                raise _Hangup('client without fixed newstyle, FORCEDTLS')
            while True:                             # negotiate_tls
                option, _data = self._read_option(conn)
                if option in (_OPT_EXPORT_NAME, _OPT_ABORT):
                    raise _Hangup('option %d before TLS' % option)
                if option == _OPT_STARTTLS:
                    self._reply(conn, option, _REP_ACK)
                    sock = self.tls_context.wrap_socket(conn,
                                                        server_side=True)
                    is_tls = True
                    break
                self._reply(conn, option, _REP_ERR_TLS_REQD)
        while True:                                 # generic_loop
            option, data = self._read_option(sock)
            if option == _OPT_STARTTLS:
                self._reply(sock, option, _REP_ERR_INVALID if is_tls
                            else _REP_ERR_POLICY)
            elif option == _OPT_EXPORT_NAME:
                name = data.decode('utf-8', 'replace')
                break
            elif option == _OPT_ABORT:
                self._reply(sock, option, _REP_ACK)
                return
            elif option == _OPT_LIST:
                self._reply(sock, option, _REP_ERR_POLICY)
            else:
                self._reply(sock, option, _REP_ERR_UNSUP)
        if name not in self.exports:
            raise _Hangup('no export %r' % name)
        dev = self.exports[name]
        flags = 1 | (2 if self.read_only else 0)
        sock.sendall(struct.pack('>QH', dev.size, flags) + bytes(124))
        self._transmission(sock, dev)

    def _transmission(self, sock, dev):
        while True:
            magic, _flags, cmd, handle, offset, length = struct.unpack(
                '>IHHQQI', _read_exactly(sock, 28))
            if magic != _REQUEST_MAGIC:
                raise _Hangup('bad request magic')
            self.commands_seen[cmd] += 1

            def answer(error):
                sock.sendall(struct.pack('>IIQ', _REPLY_MAGIC, error,
                                         handle))
            aligned = offset % 512 == 0 and length % 512 == 0
            if cmd == 0:                                    # READ
                if not aligned:
                    answer(_EINVAL)
                    continue
                answer(0)
                sock.sendall(bytes(dev.pread(offset, length)))
            elif cmd == 1:                                  # WRITE
                if self.read_only:
                    # xapi-nbd does not read the payload here either
                    answer(_EPERM)
                elif not aligned:
                    answer(_EINVAL)
                else:
                    dev.pwrite(_read_exactly(sock, length), offset)
                    answer(0)
            elif cmd == 2:                                  # DISC
                return
            else:
                answer(_EINVAL)
