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

"""The ``qemu`` hypervisor driver: each guest is a QEMU process.

Each running guest is a ``qemu-system-x86_64`` process started
``-daemonize`` (so it outlives an agent restart) with everything in the
guest's folder ``<state_dir>/<name>/``:

* ``guest.json`` -- the :class:`GuestSpec` it was started from;
* ``qemu.pid`` -- its pid (``-pidfile``);
* ``qmp.sock`` -- its QMP socket (power state, pause, reset, ...);
* ``console.log`` -- its first serial port, the console: the kernel's
  messages and the in-guest verifier's ``XSMV ...`` lines;
* ``ctl.sock`` -- its second serial port, the verifier's command channel
  (``verify``, ``status``, ...; see :meth:`QemuDriver.guest_command`).

Disks are virtio-blk devices on ``-blockdev driver=nbd`` nodes that
connect to a unix socket (or, while the agent's NBD server listens on TCP
only, to a TCP address): every guest I/O goes through the NBD server on
the other end. A driver built again (an agent restart) finds the processes
in the folders (:meth:`QemuDriver.recover`): a pid whose
``/proc/PID/cmdline`` is this folder's QEMU is adopted, a QEMU that does not
answer QMP is killed, anything else means the guest is halted.

Live migration of a guest (the engine's memory leg, see
``xsm_driver.core.migration.source``): the destination's QEMU starts with
``-incoming defer`` and listens (:meth:`QemuDriver.listen_incoming`); the
source's QEMU migrates with the ``pause-before-switchover`` capability and
stops, its vCPUs stopped and its disks drained and flushed, in
``pre-switchover`` (:meth:`QemuDriver.migrate_until_switchover`) until the
engine has switched the storage over and sends ``migrate-continue``
(:meth:`QemuDriver.migrate_finish`); before that, a cancel
(:meth:`QemuDriver.migrate_cancel`) leaves the source's guest running.

The decisions (:func:`command_line`, :func:`power_state`,
:func:`recovery_action`, :func:`migration_step`) are pure functions.
"""

import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

from xsm_driver.hypervisor import accel as accel_mod
from xsm_driver.hypervisor import base
from xsm_driver.hypervisor import qmp
from xsm_driver.hypervisor import verifier

LOG = logging.getLogger(__name__)

SPEC_FILE = 'guest.json'
PID_FILE = 'qemu.pid'
QMP_SOCK = 'qmp.sock'
CTL_SOCK = 'ctl.sock'
CONSOLE_LOG = 'console.log'
#: a migration's TLS credentials in QEMU's layout, in the guest's folder
TLS_DIR = 'migration-tls'
TLS_ID = 'xsm-migration-tls'
#: AF_UNIX paths longer than this do not fit in sockaddr_un
MAX_SOCKET_PATH = 107

#: every guest kernel's first words. ``no_timer_check``: Linux checks at
#: boot that timer interrupts arrive (io_apic.c ``timer_irq_works``: ten
#: ticks in a busy wait) and panics "IO-APIC + timer doesn't work!" when
#: they do not; a TCG guest on a loaded host misses them (its timers run
#: in QEMU's main thread, starved meanwhile): a guest booting at load ~40
#: panicked so in the Nova suite. Every virtual machine can skip it.
BASE_CMDLINE = 'console=ttyS0 quiet no_timer_check'

# query-status "status" -> power state
_PAUSED_STATUSES = frozenset((
    'paused', 'suspended', 'prelaunch', 'inmigrate', 'postmigrate',
    'finish-migrate', 'save-vm', 'restore-vm', 'debug', 'watchdog',
    'io-error', 'colo'))
_CRASHED_STATUSES = frozenset(('guest-panicked', 'internal-error'))

# recover(): what to do with a guest folder
ADOPT = 'adopt'          # our QEMU is running: talk to it
GONE = 'gone'            # no process: the guest is halted
FOREIGN = 'foreign'      # the pid is another process now: halted, no kill


#: KiB a TCG guest's RAM gets above its size (see :func:`memory_option`):
#: QEMU rounds RAM up to 8 KiB
TCG_RAM_PAD_KIB = 8

#: seconds a completed migration's source may take to work its downtime out
DOWNTIME_WAIT = 0.5
#: longest wait for QEMU's next ``MIGRATION`` event between two
#: ``query-migrate`` (the event wakes the wait at once)
MIGRATION_POLL = 0.05
#: seconds a QEMU whose QMP broke mid-call is given to be seen exited (it
#: closes its monitor before its process ends)
EXIT_GRACE = 0.5

#: RFC 7919's ffdhe2048 group as PKCS #3 (``dh-params.pem``). A
#: ``tls-creds-x509`` server whose folder has no such file makes QEMU
#: generate 2048-bit parameters (crypto/tlscreds.c,
#: ``gnutls_dh_params_generate2``): 0.15-1.3 s of each incoming
#: migration measured here. The group is public and standard (TLS 1.3's
#: finite-field groups; ``openssl genpkey -genparam -algorithm DH -pkeyopt
#: group:ffdhe2048`` prints the same bytes); TLS 1.3 handshakes use
#: ECDHE and never it.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class QemuError(base.HypervisorError):
    """QEMU did not start, or did not do what it was asked."""


