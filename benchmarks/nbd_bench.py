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

"""Our NBD server beside qemu-nbd, copied by nbdcopy, same machine, same run.

Method
------

Two dynamic VHDs are made with our engine from seeded random data: a dense
one (``--dense``, default 2 GiB, every block written) and a sparse one
(``--sparse`` virtual, default 16 GiB, of which ``--alloc``, default 1 GiB,
is written as ``--run``-sized runs, default 64 MiB, scattered over the
disk).  ``qemu-img compare -f vpc`` checks, untimed, that qemu reads each
image as the same bytes as our ``ops.export`` of it.

Each image is served read-only four times, for the whole run: by our server
(a separate Python process, ``xsm-nbd serve`` when that command works,
otherwise an inline script around ``xsm_driver.core.nbd.server.Server``)
and by ``qemu-nbd -f vpc``, each plain and with TLS.  Both TLS servers use
the same credentials folder (``tls.make_credentials``) and both demand the
client certificate.  Both servers offer multi-conn (qemu-nbd needs
``-e N`` for that), and nbdcopy is run with the same ``-C N`` against both.

A workload is one ``nbdcopy URI DEST`` of a whole image: to ``null:`` (pure
read throughput) or to a raw file (``nbdcopy`` skips the holes it learns of
through ``base:allocation``, on both servers).  Time is the wall clock of
the nbdcopy process.  Each workload runs ``--warmup`` times untimed, then
``--repeat`` times; ours and qemu's runs are interleaved and their order
reversed every other repeat; the median is reported with every run.
``os.sync()`` comes before each run and the output file is removed after
it, untimed.  The first output file of each server and workload is checked
against the reference with ``qemu-img compare`` (untimed).

Reported: MB/s (10^6 bytes) of virtual and of allocated bytes, the ratio
ours / qemu-nbd (target: >= 0.8), the cost of the sparse image relative to
the dense one scaled to the same allocated bytes (about 1.0 when the cost
is proportional to the allocated bytes, ``--sparse / --alloc`` if it were
proportional to the virtual size), and the peak RSS (``VmHWM``) of every
server process, read just before it is stopped.

Run ``python benchmarks/nbd_bench.py --help``; see ``benchmarks/README.rst``.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import pstats
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import ops

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

free_port = _common.free_port

MiB = 1024 * 1024
BLOCK = 2 * MiB
UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
QUICK = {'dense': '256M', 'sparse': '2G', 'alloc': '128M', 'run': '8M'}
FULL = {'dense': '2G', 'sparse': '16G', 'alloc': '1G', 'run': '64M'}
READY_TIMEOUT = 30.0

# Our server when ``xsm-nbd serve`` is not there (or ``--server inline``):
# argv is IMAGE PORT [PKI-DIR].  With $XSM_NBD_BENCH_PROFILE set, every
# thread runs under its own cProfile and the merged stats are written to
# that path when the process is stopped (SIGTERM).
SERVE_SCRIPT = r'''
import os, signal, sys, threading
from xsm_driver.core.block import backends
from xsm_driver.core.nbd import server, tls

image, port = sys.argv[1], int(sys.argv[2])
pki = sys.argv[3] if len(sys.argv) > 3 else None
out = os.environ.get('XSM_NBD_BENCH_PROFILE')
profiles = []
if out:
    import cProfile
    _run = threading.Thread.run

    def _profiled(self):
        prof = cProfile.Profile()
        prof.enable()
        try:
            _run(self)
        finally:
            prof.disable()
            profiles.append(prof)
    threading.Thread.run = _profiled
ctx = None
if pki:
    ctx = tls.server_context(os.path.join(pki, tls.SERVER_CERT),
                             os.path.join(pki, tls.SERVER_KEY),
                             os.path.join(pki, tls.CA_CERT))


def _stop(*_):
    sys.exit(0)


signal.signal(signal.SIGTERM, _stop)
srv = server.Server({'': backends.VHDDevice(image)}, port=port,
                    tls_context=ctx).start()
print(srv.address[1], flush=True)
try:
    while True:
        signal.pause()
finally:
    srv.stop()
    if out and profiles:
        import pstats
        pstats.Stats(*profiles).dump_stats(out)
'''


def parse_size(text):
    text = text.strip().upper().rstrip('B').rstrip('I')
    unit = text[-1:] if text[-1:] in UNITS else ''
    value = int(float(text[:len(text) - len(unit)]) * UNITS[unit])
    if value <= 0 or value % BLOCK:
        raise argparse.ArgumentTypeError('sizes must be positive multiples '
                                         'of 2 MiB')
    return value


# -- helpers ------------------------------------------------------------------

def remove(*paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def run_cmd(argv):
    """Run a tool; fail loudly on a non-zero exit."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.decode('utf-8', 'replace')
    if proc.returncode:
        raise RuntimeError('%s exited %d:\n%s'
                           % (' '.join(argv), proc.returncode, out[-2000:]))
    return out


