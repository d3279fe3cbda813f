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

"""CloudStack's API request signature (ApiServer.verifyRequest).

Every parameter but ``signature``, sorted by name, ``name=value`` with the
value URL-encoded as Java's ``URLEncoder`` does and ``+`` written ``%20``,
joined with ``&``, the whole string lower-cased; HMAC-SHA1 with the secret
key; Base64. With ``signatureVersion=3`` the request carries an
``expires`` time (``yyyy-MM-dd'T'HH:mm:ssZ``) and is refused after it.

Pure functions: the caller gives the time.
"""

import base64
import datetime
import hashlib
import hmac
import re
from urllib import parse

from xsm_driver.core import exception

#: what CloudStack answers to any request it cannot authenticate
MESSAGE = 'unable to verify user credentials and/or request signature'


class SignatureError(exception.XSMError):
    """A request that is unsigned, wrongly signed or expired.

    ``reason`` is for the log; ``public`` is what the caller is told.
    """

    msg_fmt = MESSAGE + ': %(reason)s'

    def __init__(self, message=None, public=None, **kwargs):
        super().__init__(message, **kwargs)
        self.public = public or MESSAGE


def java_encode(value):
    """``URLEncoder.encode(value, "UTF-8").replace("+", "%20")``.

    >>> java_encode('a b~c*d')
    'a%20b%7Ec*d'
    """
    return parse.quote(value, safe='*').replace('~', '%7E')


def _python_encode(value):
    # what clients built on urllib.parse.quote send (the cs package: '~'
    # stays as it is); CloudStack's own check lower-cases the string, so
    # the only difference that matters is '~'.
    return parse.quote(value, safe='*')


def string_to_sign(params, encode=java_encode):
    """The lower-cased ``k=v&...`` string of every parameter but signature.

    >>> string_to_sign({'command': 'listVolumes', 'apiKey': 'K',
    ...                 'signature': 'x', 'name': 'a b'})
    'apikey=k&command=listvolumes&name=a%20b'
    """
    items = sorted((k, v) for k, v in params.items()
                   if k.lower() != 'signature')
    return '&'.join('%s=%s' % (k, encode(v)) for k, v in items).lower()


def sign(params, secret, encode=java_encode):
    """The Base64 HMAC-SHA1 signature of ``params`` with ``secret``."""
    digest = hmac.new(secret.encode('utf-8'),
                      string_to_sign(params, encode).encode('utf-8'),
                      hashlib.sha1).digest()
    return base64.b64encode(digest).decode('ascii')


_TZ = re.compile(r'([+-]\d{2}):?(\d{2})$')


def parse_expires(text):
    """An ``expires`` value as an aware datetime; None if unreadable.

    >>> parse_expires('2026-11-26T10:00:00+0100').isoformat()
    '2026-11-26T10:00:00+01:00'
    >>> parse_expires('2026-11-26T09:00:00Z').isoformat()
    '2026-11-26T09:00:00+00:00'
    """
    text = text.strip()
    if text.endswith('Z'):
        text = text[:-1] + '+0000'
    text = _TZ.sub(r'\1\2', text)
    for fmt in ('%Y-%m-%dT%H:%M:%S%z', '%Y-%m-%dT%H:%M:%S.%f%z'):
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


def _get(params, name):
    for key, value in params.items():
        if key.lower() == name.lower():
            return value
    return None


def verify(params, keys, now, require_expires=False, max_expires=0):
    """Check a request's signature; return its API key.

    :param params: the request's parameters (one value each).
    :param keys: secret keys by API key.
    :param now: the current time, an aware datetime.
    :param require_expires: refuse requests without signatureVersion=3
        (CloudStack accepts them: it checks ``expires`` only when
        ``signatureVersion=3`` is given).
    :param max_expires: refuse an ``expires`` further than this many
        seconds ahead (0: no limit).
    :raises SignatureError: unsigned, unknown key, wrong signature,
        missing, unreadable or past ``expires``.
    """
    api_key = _get(params, 'apiKey')
    signature = _get(params, 'signature')
    if not api_key or not signature:
        raise SignatureError(reason='the request is not signed (apiKey and '
                             'signature are required)')
    secret = keys.get(api_key)
    if secret is None:
        raise SignatureError(reason='unknown apiKey %s' % api_key)
    version = _get(params, 'signatureVersion')
    expires = _get(params, 'expires')
    if version == '3' or require_expires:
        if version != '3' or not expires:
            raise SignatureError(reason='signatureVersion=3 and expires are '
                                 'required ([cloudstack]require_expires)')
        when = parse_expires(expires)
        if when is None:
            raise SignatureError(reason='expires %r is not yyyy-MM-dd\'T\''
                                 'HH:mm:ssZ' % expires)
        # CloudStack's ApiServer.verifyRequest only logs why ("Request
        # expired -- ignoring ...") and answers its fixed text: so here.
        if when <= now:
            raise SignatureError(reason='the request expired at %s'
                                 % expires)
        if max_expires and (when - now).total_seconds() > max_expires:
            raise SignatureError(
                reason='expires %s is more than %d s ahead '
                '([cloudstack]max_expires_seconds)' % (expires, max_expires))
    for encode in (java_encode, _python_encode):
        if hmac.compare_digest(sign(params, secret, encode).encode(),
                               signature.encode()):
            return api_key
    raise SignatureError(reason='wrong signature for apiKey %s' % api_key)
