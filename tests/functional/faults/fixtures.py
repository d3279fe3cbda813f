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

"""Two xsm-agent processes, each in its own network namespace.

The same hosts as the RabbitMQ fixture of the migration tests (host ``a``
with SRs ``sr-a``/``raw-a``, host ``b`` with ``sr-b``/``raw-b``, one
``xsm-agent`` process each, a per-test exchange), but each agent runs in
a namespace of :class:`netns.TwoHosts` with ``migration_address`` on the
namespaces' own migration link, so that migration data crosses a real
(virtual) cable that a test can shape, cut and capture. The test process
itself stays in the root namespace and talks to the broker directly.

These tests need root and network namespaces: elsewhere they are skipped,
in CI (``CI=true``) they fail.
"""

import os
import time
import uuid as uuidlib

from tests import base
from tests.functional.core.migration import fixtures
from tests.functional.core.migration import test_rabbit
from tests.functional.faults import hooked_agent
from tests.functional.faults import netns
from xsm_driver.testing import harness

MiB = fixtures.MiB


class NamespacedAgent(fixtures.AgentProcess):
    """A :class:`fixtures.AgentProcess` run with ``ip netns exec``.

    :param hosts: the :class:`netns.TwoHosts`.
    :param role: ``a`` or ``b``: the namespace it runs in.
    :param transport_url: the broker as seen from the namespace.
    :param hold_dir: when given, the agent is :mod:`hooked_agent` (with
        its test-only phase hook) talking to the test through this folder.
    :param sections: more options of the config file, by section:
        ``{section: {option: value}}`` (``[hypervisor]``, or
        ``[DEFAULT]`` ``rpc_response_timeout``, say).
    """

    def __init__(self, name, folder, srs, exchange, hosts, role,
                 transport_url, options=None, hold_dir=None, sections=None):
        sections = dict(sections or {})
        env, module = {}, harness.AGENT_MODULE
        if hold_dir is not None:
            module = hooked_agent.__name__
            env[hooked_agent.ENV] = hold_dir
        super().__init__(name, folder, srs, exchange, options,
                         transport_url=transport_url,
                         defaults=sections.pop('DEFAULT', None),
                         sections=sections, module=module, env=env,
                         wrap=hosts.wrapper(role))
        self.hosts = hosts
        self.role = role
        self.hold_dir = hold_dir


