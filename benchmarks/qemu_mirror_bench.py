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

"""QEMU's own live mirror, the peer of our mirror: guest write latency.

``qemu-storage-daemon`` holds a raw source image of ``--size`` bytes
(every block written with seeded random bytes, like the dense disk of
``migration_bench.py``) and exports it over NBD on 127.0.0.1 (plain TCP,
writable). A guest-like writer in this process (``xsm_driver``'s NBD
client, one thread, one request at a time) writes random 4 KiB blocks
anywhere on the disk at ``--load-rate`` writes a second, paced like the
verifying guest (:mod:`xsm_driver.core.migration.workload`), and times
each write. Over QMP (the daemon's unix socket, JSON lines, no extra
dependency) the benchmark then runs ``blockdev-mirror`` with ``sync:
full`` and ``copy-mode: write-blocking`` to an NBD target: ``qemu-nbd -f
raw`` serving a new empty file, with TLS and client certificates (made by
``tls.make_credentials``), which the daemon reaches with ``blockdev-add
driver=nbd ... tls-creds``. Windows, each repeated ``--runs`` times:

``no mirror``
   ``--latency-window`` seconds of writes, no job.
``mirror (copy phase)``
   from ``blockdev-mirror`` to the job's ``BLOCK_JOB_READY`` event: the
   bulk copy runs beside the guest's mirrored writes.
``mirror, ready``
   ``--latency-window`` seconds after that: writes mirrored, no copy.
``mirror, copy throttled``
   another job to a new target with ``speed`` = ``--throttle`` bytes/s,
   ``--latency-window`` seconds of its copy phase (then cancelled).

These are the windows of ``migration_bench.py``'s latency case (``no
migration``, ``mirror (copy phase)``, ``mirror, copy throttled``).
Percentiles are given two ways: exact (nearest rank over every write) and
estimated from the same power-of-two histogram our ``Counter`` filter
keeps (the estimate ours reports), so that both sides can be compared
with the same method. Our guest's latency is measured inside the agent
(the device stack); this writer's includes an NBD round trip over
loopback to the daemon, which the ``no mirror`` window shows.

``python benchmarks/qemu_mirror_bench.py --json OUT``; see
``benchmarks/README.rst``.
"""

