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

"""The storage repository interface and what every file-based SR shares.

An SR is a directory of VDI files, one file a VDI, named ``<uuid>.<ext>``
(``vhd`` or ``raw``). Everything the file itself can tell (virtual size,
parent, hidden, read-only, allocation) is read from the file every time, so
the listing never disagrees with the files. What a file cannot tell (the
VDI's name and the VM it belongs to; for raw files also the hidden flag) is
kept in a small JSON sidecar ``<uuid>.json``, replaced atomically. A file
without a sidecar lists with an empty name; a sidecar without a file never
lists and :meth:`SR.recover` drops it.

Names starting with ``.`` are the SR's own: the lock file ``.lock``,
journals of interrupted operations (``.<op>.<uuid>.journal``) and temporary
files (``.*.tmp``); listings ignore them.

Locking: every change takes the SR lock (a thread lock and an ``flock`` on
``.lock``, so two processes never change one SR at once). Reads take no
lock; every state a change passes through reads as a valid VDI. A long
``coalesce`` drops the lock while it copies data and marks its two VDIs busy
instead, so that snapshots of other VDIs (which pause a guest) never wait
for it.
"""

import abc
import collections
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
import threading
import uuid as uuidlib

from xsm_driver.core.block import device
from xsm_driver.core import exception

LOG = logging.getLogger(__name__)

SECTOR = 512
MAX_CHAIN_DEPTH = 30
_SR_NAME = re.compile(r'[A-Za-z0-9_.-]{1,64}')
_UUID = re.compile(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
                   r'[0-9a-f]{12}')
_MAX_LABEL = 255
LOCK_NAME = '.lock'
JOURNAL_SUFFIX = '.journal'


class Volume:
    """Mixin of an attached VDI's device: ``release()`` runs once, at close.

    Put it before the device class: ``class V(Volume, backends.RawDevice)``.
    """

    def __init__(self, path, writable, release):
        super().__init__(path, writable=writable)
        self._release = release

    def close(self):
        try:
            super().close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class _Unset:
    def __repr__(self):
        return '<not given>'


#: Default of arguments where ``None`` is a value (``update(vm=None)``).
UNSET = _Unset()


@dataclasses.dataclass
class VDI:
    """A virtual disk of an SR, as its file and record describe it."""

    uuid: str
    name: str
    size: int                 # virtual size, bytes
    parent: str | None        # parent VDI uuid (None for a base or raw)
    read_only: bool
    hidden: bool
    vm: str | None            # uuid of the VM the disk belongs to
    sr: str                   # SR name
    type: str                 # 'vhd' or 'raw'
    physical: int             # bytes the file takes on disk
    allocated: int            # bytes of data this image itself holds

    def to_dict(self):
        """The VDI as a dict of primitives (for RPC and JSON)."""
        return dataclasses.asdict(self)


# -- errors -------------------------------------------------------------------

class SRError(exception.XSMError):
    """Base of every storage repository error."""

    msg_fmt = "SR %(sr)s: %(reason)s"


class VDINotFound(SRError):
    msg_fmt = "SR %(sr)s: VDI %(uuid)s not found (no file %(path)s)"


class VDIExists(SRError):
    msg_fmt = "SR %(sr)s: VDI %(uuid)s already exists (%(path)s)"


class InvalidName(SRError):
    """A uuid, name or path that is malformed or would leave the SR."""

    msg_fmt = "SR %(sr)s: invalid %(what)s %(value)r: %(reason)s"


class VDIInUse(SRError):
    msg_fmt = "SR %(sr)s: VDI %(uuid)s is in use: %(reason)s"


class NotSupported(SRError):
    msg_fmt = "SR %(sr)s (%(type)s): %(reason)s"


class VDIReadOnly(SRError):
    msg_fmt = ("SR %(sr)s: VDI %(uuid)s (%(path)s) is read-only (a snapshot "
               "parent or a read-only disk); %(reason)s")


class InvalidSize(SRError):
    msg_fmt = "SR %(sr)s: invalid virtual size %(size)r: %(reason)s"


class ChainTooDeep(SRError):
    msg_fmt = ("SR %(sr)s: VDI %(uuid)s: the chain would be %(depth)d "
               "images deep; the limit is %(limit)d (XenServer: "
               "SR_BACKEND_FAILURE_109, snapshot chain too long); coalesce "
               "the chain first")


