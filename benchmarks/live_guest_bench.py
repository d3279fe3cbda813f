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

"""Live migration of a real QEMU guest: ours beside QEMU's own way.

The same guest both times: the guest kit (``tools/guest-kit``, kernel and
initramfs whose PID 1 is the in-guest verifier), ``--memory`` MiB, TCG,
``--disks`` virtio disks of ``--size`` bytes, each first filled with the
same seeded random bytes (so that both sides copy every byte), the
verifier writing ``--rate`` 4 KiB blocks a second to each disk and
reading them back.

``ours``
   Two in-process hosts with the ``qemu`` hypervisor driver and their
   agents on oslo.messaging's ``fake://`` transport, as in
   ``tests/functional/core/migration/test_qemu_migration.py``: the VM's
   disks are VHDs in a ``vhd`` SR served to QEMU by the host's NBD stack;
   ``migrate_vm`` moves the storage with the engine's protocol (mutual-TLS
   NBD) and the memory with QEMU's migration (TLS), both meeting at one
   switch-over.
``qemu``
   What libvirt does for ``virsh migrate --live --copy-storage-all`` (the
   order of qemu-iotests 194 and libvirt's ``qemuMigrationSrcRun``): the
   source QEMU runs on ``--peer-format`` files (``cache.direct=on``, as
   nova's ``cache=none``); the target files are made with ``qemu-img
   create``; the destination QEMU starts with ``-S -incoming defer`` and
   the same devices on them, ``nbd-server-start`` with ``tls-creds-x509``
   and ``block-export-add`` (writable) of each disk, ``migrate-incoming``
   (TLS); on the source an NBD client node per disk (TLS) and
   ``blockdev-mirror`` with ``sync=full``, ``copy-mode=write-blocking``;
   once every job is ``READY``, ``migrate`` (TLS, the same
   ``max-bandwidth`` as ours: 1 GiB/s); once completed, ``block-job-cancel``
   of each job (a ready mirror ends as completed), ``nbd-server-stop`` and
   ``cont`` on the destination.

Measures of one migration (the verifier's window is started with its
``mark`` command just before the migration, and read with ``status`` once
the guest runs on the destination):

``total_s``
   ours: from the ``migrate_vm`` call to the migration's ``finished``
   time (phase ``done``); qemu: from the first ``qemu-img create`` of a
   target to the destination's ``cont``.  Both include starting the
   destination QEMU.
``resumed_s``
   from the same start to the first progress line of the destination's
   console: when the guest writes again on the destination (ours' clean-up
   on the source, after that, is in ``total_s``).
``storage_pause_ms``
   ours only: the engine's switch-over pause (status ``downtime_ms``).
``qemu_downtime_ms``
   QEMU's ``downtime`` from the source's ``query-migrate``.  QEMU 7.2
   sets the status ``completed`` before it computes ``downtime``: a
   ``query-migrate`` in between says 0.  The peer asks again until it is
   not 0; ours reads the figure the engine kept (status
   ``qemu_downtime_ms``), and a 0 there is counted as unknown (``None``;
   the raw value is ``qemu_downtime_raw`` in the JSON).
``frozen_ms``
   the longest time the guest was stopped, seen from outside: the
   verifier prints a progress line every ``--report-ms`` ms of its own
   clock (CLOCK_MONOTONIC, which stands still while the VM is stopped);
   a thread here timestamps each line as it reaches the console files
   (source, then destination); the largest (host gap - guest gap) between
   two consecutive lines.  Resolution: this thread's 5 ms poll and the
   machine's scheduling.
``stall_ms``
   the verifier's longest gap between two completed writes within the
   window, by the guest's clock (``win_max_stall_ms``): the writes the
   guest waited for while it ran (a VM stop does not count on that
   clock; ``frozen_ms`` and ``wall_stall_ms`` see it).
``wall_stall_ms``
   the same gap on the verifier's RTC-following clock
   (``win_max_wall_stall_ms``; about one second of resolution).
``lat_p50_us``, ``lat_p99_us``, ``lat_max_us``
   the latency of the guest's writes within the window.
``writes_per_s``
   writes done in the window per second of the guest's clock (the
   verifier aims at ``--rate`` x ``--disks`` and skips the writes it fell
   behind on: a slow write costs the guest throughput).
``lost``
   mismatches + I/O errors of the verifier's full-disk ``verify`` on the
   destination (and of its progress lines): must be 0.

Every run also watches both consoles for the guest kernel in trouble
(:func:`kernel_trouble`: a panic, oops, BUG or warning; a stall of a
starved vCPU is told apart) and keeps the guest running ``--watch`` s
after its verify; a run that panics is counted (``counts`` per side in
the JSON, with the console excerpt in ``errors``) and the bench goes on.
``--ram-kib``, ``--memory-bandwidth`` and ``--ready-writes`` are for
experiments (see ``tcg_pingpong.py``: QEMU 7.2 under TCG loses guest
writes in a live migration of RAM that is a multiple of 256 KiB).

``python benchmarks/live_guest_bench.py --runs 3 --json OUT``; see
``benchmarks/README.rst``.  It asserts nothing; it exits 1 if a
verification failed on either side (a lost write) or a run failed.
"""

import argparse
import json
import logging
import os
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
import qemu_mirror_bench  # noqa: E402

