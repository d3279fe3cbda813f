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

"""One harness for starting agents and hosts: tests, benchmarks, demo.

Two ways to run a host and its agent, both built here and nowhere else:

* as a child process (:class:`AgentProcess`): ``python -m
  xsm_driver.cmd.agent --config-file F`` on the real RabbitMQ, with a
  configuration file written by :func:`config_text`, its stdout and
  stderr in files of the host's folder. :class:`Deployment` runs several
  of them on one per-run ``control_exchange`` (its own queues) with the
  keys of one deployment (:class:`Keyring`), and gives the operator's
  clients; its :meth:`~Deployment.close` leaves no process and no queue.
* in this process (:class:`LocalHosts`): :class:`~xsm_driver.core.
  migration.host.Host` objects and their :class:`~xsm_driver.core.rpc.
  agent.Agent` threads on one transport (``fake://`` unless given).

The functional tests (``tests/functional``), the benchmarks
(``benchmarks/``) and ``xsm-migrate demo`` all start their hosts with
these classes, so that a benchmark measures the setup the tests prove.
It is in the installed package because the demo is installed; it imports
nothing of the adapters, and nothing of production imports it.
"""

import atexit
import collections
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from oslo_config import cfg

from xsm_driver.core.migration import host as host_mod
from xsm_driver.core.migration import manager as manager_mod
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import auth
from xsm_driver.core.rpc import keys

LOG = logging.getLogger(__name__)

BROKER = ('127.0.0.1', 5672)
RABBIT_URL = 'rabbit://guest:guest@127.0.0.1:5672/'
#: the same broker, as kombu spells it (for tidying up only)
KOMBU_URL = 'amqp://guest:guest@127.0.0.1:5672//'

#: seconds an agent may take from its start to its ready line (at load
#: 30-45 on 2 cores an agent printed nothing, its imports not done, for
#: more than 30 s)
START_TIMEOUT = 90
#: seconds an agent may take to stop on SIGTERM before it is killed
STOP_TIMEOUT = 20
#: the agent's command, as a module run by this interpreter
AGENT_MODULE = 'xsm_driver.cmd.agent'
#: the checkout (or site-packages folder) holding ``xsm_driver``: the
#: agent processes' working folder and the head of their PYTHONPATH
TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

#: ``[agent]`` options of every agent process, unless the caller's
#: options say otherwise: data on loopback, and no progress
#: notifications (nobody consumes them here; they would pile up on the
#: broker)
BASE_OPTIONS = {'migration_address': '127.0.0.1',
                'progress_interval': 3600}
#: ``[agent]`` options of the functional tests' agents (and of the soak
#: and link benchmarks', which measure what those tests prove): 1 MiB
#: copy chunks, so that small disks take several
TEST_OPTIONS = {'copy_chunk_mb': 1}
#: ``[DEFAULT]`` options of every agent process, unless overridden
BASE_DEFAULTS = {'rpc_response_timeout': 30}
#: sections whose options have a parameter of their own
_OWN_SECTIONS = ('DEFAULT', 'agent', 'sr')


class HarnessError(RuntimeError):
    """An agent could not be started, or the harness was misused."""


# -- pure parts ----------------------------------------------------------

RunNames = collections.namedtuple('RunNames', 'exchange hosts')


def run_names(kind, prefix, token, roles=('a', 'b')):
    """The exchange and host names of one run (pure).

    ``run_names('test', 'host', 'abc')`` ->
    ``RunNames('xsm-test-abc', {'a': 'host-a-abc', 'b': 'host-b-abc'})``:
    every run has its own exchange (so its own queues on the broker) and
    its own host names, whatever earlier or parallel runs left there.
    """
    for what, value in (('kind', kind), ('prefix', prefix),
                        ('token', token)):
        if not value or not str(value).replace('-', '').isalnum():
            raise ValueError('%s %r: letters, digits and "-" only, not '
                             'empty' % (what, value))
    if not roles or len(set(roles)) != len(roles):
        raise ValueError('roles %r: at least one, each once' % (roles,))
    return RunNames('xsm-%s-%s' % (kind, token),
                    {r: '%s-%s-%s' % (prefix, r, token) for r in roles})


