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

"""The destination role: receive a migration's disks and, at the end, the VM.

Phases (journalled): ``prepare-receive`` (a receiver -- empty base plus
leaf -- per VDI in the chosen SR, and a TLS NBD server with one-shot,
unguessable exports: one for each leaf, and for each base as many as the
source asks for copy connections, up to :data:`MAX_COPY_CONNECTIONS`),
``compose`` (the copy is done: the bases are flushed), ``switch-over``
(commit: what the NBD exports serve is shut off, each leaf is composed
over its base, the VM is registered and resumed; the NBD server itself
stops after the commit's answer), ``done``. ``abort`` from any phase
before the commit destroys everything this migration made; it can be run
again.

The commit rule (doc/source/switch-over.rst), the destination's half:

* **The commit point** is the journal record ``switch-over`` with
  ``committed: true``, written durably by :meth:`Receive.complete`
  *before* anything else of the switch-over happens here (before the NBD
  server closes, the leaves are composed and the VM is registered and
  started). From it on the destination only goes forward: ``abort``
  answers :data:`COMMITTED` (and finishes what a failure left undone),
  the lease no longer applies, and a restart finishes the switch-over
  (:func:`recover`: compose, register the VM -- halted, as every VM of a
  host that stopped -- and record ``done``).
* **The abort point** is the durable record of the roll-back
  (``aborting``, then the terminal ``aborted``), written under the same
  lock before anything is removed; from it on ``complete`` is refused
  (:func:`aborted_error`), also after a restart and for a migration this
  host never heard of (``receive_abort`` leaves an ``aborted`` record).
* Whichever of the two the destination records first decides the
  migration, and the source acts only on the destination's answer: the
  destination never runs a VM whose commit the source could still roll
  back, since the source rolls back only on an ``aborted`` answer, which
  the destination never gives once it committed.

Recovery after a crash: a migration found before its commit point is
rolled back; one found past it is finished (see above). A journal written
before this rule (``switch-over`` without ``committed``) is finished when
its VM record made it to disk and rolled back otherwise, as then.

Lease: a source that says it renews (``spec['renews']``) must renew its
claim on the receive regularly; the manager rolls back a receive whose
source stayed silent for the lease (:meth:`Receive.expire`), but never
once the destination was told to complete.
"""

import concurrent.futures
import functools
import logging
import os
import shutil
import threading
import time

from xsm_driver.core.block import filters
from xsm_driver.core.migration import after_answer
from xsm_driver.core.migration import collector
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import workload as workload_mod
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.sr import base as sr_base

LOG = logging.getLogger(__name__)

ROLE = 'destination'
COMMITTED = 'committed'
ABORTED = 'aborted'
#: most one-shot base exports offered for the copy of one VDI
MAX_COPY_CONNECTIONS = 8


def copy_connections(requested):
    """How many one-shot base exports to offer for one VDI.

    :param requested: the source's ``copy_connections`` (None from a source
        that predates it: one).
    :returns: 1 to :data:`MAX_COPY_CONNECTIONS`.
    """
    try:
        wanted = int(requested) if requested is not None else 1
    except (TypeError, ValueError):
        wanted = 1
    return max(1, min(MAX_COPY_CONNECTIONS, wanted))


def preflight(host, spec, active, limit, leaf_headroom):
    """Refuse, before anything changes, what this host cannot receive.

    :param spec: the migration request (see :mod:`source`).
    :param active: migrations this host takes part in right now.
    """
    plan.check_concurrency(host.name, active, limit)
    if spec.get('vm') and spec.get('cross_pool'):
        plan.check_vif_map(spec['vm'].get('vifs', []),
                           spec.get('vif_map') or {}, True)
    by_sr = {}
    for vdi in spec['vdis']:
        host.sr(vdi['sr'])                      # SRNotFound names it
        plan.check_chain_depth(vdi['uuid'], 2)  # base + leaf
        by_sr.setdefault(vdi['sr'], []).append(vdi)
    for sr_name, vdis in sorted(by_sr.items()):
        sr = host.sr(sr_name)
        needed = plan.space_needed(vdis, leaf_headroom)
        plan.check_space(sr_name, needed, sr.capacity()['free'],
                         host=host.name)


