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

"""The migrations of one host, in both roles: the core's public API.

The agent (``xsm_driver.core.rpc``) exposes a :class:`Manager` over
oslo.messaging; adapters (Nova, CloudStack) call the agent. A move between
two SRs of the same host uses :class:`LocalPeer` and never leaves the
process.

A migration starts in one of two orders:

* **the source prepares** (xsm-migrate, CloudStack): one call,
  :meth:`Manager.migrate_vm` on the source; its engine asks the
  destination to prepare the receive (``receive_prepare``) and goes on.
* **the destination prepares ahead** (Nova: ``check_can_live_migrate_source``
  on the source, ``pre_live_migration`` on the destination, then
  ``live_migration`` on the source):

  1. source: :meth:`Manager.migrate_vm_begin` checks the VM, picks the
     migration id and makes this migration's client credentials; it
     returns the id and the *receive request* (the VDIs, the VM record,
     the client's CA certificate -- nothing secret);
  2. destination: :meth:`Manager.receive_prepare_ahead` prepares the
     receive of that request and returns where and how to reach it
     (address, port, server CA and fingerprint, one-time export names);
     a receive that no source claims within ``prepared_timeout`` seconds
     is rolled back;
  3. source: :meth:`Manager.migrate_vm` with ``migration_id`` and that
     ``receive``: the engine claims the prepared receive (once only) and
     starts at the mirror, without a prepare of its own.

Either way, once the receive is prepared (or claimed) a source that says
it renews (``spec['renews']``, every source since RPC API 1.2) holds a
*lease* on it: it calls :meth:`Manager.receive_renew` every quarter of
the lease, and the destination rolls the receive back when no renewal
came for ``receive_lease_timeout`` seconds -- a source lost for good, or
cut off, leaves nothing behind -- unless it was told to complete. A
source that never said it renews (an older one) holds no lease.
"""

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib

from xsm_driver.core.block import backends
from xsm_driver.core import exception
from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import source

LOG = logging.getLogger(__name__)

#: seconds a receive status waits for a committed receive to settle
SETTLE_WAIT = 10.0

MiB = 1 << 20


@dataclasses.dataclass
class Options:
    """How migrations run; the agent fills this from its config file."""

    #: address the destination's NBD server listens on (migration network)
    address: str = '127.0.0.1'
    #: address asked for by one migration request (overrides ``address``)
    network: str = None
    #: bytes/s for the copy of one migration; None: unlimited
    bandwidth: int = None
    #: keep the source (copy the VM's disks, the VM does not move)
    copy: bool = False
    #: migrations this host takes part in at once
    max_concurrent: int = 3
    #: free space a new source leaf may grow into during the migration
    leaf_headroom: int = 64 * MiB
    #: seconds a paused gate waits for in-flight guest I/O
    pause_timeout: float = 10.0
    #: seconds a mirrored write waits for the destination
    mirror_timeout: float = 30.0
    #: copy request size and requests in flight per VDI
    chunk: int = 4 * MiB
    depth: int = 8
    #: copy data one migration holds at a time, all its VDIs together
    #: (at least one chunk)
    copy_buffer: int = 32 * MiB
    #: TLS connections the copy of one VDI uses (the destination may offer
    #: fewer): each is a stream one thread encrypts and one decrypts, so 4,
    #: like nbdcopy's default, keeps both cores of both hosts busy
    connections: int = 4
    #: seconds a receive prepared ahead waits for its source to claim it
    #: (and a begun source migration for its start) before it is rolled
    #: back
    prepared_timeout: float = 300.0
    #: seconds a receive whose source renews its lease waits for the next
    #: renewal before it is rolled back; 0: no lease
    receive_lease_timeout: float = 120.0
    #: seconds a source whose destination gave no certain answer to the
    #: commit keeps its guest paused and asks again, before it reports
    #: the migration ``in-doubt`` (see doc/source/switch-over.rst)
    commit_timeout: float = 60.0
    #: seconds between two such questions
    commit_retry_interval: float = 1.0
    #: bytes/s for QEMU's migration of a QEMU guest's memory; None: the
    #: copy's ``bandwidth`` when set, else 1 GiB/s
    memory_bandwidth: int = None
    #: seconds QEMU's migration of the memory may take, up to its pause
    #: before the switch-over, before the migration is rolled back
    memory_timeout: float = 600.0

    def replace(self, **changes):
        return dataclasses.replace(self, **{k: v for k, v in changes.items()
                                            if v is not None})


