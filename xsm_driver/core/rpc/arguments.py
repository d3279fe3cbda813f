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

"""Checks of the arguments of the agent's RPC calls.

oslo.messaging delivers whatever JSON a caller sent: a call whose arguments
cannot be meant (unknown or missing names, wrong JSON types, values out of
the agent's bounds) is refused here with :class:`InvalidArgument`, which
names the method and the argument, instead of failing deep below with a
TypeError or KeyError (or, for a migration, later in its thread).
"""

import dataclasses
import math
import numbers
import re
import ssl

from xsm_driver.core import exception
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod


class InvalidArgument(exception.XSMError):
    msg_fmt = 'RPC call %(method)s: %(reason)s'


# The JSON type an argument of each name must have, whatever the method
# (None only where the parameter defaults to None); the layers below
# check the values themselves (an SR name, a uuid, a size).
_ARGUMENT_TYPES = {
    'vm': str, 'vdi': str, 'sr': str, 'dest_host': str, 'dest_sr': str,
    'migration': str, 'migration_id': str, 'name': str, 'source_host': str,
    'spec': dict, 'options': dict, 'vdi_map': dict, 'vif_map': dict,
    'vm_state': dict, 'models': list, 'receive': dict, 'disks': list,
    'vifs': list,
    'rate': numbers.Real, 'read_ratio': numbers.Real, 'fill': numbers.Real,
    'timeout': numbers.Real, 'qemu': dict, 'limit': int,
}
_JSON_NAMES = {str: 'Unicode string', dict: 'object', list: 'array',
               int: 'integer', bool: 'boolean',
               numbers.Real: 'finite number'}
# Migration options a request may set: (type, minimum, maximum), the
# bounds of the agent's own configuration options.
_OPTION_BOUNDS = {
    'address': (str, None, None), 'network': (str, None, None),
    'copy': (bool, None, None), 'bandwidth': (int, 1, None),
    'max_concurrent': (int, 1, None), 'leaf_headroom': (int, 0, None),
    'chunk': (int, 512, 32 * 1024 * 1024), 'depth': (int, 1, 64),
    'pause_timeout': (numbers.Real, 0.1, 1e6),
    'mirror_timeout': (numbers.Real, 0.1, 1e6),
    'prepared_timeout': (numbers.Real, 0.1, 1e6),
    'receive_lease_timeout': (numbers.Real, 0, 1e6),
    'connections': (int, 1, 8),
}
_MIGRATION_ID = re.compile(r'[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}')
_SURROGATE = re.compile('[\ud800-\udfff]')
_PREFLIGHTS = ('receive_preflight', 'receive_prepare_ahead')


def _check_value(method, where, value, kind, low=None, high=None,
                 optional=False):
    """Raise InvalidArgument unless ``value`` is a ``kind`` in bounds."""
    if value is None and optional:
        return value
    ok = isinstance(value, kind) and (kind is bool or
                                      not isinstance(value, bool))
    if ok and kind is numbers.Real:
        ok = math.isfinite(value)
    if ok and kind is str:
        # JSON may carry a lone surrogate (\udcff), which no file name,
        # journal or log line can store.
        ok = not _SURROGATE.search(value)
    if ok and low is not None:
        ok = low <= value and (high is None or value <= high)
    if not ok:
        raise InvalidArgument(method=method, reason='%s must be a JSON %s%s, '
                              'not %.80r' % (where, _JSON_NAMES[kind], '' if
                                             low is None else ' in [%s, %s]'
                                             % (low, high or 'inf'), value))
    return value


def _check_options(method, options):
    fields = {f.name for f in dataclasses.fields(manager_mod.Options)}
    for key, value in options.items():
        if key not in fields:
            raise InvalidArgument(method=method, reason='unknown migration '
                                  'option %.80r' % key)
        if key in _OPTION_BOUNDS:
            _check_value(method, 'option ' + key, value,
                         *_OPTION_BOUNDS[key], optional=True)


def _check_spec(method, spec):
    """A migration request of a source agent (see migration.source)."""
    mid = _check_value(method, 'spec.id', spec.get('id'), str)
    if not _MIGRATION_ID.fullmatch(mid):
        # It names the migration's folder of credentials.
        raise InvalidArgument(method=method, reason='spec.id must be a '
                              'migration uuid, not %.80r' % mid)
    for key in ('source_host', 'network', 'client_ca_pem'):
        _check_value(method, 'spec.' + key, spec.get(key), str,
                     optional=True)
    _check_value(method, 'spec.renews', spec.get('renews'), bool,
                 optional=True)
    vif_map = _check_value(method, 'spec.vif_map', spec.get('vif_map'),
                           dict, optional=True)
    for key, value in (vif_map or {}).items():
        _check_value(method, 'spec.vif_map[%r]' % key, value, str)
    vm = _check_value(method, 'spec.vm', spec.get('vm'), dict,
                      optional=True)
    if vm:
        _check_value(method, 'spec.vm.vifs', vm.get('vifs', []), list)
    vdis = _check_value(method, 'spec.vdis', spec.get('vdis'), list)
    for i, vdi in enumerate(vdis):
        where = 'spec.vdis[%d]' % i
        _check_value(method, where, vdi, dict)
        for key, kind in (('uuid', str), ('sr', str), ('size', int)):
            _check_value(method, '%s.%s' % (where, key), vdi.get(key), kind)
        _check_value(method, where + '.name', vdi.get('name'), str,
                     optional=True)
        # (The preflight counts the space the copy needs from them.)
        _check_value(method, where + '.allocated', vdi.get('allocated'), int,
                     optional=method not in _PREFLIGHTS)
        _check_value(method, where + '.blocks', vdi.get('blocks'), int,
                     optional=True)
    if method.startswith('receive_prepare'):
        pem = _check_value(method, 'spec.client_ca_pem',
                           spec.get('client_ca_pem'), str)
        try:
            ssl.create_default_context(cadata=pem)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidArgument(method=method, reason='spec.client_ca_pem '
                                  'is no PEM certificate: %s' % exc)


def check_arguments(method, signature, args, kwargs):
    """Refuse a call whose arguments cannot be meant (InvalidArgument).

    Unknown or missing argument names, and arguments of the wrong JSON
    type or out of bounds, would otherwise fail deep below (a TypeError,
    a KeyError, a migration thread that fails later): an agent failure
    with a traceback instead of a clear answer.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArgument(method=method, reason=str(exc))
    for name, value in bound.arguments.items():
        kind = _ARGUMENT_TYPES.get(name)
        if kind is None or (value is None and
                            signature.parameters[name].default is None):
            continue
        _check_value(method, 'argument ' + name, value, kind)
        if name == 'options':
            _check_options(method, value)
        elif name in ('vdi_map', 'vif_map'):
            for key, target in value.items():
                _check_value(method, '%s[%r]' % (name, key), target, str)
        elif name == 'disks':
            for i, disk in enumerate(value):
                _check_value(method, 'disks[%d]' % i, disk, dict)
                _check_value(method, 'disks[%d].sr' % i, disk.get('sr'), str)
                _check_value(method, 'disks[%d].size' % i, disk.get('size'),
                             int)
        elif name == 'vifs':
            for i, vif in enumerate(value):
                try:
                    host_mod.vif_entry(vif)
                except ValueError as exc:
                    raise InvalidArgument(method=method, reason='vifs[%d]: %s'
                                          % (i, exc))
        elif name == 'spec':
            _check_spec(method, value)