MiB = _common.MiB
BLOCK = 4096
BOOT_TIMEOUT = 180.0
READY_TIMEOUT = 300.0
#: QEMU's max-bandwidth for the memory, the engine's default for ours
MEMORY_BANDWIDTH = 1 << 30
TLS_ID = 'tls0'
MEASURES = (
    # key, label, unit, format
    ('total_s', 'total migration time', 's', '%.2f'),
    ('resumed_s', 'guest writes on the destination', 's', '%.2f'),
    ('storage_pause_ms', 'storage pause (engine)', 'ms', '%.1f'),
    ('qemu_downtime_ms', 'QEMU downtime (query-migrate)', 'ms', '%.0f'),
    ('frozen_ms', 'guest frozen (seen outside)', 'ms', '%.0f'),
    ('stall_ms', 'in-guest stall (guest clock)', 'ms', '%.0f'),
    ('wall_stall_ms', 'in-guest stall (RTC, ~1 s res.)', 'ms', '%.0f'),
    ('lat_p50_us', 'guest write latency p50', 'us', '%.0f'),
    ('lat_p99_us', 'guest write latency p99', 'us', '%.0f'),
    ('lat_max_us', 'guest write latency max', 'us', '%.0f'),
    ('writes_per_s', 'guest writes done a second', '/s', '%.0f'),
    ('lost', 'lost writes (sum of all runs)', '', '%d'),
)


class BenchError(Exception):
    pass


class GuestPanic(BenchError):
    """The guest's kernel panicked, oopsed or warned on a console."""


#: seconds the consoles are read on after a kernel's panic or oops was seen
PANIC_TAIL = 2.0
#: console lines of a guest kernel in trouble (not the verifier's XSMV)
KERNEL_TROUBLE = ('Kernel panic', 'Oops', 'BUG:', 'kernel BUG',
                  'stack-protector', 'general protection fault',
                  'WARNING:', 'Call Trace', 'segfault at', 'soft lockup',
                  'hard LOCKUP', 'rcu_sched self-detected', 'detected stall',
                  'invalid opcode', 'double fault', 'Corrupted',
                  'corrupted', 'Bad page')


#: of those, the ones a starved vCPU shows (host load), not a broken kernel
KERNEL_STALLS = ('soft lockup', 'hard LOCKUP', 'rcu_sched self-detected',
                 'detected stall')


def trouble_kind(line):
    """``stall`` (the vCPU starved: host load) or ``crash``.

    >>> trouble_kind('rcu: INFO: rcu_preempt self-detected stall on CPU')
    'stall'
    >>> trouble_kind('BUG: scheduling while atomic: swapper/0/0/0x00010001')
    'crash'
    """
    return 'stall' if any(m in line for m in KERNEL_STALLS) else 'crash'


def kernel_trouble(line):
    """True when a console line says the guest's kernel is in trouble.

    >>> kernel_trouble('Kernel panic - not syncing: stack-protector: '
    ...                'Kernel stack is corrupted in: do_sys_poll+0x4b6/0x520')
    True
    >>> kernel_trouble('XSMV progress writes=1 mismatches=0')
    False
    """
    return not line.startswith('XSMV') and any(
        mark in line for mark in KERNEL_TROUBLE)


# -- the guest's console ----------------------------------------------------

class Console(threading.Thread):
    """Reads guest console files as they grow; timestamps XSMV lines.

    ``lines`` is a list of ``(host monotonic time, file index, Report)``.
    Files may not exist yet (a destination's); add them with :meth:`add`.
    """

    POLL = 0.005

    def __init__(self):
        super().__init__(daemon=True)
        from xsm_driver.hypervisor import verifier
        self._parse = verifier.parse_line
        self._files = []                 # [path, offset, partial]
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self.lines = []
        #: ``(file index, line)`` of each console line of a guest
        #: kernel's panic, oops, BUG or warning (see :func:`kernel_trouble`)
        self.panics = []
        #: every non-XSMV line of each file, as read (a source's folder
        #: may be gone by the time a run ends)
        self.text = []

    def add(self, path):
        with self._lock:
            self._files.append([path, 0, b''])
            self.text.append([])
            return len(self._files) - 1

    def run(self):
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.POLL)

    def poll(self):
        with self._lock:
            files = list(enumerate(self._files))
        for index, entry in files:
            path, offset, partial = entry
            try:
                with open(path, 'rb') as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            now = time.monotonic()
            entry[1] = offset + len(data)
            data = partial + data
            *whole, entry[2] = data.split(b'\n')
            found = []
            for raw in whole:
                line = raw.decode('utf-8', 'replace')
                rep = self._parse(line)
                if rep is not None:
                    found.append((now, index, rep))
                    continue
                with self._lock:
                    self.text[index].append(line)
                    if kernel_trouble(line):
                        self.panics.append((index, line.strip()))
            if found:
                with self._lock:
                    self.lines.extend(found)

    def stop(self):
        self._halt.set()
        if self.is_alive():
            self.join(5)

    def count(self):
        with self._lock:
            return len(self.lines)

    def wait(self, kind, pred=lambda r: True, after=0, index=None,
             timeout=60.0):
        """The first report of ``kind`` from line ``after`` on."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                lines = self.lines[after:]
            for _, i, rep in lines:
                if rep.kind == kind and (index is None or i == index) \
                        and pred(rep):
                    return rep
            if self.panics:
                index, line = self.panics[0]
                raise GuestPanic('the guest\'s kernel (console %d): %s'
                                 % (index, line))
            if time.monotonic() > deadline:
                raise BenchError('no "XSMV %s" line as expected within '
                                 '%.0f s (see the console files)'
                                 % (kind, timeout))
            time.sleep(0.02)

    def excerpt(self, index, line, before=15, after=45):
        """The kernel's lines of file ``index`` around ``line``."""
        with self._lock:
            text = list(self.text[index])
        at = next((i for i, x in enumerate(text) if x.strip() == line), 0)
        return text[max(at - before, 0):at + after]

    def first(self, index, kind='progress'):
        """Host time of the first ``kind`` line of file ``index``."""
        with self._lock:
            for t, i, rep in self.lines:
                if i == index and rep.kind == kind:
                    return t
        return None

    def frozen_ms(self, after=0):
        """The guest's longest stop seen from here, in ms.

        The largest (host gap - guest gap) of two consecutive progress
        lines from line ``after`` on (None: fewer than two).
        """
        with self._lock:
            prog = [(t, r) for t, _, r in self.lines[after:]
                    if r.kind == 'progress' and 't_ms' in r]
        prog.sort(key=lambda x: x[0])
        worst = None
        for (t1, r1), (t2, r2) in zip(prog, prog[1:]):
            gap = (t2 - t1) * 1000 - (r2['t_ms'] - r1['t_ms'])
            worst = gap if worst is None else max(worst, gap)
        return None if worst is None else round(max(worst, 0.0), 1)


