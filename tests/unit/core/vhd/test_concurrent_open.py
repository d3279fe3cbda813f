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

"""Opening an image read-only while another writer allocates blocks in it.

The SR lists its VDIs by opening every image read-only while guests write
to them. Opening reads the file size, the footer, the header, the BAT and
the batmap with separate system calls; a writer allocating a block grows
the file (new footer at the new end), overwrites the old footer's place
with the block and then points the BAT at it. Opening must see one state
of the file, never a mix that looks corrupt: first with the interleavings
forced at the exact reads, then with a real writer in a thread and in
another process.
"""

import os
import random
import subprocess
import sys
import threading
import time

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.vhd import check
from xsm_driver.core.vhd import errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

MiB = 1024 * 1024
BS = fmt.BLOCK_SIZE
SECTOR = fmt.SECTOR
DEADLINE = 2.0          # seconds a racing test may run (twice at most)


class ConcurrentOpenCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()
        self.path = os.path.join(self.dir, 'disk.vhd')

    def writer(self, size=16 * MiB):
        ops.create(self.path, size)
        img = vhd_image.Image(self.path, writable=True)
        self.addCleanup(img.close)
        return img

    def count_loads(self):
        loads = []
        real = vhd_image.Image._load

        def counting(img):
            loads.append(img.path)
            return real(img)
        self.patch(vhd_image.Image, '_load', counting)
        return loads

    def before_read(self, what, action):
        """Run ``action`` once, just before the reader reads ``what``."""
        real = vhd_image.Image._pread
        done = []

        def racing(img, length, offset, name):
            if name == what and not done:
                done.append(offset)
                action()
            return real(img, length, offset, name)
        self.patch(vhd_image.Image, '_pread', racing)
        return done

    def open_reader(self):
        img = vhd_image.Image(self.path)
        self.addCleanup(img.close)
        return img


class InterleavingTest(ConcurrentOpenCase):
    """Each race of the bug, forced deterministically."""

    def test_block_allocated_between_size_and_bat(self):
        # The size is taken before the allocation, the BAT read after it:
        # the new entry points past that size ("BAT entry 3 points at ...,
        # beyond the end of the file").
        w = self.writer()
        old_size = os.path.getsize(self.path)
        done = self.before_read(
            'BAT', lambda: w.write(3 * BS, memoryview(b'a' * 4096)))
        loads = self.count_loads()
        r = self.open_reader()
        self.assertEqual([r.header.table_offset], done)
        self.assertGreater(r.file_size, old_size)
        self.assertEqual(os.path.getsize(self.path), r.file_size)
        self.assertEqual(w.block_offset(3), r.block_offset(3))
        self.assertEqual([self.path], loads)      # no second reading needed

    def test_block_allocated_between_size_and_footer(self):
        # The size is taken before the allocation, the footer read after
        # it: the old footer's place now holds the zero padding in front
        # of the new block ("footer cookie is b'\\x00...'").
        w = self.writer()
        w.write(0, memoryview(b'a' * 4096))
        old_size = os.path.getsize(self.path)
        done = self.before_read(
            'footer', lambda: w.write(5 * BS, memoryview(b'b' * 4096)))
        loads = self.count_loads()
        r = self.open_reader()
        self.assertEqual([old_size - SECTOR], done)
        self.assertNotEqual(w.footer.pack(),
                            r.read_raw(SECTOR, old_size - SECTOR))
        self.assertEqual(w.block_offset(5), r.block_offset(5))
        self.assertEqual(w.footer.pack(), r.footer.pack())
        self.assertEqual(2, len(loads))

    def test_batmap_written_between_its_header_and_its_bits(self):
        # flush() rewrites the batmap header and bits in one write; the
        # reader reads them with two. The file size does not change.
        w = self.writer()
        w.write(BS, memoryview(b'c' * BS))        # a full block: batmap bit
        size = os.path.getsize(self.path)
        self.before_read('batmap', w.flush)
        loads = self.count_loads()
        r = self.open_reader()
        self.assertEqual(size, r.file_size)
        self.assertTrue(r.is_full(1))
        self.assertEqual(2, len(loads))

    def test_footer_rewritten_after_the_file_grew(self):
        # Both footers replaced (e.g. hidden set) while the reader was
        # between its two looks at the end of the file.
        w = self.writer()

        def grow_and_hide():
            w.write(2 * BS, memoryview(b'd' * 4096))
            footer = w.footer
            footer.hidden = 1
            w.write_footer(footer)
        self.before_read('BAT', grow_and_hide)
        loads = self.count_loads()
        r = self.open_reader()
        self.assertEqual(1, r.footer.hidden)
        self.assertEqual(w.block_offset(2), r.block_offset(2))
        self.assertEqual(2, len(loads))