import argparse
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (TOP, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import _common  # noqa: E402

MiB = _common.MiB
BLOCK = 4096
WINDOWS = ('no mirror', 'mirror (copy phase)', 'mirror, ready',
           'mirror, copy throttled')
READY_TIMEOUT = 30.0


class BenchError(Exception):
    pass


# -- QMP -------------------------------------------------------------------

class QMP:
    """A QMP client over a unix socket: JSON lines, events queued."""

    def __init__(self, path, timeout=READY_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise BenchError('no QMP socket at %s after %d s'
                                     % (path, timeout))
                time.sleep(0.05)
        self.file = self.sock.makefile('rwb', buffering=0)
        self.events = queue.Queue()
        self._replies = queue.Queue()
        greeting = json.loads(self.file.readline())
        if 'QMP' not in greeting:
            raise BenchError('not a QMP greeting: %r' % greeting)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.execute('qmp_capabilities')

    def _read(self):
        try:
            for line in self.file:
                msg = json.loads(line)
                if 'event' in msg:
                    self.events.put(msg)
                else:
                    self._replies.put(msg)
        except OSError:
            pass                    # the daemon was stopped: the end
        self._replies.put(None)

    def execute(self, command, **arguments):
        msg = {'execute': command}
        if arguments:
            msg['arguments'] = arguments
        self.file.write(json.dumps(msg).encode() + b'\n')
        reply = self._replies.get(timeout=60)
        if reply is None:
            raise BenchError('QMP connection closed during %s' % command)
        if 'error' in reply:
            raise BenchError('QMP %s %s failed: %s' % (
                command, json.dumps(arguments), reply['error']['desc']))
        return reply['return']

    def wait_event(self, names, job=None, timeout=600):
        """The next event named in ``names`` (of job ``job``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError('no %s event within %d s' % (names,
                                                              timeout))
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev['event'] in names and (job is None or ev.get(
                    'data', {}).get('device') == job):
                return ev

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# -- the guest -------------------------------------------------------------

class Writer(threading.Thread):
    """Random 4 KiB writes at ``rate`` a second, each timed.

    ``samples`` is a list of ``(monotonic end time, latency us)``.
    """

    def __init__(self, port, size, rate, seed):
        super().__init__(daemon=True)
        from xsm_driver.core.migration import workload
        from xsm_driver.core.nbd import client as nbd_client
        self.client = nbd_client.Client('127.0.0.1', port, export='')
        self.client.connect()
        self.blocks = size // BLOCK
        self.rate = rate
        self.rng = random.Random(seed)
        self.data = [self.rng.randbytes(BLOCK) for _ in range(64)]
        self.samples = []
        self.error = None
        self._halt = threading.Event()
        self._pace = workload.pace

    def run(self):
        interval = 1.0 / self.rate if self.rate else 0
        next_at = time.monotonic()
        try:
            while not self._halt.is_set():
                block = self.rng.randrange(self.blocks)
                data = self.data[block % len(self.data)]
                t0 = time.perf_counter()
                self.client.pwrite(data, block * BLOCK)
                t1 = time.perf_counter()
                self.samples.append((time.monotonic(), (t1 - t0) * 1e6))
                if interval:
                    next_at = self._pace(next_at, interval)
        except Exception as exc:        # reported by the benchmark
            self.error = exc

    def stop(self):
        self._halt.set()
        self.join(30)
        try:
            self.client.close()
        except Exception:
            pass

    def between(self, t0, t1):
        return [us for t, us in self.samples if t0 <= t < t1]


def window_stats(latencies):
    """Exact and histogram-estimated percentiles of one window (pure)."""
    hist = _common.histogram(latencies)
    est50 = _common.hist_percentile(hist, 50)
    est99 = _common.hist_percentile(hist, 99)
    return {'writes': len(latencies),
            'p50_us': _common.nearest_rank(latencies, 50),
            'p99_us': _common.nearest_rank(latencies, 99),
            'max_us': max(latencies) if latencies else None,
            'hist_p50': est50, 'hist_p99': est99, 'histogram': hist}


def summarise(runs):
    """Medians over runs of each window's percentiles (pure)."""
    out = {}
    for label in WINDOWS:
        wins = [r['windows'][label] for r in runs if label in r['windows']]
        if not wins:
            continue
        pooled = [sum(col) for col in zip(*[w['histogram'] for w in wins])]
        out[label] = {
            'median_p50_us': _common.median(w['p50_us'] for w in wins),
            'median_p99_us': _common.median(w['p99_us'] for w in wins),
            'median_hist_p50_us': _common.median(
                w['hist_p50'][2] for w in wins if w['hist_p50']),
            'median_hist_p99_us': _common.median(
                w['hist_p99'][2] for w in wins if w['hist_p99']),
            'median_writes': _common.median(w['writes'] for w in wins),
            'pooled_histogram': pooled,
            'pooled_p50': _common.hist_percentile(pooled, 50),
            'pooled_p99': _common.hist_percentile(pooled, 99),
            'p99_runs_us': [w['p99_us'] for w in wins]}
    copies = [r['copy'] for r in runs if r.get('copy')]
    if copies:
        out['copy'] = {'median_seconds': _common.median(
            c['seconds'] for c in copies), 'median_MBps': _common.median(
            c['MBps'] for c in copies), 'bytes': copies[0]['bytes']}
    return out


# -- the processes -----------------------------------------------------------

class Target:
    """``qemu-nbd -f raw`` with TLS serving a new empty file."""

    def __init__(self, path, size, pki, log):
        with open(path, 'wb') as f:
            f.truncate(size)
        self.path = path
        self.port = _common.free_port()
        self.argv = ['qemu-nbd', '--object',
                     'tls-creds-x509,id=tls0,endpoint=server,dir=%s' % pki,
                     '--tls-creds', 'tls0', '-f', 'raw', '-t', '-p',
                     str(self.port), '-b', '127.0.0.1', '-x', '', path]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise BenchError('%s exited %d' % (' '.join(self.argv),
                                                   self.proc.returncode))
            try:
                socket.create_connection(('127.0.0.1', self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchError('%s is not listening'
                                     % ' '.join(self.argv))
                time.sleep(0.05)

    def stop(self):
        _common.stop_proc(self.proc)
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Bench:

    def __init__(self, args, root, log):
        self.args = args
        self.root = root
        self.log = log
        self.daemon = None
        self.qmp = None
        self.targets = []
        self.logfile = open(os.path.join(root, 'qemu.log'), 'ab')

    def path(self, name):
        return os.path.join(self.root, name)

    def setup(self):
        from xsm_driver.core.nbd import tls
        from xsm_driver.core.vhd import ops  # noqa: F401 (same env check)
        a = self.args
        self.pki = self.path('pki')
        tls.make_credentials(self.pki)
        src = self.path('source.raw')
        rng = random.Random(a.seed)
        t = time.monotonic()
        with open(src, 'wb') as f:
            left = a.size
            while left:
                n = min(left, 2 * MiB)
                f.write(rng.randbytes(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        self.log('source: %d MiB of seeded random bytes in %.1f s'
                 % (a.size // MiB, time.monotonic() - t))
        self.port = _common.free_port()
        self.qmp_path = self.path('qmp.sock')
        self.daemon_argv = [
            'qemu-storage-daemon',
            '--object', 'tls-creds-x509,id=tls0,endpoint=client,dir=%s'
            % self.pki,
            '--blockdev', 'driver=file,node-name=src-file,filename=%s'
            % src,
            '--blockdev', 'driver=raw,node-name=src,file=src-file',
            '--nbd-server', 'addr.type=inet,addr.host=127.0.0.1,'
            'addr.port=%d' % self.port,
            '--export', 'type=nbd,id=exp0,node-name=src,name=,writable=on',
            '--chardev', 'socket,id=qmp0,path=%s,server=on,wait=off'
            % self.qmp_path,
            '--monitor', 'chardev=qmp0']
        self.daemon = subprocess.Popen(self.daemon_argv,
                                       stdin=subprocess.DEVNULL,
                                       stdout=self.logfile,
                                       stderr=subprocess.STDOUT)
        self.qmp = QMP(self.qmp_path)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                self.writer = Writer(self.port, a.size, a.load_rate, a.seed)
                break
            except Exception:
                if time.monotonic() > deadline or self.daemon.poll() \
                        is not None:
                    raise BenchError('cannot connect to the daemon\'s NBD '
                                     'export (see %s)' % self.logfile.name)
                time.sleep(0.05)
        self.writer.start()

    def new_target(self, n):
        target = Target(self.path('target-%d.raw' % n), self.args.size,
                        self.pki, self.logfile)
        self.targets.append(target)
        node = 'tgt%d' % n
        self.qmp.execute('blockdev-add', **{
            'driver': 'nbd', 'node-name': node, 'export': '',
            'server': {'type': 'inet', 'host': '127.0.0.1',
                       'port': str(target.port)},
            'tls-creds': 'tls0'})
        return target, node

    def drop_target(self, target, node):
        self.qmp.execute('blockdev-del', **{'node-name': node})
        target.stop()
        self.targets.remove(target)

    def end_job(self, job):
        self.qmp.execute('block-job-cancel', device=job, force=True)
        self.qmp.wait_event(('BLOCK_JOB_CANCELLED', 'BLOCK_JOB_COMPLETED'),
                            job, timeout=120)

    def check_writer(self):
        if self.writer.error is not None:
            raise BenchError('the guest writer failed: %s'
                             % self.writer.error)

    def one_run(self, n):
        a = self.args
        w = self.writer
        windows = {}
        os.sync()
        t0 = time.monotonic()
        time.sleep(a.latency_window)
        windows['no mirror'] = window_stats(w.between(t0, time.monotonic()))
        # the mirror, to the end of its copy
        target, node = self.new_target(2 * n)
        job = 'm%d' % n
        t0 = time.monotonic()
        self.qmp.execute('blockdev-mirror', **{
            'job-id': job, 'device': 'src', 'target': node, 'sync': 'full',
            'copy-mode': 'write-blocking', 'auto-finalize': True,
            'auto-dismiss': True})
        ev = self.qmp.wait_event(('BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED',
                                  'BLOCK_JOB_CANCELLED'), job,
                                 timeout=a.timeout)
        t1 = time.monotonic()
        if ev['event'] != 'BLOCK_JOB_READY':
            raise BenchError('mirror job ended before it was ready: %s' % ev)
        self.check_writer()
        windows['mirror (copy phase)'] = window_stats(w.between(t0, t1))
        copy = {'seconds': round(t1 - t0, 3), 'bytes': a.size,
                'MBps': round(a.size / 1e6 / (t1 - t0), 1)}
        time.sleep(a.latency_window)
        windows['mirror, ready'] = window_stats(
            w.between(t1, time.monotonic()))
        self.end_job(job)
        self.drop_target(target, node)
        # a throttled mirror: the copy held to --throttle bytes/s
        if a.throttle:
            target, node = self.new_target(2 * n + 1)
            job = 't%d' % n
            t0 = time.monotonic()
            self.qmp.execute('blockdev-mirror', **{
                'job-id': job, 'device': 'src', 'target': node,
                'sync': 'full', 'copy-mode': 'write-blocking',
                'speed': a.throttle})
            time.sleep(a.latency_window)
            t1 = time.monotonic()
            windows['mirror, copy throttled'] = window_stats(
                w.between(t0, t1))
            self.end_job(job)
            self.drop_target(target, node)
        self.check_writer()
        run = {'windows': windows, 'copy': copy}
        self.log('run %d: copy %.2f s (%.1f MB/s); %s' % (
            n, copy['seconds'], copy['MBps'], '; '.join(
                '%s: %d writes p50 %.0f p99 %.0f us' % (
                    k, v['writes'], v['p50_us'] or 0, v['p99_us'] or 0)
                for k, v in windows.items())))
        return run

    def run(self):
        a = self.args
        runs = []
        for n in range(a.warmup + a.runs):
            run = self.one_run(n)
            run['warmup'] = n < a.warmup
            if n >= a.warmup:
                runs.append(run)
        return runs

    def cleanup(self):
        if getattr(self, 'writer', None) is not None:
            self.writer.stop()
        for target in list(self.targets):
            target.stop()
        if self.qmp is not None:
            try:
                self.qmp.execute('quit')
            except Exception:
                pass
            self.qmp.close()
        _common.stop_proc(self.daemon)
        self.logfile.close()


def format_table(summary, args):
    lines = ['QEMU write-blocking mirror (qemu-storage-daemon, NBD+TLS '
             'target), %d MiB raw source, guest %d writes/s of 4 KiB'
             % (args.size // MiB, args.load_rate),
             '%-26s %7s %9s %9s %11s %11s' % (
                 'window', 'writes', 'p50 us', 'p99 us', 'hist p50',
                 'hist p99')]
    for label in WINDOWS:
        s = summary.get(label)
        if not s:
            continue
        lines.append('%-26s %7d %9.0f %9.0f %11.0f %11.0f' % (
            label, s['median_writes'], s['median_p50_us'] or 0,
            s['median_p99_us'] or 0, s['median_hist_p50_us'] or 0,
            s['median_hist_p99_us'] or 0))
    if 'copy' in summary:
        lines.append('mirror copy phase: median %.2f s, %.1f MB/s'
                     % (summary['copy']['median_seconds'],
                        summary['copy']['median_MBps']))
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=_common.parse_size, default='4G',
                   help='source image size (default 4G, the dense disk of '
                   'migration_bench.py)')
    p.add_argument('--scale', type=float, default=1.0,
                   help='multiplies --size (0.125: migration_bench '
                   '--scale 0.125)')
    p.add_argument('--load-rate', type=int, default=500,
                   help='guest writes a second (default 500)')
    p.add_argument('--latency-window', type=float, default=5.0,
                   help='seconds of each latency window (default 5)')
    p.add_argument('--throttle', type=_common.parse_size, default='8M',
                   help='speed of the throttled mirror, bytes/s (0: skip)')
    p.add_argument('--runs', type=int, default=3,
                   help='timed runs; medians (default 3)')
    p.add_argument('--warmup', type=int, default=0,
                   help='untimed runs first (default 0)')
    p.add_argument('--timeout', type=float, default=1800,
                   help='seconds a mirror copy may take')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the image\'s data and of the guest\'s '
                   'write offsets (default 20240601)')
    _common.add_scratch_options(p, kept='images, logs')
    a = p.parse_args(argv)
    a.size = max(MiB, int(a.size * a.scale) // MiB * MiB)
    if a.runs < 1 or a.load_rate < 1:
        p.error('--runs and --load-rate must be at least 1')
    for tool, package in (('qemu-storage-daemon', 'qemu-system-common'),
                          ('qemu-nbd', 'qemu-utils')):
        if shutil.which(tool) is None:
            print('qemu_mirror_bench: %s not found: apt-get install -y %s'
                  % (tool, package), file=sys.stderr)
            return 2
    root = tempfile.mkdtemp(prefix='xsm-qemu-mirror-', dir=a.workdir)
    free = shutil.disk_usage(root).free
    if free < 4 * a.size:
        shutil.rmtree(root, ignore_errors=True)
        print('qemu_mirror_bench: %d MiB free in %s, %d MiB needed'
              % (free // MiB, root, 4 * a.size // MiB), file=sys.stderr)
        return 2

    def log(line):
        if not a.quiet:
            print(line, file=sys.stderr, flush=True)

    _common.interrupt_on_sigterm()
    bench = Bench(a, root, log)
    status = 0
    try:
        bench.setup()
        runs = bench.run()
        summary = summarise(runs)
        print(format_table(summary, a))
        if a.json:
            with open(a.json, 'w') as f:
                json.dump({'config': {k: v for k, v in vars(a).items()},
                           'machine': _common.machine(),
                           'daemon_argv': bench.daemon_argv,
                           'target_argv': 'qemu-nbd --object tls-creds-x509,'
                           'id=tls0,endpoint=server,dir=PKI --tls-creds tls0 '
                           '-f raw -t -p PORT -b 127.0.0.1 -x "" FILE',
                           'runs': runs, 'summary': summary}, f, indent=1)
    except (BenchError, OSError) as exc:
        print('qemu_mirror_bench: error: %s' % exc, file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print('qemu_mirror_bench: interrupted', file=sys.stderr)
        status = 130
    finally:
        bench.cleanup()
        if a.keep:
            print('kept %s' % root, file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
