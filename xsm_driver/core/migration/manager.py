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
"""

import dataclasses
import logging
import threading
import uuid as uuidlib

from xsm_driver.core.migration import destination
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import source

LOG = logging.getLogger(__name__)

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
        self._sources = {}
        self._receives = {}
        #: given to each new source migration (see source.Migration)
        self.phase_hook = None

    # -- bookkeeping -------------------------------------------------------

    def active(self):
        """Migrations this host takes part in, in either role."""
        running = self._running()
        # a move within the host counts once, not as two migrations
        local = {m.id for m in running}
        with self._lock:
            receiving = [r for r in self._receives.values()
                         if r.phase not in ('done', 'aborted') and
                         r.id not in local]
        return len(running) + len(receiving)

    def _peer(self, dest_host):
        if dest_host == self.host.name:
            return LocalPeer(self)
        if self._peer_factory is None:
            raise errors.MigrationError('host %s cannot reach other hosts '
                                        '(no control plane)' % self.host.name)
        return self._peer_factory(dest_host)

    # -- source role -------------------------------------------------------

    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None, **options):
        """Move (or, with ``copy=True``, copy) a VM and all its disks.

        :returns: the migration id; the migration runs in a thread.
        """
        vm = self.host.vm(vm)
        return self._start(vm, dest_host, vdi_map, 'vm', vif_map, options)

    def migrate_vdi(self, vdi, dest_sr, **options):
        """Move one VDI to another SR of this host, live."""
        return self._start(None, self.host.name, {vdi: dest_sr}, 'vdi',
                           None, options)

    def _start(self, vm, dest_host, vdi_map, kind, vif_map, options):
        opts = self.options.replace(**options)
        vdis = set(vdi_map) | {d.vdi for d in (vm.disks if vm else ())}
        # One start at a time, so two requests cannot both pass the checks.
        with self._start_lock:
            plan.check_concurrency(self.host.name, self.active(),
                                   opts.max_concurrent)
            for other in self._running():
                busy = vdis & other.vdis
                if busy:
                    raise errors.MigrationError(
                        'VDI %s is already moving in migration %s'
                        % (', '.join(sorted(busy)), other.id))
            mid = str(uuidlib.uuid4())
            mig = source.Migration(self.host, mid, self._peer(dest_host), vm,
                                   vdi_map, dest_host, opts,
                                   vif_map=vif_map, kind=kind)
            mig.phase_hook = self.phase_hook
            mig.preflight()
            with self._lock:
                self._sources[mid] = mig
                self._forget_old()
        mig.start()
        return mid

    #: finished migrations kept in memory (the journal keeps all of them)
    KEEP_FINISHED = 100

    def _forget_old(self):
        done = sorted((m for m in self._sources.values()
                       if m.finished is not None), key=lambda m: m.finished)
        for mig in done[:max(0, len(done) - self.KEEP_FINISHED)]:
            del self._sources[mig.id]
        # a finished receive answers from the journal
        for mid in [r.id for r in self._receives.values()
                    if r.phase in ('done', 'aborted')]:
            del self._receives[mid]

    def _running(self):
        with self._lock:
            return [m for m in self._sources.values() if m.finished is None]

    def get(self, mid):
        mig = self._sources.get(mid)
        if mig is not None:
            return mig.status()
        entry = self.host.journal.get(mid, role=source.ROLE)
        if entry is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        return {'id': entry.id, 'role': entry.role, 'phase': entry.phase,
                'error': None, 'result': entry.state.get('result')}

    def list(self):
        return [m.status() for m in self._sources.values()]

    def wait(self, mid, timeout=None):
        mig = self._sources[mid]
        mig.thread.join(timeout)
        return mig.status()

    def abort(self, mid):
        mig = self._sources.get(mid)
        if mig is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        mig.cancel()
        return mig.status()

    def force_complete(self, mid):
        mig = self._sources.get(mid)
        if mig is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        mig.force_complete()
        return mig.status()

    # -- destination role --------------------------------------------------

    def receive_preflight(self, spec):
        destination.preflight(self.host, spec, self.active(),
                              self.options.max_concurrent,
                              self.options.leaf_headroom)

    def receive_prepare(self, spec):
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
        return rcv.prepare()

    def _receive(self, mid):
        rcv = self._receives.get(mid)
        if rcv is None:
            raise errors.MigrationNotFound(id=mid, host=self.host.name)
        return rcv

    def receive_compose(self, mid):
        self._receive(mid).compose()

    def receive_complete(self, mid, vm_state):
        return self._receive(mid).complete(vm_state)

    def receive_abort(self, mid):
        rcv = self._receives.get(mid)
        if rcv is not None:
            return rcv.abort()
        entry = self.host.journal.get(mid, role=destination.ROLE)
        if entry is None:
            return destination.ABORTED
        if entry.phase == 'done':
            return destination.COMMITTED
        if entry.phase != 'aborted':
            return destination.recover(self.host, entry)
        return destination.ABORTED

    def receive_status(self, mid):
        rcv = self._receives.get(mid)
        if rcv is not None:
            return {'phase': rcv.phase, 'result': rcv.result}
        entry = self.host.journal.get(mid, role=destination.ROLE)
        if entry is None:
            return {'phase': None, 'result': None}
        return {'phase': entry.phase, 'result': entry.state.get('result')}

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
        for mig in list(self._sources.values()):
            if mig.finished is None:
                try:
                    mig.cancel('the agent is stopping')
                except errors.MigrationError:
                    pass
                mig.thread.join(60)


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

    def compose(self, mid):
        return self._m.receive_compose(mid)

    def complete(self, mid, vm_state):
        return self._m.receive_complete(mid, vm_state)

    def abort(self, mid):
        return self._m.receive_abort(mid)

    def status(self, mid):
        return self._m.receive_status(mid)
