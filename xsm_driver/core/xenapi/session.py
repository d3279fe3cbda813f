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

"""A connection to one pool master over the XenAPI.

:class:`Pool` logs in with ``XenAPI.Session(url).login_with_password`` on
first use and serialises its calls (the XML-RPC proxy is not thread-safe;
every call is short: long operations are ``Async.*`` tasks that are
polled). Expired sessions are handled by the ``XenAPI`` client itself: on
``SESSION_INVALID`` it logs in again and repeats the call, which is safe
because xapi did nothing. A lost connection is retried only for calls that
change nothing (``safe=True``: reads, ``assert_can_migrate``,
``task.cancel``); for a call that starts something the caller finds out
what happened (see ``engine``). The password is never logged, and never
shown by ``repr``.
"""

import http.client
import logging
import os
import ssl
import threading
import time
import urllib.parse
import xml.parsers.expat
import xmlrpc.client

import XenAPI

from xsm_driver.core.xenapi import errors

LOG = logging.getLogger(__name__)

#: Failure to reach the pool master: the connection broke or timed out.
CONNECTION_ERRORS = (OSError, http.client.HTTPException)

#: The server answered, but not as a XenAPI pool master does: not
#: XML-RPC (an HTML page, a proxy's error), an HTTP error status, or
#: XML-RPC without xapi's envelope (the ``XenAPI`` client then fails with
#: a ``TypeError`` or ``IndexError`` of its own).
NOT_XENAPI_ERRORS = (xml.parsers.expat.ExpatError,
                     xmlrpc.client.ProtocolError,
                     xmlrpc.client.ResponseError)


def _envelope_error(exc):
    """``exc`` is the XenAPI client failing on an answer without envelope.

    (Its ``_parse_result`` concatenates a non-string answer to a message,
    or indexes an empty ``ErrorDescription``.) A ``TypeError`` anywhere
    else -- e.g. an argument XML-RPC cannot send -- is a bug, not the
    pool's fault, and is not caught as this.
    """
    if not isinstance(exc, (TypeError, IndexError)):
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name == '_parse_result'


ORIGINATOR = 'xsm-driver'


class ConnectionLost(errors.PoolUnreachable):
    """The connection broke during a call (it may or may not have run)."""


def _short(exc, limit=200):
    text = ' '.join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + '...'


def check_url(url, pool=None):
    """Refuse a pool URL the XenAPI client cannot use, without echoing it.

    :raises errors.PoolUnreachable: not ``https://HOST[:PORT]/...`` or
        ``http://...``, or it carries a user name or password (give them
        in the ``[xenapi]`` options instead).

    >>> check_url('https://xs-a.example.net')
    'https://xs-a.example.net'
    """
    try:
        parts = urllib.parse.urlsplit(url or '')
        parts.port
    except ValueError as exc:
        reason = 'it is not a valid URL (%s)' % exc
    else:
        if parts.scheme not in ('https', 'http'):
            reason = 'the scheme must be https (or http), not %r' % (
                parts.scheme or '')
        elif not parts.hostname:
            reason = 'it names no host'
        elif parts.username or parts.password:
            reason = ('it must not carry a user name or password: give '
                      'them in the [xenapi] options')
        else:
            return url
    raise errors.PoolUnreachable(
        pool=pool or '?', code='BAD_URL',
        url=url if '@' not in (url or '') else '<a URL with credentials>',
        reason='the pool URL is unusable: %s' % reason)


def _transport(url, timeout, ca_file, insecure):
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == 'https':
        if insecure:
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=ca_file)
        transport = _TimeoutSafeTransport(context=ctx)
    elif scheme == 'http':
        transport = _TimeoutTransport()
    else:
        raise ValueError('XenAPI URL %r: the scheme must be https or http'
                         % url)
    transport.timeout = timeout
    return transport


class _TransportMixin:
    """A timeout, and a switch for the stdlib's silent second attempt.

    ``xmlrpc.client`` sends a request again when the connection it kept
    turns out to be closed: harmless for a read, a second migration for
    ``Async.VM.migrate_send``. ``single`` turns that off (and the caller
    opens a fresh connection first).
    """

    timeout = None
    single = False

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn

    def request(self, host, handler, request_body, verbose=False):
        if self.single:
            return self.single_request(host, handler, request_body,
                                       verbose)
        return super().request(host, handler, request_body, verbose)


class _TimeoutTransport(_TransportMixin, xmlrpc.client.Transport):
    pass


class _TimeoutSafeTransport(_TransportMixin, xmlrpc.client.SafeTransport):
    pass


