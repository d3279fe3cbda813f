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

"""Filters stacked over a device at run time: gate, fence, mirror, counter.

None of them changes data. A migration stacks them over a VM's disk as
``Counter(Gate(Mirror(local, remote)))``: the gate pauses guest I/O for a
snapshot or the switch-over (and swaps the device under it), the mirror
completes each guest write only when both copies have it.
"""

import concurrent.futures
import contextlib
import errno
import logging
import threading
import time

from xsm_driver.core.block import device

LOG = logging.getLogger(__name__)


class _Admission(device.Filter):
    """A filter that admits each request and counts those inside.

    Subclasses decide, in :meth:`_admit` (called under ``self._cond``),
    whether a request may go in, and to which device.
    """

    def __init__(self, next_device):
        super().__init__(next_device)
        self._cond = threading.Condition()
        self._inflight = 0

    def _admit(self):
        """The device a request goes to; raise to refuse it."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _enter(self):
        with self._cond:
            target = self._admit()
            self._inflight += 1
        try:
            yield target
        finally:
            with self._cond:
                self._inflight -= 1
                if not self._inflight:
                    self._cond.notify_all()

    def pread(self, offset, length):
        with self._enter() as dev:
            return dev.pread(offset, length)

    def read_into(self, buf, offset):
        with self._enter() as dev:
            return dev.read_into(buf, offset)

    def pwrite(self, data, offset, fua=False):
        with self._enter() as dev:
            return dev.pwrite(data, offset, fua)

    def flush(self):
        with self._enter() as dev:
            return dev.flush()

    def trim(self, offset, length):
        with self._enter() as dev:
            return dev.trim(offset, length)

    def zero(self, offset, length, may_trim=False):
        with self._enter() as dev:
            return dev.zero(offset, length, may_trim)

    def extents(self, offset, length):
        with self._enter() as dev:
            return dev.extents(offset, length)


class Gate(_Admission):
    """Pause I/O, optionally swap the device underneath, resume.

    ``pause()`` holds new requests and waits until every request already
    inside has finished; ``resume(replacement)`` lets them go on, against
    ``replacement`` when one is given. No request fails because of a pause.
    """

    def __init__(self, next_device):
        super().__init__(next_device)
        self._paused = False

    def _admit(self):
        while self._paused:
            self._cond.wait()
        return self.next

    @property
    def paused(self):
        return self._paused

    def pause(self, timeout=None):
        """Hold new requests and wait for the in-flight ones.

        :param timeout: seconds to wait for in-flight requests; on expiry
            the gate reopens and :class:`device.BlockError` (ETIMEDOUT) is
            raised.
        :returns: how many seconds the wait took.
        """
        start = time.monotonic()
        with self._cond:
            if self._paused:
                raise device.BlockError(device=self.name, errno=errno.EBUSY,
                                        reason='the gate is already paused')
            self._paused = True
            if not self._cond.wait_for(lambda: not self._inflight, timeout):
                self._paused = False
                self._cond.notify_all()
                raise device.BlockError(
                    device=self.name, errno=errno.ETIMEDOUT,
                    reason='%d requests still in flight after %.1f s'
                    % (self._inflight, timeout))
        return time.monotonic() - start

    def resume(self, replacement=None):
        """Let requests go on, against ``replacement`` when given.

        :returns: the device that was replaced (or the current one).
        """
        with self._cond:
            if not self._paused:
                raise device.BlockError(device=self.name, errno=errno.EINVAL,
                                        reason='the gate is not paused')
            previous = self.next
            if replacement is not None:
                if replacement.size != previous.size:
                    self._paused = False
                    self._cond.notify_all()
                    raise device.BlockError(
                        device=self.name, errno=errno.EINVAL,
                        reason='replacement is %d bytes, not %d'
                        % (replacement.size, previous.size))
                self.next = replacement
            self._paused = False
            self._cond.notify_all()
        return previous

    @contextlib.contextmanager
    def paused_io(self, timeout=None):
        """``with gate.paused_io():`` -- I/O is held inside the block."""
        self.pause(timeout)
        try:
            yield
        finally:
            if self._paused:
                self.resume()


class Fence(_Admission):
    """Shut a device off for good, between two requests.

    :meth:`seal` waits for the requests already inside to finish and makes
    every later one fail at once with ``ESHUTDOWN``, without touching the
    device underneath. A migration's destination seals what its NBD
    exports serve before it composes: no write of a connection still open
    (a mirror's, a copy's) lands after that, whenever the connection's
    thread ends; the server itself can then be stopped later, out of the
    switch-over's pause.
    """

    def __init__(self, next_device):
        super().__init__(next_device)
        self._sealed = False

    def _admit(self):
        if self._sealed:
            raise device.BlockError(
                device=self.name, errno=errno.ESHUTDOWN,
                reason='the device was shut off (its migration '
                'switched over or was rolled back)')
        return self.next

    @property
    def sealed(self):
        return self._sealed

    def seal(self, timeout=None):
        """No request from now on; wait for the ones inside; idempotent.

        :param timeout: seconds to wait for the requests inside; on expiry
            :class:`device.BlockError` (ETIMEDOUT) is raised and the fence
            stays sealed (a request still inside may yet finish: the
            caller must not go on as if none could).
        :returns: how many seconds the wait took.
        """
        start = time.monotonic()
        with self._cond:
            self._sealed = True
            if not self._cond.wait_for(lambda: not self._inflight, timeout):
                raise device.BlockError(
                    device=self.name, errno=errno.ETIMEDOUT,
                    reason='%d requests still inside after %.1f s'
                    % (self._inflight, timeout))
        return time.monotonic() - start


class _RangeLock:
    """Serialise overlapping requests so both copies apply them in order."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held = []

    @contextlib.contextmanager
    def hold(self, offset, length):
        span = (offset, offset + max(length, 1))
        with self._cond:
            self._cond.wait_for(lambda: not any(
                a < span[1] and span[0] < b for a, b in self._held))
            self._held.append(span)
        try:
            yield
        finally:
            with self._cond:
                self._held.remove(span)
                self._cond.notify_all()