def ctl_command(path, line, timeout=5.0):
    """One line to the verifier's command channel (a unix socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.encode() + b'\n')
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass


def guest_ready(rep):
    return rep['writes'] >= 40 and rep.get('wall_synced') == 1


def window(rep, marked):
    """The measures of a progress line's window (verifier fields).

    :param marked: the progress line that began the window.
    """
    if 'win_writes' not in rep:
        raise BenchError('the guest kit\'s verifier has no write-latency '
                         'window (rebuild it: tools/guest-kit/build.sh)')
    seconds = max(rep['t_ms'] - marked['t_ms'], 1) / 1000.0
    return {'window_writes': rep['win_writes'],
            'window_guest_s': seconds,
            'writes_per_s': round(rep['win_writes'] / seconds, 1),
            'stall_ms': rep['win_max_stall_ms'],
            'wall_stall_ms': rep['win_max_wall_stall_ms'],
            'lat_p50_us': rep['lat_p50_us'],
            'lat_p99_us': rep['lat_p99_us'],
            'lat_max_us': rep['lat_max_us'],
            'progress_mismatches': rep['mismatches'],
            'progress_io_errors': rep['io_errors']}


def fill_chunks(size, seed, chunk=2 * MiB):
    """The seeded random bytes every disk starts with, chunk by chunk."""
    rng = random.Random(seed)
    left = size
    while left:
        n = min(left, chunk)
        yield rng.randbytes(n)
        left -= n


# -- processes of ours and of the peer --------------------------------------

def our_qemus(root):
    """Pids of the QEMUs whose command line names a path under root."""
    from xsm_driver.hypervisor import qemu
    return qemu.processes_naming(root + os.sep)


class Ours:
    """Two in-process hosts and agents (``fake://``), one migration."""

    def __init__(self, bench, n):
        self.b = bench
        self.n = n
        self.root = bench.path('o%d' % n)
        self.hosts = {}
        self.local = None

    def make_host(self, name, specs, state_path, conf=None):
        """Host ``name``: its SR, and QEMU guests (TCG) under ``g``."""
        from xsm_driver.core.migration import host as host_mod
        from xsm_driver.core import sr as sr_mod
        from xsm_driver import hypervisor
        a = self.b.args
        srs = {}
        for spec in specs:
            sr, driver, path = host_mod.parse_sr_spec(spec)
            srs[sr] = sr_mod.load_driver(driver, sr, path)
        drv = hypervisor.load('qemu', os.path.join(self.root, name, 'g'),
                              accel='tcg', guest_kit=a.guest_kit,
                              memory_mib=a.memory, shutdown_timeout=15)
        return host_mod.Host(name, srs, state_path, drv)

    def make_hosts(self, *names):
        """The hosts and their agents on the bench's ``fake://``."""
        from xsm_driver.core.migration import manager as manager_mod
        from xsm_driver.testing import harness
        a = self.b.args
        self.local = harness.LocalHosts(
            self.root, {name: {'sr': ('vhd', os.path.join(
                self.root, name, 'sr'))} for name in names},
            self.b.transport,
            options=lambda name: manager_mod.Options(
                memory_bandwidth=a.memory_bandwidth),
            rpc_timeout=60, make_host=self.make_host)
        self.hosts = self.local.hosts
        self.local.start()
        return [self.hosts[name] for name in names]

    def run(self):
        from xsm_driver.core.rpc import api
        a = self.b.args
        tag = '%d-%d' % (os.getpid(), self.n)
        src, dst = self.make_hosts('a-' + tag, 'b-' + tag)
        rpc = api.AgentAPI(self.b.transport, src.name, timeout=120)
        vm = src.create_vm('bench', [{'sr': 'sr', 'size': a.size}
                                     for _ in range(a.disks)])
        if a.fill:
            for disk in vm.disks:
                dev = src.sr('sr').attach(disk.vdi, writable=True)
                try:
                    at = 0
                    for data in fill_chunks(a.size, a.seed):
                        dev.pwrite(data, at)
                        at += len(data)
                    dev.flush()
                finally:
                    dev.close()
        vm.qemu = {'memory_mib': a.memory, 'verifier': a.verifier}
        src.save()
        src.start_vm(vm.uuid)
        con = self.b.console
        src_console = con.add(src.qemu.console_path(vm.uuid))
        con.wait('progress', self.b.ready, index=src_console,
                 timeout=BOOT_TIMEOUT)
        time.sleep(a.settle)
        vdi_map = {d.vdi: 'sr' for d in vm.disks}
        os.sync()
        mark = con.count()
        src.qemu.guest_command(vm.uuid, 'mark')
        marked = con.wait('progress', lambda r: r.get('win_writes') == 0,
                          after=mark, index=src_console)
        mark = con.count()
        t0, t0m = time.time(), time.monotonic()
        mid = rpc.migrate_vm(vm.uuid, dst.name, vdi_map, {})
        dst_console = con.add(dst.qemu.console_path(vm.uuid))
        deadline = time.monotonic() + a.timeout
        phases, seen = [], None
        while True:
            status = rpc.migration_get(mid)
            step = '%s/%s' % (status['phase'], (status.get('progress') or
                                                {}).get('phase'))
            if step != seen:          # when each phase was first seen
                phases.append((round(time.time() - t0, 3), step))
                seen = step
            if status['finished'] is not None:
                break
            if time.monotonic() > deadline:
                raise BenchError('ours: migration %s not finished within '
                                 '%.0f s (phase %s)' % (mid, a.timeout,
                                                        status['phase']))
            time.sleep(0.02)
        if status['phase'] != 'done':
            raise BenchError('ours: migration %s ended %s: %s'
                             % (mid, status['phase'], status['error']))
        total = status['finished'] - t0
        deadline = time.monotonic() + 60
        while dst.vm_power_state(vm.uuid) != 'running':
            if time.monotonic() > deadline:
                raise BenchError('ours: the guest does not run on the '
                                 'destination 60 s after the migration')
            time.sleep(0.05)
        at = con.count()
        dst.qemu.guest_command(vm.uuid, 'status')
        rep = con.wait('progress', after=at)
        result = {'side': 'ours', 'total_s': round(total, 3),
                  'resumed_s': _since(con.first(dst_console), t0m),
                  'storage_pause_ms': status['downtime_ms'],
                  # 0: read before QEMU computed it (see the peer's)
                  'qemu_downtime_ms': status['qemu_downtime_ms'] or None,
                  'qemu_downtime_raw': status['qemu_downtime_ms'],
                  'frozen_ms': con.frozen_ms(mark),
                  'bytes_copied': status.get('bytes_copied'),
                  'phases': phases, 'status': status}
        result.update(window(rep, marked))
        result.update(self.b.verify(
            lambda line: dst.qemu.guest_command(vm.uuid, line)))
        dst.stop_vm(vm.uuid)
        return result

    def cleanup(self):
        from xsm_driver.hypervisor import qemu
        if self.local is not None:
            try:
                self.local.close()
            except Exception as exc:
                self.b.log('ours: stopping an agent: %s' % exc)
        for pid in our_qemus(self.root):
            qemu.kill(pid)
        for host in self.hosts.values():
            try:
                host.qemu.close()
            except Exception:
                pass


class PeerQemu:
    """One QEMU of the peer (``-daemonize``), its QMP and console."""

    def __init__(self, bench, folder, disks, incoming=False):
        from xsm_driver.hypervisor import base
        from xsm_driver.hypervisor import qemu
        a = bench.args
        os.makedirs(folder, mode=0o700)
        self.paths = qemu.Paths(folder)
        spec = base.GuestSpec('peer', [
            base.DiskSpec('disk%d' % i, socket='/nonexistent', size=a.size)
            for i in range(len(disks))],
            memory_mib=a.memory, verifier=a.verifier)
        argv = qemu.command_line(
            shutil.which('qemu-system-x86_64'), spec, self.paths, 'tcg',
            os.path.join(a.guest_kit, 'vmlinuz'),
            os.path.join(a.guest_kit, 'initramfs.cpio.gz'), a.memory,
            paused=incoming, incoming=incoming)
        # the same devices, on files instead of the agent's NBD exports
        for i, path in enumerate(disks):
            at = argv.index(next(x for x in argv if x.startswith(
                'driver=nbd,node-name=disk%d,' % i)))
            argv[at] = ('driver=%s,node-name=disk%d,file.driver=file,'
                        'file.filename=%s,cache.direct=%s'
                        % (a.peer_format, i, qemu.escape(path),
                           'on' if a.peer_cache == 'none' else 'off'))
        self.argv = argv
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60)
        self.pid = qemu.read_pid(self.paths.pid)
        if self.pid is not None:
            bench.peer_pids.append(self.pid)
        if proc.returncode != 0:
            raise BenchError('peer QEMU failed to start (exit %d): %s' % (
                proc.returncode, proc.stderr.decode('utf-8', 'replace')
                .strip()[-2000:]))
        self.qmp = QMP(self.paths.qmp)

    def ctl(self, line):
        ctl_command(self.paths.ctl, line)

    def close(self):
        from xsm_driver.hypervisor import qemu
        self.qmp.close()
        if self.pid is not None:
            qemu.kill(self.pid)