class CorruptImageTest(ConcurrentOpenCase):
    """Retrying must not hide corruption nor loop on it."""

    def record_pauses(self):
        """The seconds this test's thread sleeps in the VHD module, instead.

        ``time.sleep`` is the whole process's: threads of earlier tests
        still running in this worker sleep for real and are not counted.
        """
        pauses = []
        me, real_sleep = threading.current_thread(), time.sleep

        def sleep(seconds):
            if threading.current_thread() is me:
                pauses.append(seconds)
            else:
                real_sleep(seconds)
        self.patch(vhd_image.time, 'sleep', sleep)
        return pauses

    def corrupt_bat(self):
        w = self.writer()
        w.close()
        img = vhd_image.Image(self.path)
        bat_at = img.header.table_offset
        img.close()
        with open(self.path, 'r+b') as f:
            f.seek(bat_at + 4 * 2)
            f.write((os.path.getsize(self.path) // SECTOR).to_bytes(4, 'big'))

    def test_corrupt_image_is_reported_after_two_identical_readings(self):
        self.corrupt_bat()
        loads = self.count_loads()
        pauses = self.record_pauses()
        exc = self.assertRaises(errors.InvalidImage, vhd_image.Image,
                                self.path)
        self.assertIn('BAT entry 2 points at', str(exc))
        self.assertIn(self.path, str(exc))
        self.assertEqual(2, len(loads))
        self.assertEqual([0], pauses)

    def test_truncated_image_is_reported(self):
        self.writer().close()
        with open(self.path, 'r+b') as f:
            f.truncate(os.path.getsize(self.path) - 100)
        loads = self.count_loads()
        exc = self.assertRaises(errors.InvalidImage, vhd_image.Image,
                                self.path)
        self.assertIn('footer cookie', str(exc))
        self.assertEqual(2, len(loads))

    def test_an_image_that_never_settles_is_given_up_on(self):
        self.writer().close()
        attempts = []

        def changing(img):
            attempts.append(len(attempts))
            img._seen.append(len(attempts))        # differs every time
            raise fmt.FormatError('changing %d' % len(attempts))
        self.patch(vhd_image.Image, '_load', changing)
        pauses = self.record_pauses()
        exc = self.assertRaises(errors.InvalidImage, vhd_image.Image,
                                self.path)
        self.assertIn('changing %d' % vhd_image._LOAD_TRIES, str(exc))
        self.assertEqual(vhd_image._LOAD_TRIES, len(attempts))
        self.assertEqual(vhd_image._LOAD_TRIES - 1, len(pauses))
        self.assertLess(sum(pauses), 0.5)


class RacingWriterTest(ConcurrentOpenCase):
    """A real writer allocates blocks while the reader keeps opening.

    512 MiB images of 4 KiB writes, one into each block in random order,
    as the colleague's reproduction (about 20 failed opens in 3000 before
    the fix).
    """

    SIZE = 512 * MiB

    def open_until(self, finished):
        """Open read-only until ``finished()``; the opens and failures."""
        opens, failures = 0, []
        stop_at = time.monotonic() + DEADLINE
        while not finished() and time.monotonic() < stop_at:
            try:
                vhd_image.Image(self.path).close()
            except errors.VHDError as exc:
                failures.append(str(exc))
            opens += 1
        return opens, failures

    def test_open_while_a_thread_allocates(self):
        ops.create(self.path, self.SIZE)
        dev = backends.VHDDevice(self.path, writable=True)
        self.addCleanup(dev.close)
        order = list(range(self.SIZE // BS))
        random.Random(7).shuffle(order)
        errors_seen = []

        def write():
            try:
                for block in order:
                    dev.pwrite(b'w' * 4096, block * BS + 4096)
            except Exception as exc:      # reported by the main thread
                errors_seen.append(exc)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        opens, failures = self.open_until(lambda: not thread.is_alive())
        thread.join(DEADLINE)
        self.assertEqual([], errors_seen)
        self.assertEqual([], failures[:5], '%d of %d opens failed'
                         % (len(failures), opens))
        self.assertGreater(opens, 0)
        dev.close()
        self.assertEqual([], check.check(self.path))

    def test_open_while_another_process_allocates(self):
        # Allocating a block takes the writer a 2 MiB write, far longer
        # than the reader takes from the file size to the BAT: the reader
        # pauses there (as a loaded host would) so that they overlap.
        real = vhd_image.Image._pread

        def slow(img, length, offset, what):
            if what == 'BAT':
                time.sleep(0.001)
            return real(img, length, offset, what)
        self.patch(vhd_image.Image, '_pread', slow)
        ops.create(self.path, self.SIZE)
        script = (
            'import random, sys\n'
            'from xsm_driver.core.block import backends\n'
            'dev = backends.VHDDevice(sys.argv[1], writable=True)\n'
            'order = list(range(%d))\n'
            'random.Random(11).shuffle(order)\n'
            'print("ready", flush=True)\n'
            'sys.stdin.readline()\n'
            'for block in order:\n'
            '    dev.pwrite(b"p" * 4096, block * %d)\n'
            'dev.close()\n' % (self.SIZE // BS, BS))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [base.REPO_TOP] +
            [p for p in [os.environ.get('PYTHONPATH')] if p]))
        proc = subprocess.Popen([sys.executable, '-c', script, self.path],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        self.addCleanup(self._reap, proc)
        self.assertEqual('ready\n', proc.stdout.readline(), proc.stderr.read()
                         if proc.poll() is not None else '')
        proc.stdin.write('go\n')
        proc.stdin.flush()
        opens, failures = self.open_until(lambda: proc.poll() is not None)
        self.assertEqual(0, proc.wait(DEADLINE), proc.stderr.read())
        self.assertEqual([], failures[:5], '%d of %d opens failed'
                         % (len(failures), opens))
        self.assertGreater(opens, 0)
        self.assertEqual([], check.check(self.path))

    @staticmethod
    def _reap(proc):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
