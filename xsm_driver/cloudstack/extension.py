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

"""CloudStack 4.21+ Orchestrator Extension on xsm-driver's agents.

CloudStack's management server runs the extension's executable as
``EXECUTABLE ACTION JSON-FILE [TIMEOUT]`` for each VM lifecycle action of
an instance on a host of an extension cluster, and for each custom action
an operator runs with ``runCustomAction`` (the action name is the custom
action's name). It reads one JSON object from standard output:
``{"status": "success", ...}`` (``status`` answers ``power_state``
``poweron``/``poweroff``; ``prepare`` may answer ``details`` that
CloudStack keeps with the VM) or ``{"error": "..."}`` with a non-zero
exit. (Facts from Apache CloudStack's ``extensions/HyperV/hyperv.py`` and
``extensions/Proxmox/proxmox.sh`` and the "Writing Extensions" page of
the admin guide.)

The JSON file holds:

``cloudstack.vm.details``
    the VM (CloudStack's ``VirtualMachineTO``): ``name`` (the instance
    name, ``i-2-100-VM``), ``cpus``, ``minRam`` (bytes), ``nics``
    (``mac``, ``broadcastUri``, ``deviceId``), ``details`` (the VM's
    details, with what ``prepare`` answered merged in);
``externaldetails.extension`` / ``.host`` / ``.virtualmachine``
    the key-values the operator gave ``createExtension``, ``addHost``
    (or ``updateHost``) and the template (``registerTemplate``
    ``externaldetails``) or ``deployVirtualMachine``;
    ``externaldetails.action`` a custom action's own details;
``parameters``
    a custom action's parameters (typed as ``addCustomAction`` declared
    them: a BOOLEAN is a JSON bool).

(Checked against Apache CloudStack 4.21's sources: the management server
writes ``cloudstack.vm.details`` from ``VirtualMachineTO``;
``ExternalPathPayloadProvisioner`` runs ``prepare``'s answer through a
JSON merge patch of that ``VirtualMachineTO``, so ``details`` lands in
the VM's details; a custom action runs on the VM's current (or last)
host, with ``externaldetails`` ``action``, ``host``, ``resourcemap``,
``extension``, ``caller`` and ``virtualmachine``, the VM's external
details, from ``ExtensionsManagerImpl.runCustomAction``; the Proxmox
extension reads its template details (``template_id``, ``iso_path``)
from ``externaldetails.virtualmachine`` and the memory as ``minRam //
1024 // 1024`` MiB.)

On a host whose agent runs ``[hypervisor]driver = qemu`` each VM is a
QEMU guest of ``minRam`` MiB and ``cpus`` vCPUs; each NIC is a VIF that
keeps the NIC's MAC (``MAC@NETWORK``, see
:func:`xsm_driver.core.migration.host.vif_entry`), and a migration finds
each NIC's VIF by its MAC, as XenServer does.

What this extension reads from them (a host's value wins over the
extension's):

==========================  ============================================
``xsm_host``                the xsm-agent host (``[agent]host``) of the
                            CloudStack host: its lifecycle actions run
                            there (required)
``xsm_hosts``               every xsm host, comma separated: where a VM
                            that moved is looked for
``xsm_config_file``         the xsm-driver configuration with the
                            broker and the operator key (default
                            ``/etc/xsm-driver/xsm-driver.conf``)
``xsm_sr``                  the SR new disks go to (required to create)
``xsm_root_size``           size of the root disk (default ``1G``)
``xsm_disks``               (virtual machine, or the VM's own details)
                            disks as ``SR:SIZE,...`` instead of one root
                            disk on ``xsm_sr``
``xsm_network``             the network of a NIC without a VLAN
``xsm_stop_timeout``        (also the virtual machine's) seconds a stop
                            leaves the guest to power off after the ACPI
                            power button before its QEMU is killed
                            (default 30; 0: killed at once; at most 600,
                            and what CloudStack's timeout leaves)
==========================  ============================================

Custom actions (``addCustomAction`` with resourcetype VirtualMachine):

``migratevmwithvolume``
    live migration of the VM with its volumes: parameters ``host`` (the
    destination xsm host), ``pool`` (the destination SR of every disk)
    or ``pools`` (``SR,SR`` in disk order, or ``DISK=SR,...``), and
    ``wait`` (default true: answer when it has ended).
``migrationstatus``
    the VM's latest migration, or the one named by ``migration``.
``abortmigration``
    abort the VM's running migration (or ``migration``).

Everything here is pure but for :class:`Extension`, which calls the
agents through the clients it is given.
"""

