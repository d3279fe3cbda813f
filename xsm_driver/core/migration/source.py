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

"""The source role: drive a migration from the host the disks are on.

``preflight`` -> ``prepare-receive`` -> ``mirror`` -> ``snapshot`` ->
``copy`` -> ``compose`` -> ``switch-over`` -> ``clean-up`` -> ``done``.

For each running disk, one pause of its I/O gate inserts the mirror (to the
destination's leaf) and takes the snapshot: the VDI keeps its uuid and gets
a new empty leaf, the frozen data moves to a hidden read-only base. The
base's whole chain is then copied, allocated data only, to the
destination's base. A raw VDI has no snapshot: its live file is copied
while mirrored, and the destination's receiver lets mirrored sectors win
over copied ones, which gives the same result. A halted VM's disks are
simply copied.

Switch-over pauses the guest (its vCPUs, then its disks' gates), flushes
both sides, drops the mirrors and asks the destination to commit; the
pause is the downtime. Abort (any phase before the commit) removes the
mirrors, merges each snapshot back into its VDI (the chain is as deep as
before), and has the destination remove everything it made.

The commit rule (doc/source/switch-over.rst), the source's half. The
destination's journal decides (see :mod:`destination`); the source only
learns the decision:

* it journals ``switch-over`` *before* it asks the destination to commit
  (``complete``); before that phase nothing can have committed, and a
  failure or a restart rolls back without asking;
* it resumes its guest only when it *knows* the destination did not and
  will not commit: ``abort`` answered ``aborted`` (the destination
  recorded the roll-back durably and refuses a later ``complete``), or
  ``complete`` was refused as rolled back (:func:`plan.commit_outcome`);
* ``committed`` learned from any answer (``complete``'s result, ``abort``
  answering ``committed``, ``status``, after a restart too) finishes the
  migration here: the source copy is retired;
* anything else -- a lost request or reply, a timeout, a broken link, a
  crash -- is *unknown*: the guest stays paused and the source asks again
  (``abort``, which makes an undecided destination decide) for
  ``commit_timeout`` seconds (:func:`plan.switch_over_action`), then
  journals the phase ``in-doubt`` and stops asking. The guest stays
  paused (after a restart: halted) until ``xsm-migrate resolve ID``
  (:meth:`Migration.resolve`, :func:`recover`) gets a certain answer.

The destination is reached through a *peer* object with the methods
``preflight(spec)``, ``prepare(spec)``, ``compose(id)``,
``complete(id, vm_state)``, ``abort(id)`` and ``status(id)``, and
optionally ``claim(id, host)`` and ``renew(id, timeout)``; the RPC layer
provides one over oslo.messaging, the manager a local one for moves
between two SRs of the same host.

Lease: the request says the source renews (``renews``); from the
prepare (or claim) until the migration ends, a thread renews the
migration's lease on the destination's receive every quarter of the
lease the destination answers (:func:`renew_interval`). A failed renewal
is only logged -- the destination's lease decides -- but a destination
that answers it has rolled the receive back aborts the migration, as a
cancel does.
"""

import concurrent.futures
import inspect
import logging
import os
import shutil
import threading
import time

from xsm_driver.core.block import filters
from xsm_driver.core.block import nbd as nbd_device
from xsm_driver.core.migration import collector
from xsm_driver.core.migration import copy as copy_mod
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import plan

LOG = logging.getLogger(__name__)

ROLE = 'source'


class _Item:
    """One VDI of a migration, as the source sees it."""

    def __init__(self, disk, sr, vdi, dest_sr):
        self.disk = disk                # host.Disk, or None
        self.sr = sr
        self.vdi = vdi
        self.dest_sr = dest_sr
        self.snapshot = None            # uuid of the frozen base
        self.depth_before = len(sr.chain(vdi))
        self.mirror = None
        self.remote_leaf = None
        self.export = None

    @property
    def live(self):
        return self.disk is not None and self.disk.gate is not None

    @property
    def snapshots(self):
        return self.sr.type == 'vhd' and self.live


class _Done:
    """What a finished migration keeps of an item: its VDI."""

    def __init__(self, vdi):
        self.vdi = vdi