# -- small file helpers -------------------------------------------------------

def fsync_dir(path):
    """Make a directory's entries (renames, links, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, data):
    """Replace ``path`` with ``data`` as JSON: temp file, fsync, rename."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % name, suffix='.tmp',
                               dir=folder)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def read_json(path):
    """The JSON object in ``path``; None when missing or unreadable."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        LOG.warning('%s: unreadable, ignored: %s', path, exc)
        return None
    return data if isinstance(data, dict) else None


def remove(path):
    """Unlink ``path``; True when it existed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def write_permission(path):
    """Let this process open ``path`` for writing for a while.

    Read-only VDIs have no write bits; root may open them anyway, anybody
    else gets ``u+w`` for the duration, and the mode back afterwards.
    """
    if os.access(path, os.W_OK):
        yield
        return
    mode = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        os.chmod(path, mode)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- the migration destination ------------------------------------------------

class AlignedWrites(device.Filter):
    """Refuse (EINVAL) writes that do not cover whole 512-byte sectors.

    A receiving leaf cannot merge a partial sector with base data that may
    not have arrived yet, so every driver's leaf refuses such writes; the
    mirror sends whole sectors.
    """

    def _check(self, offset, length):
        self.check_range(offset, length)
        if offset % SECTOR or length % SECTOR:
            raise device.BlockError(
                device=self.name, errno=errno.EINVAL,
                reason='write of %d bytes at %d is not whole 512-byte '
                'sectors; writes to a receiving leaf must be aligned'
                % (length, offset))

    def pwrite(self, data, offset, fua=False):
        view = memoryview(data).cast('B')
        self._check(offset, len(view))
        return self.next.pwrite(view, offset, fua)

    def zero(self, offset, length, may_trim=False):
        self._check(offset, length)
        return self.next.zero(offset, length, may_trim)


