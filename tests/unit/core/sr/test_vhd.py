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

"""The ``vhd`` SR driver, on real files.

Crash safety is tested two ways for snapshot and coalesce: a forked process
is killed (``os._exit``, nothing more runs) at every call that changes the
file system, and, in process, every such call is made to fail once with
EIO. After each, ``recover()`` (or the operation's own clean-up) must leave
the SR listing either exactly what it listed before or the finished result,
the disk content intact and every chain valid by vhd-util's rules.
"""

import errno
import logging
import os
import shutil
from unittest import mock

import fixtures

from tests import base
from tests.unit.core.sr import common
from xsm_driver.core.sr import base as sr_base
from xsm_driver.core.sr import vhd
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = common.MiB
U1, U2 = common.U1, common.U2
KILLED = 99
# os functions by which the SR and the VHD engine change the file system.
MUTATING = ('pwrite', 'pwritev', 'ftruncate', 'fchmod', 'chmod', 'fsync',
            'link', 'unlink', 'rename', 'replace')


class Cut:
    """Intercept MUTATING calls; the call numbered ``at`` is cut.

    ``mode='kill'`` ends the process there (use in a forked child);
    ``mode='fail'`` makes that one call raise EIO. ``at=None`` only counts.
    """

    def __init__(self, at=None, mode='fail'):
        self.at = at
        self.mode = mode
        self.calls = 0
        self.cut = False
        self._patches = []

    def _wrap(self, real):
        def call(*args, **kwargs):
            n = self.calls
            self.calls += 1
            if n == self.at:
                self.cut = True
                if self.mode == 'kill':
                    os._exit(KILLED)
                raise OSError(errno.EIO, 'injected failure')
            return real(*args, **kwargs)
        return call

    def __enter__(self):
        for name in MUTATING:
            patch = mock.patch.object(os, name, self._wrap(getattr(os,
                                                                   name)))
            patch.start()
            self._patches.append(patch)
        return self

    def __exit__(self, *exc):
        for patch in reversed(self._patches):
            patch.stop()


def killed_at(at, operation):
    """Run ``operation`` in a child killed at call ``at``; its exit code.

    0: the operation finished before the cut; KILLED: cut; 1: it raised.
    """
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            with Cut(at, mode='kill'):
                operation()
        except BaseException:
            code = 1
        os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def content(path):
    with vhd_chain.Chain(path) as chain:
        return bytes(chain.pread(0, chain.size))


class VHDContractTest(common.SRContract, base.TestCase):
    driver = vhd.VHDSR


class VHDSRTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        self.top = self.make_tempdir()
        self.dir = os.path.join(self.top, 'sr')
        self.sr = vhd.VHDSR('local', self.dir)

    def path(self, uuid):
        return self.sr.vdi_path(uuid)

    def write(self, uuid, data, offset=0):
        with self.sr.attach(uuid, writable=True) as dev:
            dev.pwrite(data, offset)
            dev.flush()

    def content(self, uuid):
        return content(self.path(uuid))

    def assertValid(self, uuid):
        self.assertEqual([], check.check(self.path(uuid), chain=True))

    def journals(self):
        return [n for n in os.listdir(self.dir)
                if n.endswith(sr_base.JOURNAL_SUFFIX)]

    def own_files(self):
        return sorted(n for n in os.listdir(self.dir)
                      if n.startswith('.') and n != '.lock')

    def disk(self, size=8 * MiB, **kwargs):
        """A VDI with data in blocks 0 and 1."""
        vdi = self.sr.create(size, **kwargs)
        self.write(vdi.uuid, b'a' * 4096, 0)
        self.write(vdi.uuid, b'b' * 512, 2 * MiB + 512)
        return vdi


