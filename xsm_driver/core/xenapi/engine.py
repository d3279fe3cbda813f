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

"""The ``xenapi`` engine: xapi's Storage XenMotion behind the agent's API.

:class:`XenAPIEngine` has the public methods the agent's endpoint calls on
the native :class:`~xsm_driver.core.migration.manager.Manager` for the
source role (``migrate_vm``, ``migrate_vdi``, ``get``, ``list``,
``abort``, ``force_complete``, ``active``, ``recover``, ``shutdown``) and
a :attr:`host` that lists the pool's SRs, VDIs and VMs. One agent serves
one *source* pool; destinations are other pools by name (``POOL`` or
``POOL/HOST``), or this pool's own name for a move within it.

A VM migration: preflight from XenAPI records (nothing changes) -> a turn
in the queue (xapi allows 3 storage migrations at once per host; the 4th
waits here instead of failing) -> ``Host.migrate_receive`` on the
destination, on the migration network -> ``VM.assert_can_migrate`` ->
``Async.VM.migrate_send`` with every VDI of the VM, of its snapshots and
suspend images mapped -> the task is polled for progress until it ends.
Preflight follows xapi's own rules (xapi-project/xen-api master:
xapi_vm_migrate.ml, xapi_vm_lifecycle.ml, xapi_host.ml,
message_forwarding.ml, helpers.ml; see :mod:`.preflight`), so that what
xapi would refuse is refused first, in words, and nothing xapi allows.
Abort cancels the task (``task.cancel``); xapi then rolls back: the VM
goes on on the source. A running VM whose disks all stay where they are
moves to another host of its pool with ``Async.VM.pool_migrate`` (live;
a host of the pool is a destination by its name too, as Nova names its
computes). A VDI moves within the pool with
``Async.VDI.pool_migrate``; a VDI copied to a *local* SR of the agent
(``[xenapi]local_repositories``) goes through xapi's NBD export
(:mod:`.coldcopy`).

Reported phases are the native engine's names: ``preflight`` (with
``queued`` while waiting for a turn), ``prepare-receive``
(``migrate_receive`` and ``assert_can_migrate``), ``copy`` (xapi's task
runs: mirror, copy and switch-over all happen inside it), ``done`` or
``aborted``. Each migration is journaled with its task, so an agent that
restarts follows the tasks xapi is still running instead of losing them.
"""

import collections
import logging
import os
import re
import threading
import time
import uuid as uuidlib

import XenAPI

from xsm_driver.core.migration import copy as copy_mod
from xsm_driver.core.migration import errors as mig_errors
from xsm_driver.core.migration import journal as journal_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.xenapi import errors
from xsm_driver.core.xenapi import pool as pool_mod
from xsm_driver.core.xenapi import preflight
from xsm_driver.core.xenapi import session as session_mod

LOG = logging.getLogger(__name__)

ROLE = 'source'
ENGINE = 'xenapi'

#: storage migrations xapi runs at once from one host; it refuses one more
#: with TOO_MANY_STORAGE_MIGRATES
XAPI_STORAGE_MIGRATES = 3

#: options a migration request may give (the rest are refused)
VM_OPTIONS = frozenset(['copy', 'network', 'bandwidth', 'compress',
                        'force'])
VDI_OPTIONS = frozenset(['copy', 'bandwidth'])

_RESULT_RE = re.compile(r'^\s*<value>(.*)</value>\s*$', re.S)


def task_result(result):
    """The value of a finished task (xapi wraps it in ``<value>``).

    >>> task_result('<value>OpaqueRef:1</value>'), task_result('')
    ('OpaqueRef:1', '')
    """
    match = _RESULT_RE.match(result or '')
    value = match.group(1) if match else (result or '')
    return re.sub(r'</?value>', '', value).strip()


class SlotQueue:
    """At most ``limit`` holders per key; the others wait, first come first.

    :param limit: holders per key (xapi: 3 storage migrations per host).
    """

    def __init__(self, limit):
        self.limit = limit
        self._cond = threading.Condition()
        self._held = collections.Counter()
        self._waiting = collections.defaultdict(list)

    def position(self, key, token):
        """0-based place of ``token`` in the queue of ``key``, or None."""
        with self._cond:
            try:
                return self._waiting[key].index(token)
            except ValueError:
                return None

    def acquire(self, key, token, cancel):
        """Wait for a slot; False when ``cancel`` was set first."""
        with self._cond:
            self._waiting[key].append(token)
            try:
                while True:
                    if cancel.is_set():
                        return False
                    if self._waiting[key][0] is token and \
                            self._held[key] < self.limit:
                        self._held[key] += 1
                        return True
                    self._cond.wait(0.05)
            finally:
                self._waiting[key].remove(token)
                self._cond.notify_all()

    def release(self, key):
        with self._cond:
            self._held[key] -= 1
            self._cond.notify_all()

    def held(self, key=None):
        with self._cond:
            if key is None:
                return sum(self._held.values())
            return self._held[key]


class _Detached(Exception):
    """The agent stops while xapi runs the task: leave it to xapi."""


