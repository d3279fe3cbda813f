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

"""``xsm-migrate demo``: a live migration on one machine, verified.

Two hosts, each with its own SR and state folder under a scratch folder,
and each with a real agent; they talk over oslo.messaging's in-process
``fake://`` transport (no broker needed), and the data crosses a real
mutual-TLS NBD connection on loopback. A VM with ``--disks`` disks (the
first with a 3-deep snapshot chain) runs a verifying guest that writes the
whole time, and the VM moves from host-a to host-b with a progress bar.

``--guest qemu`` (the default): the VM is a real QEMU guest (TCG unless
KVM works here) booted from the guest kit; its in-guest verifier writes
generation-stamped blocks on every disk, and its memory moves with QEMU's
own migration over TLS at the same switch-over as the disks. Afterwards
the guest, running on host-b, reads every block it wrote back and checks
it: the in-guest verdict. ``--guest model``: the verifying thread of the
agent plays the guest (disks partly filled first), and its blocks are
checked on the destination.

Either way every destination image is checked with vhd-util's rules, and
host-a must hold nothing of the VM (no VDI, no VM record, no QEMU
process). Exit status 0 only when all of that holds.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time

from oslo_config import cfg

from xsm_driver.cmd import common
from xsm_driver.cmd import progress
from xsm_driver.conf import hypervisor as hv_conf
from xsm_driver.core.rpc import api
from xsm_driver.core.vhd import check as vhd_check
from xsm_driver.hypervisor import qemu
from xsm_driver.hypervisor import verifier
from xsm_driver.testing import harness

HOSTS = ('host-a', 'host-b')
GUESTS = ('qemu', 'model')
MiB = 1 << 20

#: defaults that depend on the guest: (disk size, writes/s per disk)
DEFAULTS = {'model': (256 * MiB, 200), 'qemu': (64 * MiB, 100)}
#: the model guest's pre-written fraction of each disk
MODEL_FILL = 0.5
#: the files a guest kit holds (tools/guest-kit/build.sh)
KIT_FILES = ('vmlinuz', 'initramfs.cpio.gz')
#: the guest kit of a checkout, built by tools/guest-kit/build.sh
CHECKOUT_KIT = os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), '.guest-kit')
QEMU_MEMORY_MIB = 128
#: the verifier's progress line period
REPORT_MS = 250
#: seconds for the guest to boot and write (TCG on a busy machine)
BOOT_TIMEOUT = 120
#: seconds for an agent's answer (a full-disk check is one call)
RPC_TIMEOUT = 300
#: seconds for the VM to run on host-b once the migration is done, and
#: for the source's QEMU to exit
SETTLE_TIMEOUT = 60
#: what a QEMU guest's longest unix socket path adds to the workdir:
#: ``/host-a/state/guests/<VM uuid>/nbd-xvda.sock``
SOCKET_TAIL = len('/host-a/state/guests/') + 36 + len('/nbd-xvda.sock')


class _Follower(progress.Follower):
    """The progress bar, naming the memory phase of a QEMU guest."""

    def update(self, status):
        shown = (status.get('progress') or {}).get('phase')
        if shown == 'memory' and status['phase'] not in ('done', 'aborted'):
            status = dict(status, phase=shown)
        super().update(status)


def _say(args, text):
    if not args.json:
        print(text, flush=True)


def _check_images(sr_path):
    problems = []
    for name in sorted(os.listdir(sr_path)):
        if name.endswith('.vhd'):
            problems += ['%s: %s' % (name, p) for p in
                         vhd_check.check(os.path.join(sr_path, name))]
    return problems


# -- set-up --------------------------------------------------------------

def load_conf(args):
    """The ``[hypervisor]`` options of ``--config-file`` (or defaults)."""
    conf = cfg.ConfigOpts()
    hv_conf.register_opts(conf)
    argv = []
    for path in getattr(args, 'config_file', None) or []:
        argv += ['--config-file', path]
    try:
        conf(argv, project='xsm-driver', prog='xsm-migrate demo',
             default_config_files=[], default_config_dirs=[], use_env=False)
    except cfg.Error as exc:
        raise common.CommandError(str(exc))
    return conf


def is_kit(folder):
    return bool(folder) and all(os.path.isfile(os.path.join(folder, f))
                                for f in KIT_FILES)


def find_guest_kit(given, configured, checkout=CHECKOUT_KIT):
    """The guest kit folder the demo boots.

    ``--guest-kit`` when given (it must hold a kit); else
    ``[hypervisor]guest_kit`` when it holds one; else the checkout's
    ``.guest-kit`` when it holds one.

    :raises CommandError: no kit, naming where it looked and how to build
        one.
    """
    if given is not None:
        if is_kit(given):
            return os.path.abspath(given)
        looked = [given]
    else:
        for folder in (configured, checkout):
            if is_kit(folder):
                return os.path.abspath(folder)
        looked = [f for f in (configured, checkout) if f]
    raise common.CommandError(
        'no guest kit (%s) in %s: build one with tools/guest-kit/build.sh '
        'DIR and pass --guest-kit DIR (or set [hypervisor]guest_kit), or '
        'run the demo with --guest model' % (' and '.join(KIT_FILES),
                                             ' nor '.join(looked)))


def check_qemu(binary):
    if shutil.which(binary) is None:
        raise common.CommandError(
            'QEMU binary %s not found: install it ("apt-get install -y '
            'qemu-system-x86") or set [hypervisor]qemu_binary, or run the '
            'demo with --guest model' % binary)


def check_args(args):
    """Settle the guest-dependent defaults; refuse what cannot work."""
    size, rate = DEFAULTS[args.guest]
    if args.size is None:
        args.size = size
    if args.write_rate is None:
        args.write_rate = rate
    if not 1 <= args.disks <= 16:
        raise common.CommandError('--disks must be 1 to 16, not %d'
                                  % args.disks)
    if args.write_rate < 0:
        raise common.CommandError('--write-rate must be 0 or more, not %d'
                                  % args.write_rate)
    if args.guest == 'qemu':
        if args.fill is not None:
            raise common.CommandError('--fill is for --guest model: the '
                                      'in-guest verifier only writes')
        if args.write_rate == 0:
            raise common.CommandError(
                '--write-rate 0 (as fast as it can) is for --guest model: '
                'the in-guest verifier writes at a rate of 1 or more')
    elif args.fill is None:
        args.fill = MODEL_FILL
    elif not 0.0 <= args.fill <= 1.0:
        raise common.CommandError('--fill must be in [0, 1], not %s'
                                  % args.fill)


def check_workdir(workdir, given):
    """Refuse a workdir too long for the QEMU guest's unix sockets."""
    room = qemu.MAX_SOCKET_PATH - SOCKET_TAIL
    if len(os.fsencode(workdir)) > room:
        raise common.CommandError(
            '%s %s is %d bytes long: the QEMU guest\'s unix sockets under it '
            'would not fit in an AF_UNIX address (%d bytes); use a folder '
            'of at most %d bytes%s, or --guest model' % (
                '--workdir' if given else 'the scratch folder', workdir,
                len(os.fsencode(workdir)), qemu.MAX_SOCKET_PATH, room,
                '' if given else ' (set TMPDIR or pass --workdir)'))