def escape(value):
    """A value inside a QEMU ``-opt key=value,...`` list (``,`` doubled)."""
    return str(value).replace(',', ',,')


class Paths:
    """The files of one guest folder."""

    def __init__(self, folder):
        self.folder = folder
        self.spec = os.path.join(folder, SPEC_FILE)
        self.pid = os.path.join(folder, PID_FILE)
        self.qmp = os.path.join(folder, QMP_SOCK)
        self.ctl = os.path.join(folder, CTL_SOCK)
        self.console = os.path.join(folder, CONSOLE_LOG)


# ``-bios`` of each firmware (QEMU finds the file in its data folder,
# /usr/share/qemu: Debian's qemu-system-data); None: QEMU's own default.
BIOS = {'qboot': 'qboot.rom', 'seabios': None}


def kernel_cmdline(spec):
    """The guest kernel's command line: console, verifier options, extra."""
    words = [BASE_CMDLINE]
    words += ['xsmv.%s=%s' % (k, spec.verifier[k])
              for k in sorted(spec.verifier)]
    if spec.cmdline:
        words.append(spec.cmdline)
    return ' '.join(words)


def command_line(binary, spec, paths, accel, kernel, initrd, memory_mib,
                 paused=False, reconnect_delay=0, incoming=False):
    """The argv of the QEMU process of guest ``spec``.

    :param paths: the guest's :class:`Paths`.
    :param accel: ``kvm`` or ``tcg`` (see :mod:`accel`).
    :param memory_mib: RAM when ``spec`` does not say.
    :param paused: start with the vCPUs stopped (``-S``).
    :param reconnect_delay: seconds QEMU keeps a disk's requests waiting
        and reconnects when its NBD server goes away (an agent restart),
        before it fails them (0: fail them at once).
    :param incoming: the guest of a live migration: its state comes from
        the source's QEMU (``-incoming defer``; see
        :meth:`QemuDriver.listen_incoming`).
    :raises QemuError: a socket path too long for AF_UNIX.
    """
    for disk in spec.disks:
        if disk.socket is None and (disk.host is None or not disk.port):
            raise QemuError('disk %s of guest %s has no NBD server (a unix '
                            'socket or a TCP address)'
                            % (disk.name, spec.name))
    for path in [paths.qmp, paths.ctl] + [d.socket for d in spec.disks
                                          if d.socket is not None]:
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise QemuError('socket path %s is longer than %d bytes, the '
                            'most a unix socket address holds'
                            % (path, MAX_SOCKET_PATH))
    argv = [binary,
            '-name', 'guest=%s,debug-threads=on' % escape(spec.name),
            '-machine', 'q35', '-accel', accel]
    if accel_mod.CPU.get(accel):
        argv += ['-cpu', accel_mod.CPU[accel]]
    argv += [
        '-m', memory_option(spec.memory_mib or memory_mib, accel),
        '-smp', str(spec.vcpus),
        '-nodefaults', '-no-user-config', '-display', 'none',
        # the in-guest verifier's wall clock follows the RTC
        '-rtc', 'base=utc,clock=host',
    ]
    if BIOS[spec.firmware]:
        argv += ['-bios', BIOS[spec.firmware]]
    argv += [
        '-kernel', kernel, '-initrd', initrd,
        '-append', kernel_cmdline(spec),
        '-chardev', 'file,id=console,path=%s' % escape(paths.console),
        '-serial', 'chardev:console',
        '-chardev', 'socket,id=ctl,path=%s,server=on,wait=off'
        % escape(paths.ctl),
        '-serial', 'chardev:ctl',
        '-chardev', 'socket,id=qmp,path=%s,server=on,wait=off'
        % escape(paths.qmp),
        '-mon', 'chardev=qmp,mode=control',
    ]
    for i, disk in enumerate(spec.disks):
        if disk.socket is not None:
            server = 'server.type=unix,server.path=%s' % escape(disk.socket)
        else:
            server = 'server.type=inet,server.host=%s,server.port=%d' % (
                escape(disk.host), int(disk.port))
        geometry = ''
        if disk.size:
            geometry = ',cyls=%d,heads=%d,secs=%d' % chs(disk.size)
        argv += ['-blockdev',
                 'driver=nbd,node-name=disk%d,%s,export=%s%s'
                 % (i, server, escape(disk.export or ''),
                    ',reconnect-delay=%d' % reconnect_delay
                    if reconnect_delay else ''),
                 '-device', 'virtio-blk-pci,drive=disk%d,id=vd%d%s'
                 % (i, i, geometry)]
    if paused:
        argv.append('-S')
    if incoming:
        argv += ['-incoming', 'defer']
    argv += ['-pidfile', paths.pid, '-daemonize']
    return argv