import json
import logging
import time

import oslo_messaging as messaging

from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod
from xsm_driver.hypervisor import base as hv_base

LOG = logging.getLogger(__name__)

DEFAULT_CONFIG = '/etc/xsm-driver/xsm-driver.conf'
DEFAULT_ROOT_SIZE = '1G'
DEFAULT_TIMEOUT = 3600
MiB = 1 << 20
#: seconds kept from CloudStack's timeout to answer before it gives up
ANSWER_MARGIN = 5
#: xsm_stop_timeout when no detail says
DEFAULT_STOP_TIMEOUT = 30
#: seconds a clean stop keeps from CloudStack's timeout for the kill after
#: its own timeout (SIGTERM, then SIGKILL) and the disks' detach
STOP_KILL_MARGIN = 20

LIFECYCLE = ('prepare', 'create', 'deploy', 'start', 'stop', 'reboot',
             'status', 'delete', 'suspend', 'resume')
CUSTOM = ('migratevmwithvolume', 'migrationstatus', 'abortmigration')
ACTIONS = LIFECYCLE + CUSTOM

POWER_STATES = {'running': 'poweron', 'halted': 'poweroff',
                'paused': 'poweron'}


class ExtensionError(Exception):
    """What the extension answers as ``{"error": message}``."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


# -- reading CloudStack's JSON ---------------------------------------------

def parse_request(text):
    """The JSON object of CloudStack's file.

    >>> parse_request('{"a": 1}')
    {'a': 1}
    """
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ExtensionError('the JSON file is not valid JSON: %s' % exc)
    if not isinstance(data, dict):
        raise ExtensionError('the JSON file must hold one JSON object, not '
                             '%s' % type(data).__name__)
    return data


def _object(value, what):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExtensionError('%s must be a JSON object, not %s'
                             % (what, type(value).__name__))
    return value


def settings(request):
    """The extension's key-values: the host's win over the extension's.

    >>> s = settings({'externaldetails': {'extension': {'xsm_sr': 'a',
    ...     'xsm_host': 'x'}, 'host': {'xsm_host': 'h'}}})
    >>> s['xsm_host'], s['xsm_sr']
    ('h', 'a')
    """
    details = _object(request.get('externaldetails'), 'externaldetails')
    out = {}
    for part in ('extension', 'host'):
        out.update(_object(details.get(part),
                           'externaldetails.%s' % part))
    return out


def vm_details(request):
    return _object(request.get('cloudstack.vm.details'),
                   'cloudstack.vm.details')


def vm_settings(request):
    details = _object(request.get('externaldetails'), 'externaldetails')
    return _object(details.get('virtualmachine'),
                   'externaldetails.virtualmachine')


def vm_name(request):
    """The instance name CloudStack gives the VM (``i-2-100-VM``)."""
    name = vm_details(request).get('name') or request.get(
        'virtualmachinename')
    if not isinstance(name, str) or not name:
        raise ExtensionError('cloudstack.vm.details has no name (the '
                             'instance name, e.g. i-2-100-VM)')
    return name


def host_of(conf):
    host = conf.get('xsm_host')
    if not isinstance(host, str) or not host.strip():
        raise ExtensionError(
            'externaldetails.host has no xsm_host: give each CloudStack '
            'host of the extension cluster the detail xsm_host=<the '
            '[agent]host of its xsm-agent> (addHost details[0].key=xsm_host)')
    return host.strip()


def _split(text):
    if isinstance(text, list):
        return [str(t).strip() for t in text if str(t).strip()]
    return [t.strip() for t in str(text or '').split(',') if t.strip()]


def search_hosts(conf):
    """The hosts a VM is looked for on: its own first, then the others."""
    first = host_of(conf)
    return [first] + [h for h in _split(conf.get('xsm_hosts')) if h != first]


def config_file(conf):
    return conf.get('xsm_config_file') or DEFAULT_CONFIG


def _size(text, what):
    from xsm_driver.core.vhd import format as fmt
    try:
        return fmt.parse_size(str(text).strip())
    except ValueError as exc:
        raise ExtensionError('%s: %s' % (what, exc))


def stop_timeout(request, conf, timeout=DEFAULT_TIMEOUT):
    """Seconds a stop leaves the guest to power off (0: kill at once).

    CloudStack gives an extension's stop no "forced" flag (its
    ``StopCommand.isForced`` is not in the JSON file): every stop is a
    clean one of ``xsm_stop_timeout`` seconds, the virtual machine's detail
    winning over the host's and the extension's, cut to what CloudStack's
    ``timeout`` leaves for the answer.

    >>> stop_timeout({}, {})
    30
    >>> stop_timeout({}, {'xsm_stop_timeout': '120'}, timeout=60)
    35
    >>> stop_timeout({}, {'xsm_stop_timeout': 0})
    0
    """
    from xsm_driver.core.rpc import api as rpc_api
    value = vm_settings(request).get(
        'xsm_stop_timeout', conf.get('xsm_stop_timeout',
                                     DEFAULT_STOP_TIMEOUT))
    try:
        seconds = int(str(value).strip())
    except ValueError:
        seconds = -1
    if isinstance(value, bool) or not 0 <= seconds <= rpc_api.\
            MAX_STOP_TIMEOUT:
        raise ExtensionError('xsm_stop_timeout must be a whole number of '
                             'seconds in [0, %d], not %.80r'
                             % (rpc_api.MAX_STOP_TIMEOUT, value))
    return max(0, min(seconds, timeout - ANSWER_MARGIN - STOP_KILL_MARGIN))


def disks_of(request, conf):
    """``[{'sr', 'size'}]`` of a new VM.

    >>> disks_of({}, {'xsm_sr': 'sr-a', 'xsm_root_size': '8M'})
    [{'sr': 'sr-a', 'size': 8388608}]
    >>> disks_of({'externaldetails': {'virtualmachine': {
    ...     'xsm_disks': 'sr-a:1M, raw-a:2M'}}}, {})
    [{'sr': 'sr-a', 'size': 1048576}, {'sr': 'raw-a', 'size': 2097152}]
    """
    # the template's (or VM's) extension details; else the VM's own
    # details (deployVirtualMachine details[0].xsm_disks=...)
    own = vm_details(request).get('details')
    spec = vm_settings(request).get('xsm_disks') or (
        own.get('xsm_disks') if isinstance(own, dict) else None)
    if spec:
        out = []
        for item in _split(spec):
            sr, sep, size = item.rpartition(':')
            if not sep or not sr:
                raise ExtensionError('xsm_disks: %r is not SR:SIZE' % item)
            out.append({'sr': sr, 'size': _size(size, 'xsm_disks')})
        return out
    sr = conf.get('xsm_sr')
    if not sr:
        raise ExtensionError('no storage for the new VM: set the host (or '
                             'extension) detail xsm_sr=<SR name>, or the '
                             'VM detail xsm_disks=SR:SIZE,...')
    return [{'sr': sr, 'size': _size(conf.get('xsm_root_size')
                                     or DEFAULT_ROOT_SIZE, 'xsm_root_size')}]


def network_of(nic, conf):
    """The network of a CloudStack NIC: ``vlan-N`` for ``vlan://N``.

    >>> network_of({'broadcastUri': 'vlan://120'}, {})
    'vlan-120'
    >>> network_of({}, {'xsm_network': 'guest'})
    'guest'
    """
    uri = nic.get('broadcastUri') or ''
    if isinstance(uri, str) and uri.startswith('vlan://') and \
            uri[len('vlan://'):] not in ('', 'untagged'):
        return 'vlan-%s' % uri[len('vlan://'):]
    return conf.get('xsm_network') or 'guest'


def nics_of(request):
    """CloudStack's NICs of the VM, in ``deviceId`` order."""
    nics = vm_details(request).get('nics') or []
    if not isinstance(nics, list):
        raise ExtensionError('cloudstack.vm.details.nics must be a list')
    nics = [_object(n, 'a NIC of cloudstack.vm.details') for n in nics]
    for nic in nics:
        device = nic.get('deviceId')
        if device is not None and (not isinstance(device, int) or
                                   isinstance(device, bool)):
            raise ExtensionError('cloudstack.vm.details.nics: deviceId '
                                 'must be a number, not %.80r' % (device,))
    return sorted(nics, key=lambda n: n.get('deviceId') or 0)