def parse_pool_spec(spec, default_username=None, default_password=None):
    """``NAME,URL[,USERNAME[,PASSWORD]]`` -> ``(name, url, user, password)``.

    The password is the rest of the line: it may contain commas.

    >>> parse_pool_spec('b,https://xs-b,root,p,w', 'u', 'x')
    ('b', 'https://xs-b', 'root', 'p,w')
    >>> parse_pool_spec('b,https://xs-b', 'u', 'x')
    ('b', 'https://xs-b', 'u', 'x')
    """
    parts = spec.split(',', 3)
    if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
        # Never echo the spec: it may hold a password.
        raise ValueError('a destination pool is NAME,URL[,USERNAME['
                         ',PASSWORD]]; one entry of [xenapi]'
                         'destination_pools has no name or no URL')
    name, url = parts[0].strip(), parts[1].strip()
    username = parts[2].strip() if len(parts) > 2 and parts[2].strip() \
        else default_username
    password = parts[3] if len(parts) > 3 else default_password
    return name, url, username, password


class Pool:
    """A XenServer or XCP-ng pool, reached through its master.

    :param name: what operators call the pool (a migration's destination).
    :param url: the master's URL (``https://...``).
    :param username: a pool administrator (``root`` or an RBAC role that
        may migrate VMs).
    :param password: its password; never logged.
    :param ca_file: CA bundle to check the master's HTTPS certificate
        (default: the system's).
    :param insecure: do not check it (for tests only).
    :param timeout: seconds for connecting and for each call.
    :param retries: attempts again of a safe call after a lost connection.
    :param retry_interval: seconds between those attempts.
    """

    def __init__(self, name, url, username, password, ca_file=None,
                 insecure=False, timeout=60.0, retries=3,
                 retry_interval=1.0):
        self.name = name
        self.url = url
        self.username = username
        self._password = password
        self._ca_file = ca_file
        self._insecure = insecure
        self.timeout = timeout
        self.retries = retries
        self.retry_interval = retry_interval
        self._session = None
        self._transport = None
        self._lock = threading.RLock()

    def __repr__(self):
        return '<Pool %s %s user=%s>' % (self.name, self.url, self.username)

    # -- session -------------------------------------------------------------

    def _login(self):
        check_url(self.url, self.name)
        # the connection of a dropped session (or of the master we were
        # sent away from) is not used any more (we hold the lock)
        self._close_transport()
        self._transport = _transport(self.url, self.timeout, self._ca_file,
                                     self._insecure)
        session = XenAPI.Session(self.url, transport=self._transport)
        try:
            session.login_with_password(self.username, self._password,
                                        '2.0', ORIGINATOR)
        except XenAPI.Failure as exc:
            details = [str(d) for d in exc.details]
            if details[0] == 'HOST_IS_SLAVE' and len(details) > 1:
                master = details[1]
                parts = urllib.parse.urlsplit(self.url)
                port = ':%d' % parts.port if parts.port else ''
                new = parts._replace(netloc=master + port).geturl()
                LOG.warning('pool %s: %s is not the pool master; using the '
                            'master %s', self.name, self.url, new)
                self.url = new
                return self._login()
            if details[0] == 'SESSION_AUTHENTICATION_FAILED':
                raise errors.PoolUnreachable(
                    pool=self.name, url=self.url, code=details[0],
                    reason='user %s was refused: wrong user name or '
                    'password (check the [xenapi] options)' % self.username)
            raise errors.PoolUnreachable(
                pool=self.name, url=self.url, code=details[0],
                reason='login failed: %s' % ' '.join(details))
        except xmlrpc.client.Fault as exc:
            raise errors.PoolUnreachable(pool=self.name, url=self.url,
                                         reason='login failed: %s'
                                         % exc.faultString)
        LOG.info('pool %s: logged in to %s as %s', self.name, self.url,
                 self.username)
        return session

    def _drop(self):
        """Forget the connection; the next call logs in again."""
        self._session = None

    def _close_transport(self):
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.close()
            except Exception as exc:
                LOG.debug('pool %s: closing the connection: %s', self.name,
                          exc)

    def logout(self):
        """End the session and close its connection to the master."""
        with self._lock:
            session, self._session = self._session, None
            transport, self._transport = self._transport, None
        try:
            if session is not None:
                try:
                    session.xenapi.session.logout()
                except Exception as exc:
                    LOG.debug('pool %s: logout: %s', self.name, exc)
        finally:
            if transport is not None:
                transport.close()

    # -- HTTP handlers -------------------------------------------------------

    def put(self, path, query, filename, chunk=1 << 20):
        """PUT a file to an HTTP handler of the master (``/import_raw_vdi``).

        With this pool's session (``session_id``), TLS settings and
        timeout; the body has a Content-Length (xapi's import handlers
        refuse ``Transfer-Encoding``, import_raw_vdi.ml).

        :returns: the HTTP status.
        :raises errors.PoolUnreachable: the master cannot be reached.
        """
        with self._lock:
            if self._session is None:
                self._session = self._login()
            session = self._session._session
        parts = urllib.parse.urlsplit(self.url)
        query = dict(query, session_id=session)
        target = '%s?%s' % (path, urllib.parse.urlencode(sorted(
            query.items())))
        if parts.scheme == 'https':
            ctx = (ssl._create_unverified_context() if self._insecure else
                   ssl.create_default_context(cafile=self._ca_file))
            conn = http.client.HTTPSConnection(parts.hostname, parts.port,
                                               timeout=self.timeout,
                                               context=ctx)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                              timeout=self.timeout)
        length = os.path.getsize(filename)
        try:
            conn.putrequest('PUT', target)
            conn.putheader('Content-Length', str(length))
            conn.putheader('Content-Type', 'application/octet-stream')
            conn.endheaders()
            with open(filename, 'rb') as f:
                while True:
                    data = f.read(chunk)
                    if not data:
                        break
                    conn.send(data)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException) as exc:
            raise errors.PoolUnreachable(
                pool=self.name, url=self.url, reason='PUT %s failed: %s: %s'
                % (path, type(exc).__name__, exc))
        finally:
            conn.close()

    # -- calls ---------------------------------------------------------------

    def call(self, method, *args, safe=True):
        """Call ``method`` (e.g. ``'VM.get_record'``) with ``args``.

        :param safe: the call changes nothing, so it may be sent again
            after a lost connection.
        :raises XenAPI.Failure: xapi refused the call (translate it with
            :func:`errors.translate`, which knows the context).
        :raises ConnectionLost: the connection broke during an unsafe call
            (it may or may not have run), or during every attempt of a
            safe one.
        :raises errors.PoolUnreachable: the master cannot be reached or
            refuses to log us in.
        """
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            sent = False
            try:
                with self._lock:
                    if self._session is None:
                        self._session = self._login()
                    func = self._session.xenapi
                    for part in method.split('.'):
                        func = getattr(func, part)
                    if not safe:
                        self._transport.close()
                    self._transport.single = not safe
                    try:
                        sent = True
                        return func(*args)
                    finally:
                        self._transport.single = False
            except XenAPI.Failure:
                raise
            except xmlrpc.client.Fault as exc:
                # the client's own failures: e.g. "Tried 3 times to get a
                # valid session" when a new session expires at once.
                self._drop()
                raise errors.PoolUnreachable(
                    pool=self.name, url=self.url,
                    reason='%s failed: %s' % (method, exc.faultString))
            except ssl.SSLCertVerificationError as exc:
                self._drop()
                raise errors.PoolUnreachable(
                    pool=self.name, url=self.url, reason='the master\'s '
                    'HTTPS certificate is not trusted (%s): give its CA in '
                    '[xenapi]ca_file' % exc.verify_message)
            except (NOT_XENAPI_ERRORS + (TypeError, IndexError)) as exc:
                if isinstance(exc, (TypeError, IndexError)) and \
                        not _envelope_error(exc):
                    raise
                self._drop()
                raise errors.PoolUnreachable(
                    pool=self.name, url=self.url, code='NOT_XENAPI',
                    reason='the server there does not answer as a XenAPI '
                    'pool master (%s during %s: %s); check [xenapi]url and '
                    'the URLs of [xenapi]destination_pools'
                    % (type(exc).__name__, method, _short(exc)))
            except CONNECTION_ERRORS as exc:
                self._drop()
                reason = '%s: %s' % (type(exc).__name__, exc)
                if isinstance(exc, TimeoutError):
                    # The master took the whole call_timeout: trying again
                    # would keep the caller waiting that long each time.
                    raise ConnectionLost(
                        pool=self.name, url=self.url, maybe_ran=sent,
                        reason='the pool master did not answer %s within '
                        '%.0f s (%s)%s' % (method, self.timeout, reason,
                                           '; it may or may not have run'
                                           if not safe else ''))
                if sent and not safe:
                    raise ConnectionLost(
                        pool=self.name, url=self.url, maybe_ran=True,
                        reason='lost the connection during %s (%s); it may '
                        'or may not have run' % (method, reason))
                if attempt >= attempts:
                    raise ConnectionLost(
                        pool=self.name, url=self.url, maybe_ran=sent,
                        reason='cannot reach the pool master for %s after '
                        '%d attempts (%s)' % (method, attempts, reason))
                LOG.warning('pool %s: lost the connection during %s (%s); '
                            'trying again (%d/%d)', self.name, method,
                            reason, attempt, attempts - 1)
                time.sleep(self.retry_interval)