class _Migration:
    """One migration run by xapi (or, for a cold copy, by us)."""

    kind = 'vm'

    def __init__(self, engine, mid, plan, options):
        self.engine = engine
        self.id = mid
        self.plan = plan
        self.options = options
        self.phase = 'preflight'
        self.queued = False
        self.error = None
        self.result = None
        self.started = time.time()
        self.finished = None
        self.task = None
        self.task_uuid = None
        self.leftovers = []
        self.progress = copy_mod.Progress(total=plan.get('bytes', 0),
                                          phase='preflight')
        self._done_fraction = 0.0
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self.thread = None

    # -- status ------------------------------------------------------------

    @property
    def vdis(self):
        return set(self.plan.get('vdis', ()))

    def status(self):
        snap = self.progress.snapshot()
        snap['phase'] = self.phase
        queue = None
        if self.queued:
            queue = self.engine.slots.position(self.plan['slot'], self)
        return {
            'id': self.id, 'kind': self.kind, 'engine': ENGINE,
            'phase': self.phase, 'queued': self.queued,
            'queue_position': queue,
            'vm': self.plan.get('vm_uuid'),
            'vm_name': self.plan.get('vm_name'),
            'vdis': sorted(self.plan.get('vdis', ())),
            'source': self.engine.name,
            'destination': self.plan.get('destination'),
            'progress': snap, 'bytes_copied': snap['done'],
            'downtime_ms': None, 'guest_writes_during_migration': None,
            'xapi_task': self.task_uuid, 'leftovers': list(self.leftovers),
            'error': str(self.error) if self.error else None,
            'started': self.started, 'finished': self.finished,
            'result': self.result,
        }

    def _set_phase(self, phase, **state):
        with self._lock:
            self.phase = phase
            self.progress.phase = phase
            self.engine.journal.record(self.id, ROLE, phase, **state)
        LOG.info('migration %s: %s', self.id, phase)

    def _set_fraction(self, fraction):
        fraction = max(0.0, min(1.0, float(fraction)))
        total = self.progress.total
        delta = int(total * fraction) - int(total * self._done_fraction)
        if delta > 0:
            self.progress.add(delta)
            self._done_fraction = fraction

    # -- control -----------------------------------------------------------

    def cancel(self, reason='cancelled by the operator'):
        with self._lock:
            if self.finished is not None:
                raise mig_errors.InvalidPhase(
                    id=self.id, phase=self.phase,
                    reason='it has already finished')
            if self.error is None:
                self.error = errors.MigrationAborted(id=self.id,
                                                     reason=reason)
        self._cancel.set()

    def _check(self):
        if self._cancel.is_set():
            raise self.error or errors.MigrationAborted(id=self.id,
                                                        reason='cancelled')

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name='xsm-xapi-%s' % self.id[:8])
        self.thread.start()

    def run(self):
        slot = self.plan['slot']
        have_slot = False
        try:
            self.queued = True
            if not self.engine.slots.acquire(slot, self, self._cancel):
                self._check()
            have_slot = True
            self.queued = False
            self._run()
            left = self.progress.total - self.progress.done
            if left > 0:
                self.progress.add(left)
            self._set_phase('done', result=self.result)
            self.finished = time.time()
        except _Detached:
            LOG.info('migration %s: the agent stops; xapi task %s goes on '
                     'and the next agent follows it', self.id,
                     self.task_uuid)
        except errors.OutcomeUnknown as exc:
            # The journal keeps the task (phase copy): the next agent
            # follows it. Nothing is rolled back, nothing claimed.
            with self._lock:
                self.error = exc
            LOG.error('migration %s: %s', self.id, exc)
            self.finished = time.time()
        except Exception as exc:
            if isinstance(exc, XenAPI.Failure):
                exc = self.engine.translate(exc, self._context())
            with self._lock:
                if self.error is None:
                    self.error = exc
            LOG.error('migration %s failed in phase %s: %s', self.id,
                      self.phase, self.error)
            self._after_failure()
            self._set_phase('aborted', error=str(self.error),
                            leftovers=self.leftovers)
            self.finished = time.time()
        finally:
            self.queued = False
            if have_slot:
                self.engine.slots.release(slot)

    def _after_failure(self):
        """Check (and say) what a failure left behind."""

    # -- xapi tasks ----------------------------------------------------------

    def _start_task(self, pool, method, args, obj_class, obj_ref, op):
        """Start ``Async.<method>``; the task's ref.

        A lost connection leaves us not knowing whether xapi started it:
        the object's ``current_operations`` tells (``op`` there -> adopt
        that task); when it is not there, nothing ran and the call is sent
        once more.
        """
        for attempt in (1, 2):
            before = set(self._operations(pool, obj_class, obj_ref, op))
            try:
                return pool.call('Async.' + method, *args, safe=False)
            except XenAPI.Failure as exc:
                raise self.engine.translate(exc, self._context(), pool)
            except session_mod.ConnectionLost as exc:
                LOG.warning('migration %s: %s; finding out whether xapi '
                            'started it', self.id, exc)
                try:
                    started = set(self._operations(pool, obj_class, obj_ref,
                                                   op)) - before
                except (XenAPI.Failure, errors.XenAPIError) as again:
                    raise errors.OutcomeUnknown(
                        pool=pool.name, url=pool.url, reason='lost the '
                        'connection while starting %s (%s), and cannot find '
                        'out whether xapi started it (%s): check %s %s with '
                        '"xe task-list" before trying again'
                        % (method, exc, again, obj_class,
                           self.plan['vdis'][0] if obj_class == 'VDI'
                           else self.plan.get('vm_uuid')))
                if started:
                    task = sorted(started)[0]
                    LOG.warning('migration %s: xapi did start %s (task %s); '
                                'following it', self.id, method, task)
                    return task
                if attempt == 2:
                    raise
                LOG.warning('migration %s: xapi did not start %s; sending '
                            'it again', self.id, method)

    def _busy_retry(self, attempt):
        """Run ``attempt()`` again while xapi is busy with others' moves.

        Our own queue keeps within xapi's limit; this covers migrations
        other clients (XenCenter, xe) started from the same host. xapi
        refuses before it changes anything, so trying again is safe.
        """
        while True:
            try:
                return attempt()
            except errors.TooManyMigrations as exc:
                self.task = None
                LOG.warning('migration %s: %s; trying again in %.0f s',
                            self.id, exc, self.engine.busy_wait)
                self.queued = True
                self._cancel.wait(self.engine.busy_wait)
                self.queued = False
                self._check()

    def _follow(self, pool):
        """Journal the started task and poll it; its result."""
        self.task_uuid = self._task_uuid(pool, self.task)
        self.engine.journal.record(self.id, ROLE, 'copy', task=self.task,
                                   task_uuid=self.task_uuid)
        return self._poll(pool, self.task)

    @staticmethod
    def _task_uuid(pool, task):
        try:
            return pool.call('task.get_uuid', task)
        except (XenAPI.Failure, errors.XenAPIError):
            return None

    @staticmethod
    def _operations(pool, obj_class, obj_ref, op):
        ops = pool.call('%s.get_current_operations' % obj_class, obj_ref)
        return [task for task, name in ops.items() if name == op]

    def _context(self):
        return 'migration %s' % self.id

    def _poll(self, pool, task):
        """Follow a task to its end; its result.

        Cancels it when the migration is cancelled. A master that cannot
        be reached for ``lost_timeout`` seconds ends the wait with an error
        that says the task may still run (the journal keeps it: a
        restarted agent follows it again).
        """
        cancelled = False
        lost_since = None
        while True:
            if self.engine.stopping.is_set():
                raise _Detached()
            if self._cancel.is_set() and not cancelled:
                cancelled = True
                LOG.info('migration %s: cancelling xapi task %s', self.id,
                         self.task_uuid)
                try:
                    pool.call('task.cancel', task)
                except XenAPI.Failure as exc:
                    LOG.warning('migration %s: task.cancel: %s', self.id,
                                exc.details)
            try:
                rec = pool.call('task.get_record', task)
                lost_since = None
            except XenAPI.Failure as exc:
                raise self.engine.translate(exc, self._context(), pool)
            except session_mod.ConnectionLost as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since >= self.engine.lost_timeout:
                    raise errors.OutcomeUnknown(
                        pool=pool.name, url=pool.url, reason='lost contact '
                        'while xapi task %s ran (%s); it may still be '
                        'running: see "xe task-list uuid=%s"; the agent '
                        'follows it again when it restarts'
                        % (self.task_uuid, exc, self.task_uuid))
                self._cancel.wait(self.engine.poll_interval)
                continue
            status = rec.get('status')
            self._set_fraction(rec.get('progress') or 0.0)
            if status == 'success':
                self._destroy_task(pool, task)
                if cancelled:
                    LOG.warning('migration %s: the abort came too late; '
                                'xapi finished the migration', self.id)
                    with self._lock:
                        self.error = None
                return task_result(rec.get('result'))
            if status in ('failure', 'cancelled'):
                self._destroy_task(pool, task)
                info = rec.get('error_info') or ['UNKNOWN_ERROR']
                if status == 'cancelled' or info[0] == 'TASK_CANCELLED':
                    raise self.error or errors.MigrationAborted(
                        id=self.id, reason='the xapi task was cancelled')
                raise self.engine.translate(XenAPI.Failure(info),
                                            self._context(), pool)
            self._cancel.wait(self.engine.poll_interval)

    @staticmethod
    def _destroy_task(pool, task):
        try:
            pool.call('task.destroy', task)
        except (XenAPI.Failure, errors.XenAPIError) as exc:
            LOG.debug('task.destroy %s: %s', task, exc)


