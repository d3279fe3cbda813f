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

"""Live migrations between two agents: throughput, latency, downtime, memory.

Five measurements, each case repeated ``--runs`` times and reported as
medians with every run beside them:

``copy``
   Two real ``xsm-agent`` processes (``python -m xsm_driver.cmd.agent``)
   on RabbitMQ, each with its own vhd SR, migrate a running VM back and
   forth.  Its one disk is ``dense`` (``--dense``, default 4 GiB, every
   block written) or ``sparse`` (``--sparse`` virtual, default 64 GiB, of
   which ``--alloc``, default 1 GiB, is written in ``--run``-sized runs at
   seeded random places).  The data is seeded random bytes written by this
   benchmark into the VM's VDI file with our VHD code while the VM is
   halted; a copy of that file is the peer's source.  Each disk migrates
   ``idle`` (the VM runs, no guest I/O) and ``loaded`` (the verifying guest
   of :mod:`xsm_driver.core.migration.workload` writes ``--load-rate``
   random 4 KiB blocks a second, no reads).  Throughput = ``bytes_copied``
   / copy-phase seconds; the copy phase is timed by polling
   ``migration_get`` every ``--poll`` seconds: each poll is timed at the
   middle of its round trip on this process's clock, and each phase change
   is placed midway between the two polls that saw it (the engine's own
   ``progress.elapsed_s`` at the last poll of the copy is kept in the JSON
   as a cross-check).  Interleaved with the idle runs, the
   peer: ``nbdcopy --destination-is-zero --flush`` from ``qemu-nbd -f vpc``
   serving the same VHD to ``qemu-nbd -f raw`` serving a new empty file of
   the same size, both with TLS and client certificates.  ``ratio`` = ours
   / peer (issue 18's target: >= 3).  CPU (user, system) of both agents,
   of both qemu-nbd and of nbdcopy is read from ``/proc`` and ``wait4``; CPU
   seconds per GiB: both agents over the whole migration per
   ``bytes_copied``, nbdcopy + both qemu-nbd per allocated byte.  Before
   and after the copies, ``fio`` writes as many bytes as the dense disk
   with O_DIRECT, sequentially, into a new file in agent b's SR folder:
   the disk's own ceiling (``--no-fio``: not measured).

``multidisk``
   A VM with ``--multi-disks`` (default 8) dense disks of ``--dense`` / N
   each, and a VM with one dense disk of ``--dense`` (the same bytes),
   both idle, migrate back and forth, interleaved; the aggregate rate
   (``bytes_copied`` / copy phase) of the N disks over the one disk's.

``memory``
   ``VmHWM`` of each agent process after each group of migrations; the
   agents are restarted before each group (with ``--no-restart-agents``
   the peak is reset instead by writing 5 to ``/proc/PID/clear_refs``);
   ``VmRSS`` after every migration; issue 18's target: < 128 MiB whatever
   the disk size.

``downtime``
   A small VM (``--small``, guest filling ``--small-fill`` of it, then
   writing ``--load-rate`` blocks a second and reading each back,
   verifying) switches over ``--switchovers`` times between the two agents
   on RabbitMQ; ``downtime_ms`` of each status; p50/p99 by nearest rank
   (issue 18's target: p99 <= 20 ms); the guest's disk is verified at the
   end.  The big migrations of ``copy`` give the downtime of big disks.

``latency``
   The latency histogram of a disk's ``Counter`` filter is not exposed over
   RPC, so the source runs in this process: both hosts on ``fake://``, and
   then an in-process source on RabbitMQ with agent process b as the
   destination.  The dense disk, the guest writing ``--load-rate`` blocks a
   second.  Guest write latency p50/p99 from deltas of
   ``Counter.stats()['latency_us_histogram']`` (powers of two of us) over
   four windows: no migration (``--latency-window`` s); no migration just
   after ``vm_snapshot`` (a new empty leaf, like the one a migration's
   snapshot makes); the copy phase of a migration (mirror on, exact phase
   times from ``Manager.phase_hook``); and ``--latency-window`` s of the
   copy phase of another migration whose copy is held to ``--throttle``
   bytes/s (the mirror nearly alone), after which ``force_complete`` lifts
   the limit.

Run ``python benchmarks/migration_bench.py --help``; see
``benchmarks/README.rst``.
"""

import argparse
import collections
import contextlib
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
for _p in (TOP, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)
import _common  # noqa: E402
# the agents and hosts, as the functional tests start them
from xsm_driver.testing import harness  # noqa: E402

median = _common.median
nearest_rank = _common.nearest_rank
free_port = _common.free_port
tool_version = _common.tool_version
hist_percentile = _common.hist_percentile

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 2 * MiB
UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
FULL = {'dense': '4G', 'sparse': '64G', 'alloc': '1G', 'run': '64M'}
RABBIT_URL = harness.RABBIT_URL
TARGETS = _common.TARGETS_18
PHASES = ('preflight', 'prepare-receive', 'mirror', 'snapshot', 'copy',
          'compose', 'switch-over', 'clean-up', 'done')
CASES = ('copy', 'multidisk', 'downtime', 'latency')
START_TIMEOUT = 60
MIGRATION_TIMEOUT = 1800
READY_TIMEOUT = 30.0


