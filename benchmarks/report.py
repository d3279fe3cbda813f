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

"""One command for the whole benchmark set and its report.

Runs, one after the other on this machine, each beside its peer in the
same run:

``vhd``
   ``vhd_bench.py``: the VHD engine beside ``qemu-img convert``/``bench``
   and ``qemu-io`` (qemu's vpc driver).
``nbd``
   ``nbd_bench.py``: our NBD server beside ``qemu-nbd``, both copied by
   ``nbdcopy``, plain and TLS, dense and sparse images.
``migration``
   ``migration_bench.py``: live migrations between two agents on
   RabbitMQ, dense and sparse disks, idle and loaded, beside ``nbdcopy``
   between ``qemu-nbd`` TLS exports; guest write latency with and without
   the mirror; downtime of 20 switch-overs.
``qemu-mirror``
   ``qemu_mirror_bench.py``: QEMU's own live mirror
   (``qemu-storage-daemon``, ``blockdev-mirror`` in ``write-blocking``
   mode to a ``qemu-nbd`` TLS target) under the same guest write load, the
   peer of our mirror's write latency.
``rtt``
   ``rtt_bench.py``: the NBD write round trip over TLS that each mirrored
   write waits for, our client and server beside ``qemu-io``, ``nbdkit``
   and ``qemu-nbd``: the floor of the mirror's write latency.
``link``
   ``link_bench.py``: the two agents in network namespaces, the migration
   link shaped with ``tc tbf``; dense and sparse disks migrate over it
   beside ``nbdcopy`` between ``qemu-nbd`` TLS exports over the same link.
``demo``
   ``demo_bench.py``: ``xsm-migrate demo --json`` three times, its
   switch-over downtime and the per-step breakdown
   (``switch_over_steps_ms``).

Each benchmark is a subprocess (``sys.executable benchmarks/X.py ...
--json F``) whose tables, progress and JSON are kept in ``--results``;
the report (reStructuredText, the documentation's format) goes to
``--out`` with matplotlib PNGs in ``--static``: tables of ratios, the
targets of issue 18 (each met or not, computed from the numbers) and those
of issue 8 it does not replace, the machine, the date, every command and
every run.
``--quick`` runs small sizes (about 10 minutes on 2 vCPUs), the default
the full sizes (about 30 minutes). ``--from-results DIR`` rebuilds the
report from an earlier run's JSON without running anything.

Missing tools are installed first when this runs as root:
``qemu-storage-daemon`` (Debian ``qemu-system-common``) and ``fio`` with
apt-get,
matplotlib from ``benchmarks/requirements.txt`` with pip into this
interpreter.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402

MiB = _common.MiB
GiB = _common.GiB

#: benchmark -> (script, quick arguments, full arguments)
BENCHES = {
    'vhd': ('vhd_bench.py',
            ['--size', '512M', '--repeat', '3', '--rand-count', '5000'], []),
    'nbd': ('nbd_bench.py', ['--quick', '--repeat', '3'], []),
    'migration': ('migration_bench.py', ['--scale', '0.125', '--runs', '3'],
                  []),
    'qemu-mirror': ('qemu_mirror_bench.py',
                    ['--scale', '0.125', '--runs', '3'], []),
    'rtt': ('rtt_bench.py', ['--writes', '1000'], []),
    'link': ('link_bench.py', ['--scale', '0.25', '--runs', '3'], []),
    'demo': ('demo_bench.py', ['--runs', '3'], ['--runs', '3']),
}
ORDER = ('vhd', 'nbd', 'migration', 'qemu-mirror', 'rtt', 'link', 'demo')
#: (tool, Debian package) each benchmark needs
TOOLS = {'vhd': [('qemu-img', 'qemu-utils'), ('qemu-io', 'qemu-utils')],
         'nbd': [('qemu-nbd', 'qemu-utils'), ('nbdcopy', 'libnbd-bin'),
                 ('nbdinfo', 'libnbd-bin')],
         'migration': [('qemu-nbd', 'qemu-utils'), ('nbdcopy', 'libnbd-bin'),
                       ('nbdinfo', 'libnbd-bin'), ('fio', 'fio')],
         'qemu-mirror': [('qemu-storage-daemon', 'qemu-system-common'),
                         ('qemu-nbd', 'qemu-utils')],
         'rtt': [('qemu-io', 'qemu-utils'), ('qemu-nbd', 'qemu-utils'),
                 ('nbdkit', 'nbdkit')],
         'link': [('ip', 'iproute2'), ('tc', 'iproute2'),
                  ('qemu-nbd', 'qemu-utils'), ('nbdcopy', 'libnbd-bin'),
                  ('nbdinfo', 'libnbd-bin')],
         'demo': [('qemu-system-x86_64', 'qemu-system-x86')]}
#: our latency windows and QEMU's that are compared
LATENCY_PAIRS = (('no migration', 'no mirror'),
                 ('mirror (copy phase)', 'mirror (copy phase)'),
                 ('mirror, copy throttled', 'mirror, copy throttled'))
TARGETS = {'copy_ratio': 1.0, 'downtime_p99_ms': 100.0,
           'latency_p99_ratio': 1.0, 'proportional': (0.67, 1.5)}
TARGETS_18 = _common.TARGETS_18


# -- reading the benchmarks' JSON (pure) -------------------------------------

def vhd_pairs(data):
    """Each qemu row of vhd_bench's JSON beside the row of ours it names."""
    rows = []
    for res in (data or {}).get('results', []):
        ours = {r['label']: r for r in res.get('rows', [])
                if r.get('side') == 'ours'}
        for r in res.get('rows', []):
            if r.get('side') != 'qemu' or not r.get('compared_with'):
                continue
            o = ours.get(r['compared_with'], {})
            rows.append({'workload': res['workload'],
                         'ours': r['compared_with'], 'peer': r['label'],
                         'ours_MBps': o.get('mb_per_s'),
                         'peer_MBps': r.get('mb_per_s'),
                         'ratio': r.get('ratio_ours_over_qemu'),
                         'ours_runs': o.get('runs_mb_per_s', []),
                         'peer_runs': r.get('runs_mb_per_s', [])})
    return rows


def nbd_pairs(data):
    """Ours beside qemu-nbd for each nbd_bench workload."""
    rows = []
    for res in (data or {}).get('results', []):
        side = {r['side']: r for r in res.get('rows', [])}
        o, q = side.get('ours', {}), side.get('qemu', {})
        rows.append({'workload': res['workload'],
                     'allocated': res.get('allocated_bytes'),
                     'virtual': res.get('virtual_bytes'),
                     'ours_MBps': o.get('mb_per_s_allocated'),
                     'peer_MBps': q.get('mb_per_s_allocated'),
                     'ratio': res.get('ratio_ours_over_qemu'),
                     'ours_runs_s': o.get('seconds', []),
                     'peer_runs_s': q.get('seconds', [])})
    return rows