def mac_of(nic):
    """The NIC's MAC, lower case; None when it has none.

    >>> mac_of({'mac': '02:00:2A:00:00:01'})
    '02:00:2a:00:00:01'
    """
    mac = nic.get('mac')
    if mac in (None, ''):
        return None
    try:
        entry = host_mod.vif_entry({'network': '-', 'mac': mac})
    except ValueError:
        raise ExtensionError('the NIC with deviceId %s has MAC %.80r, which '
                             'is not a MAC address' % (nic.get('deviceId'),
                                                       mac))
    return host_mod.vif_parts(entry)[1]


def vifs_of(request, conf):
    """The VIFs of a new VM: each NIC's network and MAC, in device order.

    >>> vifs_of({'cloudstack.vm.details': {'nics': [
    ...     {'deviceId': 1, 'mac': '02:00:00:00:00:0B'},
    ...     {'deviceId': 0, 'mac': '02:00:00:00:00:0a',
    ...      'broadcastUri': 'vlan://7'}]}}, {})
    ['02:00:00:00:00:0a@vlan-7', '02:00:00:00:00:0b@guest']
    """
    return [host_mod.vif_entry({'network': network_of(n, conf),
                                'mac': mac_of(n)})
            for n in nics_of(request)]


def guest_of(request):
    """The ``qemu`` options of a new VM: ``minRam`` (bytes) and ``cpus``.

    >>> sorted(guest_of({'cloudstack.vm.details': {
    ...     'minRam': 536870912, 'cpus': 2}}).items())
    [('memory_mib', 512), ('vcpus', 2)]
    >>> guest_of({}) is None
    True
    """
    details = vm_details(request)
    out = {}
    for key, option, unit in (('minRam', 'memory_mib', MiB),
                              ('cpus', 'vcpus', 1)):
        value = details.get(key)
        if value in (None, 0, ''):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or \
                value < unit:
            raise ExtensionError('cloudstack.vm.details.%s must be a '
                                 'positive number%s, not %.80r' % (
                                     key, ' of bytes' if unit > 1 else '',
                                     value))
        out[option] = value // unit
    return out or None


