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

``POST /xsm/v1/hosts/<host>/commands``
    CloudStack agent commands for ``host`` in Gson JSON
    (``[{"com.cloud.agent.api.X": {...}}]``); the answers in the same form,
    one per command. Needs ``Authorization: Bearer <command_token>``.

The server is the standard library's ``wsgiref`` with a thread per
request (an asynchronous job's polls must not wait for a long command).
"""

import datetime
import hmac
import json
import logging
import re
import socketserver
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
MAX_BODY = 16 << 20

_REASONS = {200: 'OK', 400: 'Bad Request', 401: 'Unauthorized',
            403: 'Forbidden', 404: 'Not Found', 405: 'Method Not Allowed',
            413: 'Payload Too Large', 431: 'Parameter Error',
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
    """

    def __init__(self, api, keys, api_path='/client/api',
                 command_token=None, require_expires=True, max_expires=0,
                 now=None):
        self.api = api
        self.keys = dict(keys)
        self.api_path = '/' + api_path.strip('/')
        self.command_token = command_token
        self.require_expires = require_expires
        self.max_expires = max_expires
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
            code, body = 530, {'errorcode': 530, 'errortext': '%s: %s' % (
                type(exc).__name__, exc)}
        text = body if isinstance(body, str) else json.dumps(body)
        data = text.encode('utf-8')
        start_response(_status(code), [('Content-Type', _JSON),
                                       ('Content-Length', str(len(data)))])
        return [data]

    # -- the API -------------------------------------------------------------

    @staticmethod
    def _read(environ):
        try:
            length = int(environ.get('CONTENT_LENGTH') or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            raise BadRequest(413, 'request body of %d bytes is larger than '
                             '%d bytes' % (length, MAX_BODY))
        return environ['wsgi.input'].read(length) if length else b''

    def _params(self, environ, method):
        pairs = parse.parse_qsl(environ.get('QUERY_STRING', ''),
                                keep_blank_values=True)
        ctype = environ.get('CONTENT_TYPE', '')
        if method == 'POST' and ctype.startswith(
                'application/x-www-form-urlencoded'):
            try:
                body = self._read(environ).decode('utf-8')
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
            return exc.code, {'errorresponse': {
                'uuidList': [], 'errorcode': exc.code,
                'errortext': exc.text}}
        command = params.get('command') or ''
        key = '%sresponse' % (command.lower() or 'error')
        try:
            api_key = signature.verify(params, self.keys, self.now(),
                                       self.require_expires,
                                       self.max_expires)
        except signature.SignatureError as exc:
            LOG.warning('refused %s from %s: %s', command or 'a request',
                        environ.get('REMOTE_ADDR'), exc)
            return 401, {key: {'uuidList': [], 'errorcode': 401,
                               'errortext': exc.public}}
        if not command:
            return 432, {key: {'uuidList': [], 'errorcode': 432,
                               'errortext': 'no command given'}}
        LOG.info('%s by %s', command, api_key)
        try:
            return 200, {key: self.api.call(command, params)}
        except api_mod.ApiError as exc:
            LOG.warning('%s refused: %s', command, exc.text)
            return exc.code, {key: {'uuidList': [], 'errorcode': exc.code,
                                    'errortext': exc.text}}

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


class _Handler(simple_server.WSGIRequestHandler):

    def log_message(self, fmt, *args):
        LOG.debug('%s %s', self.address_string(), fmt % args)


class ThreadingWSGIServer(socketserver.ThreadingMixIn,
                          simple_server.WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(app, address='127.0.0.1', port=8080):
    """A server (not yet serving) of ``app``; port 0 picks a free one."""
    return simple_server.make_server(address, port, app,
                                     server_class=ThreadingWSGIServer,
                                     handler_class=_Handler)


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
                       max_expires=opts.max_expires_seconds)
