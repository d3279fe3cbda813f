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

"""Copy a VDI out of a pool through xapi's NBD export, sparse.

``VDI.get_nbd_info`` lists where xapi exports a VDI over NBD: on every
host that can reach the VDI's SR and has a network with the ``nbd`` (TLS)
purpose, ``{address, port, cert, exportname, subject}``. We connect with
our own NBD client over TLS, trusting that host's certificate (``cert``)
only and checking it names ``subject``, and copy the allocated data
(``NBD_CMD_BLOCK_STATUS``, base:allocation) into a new VDI of a local SR.
When the server has no allocation map, every block is read; in any case
only data that is not all zeros is written, so the copy stays sparse
even from an export that reports every block as data.

xapi's NBD server (xapi-nbd) knows only NBD_OPT_EXPORT_NAME, ABORT, LIST
and STARTTLS (xapi-project/nbd lib/server.ml): our client then falls back
to NBD_OPT_EXPORT_NAME, without block status, and the whole disk is read
-- still written sparse. On a network with the ``insecure_nbd`` purpose
xapi-nbd serves in clear text and refuses STARTTLS (``NBD_REP_ERR_POLICY``):
the copy is refused with a message saying so, unless the operator allowed
clear text (``[xenapi]allow_insecure_nbd``).

The export name holds a xapi session reference, so it is never logged:
the device is renamed after the VDI.
"""

import logging
import ssl

import XenAPI

from xsm_driver.core.block import device
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.migration import copy as copy_mod
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import constants as nbd_c
from xsm_driver.core.xenapi import errors

LOG = logging.getLogger(__name__)