def vif_map_of(record, request, conf, host):
    """Where each VIF of ``record`` goes: found by its MAC among the NICs.

    As XenServer finds a NIC's VIF by its MAC: each VIF with a MAC must be
    the VIF of one of CloudStack's NICs (``cloudstack.vm.details.nics``),
    and each NIC the NIC of one VIF; the VIF keeps its MAC and goes to the
    NIC's network (``vlan-N`` for ``vlan://N``, else the network it is
    on). VIFs made without a MAC keep their network, as before.

    >>> rec = {'name': 'v', 'vifs': ['02:00:00:00:00:0a@vlan-7', 'old']}
    >>> sorted(vif_map_of(rec, {'cloudstack.vm.details': {'nics': [
    ...     {'deviceId': 0, 'mac': '02:00:00:00:00:0A',
    ...      'broadcastUri': 'vlan://9'}]}}, {}, 'a').items())
    [('02:00:00:00:00:0a@vlan-7', '02:00:00:00:00:0a@vlan-9'), \
('old', 'old')]
    """
    nics = nics_of(request)
    by_mac = {}
    for nic in nics:
        mac = mac_of(nic)
        if mac is not None:
            by_mac[mac] = nic
    vifs = list(record.get('vifs') or ())
    out, matched = {}, set()
    for vif in vifs:
        network, mac = host_mod.vif_parts(vif)
        if mac is None:
            out[vif] = vif
            continue
        nic = by_mac.get(mac)
        if nic is None:
            raise ExtensionError(
                'VM %s on host %s has a VIF with MAC %s (network %s) that '
                'matches no NIC of cloudstack.vm.details.nics (their MACs: '
                '%s): CloudStack and the host disagree about its NICs' % (
                    record['name'], host, mac, network,
                    ', '.join(sorted(by_mac)) or 'none'))
        matched.add(mac)
        out[vif] = host_mod.vif_entry({
            'network': network_of(nic, {'xsm_network': network}),
            'mac': mac})
    if matched:
        for nic in nics:
            if mac_of(nic) not in matched:
                raise ExtensionError(
                    'the NIC with deviceId %s and MAC %s of '
                    'cloudstack.vm.details.nics matches no VIF of VM %s on '
                    'host %s (its VIFs: %s)' % (
                        nic.get('deviceId'), nic.get('mac'), record['name'],
                        host, ', '.join(vifs)))
    return out


def power_state(record):
    """CloudStack's ``power_state`` of an agent's VM record.

    >>> power_state({'power_state': 'running'})
    'poweron'
    >>> power_state(None)
    'poweroff'
    """
    if record is None:
        return 'poweroff'
    return POWER_STATES.get(record.get('power_state'), 'unknown')