def sr_specs(srs):
    """``{sr: (driver, path)}`` -> ``['sr:driver:path', ...]`` (pure)."""
    specs = []
    for sr, (driver, path) in sorted(srs.items()):
        if not sr or ':' in sr or ':' in driver:
            raise ValueError('SR %r (driver %r): names may not be empty or '
                             'hold ":"' % (sr, driver))
        specs.append('%s:%s:%s' % (sr, driver, path))
    return specs


def _lines(values, where):
    out = []
    for key, value in sorted(values.items()):
        text = str(value)
        if '\n' in text or '\n' in str(key) or not str(key):
            raise ValueError('option %r of [%s]: one line, and a name'
                             % (key, where))
        out.append('%s = %s' % (key, text))
    return out


def config_text(name, exchange, srs, state_path, options=None,
                transport_url=RABBIT_URL, defaults=None, sections=None):
    """The configuration file of one agent process (pure).

    :param name: the host name (the agent's RPC server).
    :param exchange: the run's ``control_exchange``.
    :param srs: ``{sr name: (driver, path)}``.
    :param options: ``[agent]`` options over :data:`BASE_OPTIONS`
        (``copy_connections``, ``lease_seconds``, keys, ...).
    :param defaults: ``[DEFAULT]`` options over :data:`BASE_DEFAULTS`.
    :param sections: more sections, ``{section: {option: value}}``
        (``[hypervisor]`` for QEMU guests, ``[xenapi]``, ...).
    """
    agent = dict(BASE_OPTIONS, host=name, state_path=state_path)
    agent.update(options or {})
    default = dict(BASE_DEFAULTS, transport_url=transport_url,
                   control_exchange=exchange)
    default.update(defaults or {})
    lines = ['[DEFAULT]'] + _lines(default, 'DEFAULT')
    lines += ['', '[agent]'] + _lines(agent, 'agent')
    lines += ['', '[sr]']
    lines += ['repositories = %s' % spec for spec in sr_specs(srs)]
    for section, values in sorted((sections or {}).items()):
        if section in _OWN_SECTIONS:
            raise ValueError('section [%s]: give its options as %s' % (
                section, {'DEFAULT': 'defaults', 'agent': 'options',
                          'sr': 'srs'}[section]))
        lines += ['', '[%s]' % section] + _lines(values, section)
    return '\n'.join(lines) + '\n'


def kombu_url(transport_url):
    """The broker of a ``rabbit://`` transport URL, as kombu spells it.

    (Pure.) ``rabbit://u:p@h:5672/`` -> ``amqp://u:p@h:5672//`` (the
    default virtual host), ``.../vh`` -> ``amqp://u:p@h:5672/vh``: a run
    on a virtual host of its own is tidied up there.
    """
    if not transport_url.startswith('rabbit://'):
        raise ValueError('%r is not a rabbit:// transport URL'
                         % transport_url)
    rest = transport_url[len('rabbit://'):]
    if ',' in rest:
        raise ValueError('%r names several brokers; the harness tidies one'
                         % transport_url)
    address, _, vhost = rest.partition('/')
    return 'amqp://%s/%s' % (address, vhost or '/')


def ready_line(name):
    """What an agent prints on stdout once it serves."""
    return 'xsm-agent: host %s ready' % name


def queue_names(exchange, *hosts):
    """The RabbitMQ queues of these hosts' agents."""
    return [api.queue_name(exchange, h) for h in hosts]


def tail(path, lines=40):
    """The last ``lines`` of a text file, or why there are none."""
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError as exc:
        return '(no log: %s)\n' % exc


# -- the broker and the keys ---------------------------------------------

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


def qemu_guest_problems(kit, qemu='qemu-system-x86_64'):
    """What this machine lacks to run the guest kit's QEMU guests.

    :param kit: the guest kit's folder (tools/guest-kit/build.sh).
    :returns: one message per missing part; [] when nothing is.
    """
    found = []
    if shutil.which(qemu) is None:
        found.append('%s is not installed (apt-get install -y '
                     'qemu-system-x86)' % qemu)
    for name in ('vmlinuz', 'initramfs.cpio.gz'):
        if not os.path.isfile(os.path.join(kit, name)):
            found.append('the guest kit has no %s in %s (build it with '
                         'tools/guest-kit/build.sh %s)' % (name, kit, kit))
    return found