def _layout(workdir):
    """``{host: {sr: (driver, path)}}``: host-a's SR sr-a, host-b's sr-b."""
    return {name: {'sr-' + name[-1]: (
        'vhd', os.path.join(workdir, name, 'sr-' + name[-1]))}
        for name in HOSTS}


def run(args):
    check_args(args)
    conf = None
    if args.guest == 'qemu':
        conf = load_conf(args)
        kit = find_guest_kit(args.guest_kit, conf.hypervisor.guest_kit)
        check_qemu(conf.hypervisor.qemu_binary)
        conf.set_override('driver', 'qemu', 'hypervisor')
        conf.set_override('guest_kit', kit, 'hypervisor')
    if not args.debug:
        # the in-process agents' RPC servers log each failed call with its
        # traceback; the call's error reaches the operator in one line
        logging.getLogger('oslo_messaging.rpc.server').setLevel(
            logging.CRITICAL)
    if args.workdir:
        workdir = os.path.abspath(args.workdir)
    else:
        workdir = tempfile.mkdtemp(prefix='xsm-demo-')
    # the hosts and agents of the tests and benchmarks, in this process
    # on fake://
    local = harness.LocalHosts(workdir, _layout(workdir), conf=conf)
    try:
        if conf is not None:
            check_workdir(workdir, bool(args.workdir))
        os.makedirs(workdir, exist_ok=True)
        local.start()
        return _demo(args, local.transport, workdir, local.hosts)
    finally:
        _kill_guests(local.hosts.values())
        local.close()
        for pid in qemu.processes_naming(workdir):     # nothing may outlive us
            qemu.kill(pid)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _kill_guests(hosts):
    """Kill the QEMU of every guest still running (a demo that failed)."""
    for host in hosts:
        if host.qemu is None:
            continue
        for name in host.qemu.list():
            try:
                host.qemu.destroy(name)
            except Exception as exc:
                print('xsm-migrate demo: QEMU of guest %s: %s'
                      % (name, common.first_line(exc)), file=sys.stderr)


# -- the demo ------------------------------------------------------------

def _tail(text, lines=3):
    """The console's last lines, on one line."""
    return ' | '.join(ln.strip() for ln in text.strip().splitlines()[-lines:]
                      if ln.strip()) or '(nothing)'