class Manager:
    """Start, follow, abort and recover the migrations of a host.

    :param host: the :class:`xsm_driver.core.migration.host.Host`.
    :param peer_factory: ``peer_factory(host_name)`` returns the peer
        object of another host (see :mod:`source`).
    :param options: default :class:`Options`.
    """

    def __init__(self, host, peer_factory=None, options=None):
        self.host = host
        self.options = options or Options()
        self._peer_factory = peer_factory
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._resolve_lock = threading.Lock()
        self._sources = {}
        self._receives = {}
        #: begun source migrations waiting for their start: id -> _Begun
        self._begun = {}
        #: receives prepared ahead, not claimed yet: id -> expiry Timer
        self._unclaimed = {}
        #: receives whose source holds a lease: id -> _Lease
        self._leases = {}
        #: given to each new source migration (see source.Migration)
        self.phase_hook = None

    # -- bookkeeping -------------------------------------------------------

    def active(self, exclude=None):
        """Migrations this host takes part in, in either role.

        :param exclude: a migration id not to count (the one being
            checked, when its receive was prepared ahead).
        """
        running = [m for m in self._running() if m.id != exclude]
        # a move within the host counts once, not as two migrations
        local = {m.id for m in running}
        with self._lock:
            receiving = [r for r in self._receives.values()
                         if r.phase not in ('done', 'aborted') and
                         r.id not in local and r.id != exclude]
        return len(running) + len(receiving)

    def _peer(self, dest_host):
        if dest_host == self.host.name:
            return LocalPeer(self)
        if self._peer_factory is None:
            raise errors.MigrationError('host %s cannot reach other hosts '
                                        '(no control plane)' % self.host.name)
        return self._peer_factory(dest_host)

    # -- source role -------------------------------------------------------

    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None,
                   migration_id=None, receive=None, **options):
        """Move (or, with ``copy=True``, copy) a VM and all its disks.

        :param migration_id: the id :meth:`migrate_vm_begin` gave, when
            the destination has prepared the receive ahead; then
            ``receive`` is the destination's
            :meth:`receive_prepare_ahead` answer and the engine claims it
            instead of preparing one. Both or neither.
        :returns: the migration id; the migration runs in a thread.
        """
        vm = self.host.vm(vm)
        if (migration_id is None) != (receive is None):
            raise errors.MigrationError(
                'migration %s: a migration whose receive was prepared ahead '
                'needs both its id and the destination\'s receive; got only '
                'the %s' % (migration_id, 'id' if receive is None
                            else 'receive'))
        begun = None
        if migration_id is not None:
            begun = self._take_begun(migration_id, vm, dest_host)
        return self._start(vm, dest_host, vdi_map, 'vm', vif_map, options,
                           begun=begun, receive=receive)

    def migrate_vdi(self, vdi, dest_sr, **options):
        """Move one VDI to another SR of this host, live."""
        return self._start(None, self.host.name, {vdi: dest_sr}, 'vdi',
                           None, options)

    def _start(self, vm, dest_host, vdi_map, kind, vif_map, options,
               begun=None, receive=None):
        opts = self.options.replace(**options)
        vdis = set(vdi_map) | {d.vdi for d in (vm.disks if vm else ())}
        mid = begun.id if begun is not None else str(uuidlib.uuid4())
        peer = None
        try:
            peer = self._peer(dest_host)
            # One start at a time, so two requests cannot both pass the
            # checks.
            with self._start_lock:
                plan.check_concurrency(self.host.name, self.active(),
                                       opts.max_concurrent)
                for other in self._running():
                    busy = vdis & other.vdis
                    if busy:
                        raise errors.MigrationError(
                            'VDI %s is already moving in migration %s'
                            % (', '.join(sorted(busy)), other.id))
                mig = source.Migration(
                    self.host, mid, peer, vm, vdi_map, dest_host, opts,
                    vif_map=vif_map, kind=kind,
                    credentials=begun.creds if begun else None,
                    receive=receive)
                mig.phase_hook = self.phase_hook
                mig.preflight()
                if receive is not None:
                    check_receive(mid, receive,
                                  [v['uuid'] for v in mig.spec['vdis']])
                with self._lock:
                    self._sources[mid] = mig
                    self._forget_old()
        except Exception:
            if begun is not None:
                # Refused before it started: nothing of it may stay, here
                # or in the receive the destination prepared.
                self._drop_begun(begun, 'refused at its start')
                if peer is not None:
                    self._abort_receive_of(peer, mid)
            raise
        mig.start()
        return mid

    # -- source role, the destination preparing ahead (Nova's order) -------

    def migrate_vm_begin(self, vm, dest_host, vdi_map, vif_map=None,
                         **options):
        """Check a VM migration and make what the destination needs first.

        Step 1 of the order where the destination prepares the receive
        ahead (see the module docstring): picks the migration id, runs the
        source's and the destination's preflight, and makes this
        migration's client credentials (their CA certificate goes to the
        destination; the key stays here).

        :param options: as for :meth:`migrate_vm`; ``prepared_timeout``
            is how long the begun migration waits for its start
            (:meth:`migrate_vm` with its id) before it is dropped.
        :returns: ``{'id': migration id, 'request': receive request}``;
            give the request to the destination's
            :meth:`receive_prepare_ahead`.
        """
        opts = self.options.replace(**options)
        vm = self.host.vm(vm)
        mid = str(uuidlib.uuid4())
        mig = source.Migration(self.host, mid, self._peer(dest_host), vm,
                               vdi_map, dest_host, opts, vif_map=vif_map,
                               kind='vm')
        creds = None
        try:
            mig.preflight()
            creds = credentials.Credentials.make(
                os.path.join(self.host.state_path, 'migrations', mid,
                             source.ROLE), 'client', hosts=[self.host.name])
        except Exception:
            if creds is not None:
                creds.destroy()
            self._forget_begun_files(mid)
            raise
        begun = _Begun(mid, vm.uuid, dest_host, creds)
        wait = opts.prepared_timeout
        begun.timer = _timer(wait, self._expire_begun, mid)
        with self._lock:
            self._begun[mid] = begun
        begun.timer.start()
        LOG.info('migration %s of VM %s to host %s begun; it waits %.0f s '
                 'for its start', mid, vm.uuid, dest_host, wait)
        return {'id': mid,
                'request': dict(mig.spec, client_ca_pem=creds.ca_pem)}

    def _take_begun(self, mid, vm, dest_host):
        with self._lock:
            begun = self._begun.get(mid)
            if begun is not None and (begun.vm, begun.dest_host) == (
                    vm.uuid, dest_host):
                del self._begun[mid]
        if begun is None:
            raise errors.InvalidPhase(
                id=mid, phase='preflight', reason='host %s has no begun '
                'migration of that id waiting for its start: it was never '
                'begun here, has already started, or waited longer than '
                'its timeout' % self.host.name)
        if (begun.vm, begun.dest_host) != (vm.uuid, dest_host):
            raise errors.MigrationError(
                'migration %s was begun for VM %s to host %s, not for VM %s '
                'to host %s' % (mid, begun.vm, begun.dest_host, vm.uuid,
                                dest_host))
        begun.timer.cancel()
        return begun

    def _expire_begun(self, mid):
        with self._lock:
            begun = self._begun.pop(mid, None)
        if begun is not None:
            LOG.warning('migration %s: begun but not started within its '
                        'timeout; dropped', mid)
            self._drop_begun(begun, 'not started in time')

    def _drop_begun(self, begun, why):
        begun.timer.cancel()
        begun.creds.destroy()
        self._forget_begun_files(begun.id)
        LOG.info('migration %s: begun migration dropped (%s)', begun.id, why)

    def _forget_begun_files(self, mid):
        shutil.rmtree(os.path.join(self.host.state_path, 'migrations', mid),
                      ignore_errors=True)
        if self.host.journal.get(mid, role=source.ROLE) is not None:
            self.host.journal.finish(mid, 'aborted', role=source.ROLE)

    def _abort_receive_of(self, peer, mid):
        try:
            peer.abort(mid)
        except Exception as exc:
            LOG.warning('migration %s: the destination could not be told to '
                        'roll back its prepared receive (%s); it does when '
                        'the receive times out', mid, exc)

    #: finished migrations kept in memory (the journal keeps all of them)
    KEEP_FINISHED = 100

    def _forget_old(self):
        done = sorted((m for m in self._sources.values()
                       if m.finished is not None and
                       m.phase != plan.IN_DOUBT), key=lambda m: m.finished)
        for mig in done[:max(0, len(done) - self.KEEP_FINISHED)]:
            del self._sources[mig.id]
        # a finished receive answers from the journal
        for mid in [r.id for r in self._receives.values()
                    if r.phase in ('done', 'aborted')]:
            del self._receives[mid]

    def _running(self):
        """Source migrations under way: running, or in doubt."""
        with self._lock:
            return [m for m in self._sources.values()
                    if m.finished is None or m.phase == plan.IN_DOUBT]

    def get(self, mid):
        mig = self._sources.get(mid)
        if mig is not None:
            return mig.status()
        entry = self.host.journal.get(mid, role=source.ROLE)
        if entry is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        return {'id': entry.id, 'role': entry.role, 'phase': entry.phase,
                'error': entry.state.get('error') if entry.phase ==
                plan.IN_DOUBT else None,
                'result': entry.state.get('result'),
                'switch_over_steps_ms': entry.state.get(
                    'switch_over_steps_ms'),
                'finished': entry.updated if entry.finished or
                entry.phase == plan.IN_DOUBT else None}

    def list(self):
        return [m.status() for m in self._sources.values()]

    def wait(self, mid, timeout=None):
        mig = self._sources[mid]
        mig.thread.join(timeout)
        return mig.status()

    def abort(self, mid):
        """Abort a running migration, or drop a begun one."""
        mig = self._sources.get(mid)
        if mig is None:
            with self._lock:
                begun = self._begun.pop(mid, None)
            if begun is not None:
                self._drop_begun(begun, 'aborted before its start')
                return {'id': mid, 'phase': 'aborted', 'finished': True,
                        'error': 'aborted before its start', 'result': None}
            entry = self.host.journal.get(mid, role=source.ROLE)
            if entry is not None and entry.phase == plan.IN_DOUBT:
                raise errors.InvalidPhase(
                    id=mid, phase=entry.phase, reason='the destination may '
                    'have committed it; run "xsm-migrate resolve %s" to '
                    'finish or roll it back by the destination\'s answer'
                    % mid)
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        mig.cancel()
        return mig.status()

    def resolve(self, mid):
        """Settle a migration in doubt: ask its destination, then act.

        ``committed`` finishes it here (the source copy is retired);
        ``aborted`` (recorded by the destination, which then refuses the
        commit) resumes the VM here -- after a restart of this host, the
        VM is left halted, as every VM of a host that stopped; any other
        answer changes nothing.

        :returns: the migration's status (``done`` or ``aborted``; an
            ended migration's status as it is).
        :raises errors.InDoubt: still no certain answer.
        :raises errors.InvalidPhase: it is still running.
        """
        mig = self._sources.get(mid)
        if mig is not None and mig.phase == plan.IN_DOUBT:
            return mig.resolve()
        entry = self.host.journal.get(mid, role=source.ROLE)
        if entry is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        if entry.finished:
            return self.get(mid)
        if mig is not None and mig.finished is None:
            raise errors.InvalidPhase(id=mid, phase=mig.phase,
                                      reason='it is still running; only a '
                                      'migration in doubt is resolved')
        if entry.phase not in ('switch-over', plan.IN_DOUBT, 'clean-up'):
            raise errors.InvalidPhase(id=mid, phase=entry.phase,
                                      reason='it is not in doubt; the '
                                      'agent rolls it back at its start')
        with self._resolve_lock:
            peer = None
            try:
                peer = self._peer(entry.state.get('dest_host'))
            except errors.MigrationError:
                pass
            outcome = source.recover(
                self.host, entry, peer,
                timeout=max(1.0, self.options.commit_retry_interval * 5))
        if outcome == plan.IN_DOUBT:
            raise errors.InDoubt(id=mid, host=entry.state.get('dest_host'),
                                 waited=0, last='no certain answer')
        return self.get(mid)

    def in_doubt_vms(self):
        """uuids of this host's VMs a migration in doubt holds.

        Such a VM must not be started here: it may run on the
        destination (see :meth:`resolve`).
        """
        vms = {m.vm_ref[0] for m in self._running()
               if m.phase == plan.IN_DOUBT}
        for entry in self.host.journal.unfinished():
            if entry.role == source.ROLE and entry.phase in (
                    'switch-over', plan.IN_DOUBT):
                vms.add(entry.state.get('vm'))
        vms.discard(None)
        return vms

    def force_complete(self, mid):
        mig = self._sources.get(mid)
        if mig is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        mig.force_complete()
        return mig.status()

    # -- destination role --------------------------------------------------

    def receive_preflight(self, spec):
        # A receive prepared ahead for this same migration does not count
        # against it when the source checks again at its start.
        destination.preflight(self.host, spec,
                              self.active(exclude=spec.get('id')),
                              self.options.max_concurrent,
                              self.options.leaf_headroom)

    def receive_prepare(self, spec):
        """Prepare the receive of a migration its source is starting.

        The source's lease on it (see the module docstring) starts now.
        """
        rcv, answer = self._prepare_receive(spec)
        self._start_lease(rcv)
        return answer

    def _prepare_receive(self, spec):
        rcv = destination.Receive(self.host, spec,
                                  spec.get('network') or self.options.address)
        with self._lock:
            if spec['id'] in self._receives or self.host.journal.get(
                    spec['id'], role=destination.ROLE) is not None:
                raise errors.InvalidPhase(id=spec['id'], phase='prepare-'
                                          'receive', reason='it is already '
                                          'being received')
            self._forget_old()
            self._receives[spec['id']] = rcv
        return rcv, rcv.prepare()

    def receive_prepare_ahead(self, spec, prepared_timeout=None):
        """Prepare a receive before its source starts (Nova's order).

        Step 2 of that order (see the module docstring): the destination's
        preflight, then the receive of ``spec`` (the request
        :meth:`migrate_vm_begin` returned on the source). The source must
        claim it (its :meth:`migrate_vm` does) within ``prepared_timeout``
        seconds (default: this host's option), else it is rolled back; it
        can be claimed once.

        :returns: how to reach it: ``{'host', 'port', 'server_ca_pem',
            'fingerprint', 'exports': {source VDI: {'base': name, 'leaf':
            name}}, 'prepared_timeout'}``. The export names are one-time
            secrets.
        """
        self.receive_preflight(spec)
        # the lease starts when the source claims it
        _rcv, answer = self._prepare_receive(spec)
        mid = spec['id']
        wait = (self.options.prepared_timeout if prepared_timeout is None
                else prepared_timeout)
        timer = _timer(wait, self._expire_receive, mid)
        with self._lock:
            self._unclaimed[mid] = timer
        timer.start()
        LOG.info('migration %s: receive prepared ahead for host %s; it '
                 'waits %.0f s for the source to claim it', mid,
                 spec.get('source_host'), wait)
        return dict(answer, prepared_timeout=wait)

    def receive_claim(self, mid, source_host):
        """The source starts on a receive prepared ahead; once only.

        :raises errors.InvalidPhase: no such receive waits for a claim
            (never prepared ahead, expired, rolled back or already
            claimed), or it was prepared for another source host.
        """
        with self._lock:
            rcv = self._receives.get(mid)
            if rcv is not None and mid in self._unclaimed and \
                    rcv.spec.get('source_host') != source_host:
                raise errors.InvalidPhase(
                    id=mid, phase=rcv.phase, reason='its receive was '
                    'prepared for host %s, not for host %s'
                    % (rcv.spec.get('source_host'), source_host))
            timer = self._unclaimed.pop(mid, None)
        if timer is None:
            raise errors.InvalidPhase(
                id=mid, phase='prepare-receive', reason='host %s has no '
                'receive prepared ahead for it waiting to be claimed: it was '
                'never prepared, has timed out, was rolled back or was '
                'claimed already' % self.host.name)
        timer.cancel()
        LOG.info('migration %s: prepared receive claimed by host %s', mid,
                 source_host)
        with self._lock:
            rcv = self._receives.get(mid)
        if rcv is not None:
            self._start_lease(rcv)

    def _expire_receive(self, mid):
        with self._lock:
            timer = self._unclaimed.pop(mid, None)
            rcv = self._receives.get(mid)
        if timer is None or rcv is None:
            return                      # claimed or rolled back meanwhile
        LOG.warning('migration %s: no source claimed the receive prepared '
                    'ahead for host %s in time; rolling it back', mid,
                    rcv.spec.get('source_host'))
        try:
            rcv.abort()
        except Exception:
            LOG.exception('migration %s: rolling back the unclaimed receive '
                          'failed; the agent rolls it back at its next '
                          'start', mid)

    # -- destination role: the source's lease ---------------------------

    def _start_lease(self, rcv):
        """Hold ``rcv`` for its source, if the source renews.

        No lease applies to a move within this host, nor when the option
        is 0.
        """
        timeout = self.options.receive_lease_timeout
        if not rcv.spec.get('renews') or not timeout or timeout <= 0 or \
                rcv.spec.get('source_host') == self.host.name:
            return
        lease = _Lease(rcv.id, timeout)
        with self._lock:
            if rcv.phase != 'prepare-receive' or \
                    self._receives.get(rcv.id) is not rcv:
                return                  # rolled back meanwhile
            self._leases[rcv.id] = lease
            lease.arm(timeout, self._check_lease)
        LOG.info('migration %s: host %s holds a lease of %g s on its '
                 'receive', rcv.id, rcv.spec.get('source_host'), timeout)

    def _stop_lease(self, mid):
        with self._lock:
            lease = self._leases.pop(mid, None)
        if lease is not None:
            lease.cancel()

    def receive_renew(self, mid):
        """The source renews its lease on the receive of ``mid``.

        :returns: ``{'lease_timeout': seconds}`` while the lease runs;
            ``{'lease_timeout': None}`` when the receive holds no lease
            (the source need not renew any more): its source never said
            it renews, a move within this host, leases are off, or it was
            told to complete.
        :raises errors.LeaseExpired: it was rolled back because no renewal
            came in time; :class:`errors.MigrationAborted` when rolled
            back otherwise; :class:`errors.MigrationNotFound` when this
            host never received it.
        """
        with self._lock:
            lease = self._leases.get(mid)
            if lease is not None and lease.expiring:
                # too late: it is being rolled back
                raise errors.LeaseExpired(
                    id=mid, host=self.host.name, lease=lease.timeout,
                    silent=time.monotonic() - lease.renewed)
            if lease is not None:
                lease.renewed = time.monotonic()
                return {'lease_timeout': lease.timeout}
            rcv = self._receives.get(mid)
        if rcv is not None and rcv.phase != destination.ABORTED:
            return {'lease_timeout': None}
        self._check_not_aborted(mid)
        return {'lease_timeout': None}

    def _check_lease(self, mid):
        """The lease timer: roll back, or wait for what is left of it."""
        with self._lock:
            lease = self._leases.get(mid)
            if lease is None:
                return                  # stopped meanwhile
            left = lease_left(lease.renewed, time.monotonic(), lease.timeout)
            if left > 0:
                lease.arm(left, self._check_lease)
                return
            # decided: from now on a renewal is refused
            lease.expiring = True
            rcv = self._receives.get(mid)
        try:
            if rcv is not None:
                self._expire_lease(rcv, lease)
        finally:
            with self._lock:
                if self._leases.get(mid) is lease:
                    del self._leases[mid]

    def _expire_lease(self, rcv, lease):
        mid = rcv.id
        silent = time.monotonic() - lease.renewed
        try:
            if rcv.expire(silent, lease.timeout) is not None:
                LOG.warning('migration %s: no lease renewal from its source '
                            'host %s for %.1f s (the lease is %g s); the '
                            'receive was rolled back', mid,
                            rcv.spec.get('source_host'), silent,
                            lease.timeout)
        except Exception:
            LOG.exception('migration %s: rolling back the receive whose '
                          'lease expired failed; the agent rolls it back '
                          'at its next start', mid)

    def _check_not_aborted(self, mid):
        """Raise the error of a receive this host rolled back, if it did.

        :raises errors.MigrationNotFound: no journal entry at all.
        """
        entry = self.host.journal.get(mid, role=destination.ROLE)
        if entry is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        if entry.phase == destination.ABORTED:
            raise destination.aborted_error(mid, self.host.name,
                                            entry.state.get('expired'))
        return entry

    def _receive(self, mid):
        rcv = self._receives.get(mid)
        if rcv is None:
            # forgotten once finished: the journal says how it ended
            self._check_not_aborted(mid)
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        return rcv

    def receive_compose(self, mid):
        return self._receive(mid).compose()

    def receive_stage_guest(self, mid, models):
        """The guest's state, ahead of the switch-over's pause (API 1.6).

        See :meth:`destination.Receive.stage_guest`.
        """
        return self._receive(mid).stage_guest(models)

    def receive_complete(self, mid, vm_state):
        """Commit the switch-over of ``mid`` (see :mod:`destination`).

        Asked again once done, it answers the same result.
        """
        rcv = self._receives.get(mid)
        if rcv is None:
            entry = self._check_not_aborted(mid)
            if entry.phase == 'done':
                return entry.state.get('result')
        rcv = self._receive(mid)
        try:
            return rcv.complete(vm_state)
        finally:
            # told to complete: the lease no longer decides anything
            self._stop_lease(mid)

    def receive_abort(self, mid):
        with self._lock:
            timer = self._unclaimed.pop(mid, None)
        if timer is not None:
            timer.cancel()
        self._stop_lease(mid)
        rcv = self._receives.get(mid)
        if rcv is not None:
            return rcv.abort()
        entry = self.host.journal.get(mid, role=destination.ROLE)
        if entry is None:
            # Never received here: the record makes a late prepare of
            # it refused, so that "aborted" stays true.
            self.host.journal.record(mid, destination.ROLE,
                                     destination.ABORTED, never_received=True)
            return destination.ABORTED
        if entry.phase == 'done':
            return destination.COMMITTED
        if entry.phase != 'aborted':
            return destination.recover(self.host, entry)
        return destination.ABORTED

    def receive_status(self, mid):
        """Phase and result of a receive, and why it was rolled back.

        ``expired`` is ``{'silent': s, 'lease': s}`` when it was rolled
        back for want of a lease renewal, else None.

        A commit that answered and is settling (making its compose durable,
        then recording ``done``: a few ``fsync`` calls) is waited for, up
        to :data:`SETTLE_WAIT` seconds: the status is never the moment in
        between.
        """
        rcv = self._receives.get(mid)
        if rcv is not None:
            rcv.wait_settled(SETTLE_WAIT)
            return {'phase': rcv.phase, 'result': rcv.result,
                    'expired': rcv.expired, 'committed': rcv.committed}
        entry = self.host.journal.get(mid, role=destination.ROLE)
        if entry is None:
            return {'phase': None, 'result': None, 'expired': None,
                    'committed': False}
        return {'phase': entry.phase, 'result': entry.state.get('result'),
                'expired': entry.state.get('expired'),
                'committed': bool(entry.state.get('committed')) or
                entry.phase == 'done'}

    # -- recovery ----------------------------------------------------------

    def recover(self):
        """Finish or roll back what the journal says was under way.

        :returns: list of ``(migration id, role, outcome)``.
        """
        done = []
        for sr in self.host.srs.values():
            for line in sr.recover():
                LOG.warning('SR %s: %s', sr.name, line)
        for entry in self.host.journal.unfinished():
            try:
                if entry.role == destination.ROLE:
                    outcome = destination.recover(self.host, entry)
                else:
                    dest = entry.state.get('dest_host')
                    peer = None
                    if dest is not None:
                        try:
                            peer = self._peer(dest)
                        except errors.MigrationError:
                            peer = None
                    outcome = source.recover(self.host, entry, peer)
            except Exception as exc:
                LOG.exception('migration %s: recovery failed', entry.id)
                outcome = 'failed: %s' % exc
            LOG.warning('migration %s (%s, phase %s): %s after a restart',
                        entry.id, entry.role, entry.phase, outcome)
            done.append((entry.id, entry.role, outcome))
        return done

    def shutdown(self):
        """Abort what is under way (the agent is stopping)."""
        with self._lock:
            begun, self._begun = list(self._begun.values()), {}
            unclaimed, self._unclaimed = dict(self._unclaimed), {}
            leases, self._leases = list(self._leases.values()), {}
        # A receive under way stays; the journal rolls it back at the next
        # start.
        for lease in leases:
            lease.cancel()
        for b in begun:
            self._drop_begun(b, 'the agent is stopping')
        for mid, timer in unclaimed.items():
            timer.cancel()
            try:
                self.receive_abort(mid)
            except Exception:
                LOG.exception('migration %s: rolling back the unclaimed '
                              'receive failed; the agent rolls it back at '
                              'its next start', mid)
        for mig in list(self._sources.values()):
            if mig.finished is None:
                try:
                    mig.cancel('the agent is stopping')
                except errors.MigrationError:
                    pass
                mig.thread.join(60)
        # a committed receive records itself done after its answer
        for rcv in list(self._receives.values()):
            rcv.wait_settled(60)