def delete_from_broker(queues, exchange, url=KOMBU_URL):
    """Best effort: remove a run's queues and exchange."""
    try:
        import kombu
        with kombu.Connection(url, connect_timeout=2) as conn:
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
    except Exception as exc:
        LOG.debug('could not tidy exchange %s up: %s', exchange, exc)


class Keyring:
    """The keys of one deployment, in a folder.

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
    """The :class:`Keyring` of the deployment of ``exchange``.

    One per exchange and process, in a temporary folder removed when the
    process exits.
    """
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


# -- agents as child processes -------------------------------------------

class AgentProcess:
    """One ``xsm-agent`` process and its configuration file.

    :param name: the host name (its RPC server name).
    :param folder: the host's folder (config, logs, state, SRs).
    :param srs: ``{sr name: (driver, path)}``.
    :param exchange: the run's ``control_exchange``; the agent has the
        keys of its deployment (:func:`keyring`).
    :param options: ``[agent]`` options (see :func:`config_text`).
    :param transport_url: the broker, as the agent sees it.
    :param defaults: ``[DEFAULT]`` options.
    :param sections: more sections, ``{section: {option: value}}``.
    :param module: the module run as the agent (a test's hooked agent).
    :param env: more environment variables of the agent.
    :param wrap: ``wrap(argv)`` -> the argv run (``ip netns exec ...``;
        it must exec the agent, so that the child is the agent).
    """

    def __init__(self, name, folder, srs, exchange, options=None,
                 transport_url=RABBIT_URL, defaults=None, sections=None,
                 module=AGENT_MODULE, env=None, wrap=None):
        self.name = name
        self.folder = folder
        self.srs = dict(srs)
        self.exchange = exchange
        self.state_path = os.path.join(folder, 'state')
        self.config = os.path.join(folder, 'xsm-driver.conf')
        self.stdout = os.path.join(folder, 'agent.out')
        self.stderr = os.path.join(folder, 'agent.err')
        self.module = module
        self.env = dict(env or {})
        self.wrap = wrap
        self.proc = None
        self._log_start = self._out_start = 0
        agent = keyring(exchange).agent_options(name)
        agent.update(options or {})
        text = config_text(name, exchange, self.srs, self.state_path,
                           agent, transport_url, defaults, sections)
        os.makedirs(folder, exist_ok=True)
        with open(self.config, 'w') as f:
            f.write(text)

    @property
    def pid(self):
        return self.proc.pid

    def sr_path(self, sr):
        return self.srs[sr][1]

    def argv(self):
        """The command line of the agent (wrapped)."""
        argv = [sys.executable, '-m', self.module, '--config-file',
                self.config]
        return self.wrap(argv) if self.wrap else argv

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Start the process; :meth:`ready_problem` waits for it to serve."""
        if self.running():
            raise HarnessError('agent %s is already running (pid %d)'
                               % (self.name, self.proc.pid))
        # a restarted agent appends to the same files: only what this
        # run writes says that it is ready
        self._log_start = os.path.getsize(self.stderr) if os.path.exists(
            self.stderr) else 0
        self._out_start = os.path.getsize(self.stdout) if os.path.exists(
            self.stdout) else 0
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(
            [TOP] + [p for p in [env.get('PYTHONPATH')] if p])
        env['PYTHONUNBUFFERED'] = '1'
        env.update(self.env)
        self._started = time.monotonic()
        with open(self.stdout, 'ab') as out, open(self.stderr, 'ab') as err:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, cwd=TOP, env=env)
        return self

    def ready_problem(self, deadline):
        """Wait for the ready line; None once ready, else why not."""
        wanted = ready_line(self.name)
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
                return ('agent %s printed no ready line within %.0f s of '
                        'its start; its stderr ends with:\n%s'
                        % (self.name, time.monotonic() - self._started,
                           self.tail()))
            time.sleep(0.05)

    def terminate(self):
        """SIGTERM, without waiting (see :func:`stop_all`)."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

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
        return tail(self.stderr, lines)

    def log(self):
        """The agent's stderr since its last start."""
        with open(self.stderr, errors='replace') as f:
            f.seek(self._log_start)
            return f.read()