class NamespacedAgentsFixture(test_rabbit.RabbitMigrationTest):
    """Hosts ``a`` and ``b`` as namespaces, an agent in each.

    ``self.net`` is the :class:`netns.TwoHosts`; everything else is as in
    :class:`fixtures.RabbitAgentsFixture` (``self.agents``, ``self.a``,
    ``self.b``, ``wait``, ``wait_phase``, ...) and
    :class:`test_rabbit.RabbitMigrationTest` (``make_vm``, ``migrate``,
    ``assert_guest_verifies``, ``assert_nothing_received``).

    With :attr:`HOLD_PHASES`, host a's agent has the test-only phase hook
    of :mod:`hooked_agent`: :meth:`hold_at`, :meth:`wait_held` and
    :meth:`release` put a migration's pause exactly where a fault must
    land.
    """

    #: run host a's agent with the phase hook of :mod:`hooked_agent`
    HOLD_PHASES = False
    hold_dir = None

    def setUp(self):
        # Not RabbitAgentsFixture.setUp: the agents are made differently.
        base.TestCase.setUp(self)
        problem = fixtures.broker_problem() or netns.problem()
        if problem:
            self.missing(problem)
        self.root = self.make_tempdir()
        self.token = uuidlib.uuid4().hex[:10]
        names = harness.run_names('test', 'host', self.token)
        self.exchange = names.exchange
        self.net = netns.TwoHosts(self.token)
        # clean-ups run last first: agents stop, logs are attached, the
        # broker is tidied, the proxy stops, then the network goes
        self.addCleanup(self._destroy_network)
        try:
            self.net.create()
        except netns.NetworkError as exc:
            self.fail('could not build the test network: %s' % exc)
        proxy = netns.BrokerProxy(self.net.control_net + '1',
                                  fixtures.BROKER).start()
        self.addCleanup(proxy.stop)
        agents = {}
        for role in ('a', 'b'):
            folder = os.path.join(self.root, 'host-' + role)
            options = {'migration_address': self.net.migration[role]}
            options.update(self.agent_options(role))
            hold_dir = None
            if self.HOLD_PHASES and role == 'a':
                hold_dir = self.hold_dir = os.path.join(self.root, 'hold')
                os.makedirs(hold_dir)
            agents[role] = NamespacedAgent(
                names.hosts[role], folder, self.sr_layout(role, folder),
                self.exchange, self.net, role, proxy.url, options,
                hold_dir=hold_dir, sections=self.agent_sections(role))
        # its transport's clean-up waits seconds for the reply listener:
        # in the background, not in the test
        self.deployment = harness.Deployment(
            self.root, self.exchange, agents, background_cleanup=True)
        self.agents = self.deployment.agents
        self.addCleanup(self._attach_logs)
        # the agents stop, the broker is tidied (close); before they
        # stop, a held migration is let go
        self.addCleanup(self.deployment.close)
        self.addCleanup(self.release)
        self.start_agents(*self.agents.values())
        self.deployment.connect()
        self.transport = self.deployment.transport
        self.a = self.client('a')
        self.b = self.client('b')

    def _stop_agents(self):
        """Stop the agents together (each takes seconds to stop)."""
        harness.stop_all(self.agents.values())

    def _destroy_network(self):
        left = self.net.destroy()
        if left:
            self.fail('the test network was not fully removed: %s'
                      % ', '.join(left))

    # -- helpers -------------------------------------------------------------

    def assert_rolled_back(self, vm, before_a, size, note=''):
        """A failed migration of ``vm`` left both hosts as they were.

        On a: the same VDIs, chains as deep as in ``before_a`` (a's
        ``vdi_list()`` before), the VM running, its guest (writing all
        along) verified over ``size`` bytes without an error. On b:
        nothing received, no export of the migration listening.

        :param note: prefixed to failure messages (which phase, say).
        :returns: the guest's verify result.
        """
        after_a = self.a.vdi_list()
        self.assertEqual(fixtures.records(before_a), fixtures.records(after_a),
                         '%s%s' % (note, self.logs()))
        for disk in vm['disks']:
            self.assertEqual(fixtures.chain_depth(before_a, disk['vdi']),
                             fixtures.chain_depth(after_a, disk['vdi']), note)
        self.assert_nothing_received()
        self.assertEqual([], self.net.listening_ports(
            'b', self.net.migration['b']), note)
        self.assertEqual('running', self.a.vm_get(vm['uuid'])['power_state'],
                         note)
        result = self.a.guest_verify(vm['uuid'])
        self.assertTrue(result['verified'],
                        '%s %s%s' % (note, result, self.logs()))
        self.assertIsNone(result['error'], note)
        self.assertEqual(size, result['bytes_verified'], note)
        return result

    def wait_progress(self, client, mid, timeout=30):
        """Poll until the copy has made progress; the status then."""
        first = client.migration_get(mid)['bytes_copied']
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.migration_get(mid)
            if status['bytes_copied'] > first:
                return status
            if status.get('finished') is not None:
                self.fail('migration %s ended (%s: %s) while the test '
                          'waited for the copy to move on%s'
                          % (mid, status['phase'], status.get('error'),
                             self.logs()))
            time.sleep(0.01)
        self.fail('the copy of migration %s made no progress within %s s%s'
                  % (mid, timeout, self.logs()))

    # -- the phase hook (HOLD_PHASES) ------------------------------------

    def hold_at(self, phase, occurrence=1):
        """Hold host a's next migration when it enters ``phase``.

        :param occurrence: hold the N-th time it enters ``phase``
            (``snapshot`` is entered twice: before and after the mirrors
            and snapshots are in place).
        """
        path = os.path.join(self.hold_dir, 'hold')
        with open(path + '.tmp', 'w') as f:
            f.write('%s %d\n' % (phase, occurrence))
        os.replace(path + '.tmp', path)

    def wait_held(self, mid, phase, timeout=30):
        """Wait until migration ``mid`` is held in ``phase``."""
        held = os.path.join(self.hold_dir, 'held')
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(held) as f:
                    words = f.read().split()
            except FileNotFoundError:
                words = None
            if words:
                self.assertEqual([mid, phase], words, self.logs())
                status = self.a.migration_get(mid)
                self.assertEqual(phase, status['phase'], self.logs())
                return status
            status = self.a.migration_get(mid)
            if status.get('finished') is not None:
                self.fail('migration %s ended (%s: %s) before it was held '
                          'in phase %s%s' % (mid, status['phase'],
                                             status.get('error'), phase,
                                             self.logs()))
            time.sleep(0.02)
        self.fail('migration %s was not held in phase %s within %s s%s'
                  % (mid, phase, timeout, self.logs()))

    def release(self):
        """Let a held migration go on (nothing happens when none is)."""
        if self.hold_dir is None:
            return
        try:
            os.remove(os.path.join(self.hold_dir, 'hold'))
        except FileNotFoundError:
            pass