class _Begun:
    """A source migration begun by :meth:`Manager.migrate_vm_begin`."""

    def __init__(self, mid, vm, dest_host, creds):
        self.id = mid
        self.vm = vm
        self.dest_host = dest_host
        self.creds = creds
        self.timer = None


class _Lease:
    """A source's lease on a receive of this host."""

    def __init__(self, mid, timeout):
        self.id = mid
        self.timeout = timeout
        self.renewed = time.monotonic()
        self.timer = None
        #: the lease ran out: the receive is being rolled back
        self.expiring = False

    def arm(self, seconds, check):
        """Call ``check(id)`` in ``seconds`` (under the manager's lock)."""
        self.timer = _timer(seconds, check, self.id)
        self.timer.name = 'xsm-lease'
        self.timer.start()

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()


def lease_left(renewed, now, timeout):
    """Seconds a lease renewed at ``renewed`` still runs at ``now``.

    ``<= 0``: the source has been silent for the whole lease.

    >>> lease_left(100.0, 130.0, 120.0)
    90.0
    >>> lease_left(100.0, 220.0, 120.0)
    0.0
    """
    return timeout - (now - renewed)


def _timer(seconds, func, *args):
    timer = threading.Timer(seconds, func, args)
    timer.daemon = True
    timer.name = 'xsm-expiry'
    return timer


