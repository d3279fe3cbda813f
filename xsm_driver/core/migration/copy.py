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

"""The sparse copier: allocated data only, several requests in flight.

:func:`copy_allocated` reads the allocated ranges of a source device and
writes them to a destination device with ``depth`` worker threads, each
holding one chunk at a time (memory stays under ``depth * chunk``). The
NBD client is thread-safe and pipelines requests from many threads, so a
remote destination sees up to ``depth`` writes in flight.

The destination may also be several devices that write the same disk --
several NBD connections to one export (or to one-shot exports of the same
device) -- and the workers then share them out (:func:`assign`): over TLS
one connection is one stream encrypted and decrypted by one thread at a
time, several use every core on both sides.

Plain threads, no eventlet: the copier runs inside the agent's data path.
"""

import logging
import mmap
import sys
import threading
import time

from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan

LOG = logging.getLogger(__name__)

CHUNK = 4 * 2 ** 20
DEPTH = 8


class Progress:
    """Bytes done out of a total, for one migration (thread-safe).

    :param total: bytes to copy.
    :param phase: the migration phase to report.
    :param clock: a monotonic clock (seconds); tests pass their own.
    """

    def __init__(self, total=0, phase=None, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._start = clock()
        self._end = None
        self._done = 0
        self._total = int(total)
        self._phase = phase

    def start(self):
        """Restart the clock (when the copy itself begins)."""
        with self._lock:
            self._start, self._end = self._clock(), None

    def stop(self):
        """Stop the clock: rate and elapsed time stay as they are now."""
        with self._lock:
            if self._end is None:
                self._end = self._clock()

    def add(self, n):
        with self._lock:
            self._done += n

    @property
    def done(self):
        with self._lock:
            return self._done

    @property
    def total(self):
        with self._lock:
            return self._total

    @total.setter
    def total(self, value):
        with self._lock:
            self._total = int(value)

    @property
    def phase(self):
        with self._lock:
            return self._phase

    @phase.setter
    def phase(self, value):
        with self._lock:
            self._phase = value

    def snapshot(self, now=None):
        """The progress as a dict of primitives.

        ``percent`` is 100.0 when there is nothing to copy; ``eta_s`` is
        None until something has been copied.
        """
        with self._lock:
            done, total, phase = self._done, self._total, self._phase
            end = self._end
        if end is None:
            end = self._clock() if now is None else now
        elapsed = max(0.0, end - self._start)
        percent = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
        return {'done': done, 'total': total, 'percent': percent,
                'rate_bytes_per_s': plan.rate(done, elapsed),
                'eta_s': plan.eta(done, total, elapsed), 'phase': phase,
                'elapsed_s': elapsed}


def _aborted(migration_id, reason='cancelled'):
    return errors.MigrationAborted(id=migration_id or '(copy)',
                                   reason=reason)


class TokenBucket:
    """Keep a byte stream under ``rate`` bytes per second.

    Callers :meth:`consume` what they are about to send and are held back
    as :func:`plan.pace_delay` says. Unused time earns credit for a burst
    of at most ``burst`` bytes (default: one second at the rate), so an
    idle spell is not followed by an unbounded burst.

    :param rate: bytes per second; None or 0 for no limit. It may be
        changed at run time (:attr:`rate`).
    :param migration_id: named in :class:`errors.MigrationAborted`.
    """

    SLICE = 0.1

    def __init__(self, rate, burst=None, migration_id=None,
                 clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._burst = burst
        self.migration_id = migration_id
        self._rate = rate
        self._start = clock()
        self._sent = 0
        self._generation = 0      # bumped when the rate changes

    @property
    def rate(self):
        return self._rate

    @rate.setter
    def rate(self, value):
        with self._lock:
            self._rate = value
            self._start, self._sent = self._clock(), 0
            self._generation += 1

    def _reserve(self, n):
        with self._lock:
            rate = self._rate
            if not rate:
                return 0.0, None
            now = self._clock()
            burst = self._burst if self._burst is not None else rate
            # Forget credit beyond the burst earned while idle.
            if (now - self._start) * rate - self._sent > burst:
                self._start = now - (self._sent + burst) / float(rate)
            self._sent += n
            return plan.pace_delay(self._sent, now - self._start,
                                   rate), now

    def consume(self, n, cancel=None):
        """Account for ``n`` bytes; wait until sending them keeps the rate.

        :param cancel: a :class:`threading.Event`; when set during the
            wait, :class:`errors.MigrationAborted` is raised at once.
        :returns: the seconds the pacing asked to wait (0.0 when none).
        """
        if cancel is not None and cancel.is_set():
            raise _aborted(self.migration_id)
        generation = self._generation
        delay, since = self._reserve(n)
        if delay <= 0:
            return 0.0
        deadline = since + delay
        while True:
            left = deadline - self._clock()
            if left <= 0 or self._generation != generation:
                # waited enough, or the rate changed: waits end at once
                # (a lifted limit frees every waiting sender)
                return delay
            if cancel is None:
                time.sleep(min(left, self.SLICE))
            elif cancel.wait(min(left, self.SLICE)):
                raise _aborted(self.migration_id)


class Buffers:
    """The copy buffers of one migration: at most ``count`` of ``size`` bytes.

    The memory bound of every copy that shares it (see
    :func:`copy_allocated`'s ``budget``). A buffer (an anonymous mapping)
    is made when first needed and then reused, so that a chunk costs no
    new memory to zero and fault in; it is unmapped when the last copy
    that shares it lets it go, so the agent does not keep what malloc's
    arenas of many copy threads would.

    :param count: buffers at most (held at once).
    :param size: bytes of each (the largest chunk).

    ``made`` counts the buffers made so far.
    """

    def __init__(self, count, size):
        if count < 1 or size < 1:
            raise ValueError('copy buffers: at least one of at least one '
                             'byte, not %r of %r' % (count, size))
        self.size = size
        self._units = threading.BoundedSemaphore(count)
        self._lock = threading.Lock()
        self._free = []
        self.made = 0

    def acquire(self, timeout=None):
        """Take one unit (the right to hold a buffer); False on timeout."""
        return self._units.acquire(timeout=timeout)

    def release(self):
        """Give back a unit taken with :meth:`acquire`."""
        self._units.release()

    def take(self, length):
        """A buffer of at least ``length`` bytes, for a holder of a unit."""
        if length > self.size:
            return bytearray(length)
        with self._lock:
            if self._free:
                return self._free.pop()
            self.made += 1
        # its own mapping: unmapped when dropped, whatever malloc keeps
        return mmap.mmap(-1, self.size)

    def give(self, buf):
        """Keep ``buf`` for the next :meth:`take` (nothing else holds it)."""
        if len(buf) == self.size:
            with self._lock:
                self._free.append(buf)


def shares(disks, units, depth, connections):
    """Connections and workers of the copy of each of ``disks`` disks.

    A disk's copy never has more requests in flight than the migration's
    ``units`` (its buffers), so when several disks share them, each gets
    fewer connections and workers: every one of them costs a TLS
    handshake, threads on both sides, and a thread that only waits for
    a buffer is a thread hand-off more per chunk. Each disk keeps at
    least one connection and twice its share of the units in workers (a
    worker reads while another's write is on the wire).

    Example: 8 disks, 8 units, depth 8, 4 connections: each disk 1
    connection and 2 workers; 1 disk: 4 connections and 8 workers.

    :returns: ``(connections, workers)`` per disk.
    """
    disks = max(1, disks)
    share = max(1, -(-units // disks))
    conns = max(1, min(connections, share))
    workers = max(conns, min(depth, 2 * share))
    return conns, workers


def _unheld(view, buf):
    """Release ``view``; whether nothing else holds ``buf`` now.

    A device that kept the data it was given (or a view of it) keeps the
    buffer: it is never reused.
    """
    # each: the caller's name, the name here and getrefcount's argument
    if sys.getrefcount(view) > 3:
        return False
    try:
        view.release()
    except BufferError:
        return False
    return sys.getrefcount(buf) <= 3


def assign(workers, devices):
    """Which device each worker writes to: as even a share as can be.

    :returns: a list of ``workers`` indexes into ``devices`` devices,
        round-robin (worker ``i`` writes to device ``i % devices``).
    """
    if devices < 1:
        raise ValueError('at least one destination device is needed, not '
                         '%r' % (devices,))
    return [i % devices for i in range(workers)]


def copy_allocated(src, dst, ranges=None, chunk=CHUNK, depth=DEPTH,
                   limiter=None, progress=None, cancel=None,
                   migration_id=None, budget=None):
    """Copy the allocated data of ``src`` into ``dst``; flush ``dst``.

    :param src: a :class:`~xsm_driver.core.block.device.BlockDevice`.
    :param dst: a writable block device that reads as zeros where the copy
        does not write (a new image, a sparse file, a fresh export); or a
        list of such devices that are views of the same disk (several
        connections to it): the workers share them out (:func:`assign`)
        and each is flushed at the end, so whatever one of them
        acknowledged is durable whatever its server's multi-connection
        semantics.
    :param ranges: ``(offset, length)`` to copy; default: the allocated
        extents of ``src`` (see :func:`plan.split_extents`). Ranges longer
        than ``chunk`` are cut.
    :param chunk: bytes per request.
    :param depth: requests in flight (worker threads).
    :param limiter: a :class:`TokenBucket`, or None.
    :param progress: a :class:`Progress`; its ``add`` is called after each
        chunk is written.
    :param cancel: a :class:`threading.Event`, checked between chunks.
    :param migration_id: named in :class:`errors.MigrationAborted`.
    :param budget: a :class:`Buffers` shared by the copies of one
        migration: a worker holds one of its units (and a buffer) from
        the read of a chunk until the chunk is written, so all of them
        together hold at most as many chunks as it has units (its memory
        bound); None: ``depth`` buffers of this copy's own. (A plain
        semaphore still bounds the chunks, each read into new memory.)
    :returns: bytes copied.
    :raises errors.MigrationAborted: ``cancel`` was set; every worker has
        stopped.
    :raises device.BlockError: the first error of ``src`` or ``dst``;
        every worker has stopped.
    """
    if depth < 1:
        raise ValueError('depth must be at least 1, not %r' % (depth,))
    dsts = list(dst) if isinstance(dst, (list, tuple)) else [dst]
    if not dsts:
        raise ValueError('at least one destination device is needed')
    if ranges is None:
        ranges = plan.split_extents(src.extents(0, src.size), chunk)
    else:
        ranges = plan.split_extents([(o, n, 0) for o, n in ranges], chunk)
    if progress is not None and not progress.total:
        progress.total = sum(n for _o, n in ranges)
    cancel = cancel if cancel is not None else threading.Event()
    if budget is None:
        budget = Buffers(depth, max([n for _o, n in ranges] or [1]))
    pool = budget if isinstance(budget, Buffers) else None
    stop = threading.Event()
    lock = threading.Lock()
    state = {'next': 0, 'copied': 0, 'error': None}

    def take():
        with lock:
            i = state['next']
            if i >= len(ranges):
                return None
            state['next'] = i + 1
            return ranges[i]

    def held():
        """Wait for a unit of ``budget``; False once stopped."""
        while not budget.acquire(timeout=0.1):
            if stop.is_set() or cancel.is_set():
                return False
        return True

    def work(out):
        try:
            while not stop.is_set() and not cancel.is_set():
                if not held():
                    return
                buf = None
                try:
                    item = take()
                    if item is None:
                        return
                    offset, length = item
                    if limiter is not None:
                        limiter.consume(length, cancel)
                    if pool is None:
                        data = src.pread(offset, length)
                    else:
                        buf = pool.take(length)
                        data = memoryview(buf)[:length]
                        src.read_into(data, offset)
                    if stop.is_set() or cancel.is_set():
                        return
                    out.pwrite(data, offset)
                    if buf is not None and _unheld(data, buf):
                        pool.give(buf)
                    del data
                finally:
                    buf = None
                    budget.release()
                with lock:
                    state['copied'] += length
                if progress is not None:
                    progress.add(length)
        except errors.MigrationAborted:
            stop.set()
        except BaseException as exc:
            with lock:
                if state['error'] is None:
                    state['error'] = (exc, cancel.is_set())
            stop.set()

    count = min(depth, len(ranges))
    workers = [threading.Thread(target=work, args=(dsts[d],), daemon=True,
                                name='xsm-copy-%d' % i)
               for i, d in enumerate(assign(count, len(dsts)))]
    LOG.debug('copying %d ranges (%d bytes) from %s to %s, %d in flight '
              'over %d connection(s)', len(ranges),
              sum(n for _o, n in ranges), src.name, dsts[0].name,
              len(workers), min(len(dsts), max(count, 1)))
    started = []
    try:
        for worker in workers:
            worker.start()
            started.append(worker)
        for worker in started:
            worker.join()
    except BaseException:
        # Whatever happens here (even an interrupt), no worker outlives us.
        stop.set()
        for worker in started:
            worker.join()
        raise
    error = state['error']
    if error is not None and not error[1]:
        raise error[0]
    if cancel.is_set():
        LOG.info('copy to %s cancelled after %d bytes', dsts[0].name,
                 state['copied'])
        raise _aborted(migration_id)
    if error is not None:
        raise error[0]
    for out in dsts:
        out.flush()
    return state['copied']