#: the source asks for the incoming QEMU's address with compose's answer
#: (the destination starts it during the copy) instead of prepare's
INCOMING_AT_COMPOSE = 'compose'


class Receive:
    """One migration this host receives."""

    def __init__(self, host, spec, address, on_done=None):
        self.host = host
        self.spec = spec
        self.id = spec['id']
        self.address = address
        self.phase = 'preflight'
        self._on_done = on_done
        self._lock = threading.RLock()
        self._receivers = {}        # source VDI uuid -> Receiver
        self._server = None
        #: what the NBD server serves of each receiver: shut off at the
        #: commit, before the compose (see :meth:`_seal_exports`)
        self._fences = []
        self._creds = None
        self.result = None
        #: the commit point is journaled: only forward from here
        self.committed = False
        #: the roll-back is journaled: a commit is refused from here
        self.aborting = False
        self._vm_state = None
        #: a QEMU guest moves: its incoming QEMU waits here (VM uuid)
        self._incoming = None
        #: its start, when the source asked for it in the background
        #: (a Future of ``{'host': .., 'port': ..}``; see :meth:`compose`)
        self._incoming_start = None
        #: ``{'silent': s, 'lease': s}`` once rolled back for want of a
        #: lease renewal
        self.expired = None
        #: the commit's steps here, ``{step: ms}`` (see :meth:`complete`)
        self.steps_ms = None
        self._timing = None         # (the commit under way's _Steps)
        #: the commit's settling after its answer (see :meth:`_settle`)
        self._settler = None
        #: the guest's models, sent and decoded before the switch-over's
        #: pause (see :meth:`stage_guest`)
        self._staged = None

    @property
    def _cred_dir(self):
        return os.path.join(self.host.state_path, 'migrations', self.id,
                            ROLE)

    def _record(self, phase, **state):
        # durable first: the phase in memory never runs ahead of the disk
        self.host.journal.record(self.id, ROLE, phase, **state)
        self.phase = phase

    def _created(self):
        return [[r_sr, uuid] for src, (r_sr, rec) in
                self._receivers.items() for uuid in rec.vdis]

    def prepare(self):
        """Make receivers and exports; return how to reach them."""
        with self._lock:
            self._record('prepare-receive', spec=self.spec, created=[])
            try:
                return self._prepare()
            except Exception:
                LOG.exception('migration %s: preparing to receive failed',
                              self.id)
                self.abort()
                raise

    def _prepare(self):
        vm = self.spec.get('vm') or {}
        for vdi in self.spec['vdis']:
            sr = self.host.sr(vdi['sr'])
            rec = sr.receive(vdi['size'], name=vdi.get('name', ''),
                             vm=vm.get('uuid'))
            self._receivers[vdi['uuid']] = (sr.name, rec)
            self._record('prepare-receive', created=self._created())
        self._creds = credentials.Credentials.make(
            self._cred_dir, 'server', hosts=[self.address])
        self._server = nbd_server.Server(
            {}, host=self.address, port=0,
            tls_context=self._creds.server_context(
                self.spec['client_ca_pem']),
            list_exports=False).start()
        exports = {}
        count = copy_connections(self.spec.get('copy_connections'))
        for src, (_sr, rec) in self._receivers.items():
            # The copy may use several connections to the base, each
            # through its own one-shot name; 'base' is the first of them.
            bases = [nbd_server.unguessable_name() for _ in range(count)]
            names = {'base': bases[0], 'bases': bases,
                     'leaf': nbd_server.unguessable_name()}
            base, leaf = filters.Fence(rec.base), filters.Fence(rec.leaf)
            self._fences += [base, leaf]
            for name in bases:
                self._server.add_export(name, base, once=True)
            self._server.add_export(names['leaf'], leaf, once=True)
            exports[src] = names
        host, port = self._server.address
        LOG.info('migration %s: receiving %d VDIs on %s:%d', self.id,
                 len(exports), host, port)
        answer = {'host': host, 'port': port,
                  'server_ca_pem': self._creds.ca_pem,
                  'fingerprint': self._creds.fingerprint,
                  'exports': exports}
        if self.spec.get('guest') == 'qemu' and vm:
            if self.spec.get('incoming_at') == INCOMING_AT_COMPOSE:
                # off the copy's critical path: the source needs it only
                # once the copy is done (the answer of compose)
                self._incoming_start = self._start_incoming(vm)
                answer['incoming_at'] = INCOMING_AT_COMPOSE
            else:
                answer['incoming'] = self._prepare_incoming(vm)
        return answer

    def _start_incoming(self, vm):
        """:meth:`_prepare_incoming` in a thread; its Future."""
        self._check_runs_qemu(vm)
        self._incoming = vm['uuid']
        future = concurrent.futures.Future()

        def start():
            try:
                future.set_result(self._prepare_incoming(vm))
            except BaseException as exc:
                future.set_exception(exc)
        threading.Thread(target=start, daemon=True,
                         name='xsm-incoming-start-%s' % self.id[:8]).start()
        return future

    def _check_runs_qemu(self, vm):
        if self.host.qemu is None:
            raise errors.MigrationError(
                'host %s runs no QEMU guests ([hypervisor]driver is not '
                'qemu): VM %s cannot move here live' % (self.host.name,
                                                        vm.get('uuid')))

    def _prepare_incoming(self, vm):
        """Start the paused ``-incoming`` QEMU the guest moves into.

        Its disks wait behind paused gates until the commit
        (:meth:`Host.prepare_incoming`); before it, an abort kills it.
        """
        self._check_runs_qemu(vm)
        sizes = {v['uuid']: v['size'] for v in self.spec['vdis']}
        by_name = {d['name']: sizes[d['vdi']] for d in vm['disks']}
        self._incoming = vm['uuid']
        # QEMU's stream is TLS with this migration's credentials: this
        # side's server certificate, and only the source's CA trusted
        tls = {'ca_pem': self.spec['client_ca_pem'],
               'own_ca_pem': self._creds.ca_pem,
               'cert': self._creds.cert_file, 'key': self._creds.key_file}
        return self.host.prepare_incoming(vm, by_name, self.address, tls)

    def compose(self):
        """The copy is complete: make the copied bases durable.

        :returns: ``{'incoming': {'host': .., 'port': ..}}`` when the
            incoming QEMU was started in the background (the source asked
            for ``incoming_at: compose``); else None.
        """
        with self._lock:
            if self.phase == ABORTED or self.aborting:
                raise aborted_error(self.id, self.host.name, self.expired)
            if self.committed:
                return None
            for _sr, rec in self._receivers.values():
                # the base is final: flushed, and what the compose would
                # do to it is done now, out of the switch-over's pause
                rec.finish_base()
            answer = None
            if self._incoming_start is not None:
                try:
                    answer = {'incoming': self._incoming_start.result()}
                except Exception as exc:
                    raise errors.MigrationError(
                        'migration %s: the QEMU that receives VM %s on host '
                        '%s did not start: %s' % (self.id, self._incoming,
                                                  self.host.name, exc))
            self._record('compose')
            return answer

    def stage_guest(self, models):
        """Take the bulk of the guest's state before the pause (API 1.6).

        ``models`` is what the source's :meth:`Workload.export_ahead`
        took; decoded here now, the commit only swaps them in (the commit's
        guest state then names them, ``workload.STAGED``, and carries only
        the blocks written since). Staged again, the new models replace
        the old. Nothing of it is journaled: like a VM's memory, a restart
        loses it.

        :returns: ``{'staged': number of disk models}``.
        :raises errors.MigrationError: not a VM move, or ``models`` cannot
            be decoded; a commit or a roll-back already happened.
        """
        with self._lock:
            self._check_open('stage the guest\'s state')
        vm = self.spec.get('vm')
        if not vm:
            raise errors.MigrationError(
                'migration %s moves no VM: there is no guest state to '
                'stage on host %s' % (self.id, self.host.name))
        sizes = {v['uuid']: v['size'] for v in self.spec['vdis']}
        try:
            staged = workload_mod.stage(models, [sizes[d['vdi']]
                                                 for d in vm['disks']])
        except ValueError as exc:
            raise errors.MigrationError(
                'migration %s: the guest\'s state staged on host %s: %s'
                % (self.id, self.host.name, exc))
        with self._lock:
            self._check_open('stage the guest\'s state')
            self._staged = staged
        return {'staged': len(staged)}

    def _check_open(self, what):
        """Refuse ``what`` once committed or rolled back."""
        if self.phase == ABORTED or self.aborting:
            raise aborted_error(self.id, self.host.name, self.expired)
        if self.committed or self.phase == 'done':
            raise errors.InvalidPhase(id=self.id, phase=self.phase,
                                      reason='cannot %s: committed '
                                      'already' % what)

    def _check_staged(self, vm_state):
        """Refuse, before the commit point, a guest state left incomplete.

        A state that left its models out (they were staged) needs them
        here: without them the guest could not go on after the commit.
        """
        guest = (vm_state or {}).get('workload')
        if not isinstance(guest, dict) or workload_mod.STAGED not in guest:
            return
        try:
            workload_mod.swap_in(guest, self._staged)
        except ValueError as exc:
            raise errors.MigrationError(
                'migration %s: host %s cannot commit: %s' % (
                    self.id, self.host.name, exc))

    def complete(self, vm_state=None):
        """Commit: compose every VDI and, for a VM, register and resume it.

        :param vm_state: ``{'vm': record, 'power_state': ...,
            'workload': guest state or None}``; None for a VDI move.
        :returns: ``{'vdis': {source uuid: new uuid}, 'vm': uuid or None}``.
        """
        # (the source's guest is paused: see collector)
        with self._lock, collector.held():
            if self.phase == 'done':
                return self._answer()
            if self.phase == ABORTED or self.aborting:
                raise aborted_error(self.id, self.host.name, self.expired)
            steps = _Steps()
            if not self.committed:
                self._check_staged(vm_state)
                # The commit point: durable before anything else changes.
                # The guest's state stays out of the journal (it is what a
                # crash of this host loses, as a VM's memory).
                self._record('switch-over', committed=True,
                             receivers=self._receiver_records(),
                             vm_state=without_guest(vm_state))
                self.committed = True
                self._vm_state = vm_state
                steps.mark('commit_record')
            self._timing = steps
            try:
                self._finish(settle=False)
            finally:
                self._timing = None
            self.steps_ms = steps.ms
            self._settle_later()
            return self._answer()

    def _settle_later(self):
        """:meth:`_settle` once this call's answer is on its way.

        The source's pause ends with the answer, and nothing of the
        settling needs to be in it (see :meth:`_settle`). Served over
        RPC, it runs once the answer is sent (:mod:`after_answer`): no
        thread to start inside the pause, and none taking the GIL from
        the answer's sending; otherwise in a thread of its own, which
        takes the lock this call holds once the call returns.
        """
        if self.phase == 'done' or (self._settler is not None and
                                    self._settler.is_alive()):
            return
        self._settler = after_answer.defer(
            self._settle_logged, 'xsm-settle-%s' % self.id[:8])

    def _settle_logged(self):
        try:
            self._settle()
        except Exception:
            LOG.exception('migration %s: committed, but making the '
                          'switch-over durable here failed; the agent '
                          'finishes it at its next start', self.id)

    def wait_settled(self, timeout=None):
        """Wait for the settling after the commit's answer, if any."""
        settler = self._settler
        if settler is not None:
            settler.join(timeout)

    def _answer(self):
        """The commit's answer: the result, and how long its steps took.

        The timings (``steps_ms``, see :data:`plan.DESTINATION_STEPS`)
        are not part of the result: they are not journaled, and a source
        that does not know them ignores the key.
        """
        if self.steps_ms is None or self.result is None:
            return self.result
        return dict(self.result, steps_ms=self.steps_ms)

    def _receiver_records(self):
        """What a restart needs to compose each VDI (see :func:`recover`).

        ``{source VDI: [SR name, leaf uuid, uuids made, base first]}``.
        """
        return {src: [sr_name, rec.leaf_uuid, list(rec.vdis)]
                for src, (sr_name, rec) in self._receivers.items()}

    def _finish(self, settle=True):
        """Go forward from the commit point; can be run again.

        The disks are composed without ``fsync`` (the guest's writes are
        durable on the leaves as the guest flushed them; what else the
        compose writes -- the leaves' headers, the bases' modes, the
        batmaps -- a restart writes again from the commit record), and the
        VM's record is not saved (a restart adopts it again from the
        commit record): :meth:`_settle` makes it all durable before it
        records ``done``.

        :param settle: False: the caller settles later (the commit's
            answer goes first).
        """
        steps = self._timing or _Steps()
        # No write of a connection still open may land after the compose;
        # the server's connections and threads end after the answer.
        self._seal_exports()
        steps.mark('exports_seal')
        # A guest that starts here takes over the leaves' open devices
        # (each reads its finished base): no image is opened in the pause.
        # So does an incoming QEMU guest's gates.
        incoming = self._incoming is not None
        starts = self._vm_state is not None and (
            incoming or self._vm_state.get('power_state') == 'running')
        new = _compose_all(self._receivers, durable=False, keep_leaf=starts)
        steps.mark('compose')
        vm_uuid = None
        if self._vm_state is not None:
            devices = {new[src]: rec.take_leaf()
                       for src, (_sr, rec) in self._receivers.items()}
            try:
                vm_uuid = adopt(self.host, self.spec, self._vm_state, new,
                                start=not incoming, steps=steps,
                                save=False, staged=self._staged,
                                devices=devices)
                self._staged = None         # (the guest's now)
                taken = incoming and self.host.take_incoming(
                    vm_uuid, save=False, devices=devices)
            finally:
                for dev in devices.values():
                    if dev is not None:
                        dev.close()     # (not taken: the guest did not start)
            if taken:
                # The guest runs once its QEMU has the rest of its state,
                # which the source sends on this commit's answer: its
                # waiting thread starts after the answer.
                name = 'xsm-incoming-%s' % self.id[:8]
                after_answer.defer(functools.partial(
                    _start_thread, self.host.resume_incoming, (vm_uuid,),
                    name), name)
                steps.mark('guest_start')
        self.result = {'vdis': new, 'vm': vm_uuid}
        if settle:
            self._settle()
        return self.result

    def _settle(self):
        """After the commit's answer: durable, then ``done``; idempotent.

        Until ``done`` is recorded, a restart finishes the switch-over
        from the commit record (:func:`recover`); so everything the
        compose wrote is made durable first.
        """
        with self._lock:
            self._stop_server()
            if self.phase == 'done' or self.result is None:
                return
            for _sr, rec in self._receivers.values():
                rec.make_durable()
            if self._vm_state is not None:
                self.host.save()
            self._record('done', result=self.result)
            self._forget_credentials()
            self._receivers = {}        # composed: nothing more to hold

    def abort(self):
        """Destroy everything this migration made here; idempotent.

        :returns: :data:`ABORTED`, or :data:`COMMITTED` when too late.
        """
        with self._lock:
            if self.phase == 'done':
                return COMMITTED
            if self.committed:
                # past the commit point: finish what a failure left undone
                try:
                    self._finish()
                except Exception:
                    LOG.exception('migration %s: committed, but finishing '
                                  'the switch-over here failed; the agent '
                                  'finishes it at its next start', self.id)
                return COMMITTED
            if self.phase == ABORTED:
                return ABORTED
            if not self.aborting:
                # The abort point: durable before anything is removed;
                # from here a commit is refused.
                state = {'expired': self.expired} if self.expired else {}
                self._record(self.phase, aborting=True, **state)
                self.aborting = True
            self._stop_server()
            if self._incoming_start is not None:
                # a QEMU still starting is discarded once it has started
                concurrent.futures.wait([self._incoming_start])
            if self._incoming is not None:
                self.host.discard_incoming(self._incoming)
            for _sr, rec in self._receivers.values():
                rec.discard()
            self._receivers = {}
            self._staged = None
            self._forget_credentials()
            state = {'expired': self.expired} if self.expired else {}
            self.host.journal.finish(self.id, ABORTED, role=ROLE, **state)
            self.phase = ABORTED
            LOG.info('migration %s: destination rolled back', self.id)
            return ABORTED

    def expire(self, silent, lease):
        """Roll back: the source renewed no lease for ``silent`` seconds.

        The same roll-back as :meth:`abort`, under the same lock as
        :meth:`complete`, unless the destination was told to complete
        (``switch-over`` or ``done``: its copy may be the VM now) or has
        rolled back already. Whichever of this and :meth:`complete` takes
        the lock first wins; the other finds it decided.

        :returns: :data:`ABORTED` when it rolled back, else None.
        """
        with self._lock:
            if self.committed or self.phase in ('switch-over', 'done',
                                                ABORTED):
                return None
            self.expired = {'silent': round(silent, 1), 'lease': lease}
            return self.abort()

    def _seal_exports(self):
        """Shut off what the NBD exports serve; wait for requests inside.

        From here no request of any connection reaches a receiver's
        devices (each fails with ``ESHUTDOWN``), and none is still inside
        them: the compose may close and rewrite them. The server, its
        connections and their threads are left to :meth:`_stop_server`,
        out of the switch-over's pause. Every mirrored write the source
        waited for is in already; a request still inside is one the
        source gave up on, waited for here up to the server's own bound.
        """
        for fence in self._fences:
            fence.seal(nbd_server.STOP_TIMEOUT)

    def _stop_server(self):
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _forget_credentials(self):
        if self._creds is not None:
            self._creds.destroy()
            self._creds = None
        try:
            os.rmdir(os.path.dirname(self._cred_dir))
        except OSError:
            pass        # a local move: the source's credentials are there
        if self._on_done is not None:
            self._on_done(self)