def copy_pairs(mig):
    """Each of our copy cases with nbdcopy's of the same disk.

    :returns: ``[(ours, peer)]`` from migration_bench's JSON; ``peer`` is
        ``{}`` when the peer did not run.
    """
    results = (mig or {}).get('copy') or []
    peers = {r['disk']: r for r in results if r.get('side') == 'peer'}
    return [(r, peers.get(r['disk'], {})) for r in results
            if r.get('side') == 'ours']


def migration_pairs(data):
    """Our migrations (dense/sparse, idle/loaded) beside nbdcopy's copy."""
    rows = []
    for r, peer in copy_pairs(data):
        ours_bps = r.get('median_throughput_bytes_per_s')
        peer_bps = peer.get('median_throughput_bytes_per_s')
        rows.append({
            'disk': r['disk'], 'load': r['load'],
            'ours_MBps': ours_bps and ours_bps / 1e6,
            'peer_MBps': peer_bps and peer_bps / 1e6,
            'ratio': _common.ratio(ours_bps, peer_bps),
            'copy_s': r.get('median_copy_seconds'),
            'total_s': r.get('median_migration_seconds'),
            'peer_s': peer.get('median_seconds'),
            'downtime_ms': r.get('median_downtime_ms'),
            'ours_runs_MBps': [x['throughput_bytes_per_s'] / 1e6
                               for x in r.get('runs', [])
                               if x.get('throughput_bytes_per_s')],
            'peer_runs_MBps': [x['throughput_bytes_per_s'] / 1e6
                               for x in peer.get('runs', [])
                               if x.get('throughput_bytes_per_s')]})
    return rows


def link_pairs(data):
    """Ours beside nbdcopy over the shaped link, per disk (pure)."""
    rows = []
    for disk, row in sorted(((data or {}).get('summary') or {}).items()):
        rows.append({'disk': disk, 'allocated': row.get('allocated'),
                     'ours_MBps': row['ours']['median_MBps'],
                     'peer_MBps': row['peer']['median_MBps'],
                     'ratio': row.get('ratio'),
                     'ours_runs_MBps': row['ours']['runs_MBps'],
                     'peer_runs_MBps': row['peer']['runs_MBps']})
    return rows


def time_vs_allocated(data):
    """Points (allocated bytes, seconds) of each idle copy, per side.

    Ours: the copy phase of each idle migration; the peer: nbdcopy's
    wall clock. Allocated bytes are those the benchmark wrote.
    """
    images = (data or {}).get('images') or {}
    points = {'ours': [], 'peer': []}
    for r in (data or {}).get('copy') or []:
        if r.get('load') != 'idle':
            continue
        alloc = (images.get('bench-' + r['disk']) or {}).get('allocated')
        if not alloc:
            continue
        for run in r.get('runs', []):
            secs = run.get('copy_seconds') if r['side'] == 'ours' \
                else run.get('seconds')
            if secs:
                points[r['side']].append((r['disk'], alloc, secs))
    return points


def proportionality(points):
    """Seconds per allocated GiB, sparse over dense, per side (pure).

    1.0: a disk costs its allocated bytes, whatever its virtual size.
    """
    out = {}
    for side, pts in points.items():
        per = {}
        for disk, alloc, secs in pts:
            per.setdefault(disk, []).append(secs / (alloc / GiB))
        if 'dense' in per and 'sparse' in per:
            d = _common.median(per['dense'])
            s = _common.median(per['sparse'])
            out[side] = {'dense_s_per_GiB': d, 'sparse_s_per_GiB': s,
                         'ratio': s / d if d else None}
    return out


def our_latency(data):
    """``(mode label, summary)`` of migration_bench's latency case.

    The mode with the destination in another process (RabbitMQ) is
    preferred: it is the one with a real network round trip.
    """
    lat = (data or {}).get('latency') or {}
    for label in sorted(lat, key=lambda k: 'rabbit' not in k.lower()
                        and 'agent process' not in k):
        if lat[label] and lat[label].get('summary'):
            return label, lat[label]
    return None, None


def latency_rows(mig, qemu):
    """Our guest's p50/p99 write latency beside QEMU's, window by window.

    Both from the power-of-two histogram estimate (the method our Counter
    filter allows), medians over runs; QEMU's exact percentiles too.
    """
    label, ours = our_latency(mig)
    ours = (ours or {}).get('summary', {})
    theirs = (qemu or {}).get('summary', {})
    rows = []
    for o_win, q_win in LATENCY_PAIRS:
        o, q = ours.get(o_win) or {}, theirs.get(q_win) or {}
        if not o and not q:
            continue
        rows.append({'ours_window': o_win, 'qemu_window': q_win,
                     'ours_p50': o.get('median_p50_us'),
                     'ours_p99': o.get('median_p99_us'),
                     'qemu_p50': q.get('median_hist_p50_us'),
                     'qemu_p99': q.get('median_hist_p99_us'),
                     'qemu_exact_p50': q.get('median_p50_us'),
                     'qemu_exact_p99': q.get('median_p99_us'),
                     'ours_writes': o.get('median_writes'),
                     'qemu_writes': q.get('median_writes'),
                     'p99_ratio': _common.ratio(o.get('median_p99_us'),
                                                q.get('median_hist_p99_us'))})
    return label, rows


def downtimes(mig):
    """Every downtime (ms) migration_bench measured, by source."""
    out = {}
    d = (mig or {}).get('downtime') or {}
    if d.get('downtime_ms'):
        out['small VM switch-overs'] = [x for x in d['downtime_ms']
                                        if x is not None]
    for r in (mig or {}).get('copy') or []:
        if r.get('side') == 'ours':
            ms = [x.get('downtime_ms') for x in r.get('runs', [])
                  if x.get('downtime_ms') is not None]
            if ms:
                out['%s %s' % (r['disk'], r['load'])] = ms
    return out


def targets(mig_rows, lat_rows, downs, prop, link_rows=()):
    """The issue's targets: ``[(target, measured, met)]``.

    ``met`` is None when nothing was measured.
    """
    out = []
    for r in mig_rows:
        if r['load'] != 'idle':
            continue
        met = None if r['ratio'] is None else r['ratio'] >= \
            TARGETS['copy_ratio']
        out.append(('copy throughput >= 1.0x nbdcopy (%s disk)' % r['disk'],
                    fmt(r['ratio'], '%.2fx'), met))
    for r in link_rows:
        met = None if r['ratio'] is None else r['ratio'] >= \
            TARGETS['copy_ratio']
        out.append(('copy throughput >= 1.0x nbdcopy (%s disk, shaped '
                    'link)' % r['disk'], fmt(r['ratio'], '%.2fx'), met))
    for r in lat_rows:
        if r['ours_window'] != 'mirror (copy phase)':
            continue
        met = None if r['p99_ratio'] is None else r['p99_ratio'] <= \
            TARGETS['latency_p99_ratio']
        out.append(('guest p99 write latency under mirroring <= QEMU '
                    'write-blocking mirror', '%s vs %s us (%s)' % (
                        fmt(r['ours_p99'], '%.0f'), fmt(r['qemu_p99'], '%.0f'),
                        fmt(r['p99_ratio'], '%.2fx')), met))
    small = downs.get('small VM switch-overs')
    if small:
        p99 = _common.nearest_rank(small, 99)
        out.append(('downtime p99 < 100 ms (%d switch-overs)' % len(small),
                    '%.1f ms' % p99, p99 < TARGETS['downtime_p99_ms']))
    every = [x for v in downs.values() for x in v]
    if every:
        p99 = _common.nearest_rank(every, 99)
        out.append(('downtime p99 < 100 ms (every migration, %d)'
                    % len(every), '%.1f ms' % p99,
                    p99 < TARGETS['downtime_p99_ms']))
    low, high = TARGETS['proportional']
    if 'ours' in prop:
        r = prop['ours']['ratio']
        out.append(('migration time proportional to allocated bytes '
                    '(sparse/dense s per GiB in %.2f..%.2f)' % (low, high),
                    fmt(r, '%.2f'), None if r is None else low <= r <= high))
    return out