class QMP(qemu_mirror_bench.QMP):
    """qemu_mirror_bench's client; events are kept until waited for."""

    def __init__(self, path):
        self.seen = []
        try:
            super().__init__(path)
        except qemu_mirror_bench.BenchError as exc:
            raise BenchError(str(exc))

    def execute(self, command, **arguments):
        try:
            return super().execute(command, **arguments)
        except qemu_mirror_bench.BenchError as exc:
            raise BenchError(str(exc))

    def wait_for(self, pred, timeout, what):
        """The first event (seen or to come) for which pred holds."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.seen):
                if pred(ev):
                    return self.seen.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError('peer: no %s within %.0f s' % (what,
                                                                timeout))
            try:
                self.seen.append(self.events.get(timeout=min(left, 0.5)))
            except Exception:
                pass


def _since(t, t0):
    return None if t is None else round(t - t0, 3)


def _job_event(names, job):
    return lambda ev: (ev['event'] in names and
                       ev.get('data', {}).get('device') == job)


class Peer:
    """QEMU's own way (libvirt's ``--copy-storage-all``), one migration."""

    def __init__(self, bench, n):
        self.b = bench
        self.n = n
        self.root = bench.path('q%d' % n)
        self.qemus = []

    def image(self, path, fill):
        a = self.b.args
        if not fill:
            subprocess.run(['qemu-img', 'create', '-q', '-f', a.peer_format,
                            path, str(a.size)], check=True)
            return
        raw = path + '.raw'
        with open(raw, 'wb') as f:
            for data in fill_chunks(a.size, a.seed):
                f.write(data)
        if a.peer_format == 'raw':
            os.replace(raw, path)
        else:
            subprocess.run(['qemu-img', 'convert', '-q', '-f', 'raw', '-O',
                            a.peer_format, raw, path], check=True)
            os.unlink(raw)

    def start(self, name, disks, incoming=False):
        q = PeerQemu(self.b, os.path.join(self.root, name), disks, incoming)
        self.qemus.append(q)
        return q

    def run(self):
        a = self.b.args
        pki = self.b.pki
        os.makedirs(self.root)
        src_disks = [os.path.join(self.root, 'src%d.%s' % (i, a.peer_format))
                     for i in range(a.disks)]
        dst_disks = [os.path.join(self.root, 'dst%d.%s' % (i, a.peer_format))
                     for i in range(a.disks)]
        for path in src_disks:
            self.image(path, a.fill)
        src = self.start('src', src_disks)
        con = self.b.console
        src_console = con.add(src.paths.console)
        con.wait('progress', self.b.ready, index=src_console,
                 timeout=BOOT_TIMEOUT)
        time.sleep(a.settle)
        os.sync()
        mark = con.count()
        src.ctl('mark')
        marked = con.wait('progress', lambda r: r.get('win_writes') == 0,
                          after=mark, index=src_console)
        mark = con.count()
        # -- the migration, as libvirt runs it --------------------------
        t0 = time.monotonic()
        for path in dst_disks:                 # prepare: the targets
            subprocess.run(['qemu-img', 'create', '-q', '-f',
                            a.peer_format, path, str(a.size)], check=True)
        dst = self.start('dst', dst_disks, incoming=True)
        t_dst = time.monotonic()
        dst_console = con.add(dst.paths.console)
        dst.qmp.execute('object-add', **{
            'qom-type': 'tls-creds-x509', 'id': TLS_ID, 'dir': pki,
            'endpoint': 'server', 'verify-peer': True})
        nbd_port = _common.free_port()
        dst.qmp.execute('nbd-server-start', **{
            'addr': {'type': 'inet', 'data': {'host': '127.0.0.1',
                                              'port': str(nbd_port)}},
            'tls-creds': TLS_ID})
        for i in range(a.disks):
            dst.qmp.execute('block-export-add', **{
                'type': 'nbd', 'id': 'exp%d' % i, 'node-name': 'disk%d' % i,
                'name': 'disk%d' % i, 'writable': True})
        dst.qmp.execute('migrate-set-capabilities', capabilities=[
            {'capability': 'events', 'state': True}])
        dst.qmp.execute('migrate-set-parameters', **{'tls-creds': TLS_ID})
        mig_port = _common.free_port()
        dst.qmp.execute('migrate-incoming',
                        uri='tcp:127.0.0.1:%d' % mig_port)
        # the source: mirror every disk to the destination's exports
        src.qmp.execute('object-add', **{
            'qom-type': 'tls-creds-x509', 'id': TLS_ID, 'dir': pki,
            'endpoint': 'client', 'verify-peer': True})
        jobs = []
        for i in range(a.disks):
            src.qmp.execute('blockdev-add', **{
                'driver': 'nbd', 'node-name': 'mirror%d' % i,
                'server': {'type': 'inet', 'host': '127.0.0.1',
                           'port': str(nbd_port)},
                'export': 'disk%d' % i, 'tls-creds': TLS_ID})
            job = 'drive-disk%d' % i
            src.qmp.execute('blockdev-mirror', **{
                'job-id': job, 'device': 'disk%d' % i,
                'target': 'mirror%d' % i, 'sync': 'full',
                'copy-mode': 'write-blocking'})
            jobs.append(job)
        for job in jobs:
            ev = src.qmp.wait_for(_job_event(
                ('BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED',
                 'BLOCK_JOB_CANCELLED', 'BLOCK_JOB_ERROR'), job),
                a.timeout, 'BLOCK_JOB_READY of %s' % job)
            if ev['event'] != 'BLOCK_JOB_READY':
                raise BenchError('peer: mirror %s: %s' % (job, ev))
        t_ready = time.monotonic()
        src.qmp.execute('migrate-set-capabilities', capabilities=[
            {'capability': 'events', 'state': True}])
        src.qmp.execute('migrate-set-parameters', **{
            'tls-creds': TLS_ID, 'max-bandwidth': a.memory_bandwidth})
        src.qmp.execute('migrate', uri='tcp:127.0.0.1:%d' % mig_port)
        ev = src.qmp.wait_for(lambda e: e['event'] == 'MIGRATION' and e[
            'data']['status'] in ('completed', 'failed', 'cancelled'),
            a.timeout, 'end of the migration')
        if ev['data']['status'] != 'completed':
            info = src.qmp.execute('query-migrate')
            raise BenchError('peer: migration %s: %s' % (
                ev['data']['status'], info.get('error-desc')))
        t_migrated = time.monotonic()
        for job in jobs:                 # ready: ends as completed
            src.qmp.execute('block-job-cancel', device=job)
        for job in jobs:
            ev = src.qmp.wait_for(_job_event(
                ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED'), job), 120,
                'end of %s' % job)
            if ev.get('data', {}).get('error'):
                raise BenchError('peer: mirror %s: %s' % (job, ev))
        deadline = time.monotonic() + 120
        while dst.qmp.execute('query-migrate').get('status') != 'completed':
            if time.monotonic() > deadline:
                raise BenchError('peer: incoming migration not completed')
            time.sleep(0.01)
        t_jobs = time.monotonic()
        dst.qmp.execute('nbd-server-stop')
        dst.qmp.execute('cont')
        total = time.monotonic() - t0
        # QEMU 7.2 says "completed" before it computed "downtime" (0
        # until then): ask again, now that the guest runs
        deadline = time.monotonic() + 5
        while True:
            info = src.qmp.execute('query-migrate')
            if info.get('downtime') or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        src.close()
        at = con.count()
        dst.ctl('status')
        rep = con.wait('progress', after=at)
        result = {'side': 'qemu', 'total_s': round(total, 3),
                  'resumed_s': _since(con.first(dst_console), t0),
                  'phases': [(round(t - t0, 3), what) for t, what in (
                      (t_dst, 'destination QEMU started'),
                      (t_ready, 'every mirror ready'),
                      (t_migrated, 'migration completed'),
                      (t_jobs, 'mirrors ended'),
                      (t0 + total, 'destination resumed'))],
                  'storage_pause_ms': None,
                  'qemu_downtime_ms': info.get('downtime') or None,
                  'qemu_downtime_raw': info.get('downtime'),
                  'frozen_ms': con.frozen_ms(mark)}
        result.update(window(rep, marked))
        result.update(self.b.verify(dst.ctl))
        return result

    def cleanup(self):
        for q in self.qemus:
            try:
                q.close()
            except Exception:
                pass


# -- the benchmark ------------------------------------------------------------

class Bench:

    def __init__(self, args, root, log):
        self.args = args
        self.root = root
        self.log = log
        self.peer_pids = []
        self.console = None
        self.transport = None

    def path(self, name):
        return os.path.join(self.root, name)

    def ready(self, rep):
        """The guest is ready to migrate (see ``--ready-writes``)."""
        if self.args.ready_writes is None:
            return guest_ready(rep)
        return rep['writes'] >= self.args.ready_writes

    def setup(self):
        from oslo_config import cfg
        from xsm_driver.core.nbd import tls
        from xsm_driver.core.rpc import api
        if self.args.ram_kib:
            ram_kib_command_lines(self.args.ram_kib)
        self.pki = self.path('pki')
        tls.make_credentials(self.pki)
        self.transport = api.get_transport(cfg.ConfigOpts(), url='fake://')

    def verify(self, send):
        """Full-disk verify on the destination: the lost-writes figures.

        Then the guest runs on for ``--watch`` s, its console watched,
        and must still report (a late panic fails the run).
        """
        at = self.console.count()
        send('verify')
        rep = self.console.wait('verify', after=at, timeout=120)
        lost = rep['mismatches'] + rep['io_errors']
        out = {'verify': rep.line, 'verify_ok': rep['result'] == 'ok'
               and lost == 0, 'lost': lost, 'checked': rep['checked']}
        if self.args.watch:
            time.sleep(self.args.watch)
            at = self.console.count()
            send('status')
            late = self.console.wait('progress', after=at)
            # (the verifier's counts since its boot)
            out['watch_mismatches'] = late['mismatches']
            out['watch_io_errors'] = late['io_errors']
        return out

    def trouble(self, side, n):
        """The guest kernel's trouble lines of this run, by console."""
        con = self.console
        out = []
        seen = set()
        for index, line in con.panics:
            if index in seen:
                continue
            seen.add(index)
            lines = [x for i, x in con.panics if i == index]
            out.append({'console': CONSOLES.get(index, str(index)),
                        'kind': trouble_kind(line),
                        'lines': lines[:20], 'count': len(lines),
                        'excerpt': con.excerpt(index, line)})
        if out and self.args.keep_consoles:
            os.makedirs(self.args.keep_consoles, exist_ok=True)
            for index, text in enumerate(con.text):
                name = os.path.join(self.args.keep_consoles, '%d-%s-%d-%s.log'
                                    % (os.getpid(), side, n,
                                       CONSOLES.get(index, index)))
                with open(name, 'w') as f:
                    f.write('\n'.join(text) + '\n')
        return out

    def one(self, side, n):
        """One migration of ``side``: (result or None, error, trouble)."""
        self.console = Console()
        self.console.start()
        case = (Ours if side == 'ours' else Peer)(self, n)
        result = error = None
        t0 = time.monotonic()
        try:
            result = case.run()
            # (progress counts are the verifier's since its boot)
            result['lost'] += (
                max(result['progress_mismatches'],
                    result.get('watch_mismatches', 0)) +
                max(result['progress_io_errors'],
                    result.get('watch_io_errors', 0)))
            result['verify_ok'] = result['verify_ok'] and \
                result['lost'] == 0
        except Exception as exc:
            error = exc
            if isinstance(exc, GuestPanic):
                time.sleep(PANIC_TAIL)       # the rest of the oops
        finally:
            try:
                case.cleanup()
            finally:
                self.console.stop()
                self.console.poll()          # the last lines
        trouble = self.trouble(side, n)
        for t in trouble:
            self.log('%-4s run %d: GUEST KERNEL TROUBLE (%s) on the %s '
                     'console (%d line(s)):\n       %s' % (
                         side, n, t['kind'], t['console'], t['count'],
                         '\n       '.join(t['excerpt'])))
        if result is None:
            return None, error, trouble
        result['run'] = n
        result['loadavg'] = os.getloadavg()
        result['run_s'] = round(time.monotonic() - t0, 1)
        result['trouble'] = trouble
        if trouble:
            result['verify_ok'] = False
        self.log('%-4s run %d: total %.2f s, pause %s ms, qemu downtime %s '
                 'ms, frozen %s ms, stall %s ms (RTC %s), write p50 %s us '
                 'p99 %s us max %s us, lost %d (%s), load %.1f' % (
                     side, n, result['total_s'],
                     result['storage_pause_ms'], result['qemu_downtime_ms'],
                     result['frozen_ms'], result['stall_ms'],
                     result['wall_stall_ms'], result['lat_p50_us'],
                     result['lat_p99_us'], result['lat_max_us'],
                     result['lost'], result['verify'],
                     result['loadavg'][0]))
        self.log('     phases (s from the start): %s' % ', '.join(
            '%s %.2f' % (what, t) for t, what in result['phases']))
        return result, None, trouble

    def run(self):
        runs = {'ours': [], 'qemu': []}
        errors = []
        counts = {side: new_counts() for side in runs}
        for n in range(self.args.runs):
            order = ('ours', 'qemu') if n % 2 == 0 else ('qemu', 'ours')
            if self.args.side != 'both':
                order = (self.args.side,)
            for side in order:
                try:
                    result, error, trouble = self.one(side, n)
                except Exception as exc:        # (not the run's own)
                    result, error, trouble = None, exc, []
                count(counts[side], result, error, trouble)
                if result is not None:
                    runs[side].append(result)
                else:                           # reported, run on
                    self.log('%s run %d FAILED: %s: %s (load %.1f)' % (
                        side, n, type(error).__name__, error,
                        os.getloadavg()[0]))
                    errors.append({'side': side, 'run': n,
                                   'error': str(error),
                                   'panic': isinstance(error, GuestPanic),
                                   'trouble': trouble,
                                   'loadavg': os.getloadavg()})
            self.log('after run %d: %s' % (n, format_counts(counts)))
        return runs, errors, counts

    def cleanup(self):
        from xsm_driver.hypervisor import qemu
        if self.console is not None:
            self.console.stop()
        for pid in self.peer_pids:
            qemu.kill(pid)
        for pid in our_qemus(self.root):       # anything left over
            qemu.kill(pid)
        if self.transport is not None:
            try:
                self.transport.cleanup()
            except Exception:
                pass