def _compose_all(receivers, durable=True, keep_leaf=False):
    """Compose every received VDI, all at once; the first error raises.

    Each one's flushes and header writes overlap the others'.

    :param receivers: source VDI uuid -> (SR name, Receiver).
    :param durable: see ``Receiver.compose``.
    :param keep_leaf: see ``Receiver.compose``.
    :returns: source VDI uuid -> the composed VDI's uuid.
    """
    items = list(receivers.items())
    if len(items) < 2:
        for _src, (_sr, rec) in items:
            rec.compose(durable=durable, describe=False, keep_leaf=keep_leaf)
        return {src: rec.leaf_uuid for src, (_sr, rec) in items}
    with concurrent.futures.ThreadPoolExecutor(
            len(items), thread_name_prefix='xsm-compose') as pool:
        futures = [pool.submit(rec.compose, durable=durable,
                               describe=False, keep_leaf=keep_leaf)
                   for _src, (_sr, rec) in items]
        for fut in futures:
            fut.result()
    return {src: rec.leaf_uuid for src, (_sr, rec) in items}


def _start_thread(target, args, name):
    threading.Thread(target=target, args=args, daemon=True,
                     name=name).start()


def aborted_error(mid, host_name, expired):
    """The error of a call on a receive that was rolled back.

    :param expired: the receive's :attr:`Receive.expired` (or its
        journal's ``expired``): None when it was rolled back on request.
    """
    if expired:
        return errors.LeaseExpired(id=mid, host=host_name,
                                   silent=expired.get('silent', 0),
                                   lease=expired.get('lease', 0))
    return errors.MigrationAborted(id=mid, reason='destination host %s '
                                   'already rolled it back' % host_name)