class VMMigration(_Migration):
    """A VM and all its disks (and snapshots) move with migrate_send."""

    kind = 'vm'

    def _context(self):
        plan = self.plan
        dest = sorted(set(plan.get('vdi_map_uuids', {}).values()))
        return 'migrating VM %s (disks %s on SR %s) to %s (SR %s)' % (
            plan['vm_name'], ', '.join(plan.get('vdis', ())),
            ', '.join(plan.get('source_srs', ())) or '?',
            plan['destination'],
            ', '.join("'%s'" % d for d in dest) or '?')

    def _run(self):
        src, dst = self.engine.source, self.plan['dest_pool']
        plan = self.plan
        xapi_options = {}
        for key in ('copy', 'compress', 'force'):
            if plan[key]:
                xapi_options[key] = 'true'

        if plan.get('pool_migrate'):
            return self._run_pool_migrate()

        def attempt():
            self._check()
            self._set_phase('prepare-receive', dest=plan['destination'],
                            vm=plan['vm_uuid'])
            try:
                token = dst.call('host.migrate_receive', plan['dest_host'],
                                 plan['network'], {})
            except XenAPI.Failure as exc:
                raise self.engine.translate(exc, self._context(), dst)
            self._check()
            try:
                src.call('VM.assert_can_migrate', plan['vm'], token,
                         plan['live'], plan['vdi_map'], plan['vif_map'],
                         xapi_options, {})
            except XenAPI.Failure as exc:
                raise self.engine.translate(exc, self._context(), src)
            self._check()
            self._set_phase('copy')
            self.task = self._start_task(
                src, 'VM.migrate_send',
                (plan['vm'], token, plan['live'], plan['vdi_map'],
                 plan['vif_map'], xapi_options, {}),
                'VM', plan['vm'], 'migrate_send')
            return self._follow(src)

        new_vm = self._busy_retry(attempt)
        self.result = self.engine.describe_result(plan, new_vm)

    def _run_pool_migrate(self):
        """A running VM to another host of the pool, its disks staying.

        ``Async.VM.pool_migrate`` with ``live`` (message_forwarding.ml
        ``VM.pool_migrate``: xapi copies the memory, the VM's disks are on
        SRs both hosts see); its phase is ``copy`` (of the memory), its
        progress the memory's.
        """
        src, plan = self.engine.source, self.plan

        def attempt():
            self._check()
            self._set_phase('copy', vm=plan['vm_uuid'],
                            dest=plan['destination'])
            self.task = self._start_task(
                src, 'VM.pool_migrate',
                (plan['vm'], plan['dest_host'], {'live': 'true'}),
                'VM', plan['vm'], 'pool_migrate')
            return self._follow(src)

        self._busy_retry(attempt)
        self.result = {'vm': plan['vm_uuid'], 'vdis': {},
                       'host': plan.get('dest_host_name')}

    def _after_failure(self):
        if self.plan.get('pool_migrate'):
            return                      # nothing was made anywhere
        try:
            self.leftovers = self.engine.leftovers(self.plan)
        except Exception as exc:
            LOG.warning('migration %s: cannot check the destination SRs '
                        'for leftovers: %s', self.id, exc)
        for line in self.leftovers:
            LOG.error('migration %s: %s', self.id, line)


class PoolMigrate(VMMigration):
    """One VDI moves to another SR of the pool (VDI.pool_migrate)."""

    kind = 'vdi'

    def _context(self):
        return 'moving VDI %s to SR %s' % (self.plan['vdis'][0],
                                           self.plan['destination'])

    def _run(self):
        src, plan = self.engine.source, self.plan

        def attempt():
            self._check()
            self._set_phase('copy', vdi=plan['vdis'][0])
            self.task = self._start_task(src, 'VDI.pool_migrate',
                                         (plan['vdi'], plan['sr'], {}),
                                         'VDI', plan['vdi'], 'mirror')
            return self._follow(src)

        new_vdi = self._busy_retry(attempt)
        try:
            new_uuid = src.call('VDI.get_uuid', new_vdi) if new_vdi \
                else None
        except (XenAPI.Failure, errors.XenAPIError) as exc:
            LOG.warning('migration %s: cannot read the moved VDI: %s',
                        self.id, exc)
            new_uuid = None
        self.result = {'vdis': {plan['vdis'][0]: new_uuid},
                       'sr': plan['destination']}


class ColdCopy(_Migration):
    """A VDI copied out of the pool through xapi's NBD export."""

    kind = 'vdi'

    def _context(self):
        return 'copying VDI %s to local SR %s' % (self.plan['vdis'][0],
                                                  self.plan['destination'])

    def _run(self):
        from xsm_driver.core.xenapi import coldcopy
        plan = self.plan
        self._set_phase('copy', vdi=plan['vdis'][0])
        new = coldcopy.copy_vdi(
            self.engine.source, plan['vdi'], plan['local_sr'],
            name=plan['name'], progress=self.progress, cancel=self._cancel,
            chunk=self.options.chunk, depth=self.options.depth,
            migration_id=self.id,
            limiter=copy_mod.TokenBucket(self.options.bandwidth),
            allow_insecure=self.engine.allow_insecure_nbd)
        self.result = {'vdis': {plan['vdis'][0]: new},
                       'sr': plan['destination']}


