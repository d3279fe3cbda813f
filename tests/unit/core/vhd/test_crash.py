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

"""Crash safety: cut a sequence of writes after every file system call.

A "crash" lets the first N calls of ``os.pwritev`` and ``os.ftruncate`` (the
only calls by which :mod:`xsm_driver.core.vhd.image` changes a file) reach
the file and makes every later one raise :class:`Crash`, including the
batmap write of ``close()``. The test then reopens the files and checks
them, for every N from 0 to the number of calls the sequence makes.

``create``, ``snapshot`` and ``set_parent`` are cut the same way, and also
by killing a forked process with ``os._exit`` at the cut (a real crash:
no ``finally`` clause runs), counting every call that changes the file
system.
"""

import fnmatch
import functools
import os
import random
import re
import shutil
import threading
from unittest import mock

from tests import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
BS = fmt.BLOCK_SIZE
SECTOR = fmt.SECTOR
SIZE = 16 * MiB
KILLED = 99

# Calls that change the file system, cut in the operation tests.
MUTATING = ('pwrite', 'pwritev', 'ftruncate', 'fchmod', 'chmod', 'fsync',
            'link', 'unlink', 'rename', 'replace')


class Crash(Exception):
    """The simulated crash; no engine code catches it."""


class Cutter:
    """Let the first ``allowed`` calls through, then cut.

    :param allowed: number of calls that happen; None counts calls only.
    :param names: the ``os`` functions to intercept.
    :param mode: ``'crash'``: every call from the cut on raises
        :class:`Crash` (nothing more reaches the disk); ``'fail'``: only
        the call at the cut raises (an I/O error; clean-up code runs);
        ``'kill'``: the process ends with ``os._exit`` at the cut (use in
        a forked child).
    """

    def __init__(self, allowed=None, names=('pwritev', 'ftruncate'),
                 mode='crash'):
        self.allowed = allowed
        self.names = names
        self.mode = mode
        self.calls = 0
        self.crashed = False
        self.cut_at = None
        self._patches = []

    def _wrap(self, name, real):
        def cut(*args, **kwargs):
            if threading.get_ident() != self._thread:
                # another test's thread still at work: not ours to count
                return real(*args, **kwargs)
            if (self.allowed is not None and self.calls >= self.allowed and
                    not (self.mode == 'fail' and self.crashed)):
                self.crashed = True
                self.cut_at = self.cut_at or name
                if self.mode == 'kill':
                    os._exit(KILLED)
                raise Crash('%s cut after %d calls' % (name, self.calls))
            self.calls += 1
            return real(*args, **kwargs)
        return cut

    def __enter__(self):
        self._thread = threading.get_ident()
        for name in self.names:
            patch = mock.patch.object(vhd_image.os, name,
                                      self._wrap(name, getattr(os, name)))
            patch.start()
            self._patches.append(patch)
        return self

    def __exit__(self, *exc):
        for patch in reversed(self._patches):
            patch.stop()
        self._patches = []


def random_bytes(seed, length):
    return random.Random(seed).randbytes(length)


def apply(model, step, result=True):
    """The model after ``step``; ``result`` is what discard returned."""
    model = bytearray(model)
    kind, offset = step[0], step[1] if len(step) > 1 else 0
    if kind == 'pwrite':
        model[offset:offset + len(step[2])] = step[2]
    elif kind == 'write_zeroes' or (kind == 'discard' and result):
        model[offset:offset + step[2]] = bytes(step[2])
    return model