def start_all(agents, timeout=START_TIMEOUT):
    """Start the agents together; None once each serves, else why not."""
    for agent in agents:
        agent.start()
    deadline = time.monotonic() + timeout
    for agent in agents:
        problem = agent.ready_problem(deadline)
        if problem:
            return problem
    return None


def stop_all(agents, timeout=STOP_TIMEOUT):
    """Stop the agents together (each takes seconds to stop)."""
    agents = list(agents)
    for agent in agents:
        agent.terminate()
    for agent in agents:
        agent.stop(timeout)


class Deployment:
    """Agent processes of one run on RabbitMQ, and the operator's clients.

    :param root: a folder for the operator's configuration.
    :param exchange: the run's ``control_exchange``.
    :param agents: ``{role: AgentProcess}``, all on ``exchange``.
    :param rpc_timeout: seconds the clients wait for an answer.
    :param transport_url: the broker, as this process sees it.
    :param background_cleanup: the transport's clean-up waits seconds for
        its reply listener: run it in a daemon thread instead.
    :param start_timeout: seconds the agents may take to serve.
    :param stop_timeout: seconds each may take to stop on SIGTERM.

    ``clients[role]`` are :class:`~xsm_driver.core.rpc.api.AgentAPI`
    once :meth:`start` returned. :meth:`close` stops every agent, the
    transport, and deletes the run's queues (and ``extra_queues``) and
    exchange from the broker; it may be called more than once.
    """

    def __init__(self, root, exchange, agents, rpc_timeout=30,
                 transport_url=RABBIT_URL, background_cleanup=False,
                 start_timeout=START_TIMEOUT, stop_timeout=STOP_TIMEOUT):
        kombu_url(transport_url)        # a clear error now, not at close
        for role, agent in agents.items():
            if agent.exchange != exchange:
                raise HarnessError('agent %s (%s) is on exchange %s, not %s'
                                   % (agent.name, role, agent.exchange,
                                      exchange))
        self.root = root
        self.exchange = exchange
        self.agents = dict(agents)
        self.rpc_timeout = rpc_timeout
        self.transport_url = transport_url
        self.background_cleanup = background_cleanup
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.transport = None
        self.clients = {}
        self.extra_queues = []

    def start(self):
        """Start the agents and connect; HarnessError when one fails."""
        problem = start_all(self.agents.values(), self.start_timeout)
        if problem:
            raise HarnessError(problem)
        self.connect()
        return self

    def connect(self):
        """The transport and clients of the run's operator."""
        if self.transport is None:
            self.transport = api.get_transport(
                client_conf(self.root, self.exchange),
                url=self.transport_url)
        for role, agent in self.agents.items():
            self.clients[role] = api.AgentAPI(
                self.transport, agent.name, timeout=self.rpc_timeout)
        return self.clients

    def restart(self):
        """Stop the agents and start them again; HarnessError if one fails.

        A VM that was running comes back halted (see host.py).
        """
        stop_all(self.agents.values(), self.stop_timeout)
        problem = start_all(self.agents.values(), self.start_timeout)
        if problem:
            raise HarnessError(problem)

    def tails(self, lines=40):
        return ''.join('\n--- stderr of %s (last lines) ---\n%s'
                       % (a.name, a.tail(lines))
                       for a in self.agents.values())

    def close(self):
        transport, self.transport = self.transport, None
        if transport is not None:
            if self.background_cleanup:
                threading.Thread(target=transport.cleanup, daemon=True,
                                 name='xsm-harness-transport-cleanup').start()
            else:
                try:
                    transport.cleanup()
                except Exception as exc:
                    LOG.warning('transport clean-up: %s', exc)
        stop_all(self.agents.values(), self.stop_timeout)
        delete_from_broker(
            queue_names(self.exchange,
                        *[a.name for a in self.agents.values()]) +
            self.extra_queues, self.exchange,
            kombu_url(self.transport_url))


