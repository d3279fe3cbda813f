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

"""xapi's errors as messages an operator can act on.

xapi fails a call with ``ErrorDescription = [CODE, param, ...]`` where the
parameters are mostly opaque references. :func:`translate` turns one into
an :class:`~xsm_driver.core.exception.XSMError` whose message names the
VDI, SR or host (by uuid and name, never by reference), says what went
wrong and what to do, and still quotes xapi's code. Where the native
engine has an error for the same refusal (``VDI_NOT_IN_MAP``,
``TOO_MANY_STORAGE_MIGRATES``, no space, chain too deep), the translated
error is a subclass of it, so callers can catch either engine's errors the
same way.
"""

from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod


class XenAPIError(errors.MigrationError):
    """A XenAPI call failed.

    :param code: xapi's error code.
    :param detail: what it means here, in words.
    """

    msg_fmt = "%(detail)s (xapi: %(code)s)"

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault('detail', 'XenAPI call failed: %s'
                          % ' '.join(str(p) for p in
                                     kwargs.get('params', ())))
        super().__init__(message, **kwargs)


class PoolUnreachable(XenAPIError):
    """The pool master cannot be reached, or refused our credentials."""

    msg_fmt = ("pool %(pool)s (%(url)s): %(reason)s")


class OutcomeUnknown(PoolUnreachable):
    """Contact was lost while xapi ran a task: it may still finish."""


class NotSupported(XenAPIError):
    """What the native engine does but xapi does not let us do."""

    msg_fmt = "%(what)s is not possible on the xenapi engine: %(reason)s"


class ConsoleNotSupported(NotSupported, host_mod.InvalidVMState):
    """No serial console to read (a Nova driver answers "not available")."""

    msg_fmt = NotSupported.msg_fmt


class VDINotInMap(errors.VDINotInMap, XenAPIError):
    pass


class VIFNotInMap(errors.VIFNotInMap, XenAPIError):
    pass


class InsufficientSpace(errors.InsufficientSpace, XenAPIError):
    pass


class ChainTooDeep(errors.ChainTooDeep, XenAPIError):
    msg_fmt = ("%(detail)s: the VHD snapshot chain is too long (xapi: "
               "SR_BACKEND_FAILURE_109); delete snapshots of the VM or let "
               "the SR's garbage collector coalesce (xe sr-scan uuid=...), "
               "then retry")


class TooManyMigrations(errors.TooManyMigrations, XenAPIError):
    pass


class MigrationAborted(errors.MigrationAborted, XenAPIError):
    pass


def _first(params, describe, kind):
    return describe(params[0], kind) if params else 'unknown %s' % kind


def _p(params, i, default=''):
    return params[i] if len(params) > i else default


def _mib(value):
    try:
        return str(int(value) >> 20)
    except (TypeError, ValueError):
        return '?'


