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
(commit: the NBD server is closed, each leaf is composed over its base,
the VM is registered and resumed), ``done``. ``abort`` from any phase
before the commit destroys everything this migration made; it can be run
again.

Recovery after a crash: a migration found before ``switch-over`` is rolled
back; one found in ``switch-over`` is finished when its VM record made it
to disk and rolled back otherwise.

Lease: a source that says it renews (``spec['renews']``) must renew its
claim on the receive regularly; the manager rolls back a receive whose
source stayed silent for the lease (:meth:`Receive.expire`), but never
once the destination was told to complete.
"""

import logging
import os
import shutil
import threading

from xsm_driver.core.migration import credentials
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan
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
        self._creds = None
        self.result = None
        #: ``{'silent': s, 'lease': s}`` once rolled back for want of a
        #: lease renewal
        self.expired = None

    @property
    def _cred_dir(self):
        return os.path.join(self.host.state_path, 'migrations', self.id,
                            ROLE)

    def _record(self, phase, **state):
        self.phase = phase
        self.host.journal.record(self.id, ROLE, phase, **state)

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
            for name in bases:
                self._server.add_export(name, rec.base, once=True)
            self._server.add_export(names['leaf'], rec.leaf, once=True)
            exports[src] = names
        host, port = self._server.address
        LOG.info('migration %s: receiving %d VDIs on %s:%d', self.id,
                 len(exports), host, port)
        return {'host': host, 'port': port,
                'server_ca_pem': self._creds.ca_pem,
                'fingerprint': self._creds.fingerprint,
                'exports': exports}

    def compose(self):
        """The copy is complete: make the copied bases durable."""
        with self._lock:
            if self.phase == ABORTED:
                raise aborted_error(self.id, self.host.name, self.expired)
            for _sr, rec in self._receivers.values():
                rec.base.flush()
            self._record('compose')

    def complete(self, vm_state=None):
        """Commit: compose every VDI and, for a VM, register and resume it.

        :param vm_state: ``{'vm': record, 'power_state': ...,
            'workload': guest state or None}``; None for a VDI move.
        :returns: ``{'vdis': {source uuid: new uuid}, 'vm': uuid or None}``.
        """
        with self._lock:
            if self.phase == 'done':
                return self.result
            if self.phase == ABORTED:
                raise aborted_error(self.id, self.host.name, self.expired)
            self._record('switch-over')
            self._stop_server()
            new = {}
            for src, (sr_name, rec) in self._receivers.items():
                new[src] = rec.compose().uuid
            vm_uuid = None
            if vm_state is not None:
                vm_uuid = self._adopt(vm_state, new)
            self.result = {'vdis': new, 'vm': vm_uuid}
            self._record('done', result=self.result)
            self._forget_credentials()
            self._receivers = {}        # composed: nothing more to hold
            return self.result

    def _adopt(self, vm_state, new):
        record = dict(vm_state['vm'])
        srs = {v['uuid']: v['sr'] for v in self.spec['vdis']}
        record['disks'] = [dict(d, vdi=new[d['vdi']], sr=srs[d['vdi']])
                           for d in record['disks']]
        vif_map = self.spec.get('vif_map') or {}
        record['vifs'] = [vif_map.get(v, v) for v in record.get('vifs', [])]
        # The receivers made the VDIs with this VM's uuid already.
        vm = self.host.adopt_vm(record, 'halted')
        if vm_state.get('power_state') == 'running':
            self.host.start_vm(vm.uuid, workload=vm_state.get('workload'))
        return vm.uuid

    def abort(self):
        """Destroy everything this migration made here; idempotent.

        :returns: :data:`ABORTED`, or :data:`COMMITTED` when too late.
        """
        with self._lock:
            if self.phase == 'done':
                return COMMITTED
            self._stop_server()
            for _sr, rec in self._receivers.values():
                rec.discard()
            self._receivers = {}
            self._forget_credentials()
            self.phase = ABORTED
            state = {'expired': self.expired} if self.expired else {}
            self.host.journal.finish(self.id, ABORTED, role=ROLE, **state)
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
            if self.phase in ('switch-over', 'done', ABORTED):
                return None
            self.expired = {'silent': round(silent, 1), 'lease': lease}
            return self.abort()

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


def recover(host, entry):
    """Finish or roll back a receive the journal says was under way.

    :returns: :data:`COMMITTED` or :data:`ABORTED`.
    """
    vm = (entry.state.get('spec') or {}).get('vm') or {}
    if entry.phase == 'switch-over' and vm.get('uuid') in host.vms:
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
