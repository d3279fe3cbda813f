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

"""A verifying guest workload: what a VM's vCPU does to its disks.

Each disk is seen as 4 KiB blocks. The guest writes block ``b`` with the
pattern of its next *generation* ``g`` (a pure function of disk, block and
generation) and remembers ``g`` in its model (:class:`Generations`: the
blocks written, or a byte per block, 256 KiB per GiB of disk, once one
block in :data:`DENSE_AT` has been written): generations go 1, 2 ... 255,
1, 2 ..., so a lost write always shows (the block holds the generation
before), and only the loss of exactly 255 writes in a row to one block
would not. Reads during the run are checked against the model at once;
:func:`verify` checks a whole disk. The model is the VM's "memory": it
travels with the VM when it migrates (:meth:`export`,
:meth:`Workload.from_state`), so the guest goes on on the destination
exactly where it paused on the source.
"""

import array
import base64
import hashlib
import logging
import random
import re
import struct
import threading
import time
import zlib

from xsm_driver.core import exception

LOG = logging.getLogger(__name__)

BLOCK = 4096
_HEADER = struct.Struct('>8sIQI')
_MAGIC = b'XSMGUEST'


class GuestDataError(exception.XSMError):
    msg_fmt = ('guest disk %(disk)s: block %(block)d (byte offset '
               '%(offset)d) holds %(found)s, the guest wrote %(expected)s')