class VHDSRTest(VHDSRTestCase):

    def test_create_is_a_dynamic_vhd(self):
        vdi = self.sr.create(3 * MiB + 1, hidden=True)
        self.assertEqual(4 * MiB, vdi.size)
        info = ops.info(self.path(vdi.uuid))
        self.assertEqual(('dynamic', True, False, 4 * MiB),
                         (info['type'], info['hidden'], info['read_only'],
                          info['virtual_size']))
        self.assertValid(vdi.uuid)
        self.assertEqual(0o644, sr_base.mode_of(self.path(vdi.uuid)))
        self.assertEqual(0, vdi.allocated)

    def test_size_limits(self):
        self.assertEqual(2 * MiB, self.sr.create(1).size)
        exc = self.assertRaises(sr_base.InvalidSize, self.sr.create,
                                2041 * 1024 ** 3)
        self.assertIn('2040 GiB', str(exc))

    def test_allocated_counts_this_image_only(self):
        vdi = self.disk()
        self.assertEqual(4096 + 512, self.sr.get(vdi.uuid).allocated)
        self.write(vdi.uuid, b'c' * 2 * MiB, 4 * MiB)
        self.assertEqual(4608 + 2 * MiB, self.sr.get(vdi.uuid).allocated)
        snap = self.sr.snapshot(vdi.uuid)
        self.assertEqual(4608 + 2 * MiB, snap.allocated)
        self.assertEqual(0, self.sr.get(vdi.uuid).allocated)
        self.write(vdi.uuid, b'd' * 1024, 0)
        leaf = self.sr.get(vdi.uuid)
        self.assertEqual(1024, leaf.allocated)
        self.assertEqual(os.stat(self.path(vdi.uuid)).st_blocks * 512,
                         leaf.physical)

    def test_unreadable_file_is_left_out_of_list(self):
        good = self.sr.create(4 * MiB)
        bad = self.sr.create(4 * MiB)
        with open(self.path(bad.uuid), 'r+b') as f:
            f.truncate(1000)
        self.assertEqual([good.uuid], [v.uuid for v in self.sr.list()])
        exc = self.assertRaises(sr_base.SRError, self.sr.get, bad.uuid)
        self.assertIn(bad.uuid, str(exc))
        self.assertIn('local', str(exc))

    def test_file_made_by_other_tools_lists(self):
        ops.create(os.path.join(self.dir, '%s.vhd' % U1), 4 * MiB)
        vdi = self.sr.get(U1)
        self.assertEqual(('', None, 4 * MiB), (vdi.name, vdi.vm, vdi.size))

    # -- snapshot ----------------------------------------------------------

    def test_snapshot(self):
        vdi = self.disk(name='disk', vm=U2)
        data = self.content(vdi.uuid)
        snap = self.sr.snapshot(vdi.uuid)
        self.assertNotEqual(vdi.uuid, snap.uuid)
        self.assertEqual(('base of disk', None, True, True, None, vdi.size),
                         (snap.name, snap.vm, snap.hidden, snap.read_only,
                          snap.parent, snap.size))
        leaf = self.sr.get(vdi.uuid)
        self.assertEqual(('disk', U2, False, False, snap.uuid),
                         (leaf.name, leaf.vm, leaf.hidden, leaf.read_only,
                          leaf.parent))
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertEqual(data, self.content(snap.uuid))
        self.assertEqual([vdi.uuid, snap.uuid],
                         [v.uuid for v in self.sr.chain(vdi.uuid)])
        self.assertTrue(vhd_image.is_read_only(self.path(snap.uuid)))
        self.assertValid(vdi.uuid)
        self.assertEqual([], self.own_files())
        # The leaf takes writes; the base does not change.
        self.write(vdi.uuid, b'z' * 512, 0)
        self.assertEqual(data, self.content(snap.uuid))
        self.assertEqual(b'z' * 512 + data[512:], self.content(vdi.uuid))
        self.assertEqual(sorted([vdi.uuid, snap.uuid]),
                         [v.uuid for v in self.sr.list()])
        self.assertEqual(self.sr.list(), vhd.VHDSR('local', self.dir).list())

    def test_snapshot_keeps_the_vdi_flags(self):
        vdi = self.sr.create(4 * MiB, hidden=True)
        self.sr.snapshot(vdi.uuid)
        self.assertTrue(self.sr.get(vdi.uuid).hidden)
        os.chmod(self.path(vdi.uuid), 0o444)
        snap2 = self.sr.snapshot(vdi.uuid)
        leaf = self.sr.get(vdi.uuid)
        self.assertEqual((True, True, snap2.uuid),
                         (leaf.hidden, leaf.read_only, leaf.parent))
        self.assertValid(vdi.uuid)

    def test_snapshot_of_a_base_with_a_name(self):
        vdi = self.sr.create(4 * MiB)
        snap = self.sr.snapshot(vdi.uuid)
        self.assertEqual('base of %s' % vdi.uuid, snap.name)

    def test_snapshot_refusals(self):
        self.assertRaises(sr_base.VDINotFound, self.sr.snapshot, U1)
        vdi = self.disk()
        snap = self.sr.snapshot(vdi.uuid)
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.snapshot,
                                snap.uuid)
        self.assertIn(vdi.uuid, str(exc))
        self.assertIn('only a leaf', str(exc))

    def test_writers_across_snapshot_and_coalesce(self):
        """Writers are counted per file, not per uuid.

        The migration engine swaps devices so: pause and flush, snapshot,
        attach the new leaf, close the old device.
        """
        vdi = self.disk()
        old = self.sr.attach(vdi.uuid, writable=True)
        self.addCleanup(old.close)
        old.flush()
        snap = self.sr.snapshot(vdi.uuid)
        # The old device holds the base now; the new leaf is free.
        self.assertRaises(sr_base.VDIInUse, self.sr.destroy, snap.uuid)
        new = self.sr.attach(vdi.uuid, writable=True)
        new.pwrite(b'n' * 512, 0)
        self.assertRaises(sr_base.VDIInUse, self.sr.attach, vdi.uuid, True)
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.coalesce,
                                vdi.uuid)
        self.assertIn('close that device', str(exc))
        new.close()
        # Coalesce while the pre-snapshot device is still open: its file
        # becomes the VDI's, so it is the VDI's writer again.
        self.sr.coalesce(vdi.uuid)
        self.assertRaises(sr_base.VDIInUse, self.sr.attach, vdi.uuid, True)
        old.close()
        with self.sr.attach(vdi.uuid, writable=True) as dev:
            self.assertEqual(b'n' * 512 + b'a' * 512,
                             bytes(dev.pread(0, 1024)))

    def test_chain_depth_limit(self):
        vdi = self.sr.create(2 * MiB)
        for _ in range(sr_base.MAX_CHAIN_DEPTH - 1):
            self.sr.snapshot(vdi.uuid)
        self.assertEqual(30, len(self.sr.chain(vdi.uuid)))
        before = self.sr.list()
        exc = self.assertRaises(sr_base.ChainTooDeep, self.sr.snapshot,
                                vdi.uuid)
        self.assertIn(vdi.uuid, str(exc))
        self.assertIn('local', str(exc))
        self.assertIn('31', str(exc))
        self.assertEqual(before, self.sr.list())
        self.assertEqual([], self.own_files())
        self.assertValid(vdi.uuid)

    def test_busy_vdi(self):
        vdi = self.sr.create(4 * MiB)
        self.sr._busy.add(vdi.uuid)
        for call in (self.sr.snapshot, self.sr.destroy, self.sr.coalesce,
                     lambda u: self.sr.attach(u, True),
                     lambda u: self.sr.update(u, hidden=True)):
            exc = self.assertRaises(sr_base.SRError, call, vdi.uuid)
            self.assertIn(vdi.uuid, str(exc))
        self.sr._busy.clear()
        self.sr.attach(vdi.uuid, True).close()

    # -- coalesce ----------------------------------------------------------

    def test_snapshot_write_coalesce_round_trip(self):
        vdi = self.disk(name='disk', vm=U2)
        depth = len(self.sr.chain(vdi.uuid))
        files = sorted(os.listdir(self.dir))
        snap = self.sr.snapshot(vdi.uuid)
        self.write(vdi.uuid, b'x' * 1024, 1024)
        self.write(vdi.uuid, b'y' * 4096, 6 * MiB)
        data = self.content(vdi.uuid)
        got = self.sr.coalesce(vdi.uuid)
        self.assertEqual(depth, len(self.sr.chain(vdi.uuid)))
        self.assertEqual((vdi.uuid, 'disk', U2, None, False, False),
                         (got.uuid, got.name, got.vm, got.parent, got.hidden,
                          got.read_only))
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertEqual(files, sorted(os.listdir(self.dir)))
        self.assertRaises(sr_base.VDINotFound, self.sr.get, snap.uuid)
        self.assertEqual([got], self.sr.list())
        self.assertValid(vdi.uuid)
        # Still a normal VDI.
        self.write(vdi.uuid, b'w' * 512, 0)
        self.sr.snapshot(vdi.uuid)
        self.assertEqual(b'w' * 512 + data[512:], self.content(vdi.uuid))

    def test_coalesce_in_the_middle_of_a_chain(self):
        vdi = self.disk()
        b1 = self.sr.snapshot(vdi.uuid)
        self.write(vdi.uuid, b'2' * 512, 4 * MiB)
        b2 = self.sr.snapshot(vdi.uuid)
        self.write(vdi.uuid, b'3' * 512, 4 * MiB + 512)
        data = self.content(vdi.uuid)
        got = self.sr.coalesce(b2.uuid)
        self.assertEqual((b2.uuid, None, True, True),
                         (got.uuid, got.parent, got.hidden, got.read_only))
        self.assertEqual([vdi.uuid, b2.uuid],
                         [v.uuid for v in self.sr.chain(vdi.uuid)])
        self.assertRaises(sr_base.VDINotFound, self.sr.get, b1.uuid)
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertValid(vdi.uuid)
        # The leaf still coalesces into the merged base.
        self.sr.coalesce(vdi.uuid)
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertEqual([vdi.uuid], [v.uuid for v in self.sr.list()])
        self.assertValid(vdi.uuid)

    def test_coalesce_refusals(self):
        self.assertRaises(sr_base.VDINotFound, self.sr.coalesce, U1)
        vdi = self.disk()
        exc = self.assertRaises(sr_base.SRError, self.sr.coalesce, vdi.uuid)
        self.assertIn('no parent', str(exc))
        snap = self.sr.snapshot(vdi.uuid)
        # A second child of the base, made behind the SR's back.
        other = os.path.join(self.dir, '%s.vhd' % U1)
        ops.snapshot(other, self.path(snap.uuid))
        before = self.sr.list()
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.coalesce, vdi.uuid)
        self.assertIn(U1, str(exc))
        self.assertIn(snap.uuid, str(exc))
        os.unlink(other)
        dev = self.sr.attach(vdi.uuid, writable=True)
        self.assertRaises(sr_base.VDIInUse, self.sr.coalesce, vdi.uuid)
        dev.close()
        self.assertEqual(len(before) - 1, len(self.sr.list()))
        self.assertEqual([], self.journals())
        self.sr.coalesce(vdi.uuid)

    def test_coalesce_with_parent_gone(self):
        vdi = self.disk()
        snap = self.sr.snapshot(vdi.uuid)
        os.unlink(self.path(snap.uuid))
        exc = self.assertRaises(sr_base.SRError, self.sr.coalesce, vdi.uuid)
        self.assertIn(snap.uuid, str(exc))
        exc = self.assertRaises(sr_base.SRError, self.sr.chain, vdi.uuid)
        self.assertIn(snap.uuid, str(exc))

    def test_destroy_parent_refused(self):
        vdi = self.disk()
        snap = self.sr.snapshot(vdi.uuid)
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.destroy, snap.uuid)
        self.assertIn(vdi.uuid, str(exc))
        self.sr.destroy(vdi.uuid)
        self.sr.destroy(snap.uuid)
        self.assertEqual([], self.sr.list())

    def test_writable_attach_of_a_parent_refused(self):
        vdi = self.disk()
        snap = self.sr.snapshot(vdi.uuid)
        os.chmod(self.path(snap.uuid), 0o644)
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.attach, snap.uuid,
                                True)
        self.assertIn(vdi.uuid, str(exc))

    def test_attach_and_compose_open_no_whole_record_nor_other_vdis(self):
        # What a VM's start after a migration does inside the pause: the
        # VDI's record (its allocated bytes: a bitmap read per partly
        # written block) and the images of the other VDIs (their BATs)
        # cost with their sizes; their headers are enough.
        others = [self.disk() for _ in range(3)]
        self.sr.snapshot(others[0].uuid)
        rcv = self.sr.receive(8 * MiB, name='in', vm=U2)
        rcv.leaf.pwrite(b'L' * 4096, 4096)
        opened = []
        real_image = vhd_image.Image

        def image(path, *args, **kwargs):
            opened.append(os.path.basename(path))
            return real_image(path, *args, **kwargs)

        def no_record(uuid, path):
            raise AssertionError('the whole record of %s was read' % uuid)
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.vhd.image.Image', image))
        self.sr._vdi = no_record
        self.assertIsNone(rcv.compose(durable=False, describe=False))
        dev = self.sr.attach(rcv.leaf_uuid, writable=True)
        self.addCleanup(dev.close)
        self.assertEqual(b'L' * 4096, bytes(dev.pread(4096, 4096)))
        del self.sr._vdi
        mine = {rcv.leaf_uuid + '.vhd', rcv.vdis[0] + '.vhd'}
        self.assertEqual(set(), set(opened) - mine)
        # a parent is still refused a writer, a read-only VDI too
        snap = self.sr.snapshot(others[1].uuid)
        os.chmod(self.path(snap.uuid), 0o644)
        self.assertRaises(sr_base.VDIInUse, self.sr.attach, snap.uuid, True)
        rcv.make_durable()

    def test_base_finished_ahead_then_compose_keeps_the_leaf_open(self):
        # A migration's compose phase finishes the base (the copy is
        # done) while the leaf still takes mirrored writes; the commit's
        # compose then opens no image and the guest takes the open leaf.
        rcv = self.sr.receive(8 * MiB, name='in', vm=U2)
        base_uuid, leaf = rcv.vdis
        rcv.base.pwrite(b'B' * 2 * MiB, 2 * MiB)
        rcv.leaf.pwrite(b'L' * 4096, 2 * MiB + 4096)
        rcv.finish_base()
        rcv.finish_base()                                # idempotent
        b = self.sr.get(base_uuid)
        self.assertEqual((True, True), (b.hidden, b.read_only))
        rcv.leaf.pwrite(b'M' * 4096, 6 * MiB)           # still mirrored
        opened = []
        real_image = vhd_image.Image

        def image(path, *args, **kwargs):
            opened.append(os.path.basename(path))
            return real_image(path, *args, **kwargs)
        with fixtures.MonkeyPatch('xsm_driver.core.vhd.image.Image', image):
            self.assertIsNone(rcv.compose(durable=False, describe=False,
                                          keep_leaf=True))
        self.assertEqual([], opened)
        dev = rcv.take_leaf()
        self.assertIsNone(rcv.take_leaf())              # taken once
        want = bytearray(8 * MiB)
        want[2 * MiB:4 * MiB] = b'B' * 2 * MiB
        want[2 * MiB + 4096:2 * MiB + 8192] = b'L' * 4096
        want[6 * MiB:6 * MiB + 4096] = b'M' * 4096
        self.assertEqual(bytes(want), bytes(dev.pread(0, 8 * MiB)))
        dev.pwrite(b'u' * 100, 10)          # a VDI's device: any write
        want[10:110] = b'u' * 100
        # the VDI is attached (for writing) until the device closes
        self.assertRaises(sr_base.VDIInUse, self.sr.attach, leaf, True)
        dev.close()
        rcv.make_durable()
        self.assertValid(leaf)
        img = vhd_image.Image(self.path(leaf))
        self.addCleanup(img.close)
        self.assertEqual(
            fmt.vhd_time(os.stat(self.path(base_uuid)).st_mtime),
            img.header.parent_timestamp)
        self.assertEqual(bytes(want), self.content(leaf))
        self.sr.attach(leaf, writable=True).close()

    def test_base_finished_ahead_then_discarded_or_composed_durably(self):
        rcv = self.sr.receive(8 * MiB)
        rcv.base.pwrite(b'B' * 4096, 0)
        rcv.finish_base()
        rcv.discard()
        self.assertEqual([], self.sr.list())
        self.assertEqual(['.lock'], os.listdir(self.dir))
        rcv = self.sr.receive(8 * MiB)
        rcv.base.pwrite(b'B' * 4096, 0)
        rcv.finish_base()
        rcv.leaf.pwrite(b'L' * 512, 512)
        vdi = rcv.compose(keep_leaf=True)       # durable: no leaf kept
        self.assertIsNone(rcv.take_leaf())
        self.assertValid(vdi.uuid)
        self.assertEqual(b'B' * 512 + b'L' * 512 + b'B' * 512,
                         self.content(vdi.uuid)[:1536])

    # -- receive -----------------------------------------------------------

    def test_receive_layout_and_compose(self):
        rcv = self.sr.receive(8 * MiB, name='in', vm=U2)
        self.assertEqual(2, len(rcv.vdis))
        base_uuid, leaf = rcv.vdis
        self.assertEqual(leaf, rcv.leaf_uuid)
        b = self.sr.get(base_uuid)
        self.assertEqual((True, False, None), (b.hidden, b.read_only,
                                               b.parent))
        self.assertEqual(base_uuid, self.sr.get(leaf).parent)
        self.assertRaises(sr_base.VDIInUse, self.sr.destroy, base_uuid)
        rcv.base.pwrite(b'B' * 2 * MiB, 2 * MiB)
        rcv.leaf.pwrite(b'L' * 4096, 2 * MiB + 4096)
        os.utime(self.path(base_uuid), (1e9, 1e9))   # an old parent mtime
        vdi = rcv.compose()
        self.assertEqual((leaf, base_uuid), (vdi.uuid, vdi.parent))
        b = self.sr.get(base_uuid)
        self.assertEqual((True, True), (b.hidden, b.read_only))
        self.assertValid(leaf)
        img = vhd_image.Image(self.path(leaf))
        self.addCleanup(img.close)
        self.assertEqual(
            fmt.vhd_time(os.stat(self.path(base_uuid)).st_mtime),
            img.header.parent_timestamp)
        want = bytearray(8 * MiB)
        want[2 * MiB:4 * MiB] = b'B' * 2 * MiB
        want[2 * MiB + 4096:2 * MiB + 8192] = b'L' * 4096
        self.assertEqual(bytes(want), self.content(leaf))
        self.assertEqual(4096, vdi.allocated)

    def test_receive_failure_leaves_nothing(self):
        before = sorted(os.listdir(self.dir)) if os.path.isdir(
            self.dir) else []
        with mock.patch.object(ops, 'snapshot',
                               side_effect=OSError(errno.ENOSPC, 'full')):
            exc = self.assertRaises(sr_base.SRError, self.sr.receive,
                                    4 * MiB)
        self.assertIn('full', str(exc))
        self.assertEqual([], self.sr.list())
        self.assertEqual(sorted(set(before) | {'.lock'}),
                         sorted(os.listdir(self.dir)))

    # -- recover -----------------------------------------------------------

    def test_recover_drops_unusable_journals(self):
        names = ['.snapshot.%s.journal' % U1, '.coalesce.%s.journal' % U2,
                 '.other.%s.journal' % U1]
        bodies = ['{bad', '{"op": "coalesce", "vdi": "../x", "parent": "y"}',
                  '{"op": "other", "vdi": "%s"}' % U1]
        for name, body in zip(names, bodies):
            with open(os.path.join(self.dir, name), 'w') as f:
                f.write(body)
        lines = self.sr.recover()
        self.assertEqual(3, len(lines))
        self.assertEqual([], self.own_files())

    def test_recover_leaves_running_operations_alone(self):
        vdi = self.disk()
        journal = {'op': 'snapshot', 'vdi': vdi.uuid, 'base': U1,
                   'mode': 0o644, 'hidden': False, 'name': ''}
        self.sr._write_journal(journal)
        self.sr._busy.add(vdi.uuid)
        self.assertEqual([], self.sr.recover())
        self.assertEqual(1, len(self.journals()))
        self.sr._busy.clear()
        self.assertEqual(1, len(self.sr.recover()))
        self.assertEqual([], self.journals())

    def test_snapshot_interrupted_at_the_link_by_hand(self):
        """The state the design names: base.vhd, a second link of V.vhd."""
        vdi = self.disk(name='disk')
        before, data = self.sr.list(), self.content(vdi.uuid)
        journal = {'op': 'snapshot', 'vdi': vdi.uuid, 'base': U1,
                   'mode': 0o644, 'hidden': False, 'name': 'disk'}
        self.sr._write_journal(journal)
        os.link(self.path(vdi.uuid), self.path(U1))
        ops.set_hidden(self.path(U1), True)
        vhd_image.make_read_only(self.path(U1))
        self.assertEqual(2, os.stat(self.path(vdi.uuid)).st_nlink)
        lines = vhd.VHDSR('local', self.dir).recover()
        self.assertEqual(1, len(lines))
        self.assertIn('second link', lines[0])
        self.assertEqual(before, self.sr.list())
        self.assertEqual(1, os.stat(self.path(vdi.uuid)).st_nlink)
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertValid(vdi.uuid)

    def test_coalesce_interrupted_before_the_rename_by_hand(self):
        vdi = self.disk(name='disk')
        snap = self.sr.snapshot(vdi.uuid)
        self.write(vdi.uuid, b'n' * 512, 0)
        before, data = self.sr.list(), self.content(vdi.uuid)
        journal = self.sr._prepare_coalesce(vdi.uuid)
        self.sr._write_journal(journal)
        os.chmod(self.path(snap.uuid), 0o644)
        ops.coalesce(self.path(vdi.uuid))
        vhd._set_footer(self.path(snap.uuid), 0,
                        bytes.fromhex(journal['vdi_uuid']))
        lines = vhd.VHDSR('local', self.dir).recover()
        self.assertIn('its parent again', lines[0])
        self.assertEqual(common.summary(before),
                         common.summary(self.sr.list()))
        self.assertEqual(data, self.content(vdi.uuid))
        self.assertValid(vdi.uuid)
        self.sr.coalesce(vdi.uuid)
        self.assertEqual(data, self.content(vdi.uuid))