def _wait_for_writes(client, vm_uuid, timeout=BOOT_TIMEOUT):
    """Wait until the QEMU guest's verifier reports writes; its report."""
    deadline = time.monotonic() + timeout
    while True:
        text = client.vm_console(vm_uuid)
        rep = verifier.last(text, 'progress')
        if rep is not None and rep.get('writes', 0) > 0:
            return rep
        if client.vm_get(vm_uuid)['power_state'] == 'halted':
            raise common.CommandError('the guest stopped while it booted; '
                                      'its console ends with: %s'
                                      % _tail(text))
        if time.monotonic() > deadline:
            raise common.CommandError(
                'the guest did not write within %d s of its start; its '
                'console ends with: %s' % (timeout, _tail(text)))
        time.sleep(0.2)


def _wait_running(client, vm_uuid, timeout=SETTLE_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        state = client.vm_get(vm_uuid)['power_state']
        if state == 'running' or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def _demo(args, transport, workdir, hosts):
    a = api.AgentAPI(transport, 'host-a', timeout=RPC_TIMEOUT)
    b = api.AgentAPI(transport, 'host-b', timeout=RPC_TIMEOUT)
    in_qemu = args.guest == 'qemu'
    rate = args.write_rate or None
    options = None
    if in_qemu:
        options = {'memory_mib': QEMU_MEMORY_MIB,
                   'verifier': {'rate': rate, 'report_ms': REPORT_MS}}
    vm = a.vm_create('demo-vm', [{'sr': 'sr-a', 'size': args.size}
                                 for _ in range(args.disks)],
                     vifs=['net0'], qemu=options)
    uuid = vm['uuid']
    a.vm_start(uuid)
    writing = ('%d blocks/s per disk' % rate if rate else
               'as fast as it can')
    if in_qemu:
        accel = hosts['host-a'].qemu.accel
        _say(args, 'host-a: VM %s, a QEMU guest (%s, %d MiB) with %d disks '
             'of %s, booting' % (uuid, accel, QEMU_MEMORY_MIB, args.disks,
                                 progress.human(args.size)))
        _wait_for_writes(a, uuid)
        a.guest_start(uuid, rate=rate)
        _say(args, 'host-a: the in-guest verifier writes %s' % writing)
    else:
        accel = None
        _say(args, 'host-a: VM %s with %d disks of %s, guest writing %s'
             % (uuid, args.disks, progress.human(args.size), writing))
        a.guest_start(uuid, rate=rate, fill=args.fill)
    for _ in range(2):                 # leaf + 2 snapshots: 3 deep
        time.sleep(0.3)
        a.vm_snapshot(uuid)
    time.sleep(0.3)
    vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}
    guests_a = os.path.join(workdir, 'host-a')
    source_pid = None
    if in_qemu:
        # the QEMU that must be gone from host-a afterwards
        source_pid = hosts['host-a'].qemu.pid(uuid)
        if source_pid not in qemu.processes_naming(guests_a):
            raise common.CommandError('the QEMU of the guest (pid %s) is not '
                                      'running on host-a' % source_pid)
        # a new window of the verifier's stall figures: from here to the
        # end of the migration (the in-process host's driver: RPC 1.4 has
        # no call for it)
        hosts['host-a'].qemu.guest_request(uuid, verifier.MARK, 'progress')

    start = time.monotonic()
    mid = a.migrate_vm(uuid, 'host-b', vdi_map, {'net0': 'net0'})
    status = progress.follow(a.migration_get, mid,
                             _Follower(quiet=args.json))
    seconds = time.monotonic() - start
    result = {'migration': mid, 'phase': status['phase'],
              'error': status['error'],
              'bytes_copied': status['bytes_copied'],
              'seconds': round(seconds, 3),
              'throughput_bytes_per_s': (
                  round(status['bytes_copied'] / seconds) if seconds else 0),
              'downtime_ms': status['downtime_ms'],
              'guest_writes_during_migration':
                  status['guest_writes_during_migration'],
              'workdir': workdir if args.workdir else None,
              'guest_kind': status.get('guest_kind', args.guest),
              'accel': accel,
              'qemu_downtime_ms': status.get('qemu_downtime_ms'),
              'guest_stall_ms': None, 'guest_wall_stall_ms': None,
              'in_guest_verified': False}
    if 'switch_over_steps_ms' in status:
        result['switch_over_steps_ms'] = status['switch_over_steps_ms']
    verified = False
    if status['phase'] == 'done':
        state = _wait_running(b, uuid) if in_qemu else 'running'
        if state == 'running':
            if in_qemu:
                _window(result, hosts['host-b'], uuid)
            check = b.guest_verify(uuid)
        else:
            check = {'verified': False, 'error': 'the VM is %s on host-b, '
                     'not running' % state}
        result['in_guest_verified'] = check['verified'] is True
        leftovers = a.vdi_list()
        left_vms = [v['uuid'] for v in a.vm_list()]
        left_qemu = []
        if source_pid is not None and not qemu.wait_gone(source_pid,
                                                         SETTLE_TIMEOUT):
            left_qemu.append(source_pid)
        left_qemu += [p for p in qemu.processes_naming(guests_a)
                      if p not in left_qemu]
        problems = _check_images(os.path.join(workdir, 'host-b', 'sr-b'))
        verified = (result['in_guest_verified'] and not leftovers and
                    not left_vms and not left_qemu and not problems)
        result.update(guest=check, source_leftovers=len(leftovers),
                      source_vms=left_vms, source_qemu_pids=left_qemu,
                      image_problems=problems)
        if in_qemu and b.vm_get(uuid)['power_state'] != 'halted':
            b.vm_stop(uuid)            # its QEMU is killed
    else:
        # the guest stayed on host-a: it must still verify there
        try:
            result['source_guest'] = a.guest_verify(uuid)
        except Exception as exc:
            result['source_guest'] = {'verified': False,
                                      'error': common.first_line(exc)}
    result['verified'] = verified
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _summary(result)
    return 0 if verified else 1


