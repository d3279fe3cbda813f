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

"""The client side of the agent's RPC API.

API version history:

* 1.0 - first version: hosts, VMs and their verifying guests, migrations
  as source (``migrate_vm``, ``migrate_vdi``, ``migration_*``) and as
  destination (``receive_*``).
* 1.1 - the destination may prepare the receive before the source starts
  (Nova's order): ``migrate_vm_begin``, ``receive_prepare_ahead``,
  ``receive_claim``; ``migrate_vm`` takes ``migration_id`` and
  ``receive``; ``migration_abort`` drops a begun migration; ``vdi_import``
  writes an image file into a VDI.
* 1.2 - leases: ``receive_renew``, which a source that says so in its
  request (``spec['renews']``) calls while its migration runs; the
  destination rolls back a receive whose lease runs out.
  ``receive_status`` answers ``expired`` too.
* 1.3 - the switch-over's commit rule (doc/source/switch-over.rst):
  ``migration_resolve`` settles a migration in doubt;
  ``receive_status`` answers ``committed`` too.
* 1.4 - QEMU guests: ``vm_create`` takes ``qemu`` (the guest's memory,
  vCPUs, kernel and verifier options); ``vm_pause``, ``vm_resume``,
  ``vm_reboot`` and ``vm_console`` (the guest's serial console).
  ``vm_get`` and ``vm_list`` answer the power state the guest has now.
* 1.5 - clean stops: ``vm_stop`` takes ``clean`` (ask the guest to power
  off by ACPI, kill it only after ``timeout`` seconds, at most
  :data:`MAX_STOP_TIMEOUT`) and answers ``clean``, whether the guest
  powered off by itself. A call without them is sent as 1.0, as before.
* 1.6 - the switch-over's pause shortened: ``receive_stage_guest``
  takes the bulk of a model guest's state (its disks' models) before the
  pause, so that ``receive_complete``'s ``vm_state`` carries only what
  changed since (``workload.STAGED``). A source whose destination
  predates it sends the whole state in ``receive_complete``, as before.
"""

import importlib
import json

import oslo_messaging as messaging

from xsm_driver.core import rpc
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import local

VERSION = '1.6'
#: the version calls that exist since 1.0 are sent as, so that a 1.0 agent
#: still answers them
BASE_VERSION = '1.0'
#: the longest a clean vm_stop may leave a guest to power off, in seconds
MAX_STOP_TIMEOUT = 600
#: seconds a clean vm_stop's caller waits for the answer beyond its timeout
#: (the kill, SIGTERM then SIGKILL, and the disks' detach)
STOP_ANSWER_MARGIN = 60


def _register_messaging_opts(conf):
    # oslo.messaging 18 registers [oslo_messaging_metrics] and
    # [oslo_messaging_tracing] on the global cfg.CONF only, yet reads them
    # from the transport's conf on every call: a private ConfigOpts needs
    # them too.
    from oslo_messaging._metrics import client as metrics
    from oslo_messaging._tracing import client as tracing
    for group, opts in (('oslo_messaging_metrics',
                         metrics.oslo_messaging_metrics),
                        ('oslo_messaging_tracing',
                         tracing.oslo_messaging_tracing)):
        if group not in conf:
            conf.register_opts(opts, group=group)


def get_transport(conf, url=None):
    """An RPC transport that rebuilds xsm-driver's own exceptions.

    ``fake://`` (agents of one process) is oslo.messaging's fake driver
    without its 50 ms polling: see :mod:`xsm_driver.core.rpc.local`.
    """
    _register_messaging_opts(conf)
    exmods = rpc.ALLOWED_EXMODS + [auth.__name__]
    if url is not None:
        parsed = messaging.TransportURL.parse(conf, url)
        if parsed.transport == 'fake':
            return messaging.transport.RPCTransport(local.LocalDriver(
                conf, parsed, default_exchange=conf.control_exchange,
                allowed_remote_exmods=exmods))
    return messaging.get_rpc_transport(conf, url=url,
                                       allowed_remote_exmods=exmods)


def topic(exchange):
    """The RPC topic of the agents of one deployment.

    oslo.messaging names an RPC server's queue ``<topic>.<server>`` on
    whatever exchange: the deployment's ``control_exchange`` is part of
    the topic so that two deployments on one virtual host never share a
    queue (``.`` and ``%`` in it are escaped so that the first ``.`` of a
    queue name always ends the topic).

    >>> topic('xsm-driver'), topic('a.b')
    ('xsm-agent@xsm-driver', 'xsm-agent@a%2Eb')
    """
    return '%s@%s' % (rpc.TOPIC,
                      exchange.replace('%', '%25').replace('.', '%2E'))