class XenAPIEngine:
    """Migrations of one XenServer/XCP-ng pool, run by xapi.

    :param name: the agent's name; also this pool's name as a migration
        destination (a move within the pool).
    :param source: the :class:`session.Pool` this agent serves.
    :param destinations: ``{name: Pool}`` a VM may move to.
    :param options: :class:`~xsm_driver.core.migration.manager.Options`
        (``max_concurrent``, ``leaf_headroom``, ``chunk``, ``depth`` and
        the default ``network`` are used).
    :param state_path: directory of the journal.
    :param local_srs: ``{name: SR}`` of this agent, targets of cold copies.
    :param migration_network: network (uuid or name) of the destination
        pools that migration traffic uses; default: the destination
        host's management network.
    :param compress: ask xapi to compress migration traffic.
    :param allow_insecure_nbd: copy VDIs to a local SR from an NBD export
        without TLS (an ``insecure_nbd`` network).
    """

    def __init__(self, name, source, destinations=None, options=None,
                 state_path=None, local_srs=None, migration_network=None,
                 compress=False, poll_interval=1.0, lost_timeout=300.0,
                 busy_wait=10.0, allow_insecure_nbd=False, pool_host=None,
                 vm_template='Other install media', vm_network=None,
                 shutdown_timeout=60.0):
        self.name = name
        self.source = source
        self.destinations = dict(destinations or {})
        self.options = options or manager_mod.Options()
        self.local_srs = dict(local_srs or {})
        self.migration_network = migration_network
        self.compress = compress
        self.poll_interval = poll_interval
        self.lost_timeout = lost_timeout
        self.busy_wait = busy_wait
        self.allow_insecure_nbd = allow_insecure_nbd
        limit = self.options.max_concurrent
        if limit > XAPI_STORAGE_MIGRATES:
            LOG.warning('xapi runs at most %d storage migrations per host; '
                        'max_concurrent_migrations = %d is lowered to that',
                        XAPI_STORAGE_MIGRATES, limit)
            limit = XAPI_STORAGE_MIGRATES
        self.slots = SlotQueue(limit)
        self.stopping = threading.Event()
        state_path = state_path or '.'
        self.state_path = state_path
        self.journal = journal_mod.Journal(
            os.path.join(state_path, 'xenapi-journal.sqlite'))
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._migrations = {}
        self.host = pool_mod.PoolHost(
            self, host=pool_host, vm_template=vm_template,
            vm_network=vm_network, shutdown_timeout=shutdown_timeout)

    # -- pools and names -------------------------------------------------

    def pool(self, name):
        """The :class:`session.Pool` called ``name``."""
        if name == self.name:
            return self.source
        try:
            return self.destinations[name]
        except KeyError:
            raise errors.XenAPIError(
                code='UNKNOWN_POOL', detail='unknown destination pool %r; '
                'this agent knows %s (see [xenapi]destination_pools)'
                % (name, ', '.join(sorted([self.name] +
                                          list(self.destinations)))))

    def describer(self, *pools):
        """``describe(ref, kind)`` that names objects of ``pools``."""
        def describe(ref, kind):
            if not str(ref).startswith('OpaqueRef:'):
                return '%s %s' % (kind, ref)
            cls = {'host': 'host', 'VM': 'VM', 'VDI': 'VDI', 'SR': 'SR',
                   'VIF': 'VIF'}.get(kind, kind)
            for pool in pools:
                try:
                    rec = pool.call('%s.get_record' % cls, ref)
                except Exception:
                    continue
                text = preflight.label(kind, rec)
                if cls == 'VDI' and rec.get('SR'):
                    try:
                        text += " on SR '%s'" % pool.call(
                            'SR.get_name_label', rec['SR'])
                    except Exception:
                        pass
                return text
            return '%s %s' % (kind, ref)
        return describe

    def translate(self, failure, context='', pool=None):
        pools = [pool] if pool is not None else []
        pools += [self.source] + list(self.destinations.values())
        return errors.translate(failure.details, self.describer(*pools),
                                context)

    def _call(self, pool, method, *args):
        try:
            return pool.call(method, *args)
        except XenAPI.Failure as exc:
            raise self.translate(exc, pool=pool)

    # -- bookkeeping -------------------------------------------------------

    def _running(self):
        with self._lock:
            return [m for m in self._migrations.values()
                    if m.finished is None]

    def active(self):
        """Migrations of this agent that have not finished (queued too)."""
        return len(self._running())

    def _options(self, options, allowed):
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise errors.NotSupported(
                what='option %s' % ', '.join(unknown),
                reason='the xenapi engine knows %s'
                % ', '.join(sorted(allowed)))
        return self.options.replace(**{k: v for k, v in options.items()
                                       if k in ('copy', 'network',
                                                'bandwidth')})

    @staticmethod
    def _no_bandwidth(options):
        if options.get('bandwidth'):
            LOG.warning('xapi cannot limit the bandwidth of a storage '
                        'migration; bandwidth=%s is ignored (only a copy '
                        'to a local SR honours it)', options['bandwidth'])

    def _register(self, mig):
        with self._start_lock:
            for other in self._running():
                busy = mig.vdis & other.vdis
                if busy:
                    raise errors.XenAPIError(
                        code='OTHER_OPERATION_IN_PROGRESS', detail='VDI %s '
                        'is already moving in migration %s'
                        % (', '.join(sorted(busy)), other.id))
            with self._lock:
                self._migrations[mig.id] = mig
            self.journal.record(mig.id, ROLE, 'preflight', engine=ENGINE,
                                kind=mig.kind,
                                destination=mig.plan.get('destination'),
                                vdis=sorted(mig.vdis))
        mig.start()
        return mig.id

    # -- source role: the agent API ----------------------------------------

    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None, **options):
        """Move (``copy=True``: copy) a VM and its disks with xapi.

        :param vm: the VM's uuid or unique name.
        :param dest_host: ``POOL`` or ``POOL/HOST``, or ``HOST`` of this
            pool (by its name_label) when no pool has that name.
        :param vdi_map: ``{VDI uuid: SR uuid or unique name}`` of every
            disk; the other VDIs are placed as xapi places them: a
            snapshot's VDI follows its disk, one whose disk is gone goes
            to the destination's default SR, a suspend image to its
            suspend-image SR (see :func:`preflight.full_vdi_map`).
        :param vif_map: ``{VIF uuid, device, MAC or the name the agent
            made it with: network uuid or name}`` (a VIF mapped to its own
            name keeps a network of the same name, see
            :func:`preflight.named_vif_map`); across pools required for
            every VIF (a snapshot's
            VIF with the MAC of a mapped one follows it); within the pool
            xapi takes none (a VIF kept on its network is dropped).
        :param options: ``copy`` (across pools; of a VM that is not
            halted only with ``force``), ``force``, ``compress``,
            ``network`` (the destination's migration network).
        :returns: the migration id; the migration runs in a thread.
        """
        opts = self._options(options, VM_OPTIONS)
        self._no_bandwidth(options)
        plan = self.plan_vm(vm, dest_host, vdi_map or {}, vif_map or {},
                            opts, compress=bool(options.get(
                                'compress', self.compress)),
                            force=bool(options.get('force')))
        mid = str(uuidlib.uuid4())
        return self._register(VMMigration(self, mid, plan, opts))

    def migrate_vdi(self, vdi, dest_sr, **options):
        """Move a VDI to another SR of the pool, or copy it to a local SR.

        :param vdi: the VDI's uuid.
        :param dest_sr: an SR of the pool (``VDI.pool_migrate``: a disk
            of a halted, suspended or running VM, live when it runs) or a
            local SR of this agent (the VDI is copied out through xapi's
            NBD export; it must not be in use by a running VM).
        """
        opts = self._options(options, VDI_OPTIONS)
        mid = str(uuidlib.uuid4())
        if dest_sr in self.local_srs:
            plan = self.plan_cold_copy(vdi, dest_sr)
            return self._register(ColdCopy(self, mid, plan, opts))
        if opts.copy:
            raise errors.NotSupported(
                what='copy=True within the pool', reason='use "xe vdi-copy"'
                ', or copy to a local SR of the agent')
        self._no_bandwidth(options)
        plan = self.plan_pool_migrate(vdi, dest_sr)
        return self._register(PoolMigrate(self, mid, plan, opts))

    def get(self, mid):
        mig = self._migrations.get(mid)
        if mig is not None:
            return mig.status()
        entry = self.journal.get(mid, role=ROLE)
        if entry is None:
            raise mig_errors.MigrationNotFound(id=mid, host=self.name)
        return {'id': entry.id, 'role': entry.role, 'phase': entry.phase,
                'engine': ENGINE, 'error': entry.state.get('error'),
                'result': entry.state.get('result'),
                'finished': entry.updated if entry.finished else None}

    def list(self):
        with self._lock:
            return [m.status() for m in self._migrations.values()]

    def wait(self, mid, timeout=None):
        mig = self._migrations[mid]
        mig.thread.join(timeout)
        return mig.status()

    def abort(self, mid):
        """Cancel a migration: leave the queue, or ``task.cancel``."""
        mig = self._migrations.get(mid)
        if mig is None:
            raise mig_errors.MigrationNotFound(id=mid, host=self.name)
        mig.cancel()
        return mig.status()

    def force_complete(self, mid):
        """Nothing to do: xapi already migrates as fast as it can.

        (The native engine lifts its bandwidth limit; xapi has none, and
        it decides itself when to switch over.)
        """
        mig = self._migrations.get(mid)
        if mig is None:
            raise mig_errors.MigrationNotFound(id=mid, host=self.name)
        return mig.status()

    # -- destination role: not on this engine ------------------------------

    def _not_destination(self, *args, **kwargs):
        raise errors.NotSupported(
            what='receiving a native migration', reason='a XenServer/'
            'XCP-ng pool receives VMs through xapi (Host.migrate_receive), '
            'not from a native xsm-agent')

    receive_prepare = receive_compose = receive_complete = \
        receive_status = _not_destination

    def receive_preflight(self, spec):
        """Whether this pool could take the disks of ``spec`` (Nova's check).

        A pool receives through xapi (``Host.migrate_receive``), so the
        only honest check here is the one a destination can make before
        it is asked: each SR named exists in this pool, and holds the
        allocated bytes of the disks that are not on it already (a VM of
        this pool moving to another of its hosts needs no room).
        """
        need = collections.Counter()
        srs = {}
        for vdi in spec.get('vdis', ()):
            sr = self.host.sr(vdi['sr'])
            if not isinstance(sr, pool_mod.PoolSR):
                raise errors.NotSupported(
                    what='receiving into local SR %s' % sr.name,
                    reason='a VM of the pool has its disks in SRs of the '
                    'pool')
            srs[sr.name] = sr
            try:
                here = self.source.call('VDI.get_SR', self.source.call(
                    'VDI.get_by_uuid', vdi['uuid']))
            except XenAPI.Failure:
                here = None
            if here != sr.ref:
                need[sr.name] += int(vdi.get('allocated') or
                                     vdi.get('size') or 0)
        for name, nbytes in need.items():
            free = srs[name].capacity()['free']
            if nbytes > free:
                raise errors.XenAPIError(
                    code='SR_FULL', detail='SR %s of pool %s has %d bytes '
                    'free; the disks need %d' % (name, self.name, free,
                                                 nbytes))

    def receive_abort(self, mid):
        """Nothing is held here: xapi rolls back its own receives."""
        return 'aborted'

    def receive_renew(self, mid):
        return {'lease_timeout': None}

    # -- recovery and shutdown ---------------------------------------------

    def recover(self):
        """Follow again the xapi tasks an earlier agent left running.

        :returns: list of ``(migration id, role, outcome)``.
        """
        done = []
        for entry in self.journal.unfinished():
            task = entry.state.get('task')
            if entry.phase != 'copy':
                # Nothing was started in xapi: nothing to undo.
                self.journal.finish(entry.id, 'aborted', role=ROLE,
                                    error='the agent stopped before xapi '
                                    'started the migration')
                done.append((entry.id, ROLE, 'aborted (not started)'))
                continue
            if not task:
                what = entry.state.get('vm') or entry.state.get('vdi')
                error = ('the agent stopped while it asked xapi to start '
                         'the migration: check VM or VDI %s with "xe '
                         'task-list" and "xe vm-list" before trying again'
                         % what)
                self.journal.finish(entry.id, 'aborted', role=ROLE,
                                    error=error)
                done.append((entry.id, ROLE, 'unknown: %s' % error))
                continue
            mig = _Adopted(self, entry)
            with self._lock:
                self._migrations[entry.id] = mig
            mig.start()
            done.append((entry.id, ROLE, 'following xapi task %s'
                         % entry.state.get('task_uuid')))
        return done

    def shutdown(self):
        """Stop: queued migrations are dropped; xapi's tasks go on.

        A migration xapi runs does not need the agent; the journal keeps
        its task, and the next agent follows it (:meth:`recover`). The
        sessions end and the journal is closed.
        """
        self.stopping.set()
        for mig in self._running():
            if mig.task is None:
                try:
                    mig.cancel('the agent is stopping')
                except mig_errors.MigrationError:
                    pass
        for mig in self._running():
            if mig.thread is not None:
                mig.thread.join(10)
        self.source.logout()
        for pool in self.destinations.values():
            pool.logout()
        self.journal.close()

    # -- planning (preflight from XenAPI records) --------------------------

    def find_vm(self, vm):
        src = self.source
        try:
            return src.call('VM.get_by_uuid', vm)
        except XenAPI.Failure:
            pass
        refs = [r for r in self._call(src, 'VM.get_by_name_label', vm)]
        refs = [r for r in refs
                if not self._call(src, 'VM.get_is_a_snapshot', r) and
                not self._call(src, 'VM.get_is_a_template', r)]
        if len(refs) != 1:
            raise errors.XenAPIError(
                code='UUID_INVALID', detail='%s VM called %r in pool %s; '
                'give its uuid' % ('no' if not refs else '%d VMs are'
                                   % len(refs), vm, self.name))
        return refs[0]

    def find_vdi(self, vdi):
        try:
            return self.source.call('VDI.get_by_uuid', vdi)
        except XenAPI.Failure:
            raise errors.XenAPIError(code='UUID_INVALID', detail='no VDI '
                                     '%s in pool %s' % (vdi, self.name))

    def _disk_records(self, vm_ref):
        src = self.source
        vbds = {r: self._call(src, 'VBD.get_record', r)
                for r in self._call(src, 'VM.get_VBDs', vm_ref)}
        return {r: self._call(src, 'VDI.get_record', r)
                for r in preflight.disk_vdis(vbds)}

    def _sm_features(self, pool):
        return preflight.sm_features(self._call(pool, 'SM.get_all_records'))

    def _suspend_vdis(self, pool, vm_refs):
        """Suspend-image VDI records of the suspended VMs among ``vm_refs``.

        xapi moves them too (xapi_vm_migrate.ml ``migrate_send'``,
        suspends_vdis).
        """
        out = {}
        for ref in vm_refs:
            rec = self._call(pool, 'VM.get_record', ref)
            vdi = rec.get('suspend_VDI')
            if rec.get('power_state') == 'Suspended' and vdi and \
                    vdi != 'OpaqueRef:NULL':
                out[vdi] = self._call(pool, 'VDI.get_record', vdi)
        return out

    def _host_sees(self, pool, host, sr):
        return any(self._call(pool, 'PBD.get_host', p) == host
                   for p in self._call(pool, 'SR.get_PBDs', sr))

    @staticmethod
    def _pool_sr(dpool_rec, host_rec, field, host_field=None):
        ref = dpool_rec.get(field)
        if (not ref or ref == 'OpaqueRef:NULL') and host_field:
            ref = host_rec.get(host_field)
        return None if not ref or ref == 'OpaqueRef:NULL' else ref

    def plan_vm(self, vm, dest, vdi_map, vif_map, opts, compress=False,
                force=False):
        """Check everything from XenAPI records; what the run needs."""
        src = self.source
        pool_name, host_name = preflight.parse_destination(dest)
        if host_name is None and pool_name != self.name and \
                pool_name not in self.destinations:
            # a host of this pool by its name (a Nova compute node named
            # like its XenServer host): a move within the pool
            names = [r.get('name_label') for r in self._call(
                src, 'host.get_all_records').values()]
            if pool_name in names:
                pool_name, host_name = self.name, pool_name
        dpool = self.pool(pool_name)
        cross = dpool is not src
        vm_ref = self.find_vm(vm)
        vmr = self._call(src, 'VM.get_record', vm_ref)
        live = preflight.live(vmr)
        preflight.check_allowed(vmr)
        preflight.check_copy(vmr, opts.copy, force, cross)
        vbds = {r: self._call(src, 'VBD.get_record', r)
                for r in self._call(src, 'VM.get_VBDs', vm_ref)}
        cds = preflight.inserted_cds(vbds)
        if cds:
            LOG.warning('VM %s has a CD in drive %s: xapi ejects it before '
                        'the VM moves (an ISO does not move)', vmr['uuid'],
                        ', '.join(cds))
        disks = self._disk_records(vm_ref)
        snaps = {}
        for snap in vmr.get('snapshots', ()):
            snaps.update(self._disk_records(snap))
        suspends = self._suspend_vdis(src, [vm_ref] +
                                      list(vmr.get('snapshots', ())))
        disk_uuid = {r: rec['uuid'] for r, rec in disks.items()}
        all_uuid = dict(disk_uuid)
        all_uuid.update({r: rec['uuid'] for r, rec in snaps.items()})
        # hosts first: the default and suspend-image SRs may be per host
        hosts = self._call(dpool, 'host.get_all_records')
        dpool_rec = self._call(dpool, 'pool.get_record',
                               self._call(dpool, 'pool.get_all')[0])
        shost = vmr.get('resident_on')
        if not shost or shost == 'OpaqueRef:NULL':
            shost = self._call(src, 'pool.get_master',
                               self._call(src, 'pool.get_all')[0])
        if host_name:
            dhost = preflight.resolve('host', hosts, host_name,
                                      'pool %s' % dpool.name)
        elif not cross and live:
            # a move within the pool keeps the VM on its host
            # (xapi_vm_migrate.ml vdi_pool_migrate prefers the local host)
            dhost = shost
        else:
            dhost = dpool_rec.get('master') or self._call(
                dpool, 'pool.get_master', self._call(dpool, 'pool.get_all')[0])
        if not cross:
            # within the pool an image the destination host sees stays
            # where it is (xapi_vm_migrate.ml migrate_send', suspends_vdis)
            suspends = {r: rec for r, rec in suspends.items()
                        if not self._host_sees(src, dhost, rec['SR'])}
        dsrs = self._call(dpool, 'SR.get_all_records')

        def sr_uuid(ref):
            return dsrs[ref]['uuid'] if ref in dsrs else None
        full = preflight.full_vdi_map(
            {rec['uuid']: None for rec in disks.values()},
            {rec['uuid']: all_uuid.get(rec.get('snapshot_of'),
                                       rec.get('snapshot_of'))
             for rec in snaps.values()}, vdi_map,
            default_sr=sr_uuid(self._pool_sr(dpool_rec, None,
                                             'default_SR')),
            suspend=[rec['uuid'] for rec in suspends.values()],
            suspend_sr=sr_uuid(self._pool_sr(
                dpool_rec, hosts.get(dhost, {}), 'suspend_image_SR',
                'suspend_image_sr')))
        by_uuid = {rec['uuid']: (r, rec)
                   for r, rec in list(disks.items()) + list(snaps.items()) +
                   list(suspends.items())}
        # destination SRs
        sr_ref = {}
        for target in sorted(set(full.values())):
            sr_ref[target] = preflight.resolve('SR', dsrs, target,
                                               'pool %s' % dpool.name)
        # SM features of every VDI that changes SR, whatever the power
        # state (xapi_vm_migrate.ml assert_sr_support_operations)
        src_features = self._sm_features(src)
        dst_features = src_features if not cross else \
            self._sm_features(dpool)
        src_srs = {}
        moving = collections.defaultdict(list)
        for uuid, target in full.items():
            ref, rec = by_uuid[uuid]
            if not cross and rec.get('SR') == sr_ref[target]:
                continue                        # stays where it is
            if rec['SR'] not in src_srs:
                src_srs[rec['SR']] = self._call(src, 'SR.get_record',
                                                rec['SR'])
            preflight.check_sr_mirrors(src_srs[rec['SR']], src_features)
            preflight.check_sr_receives(dsrs[sr_ref[target]], dst_features)
            moving[sr_ref[target]].append(rec)
        # a running disk may grow while it moves; its snapshots do not
        headroom = opts.leaf_headroom if live else 0
        disk_uuids = {d['uuid'] for d in disks.values()}
        total = 0
        for ref, recs in moving.items():
            grow = headroom * sum(1 for r in recs if r['uuid'] in disk_uuids)
            total += preflight.check_space(dsrs[ref], recs, extra=grow)
        # source SRs of the running disks: room for xapi's snapshots (a
        # VM whose disks all stay moves with VM.pool_migrate: none)
        pool_migrate = not cross and live and not moving and not opts.copy
        if live and not pool_migrate:
            by_sr = collections.defaultdict(list)
            for rec in disks.values():
                by_sr[rec['SR']].append(rec)
            for ref, recs in by_sr.items():
                srec = src_srs.get(ref) or self._call(src, 'SR.get_record',
                                                      ref)
                preflight.check_source_space(srec, recs,
                                             self.options.leaf_headroom)
        # VIFs of the VM and of its snapshots, and networks
        vifs, vif_refs, snap_vifs = {}, {}, {}
        for r in vmr.get('VIFs', ()):
            rec = self._call(src, 'VIF.get_record', r)
            vifs[rec['uuid']] = rec
            vif_refs[rec['uuid']] = r
        if cross:
            for snap in vmr.get('snapshots', ()):
                name = self._call(src, 'VM.get_name_label', snap)
                for r in self._call(src, 'VM.get_VIFs', snap):
                    rec = dict(self._call(src, 'VIF.get_record', r),
                               snapshot="'%s'" % name)
                    snap_vifs[rec['uuid']] = rec
                    vif_refs[rec['uuid']] = r
        vif_map = preflight.named_vif_map(
            vif_map, vifs, {r: self._call(src, 'network.get_name_label',
                                          r)
                            for r in {v['network'] for v in vifs.values()}})
        vifmap = preflight.resolve_vifs(vifs, vif_map, cross, snap_vifs)
        nets = self._call(dpool, 'network.get_all_records')
        xapi_vif_map = {vif_refs[u]: preflight.resolve(
                            'network', nets, n, 'pool %s' % dpool.name)
                        for u, n in vifmap.items()}
        if not cross:
            xapi_vif_map = preflight.intra_pool_vif_map(
                xapi_vif_map, {vif_refs[u]: rec for u, rec in vifs.items()})
        # hosts, versions, migration network; a running VM whose disks move
        # on its own host may stay on a disabled host
        # (xapi_vm_helpers.ml assert_can_boot_here, is_local_live_migration)
        if cross or not (live and dhost == shost):
            preflight.check_host(hosts[dhost])
        preflight.check_versions(self._call(src, 'host.get_record', shost),
                                 hosts[dhost], cross_pool=cross)
        network = opts.network or self.migration_network
        if network:
            net_ref = preflight.resolve('network', nets, network,
                                        'pool %s (the migration network)'
                                        % dpool.name)
        else:
            net_ref = self._management_network(dpool, dhost)
        pifs = [self._call(dpool, 'PIF.get_record', p)
                for p in nets[net_ref].get('PIFs', ())]
        preflight.check_migration_network(
            hosts[dhost], nets[net_ref],
            [p for p in pifs if p.get('host') == dhost])
        memory = 0
        if pool_migrate:
            if dhost == shost:
                raise errors.XenAPIError(
                    code='NOTHING_TO_MIGRATE', detail='VM %s already runs '
                    'on host %s and its disks stay on their SRs'
                    % (vmr['uuid'], hosts[dhost].get('name_label')))
            # xapi_vm_helpers.ml assert_can_see_SRs (VM_REQUIRES_SR)
            for rec in disks.values():
                if not self._host_sees(src, dhost, rec['SR']):
                    raise errors.XenAPIError(
                        code='VM_REQUIRES_SR', detail='host %s does not see '
                        'SR %s of disk %s: the VM can move there only with '
                        'its disks (map them to an SR that host sees)'
                        % (hosts[dhost].get('name_label'),
                           self._call(src, 'SR.get_name_label', rec['SR']),
                           rec['uuid']))
            memory = preflight.as_int(vmr.get('memory_dynamic_max'))
        return {
            'pool_migrate': pool_migrate,
            'dest_host_name': hosts[dhost].get('name_label'),
            'vm': vm_ref, 'vm_uuid': vmr['uuid'],
            'vm_name': vmr.get('name_label'), 'live': live,
            'destination': dest, 'dest_pool': dpool, 'dest_host': dhost,
            'cross_pool': cross, 'network': net_ref,
            'vdis': sorted(rec['uuid'] for rec in disks.values()),
            'source_srs': sorted(set(
                "'%s'" % self._call(src, 'SR.get_name_label', ref)
                for ref in {rec['SR'] for rec in disks.values()})),
            'vdi_map': {by_uuid[u][0]: sr_ref[t] for u, t in full.items()},
            'vdi_map_uuids': full, 'vif_map': xapi_vif_map,
            'userdevices': self._userdevices(src, vm_ref),
            'dest_srs': {ref: sorted(self._call(dpool, 'SR.get_VDIs', ref))
                         for ref in set(sr_ref.values())},
            'copy': bool(opts.copy), 'compress': compress, 'force': force,
            'bytes': memory if pool_migrate else total, 'slot': shost,
        }

    def _userdevices(self, pool, vm_ref):
        out = {}
        for r in self._call(pool, 'VM.get_VBDs', vm_ref):
            vbd = self._call(pool, 'VBD.get_record', r)
            if vbd.get('type') == 'Disk' and not vbd.get('empty'):
                out[str(vbd['userdevice'])] = self._call(
                    pool, 'VDI.get_uuid', vbd['VDI'])
        return out

    def _management_network(self, pool, host_ref):
        for r in self._call(pool, 'host.get_PIFs', host_ref):
            pif = self._call(pool, 'PIF.get_record', r)
            if pif.get('management'):
                return pif['network']
        raise errors.XenAPIError(
            code='NO_MIGRATION_NETWORK', detail='the destination host has '
            'no management interface to migrate over; set [xenapi]'
            'migration_network or the network option of the request')

    def describe_result(self, plan, new_vm):
        """``{'vm': uuid, 'vdis': {old: new}}`` of a finished migration."""
        dpool = plan['dest_pool']
        result = {'vm': None, 'vdis': {}}
        if not new_vm or not new_vm.startswith('OpaqueRef:'):
            return result
        try:
            result['vm'] = dpool.call('VM.get_uuid', new_vm)
            new = self._userdevices(dpool, new_vm)
        except (XenAPI.Failure, errors.XenAPIError) as exc:
            LOG.warning('cannot read the migrated VM: %s', exc)
            return result
        for dev, old in plan['userdevices'].items():
            if dev in new:
                result['vdis'][old] = new[dev]
        return result

    def leftovers(self, plan):
        """VDIs that appeared on the destination SRs during a failed run."""
        dpool = plan['dest_pool']
        out = []
        for sr, before in plan.get('dest_srs', {}).items():
            now = set(dpool.call('SR.get_VDIs', sr)) - set(before)
            for vdi in sorted(now):
                try:
                    rec = dpool.call('VDI.get_record', vdi)
                except XenAPI.Failure:
                    continue            # gone already
                out.append('%s appeared on SR %s during the failed '
                           'migration and is still there; if nothing else '
                           'made it, remove it with "xe vdi-destroy uuid=%s"'
                           % (preflight.label('VDI', rec),
                              dpool.call('SR.get_name_label', sr),
                              rec.get('uuid')))
        return out

    def plan_pool_migrate(self, vdi, dest_sr):
        """``VDI.pool_migrate`` of a disk of a halted/suspended/running VM.

        message_forwarding.ml ``VDI.pool_migrate``: the VM is the one of
        the VDI's first VBD (none: VDI_NEEDS_VM_FOR_MIGRATE), the call runs
        as that VM's ``migrate_send`` (so its power states), on the host it
        runs on, else on a host xapi chooses that sees the SRs.
        """
        src = self.source
        vdi_ref = self.find_vdi(vdi)
        rec = self._call(src, 'VDI.get_record', vdi_ref)
        srs = self._call(src, 'SR.get_all_records')
        sr_ref = preflight.resolve('SR', srs, dest_sr, 'pool %s (nor a local '
                                   'SR of this agent)' % self.name)
        if rec.get('SR') == sr_ref:
            raise errors.XenAPIError(code='VDI_ALREADY_THERE', detail='%s '
                                     'is already on SR %s'
                                     % (preflight.label('VDI', rec),
                                        dest_sr))
        vbds = list(rec.get('VBDs', ()))
        if not vbds:
            raise errors.XenAPIError(
                code='VDI_NEEDS_VM_FOR_MIGRATE', detail='%s is not a disk '
                'of any VM: xapi moves a VDI within the pool only as a disk '
                'of a VM; copy it with "xe vdi-copy sr-uuid=..." instead'
                % preflight.label('VDI', rec))
        vm_ref = self._call(src, 'VBD.get_VM', vbds[0])
        vm = self._call(src, 'VM.get_record', vm_ref)
        live = preflight.live(vm)
        preflight.check_allowed(vm)
        features = self._sm_features(src)
        preflight.check_sr_mirrors(srs[rec['SR']], features)
        preflight.check_sr_receives(srs[sr_ref], features)
        need = preflight.check_space(
            srs[sr_ref], [rec], self.options.leaf_headroom if live else 0)
        if live:
            # the VM's own host; a local live migration needs no enabled
            # host (xapi_vm_helpers.ml assert_can_boot_here)
            host = vm.get('resident_on')
        else:
            # xapi chooses a host that sees the SRs (choose_host); the
            # storage migrations it runs count against that host's 3
            host = self._call(src, 'pool.get_master',
                              self._call(src, 'pool.get_all')[0])
        return {'vdi': vdi_ref, 'sr': sr_ref, 'vdis': [rec['uuid']],
                'destination': dest_sr, 'vm_uuid': vm['uuid'],
                'vm_name': vm.get('name_label'), 'bytes': need,
                'slot': host, 'dest_pool': src,
                'dest_srs': {sr_ref: sorted(self._call(src, 'SR.get_VDIs',
                                                       sr_ref))}}

    def plan_cold_copy(self, vdi, local_sr):
        src = self.source
        vdi_ref = self.find_vdi(vdi)
        rec = self._call(src, 'VDI.get_record', vdi_ref)
        if not rec.get('is_a_snapshot'):
            for vbd_ref in rec.get('VBDs', ()):
                vbd = self._call(src, 'VBD.get_record', vbd_ref)
                if vbd.get('currently_attached') and vbd.get('mode') == 'RW':
                    raise errors.XenAPIError(
                        code='VDI_IN_USE', detail='%s is attached read-'
                        'write to a running VM: a copy would not be '
                        'consistent; snapshot the VM and copy the '
                        'snapshot\'s VDI, or shut the VM down'
                        % preflight.label('VDI', rec))
        sr = self.local_srs[local_sr]
        free = sr.capacity()['free']
        need = preflight.as_int(rec.get('physical_utilisation')) or \
            preflight.as_int(rec.get('virtual_size'))
        if need > free:
            raise errors.InsufficientSpace(sr=local_sr, needed=need,
                                           free=free)
        return {'vdi': vdi_ref, 'vdis': [rec['uuid']],
                'destination': local_sr, 'local_sr': sr,
                'name': rec.get('name_label') or '', 'bytes': 0,
                'slot': 'nbd'}


