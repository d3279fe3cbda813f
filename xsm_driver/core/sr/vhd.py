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

"""The ``vhd`` SR: a directory of VHD files, XenServer's file SR layout.

Every VDI is ``<uuid>.vhd``: a dynamic image, or a differencing image whose
parent is another VDI of the SR (the header's parent name is
``<parent uuid>.vhd``). Hidden is the footer's flag, read-only the file
mode (no write bits), as XenServer and :mod:`xsm_driver.core.vhd` do.

Crash safety of the two operations that move data between files: each
writes a journal (``.snapshot.<uuid>.journal``, ``.coalesce.<uuid>
.journal``) before its first change and removes it after its last; each
has one point of no return, a ``rename``. :meth:`VHDSR.recover` rolls an
operation interrupted before that rename back to exactly where it started,
and finishes one interrupted after it.

snapshot(V), with new base uuid B:

1. journal; record of B;
2. link ``V.vhd`` to ``B.vhd`` (one inode, two names);
3. mark the inode hidden;
4. build the new empty child of ``B.vhd`` in ``.V.vhd.snapshot.tmp``
   (this makes the inode read-only);
5. give the child V's mode (and hidden flag);
6. rename the child over ``V.vhd`` -- the point of no return;
7. remove the journal.

Rolled back (``B.vhd`` is still the same inode as ``V.vhd``): the temp
child and the link ``B.vhd`` are removed, V's hidden flag and mode are
restored. Finished (``B.vhd`` is another inode): B is made hidden and
read-only if it is not yet.

coalesce(V), parent P (P has no other child):

1. journal; mark V and P busy and drop the SR lock;
2. copy the sectors V wrote into ``P.vhd`` (``ops.coalesce``; V reads the
   same throughout, P's new data is only seen through V);
3. take the SR lock; give ``P.vhd`` V's footer uuid and hidden flag (so
   V's own children, which name V's uuid, find their parent) and V's mode;
4. rename ``P.vhd`` over ``V.vhd`` -- the point of no return;
5. remove P's record and the journal.

Rolled back (``P.vhd`` still exists): P gets its own footer uuid, hidden
flag and mode back; the data copied into P stays (V's sectors hide it).
Finished (``P.vhd`` is gone): P's record is dropped.
"""

import logging
import os

from xsm_driver.core.block import backends
from xsm_driver.core.sr import base
from xsm_driver.core.vhd import chain as vhd_chain
from xsm_driver.core.vhd import errors as vhd_errors
from xsm_driver.core.vhd import format as fmt
from xsm_driver.core.vhd import image as vhd_image
from xsm_driver.core.vhd import ops

LOG = logging.getLogger(__name__)


class VHDVolume(base.Volume, backends.VHDDevice):
    """A VHD chain attached from an SR; tells the SR when it is closed."""


class _FreshBase:
    """A receiving leaf's base opened again, for the compose to swap in."""

    def __init__(self, chain, image):
        self._chain, self._image = chain, image

    def swap(self):
        """The leaf reads through the finished base from now on."""
        image, self._image = self._image, None
        try:
            self._chain.replace_parents([image])
        except BaseException:
            image.close()
            raise

    def close(self):
        if self._image is not None:
            self._image.close()
            self._image = None


def _parent_uuid(img):
    """The parent VDI uuid a differencing image names, else None."""
    if img.type != fmt.TYPE_DIFF:
        return None
    return _parent_name_uuid(img.header.parent_name)


def _parent_name_uuid(name):
    return name[:-len('.vhd')] if name.endswith('.vhd') else name


def _allocated(img):
    """Bytes of data this image itself holds (its set sector bits)."""
    if img.bat is None:
        return img.size
    total = 0
    for block in img.allocated_blocks():
        if block * fmt.BLOCK_SIZE >= img.size:
            continue
        if img.is_full(block):
            total += fmt.BLOCK_SIZE
        else:
            total += img.bitmap(block).count('1') * fmt.SECTOR
    return total


def _base_name(name, uuid):
    return 'base of %s' % (name or uuid)


