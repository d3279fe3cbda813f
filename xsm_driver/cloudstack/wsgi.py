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

"""xsm-cloudstack-api over HTTP: a WSGI application and its server.

Routes:

``GET|POST <api_path>`` (default ``/client/api``)
    CloudStack's API, ``response=json``, signed (:mod:`signature`). A
    refused request is answered with CloudStack's error shape and the
    error code as HTTP status::

        401 {"listvolumesresponse": {"uuidList": [], "errorcode": 401,
             "errortext": "unable to verify user credentials and/or
             request signature"}}
        431 {"listvolumesresponse": {"uuidList": [], "errorcode": 431,
             "cserrorcode": 9999, "errortext": "Unable to execute API
             command listvolumes due to invalid value. ..."}}
        432 {"errorresponse": {"uuidList": [], "errorcode": 432,
             "cserrorcode": 9999, "errortext": "The given command does not
             exist or it is not available for user"}}

``POST /xsm/v1/hosts/<host>/commands``
    CloudStack agent commands for ``host`` in Gson JSON
    (``[{"com.cloud.agent.api.X": {...}}]``); the answers in the same form,
    one per command. Needs ``Authorization: Bearer <command_token>``.

The server is the standard library's ``wsgiref``, its connections served
by a bounded pool of ``workers`` threads (an asynchronous job's polls must
not wait for a long command, so more than one), and bounded against
clients that connect and say nothing, dribble, or send large bodies
without credentials:

* at most ``max_connections`` connections are queued or served at once;
  one more is answered 503 and closed at once (logged once per burst);
* a request (request line, headers and body) must arrive whole within
  ``request_timeout`` seconds of the connection being accepted, and each
  write of the answer must go through within that time; then the
  connection is closed;
* an API request's form body -- its parameters, read before the signature
  they carry can be checked -- may be ``max_api_body`` bytes at most: a
  larger one is refused (413) unread. The command endpoint checks its
  bearer token before it reads a body of up to :data:`MAX_BODY` bytes.
"""

import concurrent.futures
import datetime
import hmac
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from urllib import parse
from wsgiref import simple_server

from xsm_driver.cloudstack import api as api_mod
from xsm_driver.cloudstack import gson
from xsm_driver.cloudstack import jobs as jobs_mod
from xsm_driver.cloudstack import resource as resource_mod
from xsm_driver.cloudstack import signature

LOG = logging.getLogger(__name__)

_COMMANDS = re.compile(r'^/xsm/v1/hosts/([^/]+)/commands/?$')
_JSON = 'application/json; charset=UTF-8'
MAX_BODY = 16 << 20                 # commands, once the token is checked
MAX_API_BODY = 64 << 10             # API parameters, before the signature
WORKERS = 16
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 30.0
# Seconds server_close() waits for the workers (an answer being computed
# may take long: a migration command waits for its migration).
STOP_TIMEOUT = 5.0

_REASONS = {200: 'OK', 400: 'Bad Request', 401: 'Unauthorized',
            403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
            408: 'Request Timeout', 413: 'Payload Too Large',
            431: 'Parameter Error',
            432: 'Unsupported Action', 530: 'Internal Error',
            533: 'Insufficient Capacity', 534: 'Resource Unavailable'}


def _status(code):
    return '%d %s' % (code, _REASONS.get(code, 'Error'))


class BadRequest(Exception):
    """A request whose parameters cannot be read."""

    def __init__(self, code, text):
        super().__init__(text)
        self.code = code
        self.text = text