def ram_kib_command_lines(kib):
    """Every QEMU of this process gets ``kib`` KiB of RAM (``-m NK``).

    An experiment (``--ram-kib``), for both sides alike: the QEMUs of ours
    are started in this process by the ``qemu`` driver, the peer's with
    the same :func:`qemu.command_line`.
    """
    from xsm_driver.hypervisor import qemu
    plain = qemu.command_line

    def command_line(*args, **kwargs):
        argv = plain(*args, **kwargs)
        argv[argv.index('-m') + 1] = '%dK' % kib
        return argv

    qemu.command_line = command_line


#: the console files of a run, by their index in its Console
CONSOLES = {0: 'source', 1: 'destination'}


def new_counts():
    return {'runs': 0, 'ok': 0, 'failed': 0, 'panicked': 0, 'stalled': 0,
            'trouble_source': 0, 'trouble_destination': 0, 'lost': 0,
            'verify_failed': 0, 'run_errors': []}


def count(c, result, error, trouble):
    """Add one run's outcome to its side's counts ``c`` (pure)."""
    c['runs'] += 1
    if any(t.get('kind') != 'stall' for t in trouble):
        c['panicked'] += 1
    elif trouble:
        c['stalled'] += 1
    for t in trouble:
        key = 'trouble_%s' % t['console']
        c[key] = c.get(key, 0) + 1
    if result is None:
        c['failed'] += 1
        c['run_errors'].append(str(error)[:200])
        return
    c['lost'] += result['lost']
    if result['verify_ok']:
        c['ok'] += 1
    else:
        c['verify_failed'] += 1


