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

"""Two hosts in one process whose control messages and agents can fail.

Host ``a`` (the source) and host ``b`` (the destination) each have a real
VHD SR and a manager; ``a`` reaches ``b`` through a :class:`FaultyPeer`
that can lose a request or a reply, cut the link, or crash either agent
at a chosen call. A crash is what a ``kill -9`` of the agent leaves: the
process's threads, devices, servers and guests are gone (for the guest
that ran in it too: a host that stops comes back with its VMs halted),
its journal and SR stay, and the agent starts again on them
(:meth:`Manager.recover`) -- the destination at once (so that the source's
next question reaches the restarted agent), the source when the test
says.

The disks cross real mutual-TLS NBD connections on loopback; the guest
is the verifying workload, which checks every block it wrote.
"""

import collections
import os
import threading
import time

import fixtures

from tests import base
from xsm_driver.core.migration import destination
from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.migration import plan
from xsm_driver.core.migration import source
from xsm_driver.core.nbd import client as nbd_client

MiB = 1 << 20
#: the tests' [agent]commit_timeout: how long a source asks, then doubts
COMMIT_TIMEOUT = 1.0


class Crash(BaseException):
    """The agent process dies here (no handler of the code runs)."""


class LostMessage(TimeoutError):
    """What a caller sees of a lost request or reply."""


class FaultyPeer:
    """The destination ``b`` as ``a`` reaches it, with faults.

    ``faults[(call, n)]`` is what happens to the ``n``-th call of that
    name (``complete``, ``abort``, ``status``...):

    * ``drop-request``: lost on the way; ``b`` never sees it;
    * ``drop-reply``: ``b`` handles it, its answer is lost;
    * ``crash-destination-before``: ``b``'s agent dies before it handles
      it (and starts again);
    * ``crash-destination``: ``b`` handles it, then its agent dies before
      answering (and starts again);
    * ``crash-source``: ``b`` handles it; ``a``'s agent dies before the
      answer arrives;
    * ``cut-link``: ``b`` handles it, the answer is lost and from then on
      every message between the hosts is lost until ``harness.heal()``;
    * ``crash-source-before``: ``a``'s agent dies just before it sends it;
    * ``cut-link-before``: the link is cut just before it is sent.
    """

    def __init__(self, harness):
        self.h = harness

    def _call(self, name, *args):
        h = self.h
        fault = None
        if h.switching.is_set():
            # (faults are of the switch-over: calls before it, e.g. of an
            # abort after an unrelated failure, do not count)
            with h.lock:
                h.counts[name] += 1
                n = h.counts[name]
            fault = h.faults.get((name, n))
        else:
            n = 0
        h.calls.append((name, n, fault))
        if fault == 'crash-source-before':
            raise Crash('source agent killed before it sent %s' % name)
        if fault == 'cut-link-before':
            h.cut.set()
        if h.cut.is_set():
            raise LostMessage('the link to host b is cut (%s)' % name)
        if fault == 'drop-request':
            raise LostMessage('request %s #%d lost' % (name, n))
        if fault == 'crash-destination-before':
            h.restart_b()
            raise LostMessage('host b\'s agent died before it read %s'
                              % name)
        try:
            answer = getattr(h.managers['b'], 'receive_' + name)(*args)
        except Crash:
            # b's own code died (a crash point inside the destination)
            h.restart_b()
            raise LostMessage('host b\'s agent died handling %s' % name)
        if fault == 'drop-reply':
            raise LostMessage('reply to %s #%d lost' % (name, n))
        if fault == 'crash-destination':
            h.restart_b()
            raise LostMessage('host b\'s agent died after %s' % name)
        if fault == 'crash-source':
            raise Crash('source agent killed waiting for %s' % name)
        if fault == 'cut-link':
            h.cut.set()
            raise LostMessage('reply to %s lost: the link is cut' % name)
        return answer

    def preflight(self, spec):
        return self._call('preflight', spec)

    def prepare(self, spec):
        return self._call('prepare', spec)

    def claim(self, mid, source_host):
        return self._call('claim', mid, source_host)

    def renew(self, mid, timeout=None):
        return self._call('renew', mid)

    def compose(self, mid):
        return self._call('compose', mid)

    def stage_guest(self, mid, models):
        return self._call('stage_guest', mid, models)

    def complete(self, mid, vm_state):
        return self._call('complete', mid, vm_state)

    def abort(self, mid, timeout=None):
        return self._call('abort', mid)

    def status(self, mid, timeout=None):
        return self._call('status', mid)