def _set_footer(path, hidden, uuid=None):
    """Give an image's footers ``hidden`` and ``uuid`` (16 bytes or None).

    Both copies are rewritten when either differs (a crash between the two
    writes of an earlier call leaves them different).
    """
    with base.write_permission(path):
        img = vhd_image.Image(path, writable=True)
        try:
            footer = img.footer
            uuid = footer.uuid if uuid is None else uuid
            same = footer.uuid == uuid and footer.hidden == hidden
            if same and (img.type == fmt.TYPE_FIXED or
                         img.read_raw(fmt.SECTOR, 0) == footer.pack()):
                return False
            footer.uuid = uuid
            footer.hidden = hidden
            img.write_footer(footer)
            img.flush()
            return True
        finally:
            img.close()


def _footer_uuid(path):
    img = vhd_image.Image(path)
    try:
        return img.footer.uuid
    finally:
        img.close()


class VHDSR(base.SR):
    """An SR of VHD files (the default driver)."""

    type = 'vhd'
    ext = 'vhd'

    # -- driver hooks ------------------------------------------------------

    def _check_size(self, size):
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise base.InvalidSize(sr=self.name, size=size,
                                   reason='expected a positive number of '
                                   'bytes')
        rounded = fmt.round_size(size)
        if not fmt.MIN_SIZE <= rounded <= fmt.MAX_SIZE:
            raise base.InvalidSize(sr=self.name, size=size,
                                   reason='a VHD holds 2 MiB to 2040 GiB')
        return rounded

    def _facts(self, uuid, path, record):
        img = vhd_image.Image(path)
        try:
            st = os.stat(path)
            return {'size': img.size, 'parent': _parent_uuid(img),
                    'read_only': not st.st_mode & 0o222,
                    'hidden': bool(img.footer.hidden),
                    'physical': st.st_blocks * 512,
                    'allocated': _allocated(img)}
        finally:
            img.close()

    def _parent_of(self, uuid, path):
        # (asked of every VDI of the SR: its header only, not its BAT)
        name = vhd_image.parent_name(path)
        if name is None:
            return None
        return _parent_name_uuid(name)

    def _build(self, uuid, path, size, hidden):
        tmp = self._tmp_path(uuid, 'new')
        base.remove(tmp)
        try:
            ops.create(tmp, size)
            if hidden:
                ops.set_hidden(tmp, True)
        except BaseException:
            base.remove(tmp)
            raise
        self._place(uuid, tmp, path)

    def _set_hidden(self, uuid, path, hidden):
        with base.write_permission(path):
            ops.set_hidden(path, hidden)

    def _open(self, uuid, path, writable, release):
        return VHDVolume(path, writable, release)

    def _chain_depth(self, uuid, path):
        try:
            return len(vhd_chain.resolve(path))
        except vhd_errors.ChainTooDeep:
            raise base.ChainTooDeep(sr=self.name, uuid=uuid,
                                    depth=base.MAX_CHAIN_DEPTH + 1,
                                    limit=base.MAX_CHAIN_DEPTH)
        except vhd_errors.VHDError as exc:
            raise base.SRError(sr=self.name, reason='VDI %s: its chain '
                               'cannot be opened: %s' % (uuid, exc))

    # -- journals ----------------------------------------------------------

    def _write_journal(self, journal):
        base.write_json(self._journal_path(journal['op'], journal['vdi']),
                        journal)

    def _drop_journal(self, journal):
        base.remove(self._journal_path(journal['op'], journal['vdi']))
        base.fsync_dir(self.path)

    def _recover_journals(self):
        lines = []
        for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
            if not (entry.name.startswith('.') and
                    entry.name.endswith(base.JOURNAL_SUFFIX)):
                continue
            journal = base.read_json(entry.path)
            try:
                op = journal['op']
                for key in ('vdi', 'base', 'parent'):
                    if key in journal:
                        journal[key] = self._check_uuid(journal[key])
                if entry.path != self._journal_path(op, journal['vdi']) or \
                        op not in ('snapshot', 'coalesce'):
                    raise ValueError(op)
            except (TypeError, KeyError, ValueError, base.InvalidName):
                base.remove(entry.path)
                lines.append('removed unusable journal %s' % entry.path)
                continue
            if journal['vdi'] in self._busy:
                continue            # running in this process right now
            try:
                recover = self._recover_snapshot if op == 'snapshot' else \
                    self._recover_coalesce
                lines.append(recover(journal)[1])
            except Exception as exc:
                LOG.exception('SR %s: cannot recover %s', self.name,
                              entry.path)
                lines.append('could not recover the interrupted %s of VDI '
                             '%s (journal %s kept): %s'
                             % (op, journal['vdi'], entry.path, exc))
        return lines

    # -- snapshot ----------------------------------------------------------

    def snapshot(self, uuid):
        uuid = self._check_uuid(uuid)
        with self._locked():
            vdi = self.get(uuid)
            # A writer may be open: the caller has paused and flushed it,
            # and replaces it after (see SR.attach).
            self._check_idle(uuid, 'snapshot', writers=False)
            children = self._children(uuid)
            if children:
                raise base.VDIInUse(sr=self.name, uuid=uuid,
                                    reason='VDIs %s have it as parent; only '
                                    'a leaf can be snapshotted'
                                    % ', '.join(children))
            path = self.vdi_path(uuid)
            depth = self._chain_depth(uuid, path) + 1
            if depth > base.MAX_CHAIN_DEPTH:
                raise base.ChainTooDeep(sr=self.name, uuid=uuid, depth=depth,
                                        limit=base.MAX_CHAIN_DEPTH)
            journal = {'op': 'snapshot', 'vdi': uuid,
                       'base': self._new_uuid(), 'mode': base.mode_of(path),
                       'hidden': vdi.hidden, 'name': vdi.name}
            try:
                self._write_journal(journal)
                self._snapshot(journal)
            except BaseException as exc:
                done = self._undo(journal, self._recover_snapshot, exc)
                if not done or not isinstance(exc, Exception):
                    if isinstance(exc, Exception):
                        raise self._error('snapshot', uuid, exc)
                    raise
        LOG.info('SR %s: snapshot of VDI %s: its data is now in base %s',
                 self.name, uuid, journal['base'])
        return self.get(journal['base'])

    def _snapshot(self, journal):
        uuid, base_uuid = journal['vdi'], journal['base']
        path, base_path = self.vdi_path(uuid), self.vdi_path(base_uuid)
        tmp = self._tmp_path(uuid, 'snapshot')
        self._write_record(base_uuid, name=_base_name(journal['name'], uuid),
                           vm=None)
        os.link(path, base_path)
        if not journal['hidden']:
            with base.write_permission(base_path):
                ops.set_hidden(base_path, True)
        base.remove(tmp)
        ops.snapshot(tmp, base_path)
        if journal['hidden']:
            ops.set_hidden(tmp, True)
        os.chmod(tmp, journal['mode'])
        base.fsync_dir(self.path)
        os.rename(tmp, path)
        base.fsync_dir(self.path)
        self._drop_journal(journal)

    def _recover_snapshot(self, journal):
        uuid, base_uuid = journal['vdi'], journal['base']
        path, base_path = self.vdi_path(uuid), self.vdi_path(base_uuid)
        base.remove(self._tmp_path(uuid, 'snapshot'))
        if not os.path.exists(base_path):
            self._drop_record(base_uuid)
            self._drop_journal(journal)
            return False, ('rolled back the interrupted snapshot of VDI %s: '
                           'nothing had changed yet' % uuid)
        if os.path.exists(path) and os.path.samefile(path, base_path):
            # Before the point of no return: undo.
            _set_footer(path, int(journal['hidden']))
            os.chmod(path, journal['mode'])
            os.unlink(base_path)
            base.fsync_dir(self.path)
            self._drop_record(base_uuid)
            self._drop_journal(journal)
            return False, ('rolled back the interrupted snapshot of VDI %s: '
                           'removed %s, a second link to its file'
                           % (uuid, base_path))
        # Past the point of no return: finish.
        if not vhd_image.is_read_only(base_path) or \
                not self.get(base_uuid).hidden:
            with base.write_permission(base_path):
                ops.set_hidden(base_path, True)
            vhd_image.make_read_only(base_path)
        if not self._read_record(base_uuid):
            self._write_record(base_uuid, vm=None, name=_base_name(
                journal.get('name'), uuid))
        self._drop_journal(journal)
        return True, ('finished the interrupted snapshot of VDI %s: its base '
                      'is %s' % (uuid, base_uuid))

    def _undo(self, journal, recover, exc):
        """Roll back (or finish) a failed operation.

        :returns: True when the operation turned out complete (it failed
            after its point of no return and is now finished).
        """
        try:
            done, line = recover(journal)
        except Exception:
            LOG.exception('SR %s: cannot undo the failed %s of VDI %s; '
                          'recover() will retry', self.name, journal['op'],
                          journal['vdi'])
            return False
        LOG.warning('SR %s: %s failed (%s); %s', self.name, journal['op'],
                    exc, line)
        return done

    # -- coalesce ----------------------------------------------------------

    def coalesce(self, uuid):
        uuid = self._check_uuid(uuid)
        with self._locked():
            journal = self._prepare_coalesce(uuid)
            self._busy.update((uuid, journal['parent']))
        try:
            try:
                with self._locked():
                    self._write_journal(journal)
                parent_path = self.vdi_path(journal['parent'])
                with base.write_permission(parent_path):
                    ops.coalesce(self.vdi_path(uuid))
                with self._locked():
                    self._commit_coalesce(journal)
            except BaseException as exc:
                with self._locked():
                    done = self._undo(journal, self._recover_coalesce, exc)
                if not done or not isinstance(exc, Exception):
                    if isinstance(exc, Exception):
                        raise self._error('coalesce', uuid, exc)
                    raise
        finally:
            with self._mutex:
                self._busy.difference_update((uuid, journal['parent']))
        LOG.info('SR %s: coalesced VDI %s into its parent %s, which took its '
                 'place', self.name, uuid, journal['parent'])
        return self.get(uuid)

    def _prepare_coalesce(self, uuid):
        vdi = self.get(uuid)
        if vdi.parent is None:
            raise base.SRError(sr=self.name, reason='VDI %s has no parent to '
                               'coalesce into' % uuid)
        self._check_idle(uuid, 'coalesce')
        try:
            parent = self.get(vdi.parent)
        except (base.VDINotFound, base.InvalidName):
            raise base.SRError(sr=self.name, reason='VDI %s: its parent %s is '
                               'not in the SR' % (uuid, vdi.parent))
        # The parent may still be open by the writer from before the
        # snapshot (flushed, idle): coalesce never needs it to be closed.
        self._check_idle(parent.uuid, 'coalesce into', writers=False)
        others = [c for c in self._children(parent.uuid) if c != uuid]
        if others:
            raise base.VDIInUse(sr=self.name, uuid=parent.uuid,
                                reason='VDIs %s also have it as parent; '
                                'coalescing %s into it would change them'
                                % (', '.join(others), uuid))
        if vdi.size > parent.size:
            raise base.SRError(sr=self.name, reason='VDI %s (%d bytes) is '
                               'larger than its parent %s (%d bytes)'
                               % (uuid, vdi.size, parent.uuid, parent.size))
        path, parent_path = self.vdi_path(uuid), self.vdi_path(parent.uuid)
        self._chain_depth(uuid, path)   # the chain must open
        journal = {'op': 'coalesce', 'vdi': uuid, 'parent': parent.uuid,
                   'vdi_uuid': _footer_uuid(path).hex(),
                   'vdi_mode': base.mode_of(path), 'vdi_hidden': vdi.hidden,
                   'parent_uuid': _footer_uuid(parent_path).hex(),
                   'parent_mode': base.mode_of(parent_path),
                   'parent_hidden': parent.hidden}
        return journal

    def _commit_coalesce(self, journal):
        path = self.vdi_path(journal['vdi'])
        parent_path = self.vdi_path(journal['parent'])
        _set_footer(parent_path, int(journal['vdi_hidden']),
                    bytes.fromhex(journal['vdi_uuid']))
        os.chmod(parent_path, journal['vdi_mode'])
        base.fsync_dir(self.path)
        os.rename(parent_path, path)
        base.fsync_dir(self.path)
        self._drop_record(journal['parent'])
        self._drop_journal(journal)

    def _recover_coalesce(self, journal):
        uuid, parent = journal['vdi'], journal['parent']
        parent_path = self.vdi_path(parent)
        if os.path.exists(parent_path):
            # Before the point of no return: undo.
            _set_footer(parent_path, int(journal['parent_hidden']),
                        bytes.fromhex(journal['parent_uuid']))
            os.chmod(parent_path, journal['parent_mode'])
            self._drop_journal(journal)
            return False, ('rolled back the interrupted coalesce of VDI %s: '
                           '%s is its parent again' % (uuid, parent))
        self._drop_record(parent)
        self._drop_journal(journal)
        return True, ('finished the interrupted coalesce of VDI %s: its '
                      'parent %s took its place' % (uuid, parent))

    # -- receive -----------------------------------------------------------

    def receive(self, size, name='', vm=None):
        """A dynamic base and a differencing leaf over it, both writable.

        The leaf reads through the base it opened; base data written after
        that may not show through the leaf until :meth:`Receiver.compose`.
        Leaf writes must cover whole sectors (EINVAL otherwise).
        """
        size = self._check_size(size)
        name = self._check_label('VDI name', name)
        vm = self._check_label('VM uuid', vm, optional=True)
        created, devices = [], []
        try:
            base_vdi = self.create(size, name=_base_name(name, 'a migration'),
                                   hidden=True)
            created.append(base_vdi.uuid)
            base_path = self.vdi_path(base_vdi.uuid)
            with self._locked():
                leaf = self._new_uuid()
                path, tmp = self.vdi_path(leaf), self._tmp_path(leaf, 'new')
                self._write_record(leaf, name=name, vm=vm)
                created.append(leaf)
                base.remove(tmp)
                mode = base.mode_of(base_path)
                try:
                    ops.snapshot(tmp, base_path)
                finally:
                    os.chmod(base_path, mode)   # the copy writes the base
                self._place(leaf, tmp, path)
                for uuid in created:
                    release = self._attached(uuid)
                    try:
                        devices.append(self._open(uuid, self.vdi_path(uuid),
                                                  True, release))
                    except BaseException:
                        release()
                        raise
        except BaseException as exc:
            for dev in devices:
                dev.close()
            for uuid in reversed(created):
                try:
                    self.destroy(uuid)
                except Exception:
                    LOG.exception('SR %s: cannot remove VDI %s of a failed '
                                  'receive', self.name, uuid)
            if isinstance(exc, Exception):
                raise self._error('receive into', created[-1] if created
                                  else 'new', exc)
            raise
        # The base receives the bulk copy: its data goes to the disk with
        # O_DIRECT, not through the page cache (see enable_direct_writes).
        devices[0].chain.leaf.enable_direct_writes()
        LOG.info('SR %s: receiving into VDI %s over base %s', self.name,
                 leaf, created[0])
        return base.Receiver(self, devices[0], base.AlignedWrites(devices[1]),
                             leaf, created, finish=self._finish_receive,
                             finish_base=self._finish_base)

    def _finish_base(self, receiver):
        """What :meth:`_finish_receive` does, before the compose.

        The base's device is closed: nothing writes the base any more, so
        it is made hidden and read-only now, and the leaf's header records
        the base's final mtime (its header alone: the leaf is open, taking
        mirrored writes). The base is opened again, read-only, with the
        BAT the copy left: the open leaf reads through it once the compose
        swaps it in (:class:`_FreshBase`).
        """
        base_uuid, leaf = receiver.vdis[0], receiver.leaf_uuid
        base_path, path = self.vdi_path(base_uuid), self.vdi_path(leaf)
        with self._locked():
            try:
                self._seal_base(base_uuid, base_path)
                ops.refresh_parent_timestamp(path, base_path, durable=False)
                fresh = vhd_image.Image(base_path)
            except Exception as exc:
                raise self._error('compose', leaf, exc)
        return _FreshBase(receiver.leaf.next.chain, fresh)

    def _seal_base(self, base_uuid, base_path):
        """Make a received base hidden and read-only (lock held).

        (Its footer only is read: a full opening costs with its size, and
        this may run in the switch-over's pause.)
        """
        if not vhd_image.read_footer(base_path).hidden:
            self._set_hidden(base_uuid, base_path, True)
        vhd_image.make_read_only(base_path)

    def _finish_receive(self, receiver, durable=True):
        """Make the composed leaf a normal VDI over its base.

        :param durable: False: no ``fsync`` (see ``Receiver.compose``).
        """
        base_uuid, leaf = receiver.vdis[0], receiver.leaf_uuid
        base_path, path = self.vdi_path(base_uuid), self.vdi_path(leaf)
        with self._locked():
            try:
                self._seal_base(base_uuid, base_path)
                # The leaf recorded the base's mtime when it was made; the
                # copy has changed it since.
                ops.set_parent(path, base_path, durable=durable)
                if durable:
                    base.fsync_dir(self.path)
            except Exception as exc:
                raise self._error('compose', leaf, exc)