def transport_topic(transport):
    """:func:`topic` of the ``control_exchange`` of ``transport``."""
    return topic(transport.conf.control_exchange)


def queue_name(exchange, host):
    """The RabbitMQ queue of the agent of ``host``."""
    return '%s.%s' % (topic(exchange), host)


def _rebuild(error):
    """The exception of a sealed error answer.

    As oslo.messaging rebuilds a remote error, but without appending the
    agent's traceback to its message: an exception of xsm-driver's own
    modules (or a built-in one) is itself again, any other a RemoteError.
    """
    try:
        failure = json.loads(error)
        name, module = failure['class'], failure['module']
        message = failure.get('message', '')
    except (ValueError, TypeError, KeyError):
        return messaging.RemoteError('unknown', str(error)[:200])
    if module in rpc.ALLOWED_EXMODS + [auth.__name__, 'builtins']:
        try:
            klass = getattr(importlib.import_module(module), name)
            if issubclass(klass, Exception):
                return klass(*failure.get('args', []),
                             **failure.get('kwargs', {}))
        except (ImportError, AttributeError, TypeError):
            pass
    return messaging.RemoteError(name, message, failure.get('tb'))


#: errors that may come unsealed from an agent: its refusal of a call, and
#: what oslo.messaging's dispatcher answers before the agent's code runs
_UNSEALED = ('NotAuthorized', 'NoSuchMethod', 'UnsupportedVersion')


def _unsealed_error(exc, host, method):
    """What the caller of a trusted host sees of an error it raised.

    An agent seals the errors of the calls it admits: an error that comes
    unsealed is a refusal, the dispatcher's, one of this process (a
    timeout, a lost connection), or forged -- then it is UntrustedAnswer.
    """
    if isinstance(exc, messaging.RemoteError):
        if exc.exc_type in _UNSEALED:
            return exc
    elif isinstance(exc, (auth.NotAuthorized, messaging.MessagingException)):
        return exc
    return auth.UntrustedAnswer(host=host, method=method, reason='an '
                                'unsigned error (%s: %s)' % (
                                    type(exc).__name__,
                                    str(exc).split('\n', 1)[0]))


#: AgentAPI's default credential and trust: those of the transport's
#: configuration (``[agent]operator_key_file``, ``trusted_hosts``)
FROM_CONF = object()