class Receiver:
    """What a migration destination writes into.

    ``base`` receives the copy of the frozen source data, ``leaf`` the
    mirrored guest writes; a sector written through ``leaf`` always wins
    over ``base``, whatever order the two arrive in.

    :param sr: the SR that made it.
    :param base: the device the copy writes.
    :param leaf: the device mirrored writes go to.
    :param leaf_uuid: the VDI the VM will use.
    :param vdis: uuids of every VDI made for it, in creation order.
    :param finish: called (with the receiver, and ``durable``) by
        :meth:`compose` after the devices are closed, to make the result a
        normal VDI of the SR.
    :param finish_base: called (with the receiver) by :meth:`finish_base`
        once the base's device is closed: makes the base what the compose
        would, while the leaf still takes writes, and returns an object
        whose ``swap()`` makes the open leaf read the finished base and
        whose ``close()`` drops it unused; None where the SR cannot.
    """

    def __init__(self, sr, base, leaf, leaf_uuid, vdis, finish=None,
                 finish_base=None):
        self.sr = sr
        self.base = base
        self.leaf = leaf
        self.leaf_uuid = leaf_uuid
        self.vdis = list(vdis)
        self._finish = finish
        self._finish_base = finish_base
        self._lock = threading.Lock()
        self._closed = False
        self._base_closed = False
        self._close_error = None
        self._composed = False
        self._discarded = False
        #: composed with ``durable=False``: :meth:`make_durable` is owed
        self._owed = False
        #: what :meth:`finish_base` returned, until the compose uses it
        self._ahead = None
        #: composed with ``keep_leaf``: the leaf's device, open, for
        #: :meth:`take_leaf`
        self._kept = None

    def _close_devices(self, flush):
        """Flush (when asked) and close both devices, once."""
        if self._closed:
            return self._close_error
        error = None
        devices = (self.leaf,) if self._base_closed else (self.leaf,
                                                          self.base)
        for dev in devices:
            try:
                if flush:
                    dev.flush()
            except Exception as exc:
                error = error or exc
            try:
                dev.close()
            except Exception as exc:
                error = error or exc
        self._closed = self._base_closed = True
        self._close_error = error
        return error

    def finish_base(self):
        """The copy is done: finish the base ahead of the compose.

        The base's device is flushed (durable) and closed; where the SR can
        (``finish_base`` given) the base becomes now what the compose would
        make of it, while the leaf still takes the mirrored writes, so that
        a compose with ``keep_leaf`` opens no image and reads no BAT.
        Idempotent.

        :raises SRError: the base cannot be flushed, closed or finished;
            the receiver can still be discarded.
        """
        with self._lock:
            if self._discarded or self._composed or self._base_closed:
                return
            try:
                self.base.flush()
                self.base.close()
            except Exception as exc:
                raise SRError(sr=self.sr.name, reason='cannot flush the base '
                              'of VDI %s: %s' % (self.leaf_uuid, exc))
            self._base_closed = True
            if self._finish_base is not None:
                self._ahead = self._finish_base(self)

    def take_leaf(self):
        """The leaf's device a compose with ``keep_leaf`` left open.

        It is the caller's from here (its ``close`` releases the VDI, as
        an attached VDI's does), reading and writing the composed VDI.

        :returns: the device, or None (none was kept, or it was taken).
        """
        with self._lock:
            kept, self._kept = self._kept, None
            return kept

    def compose(self, durable=True, describe=True, keep_leaf=False):
        """Finish: flush and close both devices; return the leaf VDI.

        Afterwards the leaf VDI reads exactly what leaf-over-base read.
        Calling it again returns the VDI again.

        :param durable: False: write everything but make none of it
            durable (no ``fsync``); the caller calls :meth:`make_durable`
            later. For a migration's commit, whose journal redoes the
            compose after a crash until it records the migration done.
        :param describe: False: return None, not the VDI (whose record
            costs an opening of its image; :attr:`leaf_uuid` names it).
        :param keep_leaf: with ``durable=False``, after :meth:`finish_base`
            (else ignored): the leaf's device stays open, reading the
            finished base, for :meth:`take_leaf`.
        """
        with self._lock:
            if self._discarded:
                raise SRError(sr=self.sr.name, reason='receiver of VDI %s '
                              'was discarded; nothing to compose'
                              % self.leaf_uuid)
            if not self._composed:
                ahead, self._ahead = self._ahead, None
                if ahead is not None and keep_leaf and not durable:
                    ahead.swap()
                    self._closed = True
                    # (the device under the receiving leaf's alignment
                    # check: the composed VDI takes any write)
                    self._kept = getattr(self.leaf, 'next', self.leaf)
                else:
                    if ahead is not None:
                        ahead.close()
                    error = self._close_devices(flush=durable)
                    if error is not None:
                        raise SRError(sr=self.sr.name, reason='cannot '
                                      'compose VDI %s: flushing its devices '
                                      'failed: %s' % (self.leaf_uuid, error))
                    # (the base was finished ahead: only the durability
                    # is left to do, which the full finish does)
                    if self._finish is not None and (ahead is None or
                                                     durable):
                        self._finish(self, durable=durable)
                self._composed = True
                self._owed = not durable
                LOG.info('SR %s: received VDI %s composed (VDIs %s)',
                         self.sr.name, self.leaf_uuid, ', '.join(self.vdis))
        return self.sr.get(self.leaf_uuid) if describe else None

    def make_durable(self):
        """What ``compose(durable=False)`` wrote, to disk; idempotent.

        ``fsync`` of every file made (the data, the leaf's new header, the
        base's mode) and of the SR's folder.
        """
        with self._lock:
            if not self._owed:
                return
            try:
                for uuid in self.vdis:
                    fd = os.open(self.sr.vdi_path(uuid),
                                 os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(self.sr.path)
            except OSError as exc:
                raise SRError(sr=self.sr.name, reason='cannot make the '
                              'composed VDI %s durable: %s'
                              % (self.leaf_uuid, exc))
            self._owed = False

    def discard(self):
        """Close the devices and destroy every VDI made; idempotent."""
        with self._lock:
            self._close_devices(flush=False)
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                ahead.close()
            for vdi in reversed(self.vdis):
                self.sr.destroy(vdi)
            if not self._discarded:
                LOG.info('SR %s: receiver of VDI %s discarded (VDIs %s)',
                         self.sr.name, self.leaf_uuid, ', '.join(self.vdis))
            self._discarded = True


# -- the SR -------------------------------------------------------------------

class SR(abc.ABC):
    """A storage repository: a directory of VDI files.

    :param name: the SR's name, ``[A-Za-z0-9_.-]{1,64}``.
    :param path: its directory, created (mode 0700) when missing.
    """

    #: The VDI format, ``'vhd'`` or ``'raw'``.
    type = None
    #: Extension of VDI files.
    ext = None
    #: Whether the record keeps the hidden flag (the file cannot).
    hidden_in_record = False

    def __init__(self, name, path):
        if not isinstance(name, str) or not _SR_NAME.fullmatch(name):
            raise InvalidName(sr=name, what='SR name', value=name,
                              reason='use 1 to 64 of A-Z a-z 0-9 _ . -')
        self.name = name
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise InvalidName(sr=name, what='SR path', value=path,
                              reason='must be a directory path')
        self.path = os.path.abspath(os.fspath(path))
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise SRError(sr=name, reason='cannot create directory %s: %s'
                          % (self.path, exc.strerror or exc))
        if not os.path.isdir(self.path):
            raise SRError(sr=name, reason='%s is not a directory'
                          % self.path)
        self._mutex = threading.RLock()
        self._lock_depth = 0
        self._lock_fd = None
        self._busy = set()
        self._writers = collections.Counter()

    def __repr__(self):
        return '<%s %s at %s>' % (type(self).__name__, self.name, self.path)

    # -- names and paths ------------------------------------------------------

    def _check_uuid(self, uuid):
        """The canonical (lower-case) form of a VDI uuid, or InvalidName."""
        if not isinstance(uuid, str) or not _UUID.fullmatch(uuid.lower()):
            raise InvalidName(sr=self.name, what='VDI uuid', value=uuid,
                              reason='expected the canonical text form '
                              'xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx')
        return uuid.lower()

    def _check_label(self, what, value, optional=False):
        if value is None and optional:
            return None
        if not isinstance(value, str) or len(value) > _MAX_LABEL or \
                not value.isprintable() or (optional and not value):
            raise InvalidName(sr=self.name, what=what, value=value,
                              reason='expected %sprintable text of at most '
                              '%d characters' % ('non-empty ' if optional
                                                 else '', _MAX_LABEL))
        return value

    def _new_uuid(self):
        while True:
            uuid = str(uuidlib.uuid4())
            if not os.path.lexists(self.vdi_path(uuid)) and \
                    not os.path.lexists(self._record_path(uuid)):
                return uuid

    def vdi_path(self, uuid):
        """The file of VDI ``uuid`` (validated: it never leaves the SR)."""
        return os.path.join(self.path, '%s.%s' % (self._check_uuid(uuid),
                                                  self.ext))

    def _record_path(self, uuid):
        return os.path.join(self.path, '%s.json' % uuid)

    def _journal_path(self, op, uuid):
        return os.path.join(self.path, '.%s.%s%s' % (op, uuid,
                                                     JOURNAL_SUFFIX))

    def _tmp_path(self, uuid, what):
        return os.path.join(self.path, '.%s.%s.%s.tmp' % (uuid, self.ext,
                                                          what))

    def _scan(self):
        """``{uuid: path}`` of every VDI file in the directory."""
        found = {}
        suffix = '.' + self.ext
        try:
            entries = list(os.scandir(self.path))
        except OSError as exc:
            raise SRError(sr=self.name, reason='cannot list %s: %s'
                          % (self.path, exc.strerror))
        for entry in entries:
            name = entry.name
            if not name.endswith(suffix) or \
                    not _UUID.fullmatch(name[:-len(suffix)]):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            found[name[:-len(suffix)]] = entry.path
        return found

    # -- locking --------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """The SR lock: this process's threads and other processes."""
        with self._mutex:
            if self._lock_depth == 0:
                fd = os.open(os.path.join(self.path, LOCK_NAME),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fd, self._lock_fd = self._lock_fd, None
                    os.close(fd)

    def _inode(self, uuid):
        """``(st_dev, st_ino)`` of the VDI's file, or None."""
        try:
            st = os.stat(self.vdi_path(uuid))
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _check_idle(self, uuid, doing, writers=True):
        """Refuse ``doing`` on a VDI busy in a long operation or written.

        Writers are counted per file (inode), not per uuid: after a
        snapshot, a device attached before it writes the file that is now
        the base, and the VDI's new file can be attached for writing.
        """
        if uuid in self._busy:
            raise VDIInUse(sr=self.name, uuid=uuid,
                           reason='another operation (coalesce) is running '
                           'on it; cannot %s it now' % doing)
        if writers and self._writers[self._inode(uuid)]:
            raise VDIInUse(sr=self.name, uuid=uuid,
                           reason='it is attached for writing; close that '
                           'device before you %s it' % doing)

    def _attached(self, uuid):
        """Count a writable device of ``uuid``'s file; returns its release."""
        key = self._inode(uuid)
        self._writers[key] += 1
        released = []

        def release():
            with self._mutex:
                if not released:
                    released.append(True)
                    self._writers[key] -= 1
                    if self._writers[key] <= 0:
                        del self._writers[key]
        return release

    # -- records --------------------------------------------------------------

    def _read_record(self, uuid):
        data = read_json(self._record_path(uuid))
        if data is None or data.get('type', self.type) != self.type:
            return {}
        return data

    def _write_record(self, uuid, **fields):
        record = {'name': '', 'vm': None}
        record.update(self._read_record(uuid))
        record.update(fields)
        record['type'] = self.type
        write_json(self._record_path(uuid), record)

    def _drop_record(self, uuid):
        if remove(self._record_path(uuid)):
            fsync_dir(self.path)

    def _vdi(self, uuid, path):
        """Build the VDI from its file and its record."""
        record = self._read_record(uuid)
        try:
            facts = self._facts(uuid, path, record)
        except FileNotFoundError:
            raise VDINotFound(sr=self.name, uuid=uuid, path=path)
        except (OSError, exception.XSMError) as exc:
            raise SRError(sr=self.name, reason='VDI %s: cannot read %s: %s'
                          % (uuid, path, exc))
        name = record.get('name')
        vm = record.get('vm')
        return VDI(uuid=uuid, name=name if isinstance(name, str) else '',
                   vm=vm if isinstance(vm, str) else None, sr=self.name,
                   type=self.type, **facts)

    # -- driver hooks ---------------------------------------------------------

    @abc.abstractmethod
    def _facts(self, uuid, path, record):
        """What the file tells about a VDI.

        :returns: a dict of size, parent, read_only, hidden, physical and
            allocated.
        """

    @abc.abstractmethod
    def _check_size(self, size):
        """The size a new VDI of ``size`` bytes gets, or InvalidSize."""

    @abc.abstractmethod
    def _build(self, uuid, path, size, hidden):
        """Make the file of a new VDI at ``path`` (which does not exist)."""

    @abc.abstractmethod
    def _set_hidden(self, uuid, path, hidden):
        """Store the hidden flag of an existing VDI."""

    @abc.abstractmethod
    def _open(self, uuid, path, writable, release):
        """A block device of the VDI; calls ``release`` when closed."""

    def _parent_of(self, uuid, path):
        return None

    def _recover_journals(self):
        """Finish or roll back interrupted operations; lines of what."""
        return []

    def _children(self, uuid):
        """uuids of the VDIs whose parent is ``uuid``."""
        out = []
        for child, path in sorted(self._scan().items()):
            try:
                if self._parent_of(child, path) == uuid:
                    out.append(child)
            except (OSError, exception.XSMError) as exc:
                LOG.warning('SR %s: cannot read the parent of %s: %s',
                            self.name, path, exc)
        return out

    def _place(self, uuid, tmp, path):
        """Link a finished temp file at its VDI name, then drop the temp."""
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise VDIExists(sr=self.name, uuid=uuid, path=path)
        finally:
            remove(tmp)
        fsync_dir(self.path)

    def _error(self, doing, uuid, exc):
        """An SRError for ``exc`` raised while ``doing`` VDI ``uuid``."""
        if isinstance(exc, SRError):
            return exc
        if isinstance(exc, OSError):
            detail = '%s%s' % (exc.strerror or exc, ' (%s)' % exc.filename
                               if exc.filename else '')
        else:
            detail = str(exc)
        return SRError(sr=self.name, reason='cannot %s VDI %s: %s'
                       % (doing, uuid, detail))

    # -- the interface --------------------------------------------------------

    def create(self, size, name='', vm=None, uuid=None, hidden=False):
        """Create an empty VDI.

        :param size: virtual size in bytes.
        :param name: a label for people.
        :param vm: uuid of the VM the disk belongs to, or None.
        :param uuid: the VDI's uuid; a new one when None.
        :param hidden: XenServer's hidden flag.
        :returns: the :class:`VDI`.
        :raises VDIExists: a VDI of that uuid exists.
        """
        size = self._check_size(size)
        name = self._check_label('VDI name', name)
        vm = self._check_label('VM uuid', vm, optional=True)
        with self._locked():
            uuid = self._new_uuid() if uuid is None else \
                self._check_uuid(uuid)
            path = self.vdi_path(uuid)
            if os.path.lexists(path):
                raise VDIExists(sr=self.name, uuid=uuid, path=path)
            # The record first: a record without its file never lists.
            record = {'name': name, 'vm': vm}
            if self.hidden_in_record:
                record['hidden'] = bool(hidden)
            self._write_record(uuid, **record)
            try:
                self._build(uuid, path, size, bool(hidden))
            except BaseException as exc:
                self._drop_record(uuid)
                if isinstance(exc, Exception):
                    raise self._error('create', uuid, exc)
                raise
        LOG.info('SR %s: created VDI %s (%d bytes, %s)', self.name, uuid,
                 size, self.type)
        return self.get(uuid)

    def get(self, uuid):
        """The VDI ``uuid``.

        :raises VDINotFound: no such VDI.
        """
        path = self.vdi_path(uuid)
        uuid = self._check_uuid(uuid)
        self._stat_vdi(uuid, path)
        return self._vdi(uuid, path)

    def _stat_vdi(self, uuid, path):
        """``os.lstat`` of the VDI's file; VDINotFound when there is none."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise VDINotFound(sr=self.name, uuid=uuid, path=path)
        except OSError as exc:
            raise self._error('read', uuid, exc)
        if not stat.S_ISREG(st.st_mode):
            raise VDINotFound(sr=self.name, uuid=uuid, path=path)
        return st

    def list(self):
        """Every VDI of the SR, sorted by uuid."""
        out = []
        for uuid, path in sorted(self._scan().items()):
            try:
                out.append(self._vdi(uuid, path))
            except VDINotFound:
                continue            # removed while we looked
            except SRError as exc:
                LOG.warning('%s; not listed', exc)
        return out

    def destroy(self, uuid):
        """Delete a VDI; a missing VDI is not an error.

        :raises VDIInUse: other VDIs have it as parent, it is attached for
            writing or another operation runs on it.
        """
        uuid = self._check_uuid(uuid)
        with self._locked():
            self._check_idle(uuid, 'destroy')
            path = self.vdi_path(uuid)
            if not os.path.lexists(path):
                self._drop_record(uuid)
                return
            children = self._children(uuid)
            if children:
                raise VDIInUse(sr=self.name, uuid=uuid,
                               reason='VDIs %s have it as parent; '
                               'destroy or coalesce them first'
                               % ', '.join(children))
            try:
                os.unlink(path)
                remove(self._record_path(uuid))
            except OSError as exc:
                raise self._error('destroy', uuid, exc)
        # One fsync makes both unlinks durable (same folder); out of the
        # lock, so that destroys of several VDIs share the file system's
        # journal commits.
        try:
            fsync_dir(self.path)
        except OSError as exc:
            raise self._error('destroy', uuid, exc)
        LOG.info('SR %s: destroyed VDI %s', self.name, uuid)

    def update(self, uuid, name=None, vm=UNSET, hidden=None):
        """Change what the record says about a VDI.

        :param name: new name; None keeps it.
        :param vm: new VM uuid; None clears it; not given keeps it.
        :param hidden: new hidden flag; None keeps it.
        :returns: the updated :class:`VDI`.
        """
        uuid = self._check_uuid(uuid)
        fields = {}
        if name is not None:
            fields['name'] = self._check_label('VDI name', name)
        if vm is not UNSET:
            fields['vm'] = self._check_label('VM uuid', vm, optional=True)
        with self._locked():
            vdi = self.get(uuid)
            if hidden is not None and bool(hidden) != vdi.hidden:
                self._check_idle(uuid, 'change the hidden flag of')
                try:
                    self._set_hidden(uuid, self.vdi_path(uuid), bool(hidden))
                except Exception as exc:
                    raise self._error('update', uuid, exc)
            if fields:
                self._write_record(uuid, **fields)
        return self.get(uuid)

    def chain(self, uuid):
        """The VDI and its ancestors, leaf first."""
        out = [self.get(uuid)]
        while out[-1].parent is not None:
            parent = out[-1].parent
            if len(out) > MAX_CHAIN_DEPTH or \
                    any(v.uuid == parent for v in out):
                raise SRError(sr=self.name, reason='VDI %s: the parent chain '
                              'loops or is deeper than %d'
                              % (uuid, MAX_CHAIN_DEPTH))
            try:
                out.append(self.get(parent))
            except (VDINotFound, InvalidName):
                raise SRError(sr=self.name, reason='VDI %s: parent %s of '
                              'VDI %s is not in the SR'
                              % (uuid, parent, out[-1].uuid))
        return out

    def capacity(self):
        """``{'size': bytes, 'free': bytes}`` of the SR's file system."""
        st = os.statvfs(self.path)
        return {'size': st.f_blocks * st.f_frsize,
                'free': st.f_bavail * st.f_frsize}

    def attach(self, uuid, writable=False):
        """Open a VDI as a :class:`~xsm_driver.core.block.device.BlockDevice`.

        One writer at a time: while a VDI's file is attached for writing it
        cannot be attached for writing again, coalesced, destroyed or have
        its hidden flag changed. A snapshot is allowed (pause and flush the
        writer first, as XenServer pauses its tapdisk): the old device then
        holds the new read-only base; close it and attach the VDI again.

        :raises VDIReadOnly: ``writable`` on a read-only VDI.
        :raises VDIInUse: ``writable`` on a VDI that is already attached for
            writing, has children or is busy.
        """
        uuid = self._check_uuid(uuid)
        with self._locked():
            path = self.vdi_path(uuid)
            # (its file's mode only: the whole record (get) reads every
            # partly written block's bitmap, which a VM's start after a
            # migration pays inside the switch-over's pause)
            st = self._stat_vdi(uuid, path)
            release = None
            if writable:
                if not st.st_mode & 0o222:
                    raise VDIReadOnly(sr=self.name, uuid=uuid, path=path,
                                      reason='it cannot be attached for '
                                      'writing')
                self._check_idle(uuid, 'attach for writing')
                children = self._children(uuid)
                if children:
                    raise VDIInUse(sr=self.name, uuid=uuid,
                                   reason='VDIs %s have it as parent; '
                                   'writing it would change them'
                                   % ', '.join(children))
                release = self._attached(uuid)
            try:
                return self._open(uuid, path, writable,
                                  release or (lambda: None))
            except BaseException as exc:
                if release is not None:
                    release()
                if isinstance(exc, Exception):
                    raise self._error('attach', uuid, exc)
                raise

    def recover(self):
        """Repair what a crash in the middle of an operation left.

        Interrupted operations are rolled back (or finished, when they had
        passed their point of no return), stale temporary files removed and
        records whose file is gone dropped.

        :returns: lines saying what was done.
        """
        lines = []
        with self._locked():
            lines += self._recover_journals()
            for entry in os.scandir(self.path):
                if entry.name.startswith('.') and \
                        entry.name.endswith('.tmp') and \
                        entry.is_file(follow_symlinks=False):
                    remove(entry.path)
                    lines.append('removed stale temporary file %s'
                                 % entry.path)
            files = self._scan()
            for entry in os.scandir(self.path):
                if not entry.name.endswith('.json'):
                    continue
                uuid = entry.name[:-len('.json')]
                if not _UUID.fullmatch(uuid) or uuid in files:
                    continue
                data = read_json(entry.path)
                if data is not None and data.get('type', self.type) != \
                        self.type:
                    continue
                remove(entry.path)
                lines.append('dropped the record of VDI %s: its file is '
                             'gone' % uuid)
            fsync_dir(self.path)
        for line in lines:
            LOG.warning('SR %s: recover: %s', self.name, line)
        return lines

    @abc.abstractmethod
    def snapshot(self, uuid):
        """Snapshot a VDI, XenServer style.

        The VDI keeps its uuid and becomes an empty differencing leaf over
        a new hidden read-only base that holds what the VDI held.

        :returns: the new base :class:`VDI`.
        """

    @abc.abstractmethod
    def coalesce(self, uuid):
        """Merge a VDI into its parent, which then takes its place.

        :returns: the VDI (same uuid), its chain one shorter.
        """

    @abc.abstractmethod
    def receive(self, size, name='', vm=None):
        """Make the destination of a migration.

        :returns: a :class:`Receiver`.
        """
