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

"""xsm-agent: the RPC server of one host, and its progress notifications.

The endpoint methods take the request context first and return primitives
(API version: :data:`xsm_driver.core.rpc.api.VERSION`). Migrations run in
threads of the :class:`~xsm_driver.core.migration.manager.Manager`; a
reporter thread publishes their progress.
"""

import functools
import inspect
import logging
import sys
import threading

import oslo_messaging as messaging
from oslo_messaging._drivers import common as rpc_common
from oslo_messaging._drivers import impl_fake
from oslo_messaging.rpc import server as rpc_server

from xsm_driver.core import exception
from xsm_driver.core.migration import after_answer
from xsm_driver.core.migration import collector
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core import rpc
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import arguments
from xsm_driver.core.rpc import auth

LOG = logging.getLogger(__name__)

#: the most of a guest's console one vm_console call answers
CONSOLE_LIMIT = 16 << 20


def _expected_errors(cls):
    """Mark xsm-driver's own errors as answers, not agent failures.

    oslo.messaging then logs them without a traceback. The arguments of
    every call are checked first (:func:`arguments.check_arguments`).
    """
    for name, func in list(vars(cls).items()):
        if inspect.isfunction(func) and not name.startswith('_'):
            checked = _checked(name, func)
            setattr(cls, name, functools.update_wrapper(
                messaging.expected_exceptions(exception.XSMError)(checked),
                func))
    return cls


def _checked(name, func):
    """The endpoint method ``func``, behind the endpoint's guard.

    A call is first admitted by the endpoint's :class:`auth.Guard` (who
    signed it, for which host, method and arguments, when, and whether
    that caller may make it): a refused call is logged once and answered
    with :class:`auth.NotAuthorized` before anything else happens. Then
    its arguments are checked, the method runs, and its answer -- its
    result, or the error it raised, serialised as oslo.messaging does --
    is sealed with this host's key.
    """
    signature = inspect.signature(func)

    def checked(self, context, *args, **kwargs):
        guard = self._guard
        if guard is None:
            arguments.check_arguments(name, signature,
                                      (self, context) + args, kwargs)
            return func(self, context, *args, **kwargs)
        caller = guard.admit(name, context, kwargs)
        if caller.role == auth.AGENT and 'migration' in kwargs:
            problem = auth.owner_problem(
                caller.role, caller.name, name,
                self._receive_source(kwargs['migration']))
            if problem:
                LOG.warning('refused call %s from agent %s: %s', name,
                            caller.name, problem)
                raise auth.NotAuthorized(host=guard.host, method=name,
                                         reason=problem)
        try:
            arguments.check_arguments(name, signature,
                                      (self, context) + args, kwargs)
            result = func(self, context, *args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, exception.XSMError):
                # (what oslo.messaging logs of an unexpected error)
                LOG.exception('%s from %s %s failed', name, caller.role,
                              caller.name)
            return guard.seal(caller, error=rpc_common.
                              serialize_remote_exception(sys.exc_info()))
        return guard.seal(caller, result)
    return checked


def _in_process(transport):
    """Whether ``transport`` is oslo.messaging's in-process ``fake://``.

    (Its driver, or :class:`local.LocalDriver`, which :func:`api.
    get_transport` makes of ``fake://``.)
    """
    return isinstance(getattr(transport, '_driver', None),
                      impl_fake.FakeDriver)


#: calls answered inside the source's pause: no garbage collection from
#: their dispatch to their answer's sending (see :mod:`collector`)
PAUSE_CALLS = frozenset(['receive_complete'])


def _nothing():
    pass


class _Server(rpc_server.RPCServer):
    """oslo.messaging's RPC server, telling a call when it has answered.

    Each call runs in an :func:`after_answer.scope`: what it defers (the
    commit's settling) runs once its answer is sent. A call of
    :data:`PAUSE_CALLS` holds the garbage collector from its dispatch
    (the check of its signature and arguments) to its answer's sending
    (the answer's signing and encoding), not only in its method.
    """

    def spawn_workers(self):
        """Start the worker threads now (once started), not one per call.

        oslo.messaging's ``threading`` executor (futurist's
        ``ThreadPoolExecutor``) starts a new thread at each of its first
        ``executor_thread_pool_size`` calls (``Thread.start`` waits until
        the thread runs): on a freshly started agent, inside a commit's
        round trip.
        """
        executor = getattr(self, '_work_executor', None)
        workers = getattr(executor, '_max_workers', None)
        if not isinstance(workers, int):
            return
        started = len(getattr(executor, '_workers', ()))
        for _ in range(max(0, workers - started)):
            executor.submit(_nothing)

    def _process_incoming(self, incoming):
        method = None
        if incoming:
            message = getattr(incoming[0], 'message', None)
            if isinstance(message, dict):
                method = message.get('method')
        with after_answer.scope():
            if method in PAUSE_CALLS:
                with collector.held():
                    return super()._process_incoming(incoming)
            return super()._process_incoming(incoming)


