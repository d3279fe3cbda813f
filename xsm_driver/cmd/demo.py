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
first with a 3-deep snapshot chain) is partly filled, its verifying guest
writes and reads the whole time, and the VM moves from host-a to host-b
with a progress bar. Afterwards the guest's every block is checked on the
destination, every destination image is checked with vhd-util's rules, and
host-a's SR must be empty. Exit status 0 only when all of that holds.
"""

import json
import os
import shutil
import sys
import tempfile
import time

from oslo_config import cfg

from xsm_driver.cmd import progress
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.vhd import check as vhd_check

HOSTS = ('host-a', 'host-b')


def _host(workdir, name):
    sr_name = 'sr-' + name[-1]
    return host_mod.Host.from_config(
        name, ['%s:vhd:%s' % (sr_name, os.path.join(workdir, name, sr_name))],
        os.path.join(workdir, name, 'state'))


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


def run(args):
    workdir = args.workdir or tempfile.mkdtemp(prefix='xsm-demo-')
    os.makedirs(workdir, exist_ok=True)
    transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
    agents = []
    try:
        for name in HOSTS:
            agents.append(agent_mod.Agent(
                transport, _host(workdir, name),
                manager_mod.Options()).start())
        return _demo(args, transport, workdir)
    finally:
        for agent in agents:
            agent.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(args, transport, workdir):
    a = api.AgentAPI(transport, 'host-a')
    b = api.AgentAPI(transport, 'host-b')
    rate = args.write_rate or None
    vm = a.vm_create('demo-vm', [{'sr': 'sr-a', 'size': args.size}
                                 for _ in range(args.disks)],
                     vifs=['net0'])
    a.vm_start(vm['uuid'])
    _say(args, 'host-a: VM %s with %d disks of %s, guest writing %s'
         % (vm['uuid'], args.disks, progress.human(args.size),
            '%d blocks/s per disk' % rate if rate else 'as fast as it can'))
    a.guest_start(vm['uuid'], rate=rate, fill=args.fill)
    for _ in range(2):                 # leaf + 2 snapshots: 3 deep
        time.sleep(0.3)
        a.vm_snapshot(vm['uuid'])
    time.sleep(0.3)
    vdi_map = {d['vdi']: 'sr-b' for d in vm['disks']}

    start = time.monotonic()
    mid = a.migrate_vm(vm['uuid'], 'host-b', vdi_map, {'net0': 'net0'})
    status = progress.follow(a.migration_get, mid,
                             progress.Follower(quiet=args.json))
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
              'workdir': workdir if args.workdir else None}
    verified = False
    if status['phase'] == 'done':
        check = b.guest_verify(vm['uuid'])
        leftovers = a.vdi_list()
        problems = _check_images(os.path.join(workdir, 'host-b', 'sr-b'))
        verified = (check['verified'] and not leftovers and not problems)
        result.update(guest=check, source_leftovers=len(leftovers),
                      image_problems=problems)
    else:
        a.guest_verify(vm['uuid'])
    result['verified'] = verified
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _summary(result)
    return 0 if verified else 1


def _summary(r):
    h = progress.human
    print('\nmigration %s: %s' % (r['migration'], r['phase']))
    if r['error']:
        print('  error:            %s' % r['error'])
    print('  bytes copied:     %s' % h(r['bytes_copied']))
    print('  time:             %.2f s' % r['seconds'])
    print('  throughput:       %s/s' % h(r['throughput_bytes_per_s']))
    print('  downtime:         %s ms' % r['downtime_ms'])
    print('  guest writes during the migration: %d'
          % r['guest_writes_during_migration'])
    guest = r.get('guest') or {}
    if guest:
        print('  guest verified:   %s (%s checked; %d writes, %d reads, '
              'error: %s)' % (guest['verified'],
                              h(guest.get('bytes_verified', 0)),
                              guest['writes'], guest['reads'],
                              guest.get('error')))
        print('  left on host-a:   %d VDIs' % r['source_leftovers'])
        print('  vhd-util rules:   %s' % ('; '.join(r['image_problems']) or
                                          'every image passes'))
    if r['workdir']:
        print('  hosts kept in:    %s' % r['workdir'])
    print('VERIFIED' if r['verified'] else 'NOT VERIFIED', file=sys.stdout)
