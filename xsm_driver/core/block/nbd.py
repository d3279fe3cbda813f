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

"""A remote NBD export used as a block device."""

import contextlib
import errno
import time

from xsm_driver.core.block import device
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as c


@contextlib.contextmanager
def _as_block_errors():
    try:
        yield
    except nbd_client.NBDError as exc:
        raise device.BlockError(str(exc), errno=exc.errno)


class PendingWrite:
    """A write sent by :meth:`NBDDevice.aio_pwrite`; ``wait()`` for it."""

    def __init__(self, name, pendings):
        self.name = name
        self._pendings = pendings

    def wait(self, timeout=None):
        """Wait for every reply.

        :param timeout: seconds in all (None: no limit).
        :raises device.BlockError: the server failed the write, the
            connection broke, or ``timeout`` expired (ETIMEDOUT, "no
            answer").
        """
        end = None if timeout is None else time.monotonic() + timeout
        with _as_block_errors():
            for pending in self._pendings:
                try:
                    pending.wait(None if end is None else
                                 max(0.0, end - time.monotonic()))
                except nbd_client.NBDError:
                    if pending.error is not None:
                        raise
                    raise device.BlockError(
                        device=self.name, errno=errno.ETIMEDOUT,
                        reason='no answer within %s s' % timeout)


class NBDDevice(device.BlockDevice):
    """An export of an NBD server (ours, qemu-nbd, nbdkit, xapi's).

    :param client: a connected :class:`~xsm_driver.core.nbd.client.Client`;
        the device owns it from now on.
    """

    can_extents = True

    def __init__(self, client):
        self.client = client
        self.name = client.name
        self.can_write = not client.can(c.NBD_FLAG_READ_ONLY)
        self.can_flush = client.can(c.NBD_FLAG_SEND_FLUSH)
        self.can_fua = client.can(c.NBD_FLAG_SEND_FUA)
        self.can_trim = client.can(c.NBD_FLAG_SEND_TRIM)
        self.can_zero = client.can(c.NBD_FLAG_SEND_WRITE_ZEROES)

    @classmethod
    def connect(cls, host, port, export='', **kwargs):
        """Connect to an export; ``kwargs`` go to the client."""
        with _as_block_errors():
            return cls(nbd_client.Client(host, port, export,
                                         **kwargs).connect())

    @property
    def size(self):
        return self.client.size

    def pread(self, offset, length):
        self.check_range(offset, length)
        with _as_block_errors():
            return self.client.pread(offset, length)

    def pwrite(self, data, offset, fua=False):
        with _as_block_errors():
            self.client.pwrite(data, offset, fua and self.can_fua)
            if fua and not self.can_fua and self.can_flush:
                self.client.flush()

    def aio_pwrite(self, data, offset, fua=False, deadline=None):
        """Send a write now, from the calling thread; wait for it later.

        The request is on its way (or has failed) when this returns, so
        the caller can do something else meanwhile (the mirror writes the
        local copy) and then :meth:`PendingWrite.wait` for the reply: no
        thread hand-off on the way out.

        :param deadline: ``time.monotonic()`` value past which the caller
            is not kept blocked by a send (a server that stopped reading):
            the connection is then failed and every request on it fails.
        :returns: a :class:`PendingWrite`.
        :raises device.BlockError: the write could not be sent.
        """
        if fua and not self.can_fua:
            raise device.BlockError(device=self.name, errno=errno.EOPNOTSUPP,
                                    reason='the export cannot do FUA writes')
        view = memoryview(data).cast('B')
        self.check_range(offset, len(view))
        client = self.client
        step = client.max_request
        with _as_block_errors():
            if len(view) <= step:
                sent = [client.aio_pwrite(view, offset, fua, deadline)]
            else:
                sent = [client.aio_pwrite(view[at:at + step], offset + at,
                                          fua, deadline)
                        for at in range(0, len(view), step)]
        return PendingWrite(self.name, sent)

    def flush(self):
        if self.can_flush:
            with _as_block_errors():
                self.client.flush()

    def trim(self, offset, length):
        if self.can_trim:
            with _as_block_errors():
                self.client.trim(offset, length)

    def zero(self, offset, length, may_trim=False):
        if not self.can_zero:
            return super().zero(offset, length, may_trim)
        with _as_block_errors():
            self.client.zero(offset, length, may_trim)

    def extents(self, offset, length):
        self.check_range(offset, length)
        out = []
        pos, end = offset, offset + length
        with _as_block_errors():
            while pos < end:
                described = self.client.block_status(pos, end - pos)
                if not described or not described[0][0]:
                    raise device.BlockError(
                        device=self.name, reason='the server described no '
                        'extent at offset %d' % pos)
                for size, flags in described:
                    size = min(size, end - pos)
                    out.append((pos, size, flags & (device.HOLE |
                                                    device.ZERO)))
                    pos += size
                    if pos >= end:
                        break
        return out

    def abort(self):
        """Drop the connection at once (see the client's ``abort``)."""
        self.client.abort()

    def close(self):
        self.client.close()