class Migration:
    """A migration this host is the source of.

    :param host: the :class:`host.Host`.
    :param mid: the migration id.
    :param peer: the destination (see the module docstring).
    :param vm: the :class:`host.VM` that moves, or None for a VDI move.
    :param vdi_map: VDI uuid -> destination SR name.
    :param options: a :class:`Options`.
    :param credentials: this side's client credentials, made beforehand,
        when the destination prepared the receive ahead; with ``receive``,
        the destination's answer to that prepare (see
        :meth:`manager.Manager.receive_prepare_ahead`): the migration then
        claims that receive instead of asking for one.
    """

    def __init__(self, host, mid, peer, vm, vdi_map, dest_host, options,
                 vif_map=None, kind='vm', credentials=None, receive=None):
        self.host = host
        self.id = mid
        self.peer = peer
        self.vm = vm
        self.vm_ref = (vm.uuid, vm.name) if vm is not None else (None, None)
        self.vdi_map = dict(vdi_map)
        self.vif_map = dict(vif_map or {})
        self.dest_host = dest_host
        self.options = options
        self.kind = kind
        self.phase = 'preflight'
        self.error = None
        self.downtime = None
        #: the pause, step by step (:func:`plan.switch_over_steps`)
        self.switch_over_steps = None
        self.result = None
        self.started = time.time()
        self.finished = None
        self.progress = copy_mod.Progress()
        self._cancel = threading.Event()
        self._lock = threading.RLock()
        self._limiter = copy_mod.TokenBucket(options.bandwidth)
        self._items = []
        self._conns = set()             # open NBD connections
        self._creds = credentials
        self._remote = None
        self._prepared = receive
        self._guest_writes_before = None
        self.guest_writes = 0
        self.thread = None
        self._renewing = threading.Event()      # set: stop renewing
        self._renewer = None
        self._leased = False                    # the destination said so
        #: (paused items, suspended guest or None) while in doubt
        self._held = None
        #: the destination's commit is known (nothing may roll back)
        self._commit_known = False
        self._resolve_lock = threading.Lock()
        #: called as ``phase_hook(migration, phase)`` on each new phase
        self.phase_hook = None
        #: the guest runs in a QEMU here: its memory moves with QEMU's
        #: own migration (see :meth:`_memory`)
        self.qemu_guest = (kind == 'vm' and vm is not None and
                           vm.in_qemu and not options.copy)
        #: QEMU's migration was started (a roll-back cancels it)
        self._qemu_migrating = False
        #: QEMU's ``downtime`` (ms) from ``query-migrate``, once completed
        self.qemu_downtime = None
        #: QEMU's ``query-migrate`` at the pre-switchover pause
        self.memory = None
        self._in_memory = False

    @property
    def vdis(self):
        """The VDIs this migration moves."""
        disks = self.vm.disks if self.vm is not None else ()
        return set(self.vdi_map) | {d.vdi for d in disks}

    def _let_go(self):
        """Drop what a finished migration no longer needs.

        The manager keeps finished migrations for ``get``; without this
        they would hold the VM (its guest's model) and every device.
        """
        self.vm = None
        self.peer = None
        self._items = [_Done(i.vdi) for i in self._items]
        self._conns = set()

    # -- status ------------------------------------------------------------

    def status(self):
        with self._lock:
            phase, finished = self.phase, self.finished
        snap = self.progress.snapshot()
        # (QEMU's migration of the memory runs in the journal's compose)
        snap['phase'] = 'memory' if self._in_memory else phase
        return {
            'id': self.id, 'kind': self.kind, 'phase': phase,
            'vm': self.vm_ref[0],
            'vm_name': self.vm_ref[1],
            'vdis': [i.vdi for i in self._items] or list(self.vdi_map),
            'source': self.host.name, 'destination': self.dest_host,
            'progress': snap,
            'bytes_copied': snap['done'],
            'downtime_ms': (None if self.downtime is None
                            else round(self.downtime * 1000, 3)),
            'guest_kind': 'qemu' if self.qemu_guest else 'model',
            'qemu_downtime_ms': self.qemu_downtime,
            'switch_over_steps_ms': self.switch_over_steps,
            'guest_writes_during_migration': self._guest_writes(),
            'error': str(self.error) if self.error else None,
            'started': self.started, 'finished': finished,
            'time': time.time(),
            'result': self.result,
        }

    def _guest_writes(self):
        if self._guest_writes_before is None:
            return 0
        if self.finished is None and self.vm is not None and \
                self.vm.workload is not None:
            return self.vm.workload.writes - self._guest_writes_before
        return self.guest_writes

    def _set_phase(self, phase, **state):
        with self._lock:
            self.phase = phase
            self.progress.phase = phase
            self.host.journal.record(self.id, ROLE, phase, **state)
        LOG.info('migration %s: %s', self.id, phase)
        if self.phase_hook is not None:
            self.phase_hook(self, phase)

    def _journal_items(self):
        return [{'vdi': i.vdi, 'sr': i.sr.name, 'snapshot': i.snapshot,
                 'depth_before': i.depth_before} for i in self._items]

    # -- control -----------------------------------------------------------

    def cancel(self, reason='cancelled by the operator'):
        """Ask the migration to abort; it does so at its next step."""
        with self._lock:
            if self.phase == plan.IN_DOUBT:
                raise errors.InvalidPhase(
                    id=self.id, phase=self.phase,
                    reason='the destination may have committed it; run '
                    '"xsm-migrate resolve %s" to finish or roll it back '
                    'by the destination\'s answer' % self.id)
            if not plan.can_abort(self.phase):
                raise errors.InvalidPhase(
                    id=self.id, phase=self.phase,
                    reason='it is past the point where it can be aborted')
            if self.error is None:
                self.error = errors.MigrationAborted(id=self.id,
                                                     reason=reason)
        self._cancel.set()
        self._abort_connections()

    def force_complete(self):
        """Lift the bandwidth limit so the copy ends as soon as it can.

        The mirror is synchronous, so the switch-over follows the copy at
        once: no convergence to wait for.
        """
        self._limiter.rate = None

    def _mirror_failed(self, exc):
        with self._lock:
            if self.error is None:
                self.error = errors.MigrationAborted(
                    id=self.id, reason='mirroring to the destination '
                    'failed: %s' % exc)
        self._cancel.set()
        self._abort_connections()

    def _lease_lost(self, exc):
        """The destination rolled its receive back: abort, as a cancel.

        From the switch-over on it changes nothing: the destination's
        answer to the commit decides.
        """
        if isinstance(exc, errors.LeaseExpired):
            # (from over RPC: without the remote traceback in its message)
            try:
                exc = errors.LeaseExpired(**exc.kwargs)
            except (AttributeError, KeyError, TypeError, ValueError):
                pass
        with self._lock:
            if not plan.can_abort(self.phase):
                return
            if self.error is None or (
                    isinstance(exc, errors.LeaseExpired) and
                    not isinstance(self.error, errors.LeaseExpired)):
                self.error = exc
        LOG.error('migration %s: %s', self.id, exc)
        self._cancel.set()
        self._abort_connections()

    def _check(self):
        if self._cancel.is_set():
            raise self.error or errors.MigrationAborted(id=self.id,
                                                        reason='cancelled')

    # -- the run -----------------------------------------------------------

    def start(self):
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name='xsm-migration-%s' % self.id[:8])
        self.thread.start()
        return self

    def run(self):
        committed = False
        in_doubt = False
        try:
            self._check()
            self._prepare()
            self._check()
            self._mirror_and_snapshot()
            self._check()
            self._copy()
            self._check()
            self._compose()
            self._check()
            if self.qemu_guest:
                self._memory()
                self._check()
            committed = self._switch_over()
            self._clean_up()
            self._set_phase('done', result=self.result,
                            switch_over_steps_ms=self.switch_over_steps)
        except errors.InDoubt as exc:
            # Neither resumed nor retired: the guest stays paused here.
            self._stop_renewing()
            in_doubt = True
            with self._lock:
                self.error = exc
            LOG.error('%s', exc)
            with self._lock:            # seen at once by status()
                self._mark_paused(True)
                self.finished = time.time()     # (its run has ended)
                self._set_phase(plan.IN_DOUBT, error=str(exc))
        except Exception as exc:
            self._stop_renewing()
            with self._lock:
                if self.error is None:
                    self.error = exc
            if not committed and not self._commit_known:
                LOG.error('migration %s failed in phase %s: %s', self.id,
                          self.phase, self.error)
                self._abort()
            else:
                LOG.exception('migration %s: clean-up after the switch-over '
                              'failed; run the agent again to finish it',
                              self.id)
        finally:
            self._stop_renewing(wait=True)
            self.progress.stop()
            self._ended(keep=in_doubt)

    def _ended(self, keep=False):
        if self.vm is not None and self._guest_writes_before is not None \
                and self.vm.workload is not None:
            self.guest_writes = (self.vm.workload.writes -
                                 self._guest_writes_before)
        if not keep:
            self._let_go()
        self.finished = time.time()

    # -- preflight ---------------------------------------------------------

    def preflight(self):
        """Refuse, before anything changes, what cannot work; raises."""
        vdis = ([d.vdi for d in self.vm.disks] if self.vm is not None
                else list(self.vdi_map))
        plan.check_vdi_map(vdis, self.vdi_map)
        disks = {d.vdi: d for d in self.vm.disks} if self.vm else {}
        if self.kind == 'vdi':
            for vm in self.host.vms.values():
                for d in vm.disks:
                    if d.vdi in self.vdi_map:
                        disks[d.vdi] = d
        for vdi in vdis:
            sr = self.host.find_vdi(vdi)
            item = _Item(disks.get(vdi), sr, vdi, self.vdi_map[vdi])
            if item.snapshots:
                plan.check_chain_depth(vdi, item.depth_before + 1)
                plan.check_space(sr.name, self.options.leaf_headroom,
                                 sr.capacity()['free'], host=self.host.name)
            self._items.append(item)
        ordered = plan.order_vdis([self._describe(i) for i in self._items])
        by_uuid = {i.vdi: i for i in self._items}
        self._items = [by_uuid[v['uuid']] for v in ordered]
        self.spec = self._spec()
        self.peer.preflight(self.spec)
        # vm and copy: what a recovery after the commit must clean up
        self._set_phase('preflight', items=self._journal_items(),
                        dest_host=self.dest_host, kind=self.kind,
                        vm=self.vm_ref[0], copy=bool(self.options.copy))

    def _describe(self, item):
        record = item.sr.get(item.vdi)
        allocated = sum(v.allocated for v in item.sr.chain(item.vdi))
        return {'uuid': item.vdi, 'size': record.size,
                'allocated': allocated, 'name': record.name,
                'sr': item.dest_sr, 'mirror': item.live}

    def _spec(self):
        vm = None
        if self.vm is not None and self.kind == 'vm':
            vm = {k: v for k, v in self.vm.to_dict().items()
                  if k in ('uuid', 'name', 'disks', 'vifs', 'qemu')}
        spec = {'id': self.id, 'source_host': self.host.name,
                'vm': vm, 'vif_map': self.vif_map,
                'cross_pool': self.kind == 'vm',
                'network': self.options.network,
                'copy_connections': self._copy_connections(),
                # this source renews a lease on the receive (API 1.2)
                'renews': True,
                'vdis': [self._describe(i) for i in self._items]}
        if self.qemu_guest:
            # the destination starts a QEMU that receives the guest,
            # during the copy, its address in compose's answer
            spec['guest'] = 'qemu'
            spec['incoming_at'] = destination.INCOMING_AT_COMPOSE
        return spec

    def _copy_connections(self):
        return max(1, int(self.options.connections))

    # -- prepare -----------------------------------------------------------

    def _prepare(self):
        if self._prepared is not None:
            # The destination prepared the receive ahead: claim it (once
            # only). A refusal leaves the phase at preflight, so that the
            # abort does not roll back a receive that is not ours; any
            # other failure may have claimed it: the abort rolls it back.
            try:
                self.peer.claim(self.id, self.host.name)
            except errors.MigrationError:
                raise
            except Exception:
                self._set_phase('prepare-receive')
                raise
            self._set_phase('prepare-receive')
            self._remote = self._prepared
        else:
            self._set_phase('prepare-receive')
            self._creds = credentials.Credentials.make(
                os.path.join(self.host.state_path, 'migrations', self.id,
                             ROLE), 'client', hosts=[self.host.name])
            spec = dict(self.spec, client_ca_pem=self._creds.ca_pem)
            self._remote = self.peer.prepare(spec)
        self._start_renewing()
        if self.qemu_guest and not (
                self._remote.get('incoming') or
                self._remote.get('incoming_at') ==
                destination.INCOMING_AT_COMPOSE):
            raise errors.MigrationError(
                'host %s runs no QEMU guests ([hypervisor]driver): VM %s, '
                'a QEMU guest, cannot move there live'
                % (self.dest_host, self.vm_ref[0]))
        self._tls = self._creds.client_context(self._remote['server_ca_pem'])
        for item in self._items:
            item.export = self._remote['exports'][item.vdi]

    # -- the lease on the destination's receive ----------------------------

    def _start_renewing(self):
        renew = getattr(self.peer, 'renew', None)
        if renew is None or self._renewer is not None:
            return
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(renew,), daemon=True,
            name='xsm-renew-%s' % self.id[:8])
        self._renewer.start()

    def _stop_renewing(self, wait=False):
        self._renewing.set()
        renewer = self._renewer
        if wait and renewer is not None:
            # A renewal in flight ends within its own timeout; the
            # migration does not wait that long for it.
            renewer.join(2.0)

    def _renew_loop(self, renew):
        """Renew until the migration ends or the receive holds no lease."""
        interval = renew_interval(self.options.receive_lease_timeout)
        failures = 0
        while not self._renewing.is_set():
            started = time.monotonic()
            try:
                # no call may outlast half the lease
                answer = renew(self.id, timeout=interval * 2)
            except (errors.MigrationAborted, errors.MigrationNotFound) as exc:
                if not self._renewing.is_set():
                    self._lease_lost(exc)
                return
            except Exception as exc:
                failures += 1
                LOG.warning('migration %s: renewing the lease on the '
                            'receive of host %s failed (%d in a row: %s); '
                            'trying again in %.1f s', self.id,
                            self.dest_host, failures, exc, interval)
            else:
                lease = (answer or {}).get('lease_timeout')
                if not lease:
                    LOG.debug('migration %s: the receive of host %s holds '
                              'no lease', self.id, self.dest_host)
                    return
                if not self._leased or failures:
                    LOG.info('migration %s: host %s holds the receive for '
                             '%g s without a renewal; renewing every '
                             '%.1f s', self.id, self.dest_host, lease,
                             renew_interval(lease))
                self._leased = True
                failures = 0
                interval = renew_interval(lease)
            self._renewing.wait(max(0.0, started + interval -
                                    time.monotonic()))

    def _explain_failure(self):
        """A failure caused by the destination's lease says so.

        When the destination rolled the receive back for want of a
        renewal, the data path fails first (its server closed): ask the
        destination why, and report that instead.
        """
        if not self._leased or isinstance(self.error, errors.LeaseExpired):
            return
        try:
            expired = (self.peer.status(self.id) or {}).get('expired')
        except Exception:
            return
        if isinstance(expired, dict):
            error = errors.LeaseExpired(id=self.id, host=self.dest_host,
                                        silent=expired.get('silent', 0),
                                        lease=expired.get('lease', 0))
            LOG.error('migration %s: %s (what failed here: %s)', self.id,
                      error, self.error)
            with self._lock:
                self.error = error

    def _connect(self, export):
        # A dead link fails the connection within the mirror timeout
        # instead of blocking a sender for as long as TCP retries.
        host, port = self._remote['host'], self._remote['port']
        dev = nbd_device.NBDDevice.connect(
            host, port, export, tls_context=self._tls,
            user_timeout=self.options.mirror_timeout,
            # the export name is a one-time secret: keep it out of messages
            label='nbd://%s:%d (migration %s)' % (host, port, self.id))
        with self._lock:
            self._conns.add(dev)
        return dev

    def _disconnect(self, dev):
        with self._lock:
            self._conns.discard(dev)
        dev.close()

    def _abort_connections(self):
        """Drop every data connection now: nothing waits on a dead link."""
        with self._lock:
            conns = list(self._conns)
        for dev in conns:
            dev.abort()

    # -- mirror and snapshot -----------------------------------------------

    def _mirror_and_snapshot(self):
        self._set_phase('mirror')
        for item in self._items:
            if item.live:
                item.remote_leaf = self._connect(item.export['leaf'])
        if self.vm is not None and self.vm.workload is not None:
            self._guest_writes_before = self.vm.workload.writes
        self._set_phase('snapshot', items=self._journal_items())
        for item in self._items:
            if item.live:
                self._insert_mirror(item)
        self._set_phase('snapshot', items=self._journal_items())

    def _insert_mirror(self, item):
        gate = item.disk.gate
        gate.pause(self.options.pause_timeout)
        try:
            local = gate.next
            if item.snapshots:
                local.flush()
                item.snapshot = item.sr.snapshot(item.vdi).uuid
                try:
                    local = item.sr.attach(item.vdi, writable=True)
                except Exception:
                    # Undo the snapshot; the old device's view of the file
                    # is stale once coalesced, so it goes first.
                    gate.next.close()
                    item.sr.coalesce(item.vdi)
                    item.snapshot = None
                    gate.resume(item.sr.attach(item.vdi, writable=True))
                    raise
            item.mirror = filters.Mirror(
                local, item.remote_leaf, on_failure=self._mirror_failed,
                timeout=self.options.mirror_timeout)
            old = gate.resume(item.mirror)
        except Exception:
            if gate.paused:
                gate.resume()
            raise
        if old is not local:
            old.close()

    # -- copy --------------------------------------------------------------

    def _compose(self):
        """The copy is done: the destination makes it durable.

        A QEMU guest's incoming QEMU started there during the copy: its
        address comes with the answer (unless prepare's had it).
        """
        self._set_phase('compose')
        answer = self.peer.compose(self.id) or {}
        if self.qemu_guest and not self._remote.get('incoming'):
            if not answer.get('incoming'):
                raise errors.MigrationError(
                    'host %s did not say where its QEMU listens for VM %s'
                    % (self.dest_host, self.vm_ref[0]))
            self._remote['incoming'] = answer['incoming']

    def _copy(self):
        self._set_phase('copy')
        sources = []
        for item in self._items:
            frozen = item.snapshot or item.vdi
            sources.append((item, item.sr.attach(frozen, writable=False)))
        try:
            ranges = {}
            for item, src in sources:
                ranges[item.vdi] = plan.split_extents(
                    src.extents(0, src.size), self.options.chunk)
            self.progress.total = sum(n for r in ranges.values()
                                      for _o, n in r)
            self.progress.start()
            # all disks together hold at most copy_buffer bytes of data,
            # in buffers they reuse
            self._budget = copy_mod.Buffers(
                max(1, self.options.copy_buffer // self.options.chunk),
                self.options.chunk)
            self._shares = copy_mod.shares(
                len(sources), max(1, self.options.copy_buffer
                                  // self.options.chunk),
                self.options.depth, self._copy_connections())
            with concurrent.futures.ThreadPoolExecutor(
                    max_workers=len(sources) or 1,
                    thread_name_prefix='xsm-copy') as pool:
                futures = [pool.submit(self._copy_one, item, src,
                                       ranges[item.vdi])
                           for item, src in sources]
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        fut.result()
                except Exception:
                    self._cancel.set()
                    raise
        finally:
            # the buffers go with the copy, not with the migration's record
            self._budget = None
            for _item, src in sources:
                src.close()

    def _copy_one(self, item, src, ranges):
        connections, workers = self._shares
        names = copy_exports(item.export, connections, len(ranges))
        dsts = []
        try:
            for name in names:
                self._check()
                dsts.append(self._connect(name))
            copy_mod.copy_allocated(
                src, dsts, ranges=ranges, chunk=self.options.chunk,
                depth=max(workers, len(dsts)),
                limiter=self._limiter, progress=self.progress,
                cancel=self._cancel, budget=self._budget)
        finally:
            for dst in dsts:
                self._disconnect(dst)

    # -- the guest's memory (a QEMU guest) ---------------------------------

    def _memory(self):
        """QEMU's migration, up to its pause before the switch-over.

        The destination's QEMU listens (it started ``-incoming`` when it
        prepared the receive); this side's QEMU sends the guest's memory
        while the guest runs, its disk writes mirrored as ever. It stops
        in ``pre-switchover``: the guest's vCPUs stopped, its disk
        requests drained and flushed -- every one of them through the
        gates and the mirrors, so both sides hold them. The storage
        switch-over follows; QEMU sends the rest only after the commit
        (:meth:`_finish_memory`). Until then a roll-back cancels QEMU's
        migration and the guest runs on here. The journal stays at
        ``compose``: nothing has been asked to commit.

        QEMU's stream is TLS 1.3 with this migration's credentials
        (``tls-creds-x509`` on both sides): this side's client
        certificate, and only the destination's CA trusted, for the
        destination's migration address.
        """
        with self._lock:
            self.progress.phase = 'memory'
            self._in_memory = True
        incoming = self._remote['incoming']
        self._qemu_migrating = True
        timeout = self.options.memory_timeout or 600.0
        tls = {'ca_pem': self._remote['server_ca_pem'],
               'own_ca_pem': self._creds.ca_pem,
               'cert': self._creds.cert_file, 'key': self._creds.key_file}
        try:
            self.memory = self.host.qemu.migrate_until_switchover(
                self.vm.uuid, incoming['host'], incoming['port'],
                timeout=timeout, check=self._check, tls=tls,
                # the migration's bandwidth limit holds for the memory too
                max_bandwidth=(self.options.memory_bandwidth or
                               self.options.bandwidth or (1 << 30)))
        finally:
            self._in_memory = False
        LOG.info('migration %s: the guest\'s memory is on host %s, its '
                 'QEMU waits for the switch-over (%s ms of RAM transfer)',
                 self.id, self.dest_host, self.memory.get('total-time'))

    def _finish_memory(self):
        """The commit is known: let QEMU send the rest of the guest."""
        if not self._qemu_migrating:
            return
        try:
            info = self.host.qemu.migrate_finish(self.vm.uuid)
            self.qemu_downtime = info.get('downtime')
            LOG.info('migration %s: QEMU\'s migration completed (%s ms '
                     'of downtime by QEMU)', self.id, self.qemu_downtime)
        except Exception:
            # The destination committed: the guest must not run here.
            LOG.exception('migration %s: QEMU could not send the end of '
                          'the guest\'s state; the VM is committed on host '
                          '%s, where it stays halted', self.id,
                          self.dest_host)
        self._qemu_migrating = False
        self.host.qemu.drop_tls(self.vm.uuid)

    def _cancel_memory(self):
        """Roll back QEMU's migration: the guest runs on here."""
        if not self._qemu_migrating or self.vm is None:
            return
        try:
            self.host.qemu.migrate_cancel(self.vm.uuid)
            self._qemu_migrating = False
        except Exception:
            LOG.exception('migration %s: cancelling QEMU\'s migration of '
                          'VM %s failed', self.id, self.vm.uuid)
        self.host.qemu.drop_tls(self.vm.uuid)

    # -- switch-over -------------------------------------------------------

    def _switch_over(self):
        """Pause, hand over, resume; True once the destination committed.

        Nothing is flushed inside the pause: every guest write the gates
        let through was acknowledged by both sides, and the destination
        makes its copy durable when it composes. A flush just before the
        pause leaves it little to write.
        """
        self._set_phase('switch-over')
        guest = self.vm.workload if self.vm is not None else None
        moving_vm = self.kind == 'vm' and not self.options.copy
        live = [i for i in self._items if i.live]
        self._each(lambda item: item.mirror.flush(), live)
        self._check()
        # the guest's memory, as it were: most of it before the pause,
        # decoded there before the pause too when the destination can
        ahead = guest.export_ahead() if guest is not None and moving_vm \
            else None
        staged = ahead is not None and self._stage_guest(ahead)
        with collector.held():
            return self._pause(guest, moving_vm, live, ahead, staged)

    def _pause(self, guest, moving_vm, live, ahead, staged):
        """The pause of :meth:`_switch_over`, timed step by step."""
        steps = Steps()
        start = steps.start
        if guest is not None and moving_vm:
            guest.suspend(self.options.pause_timeout)
            steps.mark('vcpus_pause')
        paused, remotes = [], []
        committed = False
        try:
            for item in live:
                item.disk.gate.pause(self.options.pause_timeout)
                paused.append(item)
            steps.mark('disks_drain')
            self._check()
            vm_state = None
            if self.kind == 'vm':
                vm_state = {'vm': self.spec['vm'],
                            'power_state': ('halted' if self.options.copy
                                            else self.vm.power_state),
                            'workload': (guest.export(ahead, staged)
                                         if guest is not None
                                         and moving_vm else None)}
                steps.mark('state_export')
            for item in live:
                remotes.append(item.mirror.detach())
                item.remote_leaf = None
            steps.mark('mirrors_detach')
            result = self._commit(vm_state)
            steps.mark('commit')
            dest_steps = None
            if isinstance(result, dict):
                result = dict(result)
                dest_steps = result.pop(STEPS_KEY, None)
            self.result = result
            self._commit_known = True
            committed = True
        except errors.InDoubt:
            # The destination may have committed: the guest stays paused
            # (a copy's guest never moves: it may go on).
            if self.options.copy:
                self._unpause(paused, None)
                paused = []
            self._held = (paused, guest if moving_vm else None)
            raise
        except Exception:
            # Not asked to commit, or known not to have committed.
            self._unpause(paused, guest if moving_vm else None)
            raise
        finally:
            if not committed:
                self._after_pause(remotes, guest, ahead)
        try:
            self._committed(paused)
            end = steps.mark('hand_over')
        finally:
            # (no part of the pause: after its end is taken)
            self._after_pause(remotes, guest, ahead)
        self.downtime = end - start
        self.switch_over_steps = plan.switch_over_steps(
            steps.seconds, dest_steps if isinstance(dest_steps, dict)
            else None)
        LOG.info('migration %s: switched over with %.1f ms of downtime '
                 '(%s)', self.id, self.downtime * 1000,
                 ', '.join('%s %.1f' % kv
                           for kv in self.switch_over_steps.items()))
        return True

    def _stage_guest(self, ahead):
        """Send the guest's models ahead of the pause; True if taken.

        A destination that predates it (None), or fails it, gets them in
        the commit, as before: the pause is then longer, nothing else
        changes.
        """
        stage = getattr(self.peer, 'stage_guest', None)
        if stage is None:
            return False
        try:
            return bool(stage(self.id, ahead))
        except Exception as exc:
            LOG.warning('migration %s: host %s did not take the guest\'s '
                        'state ahead of the switch-over (%s); it goes with '
                        'the commit', self.id, self.dest_host, exc)
            return False

    def _after_pause(self, remotes, guest, ahead):
        self._close_later(remotes)
        if ahead is not None:
            guest.end_ahead()

    def _mark_paused(self, held):
        """The held VM shows as paused while in doubt (not running)."""
        guest = (self._held or ([], None))[1]
        # (a QEMU guest is held in QEMU's pre-switchover, vCPUs stopped)
        if self.vm is None or (held and guest is None and
                               not self.qemu_guest):
            return
        state = host_mod.PAUSED if held else host_mod.RUNNING
        if self.vm.power_state != state and \
                self.vm.power_state != host_mod.HALTED:
            self.vm.power_state = state
            self.host.save()

    def _committed(self, paused):
        """The destination committed: the disks are its now."""
        if self.kind == 'vdi':
            self._repoint()
        elif self.options.copy:
            self._unpause(paused, None)

    @staticmethod
    def _each(func, items):
        """``func(item)`` for every item at once; the first error raises."""
        if len(items) < 2:
            for item in items:
                func(item)
            return
        with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
            for fut in [pool.submit(func, item) for item in items]:
                fut.result()

    def _close_later(self, devices):
        devices = [d for d in devices if d is not None]
        if devices:
            threading.Thread(target=lambda: [self._disconnect(d)
                                             for d in devices],
                             name='xsm-close', daemon=True).start()

    def _commit(self, vm_state):
        """Ask the destination to commit; act on what it knows only.

        :returns: the destination's result, once it committed.
        :raises errors.MigrationAborted: it rolled back (durably: it
            refuses the commit from now on).
        :raises errors.InDoubt: no certain answer within
            ``commit_timeout``.
        """
        start = time.monotonic()
        try:
            answer = self.peer.complete(self.id, vm_state)
        except Exception as exc:
            answer, last = None, exc
            outcome = plan.commit_outcome('complete', error=exc)
        else:
            last = None
            outcome = plan.commit_outcome('complete', answer)
        if outcome == plan.COMMITTED:
            return answer
        if outcome == plan.UNKNOWN:
            LOG.warning('migration %s: the destination did not confirm the '
                        'switch-over (%s); the guest stays paused while '
                        'host %s is asked whether it committed', self.id,
                        last, self.dest_host)
        outcome, last = self._ask(start, outcome, last)
        return self._act(outcome, last, time.monotonic() - start)

    def _ask(self, start, outcome, last, timeout=None):
        """Ask ``abort`` until the answer is certain or time runs out.

        ``abort`` makes a destination that has not decided decide (it
        rolls back), and answers ``committed`` when it had committed.
        """
        timeout = (self.options.commit_timeout if timeout is None
                   else timeout)
        interval = max(0.01, self.options.commit_retry_interval)
        asked = 0
        while True:
            elapsed = time.monotonic() - start
            action = plan.switch_over_action(outcome, elapsed, timeout)
            if action == plan.REPORT_IN_DOUBT and not asked:
                action = plan.ASK_AGAIN     # (a slow commit): once at least
            if action != plan.ASK_AGAIN:
                return outcome, last
            if asked:
                time.sleep(min(interval, max(0.0, timeout - elapsed)))
            asked += 1
            left = max(1.0, timeout - (time.monotonic() - start))
            try:
                answer = _call(self.peer.abort, self.id, timeout=left)
            except Exception as exc:
                last = exc
                outcome = plan.commit_outcome('abort', error=exc)
                LOG.warning('migration %s: no answer from host %s on '
                            'whether it committed (%s); asking again',
                            self.id, self.dest_host, exc)
            else:
                outcome = plan.commit_outcome('abort', answer)
                last = 'abort answered %r' % (answer,)

    def _act(self, outcome, last, waited):
        if outcome == plan.COMMITTED:
            LOG.info('migration %s: host %s committed the switch-over',
                     self.id, self.dest_host)
            return self._learn_result()
        if outcome == plan.ABORTED:
            raise errors.MigrationAborted(
                id=self.id, reason='destination host %s rolled the '
                'switch-over back (%s); the VM resumes on the source'
                % (self.dest_host, last))
        raise errors.InDoubt(id=self.id, host=self.dest_host,
                             waited=waited, last=last)

    def _learn_result(self):
        """The committed destination's result, best effort (None)."""
        for _ in range(3):
            try:
                return (_call(self.peer.status, self.id,
                              timeout=max(1.0,
                                          self.options.commit_retry_interval)
                              ) or {}).get('result')
            except Exception as exc:
                LOG.warning('migration %s: committed, but host %s did not '
                            'say with what result (%s)', self.id,
                            self.dest_host, exc)
        return None

    def resolve(self):
        """Learn the outcome of a migration in doubt, and act on it.

        :returns: the status once finished (``done``) or rolled back
            (``aborted``).
        :raises errors.InDoubt: still no certain answer; nothing changed.
        """
        with self._resolve_lock:
            if self.phase != plan.IN_DOUBT:
                return self.status()
            start = time.monotonic()
            outcome, last = self._ask(
                start, plan.UNKNOWN, None,
                timeout=max(1.0, self.options.commit_retry_interval))
            if outcome == plan.UNKNOWN:
                raise errors.InDoubt(id=self.id, host=self.dest_host,
                                     waited=time.monotonic() - start,
                                     last=last)
            paused, guest = self._held or ([], None)
            try:
                if outcome == plan.COMMITTED:
                    self.result = self._learn_result()
                    self._committed(paused)
                    self._held = None
                    self._clean_up()
                    self._set_phase('done', result=self.result)
                    self.error = None
                else:
                    self._unpause(paused, guest)
                    if guest is not None or self.qemu_guest:
                        self._mark_paused(False)
                    self._held = None
                    self.error = errors.MigrationAborted(
                        id=self.id, reason='destination host %s rolled the '
                        'switch-over back; the VM resumed on the source'
                        % self.dest_host)
                    self._abort()
            finally:
                if self._held is None:
                    self._ended()
            LOG.warning('migration %s: resolved, %s', self.id, self.phase)
            return self.status()

    def _unpause(self, items, guest):
        for item in items:
            if item.disk.gate.paused:
                item.disk.gate.resume()
        if guest is not None:
            guest.resume()

    def _repoint(self):
        """A VDI move within the host: the disk now reads the new VDI."""
        for item in self._items:
            new = self.result['vdis'][item.vdi]
            dest = self.host.sr(item.dest_sr)
            if item.live:
                old = item.disk.gate.resume(dest.attach(new, writable=True))
                old.close()
            if item.disk is not None:
                item.disk.vdi, item.disk.sr = new, dest.name
                vm = item.sr.get(item.vdi).vm
                if vm is not None:
                    dest.update(new, vm=vm)
        self.host.save()

    # -- clean-up ----------------------------------------------------------

    def _clean_up(self):
        self._set_phase('clean-up', result=self.result)
        if self.options.copy:
            for item in self._items:
                self._unsnapshot(item)
        else:
            if self.kind == 'vm':
                self._finish_memory()
                self.host.stop_vm(self.vm.uuid)
                self.host.forget_vm(self.vm.uuid)
            # each chain's destroys share the file system's commits
            self._each(lambda item: host_mod.destroy_chain(item.sr,
                                                           item.vdi),
                       self._items)
        self._forget_credentials()

    def _unsnapshot(self, item):
        """Merge the snapshot back: the chain is as deep as before."""
        if item.snapshot is None:
            return
        gate = item.disk.gate if item.live else None
        if gate is not None:
            gate.pause(self.options.pause_timeout)
        try:
            if gate is not None:
                gate.next.close()
            item.sr.coalesce(item.vdi)
            item.snapshot = None
        finally:
            if gate is not None:
                gate.resume(item.sr.attach(item.vdi, writable=True))

    def _forget_credentials(self):
        if self._creds is not None:
            self._creds.destroy()
            self._creds = None
        shutil.rmtree(os.path.join(self.host.state_path, 'migrations',
                                   self.id), ignore_errors=True)

    # -- abort -------------------------------------------------------------

    def _abort(self):
        """Undo everything; each step can be run again."""
        self._cancel.set()
        self._cancel_memory()
        for item in self._items:
            try:
                self._remove_mirror(item)
                self._unsnapshot(item)
            except Exception:
                LOG.exception('migration %s: restoring VDI %s failed',
                              self.id, item.vdi)
        self._explain_failure()
        try:
            if self.phase != 'preflight':
                self.peer.abort(self.id)
        except Exception as exc:
            LOG.warning('migration %s: the destination could not be told '
                        'to roll back (%s); its agent rolls back at its '
                        'next start', self.id, exc)
        self._forget_credentials()
        self.phase = 'aborted'
        self.progress.phase = 'aborted'
        self.host.journal.finish(self.id, 'aborted', role=ROLE)
        LOG.info('migration %s: aborted, source restored', self.id)

    def _remove_mirror(self, item):
        if item.remote_leaf is not None:
            # First the connection, outside the pause: a write waiting on a
            # dead link fails now (the guest's write is done locally), so
            # the pause below never waits for the network.
            item.remote_leaf.abort()
        if item.mirror is not None:
            gate = item.disk.gate
            gate.pause(self.options.pause_timeout)
            local, remote = item.mirror.release()
            gate.resume(local)
            item.mirror = None
            item.remote_leaf = remote or item.remote_leaf
        if item.remote_leaf is not None:
            self._disconnect(item.remote_leaf)
            item.remote_leaf = None


#: the key of the destination's timings in its answer to the commit
STEPS_KEY = 'steps_ms'


class Steps:
    """Named steps of a pause, timed with a monotonic clock.

    Each :meth:`mark` ends the step under way: it took the time since
    the previous mark (or the start).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.start = self._last = clock()
        #: step -> seconds, in the order they ended
        self.seconds = {}

    def mark(self, step):
        now = self._clock()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._last
        self._last = now
        return now


#: the lease a source assumes until the destination names its own
DEFAULT_LEASE = 120.0


def renew_interval(lease):
    """Seconds between two renewals of a lease of ``lease`` seconds.

    A quarter: three renewals in a row may be lost or late before the
    lease runs out. Without a lease of its own (0) a source renews as for
    :data:`DEFAULT_LEASE` until the destination names its lease.

    >>> renew_interval(120), renew_interval(1), renew_interval(0)
    (30.0, 0.25, 30.0)
    """
    lease = float(lease) if lease and lease > 0 else DEFAULT_LEASE
    return lease / 4


def copy_exports(export, wanted, ranges):
    """The one-shot base export names the copy of one VDI connects to.

    :param export: what the destination returned for the VDI: ``base``
        (always), ``bases`` (several names of the same base; a destination
        that predates it offers only ``base``).
    :param wanted: connections the source would use.
    :param ranges: requests to send: no more connections than requests.
    """
    names = list(export.get('bases') or [export['base']])
    return names[:max(1, min(wanted, ranges, len(names)))]


def _call(func, *args, timeout=None):
    """``func(*args, timeout=timeout)``, or without it if not taken."""
    try:
        takes = 'timeout' in inspect.signature(func).parameters
    except (TypeError, ValueError):
        takes = False
    if takes:
        return func(*args, timeout=timeout)
    return func(*args)


def ask_outcome(peer, mid, timeout=None):
    """Ask the destination once whether it committed (``abort``).

    :returns: ``(outcome, what was learnt)``; see
        :func:`plan.commit_outcome`.
    """
    if peer is None:
        return plan.UNKNOWN, 'the destination cannot be reached'
    try:
        answer = _call(peer.abort, mid, timeout=timeout)
    except Exception as exc:
        return plan.UNKNOWN, exc
    return plan.commit_outcome('abort', answer), 'abort answered %r' % (
        answer,)


def recover(host, entry, peer, timeout=None):
    """Roll back or finish a migration the journal says was under way.

    Before ``switch-over`` it rolls back (nothing can have committed);
    in ``clean-up`` it finishes (the commit was known); in
    ``switch-over`` and ``in-doubt`` it asks the destination, and without
    a certain answer leaves the migration ``in-doubt`` -- its VM stays
    halted here -- for ``xsm-migrate resolve``.

    :returns: ``done``, ``aborted`` or ``in-doubt``.
    """
    items = entry.state.get('items', [])
    action = plan.recovery_action(ROLE, entry.phase)
    if action == plan.ASK_AGAIN:
        outcome, last = ask_outcome(peer, entry.id, timeout)
        if outcome == plan.UNKNOWN:
            error = errors.InDoubt(id=entry.id,
                                   host=entry.state.get('dest_host'),
                                   waited=0, last=last)
            LOG.error('%s', error)
            if entry.phase != plan.IN_DOUBT:
                host.journal.record(entry.id, ROLE, plan.IN_DOUBT,
                                    error=str(error))
            return plan.IN_DOUBT
        action = (plan.FINISH if outcome == plan.COMMITTED
                  else plan.ROLL_BACK)
    if action == plan.FINISH:
        # finish the clean-up (see Migration._clean_up)
        if entry.state.get('copy'):
            _merge_back(host, items)        # the VM stays here
        else:
            vm = entry.state.get('vm')
            if entry.state.get('kind') == 'vm' and vm in host.vms:
                host.forget_vm(vm)          # it runs there now
            for it in items:
                sr = host.sr(it['sr'])
                if it['vdi'] in {v.uuid for v in sr.list()}:
                    host_mod.destroy_chain(sr, it['vdi'])
        shutil.rmtree(os.path.join(host.state_path, 'migrations',
                                   entry.id), ignore_errors=True)
        host.journal.finish(entry.id, 'done', role=ROLE)
        return 'done'
    _merge_back(host, items)
    if peer is not None and entry.phase != 'preflight':
        try:
            peer.abort(entry.id)
        except Exception as exc:
            LOG.warning('migration %s: the destination could not be told to '
                        'roll back (%s)', entry.id, exc)
    shutil.rmtree(os.path.join(host.state_path, 'migrations', entry.id),
                  ignore_errors=True)
    host.journal.finish(entry.id, 'aborted', role=ROLE)
    return 'aborted'


def _merge_back(host, items):
    """Merge each VDI's snapshot back: its chain is as deep as before."""
    for it in items:
        sr = host.sr(it['sr'])
        if len(sr.chain(it['vdi'])) > it['depth_before']:
            sr.coalesce(it['vdi'])
