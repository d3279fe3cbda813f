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

Each test gets its own host names (``host-a-<token>``, ``host-b-<token>``)
and its own oslo.messaging ``control_exchange``, so that parallel test
workers and whatever earlier runs left on the broker never meet. Every
agent runs ``python -m xsm_driver.cmd.agent --config-file F`` with its
stdout and stderr in files of the test's temporary folder; failure
messages carry the tail of its log.

Every exchange is a deployment with keys of its own (:func:`keyring`):
each agent an identity key, all of them one trusted hosts file, and one
operator key the test's clients sign with (:func:`client_conf`).
"""

import atexit
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib

from oslo_config import cfg
from testtools import content

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys

MiB = 1 << 20

BROKER = ('127.0.0.1', 5672)
RABBIT_URL = 'rabbit://guest:guest@127.0.0.1:5672/'
#: the same broker, as kombu spells it (for tidying up only)
_KOMBU_URL = 'amqp://guest:guest@127.0.0.1:5672//'

#: seconds an agent may take from its start to its ready line (at load
#: 30-45 on 2 cores an agent printed nothing, its imports not done, for
#: more than 30 s)
START_TIMEOUT = 90
#: seconds an agent may take to stop on SIGTERM before it is killed
STOP_TIMEOUT = 20


def broker_problem(address=BROKER, timeout=1.0):
    """Why the broker cannot be reached; None when it can."""
    try:
        socket.create_connection(address, timeout=timeout).close()
    except OSError as exc:
        return ('RabbitMQ is not reachable at %s:%d (%s); these tests need '
                'a real broker with the guest/guest account: install and '
                'start it ("apt-get install -y rabbitmq-server && service '
                'rabbitmq-server start")' % (address[0], address[1], exc))
    return None


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


def _tail(path, lines=40):
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError as exc:
        return '(no log: %s)\n' % exc


class Keyring:
    """The keys of one test deployment, in a temporary folder.

    One operator key (``operator.key``, name ``operator``), one identity
    key per host (:meth:`add_host`), and a trusted hosts file
    (``trusted-hosts``) every agent and client of the deployment reads.
    """

    OPERATOR = 'operator'

    def __init__(self, folder):
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.operator_path = os.path.join(folder, 'operator.key')
        self.operator_key = keys.create_key_file(self.operator_path)
        self.peers = os.path.join(folder, 'trusted-hosts')
        open(self.peers, 'a').close()
        self.hosts = {}
        self._lock = threading.Lock()

    def add_host(self, name):
        """The identity key file of host ``name``, made and trusted once."""
        with self._lock:
            if name not in self.hosts:
                path = os.path.join(self.folder, 'host-%s.key' % name)
                key = keys.create_key_file(path)
                self.hosts[name] = (path, key)
                with open(self.peers, 'a') as f:
                    f.write('%s %s\n' % (name, auth.public_text(key)))
            return self.hosts[name][0]

    def agent_options(self, name):
        """``[agent]`` options of the agent of host ``name``."""
        return {'identity_key_file': self.add_host(name),
                'trusted_hosts_file': self.peers,
                'trusted_operators': '%s:%s' % (
                    self.OPERATOR, auth.public_text(self.operator_key))}

    def client_lines(self):
        """The ``[agent]`` section of an operator tool's configuration."""
        return ['[agent]', 'operator_key_file = %s' % self.operator_path,
                'operator_name = %s' % self.OPERATOR,
                'trusted_hosts_file = %s' % self.peers]

    def credential(self):
        return auth.Credential(auth.OPERATOR, self.OPERATOR,
                               self.operator_key)

    def trust(self):
        return auth.Trust(keys.read_trusted_hosts_file(self.peers),
                          {self.OPERATOR: auth.public_text(
                              self.operator_key)})

    def identity(self, name):
        self.add_host(name)
        return auth.Identity(name, self.hosts[name][1], self.trust())


_KEYRINGS = {}
_KEYRINGS_LOCK = threading.Lock()


def keyring(exchange):
    """The :class:`Keyring` of the deployment of ``exchange``."""
    with _KEYRINGS_LOCK:
        if exchange not in _KEYRINGS:
            folder = tempfile.mkdtemp(prefix='xsm-keys-')
            atexit.register(shutil.rmtree, folder, True)
            _KEYRINGS[exchange] = Keyring(folder)
        return _KEYRINGS[exchange]


def client_conf(folder, exchange):
    """An operator tool's configuration: ``exchange`` and its keys."""
    path = os.path.join(folder, 'client-%s.conf' % exchange)
    with open(path, 'w') as f:
        f.write('\n'.join(['[DEFAULT]', 'control_exchange = %s' % exchange,
                           ''] + keyring(exchange).client_lines()) + '\n')
    conf = cfg.ConfigOpts()
    conf(['--config-file', path], project='xsm-driver-test',
         default_config_files=[], default_config_dirs=[])
    return conf


def queue_names(exchange, *hosts):
    """The RabbitMQ queues of these hosts' agents."""
    return [api.queue_name(exchange, h) for h in hosts]


