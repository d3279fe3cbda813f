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

"""CloudStack's MigrateWithStorage commands and answers, field by field.

The field names are CloudStack's Java ones (``com.cloud.agent.api`` and
``...api.to``); what a handler does not use is kept as it came, so that an
answer that echoes a transfer object (``VolumeTO`` in ``volumeToSr``)
echoes it whole. What xsm-driver reads:

==============================  ==========================================
``VirtualMachineTO``            ``name`` (the VM's name on the host, as
                                XenServer's name-label), ``uuid``,
                                ``disks`` (``DiskTO``), ``nics`` (``NicTO``)
``DiskTO``                      ``diskSeq`` (device number), ``type``
                                (``ROOT``, ``DATADISK``, ``ISO``...),
                                ``data`` (a wrapped ``VolumeObjectTO``)
``VolumeTO``                    ``id``, ``path`` (the VDI uuid),
                                ``deviceId``
``StorageFilerTO``              ``uuid``, ``path`` (the SR label)
``NicTO``                       ``deviceId``, ``name`` (the network on the
                                host), ``mac``
==============================  ==========================================

Pure code: dicts in, dicts out.
"""

from xsm_driver.cloudstack import gson
from xsm_driver.core import exception

API = 'com.cloud.agent.api.'
RECEIVE = API + 'MigrateWithStorageReceiveCommand'
SEND = API + 'MigrateWithStorageSendCommand'
COMPLETE = API + 'MigrateWithStorageCompleteCommand'
MIGRATE = API + 'MigrateWithStorageCommand'

ANSWERS = {
    RECEIVE: API + 'MigrateWithStorageReceiveAnswer',
    SEND: API + 'MigrateWithStorageSendAnswer',
    COMPLETE: API + 'MigrateWithStorageCompleteAnswer',
    MIGRATE: API + 'MigrateWithStorageAnswer',
}
UNSUPPORTED_ANSWER = API + 'UnsupportedAnswer'

VOLUME_OBJECT_TO = 'org.apache.cloudstack.storage.to.VolumeObjectTO'
PRIMARY_DATA_STORE_TO = 'org.apache.cloudstack.storage.to.PrimaryDataStoreTO'

#: fields every ``Command`` (so every ``Answer``) has, with Gson's values
#: for a new object: primitives are always written, ``contextMap`` starts
#: as an empty map.
COMMAND_DEFAULTS = {'contextMap': {}, 'wait': 0,
                    'bypassHostMaintenance': False}


class CommandError(exception.XSMError):
    """A command that cannot be executed as it is written."""

    msg_fmt = "%(command)s: %(reason)s"


def short_name(class_name):
    return class_name.rsplit('.', 1)[-1]


def _field(fields, name, command, kind=None, required=True):
    value = fields.get(name)
    if value is None:
        if required:
            raise CommandError(command=short_name(command),
                               reason='field %r is missing' % name)
        return None
    if kind is not None and not isinstance(value, kind):
        raise CommandError(command=short_name(command),
                           reason='field %r must be %s, not %r'
                           % (name, kind.__name__, value))
    return value


_KINDS = {dict: 'an object', list: 'an array', str: 'a string',
          int: 'an integer'}


def _check(value, kind, what, command):
    """``value`` if it is of ``kind``; else a CommandError naming ``what``.

    A JSON ``true``/``false`` is no integer here, though Python's bool is.
    """
    if not isinstance(value, kind) or (kind is int and
                                       isinstance(value, bool)):
        raise CommandError(command=short_name(command),
                           reason='%s must be %s, not %s'
                           % (what, _KINDS.get(kind, kind.__name__),
                              gson.short(value)))
    return value


def _int(value, what, command):
    """An integer field; None stays None."""
    return None if value is None else _check(value, int, what, command)


class Disk:
    """A ``DiskTO`` of a ``VirtualMachineTO``."""

    def __init__(self, fields, command):
        self.fields = _check(fields, dict, 'a DiskTO of vm.disks', command)
        self.type = fields.get('type')
        self.path = fields.get('path')
        self.data_class, self.data = None, {}
        if fields.get('data') is not None:
            self.data_class, self.data = gson.unwrap(fields['data'],
                                                     'DiskTO.data')
        seq = fields.get('diskSeq')
        if seq is None:
            seq = self.data.get('deviceId')
        self.seq = _int(seq, 'DiskTO.diskSeq', command)
        self.volume_id = self.data.get('id', self.data.get('volumeId'))

    @property
    def is_volume(self):
        return self.type != 'ISO' and self.data_class in (None,
                                                          VOLUME_OBJECT_TO)


class Nic:
    """A ``NicTO`` of a ``VirtualMachineTO``."""

    def __init__(self, fields, command):
        self.fields = _check(fields, dict, 'a NicTO', command)
        self.device = _int(fields.get('deviceId', 0), 'NicTO.deviceId',
                           command)
        self.name = fields.get('name')
        self.mac = fields.get('mac')


