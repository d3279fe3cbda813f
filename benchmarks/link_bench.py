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

"""Migrations over a shaped link, beside nbdcopy over the same link.

Two hosts as network namespaces (:class:`netns.TwoHosts` of the fault
tests: each with its own addresses, the migration link a veth pair
between them), one ``xsm-agent`` in each (``migration_address`` on that
link, RabbitMQ through the tests' broker proxy), and the link shaped with
``tc tbf`` to ``--rate`` bytes a second each way. A halted VM's one disk
is filled with seeded random 2 MiB pieces by our VHD code (``dense``:
every block of ``--dense``; ``sparse``: ``--alloc`` bytes in ``--run``
pieces over ``--sparse`` virtual bytes); a copy of the file is the peer's
source. Each run, in alternating order:

* ours: ``migrate_vm`` a to b over the shaped link; the copy phase is
  timed by polling ``migration_get`` every 0.05 s; MB/s = ``bytes_copied``
  / copy seconds. The VM then comes back with the link unshaped.
* the peer: ``nbdcopy --destination-is-zero --flush`` run in host a from
  ``qemu-nbd -f vpc -r`` serving the golden copy (host a) to ``qemu-nbd
  -f raw`` serving a new empty file (host b), both with TLS and client
  certificates, listening on the migration link's addresses: the data
  crosses the same shaped link. MB/s = allocated bytes / wall seconds.

Needs root (namespaces), ``ip``/``tc`` (iproute2), RabbitMQ,
``qemu-nbd``/``nbdcopy``/``nbdinfo``. ``python benchmarks/link_bench.py
--json OUT``.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
for _p in (TOP, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common  # noqa: E402
from migration_bench import write_runs  # noqa: E402
from xsm_driver.testing import harness  # noqa: E402

MiB = _common.MiB
BLOCK = 2 * MiB


class BenchError(Exception):
    pass


def copy_span(polls):
    """Seconds of the copy phase from ``[(t, phase)]`` polls (pure).

    Each boundary is placed midway between the two polls that saw it;
    None when no poll saw the copy phase.
    """
    start = end = None
    for i, (t, phase) in enumerate(polls):
        if phase == 'copy' and start is None:
            start = (polls[i - 1][0] + t) / 2 if i else t
        elif start is not None and end is None and phase != 'copy':
            end = (polls[i - 1][0] + t) / 2
    if start is None or end is None:
        return None
    return end - start


class Bench:

    def __init__(self, args, root, log):
        from tests.functional.faults import netns
        self.netns = netns
        self.args = args
        self.root = root
        self.log = log
        self.token = uuidlib.uuid4().hex[:10]
        self.exchange = harness.run_names('linkbench', 'link',
                                          self.token).exchange
        self.hosts = None
        self.proxy = None
        self.agents = {}
        self.deployment = None
        self.procs = []
        self.logfile = open(os.path.join(root, 'tools.log'), 'ab')

    def setup(self):
        from xsm_driver.core.nbd import tls
        netns = self.netns
        problem = harness.broker_problem() or netns.problem()
        if problem:
            raise BenchError(problem)
        self.hosts = netns.TwoHosts(self.token).create()
        self.proxy = netns.BrokerProxy(self.hosts.control_net + '1',
                                       harness.BROKER).start()
        names = harness.run_names('linkbench', 'link', self.token)
        agents = {}
        for role in 'ab':
            folder = os.path.join(self.root, 'host-' + role)
            sr = 'sr-' + role
            # the fault tests' namespaced agents: their options, their
            # broker proxy, ip netns exec
            agents[role] = harness.AgentProcess(
                names.hosts[role], folder,
                {sr: ('vhd', os.path.join(folder, sr))}, self.exchange,
                dict(harness.TEST_OPTIONS,
                     migration_address=self.hosts.migration[role]),
                transport_url=self.proxy.url,
                wrap=self.hosts.wrapper(role))
        self.deployment = harness.Deployment(
            self.root, self.exchange, agents, rpc_timeout=300,
            background_cleanup=True)
        self.agents = self.deployment.agents
        try:
            self.deployment.start()
        except harness.HarnessError as exc:
            raise BenchError(str(exc))
        self.clients = self.deployment.clients
        self.pki = os.path.join(self.root, 'pki')
        tls.make_credentials(self.pki, hosts=(
            'localhost', '127.0.0.1', self.hosts.migration['a'],
            self.hosts.migration['b']))

    # -- the peer ----------------------------------------------------------

    def qemu_nbd(self, role, image, fmt, read_only):
        port = _common.free_port()
        addr = self.hosts.migration[role]
        argv = self.hosts.argv(
            role, 'qemu-nbd', '--object',
            'tls-creds-x509,id=tls0,endpoint=server,dir=%s' % self.pki,
            '--tls-creds', 'tls0', '-f', fmt, '-t', '-e', '4', '-b', addr,
            '-p', str(port), '-x', '', *(['-r'] if read_only else []), image)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                stdout=self.logfile, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        uri = 'nbds://%s:%d/?tls-certificates=%s' % (addr, port, self.pki)
        deadline = time.monotonic() + 30
        while subprocess.call(self.hosts.argv('a', 'nbdinfo', '--size', uri),
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError('%s did not serve' % ' '.join(argv))
            time.sleep(0.1)
        return proc, uri

    def stop_proc(self, proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.remove(proc)

    def peer_run(self, src_uri, size, allocated):
        out = os.path.join(self.root, 'peer-out.raw')
        with open(out, 'wb') as f:
            f.truncate(size)
        dst, dst_uri = self.qemu_nbd('b', out, 'raw', False)
        try:
            os.sync()
            t = time.monotonic()
            rc = subprocess.call(self.hosts.argv(
                'a', 'nbdcopy', '--destination-is-zero', '--flush', src_uri,
                dst_uri), stdout=self.logfile, stderr=subprocess.STDOUT)
            took = time.monotonic() - t
            if rc:
                raise BenchError('nbdcopy exited %d (see %s)'
                                 % (rc, self.logfile.name))
        finally:
            self.stop_proc(dst)
            os.unlink(out)
        return {'side': 'peer', 'seconds': round(took, 3),
                'bytes': allocated, 'MBps': allocated / 1e6 / took}

    # -- ours --------------------------------------------------------------

    def migrate(self, vm, src, dst, record=True):
        client = self.clients[src]
        disks = client.vm_get(vm)['disks']
        os.sync()
        polls = []
        t0 = time.monotonic()
        mid = client.migrate_vm(vm, self.agents[dst].name,
                                {d['vdi']: 'sr-' + dst for d in disks},
                                {'net0': 'net0'})
        while True:
            st = client.migration_get(mid)
            polls.append((time.monotonic(), st['phase']))
            if st.get('finished') is not None:
                break
            time.sleep(0.05)
        total = time.monotonic() - t0
        if st['phase'] != 'done':
            raise BenchError('migration %s ended %s: %s' % (
                mid, st['phase'], st.get('error')))
        copy_s = copy_span(polls)
        return {'side': 'ours', 'seconds': round(total, 3),
                'copy_seconds': copy_s and round(copy_s, 3),
                'bytes': st['bytes_copied'],
                'downtime_ms': st.get('downtime_ms'),
                'MBps': st['bytes_copied'] / 1e6 / copy_s if copy_s
                else None}

    def disk(self, name, size, runs, seed):
        a = self.args
        c = self.clients['a']
        vm = c.vm_create('link-%s' % name, [{'sr': 'sr-a', 'size': size}],
                         vifs=['net0'])['uuid']
        vdi = c.vm_get(vm)['disks'][0]['vdi']
        path = os.path.join(self.agents['a'].sr_path('sr-a'), vdi + '.vhd')
        allocated = write_runs(path, runs, seed)
        golden = os.path.join(self.root, '%s.golden.vhd' % name)
        shutil.copyfile(path, golden)
        c.vm_start(vm)
        src, src_uri = self.qemu_nbd('a', golden, 'vpc', True)
        results = []
        try:
            for rep in range(a.runs):
                order = ('ours', 'peer') if rep % 2 == 0 else ('peer', 'ours')
                for side in order:
                    if side == 'peer':
                        self.hosts.shape(a.rate)
                        res = self.peer_run(src_uri, size, allocated)
                    else:
                        self.hosts.shape(a.rate)
                        res = self.migrate(vm, 'a', 'b')
                        self.hosts.restore()
                        self.migrate(vm, 'b', 'a')
                    self.hosts.restore()
                    res.update(disk=name, run=rep, allocated=allocated,
                               size=size)
                    results.append(res)
                    self.log('%s %s run %d: %.1f MB/s (%s s%s)' % (
                        name, side, rep, res['MBps'] or 0,
                        res.get('copy_seconds') or res['seconds'],
                        ', downtime %s ms' % res['downtime_ms']
                        if side == 'ours' else ''))
        finally:
            self.stop_proc(src)
            os.unlink(golden)
            try:
                self.clients['a'].vm_destroy(vm)
            except Exception:
                pass
        return results

    def run(self):
        a = self.args
        slots = a.sparse // a.run
        rng = random.Random(a.seed)
        picked = sorted(rng.sample(range(slots), max(1, a.alloc // a.run)))
        out = []
        out += self.disk('dense', a.dense, [(0, a.dense)], a.seed + 1)
        out += self.disk('sparse', a.sparse,
                         [(i * a.run, a.run) for i in picked], a.seed + 3)
        return out

    def cleanup(self):
        for proc in list(self.procs):
            self.stop_proc(proc)
        if self.deployment is not None:
            self.deployment.close()
        if self.proxy is not None:
            self.proxy.stop()
        if self.hosts is not None:
            left = self.hosts.destroy()
            if left:
                self.log('could not remove: %s' % ', '.join(left))
        self.logfile.close()


def summarise(results):
    """Medians per disk and side, and ours / peer (pure)."""
    out = {}
    for disk in sorted({r['disk'] for r in results}):
        row = {}
        for side in ('ours', 'peer'):
            rs = [r for r in results if r['disk'] == disk and
                  r['side'] == side]
            row[side] = {
                'median_MBps': _common.median(r['MBps'] for r in rs),
                'median_seconds': _common.median(
                    r.get('copy_seconds') or r['seconds'] for r in rs),
                'runs_MBps': [r['MBps'] for r in rs]}
            if rs:
                row['allocated'] = rs[0]['allocated']
        row['ratio'] = _common.ratio(row['ours']['median_MBps'],
                                     row['peer']['median_MBps'])
        out[disk] = row
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rate', type=_common.parse_size, default='50M',
                   help='link rate, bytes a second each way (default 50M)')
    p.add_argument('--dense', type=_common.parse_size, default='1G',
                   help='size of the dense disk (default 1G)')
    p.add_argument('--sparse', type=_common.parse_size, default='16G',
                   help='virtual size of the sparse disk (default 16G)')
    p.add_argument('--alloc', type=_common.parse_size, default='256M',
                   help='allocated bytes of the sparse disk (default 256M)')
    p.add_argument('--run', type=_common.parse_size, default='32M',
                   help='length of each allocated run of the sparse disk '
                   '(default 32M)')
    p.add_argument('--scale', type=float, default=1.0,
                   help='multiplies the four sizes')
    p.add_argument('--runs', type=int, default=3,
                   help='timed runs of each side and disk; medians '
                   '(default 3)')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the disks\' data and of where the sparse '
                   'disk\'s runs lie (default 20240601)')
    _common.add_scratch_options(p)
    a = p.parse_args(argv)
    for key in ('dense', 'sparse', 'alloc', 'run'):
        setattr(a, key, max(BLOCK, int(getattr(a, key) * a.scale) // BLOCK
                            * BLOCK))
    if a.alloc > a.sparse or a.run > a.alloc:
        p.error('need --run <= --alloc <= --sparse')
    root = tempfile.mkdtemp(prefix='xsm-link-bench-', dir=a.workdir)

    def log(line):
        if not a.quiet:
            print(line, file=sys.stderr, flush=True)

    bench = Bench(a, root, log)
    status = 0
    try:
        bench.setup()
        results = bench.run()
        summary = summarise(results)
        print('migration over a link shaped to %.1f MB/s each way (tc tbf)'
              % (a.rate / 1e6))
        print('%-7s %10s %10s %6s %12s' % ('disk', 'ours MB/s', 'peer MB/s',
                                           'ratio', 'allocated'))
        for disk, row in summary.items():
            print('%-7s %10.1f %10.1f %6.2f %8d MiB' % (
                disk, row['ours']['median_MBps'] or 0,
                row['peer']['median_MBps'] or 0, row['ratio'] or 0,
                row['allocated'] // MiB))
        if a.json:
            with open(a.json, 'w') as f:
                json.dump({'config': vars(a), 'machine': _common.machine(),
                           'results': results, 'summary': summary}, f,
                          indent=1)
    except (BenchError, OSError) as exc:
        print('link_bench: error: %s' % exc, file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