class AgentAPI:
    """Call the agent of ``host``.

    Calls are signed with ``credential`` (:mod:`auth`); when ``trust``
    lists hosts, only those are called and their answers must carry the
    called host's seal (an agent's calls to another always do).

    :param timeout: seconds to wait for an answer (None: the transport's
        ``rpc_response_timeout``).
    :param credential: an :class:`auth.Credential`, None (unsigned calls,
        which agents refuse), or :data:`FROM_CONF`: the operator
        credential of the transport's configuration
        (``[agent]operator_key_file`` and ``operator_name``), if any.
    :param trust: an :class:`auth.Trust`, None, or :data:`FROM_CONF`
        (``[agent]trusted_hosts`` of the transport's configuration).
    """

    def __init__(self, transport, host, timeout=None, credential=FROM_CONF,
                 trust=FROM_CONF):
        self.host = host
        if credential is FROM_CONF or trust is FROM_CONF:
            from xsm_driver.core.rpc import keys
            conf_credential, conf_trust = keys.client_settings(
                transport.conf)
            if credential is FROM_CONF:
                credential = conf_credential
            if trust is FROM_CONF:
                trust = conf_trust
        self._credential = credential
        self._trust = trust
        target = messaging.Target(topic=transport_topic(transport),
                                  server=host, version=BASE_VERSION)
        self._client = messaging.get_rpc_client(transport, target,
                                                timeout=timeout)

    def call(self, method, timeout=None, version=None, **kwargs):
        """Call ``method`` with ``kwargs``; wait ``timeout`` seconds."""
        return self.call_with(method, kwargs, timeout, version)

    def call_with(self, method, kwargs, timeout=None, version=None):
        """:meth:`call`, the arguments in a dict (one may be "timeout")."""
        client = self._client
        if timeout is not None or version is not None:
            client = client.prepare(**{k: v for k, v in (
                ('timeout', timeout), ('version', version)) if v is not None})
        public_key = None
        if self._trust is not None and self._trust.hosts:
            public_key = self._trust.key(auth.AGENT, self.host)
            if public_key is None:
                raise auth.UntrustedHost(host=self.host)
        context = {}
        envelope = None
        if self._credential is not None:
            envelope = self._credential.sign(self.host, method, kwargs)
            context[auth.CONTEXT_KEY] = envelope
        if public_key is None:
            reply = client.call(context, method, **kwargs)
        elif envelope is None:
            raise auth.UntrustedAnswer(
                host=self.host, method=method,
                reason='an unsigned call\'s answer cannot be checked')
        else:
            try:
                reply = client.call(context, method, **kwargs)
            except Exception as exc:
                raise _unsealed_error(exc, self.host, method)
            return auth.open_reply(reply, self.host, envelope, public_key,
                                   rebuild=_rebuild)
        if isinstance(reply, dict) and auth.REPLY_KEY in reply:
            return reply.get('result')      # (no key to check it with)
        return reply

    # hosts and VMs
    def host_info(self):
        return self.call('host_info')

    def vdi_list(self, sr=None):
        return self.call('vdi_list', sr=sr)

    def vm_list(self):
        return self.call('vm_list')

    def vm_get(self, vm):
        return self.call('vm_get', vm=vm)

    def vm_create(self, name, disks, vifs=(), qemu=None):
        if qemu is None:
            return self.call('vm_create', name=name, disks=disks,
                             vifs=list(vifs))
        return self.call('vm_create', version='1.4', name=name, disks=disks,
                         vifs=list(vifs), qemu=qemu)

    def vm_pause(self, vm):
        return self.call('vm_pause', version='1.4', vm=vm)

    def vm_resume(self, vm):
        return self.call('vm_resume', version='1.4', vm=vm)

    def vm_reboot(self, vm):
        return self.call('vm_reboot', version='1.4', vm=vm)

    def vm_console(self, vm, limit=1 << 20):
        """The last ``limit`` bytes of a QEMU guest's serial console."""
        return self.call('vm_console', version='1.4', vm=vm, limit=limit)

    def vm_start(self, vm):
        return self.call('vm_start', vm=vm)

    def vm_stop(self, vm, clean=None, timeout=None):
        """Stop the VM; see :meth:`agent.AgentEndpoint.vm_stop`.

        :param clean: True: ask the guest to power off (ACPI), kill it
            after ``timeout`` seconds (in (0, :data:`MAX_STOP_TIMEOUT`];
            None: the agent's ``[hypervisor]shutdown_timeout``); False:
            kill it at once; None: the agent's own way (as before 1.5).
            ``clean`` or ``timeout`` need an agent of 1.5 or later.
        :returns: the VM's record; from a 1.5 agent with ``clean``, True
            when the guest powered off by itself.
        :raises ValueError: a bad ``clean`` or ``timeout``.
        """
        if clean is None and timeout is None:
            return self.call('vm_stop', vm=vm)
        if timeout is not None and clean is not True:
            raise ValueError('a timeout is for a clean stop only '
                             '(clean=True)')
        if not isinstance(clean, bool):
            raise ValueError('clean must be True or False, not %r'
                             % (clean,))
        if timeout is not None:
            if (isinstance(timeout, bool) or
                    not isinstance(timeout, (int, float)) or
                    not 0 < timeout <= MAX_STOP_TIMEOUT):
                raise ValueError('timeout must be a number of seconds in '
                                 '(0, %d], not %r' % (MAX_STOP_TIMEOUT,
                                                      timeout))
            wait = timeout + STOP_ANSWER_MARGIN
            return self.call_with('vm_stop', {'vm': vm, 'clean': clean,
                                              'timeout': timeout},
                                  timeout=wait, version='1.5')
        return self.call('vm_stop', version='1.5', vm=vm, clean=clean)

    def vm_destroy(self, vm):
        return self.call('vm_destroy', vm=vm)

    def vm_snapshot(self, vm):
        return self.call('vm_snapshot', vm=vm)

    def guest_start(self, vm, rate=None, read_ratio=1.0, fill=0.0):
        return self.call('guest_start', vm=vm, rate=rate,
                         read_ratio=read_ratio, fill=fill)

    def guest_verify(self, vm):
        return self.call('guest_verify', vm=vm)

    def vdi_import(self, vdi, path, image_format):
        """Write an image file of this host into a VDI (new in 1.1)."""
        return self.call('vdi_import', version='1.1', vdi=vdi, path=path,
                         image_format=image_format)

    # migrations, as their source
    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None,
                   migration_id=None, receive=None, **options):
        if migration_id is None and receive is None:
            return self.call('migrate_vm', vm=vm, dest_host=dest_host,
                             vdi_map=vdi_map, vif_map=vif_map or {},
                             options=options)
        return self.call('migrate_vm', version='1.1', vm=vm,
                         dest_host=dest_host, vdi_map=vdi_map,
                         vif_map=vif_map or {}, options=options,
                         migration_id=migration_id, receive=receive)

    def migrate_vm_begin(self, vm, dest_host, vdi_map, vif_map=None,
                         **options):
        """Step 1 of the destination-prepares-ahead order (new in 1.1).

        :returns: ``{'id', 'request'}``; see
            :meth:`xsm_driver.core.migration.manager.Manager.migrate_vm_begin`.
        """
        return self.call('migrate_vm_begin', version='1.1', vm=vm,
                         dest_host=dest_host, vdi_map=vdi_map,
                         vif_map=vif_map or {}, options=options)

    def receive_prepare_ahead(self, request, prepared_timeout=None):
        """Step 2, on the destination (new in 1.1): prepare the receive.

        :returns: how to reach it; its export names are one-time secrets.
        """
        return self.call('receive_prepare_ahead', version='1.1',
                         spec=request, prepared_timeout=prepared_timeout)

    def migrate_vdi(self, vdi, dest_sr, **options):
        return self.call('migrate_vdi', vdi=vdi, dest_sr=dest_sr,
                         options=options)

    def migration_get(self, migration):
        return self.call('migration_get', migration=migration)

    def migration_list(self):
        return self.call('migration_list')

    def migration_abort(self, migration):
        return self.call('migration_abort', migration=migration)

    def migration_force_complete(self, migration):
        return self.call('migration_force_complete', migration=migration)

    def migration_resolve(self, migration):
        """Settle a migration in doubt (new in 1.3)."""
        return self.call('migration_resolve', version='1.3',
                         migration=migration)