class Mirror(device.Filter):
    """Complete each write only when the local and the remote device have it.

    Reads are served locally. When the remote device fails (or takes longer
    than ``timeout``), the mirror drops it, records the error in
    :attr:`failure`, calls ``on_failure(error)`` once, and the guest's
    write still succeeds locally: the migration fails, the VM does not.
    Overlapping writes are serialised so both copies end up identical.

    The remote only ever gets requests aligned to ``align`` bytes (its
    leaf is a differencing image whose parent may still be being filled:
    a sub-sector write there would merge with stale parent data). An
    aligned write goes to both devices in parallel; an unaligned one is
    written locally first, then the aligned range that covers it is read
    back from the local device and written to the remote, all under the
    range lock of that aligned range. A zero or trim sends its aligned
    middle as a zero, and only its partial edge blocks as data.

    A remote that can send a write from the caller's thread (it has
    ``aio_pwrite(data, offset, fua, deadline)``, as
    :class:`~xsm_driver.core.block.nbd.NBDDevice` has) gets the guest's
    writes that way: the request leaves before the local write starts and
    the guest's thread waits for the reply itself, with no hand-off to and
    from a worker thread (each costs a wake-up and a turn at the GIL, a
    millisecond or more on a busy host). The send has the same deadline as
    the reply, so a remote that stopped reading cannot hold the guest
    longer than ``timeout`` either.

    :param local: the device the guest's data lives on.
    :param remote: the second device (usually an NBD client).
    :param on_failure: callable taking the exception, called once.
    :param timeout: seconds to wait for the remote before dropping it.
    :param workers: remote requests in flight at once.
    :param align: granularity of every request the remote gets.
    """

    def __init__(self, local, remote, on_failure=None, timeout=None,
                 workers=16, align=512):
        super().__init__(local)
        if align < 1:
            raise ValueError('align must be positive, not %r' % (align,))
        self._remote = remote
        self._on_failure = on_failure
        self._timeout = timeout
        self._align = align
        self._lock = threading.Lock()
        self._ranges = _RangeLock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix='xsm-mirror')
        self.failure = None

    @property
    def remote(self):
        return self._remote

    def detach(self):
        """Stop mirroring on purpose (no failure is reported).

        :returns: the remote device, which the caller still owns.
        """
        with self._lock:
            remote, self._remote = self._remote, None
        return remote

    def release(self):
        """Take the mirror out of a stack (call while I/O is paused).

        Stops mirroring and the mirror's threads without closing either
        device.

        :returns: ``(local, remote)``; ``remote`` is None when it was
            already detached or dropped. The caller owns both.
        """
        remote = self.detach()
        # Requests to the remote still running finish on their own (they
        # no longer matter); waiting for them would hold the paused guest.
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.next, remote

    def _drop(self, remote, exc):
        with self._lock:
            if self._remote is not remote:
                return
            self._remote = None
            self.failure = exc
        LOG.warning('%s: mirror to %s failed, mirroring stopped: %s',
                    self.name, getattr(remote, 'name', remote), exc)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:
                LOG.exception('%s: mirror failure callback failed',
                              self.name)

    def _wait_remote(self, remote, future):
        """Wait for a remote request; drop the remote if it fails."""
        try:
            future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            self._drop(remote, device.BlockError(
                device=getattr(remote, 'name', 'remote'),
                errno=errno.ETIMEDOUT,
                reason='no answer within %s s' % self._timeout))
        except Exception as exc:
            self._drop(remote, exc)

    def _deadline(self):
        return (None if self._timeout is None
                else time.monotonic() + self._timeout)

    @staticmethod
    def _sends_itself(remote, fua):
        """Whether ``remote`` can take a write from the guest's thread."""
        return (getattr(remote, 'aio_pwrite', None) is not None and
                (not fua or getattr(remote, 'can_fua', False)))

    def _send(self, remote, data, offset, fua, deadline):
        """Send a write to the remote now; None when it failed (dropped)."""
        try:
            return remote.aio_pwrite(data, offset, fua, deadline)
        except Exception as exc:
            self._drop(remote, exc)
            return None

    def _wait_sent(self, remote, sent, deadline):
        """Wait for a write :meth:`_send` sent; drop a failed remote.

        A remote that has not answered by ``deadline`` has failed too
        (``sent.wait`` raises ETIMEDOUT).
        """
        try:
            sent.wait(None if deadline is None
                      else max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            self._drop(remote, exc)

    def _pwrite_direct(self, remote, data, offset, length, fua):
        """A guest write mirrored from the guest's own thread."""
        start, end = self._span(offset, length)
        if start == offset and end == offset + length:
            with self._ranges.hold(offset, length):
                deadline = self._deadline()
                sent = self._send(remote, data, offset, fua, deadline)
                try:
                    return self.next.pwrite(data, offset, fua)
                finally:
                    if sent is not None:
                        self._wait_sent(remote, sent, deadline)
        with self._ranges.hold(start, end - start):
            local = self.next
            result = local.pwrite(data, offset, fua)
            deadline = self._deadline()
            try:
                block = local.pread(start, end - start)
            except Exception as exc:
                self._drop(remote, exc)
                return result
            sent = self._send(remote, block, start, fua, deadline)
            if sent is not None:
                self._wait_sent(remote, sent, deadline)
            return result

    def _both(self, call, offset=None, length=0):
        remote = self._remote
        if remote is None:
            return call(self.next)
        guard = (self._ranges.hold(offset, length) if offset is not None
                 else contextlib.nullcontext())
        with guard:
            future = self._pool.submit(call, remote)
            try:
                return call(self.next)
            finally:
                self._wait_remote(remote, future)

    def _span(self, offset, length):
        """The aligned range covering a request, clamped to the device."""
        a = self._align
        start = offset - offset % a
        # Past the end the local write fails before the remote is asked.
        end = min(-(-(offset + length) // a) * a,
                  max(self.size, offset + length))
        return start, end

    def _write(self, call, offset, length, remote_call):
        """Run a write locally and mirror it as aligned requests.

        :param call: ``call(dev)`` does the write on a device.
        :param remote_call: ``remote_call(remote, local, start, end)``
            sends the aligned range ``[start, end)`` to the remote once the
            local device has the write.
        """
        remote = self._remote
        if remote is None:
            return call(self.next)
        start, end = self._span(offset, length)
        if not length or (start == offset and end == offset + length):
            return self._both(call, offset, length)
        with self._ranges.hold(start, end - start):
            local = self.next
            result = call(local)
            future = self._pool.submit(remote_call, remote, local, start,
                                       end)
            self._wait_remote(remote, future)
            return result

    @staticmethod
    def _copy_back(remote, local, start, end, fua=False):
        remote.pwrite(local.pread(start, end - start), start, fua)

    def pwrite(self, data, offset, fua=False):
        length = len(memoryview(data).cast('B'))
        remote = self._remote
        if remote is None or offset < 0 or offset + length > self.size:
            # outside the disk: the local device refuses it, the remote
            # (and the migration) is left out of it
            return self.next.pwrite(data, offset, fua)
        if length and self._sends_itself(remote, fua):
            return self._pwrite_direct(remote, data, offset, length, fua)
        return self._write(
            lambda dev: dev.pwrite(data, offset, fua),
            offset, length,
            lambda remote, local, start, end: self._copy_back(
                remote, local, start, end, fua))

    def zero(self, offset, length, may_trim=False):
        def remote_call(remote, local, start, end):
            a = self._align
            inner_start = -(-offset // a) * a
            inner_end = (offset + length) // a * a
            if inner_end <= inner_start:
                return self._copy_back(remote, local, start, end)
            if start < inner_start:
                self._copy_back(remote, local, start, inner_start)
            remote.zero(inner_start, inner_end - inner_start, may_trim)
            if inner_end < end:
                self._copy_back(remote, local, inner_end, end)

        return self._write(lambda dev: dev.zero(offset, length, may_trim),
                           offset, length, remote_call)

    def trim(self, offset, length):
        # What a trim leaves behind differs from device to device; zeroing
        # both sides keeps the two copies identical.
        return self.zero(offset, length, may_trim=True)

    def flush(self):
        return self._both(lambda dev: dev.flush())

    def close(self):
        self._pool.shutdown(wait=True)
        super().close()


class Counter(device.Filter):
    """Count requests, bytes, in-flight requests and latencies.

    The latency histogram has a bucket per power of two microseconds:
    bucket ``i`` counts requests that took less than ``2**i`` us (the last
    bucket takes everything slower).
    """

    BUCKETS = 28

    def __init__(self, next_device):
        super().__init__(next_device)
        self._lock = threading.Lock()
        self._requests = {}
        self._bytes_read = 0
        self._bytes_written = 0
        self._errors = 0
        self._inflight = 0
        self._max_inflight = 0
        self._histogram = [0] * self.BUCKETS

    def _count(self, op, call, nread=0, nwritten=0):
        with self._lock:
            self._inflight += 1
            self._max_inflight = max(self._max_inflight, self._inflight)
        start = time.perf_counter()
        failed = True
        try:
            result = call()
            failed = False
            return result
        finally:
            micros = int((time.perf_counter() - start) * 1e6)
            bucket = min(micros.bit_length(), self.BUCKETS - 1)
            with self._lock:
                self._inflight -= 1
                self._requests[op] = self._requests.get(op, 0) + 1
                self._histogram[bucket] += 1
                if failed:
                    self._errors += 1
                else:
                    self._bytes_read += nread
                    self._bytes_written += nwritten

    def pread(self, offset, length):
        return self._count('read', lambda: self.next.pread(offset, length),
                           nread=length)

    def read_into(self, buf, offset):
        size = len(memoryview(buf).cast('B'))
        return self._count('read', lambda: self.next.read_into(buf, offset),
                           nread=size)

    def pwrite(self, data, offset, fua=False):
        size = len(memoryview(data).cast('B'))
        return self._count('write',
                           lambda: self.next.pwrite(data, offset, fua),
                           nwritten=size)

    def flush(self):
        return self._count('flush', self.next.flush)

    def trim(self, offset, length):
        return self._count('trim', lambda: self.next.trim(offset, length))

    def zero(self, offset, length, may_trim=False):
        return self._count('zero', lambda: self.next.zero(offset, length,
                                                          may_trim))

    def extents(self, offset, length):
        return self._count('extents',
                           lambda: self.next.extents(offset, length))

    def stats(self):
        """A snapshot of the counters as a dict of primitives."""
        with self._lock:
            return {
                'requests': dict(self._requests),
                'bytes_read': self._bytes_read,
                'bytes_written': self._bytes_written,
                'errors': self._errors,
                'in_flight': self._inflight,
                'max_in_flight': self._max_inflight,
                'latency_us_histogram': list(self._histogram),
            }