class _Adopted(_Migration):
    """A migration an earlier agent started: follow its task to the end."""

    def __init__(self, engine, entry):
        plan = {'slot': 'recovered-%s' % entry.id,
                'destination': entry.state.get('destination'),
                'vdis': entry.state.get('vdis', []),
                'vm_uuid': entry.state.get('vm')}
        super().__init__(engine, entry.id, plan, engine.options)
        self.kind = entry.state.get('kind', 'vm')
        self.task = entry.state.get('task')
        self.task_uuid = entry.state.get('task_uuid')

    def _run(self):
        self.phase = 'copy'
        try:
            value = self._poll(self.engine.source, self.task)
        except errors.XenAPIError as exc:
            if exc.kwargs.get('code') == 'HANDLE_INVALID':
                raise errors.XenAPIError(
                    code='HANDLE_INVALID', detail='xapi no longer knows '
                    'task %s (it ended while no agent ran, or xapi '
                    'restarted); check the VM and its disks by hand'
                    % self.task_uuid)
            raise
        self.result = {'xapi_result': value}


def from_config(conf, peer_factory=None, options=None):
    """The ``xenapi`` engine plugin: an engine from ``[xenapi]`` options.

    :param conf: the agent's ``ConfigOpts`` (``[agent]`` and ``[xenapi]``
        registered).
    :param peer_factory: unused: xapi reaches the destination pools.
    :param options: the agent's migration
        :class:`~xsm_driver.core.migration.manager.Options`.
    """
    from xsm_driver.core.migration import host as host_mod
    from xsm_driver.core import sr as sr_mod
    x = conf.xenapi
    if not x.url or x.password is None:
        raise errors.XenAPIError(
            code='NOT_CONFIGURED', detail='the xenapi engine needs the '
            'pool master\'s URL and a password: set [xenapi]url and '
            '[xenapi]password')

    def pool(name, url, username, password):
        session_mod.check_url(url, name)
        return session_mod.Pool(name, url, username, password,
                                ca_file=x.ca_file, insecure=x.insecure,
                                timeout=x.call_timeout,
                                retries=x.call_retries)

    destinations = {}
    for spec in x.destination_pools:
        name, url, user, password = session_mod.parse_pool_spec(
            spec, x.username, x.password)
        if name == conf.agent.host or name in destinations:
            raise errors.XenAPIError(
                code='NOT_CONFIGURED', detail='[xenapi]destination_pools '
                'names pool %r twice (or as this agent\'s own [agent]host)'
                % name)
        destinations[name] = pool(name, url, user, password)
    local = {}
    for spec in x.local_repositories:
        name, driver, path = host_mod.parse_sr_spec(spec)
        local[name] = sr_mod.load_driver(driver, name, path)
    return XenAPIEngine(
        conf.agent.host, pool(conf.agent.host, x.url, x.username,
                              x.password),
        destinations, options=options, state_path=conf.agent.state_path,
        local_srs=local, migration_network=x.migration_network,
        compress=x.compress, poll_interval=x.poll_interval,
        lost_timeout=x.lost_timeout, busy_wait=x.busy_wait,
        allow_insecure_nbd=x.allow_insecure_nbd, pool_host=x.host,
        vm_template=x.vm_template, vm_network=x.vm_network,
        shutdown_timeout=x.shutdown_timeout)