class VirtualMachine:
    """A ``VirtualMachineTO``."""

    def __init__(self, fields, command):
        if not isinstance(fields, dict):
            raise CommandError(command=short_name(command),
                               reason='field \'vm\' must be a '
                               'VirtualMachineTO object')
        self.fields = fields
        self.name = _field(fields, 'name', command, str)
        self.uuid = fields.get('uuid')
        disks = _field(fields, 'disks', command, list, required=False)
        nics = _field(fields, 'nics', command, list, required=False)
        self.disks = [Disk(d, command) for d in disks or ()]
        self.nics = [Nic(n, command) for n in nics or ()]


class Volume:
    """A ``VolumeTO``."""

    def __init__(self, fields, command):
        if not isinstance(fields, dict):
            raise CommandError(command=short_name(command),
                               reason='a VolumeTO must be an object, not %r'
                               % (fields,))
        self.fields = fields
        self.id = fields.get('id')
        self.path = _field(fields, 'path', command, str)
        self.device = _int(fields.get('deviceId'), 'VolumeTO.deviceId',
                           command)


def vm_of(command, fields):
    return VirtualMachine(_field(fields, 'vm', command, dict), command)


def volume_pairs(command, fields, name):
    """``List<Pair<VolumeTO, X>>`` -> ``[(Volume, X), ...]``."""
    out = []
    for item in _field(fields, name, command, list):
        t, u = gson.unpair(item, '%s entry' % name)
        out.append((Volume(t, command), u))
    return out


def nic_pairs(command, fields, name='nicToNetwork'):
    """``List<Pair<NicTO, Object>>`` -> ``[(Nic, Object), ...]``."""
    out = []
    for item in _field(fields, name, command, list, required=False) or ():
        t, u = gson.unpair(item, '%s entry' % name)
        out.append((Nic(t or {}, command), u))
    return out


def filer_pairs(command, fields, name):
    """``List<Pair<VolumeTO, StorageFilerTO>>`` -> ``[(Volume, label)]``."""
    out = []
    for volume, filer in volume_pairs(command, fields, name):
        _check(filer, dict, 'the StorageFilerTO of volume %s in %s'
               % (volume.path, name), command)
        label = filer_label(filer)
        if not isinstance(label, str) or not label:
            raise CommandError(
                command=short_name(command),
                reason='the StorageFilerTO of volume %s in %s has neither '
                'uuid nor path' % (volume.path, name))
        out.append((volume, label))
    return out


def filer_label(filer):
    """The SR label of a ``StorageFilerTO``, as CitrixHelper makes it.

    >>> filer_label({'uuid': 'u', 'type': 'NetworkFilesystem', 'path': 'p'})
    'u'
    >>> filer_label({'uuid': 'u', 'type': 'PreSetup', 'path': '/sr-b'})
    'sr-b'
    """
    if filer.get('type') in ('PreSetup', 'VMFS') and filer.get('path'):
        return filer['path'].strip('/')
    return filer.get('uuid') or filer.get('path')


# -- answers ---------------------------------------------------------------

class Answer:
    """An answer to one command; ``error`` is the exception, if any.

    :param name: the answer's Java class name.
    :param fields: the answer's own fields (``result`` and ``details``
        are added).
    """

    def __init__(self, name, result, details=None, error=None, **fields):
        self.name = name
        self.result = bool(result)
        self.details = details
        self.error = error
        self.fields = fields

    def to_fields(self):
        out = dict(self.fields)
        out['result'] = self.result
        if self.details is not None:
            out['details'] = self.details
        for key, value in COMMAND_DEFAULTS.items():
            out.setdefault(key, value.copy() if isinstance(value, dict)
                           else value)
        return gson.strip_nulls(out)

    def to_gson(self):
        return gson.encode([(self.name, self.to_fields())])

    def __repr__(self):
        return '<Answer %s result=%s details=%r>' % (
            short_name(self.name), self.result, self.details)


def success(command, **fields):
    return Answer(ANSWERS.get(command, API + 'Answer'), True, **fields)


def failure(command, error, details=None):
    """A failed answer: ``result`` false, ``details`` the error message."""
    if command not in ANSWERS:
        return Answer(UNSUPPORTED_ANSWER, False, details or str(error),
                      error=error)
    return Answer(ANSWERS[command], False, details or str(error), error=error)


def volume_object(volume_id, path):
    """A ``VolumeObjectTO`` as XenServer's resource answers it.

    Only ``id`` and ``path`` are set; Gson writes the primitives too.
    """
    return {'path': path, 'id': volume_id if volume_id is not None else 0,
            'accountId': 0, 'directDownload': False, 'deployAsIs': False}
