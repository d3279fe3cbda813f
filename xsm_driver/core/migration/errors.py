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

"""Errors of the migration engine; each names what failed and why.

The messages are what an operator reads in ``nova instance-action`` or
CloudStack's async job result, so they carry names and numbers, not codes;
where XenServer has an error code for the same refusal, the message names
it too.
"""

from xsm_driver.core import exception

_UNITS = ('KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')


def human_size(nbytes):
    """Bytes in binary units with one decimal.

    >>> human_size(3 * 1024 ** 3), human_size(1536), human_size(512)
    ('3.0 GiB', '1.5 KiB', '512 B')
    """
    nbytes = int(nbytes)
    if abs(nbytes) < 1024:
        return '%d B' % nbytes
    value = float(nbytes)
    for unit in _UNITS:
        value /= 1024.0
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return '%.1f %s' % (value, unit)


def _names(items):
    return ', '.join(str(item) for item in items)


class MigrationError(exception.XSMError):
    """Base class of the migration engine's errors."""

    msg_fmt = "migration failed: %(reason)s"


class InsufficientSpace(MigrationError):
    """The destination SR cannot hold what the migration will write.

    :param sr: name of the SR.
    :param needed: bytes the migration needs.
    :param free: bytes the SR has free.
    """

    msg_fmt = ("SR '%(sr)s'%(on_host)s needs %(needed_h)s (%(needed)d bytes) "
               "but has %(free_h)s free")

    def __init__(self, message=None, **kwargs):
        host = kwargs.get('host')
        kwargs.setdefault('on_host', ' on host %s' % host if host else '')
        kwargs.setdefault('needed_h', human_size(kwargs.get('needed', 0)))
        kwargs.setdefault('free_h', human_size(kwargs.get('free', 0)))
        super().__init__(message, **kwargs)


class VDINotInMap(MigrationError):
    """VDIs of the VM have no destination SR (XenServer: VDI_NOT_IN_MAP).

    :param vdis: the uuids of every unmapped VDI.
    """

    msg_fmt = ("VDIs not mapped to a destination SR: %(names)s "
               "(XenServer: VDI_NOT_IN_MAP); map every disk of the VM")

    def __init__(self, message=None, **kwargs):
        kwargs['vdis'] = list(kwargs.get('vdis', ()))
        kwargs.setdefault('names', _names(kwargs['vdis']))
        super().__init__(message, **kwargs)


class VIFNotInMap(MigrationError):
    """VIFs of the VM have no destination network on the other pool.

    :param vifs: the uuids (or devices) of every unmapped VIF.
    """

    msg_fmt = ("VIFs not mapped to a destination network: %(names)s "
               "(XenServer: VIF_NOT_IN_MAP); a VM that changes pool needs "
               "every network interface mapped")

    def __init__(self, message=None, **kwargs):
        kwargs['vifs'] = list(kwargs.get('vifs', ()))
        kwargs.setdefault('names', _names(kwargs['vifs']))
        super().__init__(message, **kwargs)


class ChainTooDeep(MigrationError):
    msg_fmt = ("VDI %(vdi)s: the chain would be %(depth)d images deep "
               "after migration; the limit is %(limit)d (XenServer: "
               "SR_BACKEND_FAILURE_109); coalesce the chain first")


class TooManyMigrations(MigrationError):
    msg_fmt = ("host %(host)s already runs %(active)d storage migrations; "
               "the limit is %(limit)d (XenServer: "
               "TOO_MANY_STORAGE_MIGRATES); retry when one has finished")


class MigrationAborted(MigrationError):
    msg_fmt = "migration %(id)s aborted: %(reason)s"


class LeaseExpired(MigrationAborted):
    """The destination rolled a receive back: its source went silent.

    :param id: the migration.
    :param host: the destination host.
    :param silent: seconds the destination heard no renewal.
    :param lease: the destination's ``[agent]receive_lease_timeout``.
    """

    msg_fmt = ("migration %(id)s aborted: destination host %(host)s rolled "
               "back its receive after %(silent).0f s without a lease "
               "renewal from the source (its [agent]receive_lease_timeout "
               "is %(lease)g s); the VM and its disks stay on the source")


class InDoubt(MigrationError):
    """The source does not know whether the destination committed.

    :param id: the migration.
    :param host: the destination host.
    :param waited: seconds the source asked without a certain answer.
    :param last: the last thing that went wrong.
    """

    msg_fmt = ("migration %(id)s is in doubt: destination host %(host)s "
               "gave no certain answer on whether it committed the "
               "switch-over in %(waited).0f s (last: %(last)s); the VM "
               "stays paused on the source and is not started on either "
               "host by this migration until the outcome is known. When "
               "host %(host)s answers again, run 'xsm-migrate resolve "
               "%(id)s' on the source host: it asks the destination and "
               "either finishes the migration (the VM runs on the "
               "destination) or resumes the VM on the source")


class MigrationNotFound(MigrationError):
    """No such migration (``host``, when given, is named too)."""

    msg_fmt = "migration %(id)s not found%(where)s"

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault('where', ' on host %s' % kwargs['host']
                          if kwargs.get('host') else '')
        super().__init__(message, **kwargs)


class InvalidPhase(MigrationError):
    """A phase name is unknown, or the step is wrong in that phase.

    :param phase: the phase.
    :param reason: what is wrong.
    :param id: the migration, when there is one.
    """

    msg_fmt = "%(where)sphase %(phase)r: %(reason)s"

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault('where', 'migration %s: ' % kwargs['id']
                          if kwargs.get('id') else 'migration ')
        super().__init__(message, **kwargs)


class JournalError(MigrationError):
    """The migration journal cannot be opened or written."""

    msg_fmt = "migration journal %(path)s: %(reason)s"
