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

"""Throughput of the VHD engine beside qemu's vpc driver, same machine, run.

Method
------

Every workload moves the same bytes through our engine
(:class:`xsm_driver.core.vhd.chain.Chain`, called in this process) and
through a qemu tool (a child process), on images in one folder of one
file system.  Each case is run ``--repeat`` times, ours and qemu's
interleaved and their order alternated from one repeat to the next, and the
median of the runs is reported, with every run beside it.

* Time is wall-clock (``time.perf_counter``) around the whole operation:
  for ours, opening the chain, the requests, ``flush`` (one ``fsync``) for
  writes and ``close``; for qemu, the whole child process (start-up of a
  few milliseconds included) and, for writes, one ``fsync`` of the output
  done here, in the timed region.  qemu's write peers run with
  ``-t unsafe`` so that, like ours, they make the data durable once at the
  end and not at every block allocation (qemu's vpc driver syncs the BAT
  after each allocation when the cache mode is ``writeback``).
* No ``O_DIRECT`` anywhere and caches are never dropped: the page cache is
  warm for both sides, so reads measure CPU and memory-copy cost, and
  writes include writing back the dirty pages at the final ``fsync``.
* Requests are issued one at a time (depth 1) on both sides, except for
  ``qemu-img convert``, which keeps its default of 8 requests in flight.
* Data: ours writes seeded random bytes (never zeros, which an engine may
  special-case); ``qemu-img convert`` copies the very same raw file;
  ``qemu-img bench`` and ``qemu-io`` write the pattern byte 0x5a (they take
  no data file for a stream of requests).
* Random offsets come from a seeded RNG; the same list is used by both
  sides.  qemu's peer for random requests is a ``qemu-io`` script (one
  ``read -q``/``write -q`` line a request) fed on stdin, so qemu's number
  includes parsing each command line: that favours ours slightly.
* Reads through a 3-deep chain (base filled, mid and leaf each with ~1/3
  rewritten as scattered 64 KiB pieces) have no qemu peer: qemu does not
  follow VHD parent locators.  Their peer is qemu reading the base, a
  single filled dynamic VHD of the same size, and the output says so.

Run ``python benchmarks/vhd_bench.py --help``; see ``benchmarks/README.rst``.
"""

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
REQ_BIG = 2 * MiB
REQ_SMALL = 4096
PATTERN = 0x5a
PIECE = 64 * 1024          # rewrite unit of the snapshot layers
UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30, 'T': 1 << 40}


def parse_size(text):
    text = text.strip().upper().rstrip('B').rstrip('I')
    unit = text[-1:] if text[-1:] in UNITS else ''
    value = int(float(text[:len(text) - len(unit)]) * UNITS[unit])
    if value <= 0 or value % REQ_BIG:
        raise argparse.ArgumentTypeError('size must be a positive multiple '
                                         'of 2 MiB')
    return value


# -- helpers ------------------------------------------------------------------

def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(*paths):
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o644)
            os.unlink(path)