def check_receive(mid, receive, vdis):
    """Refuse a receive prepared ahead that does not fit the migration.

    It must give an address, a port, the server's CA certificate and a
    ``base`` and a ``leaf`` export for every VDI that moves -- and none
    for another VDI (the destination would wait for it forever).

    >>> check_receive('m1', {'host': 'h', 'port': 1, 'server_ca_pem': 'C',
    ...                      'exports': {'v1': {'base': 'b', 'leaf': 'l'}}},
    ...               ['v1'])
    >>> check_receive('m1', {'host': 'h', 'port': 1, 'server_ca_pem': 'C',
    ...                      'exports': {}}, ['v1'])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    xsm_driver...MigrationError: migration m1: ... no exports for VDI v1
    """
    problems = []
    missing = [k for k in ('host', 'port', 'server_ca_pem')
               if not receive.get(k)]
    if missing:
        problems.append('it has no %s' % ', '.join(missing))
    exports = receive.get('exports') or {}
    lacking = sorted(v for v in vdis if not isinstance(exports.get(v), dict)
                     or not exports[v].get('base') or
                     not exports[v].get('leaf'))
    if lacking:
        problems.append('it has no exports for VDI %s' % ', '.join(lacking))
    extra = sorted(set(exports) - set(vdis))
    if extra:
        problems.append('it has exports for VDI %s, which does not move'
                        % ', '.join(extra))
    if problems:
        raise errors.MigrationError('migration %s: the receive prepared '
                                    'ahead does not fit: %s'
                                    % (mid, '; '.join(problems)))