class Application:
    """The WSGI application of xsm-cloudstack-api.

    :param api: an :class:`~xsm_driver.cloudstack.api.API`.
    :param keys: secret keys by API key.
    :param api_path: URL path of the API.
    :param command_token: bearer token of the command endpoint (None:
        endpoint disabled).
    :param now: returns the current aware datetime (tests replace it).
    :param max_api_body: largest form body of an API request, in bytes.
    """

    def __init__(self, api, keys, api_path='/client/api',
                 command_token=None, require_expires=False, max_expires=0,
                 now=None, max_api_body=MAX_API_BODY):
        self.api = api
        self.keys = dict(keys)
        self.api_path = '/' + api_path.strip('/')
        self.command_token = command_token
        self.require_expires = require_expires
        self.max_expires = max_expires
        self.max_api_body = max_api_body
        self.now = now or (lambda: datetime.datetime.now(
            datetime.timezone.utc))

    def __call__(self, environ, start_response):
        path = environ.get('PATH_INFO') or '/'
        method = environ.get('REQUEST_METHOD', 'GET')
        try:
            if path.rstrip('/') == self.api_path:
                code, body = self._api(environ, method)
            else:
                match = _COMMANDS.match(path)
                if match:
                    code, body = self._commands(environ, method,
                                                parse.unquote(match.group(1)))
                else:
                    code, body = 404, {'errortext': 'no such path %s (the '
                                       'API is at %s)' % (path,
                                                          self.api_path)}
        except Exception as exc:        # never a bare 500 page
            LOG.exception('%s %s failed', method, path)
            code, body = 530, {'errorresponse': jobs_mod.exception_response(
                530, '%s: %s' % (type(exc).__name__, exc),
                jobs_mod.CS_CLOUD_RUNTIME)}
        text = body if isinstance(body, str) else json.dumps(body)
        data = text.encode('utf-8')
        start_response(_status(code), [('Content-Type', _JSON),
                                       ('Content-Length', str(len(data)))])
        return [data]

    # -- the API -------------------------------------------------------------

    @staticmethod
    def _read(environ, limit=MAX_BODY, what='request body'):
        """The body, refused (413) unread when Content-Length > limit."""
        try:
            length = int(environ.get('CONTENT_LENGTH') or 0)
        except ValueError:
            length = 0
        if length > limit:
            raise BadRequest(413, '%s of %d bytes is larger than %d bytes'
                             % (what, length, limit))
        if not length:
            return b''
        try:
            data = environ['wsgi.input'].read(length)
        except OSError as exc:             # socket.timeout among them
            raise BadRequest(408, '%s not received: %s' % (what, exc))
        if len(data) < length:
            raise BadRequest(400, '%s cut short: %d of %d bytes'
                             % (what, len(data), length))
        return data

    def _params(self, environ, method):
        pairs = parse.parse_qsl(environ.get('QUERY_STRING', ''),
                                keep_blank_values=True)
        ctype = environ.get('CONTENT_TYPE', '')
        if method == 'POST' and ctype.startswith(
                'application/x-www-form-urlencoded'):
            # The signature is among the parameters: the body must be read
            # before it can be checked, so only a small one is.
            try:
                body = self._read(environ, self.max_api_body,
                                  'API request body (unsigned until '
                                  'read)').decode('utf-8')
            except UnicodeDecodeError as exc:
                raise BadRequest(jobs_mod.PARAM_ERROR,
                                 'the request body is not UTF-8 form data '
                                 '(%s)' % exc)
            pairs += parse.parse_qsl(body, keep_blank_values=True)
        params = {}
        for key, value in pairs:
            params.setdefault(key, value)   # the first value, as CloudStack
        return params

    def _api(self, environ, method):
        if method not in ('GET', 'POST'):
            return 405, {'errortext': 'use GET or POST'}
        try:
            params = self._params(environ, method)
        except BadRequest as exc:
            LOG.warning('refused a request from %s: %s',
                        environ.get('REMOTE_ADDR'), exc.text)
            return exc.code, {'errorresponse': jobs_mod.exception_response(
                exc.code, exc.text, jobs_mod.CS_SERVER_API)}
        command = params.get('command') or ''
        if not self.api.knows(command):
            # ApiServer.verifyRequest checks that the command exists
            # before the signature: 432, named "errorresponse"
            # (ApiServer.getSerializedApiError, UNSUPPORTED_ACTION_ERROR)
            LOG.warning('refused unknown command %r from %s', command,
                        environ.get('REMOTE_ADDR'))
            exc = api_mod.unknown_command()
            return exc.code, {'errorresponse': jobs_mod.exception_response(
                exc.code, exc.text, exc.cserrorcode)}
        key = '%sresponse' % command.lower()
        try:
            api_key = signature.verify(params, self.keys, self.now(),
                                       self.require_expires,
                                       self.max_expires)
        except signature.SignatureError as exc:
            LOG.warning('refused %s from %s: %s', command or 'a request',
                        environ.get('REMOTE_ADDR'), exc)
            # ApiServlet answers getSerializedApiError(401, text, ...): an
            # ExceptionResponse without cserrorcode
            return 401, {key: {'uuidList': [], 'errorcode': 401,
                               'errortext': exc.public}}
        LOG.info('%s by %s', command, api_key)
        try:
            return 200, {key: self.api.call(command, params)}
        except api_mod.ApiError as exc:
            LOG.warning('%s refused: %s', command, exc.text)
            return exc.code, {key: jobs_mod.exception_response(
                exc.code, exc.text, exc.cserrorcode)}

    # -- agent commands ------------------------------------------------------

    def _commands(self, environ, method, host):
        if not self.command_token:
            return 403, {'errortext': 'the command endpoint is disabled: '
                         'set [cloudstack]command_token'}
        auth = environ.get('HTTP_AUTHORIZATION', '')
        if not hmac.compare_digest(
                auth.encode(), ('Bearer %s' % self.command_token).encode()):
            return 401, {'errortext': 'a valid Authorization: Bearer token '
                         'is required'}
        if method != 'POST':
            return 405, {'errortext': 'POST the commands'}
        hosts = self.api.clients
        if host not in hosts:
            return 404, {'errortext': 'host %s is not managed here (hosts: '
                         '%s)' % (host, ', '.join(sorted(hosts)))}
        try:
            body = self._read(environ)
        except BadRequest as exc:
            return exc.code, {'errortext': exc.text}
        try:
            return 200, self.api.resource(host).handle(body)
        except gson.GsonError as exc:
            return 400, {'errortext': str(exc)}