def without_guest(vm_state):
    """``vm_state`` without the guest's running state (for the journal)."""
    if vm_state is None:
        return None
    return {k: v for k, v in vm_state.items() if k != 'workload'}


def adopt(host, spec, vm_state, new, start, steps=None, save=True,
          staged=None, devices=None):
    """Register the VM of a committed migration here; can be run again.

    :param new: source VDI uuid -> the composed VDI here.
    :param start: start it when it ran on the source (a restart does not:
        a host that stopped comes back with its VMs halted).
    :param save: False: the caller saves the host's VM records itself
        (:meth:`Host.save`).
    :param staged: the guest's models, staged before the pause
        (:meth:`Receive.stage_guest`).
    :param devices: composed VDI uuid -> its open device, or None; the
        guest's start takes (and pops) those it uses.
    :returns: the VM's uuid.
    """
    record = dict(vm_state['vm'])
    if record['uuid'] in host.vms:
        vm = host.vms[record['uuid']]
    else:
        srs = {v['uuid']: v['sr'] for v in spec['vdis']}
        record['disks'] = [dict(d, vdi=new[d['vdi']], sr=srs[d['vdi']])
                           for d in record['disks']]
        vif_map = spec.get('vif_map') or {}
        record['vifs'] = [vif_map.get(v, v)
                          for v in record.get('vifs', [])]
        # The receivers made the VDIs with this VM's uuid already.
        vm = host.adopt_vm(record, 'halted', save=save)
    if steps is not None:
        steps.mark('vm_register')
    if start and vm_state.get('power_state') == 'running':
        host.start_vm(vm.uuid, workload=vm_state.get('workload'),
                      save=save, staged=staged, devices=devices)
        if steps is not None:
            steps.mark('guest_start')
    return vm.uuid


