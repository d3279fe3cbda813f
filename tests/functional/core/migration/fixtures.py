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

"""Real xsm-agent processes on a real RabbitMQ, for functional tests.

The agents are :class:`xsm_driver.testing.harness.AgentProcess` es, the
benchmarks' agents too: each test gets its own host names
(``host-a-<token>``, ``host-b-<token>``) and its own oslo.messaging
``control_exchange`` (:func:`harness.run_names`), so that parallel test
workers and whatever earlier runs left on the broker never meet. Every
agent runs ``python -m xsm_driver.cmd.agent --config-file F`` with its
stdout and stderr in files of the test's temporary folder; failure
messages carry the tail of its log.

Every exchange is a deployment with keys of its own (:func:`keyring`):
each agent an identity key, all of them one trusted hosts file, and one
operator key the test's clients sign with (:func:`client_conf`).
"""

import hashlib
import os
import time
import uuid as uuidlib

from testtools import content

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.rpc import api
from xsm_driver.testing import harness

MiB = 1 << 20

# the harness's, under the names the tests know
BROKER = harness.BROKER
RABBIT_URL = harness.RABBIT_URL
START_TIMEOUT = harness.START_TIMEOUT
STOP_TIMEOUT = harness.STOP_TIMEOUT
broker_problem = harness.broker_problem
Keyring = harness.Keyring
keyring = harness.keyring
client_conf = harness.client_conf
queue_names = harness.queue_names
_delete_from_broker = harness.delete_from_broker
TEST_OPTIONS = harness.TEST_OPTIONS


def records(vdis):
    """What must be identical before a migration and after its abort."""
    return sorted((v['uuid'], v['parent'], v['hidden'], v['read_only'],
                   v['size']) for v in vdis)


def chain_depth(vdis, uuid):
    """Images in the chain of ``uuid``, from a ``vdi_list()`` answer."""
    parents = {v['uuid']: v['parent'] for v in vdis}
    depth = 0
    while uuid is not None:
        depth += 1
        uuid = parents[uuid]
    return depth


def digest(path, chunk=4 * MiB):
    """SHA-256 of a VHD chain's whole virtual disk, read-only."""
    dev = backends.VHDDevice(path)
    try:
        h = hashlib.sha256()
        for offset in range(0, dev.size, chunk):
            h.update(dev.pread(offset, min(chunk, dev.size - offset)))
        return h.hexdigest()
    finally:
        dev.close()


class AgentProcess(harness.AgentProcess):
    """A :class:`harness.AgentProcess` with :data:`TEST_OPTIONS`."""

    def __init__(self, name, folder, srs, exchange, options=None, **kwargs):
        super().__init__(name, folder, srs, exchange,
                         dict(TEST_OPTIONS, **(options or {})), **kwargs)


class RabbitAgentsFixture(base.TestCase):
    """Two hosts, each an ``xsm-agent`` process, on the real RabbitMQ.

    ``self.agents['a']``/``['b']`` are the :class:`AgentProcess` es,
    ``self.a``/``self.b`` their clients. Host ``a`` has SRs ``sr-a`` (vhd)
    and ``raw-a`` (raw), host ``b`` ``sr-b`` and ``raw-b``.
    """

    def setUp(self):
        super().setUp()
        problem = broker_problem()
        if problem:
            self.missing(problem)
        self.root = self.make_tempdir()
        self.token = uuidlib.uuid4().hex[:10]
        names = harness.run_names('test', 'host', self.token)
        self.exchange = names.exchange
        agents = {}
        for role in ('a', 'b'):
            folder = os.path.join(self.root, 'host-' + role)
            agents[role] = AgentProcess(
                names.hosts[role], folder, self.sr_layout(role, folder),
                self.exchange, self.agent_options(role),
                sections=self.agent_sections(role))
        self.deployment = harness.Deployment(self.root, self.exchange,
                                             agents)
        self.agents = self.deployment.agents
        # clean-ups run last first: the agents stop and the broker is
        # tidied (close), then the logs are attached
        self.addCleanup(self._attach_logs)
        self.addCleanup(self.deployment.close)
        self.start_agents(*self.agents.values())
        self.deployment.connect()
        self.transport = self.deployment.transport
        self.a = self.client('a')
        self.b = self.client('b')

    # -- what a subclass may change ----------------------------------------

    def sr_layout(self, role, folder):
        """``{sr name: (driver, path)}`` of host ``role``."""
        return {'sr-' + role: ('vhd', os.path.join(folder, 'sr-' + role)),
                'raw-' + role: ('raw', os.path.join(folder, 'raw-' + role))}

    def agent_options(self, role):
        """Extra ``[agent]`` options of host ``role``."""
        return {}

    def agent_sections(self, role):
        """More config sections of host ``role``'s agent (none here).

        ``{section: {option: value}}``, ``[hypervisor]`` say; ``[agent]``
        options come from ``agent_options``.
        """
        return {}

    # -- helpers -------------------------------------------------------------

    def client_conf(self):
        """Client options: the test's exchange and keys, as the agents'."""
        return client_conf(self.root, self.exchange)

    def client(self, role, timeout=30):
        return api.AgentAPI(self.transport, self.agents[role].name,
                            timeout=timeout)

    def start_agents(self, *agents):
        """Start the agents together and wait until each serves."""
        problem = harness.start_all(agents)
        if problem:
            self.fail(problem)

    def logs(self):
        return ''.join('\n--- stderr of %s (last lines) ---\n%s'
                       % (a.name, a.tail()) for a in self.agents.values())

    def _attach_logs(self):
        for role, agent in self.agents.items():
            self.addDetail('agent-%s-stderr' % role,
                           content.text_content(agent.tail(80)))

    def wait(self, client, mid, timeout=60):
        """Poll ``migration_get`` until the migration has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.migration_get(mid)
            if status.get('finished') is not None:
                return status
            time.sleep(0.05)
        self.fail('migration %s did not end within %s s (last status: %s)%s'
                  % (mid, timeout, status, self.logs()))

    def wait_phase(self, client, mid, phase, timeout=30):
        """Poll until the migration is in ``phase``; fail if it passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.migration_get(mid)
            if status['phase'] == phase:
                return status
            if status.get('finished') is not None:
                self.fail('migration %s ended (%s: %s) before the test saw '
                          'phase %s%s' % (mid, status['phase'],
                                          status.get('error'), phase,
                                          self.logs()))
            time.sleep(0.02)
        self.fail('migration %s did not reach phase %s within %s s (last '
                  'status: %s)%s' % (mid, phase, timeout, status,
                                     self.logs()))

    def image_files(self, role, sr):
        path = self.agents[role].sr_path(sr)
        return sorted(n for n in os.listdir(path)
                      if n.endswith(('.vhd', '.raw')))