#: formats :func:`import_image` reads
IMAGE_FORMATS = ('raw', 'vhd')
#: the folder of a host's ``state_path`` :func:`import_image` reads from
IMAGE_FOLDER = 'images'


def image_folder(host):
    """Where images to write into VDIs must be.

    The agent reads no other file for a caller.
    """
    return os.path.join(host.state_path, IMAGE_FOLDER)


def import_image(host, vdi, path, image_format, chunk=4 * MiB):
    """Write an image file into a VDI of ``host`` (a root disk's image).

    ``raw``: the file's bytes, from offset 0; ``vhd``: the virtual disk of
    a fixed or dynamic VHD (a differencing one needs its parent next to
    it). Only allocated, non-zero data is written: the VDI must be new
    (it reads as zeros) and attachable for writing (its VM halted). The
    file must be in :func:`image_folder`: a caller on the message bus
    cannot make the agent read any other file of the host.

    :returns: ``{'size': virtual size of the image, 'written': bytes
        written}``.
    :raises exception.XSMError: unknown format, unreadable image, or an
        image larger than the VDI; each names the image and the VDI.
    """
    if image_format not in IMAGE_FORMATS:
        raise exception.XSMError(
            'image %s: disk format %r cannot be written into VDI %s; this '
            'host reads %s images' % (path, image_format, vdi,
                                      ' and '.join(IMAGE_FORMATS)))
    folder = os.path.realpath(image_folder(host))
    if os.path.dirname(os.path.realpath(path)) != folder:
        raise exception.XSMError(
            'image %s is not in %s, the only folder host %s writes images '
            'from; nothing was written into VDI %s' % (path, folder,
                                                       host.name, vdi))
    sr = host.find_vdi(vdi)
    try:
        src = (backends.RawDevice(path) if image_format == 'raw'
               else backends.VHDDevice(path))
    except Exception as exc:
        raise exception.XSMError('image %s (%s) cannot be read: %s'
                                 % (path, image_format, exc))
    try:
        dst = sr.attach(vdi, writable=True)
        try:
            if src.size > dst.size:
                raise exception.XSMError(
                    'image %s is %d bytes, larger than VDI %s of SR %s (%d '
                    'bytes); nothing was written' % (path, src.size, vdi,
                                                     sr.name, dst.size))
            written = 0
            zeros = bytes(chunk)
            for offset, length in plan.split_extents(
                    src.extents(0, src.size), chunk):
                data = src.pread(offset, length)
                if data != zeros[:length]:
                    dst.pwrite(data, offset)
                    written += length
            dst.flush()
        finally:
            dst.close()
    finally:
        src.close()
    LOG.info('image %s (%s, %d bytes) written into VDI %s of SR %s (%d '
             'bytes of data)', path, image_format, src.size, vdi, sr.name,
             written)
    return {'size': src.size, 'written': written}


class LocalPeer:
    """The destination role of this same host, called directly."""

    def __init__(self, manager):
        self._m = manager

    def preflight(self, spec):
        # The source already counts itself: a local move is one migration.
        destination.preflight(self._m.host, spec, 0,
                              self._m.options.max_concurrent,
                              self._m.options.leaf_headroom)

    def prepare(self, spec):
        return self._m.receive_prepare(spec)

    def claim(self, mid, source_host):
        return self._m.receive_claim(mid, source_host)

    def renew(self, mid, timeout=None):
        return self._m.receive_renew(mid)

    def compose(self, mid):
        return self._m.receive_compose(mid)

    def stage_guest(self, mid, models):
        return self._m.receive_stage_guest(mid, models)

    def complete(self, mid, vm_state):
        return self._m.receive_complete(mid, vm_state)

    def abort(self, mid, timeout=None):
        return self._m.receive_abort(mid)

    def status(self, mid, timeout=None):
        return self._m.receive_status(mid)