def format_counts(counts):
    return '; '.join(
        '%s: %d run(s), %d ok, %d failed, %d with a kernel panic/oops/BUG '
        'and %d with only a stall (consoles in trouble: source %d, '
        'destination %d), %d lost write(s), %d verification(s) failed'
        % (side, c['runs'], c['ok'], c['failed'], c['panicked'],
           c['stalled'], c['trouble_source'], c['trouble_destination'],
           c['lost'], c['verify_failed']) for side, c in counts.items())


def summarise(runs):
    """Medians per side (lost writes: the sum), ratios, targets (pure).

    Ratios are ours/QEMU; a target is None when a side has no figure.
    """
    out = {}
    for key, _, _, _ in MEASURES:
        pick = _common.median if key != 'lost' else (
            lambda vals: sum(v for v in vals if v is not None))
        ours = pick([r.get(key) for r in runs['ours']])
        peer = pick([r.get(key) for r in runs['qemu']])
        out[key] = {'ours': ours, 'qemu': peer,
                    'ratio': _common.ratio(ours, peer)}
    total, stall = out['total_s'], out['stall_ms']
    lost_ours = sum(r['lost'] for r in runs['ours'])
    out['targets'] = {
        'total time <= QEMU\'s': None if None in (
            total['ours'], total['qemu']) else total['ours'] <=
        total['qemu'],
        'in-guest stall <= QEMU\'s': None if None in (
            stall['ours'], stall['qemu']) else stall['ours'] <=
        stall['qemu'],
        'zero lost writes (ours)': (lost_ours == 0 and all(
            r['verify_ok'] for r in runs['ours'])) if runs['ours']
        else None}
    return out