def memory_option(memory_mib, accel):
    """QEMU's ``-m`` for a guest of ``memory_mib`` MiB.

    Under TCG, :data:`TCG_RAM_PAD_KIB` more. QEMU before 9.0 loses guest
    writes while it migrates the RAM of a TCG guest when that RAM is a
    multiple of 256 KiB: its dirty bitmap's word-at-a-time sync clears
    the bits without resetting TCG's TLB, so a page the guest writes
    again through a TLB entry it already had is not sent again (QEMU
    commit 03bfc2188f06, "physmem: Fix migration dirty bitmap coherency
    with TCG memory access"; Debian 12's QEMU 7.2 does not have it). The
    migrated guest wakes up with stale pages: kernel oopses and panics
    on the destination. A RAM size that is no such multiple makes QEMU
    sync page by page, which resets the TLB.

    >>> memory_option(128, 'kvm')
    '128'
    >>> memory_option(128, 'tcg')
    '131080K'
    """
    if accel == accel_mod.TCG:
        return '%dK' % (int(memory_mib) * 1024 + TCG_RAM_PAD_KIB)
    return str(memory_mib)


def chs(size):
    """A disk's (cylinders, heads, sectors) from its size in bytes.

    The same on every host for the same size, so that a migrated guest
    sees the geometry it had; set, it spares QEMU its guess, a read of
    the disk's first sector when the device is made.

    >>> chs(16 << 20)
    (32, 16, 63)
    >>> chs(512)
    (1, 16, 63)
    >>> chs(1 << 40)
    (65535, 16, 63)
    """
    cyls = size // (16 * 63 * 512)
    return (min(max(cyls, 1), 65535), 16, 63)


def power_state(status):
    """The power state of a QMP ``query-status`` ``status``."""
    if status == 'running':
        return base.RUNNING
    if status in _CRASHED_STATUSES:
        return base.CRASHED
    if status == 'shutdown':
        return base.HALTED
    if status in _PAUSED_STATUSES:
        return base.PAUSED
    return base.PAUSED         # a status newer than this list: not running


# migration_step(): what the engine does on a query-migrate status
WAIT = 'wait'            # the migration goes on
SWITCH = 'switch'        # the source paused before the switch-over
DONE = 'done'            # completed
FAILED = 'failed'        # failed or cancelled

_MIGRATION_FAILED = frozenset(('failed', 'cancelled', 'cancelling'))


def migration_step(status, want):
    """What a ``query-migrate`` ``status`` means to one waiting for it.

    :param want: ``pre-switchover`` (the source's wait for the
        switch-over) or ``completed``.
    :returns: WAIT, SWITCH, DONE or FAILED.

    >>> migration_step('active', 'pre-switchover')
    'wait'
    >>> migration_step('pre-switchover', 'pre-switchover')
    'switch'
    >>> migration_step('completed', 'completed')
    'done'
    >>> migration_step('cancelled', 'completed')
    'failed'
    """
    if status in _MIGRATION_FAILED:
        return FAILED
    if status == 'completed':
        return DONE
    if status == 'pre-switchover' and want == 'pre-switchover':
        return SWITCH
    if status == 'none' and want == 'pre-switchover':
        return FAILED            # nothing runs: the migrate was lost
    return WAIT


def is_our_qemu(argv, qmp_path):
    """Whether a process's argv is the QEMU of the folder of ``qmp_path``."""
    if not argv or not os.path.basename(argv[0]).startswith('qemu-system'):
        return False
    wanted = 'path=%s,' % escape(qmp_path)
    return any(wanted in arg for arg in argv)


def recovery_action(pid, argv, qmp_path):
    """What :meth:`QemuDriver.recover` does with one guest folder.

    :param pid: from the pid file (None: no readable pid file).
    :param argv: that process's argv from ``/proc/PID/cmdline`` (None: no
        such process, or a zombie).
    :returns: ADOPT, GONE or FOREIGN.
    """
    if pid is None or argv is None:
        return GONE
    return ADOPT if is_our_qemu(argv, qmp_path) else FOREIGN


# -- processes -------------------------------------------------------------

