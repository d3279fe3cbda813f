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

"""The round trip of one mirrored write: NBD over TLS, ours beside C peers.

Every guest write the mirror sends to the destination waits for one NBD
write round trip over TLS, whoever implements it. This benchmark measures
that round trip on this machine, for our client and server beside C ones,
so that the mirror's write latency can be read against its floor.

Clients:

``ours``
   :class:`xsm_driver.core.nbd.client.Client` in this process, one request
   at a time (``aio_pwrite`` and ``wait``, as the mirror sends a guest's
   write); timed around that call.
``qemu-io``
   QEMU's NBD block driver, fed a script of ``write`` and ``sleep``
   commands; the latency of a write is read from its own timing line
   (``... and N ops/sec``: 1 / N for one operation).

Servers, each with TLS and client certificates (one credentials folder,
``tls.make_credentials``), each serving a new raw file of ``--size``:
``xsm-nbd serve`` (ours), ``nbdkit file`` and ``qemu-nbd -f raw``.

Each client writes ``--writes`` random 4 KiB blocks to each server, once
paced (a sleep of ``1000 / --rate`` ms, rounded, after each write: the
verifying guest's pace in the latency benchmarks) and once back to back.
Every (client, server, pacing) runs ``--repeat`` times, in an order that
rotates from one repeat to the next; reported: the medians over the runs
of the exact p50 and p99 (nearest rank), with every run.

``python benchmarks/rtt_bench.py --json OUT``; see ``benchmarks/README.rst``.
"""

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (TOP, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from xsm_driver.core.nbd import client as nbd_client  # noqa: E402
from xsm_driver.core.nbd import tls  # noqa: E402

import _common  # noqa: E402

BLOCK = 4096
CLIENTS = ('ours', 'qemu-io')
SERVERS = ('xsm-nbd', 'nbdkit', 'qemu-nbd')
PACINGS = ('paced', 'back to back')
#: (tool, Debian package)
TOOLS = (('qemu-io', 'qemu-utils'), ('qemu-nbd', 'qemu-utils'),
         ('nbdkit', 'nbdkit'))
READY_TIMEOUT = 30.0
#: qemu-io's timing line of one request
_QEMU_IO_TIMING = re.compile(r'\band ([0-9.]+) ops/sec\)')


class BenchError(Exception):
    pass


# -- pure ---------------------------------------------------------------------

def gap_ms(rate):
    """The sleep after each paced write, in whole ms (qemu-io's unit)."""
    return max(1, round(1000.0 / rate))


def qemu_io_script(offsets, sleep_ms):
    """qemu-io commands writing 4 KiB at each offset, each then sleeping."""
    lines = []
    for off in offsets:
        lines.append('write %d %d' % (off, BLOCK))
        if sleep_ms:
            lines.append('sleep %d' % sleep_ms)
    return '\n'.join(lines) + '\n'


def qemu_io_latencies(output):
    """The latency (us) of each request in qemu-io's output."""
    return [1e6 / float(m.group(1))
            for m in _QEMU_IO_TIMING.finditer(output)
            if float(m.group(1)) > 0]


def run_stats(latencies):
    """Exact p50/p99/max of one run (nearest rank)."""
    return {'writes': len(latencies),
            'p50_us': _common.nearest_rank(latencies, 50),
            'p99_us': _common.nearest_rank(latencies, 99),
            'max_us': max(latencies) if latencies else None}


def summarise(runs):
    """Medians over the runs of each (client, server, pacing)."""
    groups = {}
    for r in runs:
        groups.setdefault((r['client'], r['server'], r['pacing']),
                          []).append(r)
    out = []
    for client in CLIENTS:
        for server in SERVERS:
            for pacing in PACINGS:
                rs = groups.get((client, server, pacing))
                if not rs:
                    continue
                out.append({
                    'client': client, 'server': server, 'pacing': pacing,
                    'p50_us': _common.median(r['p50_us'] for r in rs),
                    'p99_us': _common.median(r['p99_us'] for r in rs),
                    'p50_runs_us': [r['p50_us'] for r in rs],
                    'p99_runs_us': [r['p99_us'] for r in rs]})
    return out


def schedule(repeat):
    """The (client, server, pacing) of every run, rotating each repeat."""
    pairs = [(c, s, p) for c in CLIENTS for s in SERVERS for p in PACINGS]
    order = []
    for i in range(repeat):
        k = i * len(pairs) // repeat
        order.extend(pairs[k:] + pairs[:k])
    return order


def format_table(summary, args):
    lines = ['NBD write round trip over TLS, 4 KiB random writes, %d per '
             'run, paced = %d ms after each' % (args.writes,
                                                gap_ms(args.rate)),
             '%-8s %-9s %-13s %8s %8s  %s' % ('client', 'server', 'pacing',
                                              'p50 us', 'p99 us',
                                              'runs p50 / p99')]
    for s in summary:
        lines.append('%-8s %-9s %-13s %8.0f %8.0f  %s / %s' % (
            s['client'], s['server'], s['pacing'], s['p50_us'],
            s['p99_us'], ' '.join('%.0f' % v for v in s['p50_runs_us']),
            ' '.join('%.0f' % v for v in s['p99_runs_us'])))
    return '\n'.join(lines)


# -- the processes ------------------------------------------------------------

def server_argv(name, path, port, pki):
    if name == 'xsm-nbd':
        return [os.path.join(os.path.dirname(sys.executable), 'xsm-nbd'),
                'serve', '--port', str(port),
                '--tls-cert', os.path.join(pki, tls.SERVER_CERT),
                '--tls-key', os.path.join(pki, tls.SERVER_KEY),
                '--tls-ca', os.path.join(pki, tls.CA_CERT), path]
    if name == 'nbdkit':
        return ['nbdkit', '-f', '-i', '127.0.0.1', '-p', str(port),
                '--tls=require', '--tls-certificates=%s' % pki,
                '--tls-verify-peer', 'file', path]
    return ['qemu-nbd', '-f', 'raw', '-t', '-b', '127.0.0.1', '-p',
            str(port), '--object', 'tls-creds-x509,id=tls0,endpoint=server,'
            'verify-peer=on,dir=%s' % pki, '--tls-creds', 'tls0', path]


class Bench:

    def __init__(self, args, root, log):
        self.a, self.root, self.log = args, root, log
        self.pki = os.path.join(root, 'pki')
        self.procs = {}
        self.ports = {}
        self.argv = {}
        self.rng = random.Random(args.seed)

    def setup(self):
        tls.make_credentials(self.pki)
        for name in SERVERS:
            path = os.path.join(self.root, '%s.raw' % name)
            with open(path, 'wb') as f:
                f.truncate(self.a.size)
            port = _common.free_port()
            argv = server_argv(name, path, port, self.pki)
            logfile = open(os.path.join(self.root, '%s.log' % name), 'wb')
            self.procs[name] = subprocess.Popen(
                argv, stdout=logfile, stderr=subprocess.STDOUT)
            logfile.close()
            self.ports[name], self.argv[name] = port, argv
        for name in SERVERS:
            self._wait_listening(name)

    def _wait_listening(self, name):
        end = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < end:
            if self.procs[name].poll() is not None:
                raise BenchError('%s exited with %s: %s' % (
                    name, self.procs[name].returncode,
                    ' '.join(self.argv[name])))
            try:
                socket.create_connection(('127.0.0.1', self.ports[name]),
                                         1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise BenchError('%s is not listening after %s s'
                         % (name, READY_TIMEOUT))

    def offsets(self):
        blocks = self.a.size // BLOCK
        return [self.rng.randrange(blocks) * BLOCK
                for _ in range(self.a.writes)]

    def run_ours(self, server, sleep_ms):
        ctx = tls.client_context(os.path.join(self.pki, tls.CA_CERT),
                                 os.path.join(self.pki, tls.CLIENT_CERT),
                                 os.path.join(self.pki, tls.CLIENT_KEY))
        conn = nbd_client.Client('127.0.0.1', self.ports[server],
                                 tls_context=ctx,
                                 server_hostname='localhost').connect()
        data = os.urandom(BLOCK)
        latencies = []
        try:
            for off in self.offsets():
                t = time.perf_counter()
                conn.aio_pwrite(data, off).wait(30)
                latencies.append((time.perf_counter() - t) * 1e6)
                if sleep_ms:
                    time.sleep(sleep_ms / 1000.0)
        finally:
            conn.close()
        return latencies

    def run_qemu_io(self, server, sleep_ms):
        argv = ['qemu-io', '--object', 'tls-creds-x509,id=tls0,'
                'endpoint=client,dir=%s' % self.pki, '--image-opts',
                'driver=nbd,server.type=inet,server.host=localhost,'
                'server.port=%d,tls-creds=tls0' % self.ports[server]]
        script = qemu_io_script(self.offsets(), sleep_ms)
        try:
            done = subprocess.run(argv, input=script.encode(),
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT,
                                  timeout=60 + self.a.writes * 0.1)
        except subprocess.TimeoutExpired:
            raise BenchError('qemu-io against %s did not end' % server)
        out = done.stdout.decode('utf-8', 'replace')
        latencies = qemu_io_latencies(out)
        if done.returncode or len(latencies) != self.a.writes:
            raise BenchError('qemu-io against %s: exit %s, %d of %d writes '
                             'timed: %s' % (server, done.returncode,
                                            len(latencies), self.a.writes,
                                            out[-500:]))
        return latencies

    def run(self):
        runs = []
        sleep = gap_ms(self.a.rate)
        for client, server, pacing in schedule(self.a.repeat):
            ms = sleep if pacing == 'paced' else 0
            if client == 'ours':
                latencies = self.run_ours(server, ms)
            else:
                latencies = self.run_qemu_io(server, ms)
            stats = run_stats(latencies)
            stats.update(client=client, server=server, pacing=pacing)
            runs.append(stats)
            self.log('%s -> %s, %s: p50 %.0f us, p99 %.0f us' % (
                client, server, pacing, stats['p50_us'], stats['p99_us']))
        return runs

    def cleanup(self):
        for proc in self.procs.values():
            _common.stop_proc(proc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=_common.parse_size, default='1G',
                   help='each server\'s raw file (default 1G)')
    p.add_argument('--writes', type=int, default=2000,
                   help='writes per run (default 2000)')
    p.add_argument('--rate', type=int, default=500,
                   help='paced writes a second (default 500, the guest\'s '
                   'of the latency benchmarks)')
    p.add_argument('--repeat', type=int, default=3,
                   help='runs of each client, server and pacing, in '
                   'rotating order; medians (default 3)')
    p.add_argument('--seed', type=int, default=20261206,
                   help='seed of the random write offsets (default '
                   '20261206)')
    _common.add_scratch_options(p)
    a = p.parse_args(argv)
    if a.writes < 1 or a.rate < 1 or a.repeat < 1:
        p.error('--writes, --rate and --repeat must be at least 1')
    if a.size < BLOCK:
        p.error('--size must be at least %d bytes' % BLOCK)
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            print('rtt_bench: %s not found: apt-get install -y %s'
                  % (tool, package), file=sys.stderr)
            return 2

    def log(line):
        if not a.quiet:
            print(line, file=sys.stderr, flush=True)

    _common.interrupt_on_sigterm()
    try:
        root = tempfile.mkdtemp(prefix='xsm-rtt-', dir=a.workdir)
    except OSError as exc:
        print('rtt_bench: error: no work folder in %s: %s'
              % (a.workdir or tempfile.gettempdir(), exc.strerror),
              file=sys.stderr)
        return 1
    bench = Bench(a, root, log)
    status = 0
    try:
        bench.setup()
        runs = bench.run()
        summary = summarise(runs)
        print(format_table(summary, a))
        if a.json:
            with open(a.json, 'w') as f:
                json.dump({'config': vars(a), 'paced_gap_ms': gap_ms(a.rate),
                           'machine': _common.machine(),
                           'servers': bench.argv, 'runs': runs,
                           'summary': summary}, f, indent=1)
    except (BenchError, OSError, nbd_client.NBDError) as exc:
        print('rtt_bench: error: %s' % exc, file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print('rtt_bench: interrupted', file=sys.stderr)
        status = 130
    finally:
        bench.cleanup()
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == '__main__':
    sys.exit(main())