class VHDSRCrashTest(VHDSRTestCase):
    """Kill or fail snapshot and coalesce at every file system call."""

    def setUp(self):
        super().setUp()
        self.pristine = os.path.join(self.top, 'pristine')

    def fresh(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.copytree(self.pristine, self.dir)
        self.sr = vhd.VHDSR('local', self.dir)

    def save(self):
        shutil.copytree(self.dir, self.pristine)

    def assertRecovered(self, vdi, data, before, after_ok, lines=None):
        """The SR lists ``before`` or a finished state; data intact."""
        self.assertEqual([], self.journals(), lines)
        self.assertEqual([], self.own_files(), lines)
        now = common.summary(self.sr.list())
        self.assertEqual(data, self.content(vdi))
        problems = check.check(self.path(vdi), chain=True)
        if now == before:
            # Data a cut coalesce copied into the parent may lie under
            # clear bitmap bits (vhd-util check -b reports it); it is never
            # read: the child's sectors hide it.
            self.assertEqual([], [p for p in problems if 'bitmap is clear'
                                  not in p], lines)
            return 'before'
        self.assertEqual([], problems, lines)
        after_ok(now)
        return 'after'

    def snapshot_done(self, vdi, before):
        def ok(now):
            new = set(now) - set(before)
            self.assertEqual(1, len(new), now)
            new = new.pop()
            self.assertEqual(('base of disk', None, before[vdi][2], True,
                              True, before[vdi][5], 'vhd'), now[new])
            self.assertEqual(new, now[vdi][2])
            self.assertEqual(before[vdi][:2] + before[vdi][3:],
                             now[vdi][:2] + now[vdi][3:])
            rest = {u: v for u, v in now.items() if u not in (vdi, new)}
            self.assertEqual({u: v for u, v in before.items() if u != vdi},
                             rest)
        return ok

    def coalesce_done(self, vdi, parent, before):
        def ok(now):
            self.assertNotIn(parent, now)
            self.assertEqual(before[vdi][:2] + (before[parent][2],) +
                             before[vdi][3:], now[vdi])
            self.assertEqual(len(before) - 1, len(now))
        return ok

    def setup_snapshot(self):
        vdi = self.disk(name='disk', vm=U2)
        self.sr.snapshot(vdi.uuid)
        self.write(vdi.uuid, b'q' * 1024, 2 * MiB - 512)
        return vdi.uuid

    def setup_coalesce(self):
        vdi = self.disk(name='disk', vm=U2)
        parent = self.sr.snapshot(vdi.uuid).uuid
        self.write(vdi.uuid, b'q' * 1024, 2 * MiB - 512)
        self.write(vdi.uuid, b'r' * 512, 6 * MiB)
        return vdi.uuid, parent

    def cut_everywhere(self, vdi, operation, after_ok, mode):
        self.save()
        before = common.summary(self.sr.list())
        data = self.content(vdi)
        seen = set()
        at = 0
        while True:
            self.fresh()
            if mode == 'kill':
                code = killed_at(at, lambda: operation(self.sr))
                self.assertIn(code, (0, KILLED), 'cut at %d' % at)
                finished = code == 0
                lines = vhd.VHDSR('local', self.dir).recover()
            else:
                cut = Cut(at)
                try:
                    with cut:
                        operation(self.sr)
                except sr_base.SRError as exc:
                    self.assertIn(vdi, str(exc))
                    self.assertEqual([], self.journals(), 'cut at %d' % at)
                finished = not cut.cut
                lines = self.sr.recover()
            seen.add(self.assertRecovered(vdi, data, before, after_ok,
                                          (at, lines)))
            if finished:
                break
            at += 1
        self.assertEqual({'before', 'after'}, seen)
        self.assertGreater(at, 10)
        return at

    def test_snapshot_killed_everywhere(self):
        vdi = self.setup_snapshot()
        before = common.summary(self.sr.list())
        self.cut_everywhere(vdi, lambda sr: sr.snapshot(vdi),
                            self.snapshot_done(vdi, before), 'kill')

    def test_snapshot_failing_everywhere(self):
        vdi = self.setup_snapshot()
        before = common.summary(self.sr.list())
        self.cut_everywhere(vdi, lambda sr: sr.snapshot(vdi),
                            self.snapshot_done(vdi, before), 'fail')

    def test_coalesce_killed_everywhere(self):
        vdi, parent = self.setup_coalesce()
        before = common.summary(self.sr.list())
        self.cut_everywhere(vdi, lambda sr: sr.coalesce(vdi),
                            self.coalesce_done(vdi, parent, before), 'kill')

    def test_coalesce_failing_everywhere(self):
        vdi, parent = self.setup_coalesce()
        before = common.summary(self.sr.list())
        self.cut_everywhere(vdi, lambda sr: sr.coalesce(vdi),
                            self.coalesce_done(vdi, parent, before), 'fail')

    def test_coalesce_of_a_middle_vdi_killed_everywhere(self):
        vdi = self.disk(name='disk')
        b1 = self.sr.snapshot(vdi.uuid).uuid
        self.write(vdi.uuid, b'2' * 512, 4 * MiB)
        b2 = self.sr.snapshot(vdi.uuid).uuid
        self.write(vdi.uuid, b'3' * 512, 4 * MiB + 512)
        before = common.summary(self.sr.list())
        data = self.content(vdi.uuid)
        b2_data = self.content(b2)

        def ok(now):
            self.assertNotIn(b1, now)
            self.assertEqual(before[b2][:2] + (None,) + before[b2][3:],
                             now[b2])
            self.assertEqual(before[vdi.uuid], now[vdi.uuid])
            self.assertEqual(b2_data, self.content(b2))

        self.save()
        at = 0
        seen = set()
        while True:
            self.fresh()
            code = killed_at(at, lambda: self.sr.coalesce(b2))
            self.assertIn(code, (0, KILLED))
            lines = vhd.VHDSR('local', self.dir).recover()
            seen.add(self.assertRecovered(vdi.uuid, data, before, ok,
                                          (at, lines)))
            self.assertEqual(b2_data, self.content(b2))
            if code == 0:
                break
            at += 1
        self.assertEqual({'before', 'after'}, seen)
