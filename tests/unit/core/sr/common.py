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

"""What every SR driver must do, run against each driver's test case.

A driver's test module mixes :class:`SRContract` into a
``tests.base.TestCase`` and sets ``driver`` (the SR class) and
``size`` (a valid VDI size).
"""

import errno
import json
import logging
import os
import random
import re
import stat
import threading

import fixtures

from xsm_driver.core.block import device
from xsm_driver.core import exception
from xsm_driver.core.sr import base as sr_base

MiB = 1024 * 1024
UUID4 = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-'
                   r'[0-9a-f]{12}$')
U1 = '11111111-1111-4111-8111-111111111111'
U2 = '22222222-2222-4222-8222-222222222222'
U3 = 'abcdef01-2345-4678-89ab-cdef01234567'
BAD_UUIDS = ['', '../x', 'a/b', '/etc/passwd', 'not-a-uuid', '.', '..',
             U1 + '/../x', '../' + U1, U1 + '.vhd', U1[:-1], U1 + '0',
             U1.replace('-', ''), '{%s}' % U1, ' %s' % U1, U1 + '\n',
             None, 42, b'x']


def summary(vdis):
    """What a listing says, leaving out what data changes (allocation)."""
    return {v.uuid: (v.name, v.vm, v.parent, v.hidden, v.read_only, v.size,
                     v.type) for v in vdis}