def pattern(disk, block, generation):
    """The 4 KiB the guest writes to ``block`` at ``generation``."""
    if not generation:
        return bytes(BLOCK)
    head = _HEADER.pack(_MAGIC, disk, block, generation)
    fill = hashlib.blake2b(head, digest_size=64).digest()
    return (head + fill * (BLOCK // len(fill)))[:BLOCK]


def describe(data, disk):
    """Name what a block holds, for an error message."""
    if not any(data):
        return 'zeros'
    magic, d, b, g = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        return 'foreign data'
    if d != disk:
        return 'data of disk %d block %d generation %d' % (d, b, g)
    return 'block %d generation %d' % (b, g)


def pace(next_at, interval, wait=time.sleep):
    """Sleep until ``next_at + interval``: a steady rate of I/Os.

    A writer that fell behind does not burst to catch up: it starts
    again from now.

    :param wait: ``wait(seconds)`` sleeps; it may return early (a guest
        being paused wakes its threads: see :meth:`Workload.suspend`).
    :returns: the new ``next_at``.
    """
    next_at += interval
    delay = next_at - time.monotonic()
    if delay > 0:
        wait(delay)
        return next_at
    return time.monotonic()


#: bytes of a model inflated at a time (:meth:`DiskModel.from_primitive`)
INFLATE_PIECE = 1 << 20
#: a model holds at most one block in this many in its sparse form
#: (:class:`Generations`: about 100 bytes each there, against 1 dense)
DENSE_AT = 64
_NONZERO = re.compile(b'[^\x00]')


class Generations:
    """The generation the guest last wrote to each block: a byte each.

    Sparse (the blocks written, in a dict) until more than one block in
    :data:`DENSE_AT` has been written, then dense (an array of a byte per
    block). A guest that has written a few thousand blocks of a 64 GiB
    disk thus holds a few hundred KiB, not 16 MiB; the encoded form
    (:meth:`pieces`) is the dense one either way. Indexing is as an
    array's (negative indexes count from the end; values 0 to 255).
    """

    def __init__(self, blocks):
        self._blocks = blocks
        self._sparse = {}
        self._dense = None

    def __len__(self):
        return self._blocks

    def _index(self, block):
        if block < 0:
            block += self._blocks
        if not 0 <= block < self._blocks:
            raise IndexError('block %d of %d' % (block, self._blocks))
        return block

    # Readers look at ``_sparse`` first: :meth:`_densify` sets ``_dense``
    # before it drops ``_sparse``, so one of the two is always there (the
    # guest thread may write while another thread reads, as while
    # :meth:`Workload.export_ahead` encodes the model).

    def __getitem__(self, block):
        sparse = self._sparse
        if sparse is None:
            return self._dense[block]
        return sparse.get(self._index(block), 0)

    def __setitem__(self, block, gen):
        dense = self._dense
        if dense is not None:
            dense[block] = gen
            return
        if not 0 <= gen <= 255:
            raise OverflowError('generation %r is not a byte' % (gen,))
        block = self._index(block)
        if gen:
            self._sparse[block] = gen
            if len(self._sparse) * DENSE_AT > self._blocks:
                self._densify()
        else:
            self._sparse.pop(block, None)

    def _densify(self):
        # (one allocation: a bytes of that size first would double it)
        dense = array.array('B', [0]) * self._blocks
        for block, gen in self._sparse.items():
            dense[block] = gen
        self._dense = dense
        self._sparse = None

    def pieces(self, size=INFLATE_PIECE):
        """The dense form, ``size`` blocks at a time (never all at once)."""
        sparse = self._sparse
        if sparse is None:
            view = memoryview(self._dense)
            for start in range(0, self._blocks, size):
                yield view[start:start + size]
            return
        # (a copy of the dict, taken at once: the guest may write meanwhile)
        written = sorted(sparse.items())
        at = 0
        for start in range(0, self._blocks, size):
            piece = bytearray(min(size, self._blocks - start))
            while at < len(written) and written[at][0] < start + size:
                block, gen = written[at]
                piece[block - start] = gen
                at += 1
            yield piece

    def load(self, start, piece):
        """Set the blocks from ``start`` on to the bytes of ``piece``."""
        if start + len(piece) > self._blocks:
            raise IndexError('%d blocks from block %d of %d'
                             % (len(piece), start, self._blocks))
        if self._dense is None and piece.count(0) != len(piece):
            for found in _NONZERO.finditer(piece):
                self[start + found.start()] = piece[found.start()]
                if self._dense is not None:
                    break
        if self._dense is not None:
            self._dense[start:start + len(piece)] = array.array('B', piece)

    def __iter__(self):
        for piece in self.pieces():
            yield from bytes(piece)

    def __eq__(self, other):
        if not isinstance(other, Generations):
            return NotImplemented
        return len(self) == len(other) and all(
            bytes(a) == bytes(b) for a, b in zip(self.pieces(),
                                                 other.pieces()))

    __hash__ = None


class DiskModel:
    """What the guest believes one disk holds."""

    def __init__(self, index, blocks, generations=None):
        self.index = index
        self.gen = generations if generations is not None else \
            Generations(blocks)
        #: blocks bumped since :meth:`Workload.export_ahead` (None: not
        #: tracked)
        self.dirty = None

    @property
    def blocks(self):
        return len(self.gen)

    def bump(self, block):
        """The next generation of ``block``, remembered."""
        gen = self.gen[block] = self.gen[block] % 255 + 1
        dirty = self.dirty
        if dirty is not None:
            dirty.add(block)
        return gen

    def check(self, block, data):
        expected = self.gen[block]
        if bytes(data) != pattern(self.index, block, expected):
            raise GuestDataError(disk=self.index, block=block,
                                 offset=block * BLOCK,
                                 found=describe(data, self.index),
                                 expected=describe(
                                     pattern(self.index, block, expected),
                                     self.index))

    def to_primitive(self):
        # compressed a piece at a time, never whole (16 MiB for a 64 GiB
        # disk)
        deflate = zlib.compressobj(1)
        raw = [deflate.compress(piece) for piece in self.gen.pieces()]
        raw.append(deflate.flush())
        return {'index': self.index,
                'generations': base64.b64encode(b''.join(raw)).decode(
                    'ascii')}

    @classmethod
    def from_primitive(cls, data, blocks=None):
        """The model :meth:`to_primitive` encoded.

        It is inflated a piece at a time into the model, so that the
        model is never held twice (and twice over when ``blocks`` is not
        given: first to learn its size).

        :param blocks: the disk's blocks, when known: a model of another
            size is refused (ValueError), and never decompressed further.
        :raises ValueError: the model is cut short, or of another size.
        :raises zlib.error: it is not a compressed model.
        """
        raw = base64.b64decode(data['generations'])
        try:
            size = blocks
            if size is None:
                size = sum(len(piece) for piece in _inflated(raw))
            gen = Generations(size)
            at = 0
            for piece in _inflated(raw, size):
                if at + len(piece) > size:
                    raise ValueError('longer')
                gen.load(at, piece)
                at += len(piece)
            if at != size:
                raise ValueError('shorter')
        except ValueError:
            if blocks is None:
                raise ValueError('disk %s: the model is cut short'
                                 % data['index'])
            raise ValueError('disk %s: the model is not of %d blocks'
                             % (data['index'], blocks))
        return cls(data['index'], 0, gen)


def _inflated(raw, limit=None):
    """The pieces of the zlib stream ``raw``, at most ``limit`` + 1 bytes.

    :raises ValueError: the stream ends before its end, or goes on past
        ``limit`` bytes.
    """
    inflate = zlib.decompressobj()
    total = 0
    while not inflate.eof:
        room = INFLATE_PIECE if limit is None else \
            min(INFLATE_PIECE, limit + 1 - total)
        if room <= 0:
            break
        piece = inflate.decompress(raw, room)
        raw = inflate.unconsumed_tail
        if not piece and not raw:
            break                   # the stream ends before its end
        total += len(piece)
        yield piece
    if not inflate.eof:
        raise ValueError('not a whole model')


def fill(dev, model, fraction, rng=None):
    """Write a first generation into ``fraction`` of the disk's blocks.

    Writes in runs of up to 2 MiB so the layout has both data and holes.
    :returns: bytes written.
    """
    rng = rng or random.Random(model.index)
    written = 0
    run = 512                               # blocks: 2 MiB
    for first in range(0, model.blocks, run):
        if rng.random() >= fraction:
            continue
        stop = min(first + run, model.blocks)
        buf = bytearray()
        for b in range(first, stop):
            buf += pattern(model.index, b, model.bump(b))
        dev.pwrite(buf, first * BLOCK)
        written += len(buf)
    dev.flush()
    return written


def verify(dev, model, chunk=2 << 20):
    """Check every block of ``dev`` against ``model``.

    :raises GuestDataError: at the first block that differs.
    :returns: bytes verified.
    """
    per = chunk // BLOCK
    for first in range(0, model.blocks, per):
        stop = min(first + per, model.blocks)
        data = memoryview(dev.pread(first * BLOCK, (stop - first) * BLOCK))
        for b in range(first, stop):
            at = (b - first) * BLOCK
            model.check(b, data[at:at + BLOCK])
    return model.blocks * BLOCK


#: the key of a guest state whose models went ahead (:func:`stage`); its
#: value is how many
STAGED = 'staged_models'


def stage(ahead, sizes):
    """Decode the models :meth:`Workload.export_ahead` took.

    What the destination of a migration does with them before the
    switch-over's pause, so that the pause only swaps them in
    (:func:`swap_in`).

    :param sizes: the VM's disks' sizes in bytes, in order: one model per
        disk, of its size (no more is ever decompressed).
    :raises ValueError: ``ahead`` is not a list of encoded models of
        those disks.
    """
    if not isinstance(ahead, list) or len(ahead) != len(sizes):
        raise ValueError('expected a list of the %d disks\' models, got %s'
                         % (len(sizes), type(ahead).__name__ if not
                            isinstance(ahead, list) else
                            '%d models' % len(ahead)))
    try:
        return [DiskModel.from_primitive(m, size // BLOCK)
                for m, size in zip(ahead, sizes)]
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError('a disk model cannot be decoded: %s' % exc)


def swap_in(state, staged):
    """The models of a guest ``state``: its own, or the staged ones.

    :raises ValueError: the state left its models out (``STAGED``) and
        no models, or not as many, were staged.
    """
    if STAGED not in state:
        return [DiskModel.from_primitive(m) for m in state['models']]
    if staged is None or len(staged) != state[STAGED]:
        raise ValueError('the guest\'s state names %s staged disk models, '
                         '%s were staged' % (state[STAGED], 'none' if staged
                                             is None else len(staged)))
    return staged


class Workload:
    """One thread per disk that writes and reads back, verifying.

    :param devices: list of block devices, the VM's disks in order.
    :param models: one :class:`DiskModel` per device.
    :param rate: writes per second per disk (``None``: as fast as it can).
    :param read_ratio: reads per write.
    """

    def __init__(self, devices, models, rate=None, read_ratio=1.0,
                 seed=None):
        self.devices = list(devices)
        self.models = list(models)
        self.rate = rate
        self.read_ratio = read_ratio
        self._rng = random.Random(seed)
        self._lock = threading.Condition()
        self._run = threading.Event()
        self._stop = False
        self._suspend = False
        self._parked = 0
        self._threads = []
        self.writes = 0
        self.reads = 0
        self.error = None

    # -- life cycle --------------------------------------------------------

    def start(self):
        self._run.set()
        for dev, model in zip(self.devices, self.models):
            t = threading.Thread(target=self._loop, args=(dev, model),
                                 name='xsm-guest-%d' % model.index,
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self):
        with self._lock:
            self._stop = True
            self._suspend = False
            self._lock.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    @property
    def running(self):
        return bool(self._threads) and not self._stop

    def suspend(self, timeout=30):
        """Park every guest thread between two I/Os (pause the vCPUs)."""
        with self._lock:
            self._suspend = True
            self._lock.notify_all()     # (threads waiting to pace)
            if not self._lock.wait_for(
                    lambda: self._stop or
                    self._parked == len(self._threads), timeout):
                self._suspend = False
                self._lock.notify_all()
                raise exception.XSMError('the guest did not pause within '
                                         '%s s' % timeout)

    def resume(self):
        with self._lock:
            self._suspend = False
            self._lock.notify_all()

    def counters(self):
        with self._lock:
            return {'writes': self.writes, 'reads': self.reads,
                    'error': str(self.error) if self.error else None}

    # -- state that travels with the VM ------------------------------------

    def export_ahead(self):
        """The bulk of the guest's state, taken while the guest runs.

        As a hypervisor copies a VM's memory before it pauses it: the
        models (encoded as one byte per 4 KiB block, 16 MiB for a 64 GiB
        disk, tens of milliseconds to compress) are taken now, and the
        blocks written from now on are tracked, so that :meth:`export` in
        the pause only adds those.
        """
        for m in self.models:
            m.dirty = set()
        # (a block bumped while its array is compressed is in ``dirty``:
        # the pause's export sends its generation then)
        return [m.to_primitive() for m in self.models]

    def end_ahead(self):
        """Stop tracking the blocks written (see :meth:`export_ahead`)."""
        for m in self.models:
            m.dirty = None

    def export(self, ahead=None, staged=False):
        """The guest's state; call while suspended or stopped.

        :param ahead: what :meth:`export_ahead` returned; then only the
            blocks written since are added to it.
        :param staged: ``ahead`` went to the destination before the pause
            (:func:`stage`): it is left out (``STAGED`` says so).
        """
        state = {'rate': self.rate, 'read_ratio': self.read_ratio,
                 'writes': self.writes, 'reads': self.reads}
        if ahead is None:
            state['models'] = [m.to_primitive() for m in self.models]
            return state
        if staged:
            state[STAGED] = len(ahead)
        else:
            state['models'] = ahead
        state['changes'] = [[[b, m.gen[b]] for b in sorted(m.dirty or ())]
                            for m in self.models]
        return state

    @classmethod
    def from_state(cls, devices, state, staged=None):
        """The guest of ``state`` on ``devices``, not started.

        :param staged: the models :func:`stage` decoded from what
            :meth:`export_ahead` took, when ``state`` says it left them
            out (``STAGED``); they become this guest's.
        """
        models = swap_in(state, staged)
        for model, changes in zip(models, state.get('changes') or ()):
            for block, gen in changes:
                model.gen[block] = gen
        self = cls(devices, models, rate=state['rate'],
                   read_ratio=state['read_ratio'])
        self.writes, self.reads = state['writes'], state['reads']
        return self

    # -- the guest ---------------------------------------------------------

    def _park(self):
        with self._lock:
            if not self._suspend:
                return not self._stop
            self._parked += 1
            self._lock.notify_all()
            self._lock.wait_for(lambda: not self._suspend or self._stop)
            self._parked -= 1
            return not self._stop

    def _idle(self, seconds):
        """Wait between two I/Os; a pause (or a stop) ends it at once.

        A vCPU that waits for its next I/O is as good as parked: the
        switch-over's pause does not wait for the pacing (at 200 I/Os per
        second, up to 5 ms) before it can begin.
        """
        with self._lock:
            self._lock.wait_for(lambda: self._suspend or self._stop,
                                seconds)

    def _loop(self, dev, model):
        rng = random.Random(self._rng.random())
        interval = 1.0 / self.rate if self.rate else 0
        next_at = time.monotonic()
        try:
            while self._park():
                block = rng.randrange(model.blocks)
                dev.pwrite(pattern(model.index, block, model.bump(block)),
                           block * BLOCK)
                reads = int(self.read_ratio) + (
                    rng.random() < self.read_ratio % 1)
                for _ in range(reads):
                    b = rng.randrange(model.blocks)
                    model.check(b, dev.pread(b * BLOCK, BLOCK))
                with self._lock:
                    self.writes += 1
                    self.reads += reads
                if interval:
                    next_at = pace(next_at, interval, self._idle)
        except Exception as exc:
            LOG.error('guest workload on disk %d failed: %s', model.index,
                      exc)
            with self._lock:
                self.error = exc
                self._stop = True
                self._lock.notify_all()