class _Steps:
    """The steps of a commit here, timed, in milliseconds.

    See :data:`plan.DESTINATION_STEPS`.
    """

    def __init__(self):
        self._last = time.monotonic()
        self.ms = {}

    def mark(self, step):
        now = time.monotonic()
        self.ms[step] = round(self.ms.get(step, 0.0) +
                              (now - self._last) * 1000.0, 3)
        self._last = now


def _finish_after_restart(host, entry):
    """Finish a switch-over whose commit the journal records."""
    spec = entry.state.get('spec') or {}
    new = {}
    for src, (sr_name, leaf, vdis) in sorted(
            (entry.state.get('receivers') or {}).items()):
        sr = host.sr(sr_name)
        finish = getattr(sr, '_finish_receive', None)
        if finish is not None and len(vdis) > 1:
            # what Receiver.compose does once the devices are closed
            finish(sr_base.Receiver(sr, None, None, leaf, vdis))
        new[src] = leaf
    vm_uuid = None
    if entry.state.get('vm_state') is not None:
        vm_uuid = adopt(host, spec, entry.state['vm_state'], new,
                        start=False)
    result = {'vdis': new, 'vm': vm_uuid}
    shutil.rmtree(os.path.join(host.state_path, 'migrations', entry.id,
                               ROLE), ignore_errors=True)
    try:
        os.rmdir(os.path.join(host.state_path, 'migrations', entry.id))
    except OSError:
        pass
    host.journal.finish(entry.id, 'done', role=ROLE, result=result)
    LOG.warning('migration %s: committed here before the agent stopped; '
                'the switch-over is finished (VM %s registered, halted as '
                'every VM of a host that stopped)', entry.id, vm_uuid)
    return COMMITTED