def tls_context(cert_pem):
    """A client context that trusts exactly the pool host's certificate.

    xapi's NBD server speaks TLS 1.2 or 1.3, so 1.2 is the minimum here
    (our own NBD channel between agents requires 1.3).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=cert_pem)
    # the host certificate itself is the trust anchor, CA or not
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


class SkipZeros(device.Filter):
    """Writes of all-zero data are dropped (the target reads as zeros).

    A write is looked at in pieces of ``granule`` bytes, aligned on the
    disk: only the runs of pieces that hold data are written, so a large
    request that is mostly zeros does not allocate the target's blocks
    around its data.

    :param granule: bytes; a power of two (64 KiB by default).
    """

    def __init__(self, next_device, granule=64 * 1024):
        super().__init__(next_device)
        self.granule = granule
        self._zeros = {}

    def _zero(self, n):
        zeros = self._zeros.get(n)
        if zeros is None:
            # requests are mostly of one size: keep a few and compare at
            # memcmp speed
            if len(self._zeros) > 8:
                self._zeros.clear()
            zeros = self._zeros[n] = bytes(n)
        return zeros

    def pwrite(self, data, offset, fua=False):
        if not isinstance(data, bytes):
            data = bytes(data)
        n = len(data)
        if data == self._zero(n):
            return
        if n <= self.granule:
            self.next.pwrite(data, offset, fua)
            return
        run = None                      # start of the current data run
        pos = 0
        while pos < n:
            end = min(n, pos + self.granule - (offset + pos) % self.granule)
            if data[pos:end] == self._zero(end - pos):
                if run is not None:
                    self.next.pwrite(data[run:pos], offset + run, fua)
                    run = None
            elif run is None:
                run = pos
            pos = end
        if run is not None:
            self.next.pwrite(data[run:], offset + run, fua)


def _redact(text, secrets):
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, '<export>')
    return text


def _clear_text_refused(vdi_uuid):
    return ('it serves VDI %s without TLS (its network has the '
            'insecure_nbd purpose): the disk would cross the network in '
            'clear text; give that network the nbd purpose instead ("xe '
            'network-param-add uuid=... param-name=purpose param-key=nbd"), '
            'or set [xenapi]allow_insecure_nbd = true' % vdi_uuid)


def _open(info, where, vdi_uuid, allow_insecure):
    """Connect with TLS; in clear text only where xapi-nbd has no TLS."""
    port = int(info.get('port') or 10809)
    client = nbd_client.Client(
        info['address'], port, info['exportname'],
        tls_context=tls_context(info['cert']),
        server_hostname=info.get('subject') or info['address'])
    try:
        return nbd_device.NBDDevice(client.connect())
    except nbd_client.TLSRefused as exc:
        # xapi-nbd answers STARTTLS with NBD_REP_ERR_POLICY on a clear-text
        # channel (xapi-project/nbd lib/server.ml, connect/generic_loop):
        # an insecure_nbd network (xapi_vdi.ml _get_nbd_info lists the
        # hosts of both nbd and insecure_nbd networks, alike)
        if exc.reply != nbd_c.NBD_REP_ERR_POLICY:
            raise
    if not allow_insecure:
        raise ValueError(_clear_text_refused(vdi_uuid))
    LOG.warning('%s serves VDI %s without TLS (insecure_nbd network): '
                'copying in clear text, as [xenapi]allow_insecure_nbd '
                'allows', where, vdi_uuid)
    return nbd_device.NBDDevice(nbd_client.Client(
        info['address'], port, info['exportname']).connect())


def connect(pool, vdi_ref, vdi_uuid, allow_insecure=False):
    """An :class:`NBDDevice` on the first NBD export of the VDI that works.

    :param allow_insecure: read an export without TLS (xapi-nbd on an
        ``insecure_nbd`` network); otherwise such an export is refused.
    :raises errors.XenAPIError: the VDI has no NBD export (no network of
        the pool has the ``nbd`` purpose), or none could be reached.
    """
    try:
        infos = pool.call('VDI.get_nbd_info', vdi_ref)
    except XenAPI.Failure as exc:
        raise errors.translate(exc.details, context='reading the NBD '
                               'export of VDI %s' % vdi_uuid)
    if not infos:
        raise errors.XenAPIError(
            code='NO_NBD_EXPORT', detail='VDI %s has no NBD export: give a '
            'network of the pool the nbd purpose ("xe network-param-add '
            'uuid=... param-name=purpose param-key=nbd") on a host that '
            'sees the SR' % vdi_uuid)
    failures = []
    for info in infos:
        where = '%s:%s' % (info.get('address'), info.get('port'))
        try:
            dev = _open(info, where, vdi_uuid, allow_insecure)
        except (device.BlockError, nbd_client.NBDError, ssl.SSLError,
                OSError, ValueError) as exc:
            failures.append('%s: %s' % (where, _redact(
                exc, [info.get('exportname')])))
            continue
        dev.name = 'nbd+tls://%s/%s' % (where, vdi_uuid)
        return dev
    raise errors.XenAPIError(
        code='NBD_UNREACHABLE', detail='cannot read VDI %s through xapi\'s '
        'NBD export: %s' % (vdi_uuid, '; '.join(failures)))


def copy_vdi(pool, vdi_ref, sr, name='', progress=None, cancel=None,
             chunk=copy_mod.CHUNK, depth=copy_mod.DEPTH, limiter=None,
             migration_id=None, allow_insecure=False):
    """Copy a pool's VDI into a new VDI of a local SR.

    :param pool: the :class:`~xsm_driver.core.xenapi.session.Pool`.
    :param vdi_ref: the VDI's reference in that pool.
    :param sr: a local :class:`~xsm_driver.core.sr.base.SR`.
    :returns: the uuid of the new VDI. On any error or cancel, the new
        VDI is destroyed again.
    """
    vdi_uuid = pool.call('VDI.get_uuid', vdi_ref)
    src = connect(pool, vdi_ref, vdi_uuid, allow_insecure=allow_insecure)
    new = None
    try:
        new = sr.create(src.size, name=name or vdi_uuid)
        dst = sr.attach(new.uuid, writable=True)
        try:
            ranges = None
            # Zeros are never written, whatever the server's map says:
            # an export that reports every block as data (or that has no
            # allocation map at all) still makes a sparse copy.
            target = SkipZeros(dst)
            if not src.client.has_allocation_map:
                LOG.info('%s has no allocation map: reading it all, '
                         'writing only non-zero blocks', src.name)
                ranges = [(0, src.size)]
            copied = copy_mod.copy_allocated(
                src, target, ranges=ranges, chunk=chunk, depth=depth,
                limiter=limiter, progress=progress, cancel=cancel,
                migration_id=migration_id)
            dst.flush()
        finally:
            dst.close()
        LOG.info('copied VDI %s into VDI %s of SR %s (%d bytes read)',
                 vdi_uuid, new.uuid, sr.name, copied)
        return new.uuid
    except BaseException:
        if new is not None:
            try:
                sr.destroy(new.uuid)
            except Exception as exc:
                LOG.error('cannot remove the partial copy %s from SR %s: '
                          '%s', new.uuid, sr.name, exc)
        raise
    finally:
        src.close()