def format_table(summary, runs, args):
    def fmt(value, spec):
        if value is None:
            return '-'
        return spec % value

    lines = ['Live migration of a QEMU guest (TCG, %d MiB RAM, %d disk(s) '
             'of %d MiB%s, verifier %d writes/s per disk): medians of %d '
             'run(s) of ours, %d of QEMU\'s (%s, cache=%s)' % (
                 args.memory, args.disks, args.size // MiB,
                 ' filled' if args.fill else ' empty', args.rate,
                 len(runs['ours']), len(runs['qemu']), args.peer_format,
                 args.peer_cache),
             '%-34s %10s %10s %8s' % ('measure', 'ours', 'QEMU',
                                      'ours/QEMU')]
    for key, label, unit, spec in MEASURES:
        s = summary[key]
        lines.append('%-34s %10s %10s %8s' % (
            '%s%s' % (label, ' (%s)' % unit if unit else ''),
            fmt(s['ours'], spec), fmt(s['qemu'], spec),
            fmt(s['ratio'], '%.2f')))
    for name, met in summary['targets'].items():
        lines.append('target %-30s %s' % (name + ':', {
            True: 'met', False: 'NOT met', None: 'unknown'}[met]))
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--disks', type=int, default=2,
                   help='virtio disks of the guest (default 2)')
    p.add_argument('--size', type=_common.parse_size, default='64M',
                   help='size of each disk (default 64M)')
    p.add_argument('--no-fill', dest='fill', action='store_false',
                   help='leave the disks empty (default: every byte of '
                   'every disk written with seeded random data first)')
    p.add_argument('--rate', type=int, default=50,
                   help='guest writes a second per disk (default 50)')
    p.add_argument('--report-ms', type=int, default=100,
                   help='the verifier\'s progress period, the resolution '
                   'of frozen_ms (default 100)')
    p.add_argument('--memory', type=int, default=128,
                   help='guest RAM in MiB (default 128)')
    p.add_argument('--memory-bandwidth', type=_common.parse_size,
                   default=str(MEMORY_BANDWIDTH),
                   help='QEMU\'s max-bandwidth for the memory, both sides '
                   '(default 1G a second, the engine\'s default)')
    p.add_argument('--ram-kib', type=int, metavar='KIB',
                   help='an experiment: give every QEMU KIB KiB of RAM '
                   'instead of --memory MiB (QEMU rounds it up to 8 KiB), '
                   'e.g. 131080: not a multiple of 256 KiB, so QEMU 7.2 '
                   'syncs its dirty bitmap page by page')
    p.add_argument('--settle', type=float, default=2.0,
                   help='seconds the guest writes after its boot before '
                   'the migration (default 2)')
    p.add_argument('--ready-writes', type=int, metavar='N',
                   help='migrate (after --settle) once the verifier did N '
                   'writes (default: 40 writes and its wall clock synced '
                   'with the RTC); 20 and --settle 0 migrate a guest '
                   'booted a moment ago, as the functional tests do')
    p.add_argument('--peer-format', choices=('qcow2', 'raw'),
                   default='qcow2',
                   help='the format of the peer\'s disks (default qcow2, '
                   'nova\'s)')
    p.add_argument('--peer-cache', choices=('none', 'writeback'),
                   default='none',
                   help='the peer\'s disk cache mode (default none, '
                   'nova\'s default: O_DIRECT)')
    p.add_argument('--runs', type=int, default=3,
                   help='migrations of each side; medians (default 3)')
    p.add_argument('--side', choices=('both', 'ours', 'qemu'),
                   default='both', help='migrate with both ways, '
                   'interleaved (default), or with one only')
    p.add_argument('--watch', type=float, default=2.0,
                   help='seconds the guest runs on the destination after '
                   'its full-disk verify, its console watched for a '
                   'kernel panic or oops (default 2)')
    p.add_argument('--keep-consoles', metavar='DIR',
                   help='write the console text of each run whose guest '
                   'kernel was in trouble to DIR')
    p.add_argument('--timeout', type=float, default=300,
                   help='seconds one migration may take')
    p.add_argument('--guest-kit', default=os.environ.get(
        'XSM_GUEST_KIT', os.path.join(TOP, '.guest-kit')),
        help='the guest kit: vmlinuz and initramfs.cpio.gz, as '
        'tools/guest-kit/build.sh makes them (default '
        '$XSM_GUEST_KIT, else .guest-kit)')
    p.add_argument('--seed', type=int, default=20240601,
                   help='seed of the disks\' first data (default 20240601)')
    p.add_argument('--debug', action='store_true',
                   help='the engine\'s log on stderr')
    _common.add_scratch_options(p, kept='disks, logs, consoles')
    a = p.parse_args(argv)
    if a.runs < 1 or a.disks < 1 or a.rate < 1:
        p.error('--runs, --disks and --rate must be at least 1')
    if a.disks > 16:
        p.error('--disks: the guest kit\'s verifier handles at most 16')
    if a.size % BLOCK or a.size < MiB:
        p.error('--size must be a multiple of 4 KiB, at least 1M')
    if a.report_ms < 10:
        p.error('--report-ms must be at least 10')
    a.verifier = {'rate': a.rate, 'report_ms': a.report_ms}
    for tool, package in (('qemu-system-x86_64', 'qemu-system-x86'),
                          ('qemu-img', 'qemu-utils')):
        if shutil.which(tool) is None:
            print('live_guest_bench: %s not found: apt-get install -y %s'
                  % (tool, package), file=sys.stderr)
            return 2
    for name in ('vmlinuz', 'initramfs.cpio.gz'):
        if not os.path.isfile(os.path.join(a.guest_kit, name)):
            print('live_guest_bench: no %s in %s: build the guest kit '
                  '(tools/guest-kit/build.sh)' % (name, a.guest_kit),
                  file=sys.stderr)
            return 2
    # short: the guests' unix sockets must fit in sockaddr_un
    root = tempfile.mkdtemp(prefix='xsm-lg-', dir=a.workdir)
    need = 6 * a.disks * a.size + 256 * MiB
    if shutil.disk_usage(root).free < need:
        shutil.rmtree(root, ignore_errors=True)
        print('live_guest_bench: %d MiB free in %s, %d MiB needed' % (
            shutil.disk_usage(a.workdir or tempfile.gettempdir()).free //
            MiB, root, need // MiB), file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if a.debug else logging.ERROR,
                        stream=sys.stderr)

    def log(line):
        if not a.quiet:
            print(line, file=sys.stderr, flush=True)

    _common.interrupt_on_sigterm()
    bench = Bench(a, root, log)
    status = 0
    try:
        bench.setup()
        runs, errors, counts = bench.run()
        summary = summarise(runs)
        summary['counts'] = counts
        print(format_table(summary, runs, a))
        print('runs: %s' % format_counts(counts))
        bad = [r for side in runs.values() for r in side
               if not r['verify_ok']]
        if bad or errors:
            print('live_guest_bench: %d run(s) failed, %d verification(s) '
                  'failed' % (len(errors), len(bad)), file=sys.stderr)
            status = 1
        if a.json:
            with open(a.json, 'w') as f:
                json.dump({'config': {k: v for k, v in vars(a).items()},
                           'machine': _common.machine(),
                           'runs': runs, 'errors': errors,
                           'counts': counts,
                           'summary': summary}, f, indent=1)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print('live_guest_bench: error: %s' % exc, file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print('live_guest_bench: interrupted', file=sys.stderr)
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