def tool_version(argv):
    out = subprocess.run(argv, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    return out.stdout.decode('utf-8', 'replace').splitlines()[0].strip()


def vm_hwm_kib(pid):
    """Peak resident set size of a live process, from /proc (KiB)."""
    try:
        with open('/proc/%d/status' % pid) as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU time of a live process and its threads."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3 of proc(5)); utime, stime: 14, 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def xsm_nbd_path():
    """``xsm-nbd`` beside this interpreter, if ``xsm-nbd serve`` works."""
    path = os.path.join(os.path.dirname(sys.executable), 'xsm-nbd')
    if not os.access(path, os.X_OK):
        return None
    proc = subprocess.run([path, 'serve', '--help'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = proc.stdout.decode('utf-8', 'replace')
    if proc.returncode or '--read-only' not in text or '--tls-ca' not in text:
        return None
    return path


# -- servers ------------------------------------------------------------------

class NBDServer:
    """A server process serving one image, plain or TLS, read-only."""

    def __init__(self, side, argv, port, pki, env=None, log=None, cwd=None):
        self.side, self.argv, self.port, self.pki = side, argv, port, pki
        self.uri = ('nbds://127.0.0.1:%d/?tls-certificates=%s' % (port, pki)
                    if pki else 'nbd://127.0.0.1:%d/' % port)
        self.log = log
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)
        self.rss_kib = None

    def wait_ready(self):
        """Poll with nbdinfo until a real NBD handshake succeeds."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('%s exited %d before serving'
                                   % (' '.join(self.argv),
                                      self.proc.returncode))
            try:
                probe = subprocess.run(['nbdinfo', '--size', self.uri],
                                       stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, timeout=10)
                if probe.returncode == 0:
                    return self
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError('%s not serving after %.0f s'
                                   % (' '.join(self.argv), READY_TIMEOUT))
            time.sleep(0.1)

    def stop(self):
        if self.proc.poll() is None:
            self.rss_kib = vm_hwm_kib(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the benchmark ------------------------------------------------------------

class Bench:

    def __init__(self, args):
        self.args = args
        self.dir = args.dir
        self.pki = os.path.join(self.dir, 'pki')
        self.results = []
        self.servers = {}
        self.setup_notes = {}
        self.images = {}
        self.profile_text = None
        self.launcher = None
        self._logs = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def log(self, msg):
        if not self.args.quiet:
            print(msg, file=sys.stderr, flush=True)

    # -- fixtures (untimed) --------------------------------------------------

    def make_image(self, name, size, runs, seed):
        """A dynamic VHD with seeded random data written at ``runs``."""
        img, ref = self.path(name + '.vhd'), self.path(name + '.ref.raw')
        rng = random.Random(seed)
        ops.create(img, size)
        with vhd_chain.Chain(img, writable=True) as c:
            for start, length in runs:
                for off in range(start, start + length, BLOCK):
                    c.pwrite(rng.randbytes(BLOCK), off)
            c.flush()
        with vhd_chain.Chain(img) as c:
            allocated = sum(n for _o, n, a in c.extents(0, size) if a)
        ops.export(img, ref)
        t = time.perf_counter()
        out = run_cmd(['qemu-img', 'compare', '-f', 'vpc', '-F', 'raw',
                       img, ref])
        self.setup_notes['qemu-img compare -f vpc %s.vhd %s.ref.raw'
                         % (name, name)] = (out.strip(),
                                            round(time.perf_counter() - t, 2))
        self.images[name] = {'path': img, 'ref': ref, 'size': size,
                             'allocated': allocated, 'runs': len(runs)}

    def make_images(self):
        a = self.args
        self.make_image('dense', a.dense, [(0, a.dense)], a.seed + 1)
        slots = a.sparse // a.run
        rng = random.Random(a.seed + 2)
        picked = sorted(rng.sample(range(slots), a.alloc // a.run))
        self.make_image('sparse', a.sparse,
                        [(i * a.run, a.run) for i in picked], a.seed + 3)

    def ours_argv(self, image, port, pki, force_inline=False):
        if self.launcher and not force_inline:
            argv = [self.launcher, 'serve', image, '--port', str(port),
                    '--read-only']
            if pki:
                argv += ['--tls-cert', os.path.join(pki, tls.SERVER_CERT),
                         '--tls-key', os.path.join(pki, tls.SERVER_KEY),
                         '--tls-ca', os.path.join(pki, tls.CA_CERT)]
            return argv
        return ([sys.executable, '-c', SERVE_SCRIPT, image, str(port)] +
                ([pki] if pki else []))

    def qemu_argv(self, image, port, pki):
        argv = ['qemu-nbd']
        if pki:
            argv += ['--object', 'tls-creds-x509,id=tls0,endpoint=server,'
                     'dir=%s' % pki, '--tls-creds', 'tls0']
        return argv + ['-f', 'vpc', '-r', '-t', '-e',
                       str(self.args.connections), '-p', str(port),
                       '-x', '', image]

    def start_server(self, side, image, transport, env=None,
                     force_inline=False):
        port = free_port()
        pki = self.pki if transport == 'tls' else None
        path = self.images[image]['path']
        argv = (self.ours_argv(path, port, pki, force_inline)
                if side == 'ours' else self.qemu_argv(path, port, pki))
        log = open(self.path('%s-%s-%s.log' % (side, image, transport)), 'ab')
        self._logs.append(log)
        # cwd: the inline server's sys.path[0] is its working folder; run
        # it in ours so that it imports the same xsm_driver as this process
        srv = NBDServer(side, argv, port, pki, env=env, log=log, cwd=self.dir)
        try:
            srv.wait_ready()
        except BaseException:
            srv.stop()
            raise
        return srv

    def start_servers(self):
        for image in self.images:
            for transport in ('plain', 'tls'):
                for side in ('ours', 'qemu'):
                    key = (side, image, transport)
                    self.servers[key] = self.start_server(side, image,
                                                          transport)

    def stop_servers(self):
        for srv in self.servers.values():
            srv.stop()
        for log in self._logs:
            log.close()

    # -- running -------------------------------------------------------------

    def nbdcopy(self, uri, dest):
        return ['nbdcopy', '-C', str(self.args.connections), uri, dest]

    def measure(self, image, transport, dest):
        name = '%s/%s/%s' % (image, transport, dest)
        if self.args.only and name not in self.args.only:
            return
        info = self.images[image]
        out = self.path('out.raw')
        target = 'null:' if dest == 'null' else out
        sides = ('ours', 'qemu')
        runs = {side: [] for side in sides}
        cpu = {side: [] for side in sides}
        warm = self.args.warmup
        verified = set()
        for rep in range(warm + self.args.repeat):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                srv = self.servers[(side, image, transport)]
                argv = self.nbdcopy(srv.uri, target)
                os.sync()
                try:
                    c0 = cpu_seconds(srv.proc.pid)
                    t = time.perf_counter()
                    run_cmd(argv)
                    took = time.perf_counter() - t
                    used = cpu_seconds(srv.proc.pid) - c0
                    if dest == 'file' and side not in verified:
                        # untimed: the copy is the image, byte for byte
                        run_cmd(['qemu-img', 'compare', '-f', 'raw', '-F',
                                 'raw', out, info['ref']])
                        verified.add(side)
                finally:
                    remove(out)
                if rep >= warm:
                    runs[side].append(took)
                    cpu[side].append(used)
                self.log('  %-20s %-4s %8.1f MB/s virtual %8.1f MB/s '
                         'allocated%s'
                         % (name, side, info['size'] / took / 1e6,
                            info['allocated'] / took / 1e6,
                            ' (warm-up, not counted)' if rep < warm else ''))
        rows = {}
        for side in sides:
            med = statistics.median(runs[side])
            rows[side] = {
                'side': side, 'seconds': runs[side], 'median_seconds': med,
                'server_cpu_seconds': cpu[side],
                'median_server_cpu_seconds': statistics.median(cpu[side]),
                'mb_per_s_virtual': info['size'] / med / 1e6,
                'mb_per_s_allocated': info['allocated'] / med / 1e6,
                'command': ' '.join(self.nbdcopy(
                    self.servers[(side, image, transport)].uri, target)),
            }
        self.results.append({
            'workload': name, 'image': image, 'transport': transport,
            'dest': dest, 'virtual_bytes': info['size'],
            'allocated_bytes': info['allocated'],
            'verified': sorted(verified),
            'ratio_ours_over_qemu': (rows['qemu']['median_seconds'] /
                                     rows['ours']['median_seconds']),
            'rows': [rows[s] for s in sides]})

    def profile(self, name):
        """Serve once more under cProfile (inline server) and copy once."""
        image, transport, dest = name.split('/')
        stats_path = self.path('profile.pstats')
        env = dict(os.environ, XSM_NBD_BENCH_PROFILE=stats_path)
        srv = self.start_server('ours', image, transport, env=env,
                                force_inline=True)
        out = self.path('out.raw')
        try:
            t = time.perf_counter()
            run_cmd(self.nbdcopy(srv.uri,
                                 'null:' if dest == 'null' else out))
            took = time.perf_counter() - t
        finally:
            remove(out)
            srv.stop()
        text = io.StringIO()
        stats = pstats.Stats(stats_path, stream=text)
        stats.sort_stats('tottime').print_stats(20)
        self.profile_text = ('cProfile of our server (all threads), %s, one '
                             'nbdcopy, %.2f s under the profiler:\n%s'
                             % (name, took, text.getvalue()))
        remove(stats_path)

    def run(self):
        a = self.args
        t = time.perf_counter()
        self.log('setup: credentials, a %d MiB dense and a %d MiB virtual / '
                 '%d MiB allocated sparse VHD in %s'
                 % (a.dense // MiB, a.sparse // MiB, a.alloc // MiB,
                    self.dir))
        tls.make_credentials(self.pki)
        self.make_images()
        self.setup_notes['setup seconds'] = round(time.perf_counter() - t, 1)
        self.setup_notes['xsm_driver from'] = os.path.abspath(
            os.path.join(os.path.dirname(tls.__file__), '..', '..'))
        self.launcher = None if a.server == 'inline' else xsm_nbd_path()
        if a.server == 'xsm-nbd' and not self.launcher:
            raise RuntimeError('xsm-nbd serve is not available')
        self.setup_notes['our server'] = (
            '%s serve IMAGE --port P --read-only [--tls-*]' % self.launcher
            if self.launcher else
            'inline script: Server({"": VHDDevice(IMAGE)}, port=P, '
            'tls_context=server_context(cert, key, ca))')
        try:
            self.start_servers()
            for image in ('dense', 'sparse'):
                for transport in ('plain', 'tls'):
                    for dest in ('null', 'file'):
                        self.measure(image, transport, dest)
        finally:
            self.stop_servers()
        if a.profile:
            self.profile(a.profile)

    # -- report --------------------------------------------------------------

    def sparse_cost(self):
        """time(sparse) / (time(dense) * allocated(sparse) / size(dense))."""
        by = {r['workload']: r for r in self.results}
        dense, sparse = self.images['dense'], self.images['sparse']
        scale = sparse['allocated'] / dense['allocated']
        virt = sparse['size'] / dense['allocated']
        rows = []
        for transport in ('plain', 'tls'):
            for dest in ('null', 'file'):
                d = by.get('dense/%s/%s' % (transport, dest))
                s = by.get('sparse/%s/%s' % (transport, dest))
                if not d or not s:
                    continue
                for i, side in enumerate(('ours', 'qemu')):
                    td = d['rows'][i]['median_seconds']
                    ts = s['rows'][i]['median_seconds']
                    rows.append({
                        'transport': transport, 'dest': dest, 'side': side,
                        'sparse_seconds': ts,
                        'dense_seconds_scaled_to_allocated': td * scale,
                        'dense_seconds_scaled_to_virtual': td * virt,
                        'cost_vs_allocated': ts / (td * scale),
                        'cost_vs_virtual': ts / (td * virt)})
        return rows

    def report(self, out=sys.stdout):
        a = self.args
        dense, sparse = self.images['dense'], self.images['sparse']
        print('NBD: our server vs %s, copied by %s -C %d; repeat %d '
              '(+%d warm-up), median of runs; MB = 10^6 bytes; page cache '
              'warm' % (tool_version(['qemu-nbd', '--version']),
                        tool_version(['nbdcopy', '--version']),
                        a.connections, a.repeat, a.warmup), file=out)
        print('images: dense %d MiB (all allocated); sparse %d MiB virtual, '
              '%d MiB allocated in %d runs of %d MiB'
              % (dense['size'] // MiB, sparse['size'] // MiB,
                 sparse['allocated'] // MiB, sparse['runs'], a.run // MiB),
              file=out)
        print('ratio = ours MB/s / qemu-nbd MB/s (= qemu time / our time); '
              'target >= 0.80 (! below); srv CPU = median CPU seconds '
              '(user+sys, all threads) of the server process during a copy',
              file=out)
        print('', file=out)
        print('%-20s %-4s %8s %10s %10s  %-6s %7s  %s'
              % ('workload', 'side', 'median', 'MB/s virt', 'MB/s alloc',
                 'ratio', 'srv CPU', 'runs (s)'), file=out)
        for res in self.results:
            for row in res['rows']:
                ratio = ('%5.2f%s' % (res['ratio_ours_over_qemu'],
                                      '' if res['ratio_ours_over_qemu'] >= 0.8
                                      else '!')
                         if row['side'] == 'ours' else '')
                print('%-20s %-4s %7.2fs %10.1f %10.1f  %-6s %6.2fs  %s'
                      % (res['workload'] if row['side'] == 'ours' else '',
                         row['side'], row['median_seconds'],
                         row['mb_per_s_virtual'], row['mb_per_s_allocated'],
                         ratio, row['median_server_cpu_seconds'],
                         ' '.join('%.2f' % s for s in row['seconds'])),
                      file=out)
        cost = self.sparse_cost()
        if cost:
            print('', file=out)
            print('sparse cost: time(sparse) / time(dense scaled to the '
                  'same allocated bytes); 1.00 = proportional to allocated '
                  'bytes, %.1f = proportional to virtual size'
                  % (sparse['size'] / sparse['allocated']), file=out)
            print('%-12s %-4s %9s %14s %6s' % ('case', 'side', 'sparse',
                                               'dense scaled', 'cost'),
                  file=out)
            for row in cost:
                print('%-12s %-4s %8.2fs %13.2fs %6.2f'
                      % ('%s/%s' % (row['transport'], row['dest']),
                         row['side'], row['sparse_seconds'],
                         row['dense_seconds_scaled_to_allocated'],
                         row['cost_vs_allocated']), file=out)
        print('', file=out)
        for (side, image, transport), srv in self.servers.items():
            if srv.rss_kib is not None:
                print('peak RSS (VmHWM) %-4s %-6s %-5s %7.1f MiB'
                      % (side, image, transport, srv.rss_kib / 1024),
                      file=out)
        for key, value in self.setup_notes.items():
            print('setup: %s: %s' % (key, value), file=out)
        for side in ('ours', 'qemu'):
            srv = self.servers.get((side, 'dense', 'tls'))
            if srv:
                print('server %s (TLS): %s' % (side, ' '.join(
                    "''" if x == '' else
                    '<SERVE_SCRIPT>' if x == SERVE_SCRIPT else x
                    for x in srv.argv)), file=out)
        if self.profile_text:
            print('', file=out)
            print(self.profile_text, file=out)

    def as_json(self):
        return {
            'config': {k: getattr(self.args, k) for k in (
                'dense', 'sparse', 'alloc', 'run', 'repeat', 'warmup',
                'connections', 'seed', 'quick', 'dir')},
            'machine': {'python': sys.version.split()[0],
                        'platform': platform.platform(),
                        'cpus': os.cpu_count(),
                        'qemu-nbd': tool_version(['qemu-nbd', '--version']),
                        'nbdcopy': tool_version(['nbdcopy', '--version'])},
            'images': {k: {x: v[x] for x in ('size', 'allocated', 'runs')}
                       for k, v in self.images.items()},
            'setup': self.setup_notes,
            'servers': [{'side': side, 'image': image,
                         'transport': transport, 'argv': [
                             '<SERVE_SCRIPT>' if x == SERVE_SCRIPT else x
                             for x in srv.argv],
                         'peak_rss_kib': srv.rss_kib}
                        for (side, image, transport), srv
                        in self.servers.items()],
            'results': self.results,
            'sparse_cost': self.sparse_cost(),
            'profile': self.profile_text,
        }


WORKLOADS = tuple('%s/%s/%s' % (i, t, d) for i in ('dense', 'sparse')
                  for t in ('plain', 'tls') for d in ('null', 'file'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='small images (dense %(dense)s, sparse %(sparse)s '
                   'with %(alloc)s in %(run)s runs) and --repeat 1, unless '
                   'given' % QUICK)
    p.add_argument('--dense', type=parse_size,
                   help='size of the dense image (default %s)' % FULL['dense'])
    p.add_argument('--sparse', type=parse_size,
                   help='virtual size of the sparse image (default %s)'
                   % FULL['sparse'])
    p.add_argument('--alloc', type=parse_size,
                   help='allocated bytes of the sparse image (default %s)'
                   % FULL['alloc'])
    p.add_argument('--run', type=parse_size,
                   help='length of each allocated run of the sparse image '
                   '(default %s)' % FULL['run'])
    p.add_argument('--repeat', type=int,
                   help='timed runs of each case; the median is reported '
                   '(default 3, 1 with --quick)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs of each case first (default 1)')
    p.add_argument('--connections', type=int, default=4,
                   help='nbdcopy -C N and qemu-nbd -e N (default 4, '
                   "nbdcopy's own default)")
    p.add_argument('--server', choices=('auto', 'xsm-nbd', 'inline'),
                   default='auto', help='how our server is started: '
                   '"xsm-nbd serve" if it works (auto), or an inline '
                   'script around Server')
    p.add_argument('--dir', help='folder for the images (default: a new '
                   'temporary folder under $TMPDIR, removed at the end)')
    p.add_argument('--json', metavar='OUT', help='write all runs to OUT')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the images\' data and of where the sparse '
                   'image\'s runs lie (default 20240601)')
    p.add_argument('--only', type=lambda s: s.split(','),
                   help='comma-separated workloads, of: %s'
                   % ', '.join(WORKLOADS))
    p.add_argument('--profile', metavar='WORKLOAD', choices=WORKLOADS,
                   help='at the end, serve WORKLOAD once more from an inline '
                   'server under cProfile and print its 20 top functions')
    p.add_argument('--keep', action='store_true',
                   help='keep the images, credentials and server logs')
    p.add_argument('--quiet', action='store_true',
                   help='no per-run progress on stderr')
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, parse_size(default))
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1 or args.warmup < 0 or args.connections < 1:
        p.error('--repeat and --connections must be >= 1, --warmup >= 0')
    if args.alloc % args.run or args.alloc > args.sparse:
        p.error('--alloc must be a multiple of --run and <= --sparse')
    for tool in ('qemu-img', 'qemu-nbd', 'nbdcopy', 'nbdinfo'):
        if not shutil.which(tool):
            p.error('%s not found (apt-get install qemu-utils libnbd-bin)'
                    % tool)
    if args.only:
        bad = set(args.only) - set(WORKLOADS)
        if bad:
            p.error('unknown workload(s): %s' % ', '.join(sorted(bad)))
    parent = args.dir
    if parent:
        os.makedirs(parent, exist_ok=True)
    args.dir = tempfile.mkdtemp(prefix='nbd-bench-', dir=parent)
    need = 3 * (args.dense + args.alloc) + 64 * MiB
    free = shutil.disk_usage(args.dir).free
    if free < need:
        os.rmdir(args.dir)
        p.error('%s has %d MiB free; about %d MiB are needed'
                % (args.dir, free // MiB, need // MiB))
    _common.interrupt_on_sigterm()
    bench = Bench(args)
    try:
        bench.run()
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130
    finally:
        bench.stop_servers()
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
        else:
            print('kept %s' % args.dir, file=sys.stderr)
    bench.report()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(bench.as_json(), f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