def one_agent(root, token, **kwargs):
    """A :class:`Deployment` (not started) of one agent, role ``a``.

    It has one vhd SR ``sr-a`` and the model hypervisor, on a run of its
    own named after ``token``; ``kwargs`` go to :class:`Deployment`.
    """
    names = run_names('test', 'host', token, ('a',))
    folder = os.path.join(root, 'a')
    agent = AgentProcess(
        names.hosts['a'], folder,
        {'sr-a': ('vhd', os.path.join(folder, 'sr-a'))}, names.exchange,
        TEST_OPTIONS, sections={'hypervisor': {'driver': 'model'}})
    return Deployment(root, names.exchange, {'a': agent}, **kwargs)


# -- hosts and agents in this process -------------------------------------

class LocalHosts:
    """Hosts of this process, each with its agent's threads.

    :param layout: ``{host name: {sr name: (driver, path)}}``.
    :param root: the hosts' folder: host ``N``'s state is ``root/N/state``.
    :param transport: the agents' transport; ``fake://`` (made here and
        cleaned up by :meth:`close`) when None.
    :param options: ``options(name)`` -> the
        :class:`~xsm_driver.core.migration.manager.Options` of host
        ``name``'s engine (copy connections, chunk, lease, ...); the
        defaults when None.
    :param rpc_timeout: the agents' own RPC timeout (None: the agent's).
    :param conf: a configuration with a ``[hypervisor]`` group (QEMU
        guests); the model guest when None.
    :param identity: ``identity(name)`` -> the agent's
        :class:`~xsm_driver.core.rpc.auth.Identity` (needed on a real
        bus), or None.
    :param make_host: ``make_host(name, specs, state_path, conf)`` -> a
        host; :meth:`Host.from_config
        <xsm_driver.core.migration.host.Host.from_config>` when None.

    :meth:`start` builds and starts them (``hosts[name]``,
    ``agents[name]``); :meth:`close` stops every agent and closes every
    host, whatever :meth:`start` got to.
    """

    def __init__(self, root, layout, transport=None, options=None,
                 rpc_timeout=None, conf=None, identity=None,
                 make_host=None):
        self.root = root
        self.layout = {name: dict(srs) for name, srs in layout.items()}
        self.transport = transport
        self._own_transport = transport is None
        self._options = options
        self.rpc_timeout = rpc_timeout
        self.conf = conf
        self._identity = identity
        self._make_host = make_host
        self.hosts = {}
        self.agents = {}

    def state_path(self, name):
        return os.path.join(self.root, name, 'state')

    def start(self):
        if self.transport is None:
            self.transport = api.get_transport(cfg.ConfigOpts(),
                                               url='fake://')
        make_host = self._make_host or host_mod.Host.from_config
        for name, srs in self.layout.items():
            host = make_host(name, sr_specs(srs), self.state_path(name),
                             self.conf)
            self.hosts[name] = host
            options = (self._options(name) if self._options
                       else manager_mod.Options())
            identity = self._identity(name) if self._identity else None
            self.agents[name] = agent_mod.Agent(
                self.transport, host, options, rpc_timeout=self.rpc_timeout,
                identity=identity).start()
        return self

    def client(self, name, timeout=30):
        return api.AgentAPI(self.transport, name, timeout=timeout)

    def close(self):
        """Stop every agent and close every host, whatever fails.

        The first failure is raised once all of them were tried.
        """
        errors = []
        agents, self.agents = self.agents, {}
        hosts, self.hosts = self.hosts, {}
        steps = [agent.stop for agent in agents.values()]
        # (again: nothing) or a host without agent
        steps += [host.close for host in hosts.values()]
        if self._own_transport and self.transport is not None:
            steps.append(self.transport.cleanup)
            self.transport = None
        for step in steps:
            try:
                step()
            except Exception as exc:
                LOG.warning('closing in-process hosts: %s', exc)
                errors.append(exc)
        if errors:
            raise errors[0]