def parse_size(text):
    text = text.strip().upper().rstrip('B').rstrip('I')
    unit = text[-1:] if text[-1:] in UNITS else ''
    value = int(float(text[:len(text) - len(unit)]) * UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError('sizes must be positive')
    return value


def round_block(n):
    return max(BLOCK, int(n) // BLOCK * BLOCK)


def human(n):
    for unit, size in (('GiB', GiB), ('MiB', MiB), ('KiB', 1024)):
        if n >= size:
            return '%.4g %s' % (n / size, unit)
    return '%d B' % n


# -- /proc --------------------------------------------------------------------

def proc_status_kib(pid, key):
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm(pid):
    """Reset a process's peak RSS to its current RSS (Linux >= 4.0)."""
    try:
        with open('/proc/%d/clear_refs' % pid, 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def cpu_times(pid):
    """(user, system) CPU seconds of a live process, all its threads."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return (0.0, 0.0)
    tick = os.sysconf('SC_CLK_TCK')
    return (int(fields[11]) / tick, int(fields[12]) / tick)


def cpu_delta(before, after):
    return (round(after[0] - before[0], 2), round(after[1] - before[1], 2))


def cpu_per_gib(cpus, nbytes):
    """CPU seconds (user + system, summed over ``cpus``) per GiB (pure).

    :param cpus: ``(user, system)`` pairs, one per process.
    :param nbytes: the bytes those processes moved.
    :returns: seconds per GiB, or None without bytes.
    """
    if not nbytes:
        return None
    return round(sum(u + s for u, s in cpus) / (nbytes / GiB), 3)


def filesystem_of(path):
    """``(mount point, type, device)`` of the file system holding path."""
    path = os.path.realpath(path)
    best = None
    try:
        with open('/proc/mounts') as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace('\\040', ' ')
                if (path == mnt or path.startswith(mnt.rstrip('/') + '/')) \
                        and (best is None or len(mnt) >= len(best[0])):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return best


# -- the disk's own ceiling: fio ----------------------------------------------

FIO_BS = '2M'
FIO_IODEPTH = 8


def fio_argv(path, size):
    """fio: O_DIRECT sequential writes of ``size`` bytes into a new file.

    No preallocation (``--fallocate=none``): the blocks are allocated as
    they are written, as a migration's destination image allocates them;
    ``--end_fsync=1`` counts the final flush, as our copy's does.
    """
    return ['fio', '--name=ceiling', '--filename=%s' % path, '--rw=write',
            '--bs=%s' % FIO_BS, '--size=%d' % size, '--direct=1',
            '--ioengine=libaio', '--iodepth=%d' % FIO_IODEPTH,
            '--fallocate=none', '--end_fsync=1', '--output-format=json']


def parse_fio(text):
    """Bytes written, seconds and bytes/s of fio's JSON (pure).

    fio may print warnings before its JSON object; they are skipped.
    """
    start = text.find('{')
    if start < 0:
        raise ValueError('no JSON in fio\'s output: %r' % text[-500:])
    job = json.loads(text[start:])['jobs'][0]
    if job.get('error'):
        raise ValueError('fio job error %s' % job['error'])
    write = job['write']
    if not write.get('io_bytes') or not write.get('runtime'):
        raise ValueError('fio wrote nothing: %r' % write)
    return {'bytes': write['io_bytes'],
            'seconds': write['runtime'] / 1000.0,
            'bytes_per_s': write['bw_bytes']}


# -- latency histograms ---------------------------------------------------

def hist_delta(after, before):
    return [a - b for a, b in zip(after, before)]


# -- processes ----------------------------------------------------------------

def run_cmd(argv, timeout=None):
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout)
    out = proc.stdout.decode('utf-8', 'replace')
    if proc.returncode:
        raise ToolFailed('%s exited %d:\n%s'
                         % (' '.join(argv), proc.returncode, out[-2000:]))
    return out


def timed_cmd(argv):
    """Run a tool; (wall seconds, user CPU, system CPU) from wait4."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise ToolFailed('%s exited %d:\n%s'
                         % (' '.join(argv), proc.returncode,
                            out.decode('utf-8', 'replace')[-2000:]))
    return took, usage.ru_utime, usage.ru_stime


def code_version():
    """Which xsm_driver ran: its folder, git commit and local changes."""
    import xsm_driver
    top = os.path.dirname(os.path.dirname(os.path.abspath(
        xsm_driver.__file__)))
    out = {'xsm_driver': top, 'benchmark': TOP}
    for key, argv in (('commit', ['git', 'rev-parse', 'HEAD']),
                      ('changed', ['git', 'status', '--porcelain', '-uno'])):
        try:
            res = subprocess.run(argv, cwd=top, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, timeout=10)
            out[key] = res.stdout.decode().split('\n') if key == 'changed' \
                else res.stdout.decode().strip()
        except (OSError, subprocess.TimeoutExpired):
            out[key] = None
    if out.get('changed') is not None:
        out['changed'] = [x for x in out['changed'] if x]
    return out


#: ``[agent]`` options of the benchmark's agents, over the harness's (the
#: engine's own defaults: no ``copy_chunk_mb = 1`` of the tests)
AGENT_OPTIONS = {}
#: ``[DEFAULT]`` options of the benchmark's agents: a whole-disk check is
#: one call
AGENT_DEFAULTS = {'rpc_response_timeout': 120}
#: seconds an agent may take to stop on SIGTERM
STOP_TIMEOUT = 30


class QemuNBD:
    """A ``qemu-nbd`` process with TLS (client certificates demanded)."""

    def __init__(self, image, fmt, pki, read_only, log, connections=4):
        self.port = free_port()
        self.uri = ('nbds://127.0.0.1:%d/?tls-certificates=%s'
                    % (self.port, pki))
        self.argv = ['qemu-nbd', '--object',
                     'tls-creds-x509,id=tls0,endpoint=server,dir=%s' % pki,
                     '--tls-creds', 'tls0', '-f', fmt, '-t', '-e',
                     str(connections), '-p', str(self.port), '-x', '']
        if read_only:
            self.argv.append('-r')
        self.argv.append(image)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise ToolFailed('%s exited %d' % (' '.join(self.argv),
                                                   self.proc.returncode))
            probe = subprocess.run(['nbdinfo', '--size', self.uri],
                                   stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ToolFailed('%s not serving' % ' '.join(self.argv))
            time.sleep(0.05)
        probe = subprocess.run(['nbdinfo', '--can', 'multi-conn', self.uri],
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        self.multi_conn = probe.returncode == 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- data ---------------------------------------------------------------------

def write_runs(path, runs, seed):
    """Write seeded random 2 MiB pieces at ``runs`` into a VHD leaf."""
    from xsm_driver.core.vhd import chain as vhd_chain
    rng = random.Random(seed)
    with vhd_chain.Chain(path, writable=True) as c:
        for start, length in runs:
            for off in range(start, start + length, BLOCK):
                c.pwrite(rng.randbytes(BLOCK), off)
        c.flush()
    with vhd_chain.Chain(path) as c:
        return sum(n for _o, n, a in c.extents(0, c.size) if a)


def compare_chains(golden, migrated, piece=4 * MiB):
    """Same virtual disk? Compares where either one has data."""
    from xsm_driver.core.block import backends
    a, b = backends.VHDDevice(golden), backends.VHDDevice(migrated)
    try:
        if a.size != b.size:
            return 'sizes differ: %d, %d' % (a.size, b.size)
        # flags: device.HOLE (1) unset means data is there
        spans = sorted([(o, o + n) for o, n, fl in a.extents(0, a.size)
                        if not fl & 1] + [(o, o + n) for o, n, fl in
                                          b.extents(0, b.size)
                                          if not fl & 1])
        merged = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        checked = 0
        for s, e in merged:
            for off in range(s, e, piece):
                n = min(piece, e - off)
                if a.pread(off, n) != b.pread(off, n):
                    return 'data differs in [%d, %d)' % (off, off + n)
                checked += n
        return None if checked else 'nothing to compare'
    finally:
        a.close()
        b.close()


def phase_spans(polls):
    """Phase durations from ``(phase, seconds)`` polls, in order.

    A change between two polls is placed midway between them; phases not
    seen in any poll get a zero span and are listed in ``unseen``.
    :returns: ``(durations, unseen, gaps)``; ``gaps[phase]`` is the
        ``[start, end]`` distance between the two polls around each end
        of that phase (its uncertainty).
    """
    spans, gaps = {}, {}
    unseen = []
    for (p0, e0), (p1, e1) in zip(polls, polls[1:]):
        if p0 == p1:
            continue
        mid, gap = (e0 + e1) / 2.0, e1 - e0
        spans.setdefault(p0, [None, None])[1] = mid
        gaps.setdefault(p0, [None, None])[1] = round(gap, 4)
        spans.setdefault(p1, [None, None])[0] = mid
        gaps.setdefault(p1, [None, None])[0] = round(gap, 4)
        if p0 in PHASES and p1 in PHASES:
            for ph in PHASES[PHASES.index(p0) + 1:PHASES.index(p1)]:
                spans[ph] = [mid, mid]
                gaps[ph] = [round(gap, 4)] * 2
                unseen.append(ph)
    out = {ph: round(e - s, 4) for ph, (s, e) in spans.items()
           if s is not None and e is not None}
    return out, unseen, gaps


# -- the benchmark ------------------------------------------------------------

class Bench:

    def __init__(self, args):
        self.args = args
        self.dir = args.workdir
        self.pki = os.path.join(self.dir, 'pki')
        self.token = uuidlib.uuid4().hex[:10]
        self.exchange = harness.run_names('bench', 'bench',
                                          self.token).exchange
        self.deployment = None
        self.agents = {}
        self.clients = {}
        self.transport = None
        self.copy_results = []      # one dict per (disk, load, side) case
        self.memory = []
        self.downtime = None
        self.latency = None
        self.fio = None             # the disk's ceiling (disk_ceiling)
        self.multidisk = None       # case_multidisk
        self.images = {}
        self.notes = []
        self.profile_text = None
        self._logs = []
        self._qemu = []
        self.extra_queues = []
        self.rss_trace = []         # (label, {role: VmRSS KiB}) per migration
        self.rss_label = None

    def log(self, msg):
        if not self.args.quiet:
            print('[%s] %s' % (time.strftime('%H:%M:%S'), msg),
                  file=sys.stderr, flush=True)

    def path(self, *names):
        return os.path.join(self.dir, *names)

    # -- agents on RabbitMQ ----------------------------------------------

    def start_agents(self):
        names = harness.run_names('bench', 'bench', self.token)
        agents = {}
        for role in ('a', 'b'):
            folder = self.path('host-' + role)
            sr = 'sr-' + role
            agents[role] = harness.AgentProcess(
                names.hosts[role], folder,
                {sr: ('vhd', os.path.join(folder, sr))}, self.exchange,
                AGENT_OPTIONS, transport_url=self.args.rabbit,
                defaults=AGENT_DEFAULTS)
        self.deployment = harness.Deployment(
            self.dir, self.exchange, agents, rpc_timeout=300,
            transport_url=self.args.rabbit, start_timeout=START_TIMEOUT,
            stop_timeout=STOP_TIMEOUT)
        self.agents = self.deployment.agents
        self.clients = self.deployment.clients
        self.deployment.start()
        self.transport = self.deployment.transport
        self.log('agents %s (pid %d) and %s (pid %d) ready on %s, exchange '
                 '%s' % (self.agents['a'].name, self.agents['a'].pid,
                         self.agents['b'].name, self.agents['b'].pid,
                         self.args.rabbit, self.exchange))

    def restart_agents(self, why):
        """Fresh agent processes, so that a group's VmHWM is its own.

        A VM that was running comes back halted (see host.py); the caller
        starts it again.
        """
        if not self.args.restart_agents:
            return
        self.deployment.restart()
        self.log('agents restarted (%s): pids %d, %d'
                 % (why, self.agents['a'].pid, self.agents['b'].pid))

    def stop_agents(self):
        if self.deployment is not None:
            self.deployment.extra_queues = self.extra_queues
            self.deployment.close()

    def agent_logs(self):
        return ''.join('\n--- %s stderr (tail) ---\n%s'
                       % (a.name, a.tail(30))
                       for a in self.agents.values())

    @staticmethod
    def other(role):
        return 'b' if role == 'a' else 'a'

    def migrate(self, role, vm, poll=None):
        """Migrate ``vm`` from host ``role`` to the other; poll to the end."""
        poll = self.args.poll if poll is None else poll
        src, dst = self.clients[role], self.other(role)
        info = src.vm_get(vm)
        vdi_map = {d['vdi']: 'sr-' + dst for d in info['disks']}
        os.sync()
        pids = {r: a.pid for r, a in self.agents.items()}
        cpu0 = {r: cpu_times(p) for r, p in pids.items()}
        t0 = time.monotonic()
        mid = src.migrate_vm(vm, self.agents[dst].name, vdi_map,
                             {'net0': 'net0'})
        polls = []
        deadline = t0 + MIGRATION_TIMEOUT
        aborted = None
        engine = []
        while True:
            sent = time.monotonic()
            st = src.migration_get(mid)
            # each poll is timed at the middle of its round trip, on this
            # process's clock (the engine's progress clock restarts when
            # the copy begins)
            polls.append((st['phase'], (sent + time.monotonic()) / 2 - t0))
            if st['phase'] == 'copy':
                engine.append((st['progress']['done'],
                               st['progress']['elapsed_s']))
            if st.get('finished') is not None:
                break
            free = shutil.disk_usage(self.dir).free
            if aborted is None and free < self.args.min_free and \
                    st['phase'] in PHASES[:PHASES.index('switch-over')]:
                # the disk may be shared: do not fill it up
                aborted = ('%s free < --min-free %s in phase %s'
                           % (human(free), human(self.args.min_free),
                              st['phase']))
                self.log('aborting migration %s: %s' % (mid, aborted))
                with contextlib.suppress(Exception):
                    src.migration_abort(mid)
            if time.monotonic() > deadline:
                raise RuntimeError('migration %s not done after %d s: %s%s'
                                   % (mid, MIGRATION_TIMEOUT, st,
                                      self.agent_logs()))
            time.sleep(poll)
        wall = time.monotonic() - t0
        cpu1 = {r: cpu_times(p) for r, p in pids.items()}
        rss = {r: proc_status_kib(p, 'VmRSS') for r, p in pids.items()}
        if st['phase'] != 'done':
            raise MigrationFailed('migration %s from %s ended in phase %s: '
                                  '%s%s%s' % (
                                      mid, role, st['phase'], st['error'],
                                      ' (the benchmark aborted it: %s)'
                                      % aborted if aborted else '',
                                      '' if aborted else self.agent_logs()))
        spans, unseen, gaps = phase_spans(polls)
        copy_s = spans.get('copy')
        res = {'id': mid, 'from': role, 'to': dst,
               'bytes_copied': st['bytes_copied'],
               'copy_seconds': copy_s,
               'copy_boundary_poll_gaps_s': gaps.get('copy'),
               'copy_seen_in_polls': 'copy' not in unseen,
               # the engine's own view at the last poll of the copy phase:
               # bytes done and seconds since its progress clock started
               'engine_last_copy_poll': engine[-1] if engine else None,
               'throughput_bytes_per_s': (
                   st['bytes_copied'] / copy_s if copy_s else None),
               'migration_seconds': round(wall, 3),
               'phase_seconds': spans, 'polls': len(polls),
               'poll_trace': [(ph, round(e, 4)) for ph, e in polls],
               'unseen_phases': unseen,
               'downtime_ms': st['downtime_ms'],
               'switch_over_steps_ms': st.get('switch_over_steps_ms'),
               'guest_writes_during_migration':
                   st['guest_writes_during_migration'],
               'cpu_source': cpu_delta(cpu0[role], cpu1[role]),
               'cpu_destination': cpu_delta(cpu0[dst], cpu1[dst]),
               'rss_after_kib': rss}
        # both agents, the whole migration (the polls above included)
        res['cpu_s_per_GiB'] = cpu_per_gib(
            [res['cpu_source'], res['cpu_destination']], st['bytes_copied'])
        self.rss_trace.append((self.rss_label, rss))
        return res

    def vm_disk_path(self, role, vm, index=0):
        info = self.clients[role].vm_get(vm)
        vdi = info['disks'][index]['vdi']
        return os.path.join(self.agents[role].sr_path('sr-' + role),
                            vdi + '.vhd')

    # -- case 1: copy throughput ---------------------------------------

    def disk_layouts(self):
        a = self.args
        slots = a.sparse // a.run
        rng = random.Random(a.seed + 2)
        picked = sorted(rng.sample(range(slots), a.alloc // a.run))
        return [('dense', a.dense, [(0, a.dense)], a.seed + 1),
                ('sparse', a.sparse, [(i * a.run, a.run) for i in picked],
                 a.seed + 3)]

    def make_vm(self, name, size, runs, seed):
        """A running VM on host a whose disk holds seeded data.

        A copy of its VHD (the golden image) is the peer's source.
        """
        a = self.clients['a']
        vm = a.vm_create(name, [{'sr': 'sr-a', 'size': size}],
                         vifs=['net0'])['uuid']
        path = self.vm_disk_path('a', vm)
        t = time.perf_counter()
        allocated = write_runs(path, runs, seed)
        golden = self.path('%s.golden.vhd' % name)
        shutil.copyfile(path, golden)
        self.log('%s: %s virtual, %s written in %d runs (%.1f s), golden '
                 'copy %s' % (name, human(size), human(allocated), len(runs),
                              time.perf_counter() - t, golden))
        a.vm_start(vm)
        self.images[name] = {'size': size, 'allocated': allocated,
                             'runs': len(runs), 'golden': golden}
        return vm

    def peer_copy(self, name, src):
        """nbdcopy from the golden export into a new empty file's export."""
        info = self.images[name]
        out = self.path('peer-out.raw')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        with open(out, 'wb') as f:
            f.truncate(info['size'])
        log = open(self.path('qemu-nbd-dst.log'), 'ab')
        self._logs.append(log)
        dst = QemuNBD(out, 'raw', self.pki, False, log)
        self._qemu.append(dst)
        argv = ['nbdcopy', '--destination-is-zero', '--flush', src.uri,
                dst.uri]
        try:
            os.sync()
            c_src, c_dst = cpu_times(src.proc.pid), cpu_times(dst.proc.pid)
            took, user, sys_ = timed_cmd(argv)
            res = {'side': 'peer', 'seconds': round(took, 3),
                   'bytes': info['allocated'],
                   'throughput_bytes_per_s': info['allocated'] / took,
                   'cpu_nbdcopy': (round(user, 2), round(sys_, 2)),
                   'cpu_qemu_nbd_source': cpu_delta(
                       c_src, cpu_times(src.proc.pid)),
                   'cpu_qemu_nbd_destination': cpu_delta(
                       c_dst, cpu_times(dst.proc.pid)),
                   'multi_conn': [src.multi_conn, dst.multi_conn]}
            res['cpu_s_per_GiB'] = cpu_per_gib(
                [res['cpu_nbdcopy'], res['cpu_qemu_nbd_source'],
                 res['cpu_qemu_nbd_destination']], info['allocated'])
            if not self.images[name].get('peer_checked'):
                out_txt = run_cmd(['qemu-img', 'compare', '-f', 'vpc', '-F',
                                   'raw', info['golden'], out])
                self.images[name]['peer_checked'] = out_txt.strip()
        finally:
            dst.stop()
            self._qemu.remove(dst)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out)
        res['argv'] = argv
        self.peer_argv = (src.argv, dst.argv, argv)
        return res

    def hwm(self):
        return {r: proc_status_kib(a.pid, 'VmHWM')
                for r, a in self.agents.items()}

    def reset_hwms(self):
        return all(reset_hwm(a.pid) for a in self.agents.values())

    def record_memory(self, group, reset_ok):
        peak = self.hwm()
        rss = {r: proc_status_kib(a.pid, 'VmRSS')
               for r, a in self.agents.items()}
        self.memory.append({'group': group, 'peak_kib': peak,
                            'rss_kib': rss, 'reset_before': reset_ok})
        self.log('memory after %s: VmHWM a %.1f MiB, b %.1f MiB'
                 % (group, peak['a'] / 1024, peak['b'] / 1024))

    def check_space(self, need, what, wait=120):
        """Free space of the scratch folder's file system, >= ``need``.

        The disk may be shared: when it is short, wait up to ``wait``
        seconds for others to free it, then give up with SpaceError.
        """
        deadline = time.monotonic() + wait
        free = shutil.disk_usage(self.dir).free
        waited = False
        while free < need:
            if time.monotonic() > deadline:
                raise SpaceError('%s: %s has %s free, %s needed; use a '
                                 'smaller --scale or another --workdir'
                                 % (what, self.dir, human(free),
                                    human(need)))
            if not waited:
                self.log('%s: only %s free, %s needed; waiting up to %d s'
                         % (what, human(free), human(need), wait))
                waited = True
            time.sleep(2)
            free = shutil.disk_usage(self.dir).free
        if waited:
            self.notes.append('%s: waited for free space (others use this '
                              'disk)' % what)
        return free

    def one_idle(self, side, name, vm, where, src):
        if side == 'peer':
            return self.peer_copy('bench-' + name, src)
        res = self.migrate(where, vm)
        res['side'] = 'ours'
        if not self.images['bench-' + name].get('verified'):
            self.verify_moved(name, vm, res['to'])
        return res

    def disk_ceiling(self, when):
        """fio's O_DIRECT sequential write rate where the SRs are.

        Into agent b's SR folder (the first migration's destination; both
        SRs are in the same scratch folder, on one file system), as many
        bytes as the dense disk; the file is removed after.
        """
        path = os.path.join(self.agents['b'].sr_path('sr-b'),
                            'fio-ceiling.dat')
        size = self.args.dense
        self.check_space(size + GiB, 'before fio')
        argv = fio_argv(path, size)
        os.sync()
        try:
            out = run_cmd(argv, timeout=600)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        res = dict(parse_fio(out), when=when)
        if self.fio is None:
            self.fio = {'argv': argv, 'directory': os.path.dirname(path),
                        'filesystem': filesystem_of(path), 'runs': []}
        self.fio['runs'].append(res)
        self.fio['median_bytes_per_s'] = median(
            r['bytes_per_s'] for r in self.fio['runs'])
        self.log('fio %s: O_DIRECT sequential write %.1f MB/s (%s in '
                 '%.2f s)' % (when, res['bytes_per_s'] / 1e6,
                              human(res['bytes']), res['seconds']))
        return res

    def case_copy(self):
        a = self.args
        if a.fio:
            self.disk_ceiling('before the copies')
        self._case_copy()
        if a.fio:
            self.disk_ceiling('after the copies')

    def _case_copy(self):
        a = self.args
        for name, size, runs, seed in self.disk_layouts():
            data = sum(n for _o, n in runs)
            self.check_space(3 * data + 2 * GiB, 'before the %s disk' % name)
            self.restart_agents('before the %s disk' % name)
            vm = self.make_vm('bench-' + name, size, runs, seed)
            self.rss_label = '%s idle' % name
            where = 'a'
            log = open(self.path('qemu-nbd-src.log'), 'ab')
            self._logs.append(log)
            src = QemuNBD(self.images['bench-' + name]['golden'], 'vpc',
                          self.pki, True, log)
            self._qemu.append(src)
            ours, peer = [], []
            reset_ok = self.reset_hwms()
            try:
                for rep in range(a.warmup + a.runs):
                    timed = rep >= a.warmup
                    order = ('ours', 'peer') if rep % 2 == 0 else \
                        ('peer', 'ours')
                    for side in order:
                        self.check_space(2 * data + GiB,
                                         'before a %s run' % name)
                        try:
                            res = self.one_idle(side, name, vm, where, src)
                        except (MigrationFailed, ToolFailed) as exc:
                            self.notes.append('%s idle %s run failed: %s'
                                              % (name, side, exc))
                            self.log(self.notes[-1])
                            continue
                        if side == 'ours':
                            where = res['to']
                        if timed:
                            (ours if side == 'ours' else peer).append(res)
                        self.log('%s idle %s%s: %s' % (
                            name, side, '' if timed else ' (warm-up)',
                            self.describe(res)))
            finally:
                src.stop()
                self._qemu.remove(src)
            self.record_memory('%s idle' % name, reset_ok)
            self.copy_results.append(self.summarise(name, 'idle', 'ours',
                                                    ours))
            self.copy_results.append(self.summarise(name, 'idle', 'peer',
                                                    peer))
            if a.load_rate:
                where = self.loaded_runs(name, vm, where)
            t = time.perf_counter()
            self.clients[where].vm_destroy(vm)
            left = self.clients['a'].vdi_list() + \
                self.clients['b'].vdi_list()
            if left:
                self.notes.append('%s: %d VDIs left after vm_destroy'
                                  % (name, len(left)))
            self.log('%s: VM destroyed (%.1f s)' % (name,
                                                    time.perf_counter() - t))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.images['bench-' + name]['golden'])

    def loaded_runs(self, name, vm, where):
        """The guest writes 4 KiB blocks at random, no reads; migrate."""
        a = self.args
        if a.restart_agents:
            self.restart_agents('before the loaded %s runs' % name)
            self.clients[where].vm_start(vm)
        reset_ok = self.reset_hwms()
        self.rss_label = '%s loaded' % name
        loaded = []
        self.clients[where].guest_start(vm, rate=a.load_rate,
                                        read_ratio=0.0)
        for rep in range(a.warmup + a.runs):
            # each guest write may allocate a 2 MiB block on both sides
            try:
                self.check_space(a.min_free + 2 * a.dense,
                                 'before a loaded %s migration' % name,
                                 wait=30)
            except SpaceError as exc:
                self.notes.append(str(exc))
                self.log(str(exc))
                break
            try:
                res = self.migrate(where, vm)
            except MigrationFailed as exc:
                self.notes.append('%s loaded run failed: %s' % (name, exc))
                self.log(self.notes[-1])
                continue
            res['side'] = 'ours'
            where = res['to']
            res['guest_writes_per_s'] = round(
                res['guest_writes_during_migration'] /
                res['migration_seconds'], 1)
            res['sr_physical_bytes'] = self.sr_physical(where)
            if rep >= a.warmup:
                loaded.append(res)
            self.log('%s loaded ours: %s, guest %.0f writes/s, SR %s now %s '
                     'on disk' % (name, self.describe(res),
                                  res['guest_writes_per_s'], where,
                                  human(res['sr_physical_bytes'])))
        self.record_memory('%s loaded' % name, reset_ok)
        self.copy_results.append(self.summarise(name, 'loaded', 'ours',
                                                loaded))
        return where

    def sr_physical(self, role):
        total = 0
        path = self.agents[role].sr_path('sr-' + role)
        for entry in os.scandir(path):
            if entry.is_file():
                total += entry.stat().st_blocks * 512
        return total

    def verify_moved(self, name, vm, role):
        """Untimed: the migrated chain reads as the golden image."""
        info = self.images['bench-' + name]
        t = time.perf_counter()
        problem = compare_chains(info['golden'], self.vm_disk_path(role, vm))
        info['verified'] = problem or 'identical'
        self.log('%s: first migrated copy vs golden: %s (%.1f s)'
                 % (name, info['verified'], time.perf_counter() - t))
        if problem:
            self.notes.append('%s: migrated disk differs from its source: '
                              '%s' % (name, problem))

    @staticmethod
    def describe(res):
        if res['side'] == 'peer':
            return '%.1f MB/s (%.2f s)' % (
                res['throughput_bytes_per_s'] / 1e6, res['seconds'])
        tp = res['throughput_bytes_per_s']
        return '%s MB/s, copy %.2f s of %.2f s, %s, downtime %s ms' % (
            '%.1f' % (tp / 1e6) if tp else '?', res['copy_seconds'] or 0,
            res['migration_seconds'], human(res['bytes_copied']),
            res['downtime_ms'])

    @staticmethod
    def summarise(disk, load, side, runs):
        out = {'disk': disk, 'load': load, 'side': side, 'runs': runs}
        tps = [r['throughput_bytes_per_s'] for r in runs]
        out['median_throughput_bytes_per_s'] = median(tps)
        out['median_cpu_s_per_GiB'] = median(r.get('cpu_s_per_GiB')
                                             for r in runs)
        if side == 'ours':
            out['median_copy_seconds'] = median(r['copy_seconds']
                                                for r in runs)
            out['median_migration_seconds'] = median(
                r['migration_seconds'] for r in runs)
            out['median_bytes_copied'] = median(r['bytes_copied']
                                                for r in runs)
            out['median_downtime_ms'] = median(r['downtime_ms']
                                               for r in runs)
            phases = collections.defaultdict(list)
            for r in runs:
                for ph, s in r['phase_seconds'].items():
                    phases[ph].append(s)
            out['median_phase_seconds'] = {
                ph: median(v) for ph, v in phases.items()}
            for key in ('cpu_source', 'cpu_destination'):
                out['median_' + key] = (
                    median(r[key][0] for r in runs),
                    median(r[key][1] for r in runs)) if runs else None
        else:
            out['median_seconds'] = median(r['seconds'] for r in runs)
            for key in ('cpu_nbdcopy', 'cpu_qemu_nbd_source',
                        'cpu_qemu_nbd_destination'):
                out['median_' + key] = (
                    median(r[key][0] for r in runs),
                    median(r[key][1] for r in runs)) if runs else None
        return out

    # -- case 1b: the disks of one VM ---------------------------------------

    def make_multi_vm(self, name, count, size, seed):
        """A running VM on host a with ``count`` dense disks of ``size``."""
        a = self.clients['a']
        vm = a.vm_create(name, [{'sr': 'sr-a', 'size': size}] * count,
                         vifs=['net0'])['uuid']
        t = time.perf_counter()
        allocated = 0
        for i in range(count):
            allocated += write_runs(self.vm_disk_path('a', vm, i),
                                    [(0, size)], seed + i)
        self.log('%s: %d disk(s) of %s, %s written (%.1f s)'
                 % (name, count, human(size), human(allocated),
                    time.perf_counter() - t))
        a.vm_start(vm)
        return vm, allocated

    def case_multidisk(self):
        """One VM with ``--multi-disks`` disks beside one with one disk.

        The same bytes in both: the one disk is as big as the dense disk
        (``--dense``), each of the N disks an N-th of it. Both VMs idle,
        their migrations interleaved (order swapped every run); rate =
        ``bytes_copied`` / copy phase (all disks), as in the copy case.
        """
        a = self.args
        n = a.multi_disks
        per = round_block(a.dense // n)
        self.check_space(4 * per * n + 2 * GiB, 'before the %d-disk VM' % n)
        self.restart_agents('before the %d-disk VM' % n)
        shapes = (('1 disk', 1, per * n), ('%d disks' % n, n, per))
        vms, where, runs, allocated = {}, {}, {}, {}
        for i, (label, count, size) in enumerate(shapes):
            vms[label], allocated[label] = self.make_multi_vm(
                'bench-multi-%d' % count, count, size, a.seed + 100 * (i + 1))
            where[label] = 'a'
            runs[label] = []
        reset_ok = self.reset_hwms()
        self.rss_label = 'multidisk'
        for rep in range(a.warmup + a.runs):
            order = shapes if rep % 2 == 0 else shapes[::-1]
            for label, _count, _size in order:
                try:
                    res = self.migrate(where[label], vms[label])
                except MigrationFailed as exc:
                    self.notes.append('multidisk %s run failed: %s'
                                      % (label, exc))
                    self.log(self.notes[-1])
                    continue
                res['side'] = 'ours'
                where[label] = res['to']
                if res['bytes_copied'] != allocated[label]:
                    self.notes.append(
                        'multidisk %s: %d bytes copied, %d allocated'
                        % (label, res['bytes_copied'], allocated[label]))
                if rep >= a.warmup:
                    runs[label].append(res)
                self.log('multidisk %s%s: %s' % (
                    label, '' if rep >= a.warmup else ' (warm-up)',
                    self.describe(res)))
        group = '%d-disk and 1-disk VMs' % n
        self.record_memory(group, reset_ok)
        for label, _count, _size in shapes:
            self.clients[where[label]].vm_destroy(vms[label])
        one = self.summarise('1 disk', 'idle', 'ours', runs['1 disk'])
        many = self.summarise('%d disks' % n, 'idle', 'ours',
                              runs['%d disks' % n])
        self.multidisk = {
            'disks': n, 'disk_size': per, 'one_disk_size': per * n,
            'one_disk': one, 'many_disks': many, 'memory_group': group,
            'ratio': _common.ratio(many['median_throughput_bytes_per_s'],
                                   one['median_throughput_bytes_per_s'])}
        self.log('multidisk: %d disks %s MB/s, 1 disk %s MB/s: %sx' % (
            n, *['%.1f' % (x / 1e6) if x else '-' for x in (
                many['median_throughput_bytes_per_s'],
                one['median_throughput_bytes_per_s'])],
            '%.2f' % self.multidisk['ratio']
            if self.multidisk['ratio'] else '-'))

    # -- case 3: downtime -------------------------------------------------

    def case_downtime(self):
        a = self.args
        self.restart_agents('before the downtime VM')
        c = self.clients['a']
        vm = c.vm_create('bench-small', [{'sr': 'sr-a', 'size': a.small}],
                         vifs=['net0'])['uuid']
        c.vm_start(vm)
        c.guest_start(vm, rate=a.load_rate or None, read_ratio=1.0,
                      fill=a.small_fill)
        reset_ok = self.reset_hwms()
        self.rss_label = 'small VM'
        where = 'a'
        runs = []
        for i in range(a.switchovers):
            res = self.migrate(where, vm, poll=min(self.args.poll, 0.05))
            where = self.other(where)
            runs.append(res)
            self.log('switch-over %d/%d (%s->%s): downtime %s ms, %s copied '
                     'in %.2f s' % (i + 1, a.switchovers, res['from'],
                                    res['to'], res['downtime_ms'],
                                    human(res['bytes_copied']),
                                    res['migration_seconds']))
        self.record_memory('small VM, %d switch-overs' % a.switchovers,
                           reset_ok)
        check = self.clients[where].guest_verify(vm)
        self.clients[where].vm_destroy(vm)
        ms = [r['downtime_ms'] for r in runs]
        self.downtime = {
            'size': a.small, 'fill': a.small_fill,
            'guest_rate': a.load_rate, 'runs': runs, 'downtime_ms': ms,
            'p50_ms': nearest_rank(ms, 50), 'p99_ms': nearest_rank(ms, 99),
            'max_ms': max(ms) if ms else None,
            'guest_verify': check}
        self.log('downtime: p50 %s ms, p99 %s ms; guest verified: %s '
                 '(%d writes, %d reads, error %s)'
                 % (self.downtime['p50_ms'], self.downtime['p99_ms'],
                    check.get('verified'), check.get('writes', 0),
                    check.get('reads', 0), check.get('error')))

    # -- case 2: latency, in-process -----------------------------------

    def inprocess_hosts(self, tag):
        """Two agents on ``fake://`` in this process."""
        from oslo_config import cfg
        from xsm_driver.core.rpc import api
        root = self.path('inproc-' + tag)
        transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
        agents, clients, names = {}, {}, {}
        for role in ('a', 'b'):
            name = '%s-%s' % (tag, role)
            agents[role] = self.inprocess_agent(transport, name, role, root)
            clients[role] = api.AgentAPI(transport, name, timeout=300)
            names[role] = name
        return root, transport, agents, clients, names

    @staticmethod
    def inprocess_agent(transport, name, role, root, identity=None):
        """Host ``name`` (SR ``sr-<role>``) and its agent, started."""
        sr = 'sr-' + role
        hosts = harness.LocalHosts(
            root, {name: {sr: ('vhd', os.path.join(root, name, sr))}},
            transport, identity=identity and (lambda _name: identity))
        return hosts.start().agents[name]

    def inprocess_migrate(self, agents, clients, names, role, vm,
                          hook=None, options=None, while_copying=None):
        """Migrate from an in-process agent; exact phase times.

        :param while_copying: ``while_copying(migration)``, called in this
            thread once the copy phase has begun.
        """
        dst = self.other(role)
        times = {}
        copying = threading.Event()
        seen = {}

        def phase_hook(mig, phase):
            times.setdefault(phase, time.monotonic())
            if hook is not None:
                hook(mig, phase)
            if phase == 'copy':
                seen['mig'] = mig
                copying.set()

        agents[role].manager.phase_hook = phase_hook
        info = clients[role].vm_get(vm)
        vdi_map = {d['vdi']: 'sr-' + dst for d in info['disks']}
        os.sync()
        t0 = time.monotonic()
        mid = clients[role].migrate_vm(vm, names[dst], vdi_map,
                                       {'net0': 'net0'}, **(options or {}))
        extra = None
        if while_copying is not None:
            if copying.wait(MIGRATION_TIMEOUT):
                extra = while_copying(seen['mig'])
        st = agents[role].manager.wait(mid, MIGRATION_TIMEOUT)
        wall = time.monotonic() - t0
        agents[role].manager.phase_hook = None
        if st['phase'] != 'done':
            raise MigrationFailed('in-process migration %s ended in phase '
                                  '%s: %s' % (mid, st['phase'], st['error']))
        copy_s = (times['compose'] - times['copy']
                  if 'compose' in times and 'copy' in times else None)
        return {'id': mid, 'from': role, 'to': dst, 'side': 'ours',
                'bytes_copied': st['bytes_copied'], 'copy_seconds': copy_s,
                'throughput_bytes_per_s': (st['bytes_copied'] / copy_s
                                           if copy_s else None),
                'migration_seconds': round(wall, 3),
                'downtime_ms': st['downtime_ms'],
                'guest_writes_during_migration':
                    st['guest_writes_during_migration'],
                'phase_seconds': {}, 'cpu_source': (0, 0),
                'cpu_destination': (0, 0), 'phase_times': times,
                'while_copying': extra}

    def throttled_window(self, agents, clients, names, role, vm):
        """Mirror latency while the copy is held to ``--throttle`` B/s.

        Once the window is over, ``force_complete`` lifts the limit; how
        long the copy then takes to speed up is recorded too.
        """
        a = self.args
        counter = agents[role].host.vm(vm).disks[0].counter
        out = {}

        def during(mig):
            time.sleep(1.0)
            h0 = counter.stats()['latency_us_histogram']
            d0 = mig.progress.done
            time.sleep(a.latency_window)
            h1 = counter.stats()['latency_us_histogram']
            d1 = mig.progress.done
            agents[role].manager.force_complete(mig.id)
            forced = time.monotonic()
            out['forced_at'] = forced
            hist = hist_delta(h1, h0)
            out.update(writes=sum(hist), histogram=hist,
                       p50=hist_percentile(hist, 50),
                       p99=hist_percentile(hist, 99),
                       copy_rate_in_window=(d1 - d0) / a.latency_window,
                       bytes_left_at_force_complete=mig.progress.total - d1)
            # when does the copy speed up? (first 4 MiB chunk after it)
            while mig.progress.done <= d1 + 2 * a.throttle and \
                    mig.phase == 'copy':
                time.sleep(0.01)
            out['force_complete_lag_s'] = round(time.monotonic() - forced, 3)
            return None

        res = self.inprocess_migrate(agents, clients, names, role, vm,
                                     options={'bandwidth': a.throttle},
                                     while_copying=during)
        out['migration_seconds'] = res['migration_seconds']
        out['downtime_ms'] = res['downtime_ms']
        compose = res['phase_times'].get('compose')
        if compose and 'forced_at' in out:
            out['force_complete_to_compose_s'] = round(
                compose - out['forced_at'], 3)
        out.pop('forced_at', None)
        return out

    def migrate_back(self, client, dest_name, vm, dest_sr):
        """Untimed: bring the VM back from an agent process."""
        info = client.vm_get(vm)
        mid = client.migrate_vm(vm, dest_name, {d['vdi']: dest_sr for d in
                                                info['disks']},
                                {'net0': 'net0'})
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            st = client.migration_get(mid)
            if st.get('finished') is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError('migration %s back not done: %s'
                                   % (mid, st))
            time.sleep(0.2)
        if st['phase'] != 'done':
            raise MigrationFailed('migration %s back ended in phase %s: %s'
                                  % (mid, st['phase'], st['error']))

    def case_latency(self):
        self.latency = {}
        modes = [('fake', 'both hosts in this process (fake://)')]
        if self.agents:
            modes.append(('rabbit', 'source in this process, destination '
                          'the agent process b (RabbitMQ)'))
        for mode, label in modes:
            self.log('latency: %s' % label)
            self.latency[label] = self.latency_mode(mode)

    def latency_mode(self, mode):
        from xsm_driver.core.rpc import api
        a = self.args
        transport = None
        if mode == 'fake':
            root, transport, agents, clients, names = \
                self.inprocess_hosts('lat')
        else:
            root = self.path('inproc-rabbit')
            name = 'bench-l-%s' % self.token
            agents = {'a': self.inprocess_agent(
                self.transport, name, 'a', root,
                harness.keyring(self.exchange).identity(name))}
            self.extra_queues += harness.queue_names(self.exchange, name)
            clients = {'a': api.AgentAPI(self.transport, name, timeout=300),
                       'b': self.clients['b']}
            names = {'a': name, 'b': self.agents['b'].name}
            self.restart_agents('before the latency runs')
            reset_ok = self.reset_hwms()
        size = a.dense
        windows = ('no migration', 'no migration, new leaf',
                   'mirror (copy phase)', 'mirror, copy throttled')
        try:
            vm = clients['a'].vm_create('lat-vm', [{'sr': 'sr-a',
                                                    'size': size}],
                                        vifs=['net0'])['uuid']
            host_a = agents['a'].host
            path = os.path.join(host_a.sr('sr-a').path,
                                host_a.vm(vm).disks[0].vdi + '.vhd')
            allocated = write_runs(path, [(0, size)], a.seed + 1)
            clients['a'].vm_start(vm)
            clients['a'].guest_start(vm, rate=a.load_rate, read_ratio=0.0)
            where = 'a'
            runs = []
            time.sleep(1.0)
            for rep in range(a.warmup + a.runs):
                counter = agents[where].host.vm(vm).disks[0].counter
                h0 = counter.stats()['latency_us_histogram']
                time.sleep(a.latency_window)
                h1 = counter.stats()['latency_us_histogram']
                steady = hist_delta(h1, h0)
                clients[where].vm_snapshot(vm)
                counter = agents[where].host.vm(vm).disks[0].counter
                h0 = counter.stats()['latency_us_histogram']
                time.sleep(a.latency_window)
                h1 = counter.stats()['latency_us_histogram']
                fresh = hist_delta(h1, h0)
                marks = {}

                def hook(mig, phase, counter=counter, marks=marks):
                    if phase in ('copy', 'compose'):
                        marks[phase] = counter.stats()[
                            'latency_us_histogram']

                res = self.inprocess_migrate(agents, clients, names, where,
                                             vm, hook)
                mirror = hist_delta(marks['compose'], marks['copy'])
                res['windows'] = {}
                for label, hist in zip(windows[:3], (steady, fresh, mirror)):
                    res['windows'][label] = {
                        'writes': sum(hist), 'histogram': hist,
                        'p50': hist_percentile(hist, 50),
                        'p99': hist_percentile(hist, 99)}
                if rep >= a.warmup:
                    runs.append(res)
                self.log('latency run %d: %s' % (rep, '; '.join(
                    '%s: %d writes p50 %s p99 %s us' % (
                        k, w['writes'], w['p50'] and w['p50'][2],
                        w['p99'] and w['p99'][2])
                    for k, w in res['windows'].items())))
                self.log('  copy: %s' % self.describe(res))
                if mode == 'fake':
                    where = self.other(where)
                else:
                    self.migrate_back(clients['b'], names['a'], vm, 'sr-a')
                if a.throttle:
                    thr = self.throttled_window(agents, clients, names, where,
                                                vm)
                    res['windows'][windows[3]] = thr
                    self.log('  %s: %d writes p50 %s p99 %s us; '
                             'force_complete took effect after %.2f s'
                             % (windows[3], thr['writes'],
                                thr['p50'] and thr['p50'][2],
                                thr['p99'] and thr['p99'][2],
                                thr['force_complete_lag_s']))
                    if mode == 'fake':
                        where = self.other(where)
                    else:
                        self.migrate_back(clients['b'], names['a'], vm,
                                          'sr-a')
            clients[where].vm_destroy(vm)
        finally:
            for ag in agents.values():
                ag.stop()
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.cleanup()
            shutil.rmtree(root, ignore_errors=True)
        if mode == 'rabbit':
            self.record_memory('latency runs (b: destination)', reset_ok)
        summary = {}
        for label in windows:
            if not all(label in r['windows'] for r in runs):
                continue
            pooled = [sum(col) for col in zip(*[
                r['windows'][label]['histogram'] for r in runs])]
            summary[label] = {
                'median_p50_us': median(r['windows'][label]['p50'][2]
                                        for r in runs
                                        if r['windows'][label]['p50']),
                'median_p99_us': median(r['windows'][label]['p99'][2]
                                        for r in runs
                                        if r['windows'][label]['p99']),
                'median_writes': median(r['windows'][label]['writes']
                                        for r in runs),
                'pooled_p50': hist_percentile(pooled, 50),
                'pooled_p99': hist_percentile(pooled, 99),
                'p50_runs': [r['windows'][label]['p50'] for r in runs],
                'p99_runs': [r['windows'][label]['p99'] for r in runs]}
        return {'size': size, 'allocated': allocated,
                'guest_rate': a.load_rate,
                'window_seconds': a.latency_window, 'runs': runs,
                'summary': summary,
                'copy': self.summarise('dense', 'loaded', 'ours', runs)}

    # -- profile ----------------------------------------------------------

    def profile(self):
        """One idle in-process migration of the dense disk, profiled.

        Every thread runs under its own cProfile.
        """
        profiles = []
        lock = threading.Lock()
        run = threading.Thread.run

        def profiled(thread):
            prof = cProfile.Profile()
            prof.enable()
            try:
                run(thread)
            finally:
                prof.disable()
                with lock:
                    profiles.append(prof)

        root, transport, agents, clients, names = \
            self.inprocess_hosts('prof')
        try:
            vm = clients['a'].vm_create('prof-vm', [{'sr': 'sr-a',
                                                     'size': self.args.dense
                                                     }], vifs=['net0'])['uuid']
            host_a = agents['a'].host
            path = os.path.join(host_a.sr('sr-a').path,
                                host_a.vm(vm).disks[0].vdi + '.vhd')
            write_runs(path, [(0, self.args.dense)], self.args.seed + 1)
            clients['a'].vm_start(vm)
            threading.Thread.run = profiled
            main = cProfile.Profile()
            try:
                main.enable()
                res = self.inprocess_migrate(agents, clients, names, 'a',
                                             vm)
                main.disable()
            finally:
                threading.Thread.run = run
            clients['b'].vm_destroy(vm)
        finally:
            for ag in agents.values():
                ag.stop()
            with contextlib.suppress(Exception):
                transport.cleanup()
            shutil.rmtree(root, ignore_errors=True)
        buf = io.StringIO()
        with lock:
            stats = pstats.Stats(main, *profiles, stream=buf)
        stats.sort_stats('tottime').print_stats(25)
        self.profile_text = ('profile of one idle in-process migration of '
                             'the dense disk (%s): %s\n%s'
                             % (human(self.args.dense), self.describe(
                                 dict(res, side='ours')), buf.getvalue()))

    # -- running ----------------------------------------------------------

    def run(self):
        from xsm_driver.core.nbd import tls
        tls.make_credentials(self.pki)
        cases = self.args.cases
        if self.args.rabbit_needed:
            self.start_agents()
            self.agent_argv = self.agents['a'].argv()
            base = self.hwm()
            self.memory.append({'group': 'agents just started',
                                'peak_kib': base, 'rss_kib': {
                                    r: proc_status_kib(a.pid, 'VmRSS')
                                    for r, a in self.agents.items()},
                                'reset_before': False})
            if 'copy' in cases:
                self.case_copy()
            if 'multidisk' in cases:
                self.case_multidisk()
            if 'downtime' in cases:
                self.case_downtime()
        if 'latency' in cases:
            self.case_latency()
        if self.args.profile:
            self.profile()

    # -- reporting --------------------------------------------------------

    def report(self, out=sys.stdout):
        a = self.args
        p = lambda *x: print(*x, file=out)  # noqa: E731
        p('migration_bench: scale %g, %d run(s) per case, medians; MB = '
          '10^6 bytes' % (a.scale, a.runs))
        code = code_version()
        p('  xsm_driver from %s, commit %s, %d tracked file(s) changed'
          % (code['xsm_driver'], (code.get('commit') or '?')[:12],
             len(code.get('changed') or [])))
        for name, info in self.images.items():
            p('  %s: %s virtual, %s allocated in %d run(s); first migrated '
              'copy vs source: %s; peer output vs source: %s'
              % (name, human(info['size']), human(info['allocated']),
                 info['runs'], info.get('verified'),
                 info.get('peer_checked')))
        if self.copy_results:
            p('')
            p('1. copy throughput (ours: bytes_copied / copy-phase seconds '
              'polled every %g s; peer: allocated bytes / nbdcopy wall '
              'time)' % a.poll)
            p('%-7s %-7s %-5s %9s %7s %7s %6s  %-18s %-24s %s' % (
                'disk', 'load', 'side', 'MB/s', 'copy s', 'total s',
                'ratio', 'CPU src/dst u+s', 'downtime ms', 'runs MB/s'))
            peers = {r['disk']: r for r in self.copy_results
                     if r['side'] == 'peer'}
            for r in self.copy_results:
                tp = r['median_throughput_bytes_per_s']
                peer = peers.get(r['disk'])
                ratio = ''
                if r['side'] == 'ours' and peer and tp and \
                        peer['median_throughput_bytes_per_s']:
                    x = tp / peer['median_throughput_bytes_per_s']
                    ratio = '%.2f%s' % (
                        x, '' if x >= TARGETS['copy_ratio'] else '!')
                if r['side'] == 'ours':
                    cpu = '%s/%s' % tuple(
                        '%.1f+%.1f' % c if c else '-' for c in
                        (r['median_cpu_source'], r['median_cpu_destination']))
                    dt = ' '.join('%g' % x['downtime_ms'] for x in r['runs'])
                    secs = '%7.2f %7.2f' % (r['median_copy_seconds'] or 0,
                                            r['median_migration_seconds']
                                            or 0)
                else:
                    cpu = 'nbdcopy %.1f+%.1f' % r['median_cpu_nbdcopy'] \
                        if r['median_cpu_nbdcopy'] else '-'
                    dt = ''
                    secs = '%7.2f %7s' % (r['median_seconds'] or 0, '')
                p('%-7s %-7s %-5s %9s %s %6s  %-18s %-24s %s' % (
                    r['disk'], r['load'], r['side'],
                    '%.1f' % (tp / 1e6) if tp else '-', secs, ratio, cpu, dt,
                    ' '.join('%.1f' % (x['throughput_bytes_per_s'] / 1e6)
                             if x['throughput_bytes_per_s'] else '?'
                             for x in r['runs'])))
            p('')
            p('   phases of our migrations (median seconds, from polls):')
            for r in self.copy_results:
                if r['side'] != 'ours' or not r['runs']:
                    continue
                p('   %-7s %-7s %s' % (r['disk'], r['load'], ', '.join(
                    '%s %.2f' % (ph, r['median_phase_seconds'][ph])
                    for ph in PHASES if ph in r['median_phase_seconds'])))
                if r['load'] == 'loaded':
                    p('   %-15s bytes copied per run: %s; guest writes/s '
                      'during the migration: %s; SR on disk after: %s'
                      % ('', ' '.join(human(x['bytes_copied'])
                                      for x in r['runs']),
                         ' '.join('%g' % x['guest_writes_per_s']
                                  for x in r['runs']),
                         ' '.join(human(x['sr_physical_bytes'])
                                  for x in r['runs'])))
            for r in self.copy_results:
                if r['side'] == 'peer' and r['runs']:
                    p('   peer %s: qemu-nbd CPU src %.1f+%.1f s, dst '
                      '%.1f+%.1f s; multi-conn src/dst: %s'
                      % ((r['disk'],) + tuple(r['median_cpu_qemu_nbd_source'])
                         + tuple(r['median_cpu_qemu_nbd_destination']) +
                         ('/'.join(str(x) for x in
                                   r['runs'][0]['multi_conn']),)))
            p('')
            p('   CPU seconds (user+sys) per GiB copied; ours: both agents, '
              'the whole migration; peer: nbdcopy + both qemu-nbd; median '
              '[runs]')
            for r in self.copy_results:
                if r['runs']:
                    p('   %-7s %-7s %-5s %7s  [%s]' % (
                        r['disk'], r['load'], r['side'],
                        '%.2f' % r['median_cpu_s_per_GiB']
                        if r.get('median_cpu_s_per_GiB') is not None
                        else '-', ' '.join(
                            '%.2f' % x['cpu_s_per_GiB']
                            if x.get('cpu_s_per_GiB') is not None else '-'
                            for x in r['runs'])))
        if self.fio:
            p('')
            p('   the disk\'s ceiling: %s' % ' '.join(
                x for x in self.fio['argv'] if not x.startswith(
                    '--filename')))
            p('   in %s (%s): %s MB/s median; runs: %s' % (
                self.fio['directory'], ', '.join(
                    self.fio['filesystem'] or ()),
                '%.1f' % (self.fio['median_bytes_per_s'] / 1e6),
                ', '.join('%s %.1f MB/s' % (x['when'],
                                            x['bytes_per_s'] / 1e6)
                          for x in self.fio['runs'])))
        if self.multidisk:
            md = self.multidisk
            p('')
            p('1b. %d disks of %s in one VM beside one disk of %s, idle, '
              'same bytes; rate = bytes_copied / copy phase'
              % (md['disks'], human(md['disk_size']),
                 human(md['one_disk_size'])))
            for r in (md['one_disk'], md['many_disks']):
                tp = r['median_throughput_bytes_per_s']
                p('   %-9s %9s MB/s  copy %6.2f s  CPU %s s/GiB  downtime '
                  '%s ms  runs MB/s %s' % (
                      r['disk'], '%.1f' % (tp / 1e6) if tp else '-',
                      r.get('median_copy_seconds') or 0,
                      '%.2f' % r['median_cpu_s_per_GiB']
                      if r.get('median_cpu_s_per_GiB') is not None else '-',
                      ' '.join('%g' % x['downtime_ms'] for x in r['runs']),
                      ' '.join('%.1f' % (x['throughput_bytes_per_s'] / 1e6)
                               if x['throughput_bytes_per_s'] else '?'
                               for x in r['runs'])))
            p('   aggregate rate, %d disks / 1 disk: %s' % (
                md['disks'], '%.2f' % md['ratio'] if md['ratio'] else '-'))
        for label, lat in (self.latency or {}).items():
            p('')
            p('2. guest write latency, %s: %s dense disk, guest %d writes/s '
              'of 4 KiB, no reads; us: median over runs of a geometric '
              'estimate inside the power-of-two bucket [bucket of the pooled '
              'runs]' % (label, human(lat['size']), lat['guest_rate']))
            p('   %-24s %7s %20s %22s   %s'
              % ('window', 'writes', 'p50', 'p99', 'runs p50 / p99'))
            for window, s in lat['summary'].items():
                def fmt(v, b):
                    return '%.0f [%s-%s]' % (v, b[0], b[1]) if b else '-'
                p('   %-24s %7s %20s %22s   %s / %s' % (
                    window, '%d' % s['median_writes'],
                    fmt(s['median_p50_us'], s['pooled_p50']),
                    fmt(s['median_p99_us'], s['pooled_p99']),
                    ' '.join('%.0f' % x[2] if x else '-'
                             for x in s['p50_runs']),
                    ' '.join('%.0f' % x[2] if x else '-'
                             for x in s['p99_runs'])))
            thr = [r['windows'].get('mirror, copy throttled')
                   for r in lat['runs']]
            thr = [t for t in thr if t]
            if thr:
                p('   throttled window: copy held to %s/s (measured %s MB/s); '
                  'then force_complete: copy sped up after %s s, compose '
                  'after %s s (%s left)' % (
                      human(self.args.throttle),
                      ' '.join('%.1f' % (t['copy_rate_in_window'] / 1e6)
                               for t in thr),
                      ' '.join('%g' % t['force_complete_lag_s']
                               for t in thr),
                      ' '.join('%g' % t.get('force_complete_to_compose_s',
                                            -1) for t in thr),
                      ' '.join(human(t['bytes_left_at_force_complete'])
                               for t in thr)))
            ic = lat['copy']
            if ic['median_throughput_bytes_per_s']:
                p('   copy under that load (exact phase times): %.1f MB/s, '
                  'copy %.2f s; downtime %s ms'
                  % (ic['median_throughput_bytes_per_s'] / 1e6,
                     ic['median_copy_seconds'],
                     ' '.join('%g' % r['downtime_ms'] for r in ic['runs'])))
        if self.downtime or self.copy_results:
            p('')
            p('3. downtime (ms; p50/p99 by nearest rank, target p99 <= %g)'
              % TARGETS['switch_over_p99_ms'])
            if self.downtime:
                d = self.downtime
                ms = d['downtime_ms']
                p('   small VM %s, guest %s writes/s + reads, %d switch-'
                  'overs: p50 %s, p99 %s, max %s; guest verified: %s'
                  % (human(d['size']), d['guest_rate'], len(ms), d['p50_ms'],
                     d['p99_ms'], d['max_ms'],
                     d['guest_verify'].get('verified')))
                p('   all: %s' % ' '.join('%g' % x for x in ms))
            for r in self.copy_results:
                if r['side'] == 'ours' and r['runs']:
                    p('   %s %s (%s virtual): %s' % (
                        r['disk'], r['load'],
                        human(self.images['bench-' + r['disk']]['size']),
                        ' '.join('%g' % x['downtime_ms'] for x in r['runs'])))
        if self.memory:
            p('')
            p('4. agent peak memory (VmHWM, MiB, of each group of migrations: '
              '%s; target < %g)' % ('fresh agent processes before each '
                                    'group' if a.restart_agents else
                                    'peak reset through clear_refs before '
                                    'each group', TARGETS['rss_mib']))
            for m in self.memory:
                p('   %-30s a %7.1f  b %7.1f   (VmRSS now a %.1f, b %.1f)'
                  % (m['group'], m['peak_kib']['a'] / 1024,
                     m['peak_kib']['b'] / 1024, m['rss_kib']['a'] / 1024,
                     m['rss_kib']['b'] / 1024))
        if self.rss_trace:
            p('   VmRSS (MiB) after each migration over RabbitMQ, a / b:')
            line = []
            last = None
            for label, rss in self.rss_trace:
                if label != last:
                    if line:
                        p('   %-14s %s' % (last, ' '.join(line)))
                    line, last = [], label
                line.append('%.0f/%.0f' % (rss['a'] / 1024, rss['b'] / 1024))
            p('   %-14s %s' % (last, ' '.join(line)))
        p('')
        if getattr(self, 'agent_argv', None):
            p('agents: %s' % ' '.join(self.agent_argv))
        if getattr(self, 'peer_argv', None):
            for argv in self.peer_argv:
                p('peer: %s' % ' '.join("''" if x == '' else x
                                        for x in argv))
        for note in self.notes:
            p('note: %s' % note)
        if self.profile_text:
            p('')
            p(self.profile_text)

    def as_json(self):
        a = self.args
        return {
            'config': {k: getattr(a, k) for k in (
                'scale', 'dense', 'sparse', 'alloc', 'run', 'runs', 'warmup',
                'load_rate', 'poll', 'small', 'small_fill', 'switchovers',
                'latency_window', 'throttle', 'min_free', 'restart_agents',
                'seed', 'cases', 'workdir', 'multi_disks', 'fio')},
            'code': code_version(),
            'rss_after_each_migration_kib': self.rss_trace,
            'machine': {'python': sys.version.split()[0],
                        'platform': platform.platform(),
                        'cpus': os.cpu_count(),
                        'qemu-nbd': tool_version(['qemu-nbd', '--version']),
                        'nbdcopy': tool_version(['nbdcopy', '--version'])},
            'images': self.images,
            'copy': self.copy_results, 'memory': self.memory,
            'downtime': self.downtime, 'latency': self.latency,
            'disk_ceiling': self.fio, 'multidisk': self.multidisk,
            'agent_argv': getattr(self, 'agent_argv', None),
            'peer_argv': getattr(self, 'peer_argv', None),
            'notes': self.notes, 'profile': self.profile_text}

    def cleanup(self):
        for q in list(self._qemu):
            q.stop()
        self.stop_agents()
        for log in self._logs:
            log.close()


class SpaceError(Exception):
    pass


class MigrationFailed(RuntimeError):
    """A migration ended in another phase than done (it was rolled back)."""


class ToolFailed(RuntimeError):
    """An external tool (qemu-nbd, nbdcopy, qemu-img) failed."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=3,
                   help='timed runs of each case; medians (default 3)')
    p.add_argument('--warmup', type=int, default=0,
                   help='untimed runs of each case first (default 0)')
    p.add_argument('--scale', type=float, default=1.0,
                   help='multiply --dense, --sparse, --alloc and --run (e.g. '
                   '0.125 for a quick run)')
    p.add_argument('--dense', type=parse_size, default=FULL['dense'],
                   help='size of the dense disk (default %(default)s)')
    p.add_argument('--sparse', type=parse_size, default=FULL['sparse'],
                   help='virtual size of the sparse disk (default '
                   '%(default)s)')
    p.add_argument('--alloc', type=parse_size, default=FULL['alloc'],
                   help='allocated bytes of the sparse disk (default '
                   '%(default)s)')
    p.add_argument('--run', type=parse_size, default=FULL['run'],
                   help='length of each allocated run of the sparse disk '
                   '(default %(default)s)')
    p.add_argument('--multi-disks', type=int, default=8,
                   help='disks of the multidisk case\'s VM; each is '
                   '--dense / N, beside a VM with one disk of --dense '
                   '(default 8)')
    p.add_argument('--no-fio', dest='fio', action='store_false',
                   help='do not measure the disk\'s O_DIRECT sequential '
                   'write rate with fio before and after the copy case')
    p.add_argument('--load-rate', type=int, default=500,
                   help='guest writes (4 KiB) per second in the loaded cases '
                   '(default 500; 0: no loaded cases)')
    p.add_argument('--poll', type=float, default=0.05,
                   help='seconds between two migration_get polls (default '
                   '0.05)')
    p.add_argument('--small', type=parse_size, default='256M',
                   help='disk of the downtime VM (default 256M, not scaled)')
    p.add_argument('--small-fill', type=float, default=0.25,
                   help='fraction of the small disk its guest fills first')
    p.add_argument('--switchovers', type=int, default=20,
                   help='switch-overs of the downtime case (default 20)')
    p.add_argument('--throttle', default='8M',
                   type=lambda t: 0 if t.strip() == '0' else parse_size(t),
                   help='copy bandwidth (bytes/s) of the extra latency '
                   'window with the copy held back (default 8M; 0: no such '
                   'window)')
    p.add_argument('--latency-window', type=float, default=5.0,
                   help='seconds of each no-migration latency window')
    p.add_argument('--cases', type=lambda s: s.split(','),
                   default=list(CASES),
                   help='comma-separated, of: %s (default all; the memory '
                   'figures come with copy and downtime; "none" with '
                   '--profile: only the profile)' % ', '.join(CASES))
    p.add_argument('--profile', action='store_true',
                   help='at the end, one idle in-process migration of the '
                   'dense disk with every thread under cProfile')
    p.add_argument('--min-free', type=parse_size, default='16G',
                   help='never let the scratch file system fall below this '
                   'much free space: a migration is aborted, loaded runs '
                   'stop (default 16G; the disk may be shared)')
    p.add_argument('--no-restart-agents', dest='restart_agents',
                   action='store_false',
                   help='keep the same two agent processes for the whole '
                   'run (by default they are restarted before each group '
                   'of migrations, so that each VmHWM is that group\'s)')
    p.add_argument('--rabbit', default=RABBIT_URL,
                   help='transport URL of the agents (default %(default)s)')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the benchmark disks\' data and of where the '
                   'sparse disk\'s runs lie (default 20240601)')
    _common.add_scratch_options(p, kept='logs, images')
    args = p.parse_args(argv)
    if args.cases == ['none']:
        args.cases = []
    bad = set(args.cases) - set(CASES)
    if bad:
        p.error('unknown case(s): %s' % ', '.join(sorted(bad)))
    if args.runs < 1 or args.warmup < 0 or args.scale <= 0 or \
            args.switchovers < 1:
        p.error('--runs and --switchovers must be >= 1, --warmup >= 0, '
                '--scale > 0')
    for key in ('dense', 'sparse', 'alloc', 'run'):
        setattr(args, key, round_block(getattr(args, key) * args.scale))
    args.alloc = max(args.run, args.alloc // args.run * args.run)
    if args.alloc > args.sparse:
        p.error('--alloc must be <= --sparse')
    args.small = round_block(args.small)
    if 'copy' in args.cases:
        for tool in ('qemu-img', 'qemu-nbd', 'nbdcopy', 'nbdinfo'):
            if not shutil.which(tool):
                p.error('%s not found (apt-get install qemu-utils '
                        'libnbd-bin)' % tool)
    if args.multi_disks < 2:
        p.error('--multi-disks must be >= 2, not %d' % args.multi_disks)
    if 'copy' in args.cases and args.fio and not shutil.which('fio'):
        p.error('fio not found: the copy case measures the disk\'s own '
                'write rate with it (apt-get install fio), or give --no-fio')
    args.rabbit_needed = bool({'copy', 'multidisk', 'downtime', 'latency'} &
                              set(args.cases))
    if args.rabbit_needed:
        host, port = args.rabbit.rsplit('@', 1)[-1].split('/')[0] \
            .rsplit(':', 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
        except OSError as exc:
            p.error('RabbitMQ is not reachable at %s:%s (%s)'
                    % (host, port, exc))
    parent = args.workdir
    if parent:
        os.makedirs(parent, exist_ok=True)
    args.workdir = tempfile.mkdtemp(prefix='migration-bench-', dir=parent)
    # dense: golden + source chain + destination copy + peer output + the
    # leaves the loaded guest fills (up to the disk's size on each side);
    # sparse: the same with its allocated bytes.
    need = 6 * args.dense + 4 * args.alloc + 4 * args.small + 1 * GiB + \
        args.min_free
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        os.rmdir(args.workdir)
        p.error('%s has %s free; about %s are needed at --scale %g, '
                '--min-free %s included (try a smaller --scale, or --workdir '
                'elsewhere)' % (args.workdir, human(free), human(need),
                                args.scale, human(args.min_free)))
    logging.basicConfig(level=logging.WARNING,
                        format='%(levelname)s %(name)s %(message)s')
    _common.interrupt_on_sigterm()
    bench = Bench(args)
    bench.log('scratch folder %s (%s free, about %s needed)'
              % (args.workdir, human(free), human(need)))
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        status = 130
    except SpaceError as exc:
        print('migration_bench: %s' % exc, file=sys.stderr)
        status = 1
    except Exception:
        import traceback
        traceback.print_exc()
        status = 1
    finally:
        bench.cleanup()
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            print('kept %s' % args.workdir, file=sys.stderr)
    bench.report()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(bench.as_json(), f, indent=1, default=str)
    return status


if __name__ == '__main__':
    sys.exit(main())
