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

"""Helpers shared by the benchmarks.

Sizes, percentiles and histograms (pure), a free port, a tool's version,
the machine's description (``/proc``), stopping a child process, and a
SIGTERM that interrupts the benchmark (so that it cleans up).
"""

import math
import os
import platform
import signal
import socket
import statistics
import subprocess

MiB = 1 << 20
GiB = 1 << 30
UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}
#: buckets of xsm_driver's Counter latency histogram (bucket i holds
#: latencies of 2**(i-1) <= us < 2**i, the last one everything above)
HIST_BUCKETS = 28
#: issue 18's targets (its table, exactly): what report.py judges and
#: what each benchmark's own output names
TARGETS_18 = {'switch_over_p99_ms': 20.0, 'flat_from': GiB,
              'flat_to': 64 * GiB, 'latency_p99_ratio': 0.8,
              'copy_ratio': 3.0, 'fio_fraction': 0.5, 'cpu_ratio': 1.0,
              'multidisk_ratio': 1.5, 'rss_mib': 128.0}


def add_scratch_options(parser, kept=None):
    """``--workdir``, ``--json`` and ``--quiet`` of a benchmark script.

    :param kept: what the scratch folder holds, for a ``--keep`` that
        keeps it (e.g. ``'images, logs'``); None: no ``--keep``.
    """
    parser.add_argument('--workdir', help='parent folder of the scratch '
                        'folder (default $TMPDIR); the scratch folder is '
                        'removed at the end%s'
                        % (' unless --keep' if kept else ''))
    parser.add_argument('--json', metavar='OUT',
                        help='write all runs to OUT')
    if kept:
        parser.add_argument('--keep', action='store_true',
                            help='keep the scratch folder (%s)' % kept)
    parser.add_argument('--quiet', action='store_true',
                        help='no progress on stderr')


def parse_size(text):
    """``'512M'`` -> 536870912; ValueError for what is not a size."""
    t = str(text).strip().upper()
    if t.endswith('IB'):
        t = t[:-2]
    elif t.endswith('B'):
        t = t[:-1]
    unit = t[-1:] if t[-1:] in UNITS and t[-1:] else ''
    try:
        value = int(float(t[:len(t) - len(unit)]) * UNITS[unit])
    except ValueError:
        raise ValueError('%r is not a size (e.g. 512M, 4G)' % text)
    if value <= 0:
        raise ValueError('size %r must be positive' % text)
    return value


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def nearest_rank(values, p):
    """The p-th percentile by nearest rank (p99 of 20 values is the max)."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[max(1, math.ceil(p / 100.0 * len(values))) - 1]


def histogram(latencies_us, buckets=HIST_BUCKETS):
    """Latencies in us -> a histogram in the Counter filter's buckets."""
    hist = [0] * buckets
    for us in latencies_us:
        hist[min(int(us).bit_length(), buckets - 1)] += 1
    return hist


def hist_percentile(hist, p):
    """Percentile of a Counter histogram (bucket i: 2**(i-1) <= us < 2**i).

    The same estimate as ``migration_bench.py``'s: ``(low_us, high_us,
    estimate_us)``, the bucket and a geometric interpolation inside it;
    None when empty.
    """
    n = sum(hist)
    if not n:
        return None
    rank = max(1, math.ceil(p / 100.0 * n))
    cum = 0
    for i, count in enumerate(hist):
        if count and cum + count >= rank:
            low = 2 ** (i - 1) if i else 0
            high = 2 ** i
            frac = (rank - cum) / count
            est = low * (high / low) ** frac if low else high * frac
            return (low, high, round(est, 1))
        cum += count
    return None


def hist_cdf(hist):
    """``[(upper bound us, cumulative fraction)]`` of a histogram."""
    n = float(sum(hist))
    out, cum = [], 0
    for i, count in enumerate(hist):
        cum += count
        if n and count:
            out.append((2 ** i, cum / n))
    return out


def ratio(ours, peer):
    """ours / peer, None when either is missing or the peer is 0."""
    if ours is None or not peer:
        return None
    return ours / peer


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def tool_version(argv):
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        return out.stdout.decode('utf-8', 'replace').splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def machine():
    """What ran the benchmark: cores, memory, load, versions."""
    mem = None
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemTotal:'):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    model = None
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return {'cpus': os.cpu_count(), 'cpu_model': model,
            'memory_bytes': mem, 'loadavg': os.getloadavg(),
            'python': platform.python_version(),
            'platform': platform.platform(),
            'qemu-img': tool_version(['qemu-img', '--version']),
            'qemu-storage-daemon': tool_version(
                ['qemu-storage-daemon', '--version']),
            'nbdcopy': tool_version(['nbdcopy', '--version'])}


def stop_proc(proc, timeout=10):
    """Terminate a child process; kill it after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _interrupt(signum, frame):
    raise KeyboardInterrupt('signal %d' % signum)


def interrupt_on_sigterm():
    """Make SIGTERM raise KeyboardInterrupt: the benchmark cleans up."""
    signal.signal(signal.SIGTERM, _interrupt)