def run_cmd(argv, stdin_path=None):
    """Run a qemu tool; fail loudly on a non-zero exit or an I/O error."""
    stdin = open(stdin_path, 'rb') if stdin_path else subprocess.DEVNULL
    try:
        proc = subprocess.run(argv, stdin=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    finally:
        if stdin_path:
            stdin.close()
    out = proc.stdout.decode('utf-8', 'replace')
    low = out.lower()
    if proc.returncode or 'error' in low or 'failed' in low:
        raise RuntimeError('%s exited %d:\n%s'
                           % (' '.join(argv), proc.returncode, out[-2000:]))
    return out


def case(side, label, run, setup=None, cleanup=None, pair=None):
    """One contender of a workload.

    ``pair`` names the ours row a qemu row is compared with (default: the
    workload's first ours row).
    """
    return {'side': side, 'label': label, 'run': run, 'setup': setup,
            'cleanup': cleanup, 'pair': pair}


def stride_offsets(size, unit, count):
    """Offsets ``qemu-img bench -S STEP`` visits, and STEP.

    bench starts at 0 and adds STEP modulo the image size; a step of about
    0.618 of the disk, coprime with the number of slots, lands every
    request far from the previous one and repeats no slot before all were
    visited -- the nearest qemu-img bench gets to random requests.
    """
    slots = size // unit
    k = max(1, int(slots * 0.6180339887)) | 1
    while math.gcd(k, slots) != 1:
        k += 2
    return [(i * k % slots) * unit for i in range(count)], k * unit


def random_offsets(seed, size, unit, count):
    rng = random.Random(seed)
    slots = size // unit
    return [rng.randrange(slots) * unit for _ in range(count)]


def qemu_io_script(path, offsets, length, write):
    with open(path, 'w') as f:
        for off in offsets:
            if write:
                f.write('write -q -P 0x%02x %d %d\n' % (PATTERN, off, length))
            else:
                f.write('read -q %d %d\n' % (off, length))
        if write:
            f.write('flush\n')
    return path


def qemu_version():
    out = subprocess.run(['qemu-img', '--version'], stdout=subprocess.PIPE)
    return out.stdout.decode().splitlines()[0]


# -- our side -----------------------------------------------------------------

def ours_write_from_raw(img, raw, size):
    """Copy ``raw`` into the fresh image ``img`` in 2 MiB requests."""
    buf = bytearray(REQ_BIG)
    fd = os.open(raw, os.O_RDONLY)
    try:
        with vhd_chain.Chain(img, writable=True) as c:
            for off in range(0, size, REQ_BIG):
                os.preadv(fd, [buf], off)
                c.pwrite(buf, off)
            c.flush()
    finally:
        os.close(fd)


def ours_write_at(img, offsets, data):
    with vhd_chain.Chain(img, writable=True) as c:
        for off in offsets:
            c.pwrite(data, off)
        c.flush()


def ours_read_seq(img, size, length=REQ_BIG):
    with vhd_chain.Chain(img) as c:
        for off in range(0, size, length):
            c.pread(off, length)


def ours_read_seq_into(img, size, length=REQ_BIG):
    buf = bytearray(length)
    with vhd_chain.Chain(img) as c:
        for off in range(0, size, length):
            c.read_into(buf, off)


def ours_read_at(img, offsets, length):
    with vhd_chain.Chain(img) as c:
        for off in offsets:
            c.pread(off, length)


# -- the benchmark ------------------------------------------------------------

class Bench:

    def __init__(self, args):
        self.args = args
        self.size = args.size
        self.dir = args.dir
        self.seed = args.seed
        self.results = []
        rng = random.Random(self.seed)
        self.data_small = rng.randbytes(REQ_SMALL)
        self.data_big = rng.randbytes(REQ_BIG)
        self.raw = self.path('src.raw')
        self.filled = self.path('filled.vhd')
        self.mid = self.path('mid.vhd')
        self.leaf = self.path('leaf.vhd')
        self.setup_notes = {}

    def path(self, name):
        return os.path.join(self.dir, name)

    def log(self, msg):
        if not self.args.quiet:
            print(msg, file=sys.stderr, flush=True)

    # -- fixtures (untimed) --------------------------------------------------

    def make_raw(self):
        rng = random.Random(self.seed + 1)
        with open(self.raw, 'wb') as f:
            for _ in range(0, self.size, REQ_BIG):
                f.write(rng.randbytes(REQ_BIG))

    def make_filled(self):
        ops.create(self.filled, self.size)
        ours_write_from_raw(self.filled, self.raw, self.size)
        # Cross-check: qemu reads our image as the same bytes as the source.
        t = time.perf_counter()
        out = run_cmd(['qemu-img', 'compare', '-f', 'vpc', '-F', 'raw',
                       self.filled, self.raw])
        self.setup_notes['qemu-img compare filled.vhd src.raw'] = (
            out.strip(), round(time.perf_counter() - t, 2))

    def make_chain(self):
        """base = filled; mid and leaf each rewrite ~1/3 in 64 KiB pieces."""
        pieces = self.size // PIECE
        for layer, parent, seed in ((self.mid, self.filled, 11),
                                    (self.leaf, self.mid, 12)):
            ops.snapshot(layer, parent)
            rng = random.Random(self.seed + seed)
            offsets = sorted(i * PIECE for i in
                             rng.sample(range(pieces), pieces // 3))
            data = rng.randbytes(PIECE)
            with vhd_chain.Chain(layer, writable=True) as c:
                for off in offsets:
                    c.pwrite(data, off)
                c.flush()
        with vhd_chain.Chain(self.leaf) as c:
            self.setup_notes['chain depth'] = c.depth

    # -- running -------------------------------------------------------------

    def measure(self, name, nbytes, nops, contenders):
        """Run every contender ``repeat`` times; record and print medians.

        :param contenders: dicts made by :func:`case`.  Before each timed
            run, ``setup`` (untimed) and ``os.sync()`` run, so that no run
            pays for writing back another's dirty pages; ``cleanup`` runs
            after it, untimed.
        """
        if self.args.only and name not in self.args.only:
            return
        runs = {c['label']: [] for c in contenders}
        warm = self.args.warmup
        for rep in range(warm + self.args.repeat):
            order = contenders if rep % 2 == 0 else contenders[::-1]
            for c in order:
                if c['setup']:
                    c['setup']()
                os.sync()
                try:
                    t = time.perf_counter()
                    c['run']()
                    took = time.perf_counter() - t
                finally:
                    if c['cleanup']:
                        c['cleanup']()
                if rep >= warm:
                    runs[c['label']].append(took)
                self.log('  %-18s %-46s %8.1f MB/s%s'
                         % (name, c['label'], nbytes / took / 1e6,
                            ' (warm-up, not counted)' if rep < warm else ''))
        rows = {}
        for c in contenders:
            med = statistics.median(runs[c['label']])
            rows[c['label']] = {
                'side': c['side'], 'label': c['label'],
                'seconds': runs[c['label']], 'median_seconds': med,
                'mb_per_s': nbytes / med / 1e6, 'ops_per_s': nops / med,
                'runs_mb_per_s': [nbytes / s / 1e6
                                  for s in runs[c['label']]]}
        first_ours = next(c['label'] for c in contenders
                          if c['side'] == 'ours')
        for c in contenders:
            if c['side'] == 'qemu':
                mine = rows[c['pair'] or first_ours]
                row = rows[c['label']]
                row['compared_with'] = mine['label']
                row['ratio_ours_over_qemu'] = (mine['mb_per_s'] /
                                               row['mb_per_s'])
        self.results.append({'workload': name, 'bytes': nbytes,
                             'requests': nops,
                             'rows': [rows[c['label']] for c in contenders],
                             'note': self.notes.get(name)})
        if self.args.profile == name:
            self.profile(name, contenders)

    def profile(self, name, contenders):
        c = next(c for c in contenders if c['side'] == 'ours')
        if c['setup']:
            c['setup']()
        os.sync()
        prof = cProfile.Profile()
        try:
            prof.runcall(c['run'])
        finally:
            if c['cleanup']:
                c['cleanup']()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats('tottime').print_stats(15)
        self.profile_text = 'cProfile of ours, %s (%s):\n%s' % (
            name, c['label'], out.getvalue())

    notes = {
        'chain-seq-read-2M': 'ours reads a 3-deep chain; qemu cannot follow '
                             'VHD parents, so its peer reads the base, a '
                             'single filled dynamic VHD of the same size',
        'chain-rand-read-4K': 'ours reads a 3-deep chain; qemu cannot follow '
                              'VHD parents, so its peer reads the base, a '
                              'single filled dynamic VHD of the same size',
        'rand-write-4K': 'into a fresh, empty dynamic image: most requests '
                         'allocate a 2 MiB block',
        'rand-write-2M': 'into a fresh, empty dynamic image, offsets drawn '
                         'with repetition',
    }

    def run(self):
        size, d = self.size, self.dir
        nbig = size // REQ_BIG
        fresh_o, fresh_q = self.path('ours.vhd'), self.path('qemu.vhd')

        def fresh(path):
            return lambda: (remove(path), ops.create(path, size))

        def gone(*paths):
            return lambda: remove(*paths)

        def qemu_write(argv, out):
            def go():
                run_cmd(argv)
                fsync_path(out)
            return go

        t = time.perf_counter()
        self.log('setup: %d MiB of seeded random data, a filled dynamic '
                 'VHD and a 3-deep chain in %s' % (size // MiB, d))
        self.make_raw()
        self.make_filled()
        self.make_chain()
        self.setup_notes['setup seconds'] = round(time.perf_counter() - t, 1)

        bench_seq = ['qemu-img', 'bench', '-q', '-f', 'vpc', '-s',
                     str(REQ_BIG), '-c', str(nbig), '-d', '1']

        # a. sequential write, 2 MiB requests, into a new dynamic image.
        self.measure('seq-write-2M', size, nbig, [
            case('ours', 'Chain.pwrite 2M from src.raw + flush',
                 lambda: ours_write_from_raw(fresh_o, self.raw, size),
                 fresh(fresh_o), gone(fresh_o)),
            case('qemu', 'qemu-img convert -O vpc src.raw (+fsync)',
                 qemu_write(['qemu-img', 'convert', '-f', 'raw', '-O', 'vpc',
                             '-o', 'subformat=dynamic,force_size=on',
                             '-t', 'unsafe', self.raw, fresh_q], fresh_q),
                 gone(fresh_q), gone(fresh_q)),
            case('qemu', 'qemu-img bench -w -s 2M -d 1 (+fsync)',
                 qemu_write(bench_seq + ['-w', '-t', 'unsafe',
                                         '--pattern=%d' % PATTERN, fresh_q],
                            fresh_q),
                 fresh(fresh_q), gone(fresh_q)),
        ])

        # b. sequential read, 2 MiB requests, of the same filled image.
        self.measure('seq-read-2M', size, nbig, [
            case('ours', 'Chain.pread 2M',
                 lambda: ours_read_seq(self.filled, size)),
            case('ours', 'Chain.read_into 2M (reused buffer)',
                 lambda: ours_read_seq_into(self.filled, size)),
            case('qemu', 'qemu-img convert -O null-co',
                 lambda: run_cmd(['qemu-img', 'convert', '-f', 'vpc', '-n',
                                  '--target-image-opts', self.filled,
                                  'driver=null-co,size=%d' % size])),
            case('qemu', 'qemu-img bench -s 2M -d 1',
                 lambda: run_cmd(bench_seq + ['-t', 'writeback',
                                              self.filled])),
        ])

        # c/d. random requests: the same seeded offsets for ours and for
        # qemu-io; and a long stride for ours and for qemu-img bench.
        for name, unit, count, write, seed in (
                ('rand-read-4K', REQ_SMALL, self.args.rand_count, False, 21),
                ('rand-write-4K', REQ_SMALL, self.args.rand_count, True, 22),
                ('rand-read-2M', REQ_BIG, nbig, False, 23),
                ('rand-write-2M', REQ_BIG, nbig, True, 24)):
            offsets = random_offsets(self.seed + seed, size, unit, count)
            strided, step = stride_offsets(size, unit, count)
            script = qemu_io_script(self.path(name + '.qemu-io'), offsets,
                                    unit, write)
            tag = '4K' if unit == REQ_SMALL else '2M'
            bench = ['qemu-img', 'bench', '-q', '-f', 'vpc', '-s', str(unit),
                     '-S', str(step), '-c', str(count), '-d', '1']
            if write:
                data = self.data_small if unit == REQ_SMALL else \
                    self.data_big
                ours_r = 'Chain.pwrite %s random + flush' % tag
                ours_s = 'Chain.pwrite %s strided + flush' % tag
                contenders = [
                    case('ours', ours_r,
                         lambda o=offsets, b=data: ours_write_at(fresh_o, o,
                                                                 b),
                         fresh(fresh_o), gone(fresh_o)),
                    case('ours', ours_s,
                         lambda o=strided, b=data: ours_write_at(fresh_o, o,
                                                                 b),
                         fresh(fresh_o), gone(fresh_o)),
                    case('qemu', 'qemu-io script of write -q (+fsync)',
                         lambda s=script: (run_cmd(['qemu-io', '-f', 'vpc',
                                                    '-t', 'unsafe', fresh_q],
                                                   s),
                                           fsync_path(fresh_q)),
                         fresh(fresh_q), gone(fresh_q), pair=ours_r),
                    case('qemu', 'qemu-img bench -w strided (+fsync)',
                         qemu_write(bench + ['-w', '-t', 'unsafe',
                                             '--pattern=%d' % PATTERN,
                                             fresh_q], fresh_q),
                         fresh(fresh_q), gone(fresh_q), pair=ours_s),
                ]
            else:
                ours_r = 'Chain.pread %s random' % tag
                ours_s = 'Chain.pread %s strided' % tag
                contenders = [
                    case('ours', ours_r,
                         lambda o=offsets, u=unit: ours_read_at(self.filled,
                                                                o, u)),
                    case('ours', ours_s,
                         lambda o=strided, u=unit: ours_read_at(self.filled,
                                                                o, u)),
                    case('qemu', 'qemu-io script of read -q',
                         lambda s=script: run_cmd(['qemu-io', '-r', '-f',
                                                   'vpc', '-t', 'writeback',
                                                   self.filled], s),
                         pair=ours_r),
                    case('qemu', 'qemu-img bench strided',
                         lambda b=bench: run_cmd(b + ['-t', 'writeback',
                                                      self.filled]),
                         pair=ours_s),
                ]
            self.measure(name, count * unit, count, contenders)
            remove(script)

        # e. reads through the 3-deep chain; qemu's peer is the base alone.
        offsets = random_offsets(self.seed + 25, size, REQ_SMALL,
                                 self.args.rand_count)
        strided, step = stride_offsets(size, REQ_SMALL, len(offsets))
        script = qemu_io_script(self.path('chain.qemu-io'), offsets,
                                REQ_SMALL, False)
        leaf = 'Chain.pread 2M, leaf of 3-deep chain'
        self.measure('chain-seq-read-2M', size, nbig, [
            case('ours', leaf, lambda: ours_read_seq(self.leaf, size)),
            case('ours', 'Chain.pread 2M, base alone',
                 lambda: ours_read_seq(self.filled, size)),
            case('qemu', 'qemu-img bench -s 2M -d 1, base alone',
                 lambda: run_cmd(bench_seq + ['-t', 'writeback',
                                              self.filled]), pair=leaf),
        ])
        leaf = 'Chain.pread 4K random, leaf of 3-deep chain'
        leaf_s = 'Chain.pread 4K strided, leaf of 3-deep chain'
        self.measure('chain-rand-read-4K', len(offsets) * REQ_SMALL,
                     len(offsets), [
                         case('ours', leaf,
                              lambda: ours_read_at(self.leaf, offsets,
                                                   REQ_SMALL)),
                         case('ours', 'Chain.pread 4K random, base alone',
                              lambda: ours_read_at(self.filled, offsets,
                                                   REQ_SMALL)),
                         case('ours', leaf_s,
                              lambda: ours_read_at(self.leaf, strided,
                                                   REQ_SMALL)),
                         case('qemu', 'qemu-io script of read -q, base alone',
                              lambda: run_cmd(['qemu-io', '-r', '-f', 'vpc',
                                               '-t', 'writeback',
                                               self.filled], script),
                              pair=leaf),
                         case('qemu', 'qemu-img bench strided, base alone',
                              lambda: run_cmd(
                                  ['qemu-img', 'bench', '-q', '-f', 'vpc',
                                   '-s', str(REQ_SMALL), '-S', str(step),
                                   '-c', str(len(offsets)), '-d', '1',
                                   '-t', 'writeback', self.filled]),
                              pair=leaf_s),
                     ])
        remove(script)

    # -- report --------------------------------------------------------------

    def report(self, out=sys.stdout):
        a = self.args
        print('VHD engine vs qemu %s; size %d MiB, repeat %d, median of runs; '
              'MB = 10^6 bytes; page cache warm for both, no O_DIRECT'
              % (qemu_version().split()[2], self.size // MiB, a.repeat),
              file=out)
        print('ratio = ours row oN named beside it / that qemu row; target '
              'for sequential workloads: >= 0.80', file=out)
        for res in self.results:
            print('', file=out)
            print('%s  (%d MiB in %d requests)%s'
                  % (res['workload'], res['bytes'] // MiB, res['requests'],
                     '\n  note: ' + res['note'] if res['note'] else ''),
                  file=out)
            tags = {}
            for row in res['rows']:
                if row['side'] == 'ours':
                    tags[row['label']] = 'o%d' % (len(tags) + 1)
            for row in res['rows']:
                ratio = row.get('ratio_ours_over_qemu')
                name = tags.get(row['label'], 'qemu')
                pair = ('ratio %5.2f vs %s' % (
                    ratio, tags[row['compared_with']]) if ratio else '')
                print('  %-4s %-46s %7.1f MB/s %7.0f op/s  %-17s runs: %s'
                      % (name, row['label'], row['mb_per_s'],
                         row['ops_per_s'], pair,
                         ' '.join('%.1f' % v for v in row['runs_mb_per_s'])),
                      file=out)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        print('', file=out)
        print('peak RSS: ours (this process) %.1f MiB; largest qemu child '
              '%.1f MiB' % (usage.ru_maxrss / 1024, child.ru_maxrss / 1024),
              file=out)
        for key, value in self.setup_notes.items():
            print('setup: %s: %s' % (key, value), file=out)
        if getattr(self, 'profile_text', None):
            print('', file=out)
            print(self.profile_text, file=out)

    def as_json(self):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            'config': {'size': self.size, 'repeat': self.args.repeat,
                       'warmup': self.args.warmup,
                       'rand_count': self.args.rand_count,
                       'seed': self.seed, 'dir': self.dir},
            'machine': {'python': sys.version.split()[0],
                        'platform': platform.platform(),
                        'cpus': os.cpu_count(), 'qemu': qemu_version()},
            'setup': self.setup_notes,
            'peak_rss_kib': {'ours': usage.ru_maxrss,
                             'qemu_children': child.ru_maxrss},
            'results': self.results,
            'profile': getattr(self, 'profile_text', None),
        }


WORKLOADS = ('seq-write-2M', 'seq-read-2M', 'rand-read-4K', 'rand-write-4K',
             'rand-read-2M', 'rand-write-2M', 'chain-seq-read-2M',
             'chain-rand-read-4K')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--size', type=parse_size, default=parse_size('2G'),
                   help='virtual disk size and bytes moved by sequential '
                   'workloads (default 2G; a multiple of 2M)')
    p.add_argument('--repeat', type=int, default=3,
                   help='runs of each case; the median is reported')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed runs of each case first (default 1: the '
                   'first write after the setup is often much slower)')
    p.add_argument('--rand-count', type=int, default=20000,
                   help='requests of the random 4 KiB workloads')
    p.add_argument('--dir', help='folder for the images (default: a new '
                   'temporary folder under $TMPDIR, removed at the end)')
    p.add_argument('--json', metavar='OUT', help='write all runs to OUT')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the data and of the random offsets '
                   '(default 20240601)')
    p.add_argument('--only', type=lambda s: s.split(','),
                   help='comma-separated workloads, of: %s'
                   % ', '.join(WORKLOADS))
    p.add_argument('--profile', metavar='WORKLOAD', choices=WORKLOADS,
                   help='also run ours once under cProfile for WORKLOAD')
    p.add_argument('--keep', action='store_true',
                   help='keep the images (only with --dir)')
    p.add_argument('--quiet', action='store_true',
                   help='no per-run progress on stderr')
    args = p.parse_args(argv)
    for tool in ('qemu-img', 'qemu-io'):
        if not shutil.which(tool):
            p.error('%s not found (apt-get install qemu-utils)' % tool)
    if args.only:
        bad = set(args.only) - set(WORKLOADS)
        if bad:
            p.error('unknown workload(s): %s' % ', '.join(sorted(bad)))
    if args.profile and args.only and args.profile not in args.only:
        args.only.append(args.profile)
    made = args.dir is None
    if made:
        args.dir = tempfile.mkdtemp(prefix='vhd-bench-')
    else:
        os.makedirs(args.dir, exist_ok=True)
        args.dir = tempfile.mkdtemp(prefix='vhd-bench-', dir=args.dir)
    free = shutil.disk_usage(args.dir).free
    if free < 6 * args.size:
        p.error('%s has %d MiB free; about %d MiB are needed'
                % (args.dir, free // MiB, 6 * args.size // MiB))
    bench = Bench(args)
    try:
        bench.run()
    finally:
        if not args.keep:
            for name in os.listdir(args.dir):
                remove(os.path.join(args.dir, name))
            os.rmdir(args.dir)
    bench.report()
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(bench.as_json(), f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
