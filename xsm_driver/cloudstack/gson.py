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

"""CloudStack's agent JSON, as its Gson set-up writes it (GsonHelper).

* Commands and answers travel as an array of one-key objects, the key the
  Java class name (``ArrayTypeAdaptor``)::

      [{"com.cloud.agent.api.MigrateWithStorageCompleteCommand":
        {"vm": {...}, "contextMap": {}, "wait": 0}}]

* Fields of interface type (``DataTO``, ``DataStoreTO``) are wrapped the
  same way, one object (``InterfaceTypeAdaptor``)::

      "data": {"org.apache.cloudstack.storage.to.VolumeObjectTO": {...}}

* ``com.cloud.utils.Pair`` is ``{"t": first, "u": second}``; Java field
  names are the keys; null fields are left out; enums are their names.

Pure functions: text in, primitives out, and back.
"""

import json

from xsm_driver.core import exception


class GsonError(exception.XSMError):
    """Text that is not CloudStack's Gson form."""

    msg_fmt = "not CloudStack agent JSON: %(reason)s"


def strip_nulls(value):
    """Drop null fields, as Gson does (null array elements stay).

    >>> strip_nulls({'a': None, 'b': [None, {'c': None}]})
    {'b': [None, {}]}
    """
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def _one_key(obj, what):
    if not isinstance(obj, dict) or len(obj) != 1:
        raise GsonError(reason='%s must be an object with exactly one key, '
                        'the Java class name; got %s'
                        % (what, short(obj)))
    [(name, fields)] = obj.items()
    if not isinstance(fields, dict):
        raise GsonError(reason='%s %s: the fields must be an object; got %s'
                        % (what, name, short(fields)))
    return name, fields


def short(value, limit=120):
    """``value`` as JSON, cut to ``limit`` characters, for a message."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + '...'


def decode(text):
    """``[{"class": {fields}}, ...]`` -> ``[(class, fields), ...]``."""
    if isinstance(text, bytes):
        try:
            text = text.decode('utf-8')
        except UnicodeDecodeError as exc:
            raise GsonError(reason='not UTF-8 (%s)' % exc)
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise GsonError(reason='invalid JSON (%s)' % exc)
    if isinstance(items, dict):         # a single command, not an array
        items = [items]
    if not isinstance(items, list) or not items:
        raise GsonError(reason='expected a non-empty array of commands; got '
                        '%s' % short(items))
    return [_one_key(item, 'command') for item in items]


def encode(items):
    """``[(class, fields), ...]`` -> Gson text, nulls left out."""
    return json.dumps([{name: strip_nulls(fields)} for name, fields in items],
                      separators=(',', ':'))


def wrap(name, fields):
    """A value of an interface-typed field: ``{class: fields}``."""
    return {name: fields}


def unwrap(obj, what='interface value'):
    """``{class: fields}`` -> ``(class, fields)``."""
    return _one_key(obj, what)


def pair(t, u):
    """A ``com.cloud.utils.Pair``."""
    return {'t': t, 'u': u}


def unpair(obj, what='pair'):
    """A ``com.cloud.utils.Pair`` -> ``(first, second)``."""
    if not isinstance(obj, dict) or not set(obj) <= {'t', 'u'}:
        raise GsonError(reason='%s must be a Pair {"t": ..., "u": ...}; got '
                        '%s' % (what, short(obj)))
    return obj.get('t'), obj.get('u')