def flag(value, default=True):
    """A custom action's boolean parameter (true/false, or a JSON bool)."""
    if value is None or value == '':
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('true', 'yes', '1'):
        return True
    if text in ('false', 'no', '0'):
        return False
    raise ExtensionError('%r is not true or false' % value)


def parameters(request):
    return _object(request.get('parameters'), 'parameters')


#: names the destination host parameter may have (the first is
#: documented), and the SR ones
HOST_PARAMETERS = ('host', 'destination', 'destinationhost', 'hostname')
POOL_PARAMETERS = ('pool', 'storagepool', 'sr')
POOLS_PARAMETERS = ('pools', 'storagepools', 'srs')


def _first(params, names):
    """The first of ``names`` given in ``params`` (any case), or None.

    >>> _first({'SR': 'a'}, POOL_PARAMETERS)
    'a'
    """
    lowered = {str(k).lower(): v for k, v in params.items()}
    for name in names:
        value = lowered.get(name)
        if value not in (None, ''):
            return value
    return None


def vdi_map(record, params):
    """The destination SR of each of the VM's disks, by VDI.

    >>> rec = {'name': 'v', 'disks': [{'name': 'xvda', 'vdi': 'a'},
    ...                               {'name': 'xvdb', 'vdi': 'b'}]}
    >>> sorted(vdi_map(rec, {'pool': 'sr-b'}).items())
    [('a', 'sr-b'), ('b', 'sr-b')]
    >>> sorted(vdi_map(rec, {'pools': 'sr-b,raw-b'}).items())
    [('a', 'sr-b'), ('b', 'raw-b')]
    >>> sorted(vdi_map(rec, {'pools': 'xvdb=raw-b', 'pool': 'sr-b'}).items())
    [('a', 'sr-b'), ('b', 'raw-b')]
    """
    disks = record['disks']
    default = _first(params, POOL_PARAMETERS)
    out = {}
    items = _split(_first(params, POOLS_PARAMETERS))
    named = [i for i in items if '=' in i]
    if named and len(named) != len(items):
        raise ExtensionError('pools: give either SR,SR,... in disk order or '
                             'DISK=SR,..., not both')
    if items and not named:
        if len(items) != len(disks):
            raise ExtensionError(
                'pools names %d SRs but VM %s has %d disks (%s)'
                % (len(items), record['name'], len(disks),
                   ', '.join(d['name'] for d in disks)))
        return {d['vdi']: sr for d, sr in zip(disks, items)}
    by_disk = {}
    for item in named:
        disk, _, sr = item.partition('=')
        by_disk[disk.strip()] = sr.strip()
    names = {d['name'] for d in disks} | {d['vdi'] for d in disks}
    unknown = sorted(set(by_disk) - names)
    if unknown:
        raise ExtensionError('pools: VM %s has no disk %s (it has %s)' % (
            record['name'], ', '.join(unknown),
            ', '.join(d['name'] for d in disks)))
    for d in disks:
        sr = by_disk.get(d['name']) or by_disk.get(d['vdi']) or default
        if not sr:
            raise ExtensionError(
                'no destination storage for disk %s of VM %s: give the '
                'parameter pool=<SR> (every disk) or pools=SR,SR,...'
                % (d['name'], record['name']))
        out[d['vdi']] = sr
    return out


def migration_message(status):
    """The part of a migration's status CloudStack's operator sees."""
    keys = ('id', 'phase', 'vm', 'vm_name', 'source', 'destination',
            'bytes_copied', 'downtime_ms', 'error', 'started', 'finished')
    out = {k: status.get(k) for k in keys if k in status}
    progress = status.get('progress') or {}
    if isinstance(progress, dict) and progress.get('total'):
        out['percent'] = round(100.0 * (progress.get('done') or 0)
                               / progress['total'], 1)
    result = status.get('result') or {}
    if isinstance(result, dict) and result.get('vdis'):
        out['volumes'] = result['vdis']
    return out


def describe(exc):
    """One line for any error, never a (remote) traceback.

    oslo.messaging rebuilds a remote exception with the remote traceback
    appended to its message: it is cut off here.
    """
    if isinstance(exc, ExtensionError):
        return exc.message
    if isinstance(exc, messaging.RemoteError):
        text = '%s: %s' % (exc.exc_type, exc.value)
    elif isinstance(exc, messaging.MessagingTimeout):
        text = ('an xsm-agent did not answer in time: check that it runs '
                'and reaches the message broker')
    elif isinstance(exc, exception.XSMError):
        text = str(exc)
    else:
        text = '%s: %s' % (type(exc).__name__, exc)
    return first_part(text)