class _DeadlineReader(io.RawIOBase):
    """Reads a socket until a deadline, however slowly the bytes come.

    A socket timeout alone bounds each read, not the request: a client
    sending one byte now and then would hold a worker for ever.
    """

    def __init__(self, sock, deadline, timeout):
        super().__init__()
        self._sock = sock
        self._deadline = deadline
        self._timeout = timeout

    def readable(self):
        return True

    def readinto(self, buf):
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('the request did not arrive within %.0f s'
                                 % self._timeout)
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buf)
        finally:
            # the answer's writes get the whole timeout each
            self._sock.settimeout(self._timeout)


class _Handler(simple_server.WSGIRequestHandler):

    def setup(self):
        self.timeout = self.server.request_timeout
        super().setup()
        deadline = self.server.accepted_at(self.request) + self.timeout
        self.rfile.close()
        self.rfile = io.BufferedReader(
            _DeadlineReader(self.connection, deadline, self.timeout))

    def log_message(self, fmt, *args):
        LOG.debug('%s %s', self.address_string(), fmt % args)


def admit(connections, max_connections):
    """Whether one more connection may be queued or served.

    >>> admit(63, 64), admit(64, 64)
    (True, False)
    """
    return connections < max_connections


_BUSY = (b'HTTP/1.0 503 Service Unavailable\r\nContent-Type: '
         b'application/json; charset=UTF-8\r\nContent-Length: 46\r\n'
         b'Connection: close\r\n\r\n'
         b'{"errortext": "too many connections, retry"}\n')