class AgentProcess:
    """One ``xsm-agent`` process and its configuration.

    :param name: the host name (its RPC server name).
    :param folder: the host's folder (config, logs, state, SRs).
    :param srs: ``{sr name: (driver, path)}``.
    :param options: extra ``[agent]`` options.
    :param exchange: the ``control_exchange`` of this test.
    """

    def __init__(self, name, folder, srs, exchange, options=None):
        self.name = name
        self.folder = folder
        self.srs = dict(srs)
        self.state_path = os.path.join(folder, 'state')
        self.config = os.path.join(folder, 'xsm-driver.conf')
        self.stdout = os.path.join(folder, 'agent.out')
        self.stderr = os.path.join(folder, 'agent.err')
        self.proc = None
        self._log_start = 0
        agent = {'host': name, 'state_path': self.state_path,
                 'migration_address': '127.0.0.1',
                 'copy_chunk_mb': 1,
                 # no progress notifications: nobody consumes them here,
                 # they would only pile up on the broker
                 'progress_interval': 3600}
        agent.update(keyring(exchange).agent_options(name))
        agent.update(options or {})
        lines = ['[DEFAULT]', 'transport_url = %s' % RABBIT_URL,
                 'control_exchange = %s' % exchange,
                 'rpc_response_timeout = 30', '', '[agent]']
        lines += ['%s = %s' % kv for kv in sorted(agent.items())]
        lines += ['', '[sr]']
        lines += ['repositories = %s:%s:%s' % (sr, driver, path)
                  for sr, (driver, path) in sorted(self.srs.items())]
        os.makedirs(folder, exist_ok=True)
        with open(self.config, 'w') as f:
            f.write('\n'.join(lines) + '\n')

    def sr_path(self, sr):
        return self.srs[sr][1]

    def start(self):
        """Start the process; :meth:`wait_ready` waits for it to serve."""
        assert self.proc is None or self.proc.poll() is not None
        self._log_start = os.path.getsize(self.stderr) if os.path.exists(
            self.stderr) else 0
        self._out_start = os.path.getsize(self.stdout) if os.path.exists(
            self.stdout) else 0
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [base.REPO_TOP] + [p for p in [env.get('PYTHONPATH')] if p])
        env['PYTHONUNBUFFERED'] = '1'
        with open(self.stdout, 'ab') as out, open(self.stderr, 'ab') as err:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'xsm_driver.cmd.agent',
                 '--config-file', self.config],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=base.REPO_TOP, env=env)
        return self

    def ready_problem(self, deadline):
        """Wait for the ready line; None once ready, else why not."""
        wanted = 'xsm-agent: host %s ready' % self.name
        while True:
            with open(self.stdout, errors='replace') as f:
                f.seek(self._out_start)
                if wanted in f.read():
                    return None
            rc = self.proc.poll()
            if rc is not None:
                return ('agent %s exited with status %s before it was '
                        'ready; its stderr ends with:\n%s'
                        % (self.name, rc, self.tail()))
            if time.monotonic() > deadline:
                return ('agent %s printed no ready line within %d s; its '
                        'stderr ends with:\n%s'
                        % (self.name, START_TIMEOUT, self.tail()))
            time.sleep(0.05)

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self):
        """kill -9: no clean-up at all."""
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(STOP_TIMEOUT)

    def tail(self, lines=40):
        return _tail(self.stderr, lines)

    def log(self):
        """The agent's stderr since its last start."""
        with open(self.stderr, errors='replace') as f:
            f.seek(self._log_start)
            return f.read()


def _delete_from_broker(queues, exchange):
    """Best effort: remove this test's queues and exchange."""
    try:
        import kombu
        with kombu.Connection(_KOMBU_URL, connect_timeout=2) as conn:
            for queue in queues:
                try:
                    with conn.channel() as channel:
                        channel.queue_delete(queue)
                except Exception:   # already gone, or no broker
                    pass
            try:
                with conn.channel() as channel:
                    channel.exchange_delete(exchange)
            except Exception:
                pass
    except Exception:
        pass


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
        self.exchange = 'xsm-test-%s' % self.token
        self.agents = {}
        for role in ('a', 'b'):
            name = 'host-%s-%s' % (role, self.token)
            folder = os.path.join(self.root, 'host-' + role)
            self.agents[role] = AgentProcess(
                name, folder, self.sr_layout(role, folder), self.exchange,
                self.agent_options(role))
        # clean-ups run last first: the broker is tidied, and the logs
        # attached, after the agents have stopped
        self.addCleanup(_delete_from_broker,
                        queue_names(self.exchange,
                                    *[a.name for a in self.agents.values()]),
                        self.exchange)
        self.addCleanup(self._attach_logs)
        for agent in self.agents.values():
            self.addCleanup(agent.stop)
        self.start_agents(*self.agents.values())
        self.transport = api.get_transport(self.client_conf(), url=RABBIT_URL)
        self.addCleanup(self.transport.cleanup)
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

    # -- helpers -------------------------------------------------------------

    def client_conf(self):
        """Client options: the test's exchange and keys, as the agents'."""
        return client_conf(self.root, self.exchange)

    def client(self, role, timeout=30):
        return api.AgentAPI(self.transport, self.agents[role].name,
                            timeout=timeout)

    def start_agents(self, *agents):
        """Start the agents together and wait until each serves."""
        for agent in agents:
            agent.start()
        deadline = time.monotonic() + START_TIMEOUT
        for agent in agents:
            problem = agent.ready_problem(deadline)
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