class SRContract:
    """Tests every driver passes; the driver test sets the attributes."""

    driver = None
    size = 4 * MiB

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        self.dir = os.path.join(self.make_tempdir(), 'sr')
        self.sr = self.driver('sr1', self.dir)

    def reopen(self):
        return self.driver('sr1', self.dir)

    def files(self):
        return sorted(os.listdir(self.dir))

    def write(self, uuid, data, offset=0):
        dev = self.sr.attach(uuid, writable=True)
        try:
            dev.pwrite(data, offset)
            dev.flush()
        finally:
            dev.close()

    def read(self, uuid, offset=0, length=None):
        dev = self.sr.attach(uuid)
        try:
            return bytes(dev.pread(offset, dev.size - offset
                                   if length is None else length))
        finally:
            dev.close()

    # -- the SR itself -----------------------------------------------------

    def test_directory_is_made_private(self):
        self.assertEqual(0o700, stat.S_IMODE(os.stat(self.dir).st_mode))
        self.assertEqual('sr1', self.sr.name)
        self.assertEqual(self.dir, self.sr.path)
        self.assertEqual([], self.sr.list())

    def test_existing_directory_is_kept(self):
        path = os.path.join(self.make_tempdir(), 'x')
        os.mkdir(path, 0o755)
        self.driver('x', path)
        self.assertEqual(0o755, stat.S_IMODE(os.stat(path).st_mode))

    def test_bad_sr_names(self):
        for name in ('', 'a/b', '../x', 'x' * 65, 'a b', None, 7, 'é'):
            exc = self.assertRaises(sr_base.InvalidName, self.driver, name,
                                    self.dir)
            self.assertIn('SR name', str(exc))
        self.driver('A-z_0.9' + 'x' * 57, self.dir)

    def test_path_that_is_a_file(self):
        path = os.path.join(self.make_tempdir(), 'file')
        open(path, 'w').close()
        exc = self.assertRaises(sr_base.SRError, self.driver, 'x', path)
        self.assertIn(path, str(exc))

    def test_errors_are_xsm_errors(self):
        for cls in (sr_base.VDINotFound, sr_base.VDIExists,
                    sr_base.InvalidName, sr_base.VDIInUse,
                    sr_base.NotSupported, sr_base.VDIReadOnly,
                    sr_base.InvalidSize, sr_base.ChainTooDeep):
            self.assertTrue(issubclass(cls, sr_base.SRError))
        self.assertTrue(issubclass(sr_base.SRError, exception.XSMError))

    def test_capacity(self):
        cap = self.sr.capacity()
        st = os.statvfs(self.dir)
        self.assertEqual(st.f_blocks * st.f_frsize, cap['size'])
        self.assertGreater(cap['size'], 0)
        self.assertGreater(cap['free'], 0)
        self.assertLessEqual(cap['free'], cap['size'])
        self.assertLess(abs(cap['free'] - st.f_bavail * st.f_frsize),
                        256 * MiB)

    # -- create, get, list -------------------------------------------------

    def test_create_defaults(self):
        vdi = self.sr.create(self.size)
        self.assertRegex(vdi.uuid, UUID4)
        self.assertEqual(('', None, None, False, False, self.sr.type, 'sr1',
                          self.size),
                         (vdi.name, vdi.vm, vdi.parent, vdi.hidden,
                          vdi.read_only, vdi.type, vdi.sr, vdi.size))
        path = self.sr.vdi_path(vdi.uuid)
        self.assertEqual(os.path.join(self.dir, '%s.%s' % (vdi.uuid,
                                                           self.sr.type)),
                         path)
        self.assertEqual(os.stat(path).st_blocks * 512, vdi.physical)
        self.assertEqual(vdi, self.sr.get(vdi.uuid))
        self.assertEqual([vdi], self.sr.list())
        self.assertEqual([vdi], self.sr.chain(vdi.uuid))

    def test_create_with_everything(self):
        vdi = self.sr.create(self.size, name='boot disk', vm=U2, uuid=U1,
                             hidden=True)
        self.assertEqual((U1, 'boot disk', U2, True),
                         (vdi.uuid, vdi.name, vdi.vm, vdi.hidden))
        self.assertEqual(vdi, self.sr.get(U1))

    def test_upper_case_uuid_is_normalised(self):
        vdi = self.sr.create(self.size, uuid=U3.upper())
        self.assertEqual(U3, vdi.uuid)
        self.assertEqual(vdi, self.sr.get(vdi.uuid.upper()))

    def test_to_dict_is_primitive(self):
        vdi = self.sr.create(self.size, name='n', vm=U2)
        d = vdi.to_dict()
        self.assertEqual(json.loads(json.dumps(d)), d)
        self.assertEqual({'uuid', 'name', 'size', 'parent', 'read_only',
                          'hidden', 'vm', 'sr', 'type', 'physical',
                          'allocated'}, set(d))
        self.assertEqual(vdi, sr_base.VDI(**d))

    def test_uuid_collision(self):
        self.sr.create(self.size, uuid=U1, name='first')
        exc = self.assertRaises(sr_base.VDIExists, self.sr.create, self.size,
                                uuid=U1, name='second')
        self.assertIn(U1, str(exc))
        self.assertIn('sr1', str(exc))
        self.assertEqual('first', self.sr.get(U1).name)

    def test_bad_uuids_are_refused_everywhere(self):
        self.sr.create(self.size, uuid=U1)
        before = self.files()
        calls = [lambda u: self.sr.create(self.size, uuid=u or ''),
                 self.sr.get, self.sr.destroy, self.sr.chain,
                 lambda u: self.sr.update(u, name='x'),
                 self.sr.attach, lambda u: self.sr.attach(u, True),
                 self.sr.snapshot, self.sr.coalesce]
        for bad in BAD_UUIDS:
            for call in calls:
                exc = self.assertRaises(sr_base.InvalidName, call, bad)
                self.assertIn('sr1', str(exc))
                self.assertIn('uuid', str(exc))
        self.assertEqual(before, self.files())
        self.assertFalse(os.path.exists(os.path.join(
            os.path.dirname(self.dir), 'x.%s' % self.sr.type)))

    def test_bad_names_and_vms(self):
        for kwargs in ({'name': 'a\nb'}, {'name': 'x' * 256}, {'name': None},
                       {'name': 3}, {'vm': ''}, {'vm': 'a\0b'},
                       {'vm': 5}):
            self.assertRaises(sr_base.InvalidName, self.sr.create, self.size,
                              **kwargs)
        self.assertEqual([], self.sr.list())
        vdi = self.sr.create(self.size, name='x' * 255 + '')
        self.assertRaises(sr_base.InvalidName, self.sr.update, vdi.uuid,
                          name='\t')
        self.assertRaises(sr_base.InvalidName, self.sr.update, vdi.uuid,
                          vm='')

    def test_bad_sizes(self):
        for size in (0, -512, '4M', 4.0 * MiB, None, True):
            exc = self.assertRaises(sr_base.InvalidSize, self.sr.create, size)
            self.assertIn('sr1', str(exc))
        self.assertEqual([], self.files())

    def test_get_missing(self):
        exc = self.assertRaises(sr_base.VDINotFound, self.sr.get, U1)
        self.assertIn(U1, str(exc))
        self.assertIn('sr1', str(exc))
        self.assertIn(self.dir, str(exc))

    def test_list_is_sorted_and_ignores_foreign_files(self):
        made = [self.sr.create(self.size).uuid for _ in range(5)]
        other = 'raw' if self.sr.type == 'vhd' else 'vhd'
        junk = ['.%s.%s' % (U1, self.sr.type), '.%s.x.tmp' % U1,
                'notes.txt', '%s.%s' % (U2, other), U3.upper() + '.' +
                self.sr.type, '%s.json' % U2, 'x.%s' % self.sr.type]
        for name in junk:
            with open(os.path.join(self.dir, name), 'w') as f:
                f.write('junk')
        os.mkdir(os.path.join(self.dir, '%s.%s' % (U1, self.sr.type)))
        os.symlink(self.sr.vdi_path(made[0]),
                   os.path.join(self.dir, '%s.%s' % (U2, self.sr.type)))
        self.assertEqual(sorted(made), [v.uuid for v in self.sr.list()])
        self.assertRaises(sr_base.VDINotFound, self.sr.get, U2)
        self.assertRaises(sr_base.VDINotFound, self.sr.get, U1)

    # -- records -----------------------------------------------------------

    def test_records_survive_a_new_sr_object(self):
        a = self.sr.create(self.size, name='a', vm=U2, hidden=True)
        b = self.sr.create(self.size, name='b')
        self.assertEqual([a, b] if a.uuid < b.uuid else [b, a],
                         self.reopen().list())

    def test_file_without_record_lists(self):
        vdi = self.sr.create(self.size, name='n', vm=U2)
        os.unlink(os.path.join(self.dir, '%s.json' % vdi.uuid))
        got = self.reopen().get(vdi.uuid)
        self.assertEqual(('', None), (got.name, got.vm))
        self.assertEqual([vdi.uuid], [v.uuid for v in self.sr.list()])

    def test_corrupt_record_reads_as_none(self):
        vdi = self.sr.create(self.size, name='n', vm=U2)
        with open(os.path.join(self.dir, '%s.json' % vdi.uuid), 'w') as f:
            f.write('{not json')
        self.assertEqual(('', None), (self.sr.get(vdi.uuid).name,
                                      self.sr.get(vdi.uuid).vm))

    def test_record_without_file_does_not_list(self):
        vdi = self.sr.create(self.size, name='gone')
        os.unlink(self.sr.vdi_path(vdi.uuid))
        self.assertEqual([], self.sr.list())
        self.assertRaises(sr_base.VDINotFound, self.sr.get, vdi.uuid)
        lines = self.sr.recover()
        self.assertEqual(1, len(lines))
        self.assertIn(vdi.uuid, lines[0])
        self.assertEqual(['.lock'], self.files())
        # A new VDI of that uuid does not inherit the old record.
        again = self.sr.create(self.size, uuid=vdi.uuid)
        self.assertEqual('', again.name)

    def test_record_is_written_atomically(self):
        vdi = self.sr.create(self.size, name='n')
        with open(os.path.join(self.dir, '%s.json' % vdi.uuid)) as f:
            record = json.load(f)
        self.assertEqual(('n', None, self.sr.type),
                         (record['name'], record['vm'], record['type']))
        self.assertEqual([], [n for n in self.files() if n.endswith('.tmp')])

    # -- destroy and update ------------------------------------------------

    def test_destroy(self):
        keep = self.sr.create(self.size)
        vdi = self.sr.create(self.size, name='x')
        self.sr.destroy(vdi.uuid)
        self.assertEqual([keep], self.sr.list())
        self.assertEqual(['.lock', '%s.json' % keep.uuid,
                          '%s.%s' % (keep.uuid, self.sr.type)], self.files())
        self.sr.destroy(vdi.uuid)           # idempotent
        self.sr.destroy(U1)                 # never existed
        self.assertEqual([keep], self.sr.list())

    def test_destroy_read_only_vdi(self):
        vdi = self.sr.create(self.size)
        os.chmod(self.sr.vdi_path(vdi.uuid), 0o444)
        self.sr.destroy(vdi.uuid)
        self.assertEqual([], self.sr.list())

    def test_update(self):
        vdi = self.sr.create(self.size, name='a', vm=U1)
        got = self.sr.update(vdi.uuid, name='b')
        self.assertEqual(('b', U1, False), (got.name, got.vm, got.hidden))
        got = self.sr.update(vdi.uuid, vm=U2)
        self.assertEqual(('b', U2), (got.name, got.vm))
        got = self.sr.update(vdi.uuid, vm=None)
        self.assertEqual(('b', None), (got.name, got.vm))
        got = self.sr.update(vdi.uuid, hidden=True)
        self.assertTrue(got.hidden)
        self.assertEqual(got, self.reopen().get(vdi.uuid))
        got = self.sr.update(vdi.uuid, hidden=False, name='')
        self.assertEqual(('', False), (got.name, got.hidden))
        self.assertEqual(got, self.sr.update(vdi.uuid))
        self.assertRaises(sr_base.VDINotFound, self.sr.update, U2, name='x')

    def test_update_hidden_of_read_only_vdi(self):
        vdi = self.sr.create(self.size)
        os.chmod(self.sr.vdi_path(vdi.uuid), 0o444)
        got = self.sr.update(vdi.uuid, hidden=True)
        self.assertEqual((True, True), (got.hidden, got.read_only))
        self.assertEqual(0o444, stat.S_IMODE(os.stat(
            self.sr.vdi_path(vdi.uuid)).st_mode))

    # -- attach ------------------------------------------------------------

    def test_attach_read_write(self):
        vdi = self.sr.create(self.size)
        self.write(vdi.uuid, b'x' * 4096, 8192)
        dev = self.sr.attach(vdi.uuid)
        self.addCleanup(dev.close)
        self.assertIsInstance(dev, device.BlockDevice)
        self.assertEqual(vdi.size, dev.size)
        self.assertFalse(dev.can_write)
        self.assertEqual(b'x' * 4096, bytes(dev.pread(8192, 4096)))
        self.assertEqual(bytes(512), bytes(dev.pread(0, 512)))
        self.assertRaises(device.BlockError, dev.pwrite, b'y' * 512, 0)

    def test_attach_missing(self):
        self.assertRaises(sr_base.VDINotFound, self.sr.attach, U1)
        self.assertRaises(sr_base.VDINotFound, self.sr.attach, U1, True)

    def test_writable_attach_of_read_only_vdi(self):
        vdi = self.sr.create(self.size)
        os.chmod(self.sr.vdi_path(vdi.uuid), 0o444)
        exc = self.assertRaises(sr_base.VDIReadOnly, self.sr.attach,
                                vdi.uuid, writable=True)
        self.assertIn(vdi.uuid, str(exc))
        self.assertIn('sr1', str(exc))
        self.sr.attach(vdi.uuid).close()

    def test_one_writer_at_a_time(self):
        vdi = self.sr.create(self.size)
        dev = self.sr.attach(vdi.uuid, writable=True)
        exc = self.assertRaises(sr_base.VDIInUse, self.sr.attach, vdi.uuid,
                                writable=True)
        self.assertIn('attached for writing', str(exc))
        self.assertRaises(sr_base.VDIInUse, self.sr.destroy, vdi.uuid)
        reader = self.sr.attach(vdi.uuid)
        reader.close()
        dev.close()
        dev.close()                         # twice releases once
        self.sr.attach(vdi.uuid, writable=True).close()
        self.sr.destroy(vdi.uuid)
        self.assertEqual([], self.sr.list())

    # -- recover -----------------------------------------------------------

    def test_recover_on_a_clean_sr(self):
        self.sr.create(self.size)
        before = self.sr.list()
        self.assertEqual([], self.sr.recover())
        self.assertEqual(before, self.sr.list())

    def test_recover_removes_temp_files(self):
        vdi = self.sr.create(self.size)
        names = ['.%s.%s.new.tmp' % (U1, self.sr.type),
                 '..%s.%s.new.tmp.abc123.tmp' % (U1, self.sr.type),
                 '.%s.json.xyz.tmp' % U2]
        for name in names:
            with open(os.path.join(self.dir, name), 'w') as f:
                f.write('partial')
        with open(os.path.join(self.dir, '.keep'), 'w') as f:
            f.write('not ours')
        lines = self.reopen().recover()
        self.assertEqual(3, len(lines))
        self.assertEqual(sorted(['.keep', '.lock', '%s.json' % vdi.uuid,
                                 '%s.%s' % (vdi.uuid, self.sr.type)]),
                         self.files())

    def test_recover_keeps_records_of_another_driver(self):
        with open(os.path.join(self.dir, '%s.json' % U1), 'w') as f:
            json.dump({'name': 'x', 'vm': None, 'type': 'other'}, f)
        self.assertEqual([], self.sr.recover())
        self.assertIn('%s.json' % U1, self.files())

    # -- receive -----------------------------------------------------------

    def test_receive_discard_leaves_nothing(self):
        self.sr.create(self.size, name='other')
        before = self.sr.list()
        files = self.files()
        rcv = self.sr.receive(self.size, name='incoming', vm=U2)
        self.assertIn(rcv.leaf_uuid, rcv.vdis)
        self.assertEqual(len(before) + len(rcv.vdis), len(self.sr.list()))
        rcv.leaf.pwrite(b'l' * 512, 0)
        rcv.base.pwrite(b'b' * 4096, 0)
        rcv.discard()
        self.assertEqual(before, self.sr.list())
        self.assertEqual(files, self.files())
        rcv.discard()                       # idempotent
        self.assertEqual(before, self.sr.list())
        self.assertRaises(sr_base.SRError, rcv.compose)

    def test_receive_discard_after_compose(self):
        before = self.sr.list()
        rcv = self.sr.receive(self.size)
        rcv.compose()
        rcv.discard()
        self.assertEqual(before, self.sr.list())

    def test_receive_leaf_is_in_use_while_receiving(self):
        rcv = self.sr.receive(self.size)
        self.addCleanup(rcv.discard)
        self.assertRaises(sr_base.VDIInUse, self.sr.destroy, rcv.leaf_uuid)
        self.assertRaises(sr_base.VDIInUse, self.sr.attach, rcv.leaf_uuid,
                          True)

    def test_receive_bad_arguments(self):
        self.assertRaises(sr_base.InvalidSize, self.sr.receive, 0)
        self.assertRaises(sr_base.InvalidName, self.sr.receive, self.size,
                          name='\n')
        self.assertRaises(sr_base.InvalidName, self.sr.receive, self.size,
                          vm='')
        self.assertEqual([], self.sr.list())

    def test_receive_compose_leaf_wins(self):
        size = self.size
        rcv = self.sr.receive(size, name='vm disk', vm=U2)
        self.assertEqual(size, rcv.base.size)
        self.assertEqual(size, rcv.leaf.size)
        # base first, then leaf over it; leaf first, then base over it.
        rcv.base.pwrite(b'B' * 8192, 0)
        rcv.leaf.pwrite(b'L' * 1024, 1024)
        rcv.leaf.pwrite(b'M' * 2048, 2 * MiB)
        rcv.base.pwrite(b'C' * 8192, 2 * MiB - 4096)
        rcv.base.zero(3 * MiB - 512, 1024)
        rcv.leaf.zero(3 * MiB, 512)
        vdi = rcv.compose()
        self.assertEqual(vdi, rcv.compose())
        self.assertEqual(rcv.leaf_uuid, vdi.uuid)
        self.assertEqual(('vm disk', U2, False, False, size),
                         (vdi.name, vdi.vm, vdi.hidden, vdi.read_only,
                          vdi.size))
        want = bytearray(size)
        want[0:8192] = b'B' * 8192
        want[1024:2048] = b'L' * 1024
        want[2 * MiB - 4096:2 * MiB + 4096] = b'C' * 8192
        want[2 * MiB:2 * MiB + 2048] = b'M' * 2048
        self.assertEqual(bytes(want), self.read(vdi.uuid))
        with self.reopen().attach(vdi.uuid) as dev:
            self.assertEqual(want, bytearray(dev.pread(0, size)))
        # A normal VDI afterwards.
        self.write(vdi.uuid, b'n' * 512, 0)
        self.assertEqual(b'n' * 512 + b'B' * 512, self.read(vdi.uuid, 0,
                                                            1024))

    def test_receive_compose_not_durable_then_make_durable(self):
        # A migration's commit composes without fsync (its journal redoes
        # the compose after a crash) and makes it durable after its answer.
        size = self.size
        rcv = self.sr.receive(size, name='vm disk', vm=U2)
        rcv.base.pwrite(b'B' * 8192, 0)
        rcv.leaf.pwrite(b'L' * 1024, 1024)
        synced = []

        def spy(real):
            def sync(fd):
                synced.append(os.readlink('/proc/self/fd/%d' % fd))
                return real(fd)
            return sync
        self.useFixture(fixtures.MonkeyPatch('os.fsync', spy(os.fsync)))
        self.useFixture(fixtures.MonkeyPatch('os.fdatasync',
                                             spy(os.fdatasync)))
        vdi = rcv.compose(durable=False)
        self.assertEqual([], synced)
        self.assertEqual(rcv.leaf_uuid, vdi.uuid)
        want = bytearray(size)
        want[0:8192] = b'B' * 8192
        want[1024:2048] = b'L' * 1024
        with self.reopen().attach(vdi.uuid) as dev:
            self.assertEqual(want, bytearray(dev.pread(0, size)))
        rcv.make_durable()
        files = {os.path.realpath(self.sr.vdi_path(u)) for u in rcv.vdis}
        self.assertLessEqual(files, set(synced))
        self.assertIn(os.path.realpath(self.sr.path), synced)
        del synced[:]
        rcv.make_durable()                  # owed once only
        self.assertEqual(vdi, rcv.compose())
        self.assertEqual([], synced)
        # a durable compose needs none
        other = self.sr.receive(size)
        other.compose()
        del synced[:]
        other.make_durable()
        self.assertEqual([], synced)

    def test_receive_concurrent_base_and_leaf(self):
        size = self.size
        rng = random.Random(7)
        sectors = size // 512
        # The copy: every 64 KiB chunk once, in random order; some chunks
        # are holes that arrive as zero().
        chunk = 64 * 1024
        copy = [(o, rng.randbytes(chunk) if rng.random() < 0.8 else None)
                for o in range(0, size, chunk)]
        rng.shuffle(copy)
        # Mirrored writes: disjoint aligned runs of sectors.
        free = list(range(0, sectors, 8))
        rng.shuffle(free)
        mirror = []
        for first in free[:len(free) // 3]:
            n = rng.randint(1, 8)
            mirror.append((first * 512, rng.randbytes(n * 512)
                           if rng.random() < 0.9 else n * 512))
        want = bytearray(size)
        for offset, data in copy:
            if data is not None:
                want[offset:offset + chunk] = data
        for offset, data in mirror:
            if isinstance(data, int):
                want[offset:offset + data] = bytes(data)
            else:
                want[offset:offset + len(data)] = data
        rcv = self.sr.receive(size)
        errors = []

        def run(items, do):
            try:
                for item in items:
                    do(*item)
            except Exception as exc:      # pragma: no cover - reported
                errors.append(exc)

        def base_write(offset, data):
            if data is None:
                rcv.base.zero(offset, chunk)
            else:
                rcv.base.pwrite(data, offset)

        def leaf_write(offset, data):
            if isinstance(data, int):
                rcv.leaf.zero(offset, data)
            else:
                rcv.leaf.pwrite(data, offset)

        threads = [threading.Thread(target=run, args=(copy[i::4], base_write))
                   for i in range(4)]
        threads += [threading.Thread(target=run,
                                     args=(mirror[i::4], leaf_write))
                    for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual([], errors)
        vdi = rcv.compose()
        self.assertEqual(bytes(want), self.read(vdi.uuid))

    def test_unaligned_leaf_writes_are_refused(self):
        rcv = self.sr.receive(self.size)
        self.addCleanup(rcv.discard)
        for call in (lambda: rcv.leaf.pwrite(b'x' * 512, 100),
                     lambda: rcv.leaf.pwrite(b'x' * 100, 0),
                     lambda: rcv.leaf.zero(0, 100),
                     lambda: rcv.leaf.zero(256, 512)):
            exc = self.assertRaises(device.BlockError, call)
            self.assertEqual(errno.EINVAL, exc.errno)
            self.assertIn('aligned', str(exc))
        # Nothing landed in the leaf: the base shows through.
        rcv.base.pwrite(b'B' * 1024, 0)
        vdi = rcv.compose()
        self.assertEqual(b'B' * 1024, self.read(vdi.uuid, 0, 1024))
        self.assertEqual(0, self.sr.get(vdi.uuid).allocated
                         if self.sr.type == 'vhd' else 0)