def first_part(text):
    """``text`` without a traceback; one line.

    >>> first_part('boom\\nTraceback (most recent call last):\\n  File x')
    'boom'
    """
    text = str(text).split('Traceback (most recent call last)')[0]
    return ' '.join(text.split())


def success(message=None, **fields):
    out = {'status': 'success'}
    if message is not None:
        out['message'] = message
    out.update(fields)
    return out


# -- the actions -----------------------------------------------------------

class Extension:
    """Run one action on the agents.

    :param client: ``client(host)`` gives an
        :class:`~xsm_driver.core.rpc.api.AgentAPI` of ``host``.
    :param timeout: seconds CloudStack waits for the answer.
    :param clock: ``time.monotonic`` (tests replace it).
    :param sleep: ``time.sleep``.
    """

    def __init__(self, client, timeout=DEFAULT_TIMEOUT, clock=time.monotonic,
                 sleep=time.sleep, poll_interval=0.2):
        self.client = client
        self.timeout = timeout
        self.clock = clock
        self.sleep = sleep
        self.poll_interval = poll_interval

    def run(self, action, request):
        """The answer (a dict) of ``action``; raises ExtensionError."""
        name = (action or '').strip().lower()
        if name not in ACTIONS:
            raise ExtensionError(
                'unknown action %r: xsm-cloudstack-extension runs %s'
                % (action, ', '.join(ACTIONS)))
        handler = getattr(self, 'do_' + name)
        conf = settings(request)
        return handler(request, conf)

    # -- helpers -----------------------------------------------------------

    def _find(self, name, hosts):
        """``(host, record)`` of the VM named ``name``, or (None, None).

        Hosts that do not answer are skipped; when the VM is on none of
        those that answered and one did not, that is said.
        """
        silent = []
        for host in hosts:
            try:
                records = self.client(host).vm_list()
            except ExtensionError:
                raise
            except Exception as exc:
                LOG.warning('host %s does not answer: %s', host,
                            describe(exc))
                if host == hosts[0]:
                    raise ExtensionError('host %s does not answer: %s'
                                         % (host, describe(exc)))
                silent.append(host)
                continue
            named = [r for r in records if r['name'] == name]
            if len(named) > 1:
                raise ExtensionError('host %s has %d VMs named %s'
                                     % (host, len(named), name))
            if named:
                return host, named[0]
        if silent:
            LOG.warning('VM %s may be on %s, which did not answer', name,
                        ', '.join(silent))
        return None, None

    def _require(self, request, conf):
        name = vm_name(request)
        hosts = search_hosts(conf)
        host, record = self._find(name, hosts)
        if record is None:
            raise ExtensionError('VM %s is on none of the hosts %s'
                                 % (name, ', '.join(hosts)))
        return host, record

    # -- lifecycle ---------------------------------------------------------

    def do_prepare(self, request, conf):
        name = vm_name(request)
        host = host_of(conf)
        disks = disks_of(request, conf)
        info = self._info(host)
        have = {sr['name'] for sr in info.get('srs', ())}
        missing = sorted({d['sr'] for d in disks} - have)
        if missing:
            raise ExtensionError('host %s has no SR %s (it has %s)' % (
                host, ', '.join(missing), ', '.join(sorted(have))))
        return success('Instance %s can be created on host %s' % (name, host),
                       details={'xsm_host': host})

    def _info(self, host):
        try:
            return self.client(host).host_info()
        except ExtensionError:
            raise
        except Exception as exc:
            raise ExtensionError('host %s does not answer: %s'
                                 % (host, describe(exc)))

    def do_create(self, request, conf):
        name = vm_name(request)
        host = host_of(conf)
        disks = disks_of(request, conf)
        vifs = vifs_of(request, conf)
        found, _ = self._find(name, [host])
        if found is not None:
            raise ExtensionError('host %s already has a VM named %s'
                                 % (host, name))
        guest = guest_of(request)
        agent = self.client(host)
        try:
            record = agent.vm_create(name, disks, vifs, qemu=guest)
        except Exception as exc:
            # (over a real bus it comes as a RemoteError of that name)
            if not (isinstance(exc, hv_base.InvalidGuestOptions) or
                    getattr(exc, 'exc_type', None) ==
                    hv_base.InvalidGuestOptions.__name__):
                raise
            raise ExtensionError(
                'host %s refuses the memory or vCPUs of VM %s (minRam %s '
                'bytes, cpus %s): %s' % (
                    host, name, vm_details(request).get('minRam'),
                    vm_details(request).get('cpus'), describe(exc)))
        try:
            agent.vm_start(record['uuid'])
        except Exception:
            try:
                agent.vm_destroy(record['uuid'])
            except Exception as exc:
                LOG.warning('VM %s (%s) not cleaned up on %s: %s', name,
                            record['uuid'], host, describe(exc))
            raise
        return success('Instance created', power_state='poweron',
                       details={'xsm_host': host, 'xsm_vm': record['uuid']})

    do_deploy = do_create

    def do_start(self, request, conf):
        host, record = self._require(request, conf)
        self.client(host).vm_start(record['uuid'])
        return success('Instance started', power_state='poweron',
                       host=host)

    def do_stop(self, request, conf):
        name = vm_name(request)
        host, record = self._find(name, search_hosts(conf))
        if record is None:
            return success('Instance stopped (it is on no host)',
                           power_state='poweroff')
        seconds = stop_timeout(request, conf, self.timeout)
        if not seconds:
            self.client(host).vm_stop(record['uuid'], clean=False)
            return success('Instance stopped (its guest killed at once: '
                           'xsm_stop_timeout 0)', power_state='poweroff',
                           host=host)
        result = self.client(host).vm_stop(record['uuid'], clean=True,
                                           timeout=seconds)
        if result.get('clean') is False:
            LOG.warning('VM %s on %s did not power off within %d s: killed',
                        name, host, seconds)
            how = 'killed: no power-off within %d s' % seconds
        else:
            how = 'powered off'
        return success('Instance stopped (%s)' % how,
                       power_state='poweroff', host=host)

    def do_reboot(self, request, conf):
        host, record = self._require(request, conf)
        agent = self.client(host)
        try:
            # a QEMU guest: reset, as its reset button
            agent.vm_reboot(record['uuid'])
        except host_mod.InvalidVMState:
            # a model guest, or a VM that does not run: stop and start
            LOG.info('VM %s on %s is no running QEMU guest: rebooted by '
                     'stop and start', record['name'], host)
            agent.vm_stop(record['uuid'])
            agent.vm_start(record['uuid'])
        return success('Instance rebooted', power_state='poweron', host=host)

    def do_status(self, request, conf):
        host, record = self._require(request, conf)
        # the power state its QEMU has now
        record = self.client(host).vm_get(record['uuid'])
        return success(power_state=power_state(record), host=host)

    def do_delete(self, request, conf):
        name = vm_name(request)
        host, record = self._find(name, search_hosts(conf))
        if record is None:
            return success('Instance deleted (it is on no host)')
        self.client(host).vm_destroy(record['uuid'])
        return success('Instance deleted', host=host)

    def do_suspend(self, request, conf):
        host, record = self._require(request, conf)
        record = self.client(host).vm_pause(record['uuid'])
        return success('Instance suspended', power_state=power_state(record),
                       host=host)

    def do_resume(self, request, conf):
        host, record = self._require(request, conf)
        record = self.client(host).vm_resume(record['uuid'])
        return success('Instance resumed', power_state=power_state(record),
                       host=host)

    # -- custom actions -----------------------------------------------------

    def do_migratevmwithvolume(self, request, conf):
        params = parameters(request)
        dest = _first(params, HOST_PARAMETERS)
        if not isinstance(dest, str) or not dest.strip():
            raise ExtensionError('migratevmwithvolume needs the parameter '
                                 'host=<destination xsm host>')
        dest = dest.strip()
        wait = flag(_first(params, ('wait',)))
        source, record = self._require(request, conf)
        if dest == source:
            raise ExtensionError('VM %s is already on host %s'
                                 % (record['name'], dest))
        if record.get('power_state') != 'running':
            raise ExtensionError(
                'VM %s is not running (%s): migratevmwithvolume moves a '
                'running VM live' % (record['name'], record.get(
                    'power_state')))
        mapping = vdi_map(record, params)
        vifs = vif_map_of(record, request, conf, source)
        have = {sr['name'] for sr in self._info(dest).get('srs', ())}
        missing = sorted(set(mapping.values()) - have)
        if missing:
            raise ExtensionError('host %s has no SR %s (it has %s)' % (
                dest, ', '.join(missing), ', '.join(sorted(have))))
        agent = self.client(source)
        for status in agent.migration_list():
            if status.get('vm') == record['uuid'] and \
                    status.get('finished') is None:
                raise ExtensionError(
                    'VM %s is already migrating (migration %s, phase %s)'
                    % (record['name'], status['id'], status['phase']))
        mid = agent.migrate_vm(record['uuid'], dest, mapping, vifs)
        LOG.info('migration %s of VM %s from %s to %s started', mid,
                 record['name'], source, dest)
        if not wait:
            return success('Migration %s of VM %s to host %s started'
                           % (mid, record['name'], dest),
                           printmessage='true', migration=mid)
        deadline = self.clock() + max(self.timeout - ANSWER_MARGIN, 1)
        while True:
            status = agent.migration_get(mid)
            if status.get('finished') is not None:
                break
            if self.clock() >= deadline:
                return success(
                    migration_message(status), printmessage='true',
                    migration=mid, note='still running when CloudStack\'s '
                    'timeout neared; follow it with migrationstatus')
            self.sleep(self.poll_interval)
        return self._ended(status, record, dest)

    @staticmethod
    def _ended(status, record, dest):
        phase = status.get('phase')
        if phase == 'done':
            return success(migration_message(status), printmessage='true',
                           migration=status['id'], host=dest,
                           power_state='poweron')
        if phase == 'in-doubt':
            raise ExtensionError(
                'migration %s of VM %s is in doubt: the VM is held paused; '
                'run "xsm-migrate resolve %s" on host %s' % (
                    status['id'], record['name'], status['id'],
                    status.get('source')))
        raise ExtensionError('migration %s of VM %s to host %s ended %s: %s'
                             % (status['id'], record['name'], dest, phase,
                                first_part(status.get('error')
                                           or 'no reason given')))

    def _migrations(self, request, conf):
        """``(host, [status])`` of the VM's migrations, newest last."""
        name = vm_name(request)
        mid = parameters(request).get('migration')
        out = []
        for host in search_hosts(conf):
            try:
                statuses = self.client(host).migration_list()
            except ExtensionError:
                raise
            except Exception as exc:
                LOG.warning('host %s does not answer: %s', host,
                            describe(exc))
                continue
            for status in statuses:
                if mid and status.get('id') != mid:
                    continue
                if not mid and status.get('vm_name') != name:
                    continue
                out.append((host, status))
        out.sort(key=lambda hs: hs[1].get('started') or 0)
        return out

    def do_migrationstatus(self, request, conf):
        found = self._migrations(request, conf)
        if not found:
            raise ExtensionError('no migration of VM %s is known on %s' % (
                vm_name(request), ', '.join(search_hosts(conf))))
        host, status = found[-1]
        return success(migration_message(status), printmessage='true',
                       migration=status['id'])

    def do_abortmigration(self, request, conf):
        found = [(h, s) for h, s in self._migrations(request, conf)
                 if s.get('finished') is None]
        if not found:
            raise ExtensionError('VM %s has no running migration to abort'
                                 % vm_name(request))
        host, status = found[-1]
        self.client(host).migration_abort(status['id'])
        deadline = self.clock() + min(60, max(self.timeout - ANSWER_MARGIN,
                                              1))
        while status.get('finished') is None and self.clock() < deadline:
            self.sleep(self.poll_interval)
            status = self.client(host).migration_get(status['id'])
        return success(migration_message(status), printmessage='true',
                       migration=status['id'])


def answer(action, text, client_factory, timeout=DEFAULT_TIMEOUT, **kwargs):
    """``(exit status, answer dict)`` of one invocation; never raises.

    :param text: the JSON file's text.
    :param client_factory: ``client_factory(conf_dict)`` gives the
        ``client(host)`` function (it reads the configuration).
    """
    try:
        request = parse_request(text)
        if (action or '').strip().lower() not in ACTIONS:
            raise ExtensionError(
                'unknown action %r: xsm-cloudstack-extension runs %s'
                % (action, ', '.join(ACTIONS)))
        conf = settings(request)
        ext = Extension(client_factory(conf), timeout=timeout, **kwargs)
        return 0, ext.run(action, request)
    except Exception as exc:
        if not isinstance(exc, (ExtensionError, exception.XSMError,
                                messaging.MessagingException)):
            LOG.debug('action %s failed', action, exc_info=True)
        return 1, {'error': describe(exc)}