def recover(host, entry):
    """Finish or roll back a receive the journal says was under way.

    Past the commit point (``committed`` in the journal) it goes forward,
    never back; before it, it rolls back.

    :returns: :data:`COMMITTED` or :data:`ABORTED`.
    """
    if entry.phase == 'done':
        return COMMITTED
    if entry.phase == ABORTED:
        return ABORTED
    committed = entry.state.get('committed')
    if plan.recovery_action(ROLE, entry.phase, committed) == plan.FINISH:
        return _finish_after_restart(host, entry)
    vm = (entry.state.get('spec') or {}).get('vm') or {}
    if entry.phase == 'switch-over' and vm.get('uuid') in host.vms:
        # a journal written before the commit rule
        host.journal.finish(entry.id, 'done', role=ROLE)
        LOG.warning('migration %s: the VM %s had been registered here when '
                    'the agent stopped; the migration is complete',
                    entry.id, vm.get('uuid'))
        return COMMITTED
    for sr_name, uuid in reversed(entry.state.get('created', [])):
        try:
            sr = host.sr(sr_name)
            for child in [v for v in sr.list() if v.parent == uuid]:
                sr.destroy(child.uuid)
            sr.destroy(uuid)
        except sr_base.SRError as exc:
            LOG.error('migration %s: could not remove VDI %s from SR %s: '
                      '%s', entry.id, uuid, sr_name, exc)
            raise
    shutil.rmtree(os.path.join(host.state_path, 'migrations', entry.id),
                  ignore_errors=True)
    host.journal.finish(entry.id, ABORTED, role=ROLE)
    LOG.warning('migration %s: rolled back what this destination had '
                'received before the agent stopped', entry.id)
    return ABORTED
