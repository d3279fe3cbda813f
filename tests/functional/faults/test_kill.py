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

"""``kill -9`` of an agent or of the CLI in the middle of a copy.

The two hosts are network namespaces (see :mod:`fixtures`); the guest
writes throughout. What happens, and what each test checks:

* **destination agent killed**: the source sees its data connections
  reset at once, drops the mirror (the guest's writes succeed locally),
  and asks the destination to roll back; that request waits on the
  broker until the destination's agent is back. The restarted
  destination rolls back on its own, from its journal, before it serves;
  then the source's request finds the migration aborted. The guest
  verifies on the source.
* **source agent killed**: the VM dies with its host, its guest's memory
  too, so the test checks the disk block by block against a checkpoint
  taken mid-copy (no block older, every block whole, later writes kept,
  see :func:`generations`). The destination keeps the receive: it has no
  way to tell a dead source from a slow one, and waits for it. The
  restarted source rolls back from its journal (merges the snapshot back:
  the chain is as deep as before) and has the destination remove what it
  received. The VM is halted on the source, intact, and starts.
* **source agent killed after the commit** (held by the phase hook in
  ``clean-up``): the VM already runs on the destination; the restarted
  source learns that from the destination and finishes the clean-up --
  its VDIs and its record of the VM go. With ``copy`` the VM stays on
  the source: the recovery only merges the snapshot back.
* **CLI killed**: the migration belongs to the source's agent, not to
  the command that asked for it (as a live migration outlives a lost
  ``nova`` or ssh session): it goes on and completes, and an operator
  finds it with ``xsm-migrate list`` and can abort it with
  ``xsm-migrate abort``.
"""

import json
import os
import subprocess
import sys
import time

from tests import base
from tests.functional.core.migration import fixtures as rabbit
from tests.functional.faults import fixtures
from xsm_driver.core.block import backends
from xsm_driver.core.migration import journal
from xsm_driver.core.migration import workload

MiB = fixtures.MiB
records = rabbit.records
chain_depth = rabbit.chain_depth

#: seconds a mirrored guest write waits for the destination
MIRROR_TIMEOUT = 2
#: copy rate limit: a 16 MiB disk takes 8 s, time enough to kill mid-copy
BANDWIDTH = 2 * MiB


def generations(path, index):
    """The generation of each 4 KiB block of a VHD chain's disk ``index``.

    :returns: ``(generations, bad)``; ``bad`` lists the blocks that hold
        neither zeros nor a whole pattern the guest writes to that block
        (a torn or misplaced write).
    """
    dev = backends.VHDDevice(path)
    try:
        gens, bad = [], []
        per = 512
        blocks = dev.size // workload.BLOCK
        for first in range(0, blocks, per):
            stop = min(first + per, blocks)
            data = dev.pread(first * workload.BLOCK,
                             (stop - first) * workload.BLOCK)
            for b in range(first, stop):
                block = data[(b - first) * workload.BLOCK:
                             (b - first + 1) * workload.BLOCK]
                gen = 0
                if any(block):
                    gen = workload._HEADER.unpack_from(block)[3]
                if block != workload.pattern(index, b, gen):
                    bad.append((b, workload.describe(block, index)))
                gens.append(gen)
        return gens, bad
    finally:
        dev.close()


class KillTest(fixtures.NamespacedAgentsFixture):

    SIZE = 16 * MiB

    def agent_options(self, role):
        return {'mirror_timeout': MIRROR_TIMEOUT}

    def start_copy(self, fill=0.5):
        """A running VM whose migration is copying, slowly."""
        vm = self.make_vm(sizes=(self.SIZE,), fill=fill, snapshots=1)
        before_a = self.a.vdi_list()
        mid = self.migrate(vm, bandwidth=BANDWIDTH)
        self.wait_phase(self.a, mid, 'copy')
        self.wait_progress(self.a, mid)
        return vm, before_a, mid

    def assert_source_as_before(self, vm, before_a):
        after_a = self.a.vdi_list()
        self.assertEqual(records(before_a), records(after_a), self.logs())
        for disk in vm['disks']:
            self.assertEqual(chain_depth(before_a, disk['vdi']),
                             chain_depth(after_a, disk['vdi']))

    def assert_no_migration_left(self, mid):
        """Nothing of aborted ``mid`` on either host, journals included."""
        self.assert_nothing_received()
        self.assertEqual([], self.net.listening_ports(
            'b', self.net.migration['b']))
        folder = os.path.join(self.agents['a'].state_path, 'migrations', mid)
        self.assertFalse(os.path.exists(folder), 'left: %s' % folder)
        # the journals (read beside the running agents) agree: nothing
        # is left for a later restart to finish or roll back
        for role in 'ab':
            path = os.path.join(self.agents[role].state_path,
                                'journal.sqlite')
            with journal.Journal(path) as jnl:
                self.assertEqual([], jnl.unfinished(), role)
                self.assertEqual('aborted', jnl.get(mid).phase, role)

    def assert_copying(self, mid):
        """The migration is still copying (a kill now lands mid-copy)."""
        status = self.a.migration_get(mid)
        self.assertEqual('copy', status['phase'])
        self.assertLess(status['bytes_copied'], status['progress']['total'])

    def guest_writes(self, client, vm):
        guest = client.vm_get(vm['uuid'])['guest']
        self.assertIsNone(guest['error'], self.logs())
        return guest['writes']