class SwitchOverFixture(base.TestCase):
    """Host ``a`` and ``b``, a faulty link between them."""

    def setUp(self):
        super().setUp()
        # (first: checked after every other clean-up)
        self.addCleanup(self._no_connection_left, set(threading.enumerate()))
        self.top = self.make_tempdir()
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.calls = []
        self.faults = {}
        self.cut = threading.Event()
        #: set when the source enters the switch-over
        self.switching = threading.Event()
        self.managers = {}
        self.crashed = set()
        self.peer = FaultyPeer(self)
        #: host -> the NBD connections its source migrations opened
        self.sockets = collections.defaultdict(list)
        connect = source.Migration._connect

        def recording(mig, export):
            dev = connect(mig, export)
            self.sockets[mig.host].append(dev)
            return dev
        self.useFixture(fixtures.MonkeyPatch(
            'xsm_driver.core.migration.source.Migration._connect',
            recording))
        for name in ('a', 'b'):
            self.managers[name] = self._start(name)
        # a crashed thread's Crash is not an error of the test
        hook = threading.excepthook

        def quiet(args):
            if not issubclass(args.exc_type, Crash):
                hook(args)
        threading.excepthook = quiet
        self.addCleanup(setattr, threading, 'excepthook', hook)

    def options(self):
        return manager_mod.Options(chunk=1 * MiB, leaf_headroom=1 * MiB,
                                   commit_timeout=COMMIT_TIMEOUT,
                                   commit_retry_interval=0.05)

    def _no_connection_left(self, before, grace=10):
        """Every NBD client a test opened ends with it.

        (The source closes its mirrors' connections in a thread of its
        own after the pause: they get ``grace`` seconds.)
        """
        deadline = time.monotonic() + grace
        while True:
            left = [t.name for t in set(threading.enumerate()) - before
                    if t.name in nbd_client.THREADS]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual([], left, 'NBD client threads left running')

    def _start(self, name):
        """Build (or build again, after a crash) the agent of a host."""
        host = host_mod.Host.from_config(
            name, ['sr-%s:vhd:%s' % (name,
                                     os.path.join(self.top, name, 'sr'))],
            os.path.join(self.top, name, 'state'))
        mgr = manager_mod.Manager(host, peer_factory=lambda n: self.peer,
                                  options=self.options())
        self.addCleanup(host.close)
        self.addCleanup(mgr.shutdown)
        return mgr

    def _kill(self, name):
        """What a kill -9 of the agent of ``name`` leaves."""
        old = self.managers[name]
        for rcv in list(old._receives.values()):
            rcv._stop_server()
            for _sr, rec in list(rcv._receivers.values()):
                for dev in (rec.base, rec.leaf):
                    try:
                        dev.close()
                    except Exception:
                        pass
        # the kernel closes its sockets (a source that dies before the
        # pause has not closed its mirrors' connections)
        for dev in self.sockets.pop(old.host, ()):
            dev.abort()
            dev.close()
        with old._lock:
            leases = list(old._leases.values())
        for lease in leases:
            lease.cancel()
        old._leases = {}
        old.host.close()
        self.crashed.add(name)

    def restart_b(self):
        self._kill('b')
        self.managers['b'] = self._start('b')
        self.managers['b'].recover()

    def restart_a(self):
        """The source's agent, found dead, starts again: its outcomes."""
        self._kill('a')
        self.managers['a'] = self._start('a')
        return self.managers['a'].recover()

    def heal(self):
        self.cut.clear()

    # -- the migration -----------------------------------------------------

    def make_vm(self, sizes=(4 * MiB, 6 * MiB)):
        host = self.managers['a'].host
        vm = host.create_vm('vm', [{'sr': 'sr-a', 'size': s}
                                   for s in sizes], ['net0'])
        host.start_vm(vm.uuid)
        host.guest_start(vm.uuid, rate=200, fill=0.5)
        return vm

    def migrate(self, vm):
        return self.managers['a'].migrate_vm(
            vm.uuid, 'b', {d.vdi: 'sr-b' for d in vm.disks},
            {'net0': 'net0'})

    def phase_hook(self, then=None):
        """The source's hook: notes the switch-over, then ``then``."""
        def hook(mig, phase):
            if phase == 'switch-over':
                self.switching.set()
            if then is not None:
                then(mig, phase)
        self.managers['a'].phase_hook = hook

    def migrate_to_the_switch_over(self):
        """A VM and its migration that reached the switch-over.

        A migration that fails before it fails the test: the data path
        must not break on its own (it once did under load, which a retry
        here had hidden).

        :returns: ``(vm, migration id, the ended source migration)``.
        """
        vm = self.make_vm()
        mid = self.migrate(vm)
        mig = self.wait_ended(mid)
        self.assertTrue(self.switching.is_set(),
                        'migration %s ended in phase %s before the '
                        'switch-over: %s' % (mid, mig.phase, mig.error))
        return vm, mid, mig

    def wait_ended(self, mid, timeout=60):
        """Until the source's run ends (done, aborted, in doubt, dead)."""
        mig = self.managers['a']._sources[mid]
        mig.thread.join(timeout)
        self.assertFalse(mig.thread.is_alive(), 'migration %s still runs'
                         % mid)
        return mig

    # -- what must hold ------------------------------------------------------

    def where(self, vm):
        """``{host: power state}`` of every host that has the VM."""
        return {n: m.host.vms[vm].power_state
                for n, m in self.managers.items() if vm in m.host.vms}

    def assert_in_doubt_and_safe(self, mid, vm):
        """The source paused in doubt; the VM runs at most on ``b``."""
        a, b = self.managers['a'], self.managers['b']
        status = a.get(mid)
        self.assertEqual(plan.IN_DOUBT, status['phase'], status)
        self.assertIn('xsm-migrate resolve %s' % mid, status['error'])
        self.assertEqual(plan.IN_DOUBT,
                         a.host.journal.get(mid, 'source').phase)
        if 'a' not in self.crashed:
            src = a.host.vms[vm]
            if src.workload is not None:
                writes = src.workload.writes
                time.sleep(0.1)
                self.assertEqual(writes, src.workload.writes,
                                 'the guest in doubt went on writing')
            self.assertTrue(all(d.gate.paused for d in src.disks))
        entry = b.host.journal.get(mid, 'destination')
        committed = entry.state.get('committed') or entry.phase == 'done'
        if not committed:
            self.assertNotIn(vm, b.host.vms)
        running = [n for n, s in self.where(vm).items()
                   if s == host_mod.RUNNING]
        self.assertEqual(['b'] if committed and 'b' not in self.crashed
                         else [], running)
        self.assertIn(vm, a.host.vms)
        if 'a' not in self.crashed:
            self.assertEqual(host_mod.PAUSED, a.host.vms[vm].power_state)
        return 'done' if committed else 'aborted'

    def assert_one_copy(self, mid, vm, outcome):
        """One copy of the VM, every write in it, journals that agree.

        ``outcome``: ``done`` (the VM is on ``b``) or ``aborted`` (on
        ``a``). The copy runs unless its host's agent crashed (a host
        that stops comes back with its VMs halted): then it is halted,
        and only its disks are checked.
        """
        a, b = self.managers['a'], self.managers['b']
        home = 'b' if outcome == 'done' else 'a'
        where = self.where(vm)
        self.assertEqual([home], list(where), 'the VM is on %s' % where)
        if home in self.crashed:
            self.assertEqual(host_mod.HALTED, where[home])
        else:
            self.assertEqual(host_mod.RUNNING, where[home])
            result = self.managers[home].host.guest_verify(vm)
            self.assertTrue(result['verified'], result)
            self.assertEqual(10 * MiB, result['bytes_verified'])
        self.assertEqual(outcome, a.host.journal.get(mid, 'source').phase)
        self.assertEqual(outcome,
                         b.host.journal.get(mid, 'destination').phase)
        self.assertEqual([], a.host.journal.unfinished())
        self.assertEqual([], b.host.journal.unfinished())
        disks = {d.vdi for d in self.managers[home].host.vms[vm].disks}
        # the other host keeps nothing of it
        other = self.managers['a' if home == 'b' else 'b']
        self.assertEqual([], [v.uuid for sr in other.host.srs.values()
                              for v in sr.list()])
        # the copy's chains: a leaf over one base here (b), or as deep as
        # before the migration (a)
        for sr in self.managers[home].host.srs.values():
            for vdi in disks & {v.uuid for v in sr.list()}:
                self.assertEqual(2 if home == 'b' else 1,
                                 len(sr.chain(vdi)))
        self.assertEqual(destination.COMMITTED if outcome == 'done'
                         else destination.ABORTED,
                         b.receive_abort(mid))