def cpu_rows(mig):
    """CPU seconds per GiB, ours beside the idle peer, per disk and load.

    Ours: both agent processes (user + system from ``/proc``) over the
    whole migration, per ``bytes_copied``; the peer: ``nbdcopy`` (its
    rusage) and both ``qemu-nbd`` (``/proc``), per allocated byte.
    ``ratio`` = ours / peer (pure).
    """
    rows = []
    for r, peer in copy_pairs(mig):
        ours = r.get('median_cpu_s_per_GiB')
        theirs = peer.get('median_cpu_s_per_GiB')
        rows.append({'disk': r['disk'], 'load': r['load'], 'ours': ours,
                     'peer': theirs, 'ratio': _common.ratio(ours, theirs),
                     'ours_runs': [x.get('cpu_s_per_GiB')
                                   for x in r.get('runs', [])],
                     'peer_runs': [x.get('cpu_s_per_GiB')
                                   for x in peer.get('runs', [])]})
    return rows


def disk_ceiling(mig):
    """The dense idle copy beside fio's O_DIRECT write rate (pure).

    None when fio did not run.
    """
    fio = (mig or {}).get('disk_ceiling') or {}
    if not fio.get('median_bytes_per_s'):
        return None
    dense = [r for r in migration_pairs(mig)
             if r['disk'] == 'dense' and r['load'] == 'idle']
    ours = dense[0]['ours_MBps'] if dense else None
    fio_MBps = fio['median_bytes_per_s'] / 1e6
    return {'fio_MBps': fio_MBps, 'ours_MBps': ours,
            'fraction': _common.ratio(ours, fio_MBps),
            'runs': [(x.get('when'), x['bytes_per_s'] / 1e6)
                     for x in fio.get('runs', [])],
            'argv': fio.get('argv'), 'filesystem': fio.get('filesystem')}


def multidisk_row(mig):
    """The VM with N disks beside the one with one disk (pure)."""
    md = (mig or {}).get('multidisk')
    if not md:
        return None
    one, many = md['one_disk'], md['many_disks']

    def mbps(r):
        bps = r.get('median_throughput_bytes_per_s')
        return bps and bps / 1e6

    def runs(r):
        return [x['throughput_bytes_per_s'] / 1e6 for x in r.get('runs', [])
                if x.get('throughput_bytes_per_s')]
    return {'disks': md['disks'], 'disk_size': md['disk_size'],
            'one_disk_size': md['one_disk_size'],
            'one_MBps': mbps(one), 'many_MBps': mbps(many),
            'ratio': _common.ratio(mbps(many), mbps(one)),
            'one_runs': runs(one), 'many_runs': runs(many),
            'one_cpu': one.get('median_cpu_s_per_GiB'),
            'many_cpu': many.get('median_cpu_s_per_GiB'),
            'many_downtime_ms': [x.get('downtime_ms')
                                 for x in many.get('runs', [])]}


def switch_over_groups(mig):
    """``[(label, virtual bytes, load, downtimes ms)]`` of every group.

    The small VM of the downtime case, then each disk and load of the
    copy case (pure).
    """
    out = []
    mig = mig or {}
    d = mig.get('downtime') or {}
    if d.get('downtime_ms'):
        out.append(('small VM', d.get('size'), 'loaded',
                    [x for x in d['downtime_ms'] if x is not None]))
    images = mig.get('images') or {}
    for r in mig.get('copy') or []:
        if r.get('side') != 'ours':
            continue
        ms = [x.get('downtime_ms') for x in r.get('runs', [])
              if x.get('downtime_ms') is not None]
        if ms:
            size = (images.get('bench-' + r['disk']) or {}).get('size')
            out.append((r['disk'], size, r['load'], ms))
    return out


def peak_rss_mib(mig, multidisk=False):
    """The highest VmHWM of either agent, MiB (pure).

    Over every group of one-disk VMs, or (``multidisk``) over the group of
    the multidisk case (its VM with many disks and its one-disk VM).
    """
    group = ((mig or {}).get('multidisk') or {}).get('memory_group')
    peaks = [kib for m in (mig or {}).get('memory') or []
             if (m.get('group') == group) == multidisk
             for kib in (m.get('peak_kib') or {}).values() if kib]
    return max(peaks) / 1024.0 if peaks else None


def _met(value, ok):
    return None if value is None else bool(ok(value))