class TestAgentKilled(KillTest):

    def test_destination_killed_mid_copy(self):
        vm, before_a, mid = self.start_copy()
        dest = self.agents['b']
        self.assert_copying(mid)
        dest.kill()
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        # the guest goes on writing, without errors, while the source
        # waits for the dead destination to answer its roll back
        writes = self.guest_writes(self.a, vm)
        time.sleep(MIRROR_TIMEOUT + 0.5)
        self.assertGreater(self.guest_writes(self.a, vm), writes + 100)
        self.assertIsNone(self.a.migration_get(mid)['finished'])
        self.start_agents(dest)
        # the destination rolled back on its own, before serving
        self.assertIn('rolled back what this destination had received',
                      dest.log())
        status = self.wait(self.a, mid)
        self.assertEqual('aborted', status['phase'], self.logs())
        self.assertIsNotNone(status['error'])
        self.assert_source_as_before(vm, before_a)
        self.assert_no_migration_left(mid)
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, self.SIZE)

    def test_source_killed_mid_copy_then_restarted(self):
        vm, before_a, mid = self.start_copy(fill=1.0)
        disk = vm['disks'][0]['vdi']
        leaf = os.path.join(self.agents['a'].sr_path('sr-a'), disk + '.vhd')
        # A checkpoint mid-copy: the guest stops (verified), the disk is
        # read through the chain -- leaf over snapshot -- then it writes
        # on. Its memory dies with the source; the checkpoint stays.
        self.assert_guest_verifies(self.a, vm, self.SIZE)
        checkpoint, bad = generations(leaf, 0)
        self.assertEqual([], bad)
        self.assertNotIn(0, checkpoint)         # filled: every block
        self.a.guest_start(vm['uuid'], rate=300)
        writes = self.guest_writes(self.a, vm)
        time.sleep(0.5)
        self.assertGreater(self.guest_writes(self.a, vm), writes)
        source = self.agents['a']
        self.assert_copying(mid)
        source.kill()
        # the destination waits for the source: nothing is rolled back...
        time.sleep(MIRROR_TIMEOUT + 0.5)
        self.assertNotEqual([], self.image_files('b', 'sr-b'))
        self.assertNotEqual([], self.b.vdi_list())
        b_log = len(self.agents['b'].log())
        # ... until the source is back: its journal rolls the migration
        # back, and it has the destination remove what it received
        self.start_agents(source)
        self.assertIn('aborted after a restart', source.log())
        self.assertIn('destination rolled back',
                      self.agents['b'].log()[b_log:])
        self.assertEqual('aborted', self.a.migration_get(mid)['phase'])
        self.assert_source_as_before(vm, before_a)
        self.assert_no_migration_left(mid)
        # The VM came back halted. Every block holds a whole pattern of
        # its own, none older than at the checkpoint: nothing the guest
        # wrote before it is lost, and what it wrote after (mirrored,
        # into the leaf over the snapshot) survived the merge.
        self.assertEqual('halted', self.a.vm_get(vm['uuid'])['power_state'])
        after, bad = generations(leaf, 0)
        self.assertEqual([], bad)
        older = [b for b, (g0, g1) in enumerate(zip(checkpoint, after))
                 if g1 < g0]
        self.assertEqual([], older, 'blocks older than at the checkpoint')
        self.assertGreater(sum(g1 > g0 for g0, g1 in zip(checkpoint, after)),
                           0, 'no write after the checkpoint survived')
        self.assertEqual('running', self.a.vm_start(vm['uuid'])[
            'power_state'])