def read_pid(path):
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _exits(guest, within):
    """Whether ``guest``'s process is gone, or goes within ``within`` s."""
    deadline = time.monotonic() + within
    while guest.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def process_argv(pid):
    """argv of a live (not zombie) process, or None."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
        if stat[stat.rindex(')') + 2] in 'ZX':
            return None
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            raw = f.read()
    except (OSError, ValueError, IndexError):
        return None
    if not raw:
        return None
    return [a.decode('utf-8', 'replace') for a in raw.rstrip(b'\0')
            .split(b'\0')]


def processes_naming(folder):
    """pids of the live QEMU processes whose command line names ``folder``.

    (What a test, the demo or a benchmark checks it left nothing behind
    with.)
    """
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        argv = process_argv(int(name))
        if argv and os.path.basename(argv[0]).startswith('qemu-system') \
                and any(folder in arg for arg in argv):
            found.append(int(name))
    return found


def wait_gone(pid, timeout):
    """Wait until ``pid`` is gone (or a zombie); True when it is."""
    deadline = time.monotonic() + timeout
    while process_argv(pid) is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def kill(pid, argv_check=None, term_timeout=3.0):
    """SIGTERM, then SIGKILL, ``pid``; True when it is gone.

    :param argv_check: a predicate on the process's argv; the process is
        left alone unless it holds (the pid may have been reused).
    """
    argv = process_argv(pid)
    if argv is None:
        return True
    if argv_check is not None and not argv_check(argv):
        return True
    for sig, wait in ((signal.SIGTERM, term_timeout),
                      (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)   # a stopped one hears it
        except ProcessLookupError:
            return True
        if wait_gone(pid, wait):
            return True
    return False


class _Guest:
    """What the driver holds of one running guest."""

    def __init__(self, spec, paths, pid):
        self.spec, self.paths, self.pid = spec, paths, pid
        self.lock = threading.RLock()
        self.qmp = None

    def is_ours(self, argv):
        return is_our_qemu(argv, self.paths.qmp)

    def alive(self):
        argv = process_argv(self.pid)
        return argv is not None and self.is_ours(argv)


class QemuDriver(base.Driver):
    """Run guests as QEMU processes.

    :param state_dir: the folder of the guests' folders.
    :param binary: the QEMU system emulator.
    :param accel: ``auto``, ``kvm`` or ``tcg``.
    :param guest_kit: folder with ``vmlinuz`` and ``initramfs.cpio.gz``,
        booted by guests whose spec names no kernel.
    :param memory_mib: RAM of a guest whose spec does not say.
    :param shutdown_timeout: seconds between the ACPI power-off request
        and the kill.
    :param qmp_timeout: seconds for a QMP command.
    :param reconnect_delay: seconds a guest's disk I/O waits for its NBD
        server to come back (see :func:`command_line`).
    """

    name = 'qemu'

    def __init__(self, state_dir, binary='qemu-system-x86_64',
                 accel=accel_mod.AUTO, guest_kit=None, memory_mib=256,
                 shutdown_timeout=30, qmp_timeout=10.0,
                 reconnect_delay=60):
        accel_mod.decide(accel, False)         # validates the setting
        self.state_dir = state_dir
        self.binary = binary
        self.accel_setting = accel
        self.guest_kit = guest_kit
        self.memory_mib = memory_mib
        self.shutdown_timeout = shutdown_timeout
        self.qmp_timeout = qmp_timeout
        self.reconnect_delay = reconnect_delay
        self._accel = None
        self._guests = {}
        self._lock = threading.Lock()
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # One driver per folder: a second one would take the QEMUs that
        # the first holds the QMP connections of for dead, and kill them.
        self._lock_fd = os.open(os.path.join(state_dir, 'driver.lock'),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise QemuError('another qemu driver (an agent still running?) '
                            'manages the guests in %s' % state_dir)

    @classmethod
    def from_config(cls, conf, state_dir):
        h = conf.hypervisor
        return cls(state_dir, binary=h.qemu_binary, accel=h.accel,
                   guest_kit=h.guest_kit, memory_mib=h.default_memory_mib,
                   shutdown_timeout=h.shutdown_timeout,
                   reconnect_delay=h.nbd_reconnect_delay)

    # -- set-up --------------------------------------------------------------

    @property
    def accel(self):
        """The accelerator guests run with (probes on first use)."""
        if self._accel is None and self.accel_setting != accel_mod.AUTO:
            self._accel = self.accel_setting
        if self._accel is None:
            kernel = None
            if self.guest_kit:
                kernel = os.path.join(self.guest_kit, 'vmlinuz')
                if not os.path.isfile(kernel):
                    kernel = None
            self._accel = accel_mod.resolve(
                self.accel_setting, self._binary_path(),
                cache_file=os.path.join(self.state_dir, 'accel-probe.json'),
                kernel=kernel)
        return self._accel

    def _binary_path(self):
        path = shutil.which(self.binary)
        if path is None:
            raise QemuError('QEMU binary %s not found: install Debian\'s '
                            'qemu-system-x86 or set [hypervisor]qemu_binary'
                            % self.binary)
        return path

    def _kernel(self, spec):
        kernel, initrd = spec.kernel, spec.initrd
        if kernel is None:
            if not self.guest_kit:
                raise QemuError('guest %s names no kernel and no guest kit '
                                'is configured' % spec.name)
            kernel = os.path.join(self.guest_kit, 'vmlinuz')
            if initrd is None:
                initrd = os.path.join(self.guest_kit, 'initramfs.cpio.gz')
        for path in (kernel, initrd):
            if path is not None and not os.path.isfile(path):
                raise QemuError('%s not found (build the guest kit with '
                                'tools/guest-kit/build.sh)' % path)
        return kernel, initrd

    def paths(self, name):
        return Paths(os.path.join(self.state_dir, name))

    # -- life cycle ----------------------------------------------------------

    def start(self, spec, paused=False, timeout=30.0, incoming=False):
        with self._lock:
            old = self._guests.get(spec.name, ())
            if old is None or (old and old.alive()):
                raise base.GuestExists(driver=self.name, name=spec.name)
            if old:                       # halted: start it again
                self._forget(old)
            self._guests[spec.name] = None        # reserved while starting
        try:
            guest = self._start(spec, paused, timeout, incoming)
        except BaseException:
            with self._lock:
                self._guests.pop(spec.name, None)
            raise
        with self._lock:
            self._guests[spec.name] = guest
        return guest.pid

    def _start(self, spec, paused, timeout, incoming=False):
        binary = self._binary_path()
        kernel, initrd = self._kernel(spec)
        paths = self.paths(spec.name)
        os.makedirs(paths.folder, mode=0o700, exist_ok=True)
        pid = read_pid(paths.pid)
        if pid is not None and is_our_qemu(process_argv(pid) or (),
                                           paths.qmp):
            raise base.GuestExists(driver=self.name, name=spec.name)
        for stale in (paths.pid, paths.qmp, paths.ctl):
            _unlink(stale)
        with open(paths.spec + '.tmp', 'w') as f:
            json.dump(spec.to_dict(), f, indent=1, sort_keys=True)
        os.replace(paths.spec + '.tmp', paths.spec)
        argv = command_line(binary, spec, paths, self.accel, kernel, initrd,
                            self.memory_mib, paused, self.reconnect_delay,
                            incoming)
        LOG.info('starting guest %s (%s): %s', spec.name, self.accel,
                 ' '.join(argv))
        try:
            # -daemonize: the parent exits once the guest is set up (and
            # the QMP socket listens), or with the error
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_folder(paths)
            raise QemuError('QEMU of guest %s did not start within %.0f s'
                            % (spec.name, timeout))
        if proc.returncode != 0:
            self._kill_folder(paths)
            raise QemuError('QEMU of guest %s failed to start (exit %d): %s'
                            % (spec.name, proc.returncode,
                               proc.stderr.decode('utf-8', 'replace')
                               .strip()[-2000:]))
        pid = read_pid(paths.pid)
        guest = _Guest(spec, paths, pid)
        if pid is None or not guest.alive():
            self._kill_folder(paths)
            raise QemuError('QEMU of guest %s exited right after it started'
                            % spec.name)
        try:
            self._qmp(guest)
        except Exception:
            kill(pid, guest.is_ours)
            raise
        LOG.info('guest %s runs as pid %d', spec.name, pid)
        return guest

    def _kill_folder(self, paths):
        pid = read_pid(paths.pid)
        if pid is not None:
            kill(pid, lambda argv: is_our_qemu(argv, paths.qmp))
        for stale in (paths.pid, paths.qmp, paths.ctl):
            _unlink(stale)

    def _get(self, name):
        with self._lock:
            guest = self._guests.get(name)
        if guest is None:
            raise base.GuestNotFound(driver=self.name, name=name)
        return guest

    def _qmp(self, guest):
        if guest.qmp is None or not guest.qmp.connected:
            guest.qmp = qmp.Client(guest.paths.qmp,
                                   timeout=self.qmp_timeout).connect()
        return guest.qmp

    def qmp_execute(self, name, command, arguments=None, timeout=None):
        """Run one QMP command on guest ``name``; its ``return`` value."""
        guest = self._get(name)
        with guest.lock:
            return self._qmp(guest).execute(command, arguments,
                                            timeout=timeout)

    def _forget(self, guest):
        """The process is gone: close QMP, drop the pid file and sockets."""
        if guest.qmp is not None:
            guest.qmp.close()
            guest.qmp = None
        for stale in (guest.paths.pid, guest.paths.qmp, guest.paths.ctl):
            _unlink(stale)

    def power_state(self, name):
        guest = self._get(name)
        with guest.lock:
            if not guest.alive():
                self._forget(guest)
                return base.HALTED
            try:
                status = self._qmp(guest).execute('query-status')
            except qmp.QMPError:
                if not _exits(guest, EXIT_GRACE):
                    raise
                self._forget(guest)         # it exited meanwhile
                return base.HALTED
            return power_state(status.get('status'))

    def pause(self, name):
        self.qmp_execute(name, 'stop')

    def resume(self, name):
        self.qmp_execute(name, 'cont')

    def reboot(self, name):
        self.qmp_execute(name, 'system_reset')

    def shutdown(self, name, timeout=None):
        """Press the ACPI power button; kill the QEMU after ``timeout``.

        The wait holds no lock of the guest: :meth:`power_state` and QMP
        commands answer meanwhile (see :meth:`request_power_off`,
        :meth:`wait_power_off` and :meth:`end_power_off`, its steps).

        :returns: True when the guest powered off by itself.
        """
        timeout = self.shutdown_timeout if timeout is None else timeout
        if not self.request_power_off(name):
            return True
        self.wait_power_off(name, timeout)
        return self.end_power_off(name, timeout)

    def request_power_off(self, name):
        """Press the guest's ACPI power button (QMP ``system_powerdown``).

        :returns: False when its QEMU is gone already (then forgotten as
            :meth:`end_power_off` does), True otherwise (a failed request
            is logged: the wait then ends in the kill).
        """
        guest = self._get(name)
        with guest.lock:
            if not guest.alive():
                self._forget(guest)
                return False
            try:
                self._qmp(guest).execute('system_powerdown')
            except qmp.QMPError as exc:
                LOG.warning('guest %s: ACPI power-off request failed: %s',
                            name, exc)
            return True

    def wait_power_off(self, name, timeout):
        """Wait up to ``timeout`` s for the QEMU to end; True when it did.

        Holds no lock: the guest's other calls go on meanwhile.
        """
        try:
            guest = self._get(name)
        except base.GuestNotFound:
            return True
        deadline = time.monotonic() + timeout
        while guest.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def end_power_off(self, name, timeout=None):
        """Kill the QEMU if it still runs; True when it had ended itself.

        :param timeout: the wait that ended, for the log (None: a hard
            stop cuts the wait short).
        :raises QemuError: it could not be killed.
        """
        guest = self._get(name)
        with guest.lock:
            ended = not guest.alive()
            if not ended:
                if timeout is None:
                    LOG.info('guest %s: a hard stop ends its power-off '
                             'wait: killing pid %d', name, guest.pid)
                else:
                    LOG.warning('guest %s did not power off within %s s: '
                                'killing pid %d', name, timeout, guest.pid)
                if not kill(guest.pid, guest.is_ours):
                    raise QemuError('cannot kill QEMU pid %d of guest %s'
                                    % (guest.pid, name))
            self._forget(guest)
            return ended

    def destroy(self, name):
        guest = self._get(name)
        with guest.lock:
            if guest.qmp is not None:
                guest.qmp.close()
                guest.qmp = None
            if not kill(guest.pid, guest.is_ours, term_timeout=2.0):
                raise QemuError('cannot kill QEMU pid %d of guest %s'
                                % (guest.pid, name))
            self._forget(guest)

    def list(self):
        with self._lock:
            return sorted(n for n, g in self._guests.items()
                          if g is not None)

    def pid(self, name):
        return self._get(name).pid

    def forget(self, name):
        """Drop a halted guest from the driver (its folder stays)."""
        with self._lock:
            guest = self._guests.get(name)
            if guest is not None and guest.alive():
                raise QemuError('guest %s still runs (pid %d)'
                                % (name, guest.pid))
            self._guests.pop(name, None)
        if guest is not None:
            self._forget(guest)

    def recover(self):
        found = {}
        try:
            names = sorted(os.listdir(self.state_dir))
        except FileNotFoundError:
            return found
        for name in names:
            paths = self.paths(name)
            if not os.path.isfile(paths.spec):
                continue
            with self._lock:
                if self._guests.get(name) is not None:
                    continue
            pid = read_pid(paths.pid)
            argv = process_argv(pid) if pid is not None else None
            action = recovery_action(pid, argv, paths.qmp)
            if action != ADOPT:
                if action == FOREIGN:
                    LOG.warning('guest %s: pid %d of %s is not its QEMU '
                                'any more; the guest is halted', name, pid,
                                paths.pid)
                for stale in (paths.pid, paths.qmp, paths.ctl):
                    _unlink(stale)
                found[name] = base.HALTED
                continue
            try:
                with open(paths.spec) as f:
                    spec = base.GuestSpec.from_dict(json.load(f))
            except (OSError, ValueError, TypeError,
                    base.HypervisorError) as exc:
                LOG.error('guest %s: unreadable %s (%s): killing its QEMU '
                          'pid %d, an orphan otherwise', name, paths.spec,
                          exc, pid)
                self._kill_folder(paths)
                found[name] = base.HALTED
                continue
            guest = _Guest(spec, paths, pid)
            try:
                self._qmp(guest)
            except qmp.QMPError as exc:
                LOG.error('guest %s: its QEMU pid %d does not answer QMP '
                          '(%s): killing it, an orphan otherwise', name,
                          pid, exc)
                self._kill_folder(paths)
                found[name] = base.HALTED
                continue
            with self._lock:
                self._guests[name] = guest
            found[name] = self.power_state(name)
            LOG.info('guest %s: found its QEMU pid %d again (%s)', name,
                     pid, found[name])
        return found

    def close(self):
        with self._lock:
            guests = [g for g in self._guests.values() if g is not None]
        for guest in guests:
            with guest.lock:
                if guest.qmp is not None:
                    guest.qmp.close()
                    guest.qmp = None
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)              # and with it the folder's lock

    # -- live migration ----------------------------------------------------

    def tls_dir(self, name):
        """The folder of guest ``name``'s migration TLS credentials."""
        return os.path.join(self.paths(name).folder, TLS_DIR)

    def _use_tls(self, name, endpoint, tls, hostname=None):
        """Make QEMU's migration of ``name`` TLS with ``tls``'s keys.

        :param tls: ``{'ca_pem': the peer's CA (PEM), 'own_ca_pem': this
            side's CA (PEM), 'cert': file, 'key': file}``: this side's
            certificate and key (a migration's per-migration
            credentials).
        """
        folder = write_tls_dir(self.tls_dir(name), endpoint,
                               tls_ca_bundle(tls['ca_pem'],
                                             tls.get('own_ca_pem')),
                               tls['cert'], tls['key'])
        try:            # an earlier migration's, cancelled
            self.qmp_execute(name, 'object-del', {'id': TLS_ID})
        except qmp.QMPCommandError:
            pass
        self.qmp_execute(name, 'object-add', {
            'qom-type': 'tls-creds-x509', 'id': TLS_ID, 'dir': folder,
            'endpoint': endpoint, 'verify-peer': True})
        params = {'tls-creds': TLS_ID}
        if hostname:
            params['tls-hostname'] = hostname
        self.qmp_execute(name, 'migrate-set-parameters', params)

    def drop_tls(self, name):
        """Remove the migration's keys from the guest's folder."""
        shutil.rmtree(self.tls_dir(name), ignore_errors=True)

    def listen_incoming(self, name, address, tls=None):
        """An ``-incoming defer`` guest listens for its state on ``address``.

        :param tls: the server's credentials (see :meth:`_use_tls`): the
            source's QEMU must present a certificate of ``ca_pem``.
        :returns: the TCP port it listens on (chosen by the system).
        """
        host = '[%s]' % address if ':' in address else address
        self.qmp_execute(name, 'migrate-set-capabilities', {'capabilities': [
            {'capability': 'events', 'state': True}]})
        if tls is not None:
            self._use_tls(name, 'server', tls)
        self.qmp_execute(name, 'migrate-incoming',
                         {'uri': 'tcp:%s:0' % host})
        info = self.qmp_execute(name, 'query-migrate')
        for sock in info.get('socket-address') or ():
            if sock.get('port'):
                return int(sock['port'])
        raise QemuError('guest %s: QEMU did not say where it listens for '
                        'the incoming migration (%r)' % (name, info))

    def _wait_migration(self, name, want, timeout, check=None):
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp_execute(name, 'query-migrate')
            step = migration_step(info.get('status', 'none'), want)
            if step in (SWITCH, DONE):
                return info
            if step == FAILED:
                raise QemuError('guest %s: QEMU\'s migration is %s: %s'
                                % (name, info.get('status'),
                                   info.get('error-desc', 'no reason')))
            if check is not None:
                check()
            if time.monotonic() > deadline:
                raise QemuError('guest %s: QEMU\'s migration is still %s '
                                'after %.0f s' % (name, info.get('status'),
                                                  timeout))
            self._await_migration_event(name)

    def _await_migration_event(self, name):
        """Until QEMU's next ``MIGRATION`` event, or ``MIGRATION_POLL`` s.

        (The ``events`` capability is on for every migration here.)
        """
        guest = self._get(name)
        with guest.lock:
            try:
                self._qmp(guest).wait_event('MIGRATION', MIGRATION_POLL)
            except qmp.QMPTimeout:
                pass

    def migrate_until_switchover(self, name, host, port, timeout=300.0,
                                 check=None, max_bandwidth=1 << 30,
                                 tls=None):
        """Migrate guest ``name`` to ``host:port``, up to the switch-over.

        Returns once the source's QEMU is in ``pre-switchover``: the guest
        is stopped, its disks drained and flushed, most of its memory on
        the destination; :meth:`migrate_finish` sends the rest.

        :param check: called while waiting; what it raises (a cancel)
            ends the wait (the caller cancels the migration).
        :param tls: the client's credentials (see :meth:`_use_tls`): the
            destination's QEMU must present a certificate of ``ca_pem``
            for ``host``.
        :returns: QEMU's ``query-migrate`` answer then.
        """
        self.qmp_execute(name, 'migrate-set-capabilities', {'capabilities': [
            {'capability': 'pause-before-switchover', 'state': True},
            {'capability': 'events', 'state': True}]})
        if tls is not None:
            self._use_tls(name, 'client', tls, hostname=host)
        self.qmp_execute(name, 'migrate-set-parameters',
                         {'max-bandwidth': int(max_bandwidth)})
        where = '[%s]' % host if ':' in host else host
        self.qmp_execute(name, 'migrate',
                         {'uri': 'tcp:%s:%d' % (where, int(port))})
        return self._wait_migration(name, 'pre-switchover', timeout, check)

    def migrate_finish(self, name, timeout=120.0):
        """Let QEMU send the rest (``migrate-continue``) and complete.

        :returns: QEMU's ``query-migrate`` answer once completed (its
            ``downtime`` in ms).
        """
        info = self.qmp_execute(name, 'query-migrate')
        if info.get('status') == 'pre-switchover':
            self.qmp_execute(name, 'migrate-continue',
                             {'state': 'pre-switchover'})
        info = self._wait_migration(name, 'completed', timeout)
        # QEMU (7.2, migration.c) says "completed" before it works out
        # the downtime: a query in between answers 0
        deadline = time.monotonic() + DOWNTIME_WAIT
        while not info.get('downtime') and time.monotonic() < deadline:
            time.sleep(0.01)
            info = self.qmp_execute(name, 'query-migrate')
        return info

    def migrate_cancel(self, name, resume=True, timeout=30.0):
        """Cancel an outgoing migration; the guest runs on here.

        :param resume: run the guest's vCPUs again if QEMU left them
            stopped (it restarts a guest that was running by itself).
        """
        try:
            self.qmp_execute(name, 'migrate_cancel')
        except qmp.QMPCommandError as exc:
            LOG.warning('guest %s: migrate_cancel: %s', name, exc)
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp_execute(name, 'query-migrate').get('status')
            if status not in ('cancelling', 'pre-switchover', 'device',
                              'active', 'setup'):
                break
            if time.monotonic() > deadline:
                raise QemuError('guest %s: QEMU\'s migration still %s %.0f '
                                's after migrate_cancel'
                                % (name, status, timeout))
            self._await_migration_event(name)
        if resume and self.power_state(name) == base.PAUSED:
            self.resume(name)
        return status

    def wait_incoming(self, name, timeout=120.0):
        """Wait until an incoming guest has all of its state.

        :returns: QEMU's ``query-migrate`` answer on this side.
        """
        return self._wait_migration(name, 'completed', timeout)

    # -- the guest's console and verifier ----------------------------------

    def console_path(self, name):
        return self.paths(name).console

    def console_output(self, name, limit=1 << 20):
        """The last ``limit`` bytes of the guest's console, as text."""
        path = self.console_path(name)
        try:
            with open(path, 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode('utf-8', 'replace')
        except FileNotFoundError:
            return ''

    def guest_command(self, name, command, timeout=5.0):
        """Send one line to the in-guest verifier's command channel.

        The verifier answers on the console (``XSMV ...`` lines).
        """
        guest = self._get(name)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(guest.paths.ctl)
            sock.sendall(command.encode('utf-8') + b'\n')
            # let QEMU read it before the connection closes
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(4096):
                    pass
            except socket.timeout:
                pass
            except OSError:
                pass

    def guest_request(self, name, command, kind, timeout=60.0):
        """Send a verifier command; the first ``kind`` report after it.

        Only what the console got after the command was sent counts.

        :raises QemuError: no such report within ``timeout`` seconds, or
            the guest's QEMU exited meanwhile.
        """
        guest = self._get(name)
        path = self.console_path(name)
        try:
            start = os.path.getsize(path)
        except FileNotFoundError:
            start = 0
        self.guest_command(name, command)
        deadline = time.monotonic() + timeout
        while True:
            with open(path, 'rb') as f:
                f.seek(start)
                text = f.read().decode('utf-8', 'replace')
            found = verifier.reports(text, kind)
            if found:
                return found[0]
            if not guest.alive():
                raise QemuError('guest %s stopped before its verifier '
                                'answered %r' % (name, command))
            if time.monotonic() > deadline:
                raise QemuError('the verifier of guest %s gave no %s report '
                                'within %s s of the command %r'
                                % (name, kind, timeout, command))
            time.sleep(0.05)


def tls_ca_bundle(peer_ca_pem, own_ca_pem=None):
    """The ``ca-cert.pem`` of QEMU's ``tls-creds-x509``: peer's CA, own CA.

    QEMU checks its own certificate against the same file it checks the
    peer's with; each side of a migration has its own CA. Adding this
    side's CA trusts nothing more: its key was dropped once it signed
    this side's one certificate, whose key only this side holds.
    """
    def text(pem):
        return pem.decode('ascii') if isinstance(pem, bytes) else pem
    pems = [text(peer_ca_pem).strip()]
    if own_ca_pem:
        pems.append(text(own_ca_pem).strip())
    return '\n'.join(pems) + '\n'


def write_tls_dir(folder, endpoint, ca_pem, cert_file, key_file):
    """A ``tls-creds-x509`` folder: the files under the names QEMU reads.

    ``ca-cert.pem`` (the peer's CA), ``<endpoint>-cert.pem`` and
    ``<endpoint>-key.pem`` (mode 0600), in ``folder`` (mode 0700); a
    server's also ``dh-params.pem`` (:data:`FFDHE2048_PEM`).
    """
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    with open(cert_file, 'rb') as f:
        cert = f.read()
    with open(key_file, 'rb') as f:
        key = f.read()
    files = [('ca-cert.pem', ca_pem, 0o644),
             ('%s-cert.pem' % endpoint, cert, 0o644),
             ('%s-key.pem' % endpoint, key, 0o600)]
    if endpoint == 'server':
        files.append(('dh-params.pem', FFDHE2048_PEM, 0o644))
    for fname, data, mode in files:
        if isinstance(data, str):
            data = data.encode('ascii')
        path = os.path.join(folder, fname)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC |
                     os.O_CLOEXEC, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
    return folder


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