def targets_18(data):
    """Issue 18's table: ``[(measure, target, measured, met)]`` (pure).

    ``met`` is computed from the numbers: True, False, or None when this
    run did not measure it (or not at the size the target names).
    """
    t = TARGETS_18
    mig = data.get('migration')
    out = []

    demo = (data.get('demo') or {}).get('summary') or {}
    downs = demo.get('downtime_ms') or []
    p99 = _common.nearest_rank(downs, 99)
    failed = demo.get('failed')
    out.append(('demo switch-over (``xsm-migrate demo --json``, %d runs)'
                % len(downs), 'p99 <= %g ms' % t['switch_over_p99_ms'],
                '%s ms; p99 %s ms%s' % (
                    ', '.join('%.1f' % x for x in downs), fmt(p99),
                    '; %d run(s) failed' % failed if failed else '')
                if downs else '-',
                _met(p99, lambda v: v <= t['switch_over_p99_ms'] and
                     not failed)))

    groups = switch_over_groups(mig)
    in_range = [(label, size, load, ms) for label, size, load, ms in groups
                if size and size >= t['flat_from']]
    sparse = [g for g in in_range if g[0] == 'sparse']
    biggest = max([g[1] for g in sparse] or [0])
    p99s = [(label, size, load, _common.nearest_rank(ms, 99))
            for label, size, load, ms in groups]
    if any(p > t['switch_over_p99_ms'] for label, size, load, p in p99s
           if size and size >= t['flat_from']):
        met = False
    elif biggest < t['flat_to'] or \
            {g[2] for g in sparse} != {'idle', 'loaded'}:
        met = None      # not measured at 64 GiB, idle and loaded
    else:
        met = True
    out.append(('switch-over of the sparse disk (%s virtual here) and every '
                'disk of >= 1 GiB, idle and loaded' % (
                    '%g GiB' % (biggest / GiB) if biggest else '-'),
                'p99 <= %g ms, flat from 1 GiB to 64 GiB, idle and loaded'
                % t['switch_over_p99_ms'],
                '; '.join('%s %s %s: p99 %s ms' % (
                    label, '%g GiB' % (size / GiB) if size else '?', load,
                    fmt(p)) for label, size, load, p in p99s) or '-', met))

    _lbl, lat = latency_rows(mig, data.get('qemu-mirror'))
    thr = [r for r in lat if r['ours_window'] == 'mirror, copy throttled']
    r = thr[0] if thr else {}
    ratio = r.get('p99_ratio')
    p50_ok = (None if r.get('ours_p50') is None or r.get('qemu_p50') is None
              else r['ours_p50'] <= r['qemu_p50'])
    out.append(('guest p99 write latency, throttled mirror, vs QEMU '
                'write-blocking mirror',
                '<= %gx in every full report, and p50 <= QEMU\'s'
                % t['latency_p99_ratio'],
                'p99 %s vs %s us (%s); p50 %s vs %s us' % (
                    fmt(r.get('ours_p99'), '%.0f'),
                    fmt(r.get('qemu_p99'), '%.0f'), fmt(ratio, '%.2fx'),
                    fmt(r.get('ours_p50'), '%.0f'),
                    fmt(r.get('qemu_p50'), '%.0f')),
                None if ratio is None or p50_ok is None else
                ratio <= t['latency_p99_ratio'] and p50_ok))

    dense = [x for x in migration_pairs(mig)
             if x['disk'] == 'dense' and x['load'] == 'idle']
    d = dense[0] if dense else {}
    out.append(('dense copy vs nbdcopy between qemu-nbd TLS exports',
                '>= %gx' % t['copy_ratio'],
                '%s vs %s MB/s (%s)' % (fmt(d.get('ours_MBps')),
                                        fmt(d.get('peer_MBps')),
                                        fmt(d.get('ratio'), '%.2fx')),
                _met(d.get('ratio'), lambda v: v >= t['copy_ratio'])))
    ceil = disk_ceiling(mig) or {}
    out.append(('dense copy vs the destination disk\'s O_DIRECT write rate '
                '(``fio``, same run)', '>= %gx' % t['fio_fraction'],
                '%s vs %s MB/s (%s)' % (fmt(ceil.get('ours_MBps')),
                                        fmt(ceil.get('fio_MBps')),
                                        fmt(ceil.get('fraction'), '%.2fx')),
                _met(ceil.get('fraction'), lambda v: v >= t['fio_fraction'])))

    for c in cpu_rows(mig):
        if c['load'] != 'idle':
            continue
        out.append(('CPU s (user+sys, both agents) per GiB copied, %s disk, '
                    'vs the peer (nbdcopy + both qemu-nbd)' % c['disk'],
                    'reported, and <= the peer\'s',
                    '%s vs %s s/GiB (%s)' % (fmt(c['ours'], '%.2f'),
                                             fmt(c['peer'], '%.2f'),
                                             fmt(c['ratio'], '%.2fx')),
                    _met(c['ratio'], lambda v: v <= t['cpu_ratio'])))

    md = multidisk_row(mig) or {}
    out.append(('%s disks of one VM, aggregate copy rate vs one disk' %
                md.get('disks', 8), '>= %gx' % t['multidisk_ratio'],
                '%s vs %s MB/s (%s)' % (fmt(md.get('many_MBps')),
                                        fmt(md.get('one_MBps')),
                                        fmt(md.get('ratio'), '%.2fx')),
                _met(md.get('ratio'), lambda v: v >= t['multidisk_ratio'])))

    rss = peak_rss_mib(mig)
    out.append(('agent peak RSS (VmHWM), any disk size (every group of '
                'one-disk VMs)', '< %g MiB' % t['rss_mib'],
                '%s MiB' % fmt(rss), _met(rss, lambda v: v < t['rss_mib'])))
    if md:
        rss = peak_rss_mib(mig, multidisk=True)
        out.append(('agent peak RSS (VmHWM), the %d-disk VM (the same bound '
                    'applied to it)' % md['disks'], '< %g MiB' % t['rss_mib'],
                    '%s MiB' % fmt(rss),
                    _met(rss, lambda v: v < t['rss_mib'])))
    return out


def fmt(value, spec='%.1f'):
    return '-' if value is None else spec % value


def runs_text(values, spec='%.1f'):
    return ' '.join(spec % v for v in values if v is not None) or '-'