def step_range(step):
    """The sector-aligned byte range a step may change."""
    if step[0] == 'pwrite':
        start, end = step[1], step[1] + len(step[2])
    elif step[0] in ('write_zeroes', 'discard'):
        start, end = step[1], step[1] + step[2]
    else:
        return 0, 0
    return start - start % SECTOR, -(-end // SECTOR) * SECTOR


def run_step(chain, step):
    kind = step[0]
    if kind == 'pwrite':
        chain.pwrite(step[2], step[1])
    elif kind == 'write_zeroes':
        chain.write_zeroes(step[1], step[2])
    elif kind == 'discard':
        return chain.discard(step[1], step[2])
    elif kind == 'flush':
        chain.flush()
    return True


_STALE = re.compile(r'sector 0x([0-9a-f]+) of block 0x([0-9a-f]+) has data '
                    r'where the bitmap is clear')


def stale_under_clear_bits(problem, steps, interrupted):
    """Whether ``problem`` is data the interrupted write left unmarked.

    A write into an allocated block stores the data before it marks the
    sectors (libvhd does the same): a cut between the two leaves new data
    under clear bits. Those sectors still read as before the write, which
    is what crash safety asks; ``vhd-util check -b`` reports them, so the
    check may report them too, but only inside the interrupted write.
    """
    match = _STALE.search(problem)
    if match is None or interrupted is None:
        return False
    start, end = step_range(steps[interrupted])
    at = int(match.group(2), 16) * BS + int(match.group(1), 16) * SECTOR
    return start - start % SECTOR <= at < end


def describe(step):
    if step[0] == 'pwrite':
        return 'pwrite(%d bytes at %d)' % (len(step[2]), step[1])
    return '%s%r' % (step[0], tuple(step[1:]))


class WriteCrashTest(base.TestCase):
    """Cut write sequences after every ``pwritev``/``ftruncate``."""

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.pristine = os.path.join(self.dir, 'pristine')
        os.mkdir(self.pristine)

    def path(self, name):
        return os.path.join(self.pristine, name)

    def read_all(self, path):
        with vhd_chain.Chain(path) as c:
            return c.pread(0, c.size)

    def cut_everywhere(self, leaf, steps):
        """Run ``steps`` on ``leaf`` cut at every call; return problems.

        Each cut runs on a fresh copy of the pristine folder. After the
        cut: the chain must open, pass ``check``, read acknowledged writes
        exactly and the interrupted one per sector as before or after, and
        accept the rest of the sequence again (recovery).
        """
        model = self.read_all(self.path(leaf))
        self.assertEqual([], check.check(self.path(leaf), chain=True))
        counting = os.path.join(self.dir, 'count')
        shutil.copytree(self.pristine, counting)
        with Cutter() as counter:
            self.run_cut(counting, leaf, steps, counter)
        total = counter.calls
        self.assertGreater(total, 0)
        problems = []
        for allowed in range(total + 1):
            folder = os.path.join(self.dir, 'cut-%d' % allowed)
            shutil.copytree(self.pristine, folder)
            with Cutter(allowed) as cutter:
                done, interrupted, results = self.run_cut(folder, leaf,
                                                          steps, cutter)
            self.assertEqual(allowed < total, cutter.crashed)
            where = 'cut after %d of %d calls (%s)' % (
                allowed, total, 'in ' + describe(steps[interrupted])
                if interrupted is not None else 'in close')
            problems += self.verify_cut(folder, leaf, steps, model, done,
                                        interrupted, results, where)
            shutil.rmtree(folder)
        return problems

    def run_cut(self, folder, leaf, steps, cutter):
        """Run the steps until the cut; return what was acknowledged."""
        chain = vhd_chain.Chain(os.path.join(folder, leaf), writable=True)
        done, interrupted, results = 0, None, []
        try:
            for i, step in enumerate(steps):
                results.append(run_step(chain, step))
                done = i + 1
        except Crash:
            interrupted = done
        finally:
            # The process dies: close the descriptors; close() tries to
            # write the batmap, which the cut stops too.
            for img in chain.images:
                try:
                    img.close()
                except Crash:
                    pass
        return done, interrupted, results

    def verify_cut(self, folder, leaf, steps, model, done, interrupted,
                   results, where):
        path = os.path.join(folder, leaf)
        for step, result in zip(steps[:done], results):
            model = apply(model, step, result)
        try:
            problems = check.check(path, chain=True)
            got = self.read_all(path)
        except errors.VHDError as exc:
            return ['%s: does not open: %s' % (where, exc)]
        out = ['%s: check: %s' % (where, p) for p in problems
               if not stale_under_clear_bits(p, steps, interrupted)]
        if interrupted is None:
            before = after = model
        else:
            before = model
            after = apply(model, steps[interrupted], True)
        if got != before and got != after:
            start, end = step_range(steps[interrupted]) \
                if interrupted is not None else (0, 0)
            for at in range(0, len(got), SECTOR):
                sector = got[at:at + SECTOR]
                if sector == before[at:at + SECTOR]:
                    continue
                if start <= at < end and sector == after[at:at + SECTOR]:
                    continue
                out.append('%s: sector at %d reads neither as before nor '
                           'as after the interrupted write' % (where, at))
                break
        # Recovery: the sequence from the interrupted step on runs again.
        rest = steps[interrupted:] if interrupted is not None else []
        with vhd_chain.Chain(path, writable=True) as chain:
            for step in rest:
                model = apply(model, step, run_step(chain, step))
        if self.read_all(path) != model:
            out.append('%s: redoing the rest of the sequence does not give '
                       'the expected disk' % where)
        out += ['%s: check after redoing: %s' % (where, p)
                for p in check.check(path, chain=True)]
        return out

    def dynamic_steps(self):
        return [
            ('pwrite', 1000, random_bytes(1, 3000)),        # new block 0
            ('pwrite', MiB + 7, random_bytes(2, 5000)),     # into block 0
            ('pwrite', BS + 300 * SECTOR + 5, random_bytes(3, 70000)),
            ('pwrite', 2 * BS, random_bytes(4, BS)),         # full: batmap
            ('flush',),
            ('pwrite', 5 * BS - 4000, random_bytes(5, 10000)),  # 2 blocks
            ('pwrite', 0, random_bytes(6, BS)),              # 0 gets full
            ('discard', 3 * BS + 4096, 8192),                # unmark full
            ('write_zeroes', BS, 4096),
        ]

    def test_dynamic_image(self):
        """Cut a sequence on a dynamic image at every call."""
        ops.create(self.path('d.vhd'), SIZE)
        with vhd_chain.Chain(self.path('d.vhd'), writable=True) as c:
            c.pwrite(random_bytes(7, 100 * SECTOR), BS)      # partial
            c.pwrite(random_bytes(8, BS), 3 * BS)            # full
        self.assertEqual([], self.cut_everywhere('d.vhd',
                                                 self.dynamic_steps()))

    def test_dynamic_image_with_slack_after_the_last_block(self):
        # Space after the last block (as an interrupted allocation leaves
        # it): the next allocation truncates the file with ftruncate.
        ops.create(self.path('s.vhd'), SIZE)
        footer = open(self.path('s.vhd'), 'rb').read(SECTOR)
        with open(self.path('s.vhd'), 'r+b') as f:
            end = f.seek(0, os.SEEK_END)
            f.truncate(end + 3 * MiB)
            f.seek(end + 3 * MiB - SECTOR)
            f.write(footer)
        steps = [('pwrite', 4096, random_bytes(9, 4096)),
                 ('pwrite', 3 * BS - 512, random_bytes(10, 1024))]
        self.assertEqual([], self.cut_everywhere('s.vhd', steps))

    def test_differencing_leaf(self):
        ops.create(self.path('base.vhd'), SIZE)
        with vhd_chain.Chain(self.path('base.vhd'), writable=True) as c:
            c.pwrite(random_bytes(11, 3 * BS), 0)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        steps = [
            ('pwrite', 100, b'sub-sector'),                  # new block 0
            ('pwrite', 64 * SECTOR + 1, random_bytes(12, 9000)),
            ('pwrite', BS, random_bytes(13, BS)),            # full: batmap
            ('pwrite', 3 * BS - 3000, random_bytes(14, 6000)),
            ('flush',),
            ('write_zeroes', 8 * SECTOR, 16 * SECTOR),
            ('discard', 0, 4096),                            # refused
            ('pwrite', 0, random_bytes(15, BS)),             # 0 gets full
        ]
        self.assertEqual([], self.cut_everywhere('leaf.vhd', steps))

    def test_fixed_image(self):
        ops.create(self.path('f.vhd'), 4 * MiB, fixed=True)
        steps = [('pwrite', 1000, random_bytes(16, 3000)),
                 ('pwrite', BS - 10, random_bytes(17, 20)),
                 ('write_zeroes', 0, 4096),
                 ('flush',)]
        self.assertEqual([], self.cut_everywhere('f.vhd', steps))

    def test_failed_close_still_closes_the_parents(self):
        """A leaf whose batmap write fails must not leak its parents' fds.

        (Before commit 76ef1f7 ``Chain.close`` stopped at the first image
        whose ``close`` raised.)
        """
        ops.create(self.path('base.vhd'), 4 * MiB)
        ops.snapshot(self.path('leaf.vhd'), self.path('base.vhd'))
        chain = vhd_chain.Chain(self.path('leaf.vhd'), writable=True)
        chain.pwrite(bytes(BS), 0)          # a full block: batmap dirty
        with Cutter(0):
            self.assertRaises(Crash, chain.close)
        parent = chain.images[1]
        self.addCleanup(parent.close)
        self.assertIsNone(parent._fd, 'the parent is still open')


class OperationCrashTest(base.TestCase):
    """Cut ``create``, ``snapshot`` and ``set_parent`` at every call.

    Each cut is made twice: the call fails with an exception (clean-up code
    runs, later calls work) and the process is killed at the call.
    """

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        # allowed calls -> temp files a killed process left behind
        self.killed_leftovers = {}

    def fork_cut(self, allowed, operation):
        """Run ``operation`` in a child killed before call ``allowed``."""
        pid = os.fork()
        if pid == 0:                                     # the child
            code = 0
            try:
                with Cutter(allowed, MUTATING, mode='kill'):
                    operation()
            except BaseException:
                code = 2
            os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def count_calls(self, prepare, operation):
        folder = os.path.join(self.dir, 'count')
        prepare(folder)
        with Cutter(None, MUTATING) as counter:
            operation(folder)
        shutil.rmtree(folder)
        return counter.calls

    def cut_operation(self, prepare, operation, verify):
        """Cut ``operation`` both ways at every call; return the problems.

        ``prepare(folder)`` makes the starting files; ``verify(folder,
        where)`` returns the problems of the files after a cut.
        """
        total = self.count_calls(prepare, operation)
        self.assertGreater(total, 1)
        problems = []
        for allowed in range(total + 1):
            for kill in (False, True):
                folder = os.path.join(self.dir, 'cut-%d-%s' % (allowed,
                                                               kill))
                prepare(folder)
                if kill:
                    code = self.fork_cut(allowed,
                                         lambda: operation(folder))
                    self.assertEqual(KILLED if allowed < total else 0, code)
                    where = 'killed after %d of %d calls' % (allowed, total)
                    leftovers = self.temp_files(folder)
                    if leftovers:
                        self.killed_leftovers[allowed] = leftovers
                else:
                    with Cutter(allowed, MUTATING, mode='fail') as cutter:
                        try:
                            operation(folder)
                        except Crash:
                            pass
                    self.assertEqual(allowed < total, cutter.crashed)
                    where = 'os.%s failed after %d of %d calls' % (
                        cutter.cut_at, allowed, total)
                    # (When the unlink of the temp file itself fails, the
                    # file stays: nothing can be done about that.)
                    if self.temp_files(folder) and cutter.cut_at != 'unlink':
                        problems.append('%s: temp files left: %s' % (
                            where, self.temp_files(folder)))
                problems += verify(folder, where)
                shutil.rmtree(folder)
        return problems

    def temp_files(self, folder):
        return sorted(f for f in os.listdir(folder)
                      if fnmatch.fnmatch(f, '.*.tmp'))

    def assertKilledLeftovers(self, name, cuts):
        """A killed create/snapshot leaves its hidden temp file behind.

        ``_publish`` removes it in a ``finally`` clause, which a crash
        does not run. This documents it: one ``.NAME.*.tmp`` per cut in
        ``cuts``.
        """
        self.assertEqual(sorted(cuts), sorted(self.killed_leftovers))
        for files in self.killed_leftovers.values():
            self.assertEqual(1, len(files))
            self.assertTrue(files[0].startswith('.%s.' % name), files)

    def target_problems(self, folder, name, where):
        """The target is absent or valid (and opens)."""
        target = os.path.join(folder, name)
        if not os.path.exists(target):
            return []
        return ['%s: %s' % (where, p)
                for p in check.check(target, chain=True)]

    def setup_base(self, folder):
        os.mkdir(folder)
        ops.create(os.path.join(folder, 'base.vhd'), 8 * MiB)
        with vhd_chain.Chain(os.path.join(folder, 'base.vhd'),
                             writable=True) as c:
            c.pwrite(random_bytes(20, 3 * MiB), MiB)

    def test_create(self):
        for fixed in (False, True):
            self.killed_leftovers = {}
            name = 'new.vhd'
            total = self.count_calls(
                os.mkdir, lambda f: ops.create(os.path.join(f, name),
                                               4 * MiB, fixed=fixed))

            def verify(folder, where):
                out = self.target_problems(folder, name, where)
                target = os.path.join(folder, name)
                if not os.path.exists(target):
                    # Running it again after the crash must work.
                    ops.create(target, 4 * MiB, fixed=fixed)
                    out += ['%s: create again: %s' % (where, p)
                            for p in check.check(target)]
                return out

            self.assertEqual([], self.cut_operation(
                os.mkdir, lambda f: ops.create(os.path.join(f, name),
                                               4 * MiB, fixed=fixed),
                verify))
            # The temp file exists from before the first call until the
            # last one (its unlink).
            self.assertKilledLeftovers(name, range(total))

    def test_snapshot(self):
        expected = []
        p = os.path.join

        def prepare(folder):
            self.setup_base(folder)
            if not expected:
                with vhd_chain.Chain(p(folder, 'base.vhd')) as c:
                    expected.append(c.pread(0, c.size))

        def operation(folder):
            ops.snapshot(p(folder, 'leaf.vhd'), p(folder, 'base.vhd'))

        def verify(folder, where):
            out = self.target_problems(folder, 'leaf.vhd', where)
            base_path, leaf = p(folder, 'base.vhd'), p(folder, 'leaf.vhd')
            out += ['%s: base: %s' % (where, q)
                    for q in check.check(base_path)]
            with vhd_chain.Chain(base_path) as c:
                if c.pread(0, c.size) != expected[0]:
                    out.append('%s: the base changed' % where)
            if os.path.exists(leaf):
                with vhd_chain.Chain(leaf) as c:
                    if c.pread(0, c.size) != expected[0]:
                        out.append('%s: the leaf does not read as the '
                                   'base' % where)
            else:
                # Running it again after the crash must work.
                ops.snapshot(leaf, base_path)
                out += ['%s: snapshot again: %s' % (where, q)
                        for q in check.check(leaf, chain=True)]
            return out

        total = self.count_calls(prepare, operation)
        self.assertEqual([], self.cut_operation(prepare, operation, verify))
        # The first call is the chmod of the parent, before the temp file.
        self.assertKilledLeftovers('leaf.vhd', range(1, total))

    def setup_collapse(self, folder):
        """base <- mid <- leaf, mid already coalesced into base."""
        self.setup_base(folder)
        p = os.path.join
        ops.snapshot(p(folder, 'mid.vhd'), p(folder, 'base.vhd'))
        with vhd_chain.Chain(p(folder, 'mid.vhd'), writable=True) as c:
            c.pwrite(random_bytes(21, 5000), 3 * MiB - 100)
        ops.snapshot(p(folder, 'leaf.vhd'), p(folder, 'mid.vhd'))
        with vhd_chain.Chain(p(folder, 'leaf.vhd'), writable=True) as c:
            c.pwrite(random_bytes(22, 700), 3 * MiB)
        ops.coalesce(p(folder, 'mid.vhd'))

    def set_parent_cut(self, check_each_cut):
        """Cut ``set_parent(leaf, base)`` of :meth:`setup_collapse`."""
        expected = []
        p = os.path.join

        def prepare(folder):
            self.setup_collapse(folder)
            if not expected:
                with vhd_chain.Chain(p(folder, 'leaf.vhd')) as c:
                    expected.append(c.pread(0, c.size))

        def verify(folder, where):
            leaf = p(folder, 'leaf.vhd')
            out = []
            if check_each_cut:
                out += ['%s: %s' % (where, q)
                        for q in check.check(leaf, chain=True)]
                try:
                    with vhd_chain.Chain(leaf) as c:
                        if c.pread(0, c.size) != expected[0]:
                            out.append('%s: the leaf reads differently'
                                       % where)
                except errors.VHDError as exc:
                    out.append('%s: does not open: %s' % (where, exc))
            # The documented recovery: run set_parent again.
            ops.set_parent(leaf, p(folder, 'base.vhd'))
            out += ['%s: after running it again: %s' % (where, q)
                    for q in check.check(leaf, chain=True)]
            with vhd_chain.Chain(leaf) as c:
                if c.depth != 2 or c.pread(0, c.size) != expected[0]:
                    out.append('%s: wrong chain after running it again'
                               % where)
            return out

        return self.cut_operation(
            prepare, lambda f: ops.set_parent(p(f, 'leaf.vhd'),
                                              p(f, 'base.vhd')), verify)

    def test_set_parent_can_be_run_again(self):
        self.assertEqual([], self.set_parent_cut(check_each_cut=False))
        self.assertEqual({}, self.killed_leftovers)

    def test_set_parent_is_atomic(self):
        """An interrupted set_parent leaves the old or the new parent.

        (Before commit 76ef1f7 ``ops.set_parent`` wrote the locator data
        before the header, which holds the locators' ``data_length``: after
        a cut the locators read as the new path cut to the old length
        (``./base.vh``) while the header still named ``mid.vhd``.)
        """
        self.assertEqual([], self.set_parent_cut(check_each_cut=True))

    def test_set_parent_cut_keeps_the_chain_readable(self):
        """With parent names of equal length the chain still opens.

        (Before commit 76ef1f7 the MacX locator, written before the header,
        named the new parent while the header held the old uuid, and the
        chain failed with ParentMismatch.)
        """
        def prepare(folder):
            p = functools.partial(os.path.join, folder)
            os.mkdir(folder)
            ops.create(p('top.vhd'), 4 * MiB)
            ops.snapshot(p('mid.vhd'), p('top.vhd'))
            ops.snapshot(p('leaf.vhd'), p('mid.vhd'))
            ops.coalesce(p('mid.vhd'))

        def operation(folder):
            ops.set_parent(os.path.join(folder, 'leaf.vhd'),
                           os.path.join(folder, 'top.vhd'))

        total = self.count_calls(prepare, operation)
        for allowed in range(total):
            folder = os.path.join(self.dir, 'cut-%d' % allowed)
            prepare(folder)
            with Cutter(allowed, MUTATING):
                self.assertRaises(Crash, operation, folder)
            with vhd_chain.Chain(os.path.join(folder, 'leaf.vhd')) as c:
                self.assertIn(os.path.basename(c.images[1].path),
                              ('mid.vhd', 'top.vhd'))
            self.assertEqual([], check.check(
                os.path.join(folder, 'leaf.vhd'), chain=True))