class BoundedWSGIServer(simple_server.WSGIServer):
    """A WSGI server whose connections a bounded pool of threads serves.

    :param workers: threads serving connections.
    :param max_connections: connections queued or served at once; one
        more is answered 503 and closed at once.
    :param request_timeout: seconds a request has to arrive whole from
        its connection's acceptance, and each write of its answer.
    """

    allow_reuse_address = True
    request_queue_size = 128            # listen backlog (socketserver: 5)

    def __init__(self, address, handler_class, workers=WORKERS,
                 max_connections=MAX_CONNECTIONS,
                 request_timeout=REQUEST_TIMEOUT):
        self.workers = workers
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.refused = 0
        self._burst = 0
        self._lock = threading.Lock()
        self._open = {}                    # socket: when it was accepted
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix='xsm-cloudstack-api')
        super().__init__(address, handler_class)

    @property
    def connections(self):
        with self._lock:
            return len(self._open)

    def accepted_at(self, request):
        with self._lock:
            return self._open.get(request, time.monotonic())

    def process_request(self, request, client_address):
        with self._lock:
            ok = admit(len(self._open), self.max_connections)
            if ok:
                self._open[request] = time.monotonic()
                if self._burst:
                    LOG.info('accepting connections again; %d refused '
                             'over max_connections (%d)', self._burst,
                             self.max_connections)
                    self._burst = 0
            else:
                self.refused += 1
                self._burst += 1
                if self._burst == 1:
                    LOG.warning('max_connections (%d) reached: refusing '
                                'connections (counted, not logged, until '
                                'one is accepted)', self.max_connections)
        if not ok:
            self._refuse(request)
            return
        try:
            self._pool.submit(self._serve, request, client_address)
        except RuntimeError:               # the pool is shut down
            self._done(request)

    def _refuse(self, request):
        try:
            request.setblocking(False)
            request.send(_BUSY)
        except OSError:
            pass
        self._done(request, known=False)

    def _serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._done(request)

    def _done(self, request, known=True):
        if known:
            with self._lock:
                self._open.pop(request, None)
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        # a client that timed out or went away: one line, no traceback
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            LOG.info('connection from %s closed: %s', client_address[0],
                     exc or type(exc).__name__)
        else:
            LOG.exception('connection from %s failed', client_address[0])

    def server_close(self):
        """Stop listening, close every connection, stop the workers."""
        super().server_close()
        with self._lock:
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in list(self._pool._threads):
            thread.join(max(deadline - time.monotonic(), 0))
        with self._lock:                   # queued, never served
            left = list(self._open)
            self._open.clear()
        for sock in left:
            self.shutdown_request(sock)


def make_server(app, address='127.0.0.1', port=8080, workers=WORKERS,
                max_connections=MAX_CONNECTIONS,
                request_timeout=REQUEST_TIMEOUT):
    """A server (not yet serving) of ``app``; port 0 picks a free one."""
    server = BoundedWSGIServer((address, port), _Handler, workers=workers,
                               max_connections=max_connections,
                               request_timeout=request_timeout)
    server.set_app(app)
    return server


def build(conf, transport):
    """The application from the ``[cloudstack]`` options.

    :param conf: an ``oslo_config.cfg.ConfigOpts`` with them registered.
    :param transport: the RPC transport to the agents.
    """
    from xsm_driver.core.rpc import api as rpc_api
    opts = conf.cloudstack
    clients = {host: rpc_api.AgentAPI(transport, host,
                                      timeout=opts.rpc_timeout)
               for host in opts.hosts}
    resources = {}

    def resource(host):
        if host not in resources:
            resources[host] = resource_mod.Resource(
                host, clients.__getitem__, opts.hosts, opts.sr_labels,
                migration_timeout=opts.migration_timeout)
        return resources[host]

    api = api_mod.API(clients, resource, jobs_mod.Jobs(opts.job_retention))
    return Application(api, opts.api_keys, api_path=opts.api_path,
                       command_token=opts.command_token,
                       require_expires=opts.require_expires,
                       max_expires=opts.max_expires_seconds,
                       max_api_body=opts.max_api_body)