def rst_table(headers, rows):
    """A reStructuredText simple table (pure)."""
    cells = [[str(c) for c in headers]] + [
        ['-' if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    rule = '  '.join('=' * w for w in widths)
    head = '  '.join(c.ljust(w) for c, w in zip(cells[0], widths))
    lines = [rule, head.rstrip(), rule]
    for r in cells[1:]:
        lines.append('  '.join((c or '-').ljust(w)
                               for c, w in zip(r, widths)).rstrip())
    lines.append(rule)
    return '\n'.join(lines)


# -- plots -----------------------------------------------------------------

def make_plots(data, static, rel):
    """Write the PNGs; ``{name: path relative to the document}``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    os.makedirs(static, exist_ok=True)
    made = {}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(static, name), dpi=90)
        plt.close(fig)
        made[name] = '%s/%s' % (rel, name)

    # throughput, ours beside the peer
    bars = []
    for r in nbd_pairs(data.get('nbd')):
        bars.append(('nbd ' + r['workload'], r['ours_MBps'], r['peer_MBps']))
    for r in migration_pairs(data.get('migration')):
        bars.append(('migrate %s %s' % (r['disk'], r['load']), r['ours_MBps'],
                     r['peer_MBps']))
    for r in link_pairs(data.get('link')):
        bars.append(('shaped link %s' % r['disk'], r['ours_MBps'],
                     r['peer_MBps']))
    for r in vhd_pairs(data.get('vhd')):
        if r['workload'].startswith('seq-') and 'convert' in r['peer']:
            bars.append(('vhd ' + r['workload'], r['ours_MBps'],
                         r['peer_MBps']))
    if bars:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(bars) + 1.5))
        ys = range(len(bars))
        ax.barh([y + 0.2 for y in ys], [b[1] or 0 for b in bars], 0.4,
                label='xsm-driver')
        ax.barh([y - 0.2 for y in ys], [b[2] or 0 for b in bars], 0.4,
                label='peer (qemu-img / qemu-nbd + nbdcopy)')
        ax.set_yticks(list(ys))
        ax.set_yticklabels([b[0] for b in bars], fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale('log')
        ax.set_xlabel('MB/s (10^6 bytes; allocated bytes for sparse)')
        ax.legend(fontsize=8)
        ax.set_title('Throughput, medians')
        save(fig, 'throughput.png')

    # write-latency CDFs
    label, ours = our_latency(data.get('migration'))
    qemu = (data.get('qemu-mirror') or {}).get('summary') or {}
    curves = []
    for o_win, q_win in LATENCY_PAIRS:
        o = ((ours or {}).get('summary') or {}).get(o_win) or {}
        hist = None
        if o:
            runs = [r['windows'][o_win]['histogram'] for r in ours['runs']
                    if o_win in r.get('windows', {})]
            hist = [sum(c) for c in zip(*runs)] if runs else None
        if hist:
            curves.append(('xsm-driver: ' + o_win, hist, '-'))
        q = qemu.get(q_win) or {}
        if q.get('pooled_histogram'):
            curves.append(('QEMU: ' + q_win, q['pooled_histogram'], '--'))
    if curves:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, hist, style in curves:
            pts = _common.hist_cdf(hist)
            ax.step([p[0] for p in pts], [p[1] for p in pts], style,
                    where='post', label=name)
        ax.set_xscale('log')
        ax.set_xlabel('guest write latency, us (upper bound of a '
                      'power-of-two bucket)')
        ax.set_ylabel('fraction of writes')
        ax.axhline(0.99, color='grey', lw=0.5)
        ax.legend(fontsize=7)
        ax.set_title('Guest write latency CDF, with and without mirroring')
        save(fig, 'latency_cdf.png')

    # downtime distribution
    downs = downtimes(data.get('migration'))
    if downs:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        names = sorted(downs)
        for i, name in enumerate(names):
            ax.plot(downs[name], [i] * len(downs[name]), 'o', alpha=0.6)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.axvline(TARGETS_18['switch_over_p99_ms'], color='red', lw=0.8,
                   label='target p99 %d ms' % TARGETS_18['switch_over_p99_ms'])
        ax.set_xlabel('downtime, ms (each migration)')
        ax.legend(fontsize=8)
        ax.set_title('Switch-over downtime')
        save(fig, 'downtime.png')

    # time vs allocated size
    pts = time_vs_allocated(data.get('migration'))
    for r in (data.get('link') or {}).get('results', []):
        secs = r.get('copy_seconds') or r.get('seconds')
        if secs and r.get('allocated'):
            pts.setdefault('link ' + r['side'], []).append(
                (r['disk'], r['allocated'], secs))
    if any(pts.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = {'ours': 'xsm-driver copy phase, loopback',
                  'peer': 'nbdcopy between qemu-nbd, loopback',
                  'link ours': 'xsm-driver copy phase, shaped link',
                  'link peer': 'nbdcopy between qemu-nbd, shaped link'}
        for side, marker in (('ours', 'o'), ('peer', 's'),
                             ('link ours', '^'), ('link peer', 'v')):
            if pts.get(side):
                ax.plot([p[1] / GiB for p in pts[side]],
                        [p[2] for p in pts[side]], marker, alpha=0.7,
                        label=labels[side])
        ax.set_xlabel('allocated GiB')
        ax.set_ylabel('seconds')
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title('Copy time vs allocated bytes (idle VM)')
        save(fig, 'time_vs_allocated.png')
    return made


# -- the document ---------------------------------------------------------

def render(data, runs, plots, meta):
    """The report, reStructuredText (pure but for the clock in ``meta``)."""
    out = []

    def w(text):
        """Add a paragraph (wrapped) or lines of markup (as they are)."""
        if '\n' in text or text.startswith(('=', '..', ' ')) or \
                len(text) <= 79:
            out.append(text)
        else:
            out.append(textwrap.fill(text, 79, break_long_words=False,
                                     break_on_hyphens=False))
    title = 'Performance'
    w('=' * len(title))
    w(title)
    w('=' * len(title))
    w('')
    w('Generated by ``%s`` (%s mode), started %s, %.0f minutes in all. '
      'Every number below was measured in that one run, on the machine '
      'described under *Machine*; each of ours beside its peer in the same '
      'benchmark run. Medians, with every run beside them. MB = 10^6 '
      'bytes.' % (meta['command'], meta['mode'], meta['date'],
                  sum(r['seconds'] for r in runs) / 60.0))
    w('')
    w('.. contents::\n   :local:\n')

    mig_rows = migration_pairs(data.get('migration'))
    lat_label, lat_rows = latency_rows(data.get('migration'),
                                       data.get('qemu-mirror'))
    downs = downtimes(data.get('migration'))
    prop = proportionality(time_vs_allocated(data.get('migration')))

    w('Targets')
    w('=======')
    w('')
    lrows = link_pairs(data.get('link'))
    met_text = {True: 'yes', False: '**no**', None: 'not measured'}
    w('Issue 18\'s targets, each row of its table with its own target; '
      '``met`` is computed from this run\'s numbers (*not measured*: this '
      'run did not measure it, or not at the size the target names: the '
      'quick mode\'s sparse disk is 8 GiB, not 64 GiB). A target "in every '
      'full report" is judged here for this report alone. "Flat from 1 GiB '
      'to 64 GiB" is judged as every measured disk of 1 GiB or more (the '
      'dense and the sparse disk, idle and loaded) within the same p99 '
      'bound; a p99 over it at any such size is a miss even when the 64 GiB '
      'disk was not measured.')
    w('')
    w(rst_table(['measure', 'target', 'measured', 'met'],
                [(m, t, v, met_text[ok])
                 for m, t, v, ok in targets_18(data)]))
    w('')
    # issue 8's targets that issue 18 does not tighten
    tg = [row for row in targets(mig_rows, lat_rows, downs, prop, lrows)
          if 'shaped link' in row[0] or 'proportional' in row[0]]
    if tg:
        w('Issue 8\'s targets that issue 18 does not replace:')
        w('')
        w(rst_table(['target', 'measured', 'met'],
                    [(t, m, met_text[ok]) for t, m, ok in tg]))
        w('')

    w('Machine')
    w('=======')
    w('')
    m = meta['machine']
    w(rst_table(['what', 'value'], [
        ('CPUs', '%s x %s' % (m.get('cpus'), m.get('cpu_model'))),
        ('memory', '%.1f GiB' % ((m.get('memory_bytes') or 0) / GiB)),
        ('load average before / after', '%s / %s' % (
            ' '.join('%.2f' % x for x in m.get('loadavg', ())),
            ' '.join('%.2f' % x for x in meta.get('load_after', ())))),
        ('Python', m.get('python')), ('OS', m.get('platform')),
        ('qemu-img', m.get('qemu-img')),
        ('qemu-storage-daemon', m.get('qemu-storage-daemon')),
        ('nbdcopy', m.get('nbdcopy')), ('xsm-driver', meta.get('code'))]))
    w('')
    w('The machine is shared: other work ran beside the benchmarks, and '
      'differences of 20 % between runs are noise here. Compare the pairs '
      '(measured in the same run), not absolute numbers across reports.')
    w('')

    w('Commands')
    w('========')
    w('')
    w(rst_table(['benchmark', 'exit', 'wall s', 'command'], [
        (r['name'], r['rc'], '%.0f' % r['seconds'], '``%s``'
         % ' '.join(r['argv_display'])) for r in runs]))
    w('')

    vrows = vhd_pairs(data.get('vhd'))
    if vrows:
        w('VHD engine beside qemu')
        w('======================')
        w('')
        w('``vhd_bench.py``: ours (``xsm_driver.core.vhd``) beside qemu\'s '
          '``vpc`` driver on the same dynamic VHD; ratio = ours / qemu '
          '(MB/s).')
        w('')
        w(rst_table(['workload', 'ours', 'MB/s', 'peer', 'MB/s', 'ratio',
                     'runs ours', 'runs peer'],
                    [(r['workload'], r['ours'], fmt(r['ours_MBps']),
                      r['peer'], fmt(r['peer_MBps']), fmt(r['ratio'], '%.2f'),
                      runs_text(r['ours_runs']), runs_text(r['peer_runs']))
                     for r in vrows]))
        w('')

    nrows = nbd_pairs(data.get('nbd'))
    if nrows:
        w('NBD data path beside qemu-nbd')
        w('=============================')
        w('')
        w('``nbd_bench.py``: ``nbdcopy`` reads from our NBD server and from '
          '``qemu-nbd`` serving the same VHD; ratio = ours / qemu-nbd.')
        w('')
        w(rst_table(['workload', 'allocated', 'ours MB/s', 'qemu-nbd MB/s',
                     'ratio', 'runs ours s', 'runs qemu-nbd s'],
                    [(r['workload'], '%d MiB' % ((r['allocated'] or 0) // MiB),
                      fmt(r['ours_MBps']), fmt(r['peer_MBps']),
                      fmt(r['ratio'], '%.2f'), runs_text(r['ours_runs_s'],
                                                         '%.2f'),
                      runs_text(r['peer_runs_s'], '%.2f')) for r in nrows]))
        w('')

    if mig_rows:
        w('Migration beside nbdcopy')
        w('========================')
        w('')
        w('``migration_bench.py``: two ``xsm-agent`` processes on RabbitMQ '
          'over loopback; ours = ``bytes_copied`` / copy phase; the peer = '
          '``nbdcopy --destination-is-zero --flush`` between ``qemu-nbd`` '
          'TLS exports of the same data (idle; the loaded rows are compared '
          'with the same idle peer). Target (issue 18): dense idle ratio >= '
          '%g.' % TARGETS_18['copy_ratio'])
        w('')
        w(rst_table(['disk', 'load', 'ours MB/s', 'peer MB/s', 'ratio',
                     'copy s', 'total s', 'downtime ms', 'runs ours MB/s',
                     'runs peer MB/s'],
                    [(r['disk'], r['load'], fmt(r['ours_MBps']),
                      fmt(r['peer_MBps']), fmt(r['ratio'], '%.2f'),
                      fmt(r['copy_s'], '%.2f'), fmt(r['total_s'], '%.2f'),
                      fmt(r['downtime_ms']), runs_text(r['ours_runs_MBps']),
                      runs_text(r['peer_runs_MBps'])) for r in mig_rows]))
        w('')
        if prop:
            w('Time against allocated bytes (idle copies): seconds per '
              'allocated GiB, sparse over dense (1.0 = the sparse disk '
              'costs only its allocated bytes).')
            w('')
            w(rst_table(['side', 'dense s/GiB', 'sparse s/GiB', 'ratio'],
                        [(side, fmt(v['dense_s_per_GiB'], '%.2f'),
                          fmt(v['sparse_s_per_GiB'], '%.2f'),
                          fmt(v['ratio'], '%.2f'))
                         for side, v in sorted(prop.items())]))
            w('')

    crows = cpu_rows(data.get('migration'))
    if any(r['ours'] is not None for r in crows):
        w('CPU per GiB copied')
        w('==================')
        w('')
        w('``migration_bench.py``, the same runs as above. Ours: user + '
          'system CPU seconds of both agent processes (``/proc/PID/stat``, '
          'all threads) from the ``migrate_vm`` call to the end of the '
          'migration (the benchmark\'s ``migration_get`` polls every 0.05 s '
          'are served inside it), per GiB of ``bytes_copied``. The peer: '
          '``nbdcopy`` (its ``wait4`` rusage) + the source and destination '
          '``qemu-nbd`` (``/proc``, before they stop), per allocated GiB. '
          'Target: ours <= the peer\'s (ratio <= 1.0).')
        w('')
        w(rst_table(['disk', 'load', 'ours s/GiB', 'peer s/GiB', 'ratio',
                     'runs ours', 'runs peer'],
                    [(r['disk'], r['load'], fmt(r['ours'], '%.2f'),
                      fmt(r['peer'], '%.2f'), fmt(r['ratio'], '%.2f'),
                      runs_text(r['ours_runs'], '%.2f'),
                      runs_text(r['peer_runs'], '%.2f')) for r in crows]))
        w('')

    ceil = disk_ceiling(data.get('migration'))
    if ceil:
        w('The disk\'s own ceiling')
        w('======================')
        w('')
        fs = ceil.get('filesystem') or ('?', '?', '?')
        w('``fio`` in the same run, before and after the copies: O_DIRECT '
          'sequential writes of the dense disk\'s size into a new file in '
          'the destination agent\'s SR folder (%s, %s on %s), blocks '
          'allocated as written (no preallocation), the final flush '
          'counted: ``%s``. Target: our dense copy >= %gx of it.' % (
              fs[1], fs[0], fs[2], ' '.join(
                  '--filename=SR/fio-ceiling.dat'
                  if x.startswith('--filename=') else x
                  for x in ceil.get('argv') or ()),
              TARGETS_18['fio_fraction']))
        w('')
        w(rst_table(['fio MB/s (median)', 'runs', 'our dense copy MB/s',
                     'fraction'],
                    [(fmt(ceil['fio_MBps']), ', '.join(
                        '%s: %.1f' % run for run in ceil['runs']),
                      fmt(ceil['ours_MBps']), fmt(ceil['fraction'],
                                                  '%.2f'))]))
        w('')

    md = multidisk_row(data.get('migration'))
    if md:
        w('Disks of one VM')
        w('===============')
        w('')
        w('``migration_bench.py``\'s multidisk case: a VM with %d disks of '
          '%d MiB beside a VM with one disk of %d MiB (the same bytes), '
          'both idle, their migrations interleaved; rate = ``bytes_copied`` '
          '/ copy phase. Target: %d disks >= %gx one disk.' % (
              md['disks'], md['disk_size'] // MiB,
              md['one_disk_size'] // MiB, md['disks'],
              TARGETS_18['multidisk_ratio']))
        w('')
        w(rst_table(['VM', 'MB/s', 'CPU s/GiB', 'runs MB/s'],
                    [('1 disk', fmt(md['one_MBps']), fmt(md['one_cpu'],
                                                         '%.2f'),
                      runs_text(md['one_runs'])),
                     ('%d disks' % md['disks'], fmt(md['many_MBps']),
                      fmt(md['many_cpu'], '%.2f'),
                      runs_text(md['many_runs']))]))
        w('')
        w('Aggregate rate, %d disks / 1 disk: %s.' % (
            md['disks'], fmt(md['ratio'], '%.2f')))
        w('')

    if lrows:
        w('Migration over a shaped link beside nbdcopy')
        w('===========================================')
        w('')
        lc = (data.get('link') or {}).get('config', {})
        w('``link_bench.py``: the two agents in network namespaces, the '
          'migration link (a veth pair) shaped with ``tc tbf`` to %.1f MB/s '
          'each way; idle VM; ours = ``bytes_copied`` / copy phase; the '
          'peer = ``nbdcopy --destination-is-zero --flush`` run in host a '
          'between ``qemu-nbd`` TLS exports on the link\'s two addresses. '
          'Target: ratio >= 1.0.' % ((lc.get('rate') or 0) / 1e6))
        w('')
        w(rst_table(['disk', 'allocated', 'ours MB/s', 'peer MB/s', 'ratio',
                     'runs ours MB/s', 'runs peer MB/s'],
                    [(r['disk'], '%d MiB' % ((r['allocated'] or 0) // MiB),
                      fmt(r['ours_MBps']), fmt(r['peer_MBps']),
                      fmt(r['ratio'], '%.2f'), runs_text(r['ours_runs_MBps']),
                      runs_text(r['peer_runs_MBps'])) for r in lrows]))
        w('')

    if lat_rows:
        w('Guest write latency beside QEMU\'s write-blocking mirror')
        w('=======================================================')
        w('')
        q = data.get('qemu-mirror') or {}
        qc = q.get('config', {})
        w('Ours: ``migration_bench.py``\'s latency case (%s), the verifying '
          'guest writing random 4 KiB blocks at %s/s, latency measured in '
          'the agent\'s device stack. QEMU: ``qemu_mirror_bench.py``, '
          '``qemu-storage-daemon`` with ``blockdev-mirror sync=full '
          'copy-mode=write-blocking`` to a ``qemu-nbd`` TLS target, a '
          'writer of random 4 KiB blocks at %s/s over an NBD connection to '
          'the daemon (its latency includes that loopback round trip: see '
          'the first row). Percentiles are medians over runs of the '
          'power-of-two histogram estimate for both sides; QEMU\'s exact '
          'percentiles are given too. Target (issue 18): with the copy '
          'throttled, ours p99 <= %gx QEMU\'s and ours p50 <= QEMU\'s.'
          % (lat_label, (data.get('migration') or {}).get(
              'config', {}).get('load_rate', '?'), qc.get('load_rate', '?'),
             TARGETS_18['latency_p99_ratio']))
        w('')
        w(rst_table(['window (ours / QEMU)', 'ours p50', 'ours p99',
                     'QEMU p50', 'QEMU p99', 'QEMU exact p50/p99',
                     'p99 ratio', 'writes ours/QEMU'],
                    [('%s / %s' % (r['ours_window'], r['qemu_window']),
                      fmt(r['ours_p50'], '%.0f'), fmt(r['ours_p99'], '%.0f'),
                      fmt(r['qemu_p50'], '%.0f'), fmt(r['qemu_p99'], '%.0f'),
                      '%s / %s' % (fmt(r['qemu_exact_p50'], '%.0f'),
                                   fmt(r['qemu_exact_p99'], '%.0f')),
                      fmt(r['p99_ratio'], '%.2f'),
                      '%s / %s' % (fmt(r['ours_writes'], '%d'),
                                   fmt(r['qemu_writes'], '%d')))
                     for r in lat_rows]))
        w('')
        qs = q.get('summary', {})
        ours_copy = (our_latency(data.get('migration'))[1] or {}).get(
            'copy') or {}
        if ours_copy.get('median_copy_seconds'):
            w('Our copy phase in those latency runs: median %.2f s (%s MB/s) '
              'for the same disk size.' % (
                  ours_copy['median_copy_seconds'], fmt(
                      (ours_copy.get('median_throughput_bytes_per_s') or 0)
                      / 1e6)))
            w('')
        if qs.get('copy'):
            w('QEMU\'s mirror copied %d MiB in %.2f s (%.1f MB/s, medians); '
              'during that copy its guest writer got %s writes through.' % (
                  qs['copy']['bytes'] // MiB, qs['copy']['median_seconds'],
                  qs['copy']['median_MBps'], fmt(qs.get(
                      'mirror (copy phase)', {}).get('median_writes'), '%d')))
            w('')
        if qs.get('mirror, ready'):
            r = qs['mirror, ready']
            w('QEMU, mirror ready (copy done, writes still mirrored): p50 '
              '%s us, p99 %s us (exact).' % (fmt(r['median_p50_us'], '%.0f'),
                                             fmt(r['median_p99_us'], '%.0f')))
            w('')

    rtt = (data.get('rtt') or {}).get('summary')
    if rtt:
        rc = data['rtt'].get('config', {})
        w('The round trip of one mirrored write')
        w('====================================')
        w('')
        w('``rtt_bench.py``: each write the mirror sends waits for one NBD '
          'write round trip over TLS (client certificates) to the '
          'destination. Here %s random 4 KiB writes a run, one at a time, '
          'from our client (in the benchmark\'s process) and from '
          '``qemu-io`` (its own timing of each request) to our server '
          '(``xsm-nbd serve``), ``nbdkit file`` and ``qemu-nbd``, each '
          'serving a raw file; paced = a sleep of %s ms after each write '
          '(the guest\'s pace above), and back to back. Exact percentiles, '
          'medians over runs.' % (rc.get('writes', '?'),
                                  data['rtt'].get('paced_gap_ms', '?')))
        w('')
        w(rst_table(['client', 'server', 'pacing', 'p50 us', 'p99 us',
                     'runs p50 us', 'runs p99 us'],
                    [(r['client'], r['server'], r['pacing'],
                      fmt(r['p50_us'], '%.0f'), fmt(r['p99_us'], '%.0f'),
                      runs_text(r['p50_runs_us'], '%.0f'),
                      runs_text(r['p99_runs_us'], '%.0f')) for r in rtt]))
        w('')

    if downs:
        w('Downtime')
        w('========')
        w('')
        w(rst_table(['migrations', 'count', 'p50 ms', 'p99 ms', 'max ms',
                     'every run ms'],
                    [(name, len(v), fmt(_common.nearest_rank(v, 50)),
                      fmt(_common.nearest_rank(v, 99)), fmt(max(v)),
                      runs_text(v)) for name, v in sorted(downs.items())]))
        w('')

    demo = (data.get('demo') or {}).get('summary')
    if demo:
        w('The demo\'s switch-over')
        w('======================')
        w('')
        w('``demo_bench.py``: ``xsm-migrate demo --json`` (a QEMU guest, '
          'two disks, its in-guest verifier writing) %d times; downtime = '
          'the storage pause (``downtime_ms``); QEMU\'s own downtime and '
          'the guest\'s longest stall beside it; then the median of each '
          'step of the switch-over (``switch_over_steps_ms``). Target: p99 '
          '<= %g ms.' % (demo['runs'], TARGETS_18['switch_over_p99_ms']))
        w('')
        w(rst_table(['runs', 'failed', 'downtime ms', 'p50', 'p99',
                     'QEMU downtime ms', 'guest stall ms'],
                    [(demo['runs'], demo['failed'],
                      runs_text(demo['downtime_ms']), fmt(demo['p50_ms']),
                      fmt(demo['p99_ms']),
                      runs_text(demo['qemu_downtime_ms'], '%g'),
                      runs_text(demo['guest_stall_ms'], '%g'))]))
        w('')
        steps = sorted((demo.get('median_steps_ms') or {}).items(),
                       key=lambda kv: -(kv[1] or 0))
        if steps:
            w(rst_table(['switch-over step', 'median ms', 'runs ms'],
                        [(k, fmt(v, '%.3f'), runs_text(
                            demo['steps_ms_runs'].get(k, []), '%.3f'))
                         for k, v in steps]))
            w('')

    if plots:
        w('Plots')
        w('=====')
        w('')
        for name, path in sorted(plots.items()):
            w('.. image:: %s\n   :alt: %s\n' % (path, name[:-4]))

    failed = [r for r in runs if r['rc']]
    if failed:
        w('What failed')
        w('===========')
        w('')
        for r in failed:
            w('``%s`` exited %s; the end of its output::' % (r['name'],
                                                             r['rc']))
            w('')
            for line in r.get('tail', '').splitlines()[-15:]:
                w('   ' + line)
            w('')
    w('How to reproduce')
    w('================')
    w('')
    w('.. code-block:: console')
    w('')
    w('   $ %s' % meta['command'])
    w('')
    w('Each benchmark\'s own tables and every run are in its JSON and text '
      'output (``--results``); ``benchmarks/README.rst`` describes the '
      'method of each.')
    return '\n'.join(out) + '\n'


# -- running ------------------------------------------------------------------

def ensure_tools(names, log):
    """Install what is missing (root only); the problems left."""
    problems = []
    missing = sorted({pkg for n in names for tool, pkg in TOOLS[n]
                      if shutil.which(tool) is None})
    if missing:
        if os.geteuid() == 0 and shutil.which('apt-get'):
            log('installing %s' % ' '.join(missing))
            env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
            subprocess.run(['apt-get', 'install', '-y',
                            '--no-install-recommends'] + missing, env=env,
                           stdout=subprocess.DEVNULL)
        for n in names:
            for tool, pkg in TOOLS[n]:
                if shutil.which(tool) is None:
                    problems.append('%s needs %s (apt-get install -y %s)'
                                    % (n, tool, pkg))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log('installing matplotlib (benchmarks/requirements.txt)')
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q',
                        '-c', os.path.join(TOP, 'upper-constraints.txt'),
                        '-r', os.path.join(HERE, 'requirements.txt')])
        try:
            import matplotlib  # noqa: F401,F811
        except ImportError:
            problems.append('matplotlib is missing (pip install -r '
                            'benchmarks/requirements.txt): no plots')
    return problems


def run_bench(name, mode, results, log, extra=()):
    script, quick, full = BENCHES[name]
    out_json = os.path.join(results, name + '.json')
    argv = [sys.executable, os.path.join(HERE, script)] + \
        (quick if mode == 'quick' else full) + list(extra) + \
        ['--json', out_json]
    display = ['python', 'benchmarks/' + script] + argv[2:-2] + \
        ['--json', name + '.json']
    log('running %s' % ' '.join(display))
    t = time.monotonic()
    with open(os.path.join(results, name + '.txt'), 'wb') as out, \
            open(os.path.join(results, name + '.log'), 'wb') as err:
        rc = subprocess.call(argv, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=err, cwd=TOP)
    took = time.monotonic() - t
    log('%s: exit %d after %.0f s' % (name, rc, took))
    tail = ''
    if rc:
        with open(os.path.join(results, name + '.log'), errors='replace') \
                as f:
            tail = f.read()[-3000:]
    return {'name': name, 'argv': argv, 'argv_display': display, 'rc': rc,
            'seconds': took, 'tail': tail}


def load_results(results, names):
    data = {}
    for name in names:
        path = os.path.join(results, name + '.json')
        if os.path.exists(path):
            with open(path) as f:
                data[name] = json.load(f)
    return data


def code_version():
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                                cwd=TOP, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL).stdout.decode()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--',
                                'xsm_driver'], cwd=TOP,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL).stdout.decode()
        return 'commit %s%s' % (commit.strip(), ' with local changes to '
                                'xsm_driver/' if dirty.strip() else '')
    except OSError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true',
                   help='small sizes, about 10 minutes')
    p.add_argument('--only', type=lambda s: s.split(','), default=list(ORDER),
                   help='benchmarks to run, of %s' % ', '.join(ORDER))
    p.add_argument('--results', help='folder for each benchmark\'s JSON and '
                   'output (default: a new folder under $TMPDIR, kept)')
    p.add_argument('--from-results', metavar='DIR',
                   help='rebuild the report from DIR, run nothing')
    p.add_argument('--out', default=os.path.join(TOP, 'doc', 'source',
                                                 'performance.rst'))
    p.add_argument('--static', default=os.path.join(
        TOP, 'doc', 'source', '_static', 'perf'))
    a = p.parse_args(argv)
    bad = set(a.only) - set(ORDER)
    if bad:
        p.error('unknown benchmark(s): %s' % ', '.join(sorted(bad)))
    names = [n for n in ORDER if n in a.only]
    mode = 'quick' if a.quick else 'full'

    def log(line):
        print('report: %s' % line, file=sys.stderr, flush=True)

    shown = ['python', 'benchmarks/report.py'] + (['--quick'] if a.quick
                                                  else [])
    if set(names) != set(ORDER):
        shown += ['--only', ','.join(names)]
    meta = {'command': ' '.join(shown), 'mode': mode,
            'date': datetime.datetime.now(datetime.timezone.utc).strftime(
                '%Y-%m-%d %H:%M UTC'),
            'machine': _common.machine(), 'code': code_version()}
    if a.from_results:
        results = a.from_results
        with open(os.path.join(results, 'runs.json')) as f:
            saved = json.load(f)
        runs, meta = saved['runs'], saved['meta']
        names = [r['name'] for r in runs]
    else:
        problems = ensure_tools(names, log)
        for problem in problems:
            log(problem)
        results = a.results or __import__('tempfile').mkdtemp(
            prefix='xsm-perf-report-')
        os.makedirs(results, exist_ok=True)
        runs = [run_bench(n, mode, results, log) for n in names]
        meta['load_after'] = os.getloadavg()
        with open(os.path.join(results, 'runs.json'), 'w') as f:
            json.dump({'runs': runs, 'meta': meta}, f, indent=1)
    data = load_results(results, names)
    try:
        plots = make_plots(data, a.static, os.path.relpath(
            a.static, os.path.dirname(os.path.abspath(a.out))))
    except ImportError:
        log('matplotlib is missing: the report has no plots')
        plots = {}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, 'w') as f:
        f.write(render(data, runs, plots, meta))
    log('report written to %s (results in %s)' % (a.out, results))
    return 1 if any(r['rc'] for r in runs) else 0


if __name__ == '__main__':
    sys.exit(main())