class TestSourceKilledAfterTheCommit(KillTest):

    HOLD_PHASES = True

    def test_source_killed_in_clean_up_then_restarted(self):
        # Killed after the destination committed: the VM, its guest
        # included, already runs on the destination. The restarted source
        # learns that from the destination and finishes the clean-up.
        vm = self.make_vm(sizes=(self.SIZE,), fill=0.5, snapshots=1)
        self.hold_at('clean-up')
        mid = self.migrate(vm)
        self.wait_held(mid, 'clean-up')
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        source = self.agents['a']
        source.kill()
        self.release()
        self.start_agents(source)
        self.assertIn('done after a restart', source.log())
        self.assertEqual('done', self.a.migration_get(mid)['phase'])
        self.assertEqual([], self.a.vdi_list(), self.logs())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        self.assertEqual([], self.a.vm_list(), self.logs())
        folder = os.path.join(self.agents['a'].state_path, 'migrations', mid)
        self.assertFalse(os.path.exists(folder), 'left: %s' % folder)
        for role, state in (('a', 'source'), ('b', 'destination')):
            path = os.path.join(self.agents[role].state_path,
                                'journal.sqlite')
            with journal.Journal(path) as jnl:
                self.assertEqual([], jnl.unfinished(), role)
                self.assertEqual('done', jnl.get(mid, role=state).phase)
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.b, vm, self.SIZE)

    def test_source_of_a_copy_killed_in_clean_up_then_restarted(self):
        # With copy, the VM stays on the source and keeps its disks; the
        # destination has a halted copy. The source's clean-up only merges
        # its snapshots back: so must its recovery.
        vm = self.make_vm(sizes=(self.SIZE,), fill=0.5, snapshots=1)
        before_a = self.a.vdi_list()
        disk = vm['disks'][0]['vdi']
        leaf = os.path.join(self.agents['a'].sr_path('sr-a'), disk + '.vhd')
        self.hold_at('clean-up')
        mid = self.migrate(vm, copy=True)
        self.wait_held(mid, 'clean-up')
        self.assertEqual('halted', self.b.vm_get(vm['uuid'])['power_state'])
        # the guest stops (verified): what its disk holds must stay
        self.assert_guest_verifies(self.a, vm, self.SIZE)
        checkpoint, bad = generations(leaf, 0)
        self.assertEqual([], bad)
        source = self.agents['a']
        source.kill()
        self.release()
        self.start_agents(source)
        self.assertIn('done after a restart', source.log())
        self.assertEqual('done', self.a.migration_get(mid)['phase'])
        self.assert_source_as_before(vm, before_a)
        self.assertEqual([vm['uuid']], [v['uuid'] for v in self.a.vm_list()])
        self.assertEqual((checkpoint, []), generations(leaf, 0))
        self.assertEqual('running', self.a.vm_start(vm['uuid'])[
            'power_state'])


class TestCLIKilled(KillTest):

    def cli(self, *args):
        """``xsm-migrate`` argv, talking to the test's broker and host a."""
        conf = os.path.join(self.root, 'cli.conf')
        with open(conf, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = %s\ncontrol_exchange = %s\n'
                    '\n%s\n' % (rabbit.RABBIT_URL, self.exchange, '\n'.join(
                        rabbit.keyring(self.exchange).client_lines())))
        return [sys.executable, '-m', 'xsm_driver.cmd.migrate', args[0],
                '--config-file', conf, '--host', self.agents['a'].name,
                '--rpc-timeout', '30'] + list(args[1:])

    def run_cli(self, *args):
        proc = subprocess.run(self.cli(*args), capture_output=True,
                              text=True, timeout=120, cwd=base.REPO_TOP,
                              stdin=subprocess.DEVNULL)
        self.assertEqual(0, proc.returncode, '%s\n%s%s' % (
            proc.stdout, proc.stderr, self.logs()))
        return proc.stdout

    def start_and_kill_cli(self, bandwidth, fill, operator=False):
        """``xsm-migrate vm`` follows a migration and is killed mid-copy.

        :param operator: find the migration as an operator would, with
            ``xsm-migrate list`` (else over RPC, faster).
        :returns: the VM, the source's VDIs before, the migration id.
        """
        vm = self.make_vm(sizes=(self.SIZE,), fill=fill, snapshots=1)
        before_a = self.a.vdi_list()
        out = os.path.join(self.root, 'cli.out')
        argv = self.cli('vm', '--vm', vm['uuid'], '--to-host',
                        self.agents['b'].name, '--vdi-map',
                        '%s=sr-b' % vm['disks'][0]['vdi'], '--vif-map',
                        'net0=net0', '--bandwidth', str(bandwidth))
        with open(out, 'wb') as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL,
                                    cwd=base.REPO_TOP)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + 60
        while ': copy' not in open(out).read():
            self.assertIsNone(proc.poll(), open(out).read())
            self.assertLess(time.monotonic(), deadline, open(out).read())
            time.sleep(0.05)
        proc.kill()
        self.assertEqual(-9, proc.wait(10))
        if operator:
            listed = json.loads(self.run_cli('list', '--json'))
        else:
            listed = self.a.migration_list()
        self.assertEqual(1, len(listed), listed)
        self.assertIsNone(listed[0]['finished'])
        mid = listed[0]['id']
        self.assertIn(mid[:8], open(out).read())
        return vm, before_a, mid

    def test_the_migration_goes_on_when_the_cli_is_killed(self):
        # 8 MiB to copy: 4 s
        vm, before_a, mid = self.start_and_kill_cli(BANDWIDTH, 0.5)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.image_files('a', 'sr-a'))
        self.assertEqual('running', self.b.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.b, vm, self.SIZE)

    def test_the_operator_aborts_after_the_cli_was_killed(self):
        # 8 MiB to copy, slower (16 s): two commands start before the
        # abort lands
        vm, before_a, mid = self.start_and_kill_cli(BANDWIDTH // 4, 0.5,
                                                    operator=True)
        out = self.run_cli('abort', mid)
        self.assertIn('migration %s aborted' % mid, out)
        self.assertIn('cancelled by the operator', out)
        self.assert_source_as_before(vm, before_a)
        self.assert_no_migration_left(mid)
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'])
        self.assert_guest_verifies(self.a, vm, self.SIZE)