@_expected_errors
class AgentEndpoint:
    """What other agents and xsm-migrate may ask of this host.

    Operators may call every method; other agents only ``receive_*`` and
    the methods :attr:`PEER_CALLS` names (see :func:`auth.
    permission_problem`). Without a guard (an agent on the in-process
    ``fake://`` transport, or a test calling the methods) every call is
    admitted and answered unsealed.

    :param guard: an :class:`auth.Guard`, or None.
    """

    target = messaging.Target(version=api.VERSION)

    #: methods besides receive_* other agents may call
    PEER_CALLS = ()

    def __init__(self, manager, guard=None):
        self.manager = manager
        self.host = manager.host
        self._guard = guard

    def _receive_source(self, mid):
        """The source host of the receive ``mid`` (None: unknown here)."""
        journal = getattr(self.host, 'journal', None)
        if journal is None or not isinstance(mid, str):
            return None
        try:
            entry = journal.get(mid, role=destination.ROLE)
        except Exception:           # (a bad id: the method will say so)
            return None
        if entry is None:
            return None
        return (entry.state.get('spec') or {}).get('source_host')

    # -- hosts and VMs -----------------------------------------------------

    def host_info(self, context):
        srs = []
        for sr in self.host.srs.values():
            srs.append(dict(sr.capacity(), name=sr.name, type=sr.type,
                            path=sr.path))
        info = {'name': self.host.name, 'srs': srs,
                'vms': len(self.host.vms),
                'active_migrations': self.manager.active()}
        # a host that knows its guests' memory and CPUs (a pool host of
        # the xenapi engine): {'memory_mib', 'memory_free_mib', 'vcpus',
        # 'hosts'}, and that its VMs take the flavor's memory and vCPUs
        resources = getattr(self.host, 'resources', None)
        if resources is not None:
            info['resources'] = resources()
        return info

    def vdi_list(self, context, sr=None):
        srs = [self.host.sr(sr)] if sr else self.host.srs.values()
        return [v.to_dict() for s in srs for v in s.list()]

    def _vm_dict(self, vm):
        if not getattr(vm, 'in_qemu', False):
            return vm.to_dict()
        # the power state its QEMU has now, not the one last recorded
        state = self.host.vm_power_state(vm.uuid)
        return dict(vm.to_dict(), power_state=state)

    def vm_list(self, context):
        return [self._vm_dict(vm) for vm in list(self.host.vms.values())]

    def vm_get(self, context, vm):
        return self._vm_dict(self.host.vm(vm))

    def vm_create(self, context, name, disks, vifs=(), qemu=None):
        return self.host.create_vm(name, disks, vifs, qemu).to_dict()

    def vm_pause(self, context, vm):
        return self.host.pause_vm(vm).to_dict()

    def vm_resume(self, context, vm):
        return self.host.resume_vm(vm).to_dict()

    def vm_reboot(self, context, vm):
        return self.host.reboot_vm(vm).to_dict()

    def vm_console(self, context, vm, limit=1 << 20):
        if not 1 <= limit <= CONSOLE_LIMIT:
            raise arguments.InvalidArgument(
                method='vm_console', reason='limit must be in [1, %d], not '
                '%d' % (CONSOLE_LIMIT, limit))
        return self.host.console_output(vm, limit)

    def vm_start(self, context, vm):
        in_doubt = getattr(self.manager, 'in_doubt_vms', None)
        if in_doubt is not None and self.host.vm(vm).uuid in in_doubt():
            raise exception.XSMError(
                'VM %s is held by a migration in doubt: it may run on the '
                'destination; run "xsm-migrate resolve ID" instead of '
                'starting it here' % vm)
        return self.host.start_vm(vm).to_dict()

    def vm_stop(self, context, vm, clean=None, timeout=None):
        """Stop the VM (``clean`` and ``timeout``: new in 1.5).

        :param clean: True: ask the guest to power off (ACPI) and kill it
            only when it has not within ``timeout`` seconds (None: the
            host's ``[hypervisor]shutdown_timeout``); False: kill it at
            once; None: the host's own way (a native host kills a QEMU
            guest at once, a xenapi pool host shuts down cleanly).
        :returns: the VM's record, with ``clean``: False when a guest's
            process was killed, True when it powered off by itself or
            none ran, None when the host cannot tell (xenapi).
        """
        if clean is not None and not isinstance(clean, bool):
            raise arguments.InvalidArgument(
                method='vm_stop', reason='clean must be a JSON boolean, not '
                '%.80r' % (clean,))
        if timeout is not None:
            if not clean:
                raise arguments.InvalidArgument(
                    method='vm_stop', reason='timeout is the time a clean '
                    'stop leaves the guest to power off: give it with '
                    'clean=true only')
            if not 0 < timeout <= api.MAX_STOP_TIMEOUT:
                raise arguments.InvalidArgument(
                    method='vm_stop', reason='timeout must be in (0, %d] '
                    'seconds, not %r' % (api.MAX_STOP_TIMEOUT, timeout))
        kwargs = {}
        if clean is not None:
            kwargs['clean'] = clean
        if timeout is not None:
            if 'timeout' in inspect.signature(
                    self.host.stop_vm).parameters:
                kwargs['timeout'] = timeout
            else:
                # (a xenapi pool host: its [xenapi]shutdown_timeout)
                LOG.info('vm_stop of %s: this host\'s engine has its own '
                         'shutdown timeout; %s s is not used', vm, timeout)
        stopped = self.host.stop_vm(vm, **kwargs)
        return dict(stopped.to_dict(),
                    clean=getattr(stopped, 'stopped_clean', None))

    def vm_destroy(self, context, vm):
        self.host.destroy_vm(vm)

    def vm_snapshot(self, context, vm):
        return self.host.snapshot_vm(vm)

    def vdi_import(self, context, vdi, path, image_format):
        return manager_mod.import_image(self.host, vdi, path, image_format)

    def guest_start(self, context, vm, rate=None, read_ratio=1.0, fill=0.0):
        return self.host.guest_start(vm, rate, read_ratio, fill).to_dict()

    def guest_verify(self, context, vm):
        return self.host.guest_verify(vm)

    # -- migrations, as their source ---------------------------------------

    def migrate_vm(self, context, vm, dest_host, vdi_map, vif_map=None,
                   options=None, migration_id=None, receive=None):
        if migration_id is None and receive is None:
            return self.manager.migrate_vm(vm, dest_host, vdi_map, vif_map,
                                           **(options or {}))
        return self.manager.migrate_vm(vm, dest_host, vdi_map, vif_map,
                                       migration_id=migration_id,
                                       receive=receive, **(options or {}))

    def migrate_vm_begin(self, context, vm, dest_host, vdi_map,
                         vif_map=None, options=None):
        return self.manager.migrate_vm_begin(vm, dest_host, vdi_map,
                                             vif_map, **(options or {}))

    def migrate_vdi(self, context, vdi, dest_sr, options=None):
        return self.manager.migrate_vdi(vdi, dest_sr, **(options or {}))

    def migration_get(self, context, migration):
        return self.manager.get(migration)

    def migration_list(self, context):
        return self.manager.list()

    def migration_abort(self, context, migration):
        return self.manager.abort(migration)

    def migration_force_complete(self, context, migration):
        return self.manager.force_complete(migration)

    def migration_resolve(self, context, migration):
        return self.manager.resolve(migration)

    # -- migrations, as their destination ----------------------------------

    def receive_preflight(self, context, spec):
        self.manager.receive_preflight(spec)

    def receive_prepare(self, context, spec):
        return self.manager.receive_prepare(spec)

    def receive_prepare_ahead(self, context, spec, prepared_timeout=None):
        return self.manager.receive_prepare_ahead(
            spec, prepared_timeout=prepared_timeout)

    def receive_claim(self, context, migration, source_host):
        self.manager.receive_claim(migration, source_host)

    def receive_renew(self, context, migration):
        renew = getattr(self.manager, 'receive_renew', None)
        if renew is None:
            # an engine that receives no native migration holds no lease
            return {'lease_timeout': None}
        return renew(migration)

    def receive_compose(self, context, migration):
        return self.manager.receive_compose(migration)

    def receive_stage_guest(self, context, migration, models):
        return self.manager.receive_stage_guest(migration, models)

    def receive_complete(self, context, migration, vm_state=None):
        return self.manager.receive_complete(migration, vm_state)

    def receive_abort(self, context, migration):
        return self.manager.receive_abort(migration)

    def receive_status(self, context, migration):
        return self.manager.receive_status(migration)


