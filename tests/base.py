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

"""Base test case and helpers shared by every xsm-driver test."""

import gc
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback

import fixtures
import testtools

from xsm_driver.core.nbd import tls

# Debian package that provides each external command the tests may use.
DEBIAN_PACKAGES = {
    'qemu-img': 'qemu-utils',
    'qemu-io': 'qemu-utils',
    'qemu-nbd': 'qemu-utils',
    'nbdinfo': 'libnbd-bin',
    'nbdcopy': 'libnbd-bin',
    'nbdkit': 'nbdkit',
}

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_TOP = os.path.dirname(TESTS_DIR)
# VHD images made by XenServer's own vhd-util (tests/data/vhd/README.md).
VECTORS_DIR = os.path.join(TESTS_DIR, 'data', 'vhd')


def in_ci():
    return os.environ.get('CI') == 'true'


def load_benchmark(name):
    """Import ``benchmarks/<name>.py`` (benchmarks/ is not a package)."""
    path = os.path.join(REPO_TOP, 'benchmarks', name + '.py')
    spec = importlib.util.spec_from_file_location('xsm_bench_' + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tls_contexts(directory):
    """``(server context, client context)`` of mutual TLS.

    Made from new credentials (a CA, a server and a client certificate)
    in ``directory``.
    """
    f = tls.make_credentials(directory)
    return (tls.server_context(f[tls.SERVER_CERT], f[tls.SERVER_KEY],
                               f[tls.CA_CERT]),
            tls.client_context(f[tls.CA_CERT], f[tls.CLIENT_CERT],
                               f[tls.CLIENT_KEY]))


def open_fds():
    """``{fd: target}`` of this process (``readlink`` of /proc/self/fd)."""
    fds = {}
    for name in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink('/proc/self/fd/' + name)
        except OSError:
            continue            # the directory fd of the listing itself
        if not target.startswith('/proc/'):
            fds[int(name)] = target
    return fds


def _hex_address(text):
    """``0100007F:1F90`` (from /proc/net/tcp) -> ``127.0.0.1:8080``."""
    host, port = text.split(':')
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        addr = '.'.join(str(b) for b in reversed(raw))
    else:                                   # four little-endian words
        words = b''.join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        addr = '[%s]' % ':'.join(words[i:i + 2].hex()
                                 for i in range(0, 16, 2))
    return '%s:%d' % (addr, int(port, 16))


def _sockets():
    """``{inode: description}`` of this process's TCP and unix sockets."""
    found = {}
    for kind in ('tcp', 'tcp6'):
        try:
            with open('/proc/self/net/' + kind) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9:
                found[cols[9]] = '%s %s -> %s' % (
                    kind, _hex_address(cols[1]), _hex_address(cols[2]))
    try:
        with open('/proc/self/net/unix') as f:
            lines = f.readlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        cols = line.split()
        if len(cols) > 6:
            found.setdefault(cols[6], 'unix %s' % (
                cols[7] if len(cols) > 7 else '(unnamed)'))
    return found


class LeakError(AssertionError):
    """A test left threads running or files open."""


class NoLeaks(fixtures.Fixture):
    """Fail the test that leaves threads running or files open.

    At setup it notes the live threads (daemon or not) and the open file
    descriptors; at cleanup -- use it before anything else in ``setUp``,
    so that its check runs after every other cleanup -- it collects
    garbage and waits at most ``grace`` seconds for new threads to end
    and new descriptors to close, then raises :class:`LeakError` naming
    each thread (with the top of its stack) and each descriptor (with
    what it points at).

    :param grace: seconds to wait for what is finishing.
    :param ignore_threads: regular expressions of thread names to allow.
    :param ignore_fds: regular expressions of descriptor targets to allow.
    """

    def __init__(self, grace=1.0, ignore_threads=(), ignore_fds=()):
        super().__init__()
        self.grace = grace
        self._ignore_threads = [re.compile(r) for r in ignore_threads]
        self._ignore_fds = [re.compile(r) for r in ignore_fds]

    def _setUp(self):
        self._threads = set(threading.enumerate())
        self._fds = open_fds()
        self.addCleanup(self.check)

    def _new_threads(self):
        return [t for t in threading.enumerate()
                if t not in self._threads and t.is_alive() and
                t is not threading.current_thread() and
                not any(r.search(t.name) for r in self._ignore_threads)]

    def _new_fds(self):
        return {fd: target for fd, target in open_fds().items()
                if self._fds.get(fd) != target and
                not any(r.search(target) for r in self._ignore_fds)}

    def leaks(self):
        """``(threads, fds)`` left now, after a garbage collection."""
        gc.collect()
        return self._new_threads(), self._new_fds()

    def check(self):
        deadline = time.monotonic() + self.grace
        threads, fds = self.leaks()
        while (threads or fds) and time.monotonic() < deadline:
            if threads:
                threads[0].join(min(0.05, deadline - time.monotonic()))
            else:
                time.sleep(0.02)
            threads, fds = self.leaks()
        if threads or fds:
            raise LeakError(self.describe(threads, fds))

    def describe(self, threads, fds):
        lines = ['the test left %d thread(s) running and %d file '
                 'descriptor(s) open (after a garbage collection and %.1f s '
                 'of waiting):' % (len(threads), len(fds), self.grace)]
        frames = sys._current_frames()
        for t in threads:
            lines.append('  thread %r%s, at:' % (
                t.name, ' (daemon)' if t.daemon else ''))
            frame = frames.get(t.ident)
            if frame is None:
                lines.append('    (no stack: it has just ended)')
                continue
            for entry in traceback.extract_stack(frame)[-4:]:
                lines.append('    %s:%d in %s: %s' % (
                    entry.filename, entry.lineno, entry.name, entry.line))
        sockets = _sockets() if any(
            v.startswith('socket:') for v in fds.values()) else {}
        for fd, target in sorted(fds.items()):
            if target.startswith('socket:['):
                inode = target[len('socket:['):-1]
                target = '%s (%s)' % (target, sockets.get(inode, '?'))
            lines.append('  fd %d -> %s' % (fd, target))
        return '\n'.join(lines)


class TestCase(testtools.TestCase):
    """Base class of xsm-driver tests.

    A class with ``check_leaks = True`` fails each of its tests that
    leaves threads running or files open (:class:`NoLeaks`, with the
    class's ``leak_ignore_threads`` and ``leak_ignore_fds``).
    """

    check_leaks = False
    leak_ignore_threads = ()
    leak_ignore_fds = ()

    def setUp(self):
        super().setUp()
        if self.check_leaks:
            # first, so that its check runs after every other cleanup
            self.useFixture(NoLeaks(ignore_threads=self.leak_ignore_threads,
                                    ignore_fds=self.leak_ignore_fds))

    def missing(self, message):
        """Fail in CI, skip elsewhere: CI must never hide a missing tool."""
        if in_ci():
            self.fail(message)
        self.skipTest(message)

    def make_tempdir(self):
        """Return a new temporary directory removed at cleanup."""
        path = tempfile.mkdtemp(prefix='xsm-test-')
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def require_command(self, name):
        """Return the path of command ``name``, or fail/skip when missing."""
        path = shutil.which(name)
        if path is None:
            package = DEBIAN_PACKAGES.get(name, name)
            self.missing('command %s not found: install it with '
                         '"apt-get install -y %s" (or run '
                         'tools/run-tests.sh)' % (name, package))
        return path

    def vectors_dir(self):
        """Return the folder of the VHD test vectors (read-only).

        They are part of the repository, in ``tests/data/vhd``; a checkout
        without them is broken, so their absence fails the test even
        outside CI.
        """
        if not os.path.isfile(os.path.join(VECTORS_DIR, 'MANIFEST.json')):
            self.fail('VHD test vectors missing from %s: the checkout is '
                      'incomplete' % VECTORS_DIR)
        return VECTORS_DIR
