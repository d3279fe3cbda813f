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

"""Soak: a two-disk VM migrates back and forth under load, N times.

Two real ``xsm-agent`` processes (``python -m xsm_driver.cmd.agent``,
started by :mod:`xsm_driver.testing.harness` as the functional tests'
agents, with their options) on the real RabbitMQ, each with one vhd SR.
A VM with two disks is created on host ``a``; its verifying guest
(:mod:`xsm_driver.core.migration.workload`) fills part of each disk and
then writes (and reads back, checking) ``--rate`` 4 KiB blocks a second.
The VM then migrates ``--migrations`` times, a to b, b to a, ... while
the guest runs. After every migration:

* the migration ended ``done``, with a downtime;
* the VM runs on the destination, its disks in the destination's SR, each
  chain no deeper than after the first migration;
* the source has no VM, no VDI and no image file left;
* ``guest_verify`` on the destination checks every byte of both disks
  against what the guest wrote (it stops the guest, which is then started
  again: it goes on where it stopped);
* each agent's open file descriptors (``/proc/PID/fd``), threads and RSS
  (``/proc/PID/status``) are sampled.

At the end, every file under each host's folder that was not there before
the first migration, other than the images of the VM's current VDIs, is a
leftover; so is anything under ``state/migrations``. The fd, thread and
RSS series must be *flat* (:func:`flat`): after ``--warmup`` migrations,
the median of the last window may exceed the median of the first window
by at most a tolerance (per agent, comparing samples taken in the same
role, since an agent holds the VM after every other migration).

``python benchmarks/soak.py --json OUT``; exit status 0 when every
invariant held, 1 otherwise, 2 for bad arguments or a missing broker.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid as uuidlib

MiB = 1 << 20
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TOP not in sys.path:
    sys.path.insert(0, TOP)

#: what :func:`flat` allows a series to grow by, per resource:
#: (absolute, fraction of the first window's median); the larger applies
TOLERANCE = {'fds': (4, 0.0), 'threads': (2, 0.0),
             'rss_kib': (16 * 1024, 0.10)}


# -- pure decisions ----------------------------------------------------------

def growth(samples, warmup=0, window=None, period=1):
    """How much a series grew, robustly: medians of two windows.

    The first ``warmup`` samples are dropped. Of what is left, the samples
    are split by ``i % period`` (an agent alternates between holding the VM
    and not: ``period=2`` compares like with like); in each such
    sub-series the median of its last ``window`` samples minus the median
    of its first ``window`` (default: a quarter of the sub-series, at
    least 1). The largest growth of the sub-series is returned; None when
    a sub-series has fewer than two samples.
    """
    if period < 1 or warmup < 0:
        raise ValueError('period must be >= 1 and warmup >= 0')
    kept = list(samples)[warmup:]
    worst = None
    for phase in range(period):
        sub = kept[phase::period]
        if len(sub) < 2:
            return None
        w = window or max(1, len(sub) // 4)
        w = min(w, len(sub) // 2) or 1
        grew = statistics.median(sub[-w:]) - statistics.median(sub[:w])
        worst = grew if worst is None else max(worst, grew)
    return worst


def slope(samples, warmup=0):
    """Least-squares growth per sample after ``warmup``; 0.0 if < 2."""
    ys = list(samples)[warmup:]
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2.0
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in range(n))
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sxx


def allowed(samples, warmup, absolute, fraction):
    """The growth a series may show: the larger of the two tolerances."""
    kept = list(samples)[warmup:] or list(samples)
    base = statistics.median(kept[:max(1, len(kept) // 4)]) if kept else 0
    return max(absolute, fraction * base)


def flat(samples, warmup=0, absolute=0, fraction=0.0, period=1,
         window=None):
    """Whether a series is flat: ``(ok, grew, limit)``.

    ``ok`` is True when :func:`growth` is at most the :func:`allowed`
    tolerance. A series too short to judge (fewer than two samples per
    period after the warm-up) is not flat: nothing was shown.
    """
    grew = growth(samples, warmup, window, period)
    limit = allowed(samples, warmup, absolute, fraction)
    if grew is None:
        return False, None, limit
    return grew <= limit, grew, limit


def warmup_for(count):
    """Migrations left out of the flatness check: a tenth, 2 to 10."""
    return max(2, min(10, count // 10))


def leftovers(before, after, expected):
    """Files that should not be there: ``after - before - expected``.

    :param before: paths that existed before the first migration, less
        the images of the VM's VDIs then.
    :param after: paths that exist at the end.
    :param expected: images (and their ``.json`` records) of the VM's
        VDIs at the end.

    Host state files in :data:`STATE_FILES` are not leftovers.
    """
    return sorted(set(after) - set(before) - set(expected) - STATE_FILES)


def chain_depth(vdis, uuid):
    """Images in the chain of ``uuid``, from a ``vdi_list()`` answer."""
    parents = {v['uuid']: v['parent'] for v in vdis}
    depth = 0
    while uuid is not None:
        depth += 1
        uuid = parents[uuid]
    return depth


# -- what the agents hold ----------------------------------------------------

def proc_sample(pid):
    """``{'fds', 'threads', 'rss_kib'}`` of a live process."""
    fds = len(os.listdir('/proc/%d/fd' % pid))
    values = {}
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            key, _, rest = line.partition(':')
            if key in ('Threads', 'VmRSS'):
                values[key] = int(rest.split()[0])
    return {'fds': fds, 'threads': values['Threads'],
            'rss_kib': values['VmRSS']}


#: files of a host's state whose content the soak checks over RPC
#: instead (``vms.json``: ``vm_list()`` of the host without the VM is [])
STATE_FILES = frozenset(['state/vms.json'])


def walk_files(top, folders=False):
    """Files (and folders) under ``top``, as paths relative to it."""
    found = set()
    for folder, dirs, files in os.walk(top):
        for name in (dirs + files) if folders else files:
            found.add(os.path.relpath(os.path.join(folder, name), top))
    return found


class SoakError(Exception):
    """An invariant did not hold."""


class Soak:
    """Two agents, one two-disk VM, ``migrations`` migrations.

    :param root: a folder for both hosts (created, not removed).
    :param sizes: the two disks' sizes in bytes.
    :param log: a callable taking one line of progress, or None.
    :param defaults: extra ``[DEFAULT]`` options of both agents, e.g.
        ``{'executor_thread_pool_size': 8}`` (oslo.messaging's pool of
        RPC threads grows up to that size, 64 by default, during the
        first migrations: a short soak wants it small).
    """

    def __init__(self, root, migrations=100, sizes=(64 * MiB, 96 * MiB),
                 rate=300, read_ratio=0.5, fill=0.5, timeout=300,
                 log=None, defaults=None):
        from xsm_driver.testing import harness
        self.harness = harness
        self.root = root
        self.migrations = migrations
        self.sizes = tuple(sizes)
        self.rate = rate
        self.read_ratio = read_ratio
        self.fill = fill
        self.timeout = timeout
        self.log = log or (lambda line: None)
        self.token = uuidlib.uuid4().hex[:10]
        names = harness.run_names('soak', 'soak', self.token)
        self.exchange = names.exchange
        agents = {}
        for role in ('a', 'b'):
            folder = os.path.join(root, 'host-' + role)
            sr = 'sr-' + role
            agents[role] = harness.AgentProcess(
                names.hosts[role], folder,
                {sr: ('vhd', os.path.join(folder, sr))}, self.exchange,
                harness.TEST_OPTIONS, defaults=defaults)
        self.deployment = harness.Deployment(root, self.exchange, agents,
                                             rpc_timeout=120)
        self.agents = self.deployment.agents
        self.clients = self.deployment.clients
        self.records = []
        self.result = None

    # -- set-up and tear-down ------------------------------------------------

    def start(self):
        problem = self.harness.broker_problem()
        if problem:
            raise SoakError(problem)
        try:
            self.deployment.start()
        except self.harness.HarnessError as exc:
            raise SoakError(str(exc))
        return self

    def stop(self):
        self.deployment.close()

    def tails(self):
        return self.deployment.tails()

    # -- the soak ------------------------------------------------------------

    def images(self, role):
        """Image paths (relative to the host folder) of role's VDIs."""
        agent = self.agents[role]
        sr = 'sr-' + role
        rel = os.path.relpath(agent.sr_path(sr), agent.folder)
        return {os.path.join(rel, v['uuid'] + ext)
                for v in self.clients[role].vdi_list()
                for ext in ('.vhd', '.json')}

    def sample(self):
        return {role: proc_sample(agent.proc.pid)
                for role, agent in self.agents.items()}

    def wait(self, client, mid):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            status = client.migration_get(mid)
            if status.get('finished') is not None:
                return status
            time.sleep(0.05)
        raise SoakError('migration %s did not end within %s s (last status: '
                        '%s)%s' % (mid, self.timeout, status, self.tails()))

    def check(self, ok, what):
        if not ok:
            raise SoakError('%s%s' % (what, self.tails()))

    def run(self):
        started = time.monotonic()
        a = self.clients['a']
        vm = a.vm_create('soak-vm-%s' % self.token,
                         [{'sr': 'sr-a', 'size': s} for s in self.sizes],
                         vifs=['net0'])
        a.vm_start(vm['uuid'])
        a.guest_start(vm['uuid'], rate=self.rate,
                      read_ratio=self.read_ratio, fill=self.fill)
        total = sum(self.sizes)
        before = {}
        for role, agent in self.agents.items():
            before[role] = walk_files(agent.folder) - self.images(role)
        baseline = self.sample()
        self.log('VM %s: disks %s, guest %d writes/s (read ratio %s), %d '
                 'migrations' % (vm['uuid'], ', '.join(
                     '%d MiB' % (s // MiB) for s in self.sizes), self.rate,
                     self.read_ratio, self.migrations))
        depth_limit = None
        for i in range(self.migrations):
            src, dst = ('a', 'b') if i % 2 == 0 else ('b', 'a')
            source, dest = self.clients[src], self.clients[dst]
            vm = source.vm_get(vm['uuid'])
            t0 = time.monotonic()
            mid = source.migrate_vm(
                vm['uuid'], self.agents[dst].name,
                {d['vdi']: 'sr-' + dst for d in vm['disks']},
                {'net0': 'net0'})
            status = self.wait(source, mid)
            seconds = time.monotonic() - t0
            self.check(status['phase'] == 'done',
                       'migration %d (%s to %s) ended %s: %s'
                       % (i + 1, src, dst, status['phase'],
                          status.get('error')))
            self.check(status.get('downtime_ms') is not None,
                       'migration %d has no downtime' % (i + 1))
            moved = dest.vm_get(vm['uuid'])
            self.check(moved['power_state'] == 'running',
                       'migration %d: the VM is %s on %s'
                       % (i + 1, moved['power_state'], dst))
            self.check(all(d['sr'] == 'sr-' + dst for d in moved['disks']),
                       'migration %d: disks %s not in sr-%s'
                       % (i + 1, moved['disks'], dst))
            vdis = dest.vdi_list()
            depths = [chain_depth(vdis, d['vdi']) for d in moved['disks']]
            if depth_limit is None:
                depth_limit = max(depths)
            self.check(max(depths) <= depth_limit,
                       'migration %d: chains grew to %s (first: %d)'
                       % (i + 1, depths, depth_limit))
            self.check(source.vm_list() == [] and source.vdi_list() == [],
                       'migration %d: the source %s still has a VM or VDIs'
                       % (i + 1, src))
            left = [n for n in os.listdir(
                self.agents[src].sr_path('sr-' + src))
                if n.endswith(('.vhd', '.raw', '.json'))]
            self.check(left == [], 'migration %d: images left on the '
                       'source %s: %s' % (i + 1, src, left))
            verified = dest.guest_verify(vm['uuid'])
            self.check(verified.get('verified') and
                       verified.get('bytes_verified') == total,
                       'migration %d: the guest did not verify on %s: %s'
                       % (i + 1, dst, verified))
            dest.guest_start(vm['uuid'], rate=self.rate,
                             read_ratio=self.read_ratio)
            record = {'n': i + 1, 'from': src, 'to': dst,
                      'seconds': round(seconds, 3),
                      'downtime_ms': status.get('downtime_ms'),
                      'bytes_copied': status.get('bytes_copied'),
                      'depths': depths,
                      # the guest's counters restart with it: writes and
                      # reads since the previous verification
                      'guest_writes': verified.get('writes'),
                      'guest_reads': verified.get('reads'),
                      'agents': self.sample()}
            self.records.append(record)
            self.log('%3d %s->%s %6.2fs downtime %6.1f ms  fds %d/%d  '
                     'threads %d/%d  RSS %.1f/%.1f MiB'
                     % (i + 1, src, dst, seconds,
                        record['downtime_ms'],
                        record['agents']['a']['fds'],
                        record['agents']['b']['fds'],
                        record['agents']['a']['threads'],
                        record['agents']['b']['threads'],
                        record['agents']['a']['rss_kib'] / 1024.0,
                        record['agents']['b']['rss_kib'] / 1024.0))
        holder = 'a' if self.migrations % 2 == 0 else 'b'
        final = self.clients[holder].guest_verify(vm['uuid'])
        self.check(final.get('verified'), 'final verification on %s: %s'
                   % (holder, final))
        left = {}
        for role, agent in self.agents.items():
            after = walk_files(agent.folder)
            expected = self.images(role) if role == holder else set()
            extra = leftovers(before[role], after, expected)
            migrations = os.path.join(agent.state_path, 'migrations')
            if os.path.isdir(migrations):
                extra += sorted(os.path.relpath(os.path.join(migrations, p),
                                                agent.folder)
                                for p in walk_files(migrations, True))
            left[role] = sorted(set(extra))
        self.result = summarise(self.records, baseline, left,
                                time.monotonic() - started,
                                final_verified=bool(final.get('verified')))
        return self.result


def summarise(records, baseline, left, seconds, final_verified=True):
    """The verdict of a soak, from its records (pure)."""
    count = len(records)
    warmup = warmup_for(count)
    verdicts = {}
    ok = final_verified and not any(left.values()) and count > 0
    for role in ('a', 'b'):
        for key, (absolute, fraction) in sorted(TOLERANCE.items()):
            series = [r['agents'][role][key] for r in records]
            good, grew, limit = flat(series, warmup, absolute, fraction,
                                     period=2)
            ok = ok and good
            verdicts['%s.%s' % (role, key)] = {
                'flat': good, 'growth': grew, 'allowed': limit,
                'slope_per_migration': round(slope(series, warmup), 3),
                'baseline': baseline[role][key],
                'first': series[0] if series else None,
                'last': series[-1] if series else None,
                'min': min(series) if series else None,
                'max': max(series) if series else None}
    times = [r['seconds'] for r in records]
    downs = sorted(r['downtime_ms'] for r in records)
    return {'ok': ok, 'migrations': count, 'warmup': warmup,
            'seconds': round(seconds, 1),
            'migration_s': {'median': statistics.median(times) if times
                            else None, 'max': max(times) if times else None},
            'downtime_ms': {'median': statistics.median(downs) if downs
                            else None,
                            'p99': downs[min(len(downs) - 1,
                                             -(-99 * len(downs) // 100) - 1)]
                            if downs else None,
                            'max': downs[-1] if downs else None},
            'leftovers': left, 'final_verified': final_verified,
            'resources': verdicts}


def format_summary(result):
    lines = ['soak: %d migrations in %.1f s, every one verified: %s'
             % (result['migrations'], result['seconds'],
                'yes' if result['final_verified'] else 'NO'),
             'migration s: median %.2f, max %.2f; downtime ms: median %.1f, '
             'p99 %.1f, max %.1f' % (
                 result['migration_s']['median'], result['migration_s']['max'],
                 result['downtime_ms']['median'], result['downtime_ms']['p99'],
                 result['downtime_ms']['max']),
             'resource     baseline  first   last    min    max  growth '
             'allowed  slope/mig  flat (warm-up %d)' % result['warmup']]
    for name, v in sorted(result['resources'].items()):
        scale = 1024.0 if name.endswith('rss_kib') else 1
        label = name.replace('rss_kib', 'rss_MiB')

        def f(x):
            return '-' if x is None else '%.1f' % (x / scale)
        lines.append('%-12s %8s %6s %6s %6s %6s %7s %7s %10.3f  %s' % (
            label, f(v['baseline']), f(v['first']), f(v['last']),
            f(v['min']), f(v['max']), f(v['growth']), f(v['allowed']),
            v['slope_per_migration'] / scale,
            'yes' if v['flat'] else 'NO'))
    for role, files in sorted(result['leftovers'].items()):
        lines.append('left on host %s: %s'
                     % (role, ', '.join(files) if files else 'nothing'))
    lines.append('verdict: %s' % ('PASS' if result['ok'] else 'FAIL'))
    return '\n'.join(lines)


def parse_size(text):
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    t = text.strip().upper().rstrip('B').rstrip('I')
    mult = units.get(t[-1:], 1)
    value = int(float(t[:-1] if t[-1:] in units else t) * mult)
    if value <= 0 or value % (2 * MiB):
        raise argparse.ArgumentTypeError(
            'disk size %r must be a positive multiple of 2 MiB' % text)
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--migrations', type=int, default=100,
                   help='migrations, back and forth (default 100)')
    p.add_argument('--disks', default='64M,96M',
                   help='the two disks\' sizes (default 64M,96M)')
    p.add_argument('--rate', type=int, default=300,
                   help='guest I/Os a second (default 300)')
    p.add_argument('--read-ratio', type=float, default=0.5,
                   help='reads per write of the guest (default 0.5)')
    p.add_argument('--fill', type=float, default=0.5,
                   help='fraction of each disk the guest writes first')
    p.add_argument('--timeout', type=float, default=300,
                   help='seconds one migration may take')
    p.add_argument('--workdir', help='parent folder of the scratch folder')
    p.add_argument('--json', metavar='OUT', help='write every record to OUT')
    p.add_argument('--keep', action='store_true',
                   help='keep the scratch folder')
    p.add_argument('--quiet', action='store_true',
                   help='no progress on stderr')
    args = p.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.disks.split(',')]
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    if len(sizes) != 2:
        p.error('--disks takes two sizes, e.g. 64M,96M')
    if args.migrations < 4:
        p.error('--migrations must be at least 4 to judge flatness')
    root = tempfile.mkdtemp(prefix='xsm-soak-', dir=args.workdir)

    def log(line):
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    soak = Soak(root, args.migrations, sizes, args.rate, args.read_ratio,
                args.fill, args.timeout, log)
    status = 1
    try:
        try:
            soak.start()
            result = soak.run()
        except SoakError as exc:
            print('soak: FAIL: %s' % exc, file=sys.stderr)
            result = None
        finally:
            soak.stop()
        if result is not None:
            print(format_summary(result))
            status = 0 if result['ok'] else 1
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'machine': {'cpus': os.cpu_count(),
                                       'load': os.getloadavg(),
                                       'python': platform.python_version()},
                           'args': vars(args), 'summary': result,
                           'records': soak.records}, f, indent=1)
    finally:
        if args.keep:
            print('kept %s' % root, file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
