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

"""QEMU's own memory migration of the guest kit, again and again (no xsm).

A control for ``live_guest_bench.py``: the guest kit's guest (TCG, its
verifier writing to its disks) migrated with nothing but QEMU's
``migrate`` from one QEMU to the next on the same host, over and over;
both QEMUs open the same disk files (shared storage: the destination's
are inactive until the migration ends), so no disk is copied and no xsm
code runs. Every ``--every`` migrations, and at the end, the guest
verifies its disks (``verify``); the consoles are watched for a kernel
panic, oops or BUG (``live_guest_bench.kernel_trouble``).

``--no-migrate`` runs the same guest as long without migrating it: what
TCG under the same load does by itself.

``python benchmarks/tcg_pingpong.py --migrations 100 --json OUT``
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402
import live_guest_bench as lgb  # noqa: E402


class _Bench:
    """What ``live_guest_bench.PeerQemu`` needs of a bench."""

    def __init__(self, args):
        self.args = args
        self.peer_pids = []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--migrations', type=int, default=50,
                   help='migrations, one after the other (default 50)')
    p.add_argument('--no-migrate', action='store_true',
                   help='run the guest as long as --seconds, unmigrated')
    p.add_argument('--seconds', type=float, default=300,
                   help='with --no-migrate: seconds the guest runs '
                   '(default 300)')
    p.add_argument('--every', type=int, default=10,
                   help='a full-disk verify every N migrations')
    p.add_argument('--gap', type=float, default=1.0,
                   help='seconds the guest runs between two migrations')
    p.add_argument('--ready-writes', type=int,
                   help='migrate once the verifier did this many writes '
                   '(default: as live_guest_bench, 40 writes and its wall '
                   'clock synced)')
    p.add_argument('--bandwidth', type=_common.parse_size,
                   default=str(lgb.MEMORY_BANDWIDTH),
                   help='QEMU\'s max-bandwidth for the memory (default '
                   '1G a second: as live_guest_bench)')
    p.add_argument('--downtime-limit', type=int, metavar='MS',
                   help='QEMU\'s downtime-limit (default: QEMU\'s, 300)')
    p.add_argument('--ram-kib', type=int, metavar='KIB',
                   help='as live_guest_bench --ram-kib')
    p.add_argument('--disks', type=int, default=2,
                   help='virtio disks of the guest (default 2)')
    p.add_argument('--size', type=_common.parse_size, default='64M',
                   help='size of each disk (default 64M)')
    p.add_argument('--rate', type=int, default=50,
                   help='guest writes a second per disk (default 50)')
    p.add_argument('--memory', type=int, default=128,
                   help='guest RAM in MiB (default 128)')
    p.add_argument('--guest-kit', default=os.environ.get(
        'XSM_GUEST_KIT', os.path.join(os.path.dirname(HERE), '.guest-kit')),
        help='the guest kit: vmlinuz and initramfs.cpio.gz, as '
        'tools/guest-kit/build.sh makes them (default '
        '$XSM_GUEST_KIT, else .guest-kit)')
    p.add_argument('--json', metavar='OUT', help='write the results to OUT')
    p.add_argument('--keep-consoles', metavar='DIR',
                   help='write the console text of each guest whose kernel '
                   'was in trouble to DIR')
    a = p.parse_args(argv)
    a.verifier = {'rate': a.rate, 'report_ms': 100}
    a.peer_format, a.peer_cache = 'qcow2', 'none'
    if a.ram_kib:
        lgb.ram_kib_command_lines(a.ram_kib)
    root = tempfile.mkdtemp(prefix='xsm-pp-')
    bench = _Bench(a)
    con = lgb.Console()
    con.start()
    qemus = []
    out = {'config': {k: v for k, v in vars(a).items()},
           'migrations': 0, 'verifies': [], 'trouble': [], 'error': None,
           'downtime_ms': []}

    def log(line):
        print(line, file=sys.stderr, flush=True)

    def verify(q):
        at = con.count()
        q.ctl('verify')
        rep = con.wait('verify', after=at, timeout=120)
        out['verifies'].append(rep.line)
        if rep['result'] != 'ok' or rep['mismatches'] or rep['io_errors']:
            raise lgb.BenchError('verify failed: %s' % rep.line)

    t_start = time.monotonic()
    try:
        disks = [os.path.join(root, 'd%d.qcow2' % i) for i in range(a.disks)]
        for path in disks:
            subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path,
                            str(a.size)], check=True)
        q = lgb.PeerQemu(bench, os.path.join(root, 'g0'), disks)
        qemus.append(q)
        con.add(q.paths.console)
        ready = lgb.guest_ready if a.ready_writes is None else (
            lambda r: r['writes'] >= a.ready_writes)
        con.wait('progress', ready, timeout=lgb.BOOT_TIMEOUT)
        if a.no_migrate:
            end = time.monotonic() + a.seconds
            while time.monotonic() < end:
                time.sleep(min(30, max(end - time.monotonic(), 0)))
                at = con.count()
                q.ctl('status')
                con.wait('progress', after=at)
            verify(q)
        for n in range(0 if a.no_migrate else a.migrations):
            if n or a.ready_writes is None:
                time.sleep(a.gap)
            d = lgb.PeerQemu(bench, os.path.join(root, 'g%d' % (n + 1)),
                             disks, incoming=True)
            qemus.append(d)
            con.add(d.paths.console)
            port = _common.free_port()
            d.qmp.execute('migrate-set-capabilities', capabilities=[
                {'capability': 'events', 'state': True}])
            d.qmp.execute('migrate-incoming', uri='tcp:127.0.0.1:%d' % port)
            q.qmp.execute('migrate-set-capabilities', capabilities=[
                {'capability': 'events', 'state': True}])
            params = {'max-bandwidth': a.bandwidth}
            if a.downtime_limit is not None:
                params['downtime-limit'] = a.downtime_limit
            q.qmp.execute('migrate-set-parameters', **params)
            q.qmp.execute('migrate', uri='tcp:127.0.0.1:%d' % port)
            ev = q.qmp.wait_for(lambda e: e['event'] == 'MIGRATION' and e[
                'data']['status'] in ('completed', 'failed', 'cancelled'),
                300, 'end of migration %d' % n)
            if ev['data']['status'] != 'completed':
                raise lgb.BenchError('migration %d: %s' % (n, ev))
            deadline = time.monotonic() + 60
            while d.qmp.execute('query-migrate').get('status') != \
                    'completed':
                if time.monotonic() > deadline:
                    raise lgb.BenchError('incoming %d not completed' % n)
                time.sleep(0.01)
            d.qmp.execute('cont')
            info = q.qmp.execute('query-migrate')
            out['downtime_ms'].append(info.get('downtime'))
            q.close()
            qemus.remove(q)
            q = d
            out['migrations'] = n + 1
            at = con.count()
            q.ctl('status')
            con.wait('progress', after=at)
            if (n + 1) % a.every == 0:
                verify(q)
                log('%d migrations, load %.1f, %s' % (
                    n + 1, os.getloadavg()[0], out['verifies'][-1]))
        if not a.no_migrate:
            verify(q)
    except Exception as exc:
        out['error'] = '%s: %s' % (type(exc).__name__, exc)
        log('ERROR after %d migration(s): %s' % (out['migrations'],
                                                 out['error']))
    finally:
        con.stop()
        con.poll()
        for q in qemus:
            try:
                q.close()
            except Exception:
                pass
        for index, line in con.panics:
            out['trouble'].append({'console': index, 'line': line,
                                   'excerpt': con.excerpt(index, line)})
        if a.keep_consoles and con.panics:
            os.makedirs(a.keep_consoles, exist_ok=True)
            for index, text in enumerate(con.text):
                with open(os.path.join(a.keep_consoles, 'pp-%d-%d.log' % (
                        os.getpid(), index)), 'w') as f:
                    f.write('\n'.join(text) + '\n')
        shutil.rmtree(root, ignore_errors=True)
    out['seconds'] = round(time.monotonic() - t_start, 1)
    out['loadavg'] = os.getloadavg()
    seen = set()
    for t in out['trouble']:
        if t['console'] not in seen:
            seen.add(t['console'])
            log('GUEST KERNEL TROUBLE (console %d):\n  %s' % (
                t['console'], '\n  '.join(t['excerpt'])))
    log('%d migration(s) in %.0f s, %d trouble line(s), %d verify(s), '
        'error: %s' % (out['migrations'], out['seconds'],
                       len(out['trouble']), len(out['verifies']),
                       out['error']))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 1 if out['error'] or out['trouble'] else 0


if __name__ == '__main__':
    sys.exit(main())