def translate(details, describe=None, context=''):
    """The exception for a XenAPI failure.

    :param details: xapi's ``ErrorDescription`` (``[code, params...]``).
    :param describe: ``describe(ref, kind)`` names an object for people
        (e.g. ``"VDI 6f2c... 'data'"``); refs are shown as they are when
        None.
    :param context: what was being done, e.g. ``"migrating VM web-1 to
        pool B"``; also names the SRs a backend failure is about, since
        ``SR_BACKEND_FAILURE_*`` carries no SR.
    :returns: an :class:`XenAPIError` (or a subclass).

    >>> str(translate(['HOST_DISABLED', 'OpaqueRef:1']))
    'host OpaqueRef:1 is disabled (in maintenance mode, or being \
evacuated); enable it with "xe host-enable uuid=..." or choose another \
host (xapi: HOST_DISABLED)'
    """
    details = [str(d) for d in (details or ['UNKNOWN_ERROR'])]
    code, params = details[0], details[1:]
    describe = describe or (lambda ref, kind: '%s %s' % (kind, ref))
    where = ' (%s)' % context if context else ''

    if code == 'VDI_NOT_IN_MAP':
        return VDINotInMap(vdis=[_first(params, describe, 'VDI')],
                           code=code)
    if code == 'VIF_NOT_IN_MAP':
        return VIFNotInMap(vifs=[_first(params, describe, 'VIF')],
                           code=code)
    if code == 'SR_DOES_NOT_SUPPORT_MIGRATION':
        # [sr; missing capabilities] (xapi_vm_migrate.ml supported_on)
        detail = ('%s does not support storage migration (its driver '
                  'lacks %s); choose an SR whose driver can (ext, nfs, lvm, '
                  'lvmoiscsi, lvmohba), or copy the disk with the VM shut '
                  'down' % (_first(params, describe, 'SR'),
                            _p(params, 1).replace(';', ', ') or
                            'snapshot or mirror'))
    elif code == 'MIRROR_FAILED':
        detail = ('mirroring %s to the destination failed%s; xapi stopped '
                  'the migration and the VM goes on on the source: check '
                  'the migration network between the pools and the space '
                  'and health of the destination SR, then retry'
                  % (_first(params, describe, 'VDI'), where))
    elif code == 'SR_SOURCE_SPACE_INSUFFICIENT':
        detail = ('%s has no room for the snapshot that storage migration '
                  'takes of each disk; free space on it (delete old '
                  'snapshots) and retry' % _first(params, describe, 'SR'))
    elif code == 'TOO_MANY_STORAGE_MIGRATES':
        limit = _p(params, 0) or '3'
        return TooManyMigrations(
            'the source host already runs %s storage migrations, xapi\'s '
            'limit (xapi: TOO_MANY_STORAGE_MIGRATES)%s; retry when one has '
            'finished' % (limit, where), host='source', active=limit,
            limit=limit, code=code)
    elif code == 'VM_HOST_INCOMPATIBLE_VERSION_MIGRATE':
        # Raised as [vm; host] (xen-api ocaml/xapi/xapi_vm_migrate.ml,
        # assert_can_migrate, cross_pool), though datamodel_errors.ml
        # documents [host; vm]: the order xapi really sends is read first;
        # the documented one only when the first parameter is no VM.
        vm, host = _p(params, 0), _p(params, 1)
        if describe(vm, 'VM') == 'VM %s' % vm and \
                describe(host, 'VM') != 'VM %s' % host:
            vm, host = host, vm
        detail = ('the destination %s runs an older XenServer/XCP-ng '
                  'version than the source of %s: a VM can only move to '
                  'the same or a newer version; update the destination '
                  'pool first' % (describe(host, 'host'),
                                  describe(vm, 'VM')))
    elif code == 'NOT_SUPPORTED_DURING_UPGRADE':
        detail = ('the destination host runs an older version than the '
                  'source host (a pool being updated): within a pool a VM '
                  'moves only to a host as new as its own; finish the '
                  'update first%s' % where)
    elif code == 'HOST_CANNOT_ATTACH_NETWORK':
        # [host; network] (xapi_host.ml migrate_receive)
        detail = ('%s has no interface on %s to receive the migration; '
                  'choose another migration network or give the host a PIF '
                  'on it' % (describe(_p(params, 0), 'host'),
                             describe(_p(params, 1), 'network')))
    elif code in ('INTERFACE_HAS_NO_IP', 'PIF_HAS_NO_NETWORK_CONFIGURATION'):
        # [pif] (xapi_host.ml migrate_receive)
        detail = ('the destination\'s interface on the migration network '
                  '(%s) has %s; %s, or choose another migration network%s'
                  % (describe(_p(params, 0), 'PIF'),
                     'no IP address' if code == 'INTERFACE_HAS_NO_IP'
                     else 'no IP configuration',
                     'check its DHCP' if code == 'INTERFACE_HAS_NO_IP'
                     else 'configure it ("xe pif-reconfigure-ip")', where))
    elif code == 'VDI_NEEDS_VM_FOR_MIGRATE':
        detail = ('%s is not a disk of any VM: xapi moves a VDI within a '
                  'pool only as a disk of a VM; copy it with "xe vdi-copy" '
                  'instead' % _first(params, describe, 'VDI'))
    elif code == 'OPERATION_NOT_ALLOWED':
        detail = 'xapi does not allow this%s: %s' % (where, _p(params, 0))
    elif code == 'HOST_DISABLED':
        detail = ('%s is disabled (in maintenance mode, or being '
                  'evacuated); enable it with "xe host-enable uuid=..." or '
                  'choose another host' % _first(params, describe, 'host'))
    elif code == 'SR_BACKEND_FAILURE_44':
        return InsufficientSpace(
            'no space left on the destination SR%s: the storage backend '
            'refused to allocate (xapi: SR_BACKEND_FAILURE_44, "%s"); '
            'free space there or map the disks to a larger SR'
            % (where, _p(params, 1) or 'There is insufficient space'),
            code=code)
    elif code == 'SR_BACKEND_FAILURE_109':
        return ChainTooDeep(detail='a disk could not be snapshotted%s'
                            % where, code=code, vdi='?', depth=0, limit=30)
    elif code == 'LICENCE_RESTRICTION':
        detail = ('the pool\'s licence does not allow %s; storage '
                  'migration needs a licence that includes it (XenServer '
                  'Standard or better; XCP-ng has no such restriction)'
                  % (_p(params, 0) or 'this operation'))
    elif code == 'VM_INCOMPATIBLE_WITH_THIS_HOST':
        detail = ('%s cannot run on %s: %s; a running VM cannot move to a '
                  'host with a different CPU vendor or fewer CPU features'
                  % (describe(_p(params, 0), 'VM'),
                     describe(_p(params, 1), 'host'),
                     _p(params, 2) or 'incompatible CPU'))
    elif code == 'VM_BAD_POWER_STATE':
        detail = ('%s is %s but must be %s for this'
                  % (describe(_p(params, 0), 'VM'), _p(params, 2).lower(),
                     _p(params, 1).lower()))
    elif code == 'OTHER_OPERATION_IN_PROGRESS':
        detail = ('another operation runs on %s %s (%s); wait for it to '
                  'finish and retry' % (_p(params, 0),
                                        describe(_p(params, 1),
                                                 _p(params, 0)),
                                        _p(params, 3) or _p(params, 2)))
    elif code == 'SESSION_AUTHENTICATION_FAILED':
        detail = ('the pool refused the user name or password; check the '
                  'credentials in the [xenapi] options')
    elif code == 'HANDLE_INVALID':
        detail = ('the %s %s no longer exists (it was removed while we '
                  'worked)' % (_p(params, 0), _p(params, 1)))
    elif code == 'VM_IS_TEMPLATE':
        # [vm; op] (xapi_vm_lifecycle.ml check_template)
        detail = ('%s is a template: xapi does not %s a template%s; '
                  'check [xenapi]vm_template' % (
                      describe(_p(params, 0), 'VM'),
                      _p(params, 1).replace('_', ' ') or 'do that', where))
    elif code == 'HOST_NOT_ENOUGH_FREE_MEMORY':
        # [needed; available] (xapi_vm_helpers.ml
        # assert_enough_memory_available)
        detail = ('the host has %s MiB of memory free, the VM needs %s '
                  'MiB%s; choose another host or a smaller flavor'
                  % (_mib(_p(params, 1)), _mib(_p(params, 0)), where))
    elif code == 'VM_REQUIRES_SR':
        # [vm; sr] (xapi_vm_helpers.ml assert_can_see_SRs)
        detail = ('%s needs %s, which the host does not see%s; move its '
                  'disks with the VM (block migration) or plug the SR '
                  'there' % (describe(_p(params, 0), 'VM'),
                             describe(_p(params, 1), 'SR'), where))
    elif code == 'NO_HOSTS_AVAILABLE':
        detail = ('no host of the pool can run the VM now (memory, SRs, '
                  'networks or disabled hosts)%s' % where)
    elif code == 'VDI_IN_USE':
        # [vdi; operation] (xapi_vdi.ml)
        detail = ('%s is in use by a running VM%s; stop the VM first'
                  % (describe(_p(params, 0), 'VDI'), where))
    elif code == 'VDI_IO_ERROR':
        detail = ('xapi could not write the image into the disk%s (%s): '
                  'an image larger than the disk, or not a VHD it reads'
                  % (where, _p(params, 0) or 'I/O error'))
    elif code == 'TASK_CANCELLED':
        return MigrationAborted(id=context or '?', reason='the xapi task '
                                'was cancelled', code=code)
    else:
        detail = 'XenAPI call failed%s: %s' % (where, ' '.join(details))
    return XenAPIError(detail=detail, code=code, params=params)