def _window(result, host, vm_uuid):
    """The in-guest verifier's figures since the mark before migrating.

    Its ``win_*`` fields: the longest stall between two writes by the
    guest's clock (which stands still while QEMU has the VM stopped) and
    by the RTC (which does not; to about a second), and the writes. A
    guest kit older than those fields gives the same figures since the
    guest booted.
    """
    rep = host.qemu.guest_request(vm_uuid, verifier.STATUS, 'progress')
    windowed = 'win_max_stall_ms' in rep
    result['guest_stall_ms'] = rep.get(
        'win_max_stall_ms' if windowed else 'max_stall_ms')
    result['guest_wall_stall_ms'] = rep.get(
        'win_max_wall_stall_ms' if windowed else 'max_wall_stall_ms')
    result['guest_stall_since'] = 'migration' if windowed else 'boot'
    if windowed:
        result['guest_writes_during_migration'] = rep['win_writes']


def _ms(value):
    return 'none' if value is None else '%s ms' % value


def _summary(r):
    h = progress.human
    print('\nmigration %s: %s' % (r['migration'], r['phase']))
    if r['error']:
        print('  error:            %s' % r['error'])
    print('  guest:            %s' % (
        'QEMU (%s) with the in-guest verifier' % r['accel']
        if r['guest_kind'] == 'qemu' else 'model (the agent\'s verifying '
        'thread)'))
    print('  bytes copied:     %s' % h(r['bytes_copied']))
    print('  time:             %.2f s' % r['seconds'])
    print('  throughput:       %s/s' % h(r['throughput_bytes_per_s']))
    print('  downtime:         %s (storage paused)' % _ms(r['downtime_ms']))
    if r['guest_kind'] == 'qemu':
        print('  QEMU downtime:    %s (VM stopped, by QEMU)'
              % _ms(r['qemu_downtime_ms']))
        if r['guest_stall_ms'] is not None:
            print('  guest stall:      %s ms between two writes (guest '
                  'clock), %s ms by the RTC (about 1 s resolution), since '
                  'the %s' % (r['guest_stall_ms'], r['guest_wall_stall_ms'],
                              'mark before the migration'
                              if r.get('guest_stall_since') == 'migration'
                              else 'guest booted'))
    steps = r.get('switch_over_steps_ms')
    if steps:
        print('  switch-over:      %s' % ', '.join(
            '%s %s ms' % kv for kv in steps.items()))
    print('  guest writes during the migration: %d'
          % r['guest_writes_during_migration'])
    guest = r.get('guest') or {}
    if guest:
        print('  %s %s (%s checked; %s writes, %s reads, error: %s)' % (
            'in-guest verdict:' if r['guest_kind'] == 'qemu'
            else 'guest verified: ', 'VERIFIED' if r['in_guest_verified']
            else 'NOT VERIFIED', h(guest.get('bytes_verified', 0)),
            guest.get('writes'), guest.get('reads'), guest.get('error')))
        print('  left on host-a:   %d VDIs, %d VMs, %d QEMU processes'
              % (r['source_leftovers'], len(r['source_vms']),
                 len(r['source_qemu_pids'])))
        print('  vhd-util rules:   %s' % ('; '.join(r['image_problems']) or
                                          'every image passes'))
    source = r.get('source_guest')
    if source:
        print('  guest on host-a:  %s (error: %s)' % (
            'VERIFIED' if source.get('verified') else 'NOT VERIFIED',
            source.get('error')))
    if r['workdir']:
        print('  hosts kept in:    %s' % r['workdir'])
    print('VERIFIED' if r['verified'] else 'NOT VERIFIED', file=sys.stdout)