class Agent:
    """Serve a host over oslo.messaging.

    :param transport: an RPC transport (see :func:`api.get_transport`).
    :param host: the :class:`~xsm_driver.core.migration.host.Host`; the
        agent owns it from then on (:meth:`stop` closes it).
    :param options: :class:`~xsm_driver.core.migration.manager.Options`.
    :param notifier_transport: where notifications go (None: none sent).
    :param engine: ``engine(peer_factory)`` builds the migration engine
        (see :mod:`xsm_driver.core.engine`); its ``host`` then replaces
        ``host``. Default: the native Manager of ``host``.
    :param identity: this host's :class:`auth.Identity` (key and trusted
        keys): every call must then be signed by a trusted caller, and this
        agent signs its own calls to other agents. Required but on the
        in-process ``fake://`` transport, where None admits every call.
    """

    def __init__(self, transport, host, options=None,
                 notifier_transport=None, progress_interval=2.0,
                 rpc_timeout=None, engine=None, identity=None):
        if identity is None and not _in_process(transport):
            raise ValueError('an agent on a message bus needs an identity '
                             '(its key and the keys it trusts)')
        credential = trust = None
        if identity is not None:
            credential, trust = identity.credential(), identity.trust

        def peer_factory(name):
            return api.RemotePeer(api.AgentAPI(
                transport, name, timeout=rpc_timeout, credential=credential,
                trust=trust))

        self.identity = identity
        self.transport = transport
        if engine is None:
            self.manager = manager_mod.Manager(
                host, peer_factory=peer_factory, options=options)
        else:
            self.manager = engine(peer_factory)
        self.host = host = self.manager.host
        guard = None
        if identity is not None:
            if identity.name != host.name:
                raise ValueError('the identity of %s cannot serve host %s'
                                 % (identity.name, host.name))
            # an engine that reaches its destinations itself (xenapi: the
            # pools of [xenapi]destination_pools) may migrate to them
            guard = identity.guard(
                AgentEndpoint.PEER_CALLS,
                destinations=getattr(self.manager, 'destinations', ()))
        self.topic = api.transport_topic(transport)
        target = messaging.Target(topic=self.topic, server=host.name)
        self.server = messaging.get_rpc_server(
            transport, target, [AgentEndpoint(self.manager, guard)],
            executor='threading', server_cls=_Server)
        self._notifier = None
        if notifier_transport is not None:
            self._notifier = messaging.Notifier(
                notifier_transport, publisher_id='xsm-agent.%s' % host.name,
                driver='messaging', topics=[rpc.NOTIFICATION_TOPIC])
        self._interval = progress_interval
        self._stop = threading.Event()
        self._reporter = None

    def start(self):
        for mid, role, outcome in self.manager.recover():
            LOG.warning('recovered migration %s (%s): %s', mid, role,
                        outcome)
        self.server.start()
        self.server.spawn_workers()
        if self._notifier is not None:
            self._reporter = threading.Thread(target=self._report,
                                              name='xsm-progress',
                                              daemon=True)
            self._reporter.start()
        if self.identity is None:
            LOG.info('xsm-agent of host %s is serving (topic %s; in-process '
                     'transport, calls not authenticated)', self.host.name,
                     self.topic)
            return self
        trust = self.identity.trust
        LOG.info('xsm-agent of host %s is serving (topic %s; calls signed '
                 'by trusted keys only: %d hosts, operators: %s)',
                 self.host.name, self.topic, len(trust.hosts),
                 ', '.join(sorted(trust.operators)) or 'none')
        if not trust.operators:
            LOG.warning('no operator key is trusted ([agent]'
                        'trusted_operators): xsm-migrate, Nova and '
                        'CloudStack calls will all be refused')
        return self

    def stop(self):
        """Stop serving, stop the engine, then release the host.

        The host's journal is closed and the disks of its running VMs are
        detached (see :meth:`Host.close
        <xsm_driver.core.migration.host.Host.close>`); the agent must not
        be started again.
        """
        self._stop.set()
        self.server.stop()
        self.server.wait()
        try:
            self.manager.shutdown()
        finally:
            if self._reporter is not None:
                self._reporter.join()
            close = getattr(self.host, 'close', None)
            if close is not None:
                close()

    def _report(self):
        reported = set()
        while not self._stop.wait(self._interval):
            for status in self.manager.list():
                if status['id'] in reported:
                    continue
                event = 'xsm.migration.progress'
                if status['finished'] is not None:
                    event = 'xsm.migration.end'
                    reported.add(status['id'])
                try:
                    self._notifier.info({}, event, status)
                except Exception as exc:
                    LOG.warning('progress notification failed: %s', exc)