#: what an agent that predates a call answers it (as oslo.messaging names
#: the errors of its dispatcher, which cross the bus as RemoteError)
_UNKNOWN_CALL = ('UnsupportedVersion', 'NoSuchMethod')


class RemotePeer:
    """The destination role of another host, over RPC (see source.py)."""

    def __init__(self, api):
        self._api = api

    def preflight(self, spec):
        return self._api.call('receive_preflight', spec=spec)

    def prepare(self, spec):
        return self._api.call('receive_prepare', spec=spec)

    def claim(self, mid, source_host):
        return self._api.call('receive_claim', version='1.1', migration=mid,
                              source_host=source_host)

    def renew(self, mid, timeout=None):
        """Renew the lease on a receive (new in 1.2).

        :param timeout: seconds to wait for the answer.
        :returns: the destination's answer (``{'lease_timeout'}``), or
            None from a destination older than 1.2 (it holds no lease).
        """
        return self._newer_call('receive_renew', '1.2', timeout=timeout,
                                migration=mid)

    def _newer_call(self, method, version, **kwargs):
        """Call ``method`` (new in ``version``); None from an older peer."""
        try:
            return self._api.call(method, version=version, **kwargs)
        except (messaging.UnsupportedVersion, messaging.NoSuchMethod):
            return None                 # (as the fake:// driver raises it)
        except messaging.RemoteError as exc:
            if exc.exc_type in _UNKNOWN_CALL:
                return None
            raise

    def compose(self, mid):
        return self._api.call('receive_compose', migration=mid)

    def stage_guest(self, mid, models):
        """Send the guest's models ahead of the pause (new in 1.6).

        :returns: the destination's answer (``{'staged': n}``), or None
            from a destination older than 1.6 (the commit then carries
            the whole state).
        """
        return self._newer_call('receive_stage_guest', '1.6', migration=mid,
                                models=models)

    def complete(self, mid, vm_state):
        return self._api.call('receive_complete', migration=mid,
                              vm_state=vm_state)

    def abort(self, mid, timeout=None):
        return self._api.call('receive_abort', timeout=timeout,
                              migration=mid)

    def status(self, mid, timeout=None):
        return self._api.call('receive_status', timeout=timeout,
                              migration=mid)
