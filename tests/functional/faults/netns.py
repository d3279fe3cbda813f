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

"""Two hosts on one machine: network namespaces, veths, a broker proxy.

Layout of one :class:`TwoHosts` (``<t>`` is a per-test token)::

    root namespace                     xsm-<t>-a            xsm-<t>-b
    bridge xsmbr<t> 198.18.N.1/24 --- ctl0 198.18.N.2   ctl0 198.18.N.3
    (broker proxy on .1)               mig0 198.19.0.1 --- mig0 198.19.0.2

Each host has two links: ``ctl0`` (control plane: RabbitMQ, reached
through :class:`BrokerProxy` on the bridge's address, since the broker
listens on the root namespace's loopback only) and ``mig0``, a veth pair
straight to the other host that carries migration data and nothing else.
Faults and shaping apply to ``mig0`` only, so the control plane survives
a cut migration link, as it would on a real separate migration network.

The namespaces have no default route and the root namespace does not
forward: no packet of a test leaves the machine.

The kernels this runs on may lack ``sch_netem``; a cut is therefore made
with a ``pfifo`` queue of length 0 (every packet is dropped, silently, as
on a pulled cable) or by setting the link down, and shaping uses ``tbf``.
"""

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib

#: the migration link's addresses (private to the two namespaces)
MIGRATION_NET = {'a': '198.19.0.1', 'b': '198.19.0.2'}
MIGRATION_PREFIX = 24
#: control networks are 198.18.N.0/24, N chosen free per test
CONTROL_PREFIX = '198.18.'
CTL, MIG = 'ctl0', 'mig0'
#: serialises the choice of a free control subnet between test workers
_LOCK = os.path.join('/run/lock' if os.path.isdir('/run/lock')
                     else tempfile.gettempdir(), 'xsm-netns.lock')


class NetworkError(Exception):
    """A command that builds or changes the test network failed."""


def run(argv, check=True, timeout=30):
    """Run a command; its completed process. Raises when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise NetworkError('%s failed with status %d: %s'
                           % (' '.join(argv), proc.returncode,
                              (proc.stderr or proc.stdout).strip()))
    return proc


def problem():
    """Why namespaces cannot be made here; None when they can."""
    if os.geteuid() != 0:
        return ('these tests make network namespaces and veth links: they '
                'need root (CI runs them as root)')
    if shutil.which('ip') is None or shutil.which('tc') is None:
        return ('commands ip and tc not found: install them with '
                '"apt-get install -y iproute2"')
    name = 'xsm-probe-%s' % uuidlib.uuid4().hex[:8]
    proc = run(['ip', 'netns', 'add', name], check=False)
    if proc.returncode != 0:
        return ('cannot make a network namespace ("ip netns add" said: '
                '%s); these tests need CAP_SYS_ADMIN and a kernel with '
                'network namespaces' % proc.stderr.strip())
    run(['ip', 'netns', 'del', name], check=False)
    return None


class TwoHosts:
    """Network namespaces ``a`` and ``b`` and their links.

    :param token: makes the names unique (hex, 8 characters used).
    """

    def __init__(self, token):
        self.token = token[:8]
        self.ns = {r: 'xsm-%s-%s' % (self.token, r) for r in 'ab'}
        self.bridge = 'xsmbr%s' % self.token
        self.root_ends = {r: 'xsc%s%s' % (self.token, r) for r in 'ab'}
        self.control_net = None
        self.control = {}
        self.migration = dict(MIGRATION_NET)
        self._made = []             # undo steps, most recent last

    # -- building and removing -----------------------------------------

    def create(self):
        """Make the namespaces, links and addresses (see module doc)."""
        for role in 'ab':
            run(['ip', 'netns', 'add', self.ns[role]])
            self._made.append(('netns', self.ns[role]))
            self.ip(role, 'link', 'set', 'lo', 'up')
        with open(_LOCK, 'a') as lock:
            # parallel test workers each need their own control subnet
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.control_net = self._free_control_net()
            run(['ip', 'link', 'add', self.bridge, 'type', 'bridge'])
            self._made.append(('link', self.bridge))
            run(['ip', 'addr', 'add', self.control_net + '1/24', 'dev',
                 self.bridge])
        run(['ip', 'link', 'set', self.bridge, 'up'])
        for i, role in enumerate('ab'):
            end = self.root_ends[role]
            run(['ip', 'link', 'add', end, 'type', 'veth', 'peer', 'name',
                 CTL, 'netns', self.ns[role]])
            self._made.append(('link', end))
            run(['ip', 'link', 'set', end, 'master', self.bridge, 'up'])
            self.control[role] = self.control_net + str(2 + i)
            self.ip(role, 'addr', 'add', self.control[role] + '/24', 'dev',
                    CTL)
            self.ip(role, 'link', 'set', CTL, 'up')
        run(['ip', 'link', 'add', MIG, 'netns', self.ns['a'], 'type', 'veth',
             'peer', 'name', MIG, 'netns', self.ns['b']])
        for role in 'ab':
            self.ip(role, 'addr', 'add', '%s/%d' % (self.migration[role],
                                                    MIGRATION_PREFIX),
                    'dev', MIG)
            self.ip(role, 'link', 'set', MIG, 'up')
        return self

    def _free_control_net(self):
        used = run(['ip', '-4', '-o', 'addr', 'show']).stdout
        start = int(self.token[:4], 16) % 250
        for n in range(250):
            net = '%s%d.' % (CONTROL_PREFIX, (start + n) % 250 + 1)
            if ' %s' % net not in used:
                return net
        raise NetworkError('no free /24 left in %s0.0/16' % CONTROL_PREFIX)

    def destroy(self):
        """Remove everything :meth:`create` made; kill what runs inside.

        Safe to call more than once and after a half-done :meth:`create`.
        :returns: what could not be removed (empty when all went).
        """
        left = []
        for kind, name in reversed(self._made):
            if kind == 'netns':
                self.kill_all(name)
                run(['ip', 'netns', 'del', name], check=False)
                if os.path.exists(os.path.join('/run/netns', name)):
                    left.append('namespace %s' % name)
            else:
                run(['ip', 'link', 'del', name], check=False)
                if run(['ip', 'link', 'show', name],
                       check=False).returncode == 0:
                    left.append('link %s' % name)
        self._made = []
        return left

    def pids(self, role_or_name):
        """Processes running in a namespace."""
        name = self.ns.get(role_or_name, role_or_name)
        proc = run(['ip', 'netns', 'pids', name], check=False)
        return [int(p) for p in proc.stdout.split()]

    def kill_all(self, name, timeout=5):
        """SIGKILL every process of namespace ``name`` (all are ours)."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- inside a namespace --------------------------------------------

    def argv(self, role, *argv):
        """``argv`` run in host ``role``'s namespace."""
        return ['ip', 'netns', 'exec', self.ns[role]] + list(argv)

    def wrapper(self, role):
        """``wrap(argv)`` -> ``argv`` run in host ``role``'s namespace.

        (An agent's ``wrap``: ``ip netns exec`` execs the command, so that
        the child is the agent.)
        """
        return lambda argv: self.argv(role, *argv)

    def ip(self, role, *args, check=True):
        return run(['ip', '-n', self.ns[role]] + list(args), check=check)

    def tc(self, role, *args, check=True):
        return run(['tc', '-n', self.ns[role]] + list(args), check=check)

    def listening_ports(self, role, address):
        """TCP ports listening on ``address`` in host ``role`` (``ss``)."""
        out = run(self.argv(role, 'ss', '-Hltn')).stdout
        ports = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                host, _, port = fields[3].rpartition(':')
                if host == address:
                    ports.add(int(port))
        return sorted(ports)

    # -- the migration link ----------------------------------------------

    def cut(self, how='drop'):
        """Cut the migration link.

        :param how: ``drop`` -- every packet is dropped in both directions
            (a queue of length 0 on both ends), the peers are not told;
            ``down`` -- host ``a``'s end is set down (the other end sees
            no carrier).
        """
        if how == 'drop':
            for role in 'ab':
                self.tc(role, 'qdisc', 'replace', 'dev', MIG, 'root',
                        'pfifo', 'limit', '0')
        elif how == 'down':
            self.ip('a', 'link', 'set', MIG, 'down')
        else:
            raise ValueError('how must be drop or down, not %r' % (how,))

    def shape(self, rate_bytes):
        """Limit the migration link to ``rate_bytes`` per second each way."""
        for role in 'ab':
            self.tc(role, 'qdisc', 'replace', 'dev', MIG, 'root', 'tbf',
                    'rate', '%dbit' % (rate_bytes * 8),
                    'burst', '%d' % max(16384, rate_bytes // 50),
                    'latency', '200ms')

    def restore(self):
        """Undo :meth:`cut` and :meth:`shape`: a plain link again."""
        for role in 'ab':
            self.tc(role, 'qdisc', 'del', 'dev', MIG, 'root', check=False)
            self.ip(role, 'link', 'set', MIG, 'up')

    def dropped(self, role):
        """Packets the migration link's queue dropped on ``role``'s end."""
        out = self.tc(role, '-s', 'qdisc', 'show', 'dev', MIG).stdout
        total = 0
        for part in out.split('dropped ')[1:]:
            total += int(part.split(',')[0])
        return total


class BrokerProxy:
    """Forward TCP connections from ``listen`` to ``target``.

    The agents in the namespaces reach the broker (on the root namespace's
    loopback) through this, on the bridge's address. One thread accepts,
    two threads pump each connection; :meth:`stop` closes everything.
    """

    def __init__(self, listen_host, target):
        self.target = target
        self._server = socket.create_server((listen_host, 0))
        self.address = self._server.getsockname()[:2]
        self._lock = threading.Lock()
        self._sockets = set()
        self._stopping = False
        self._thread = None

    @property
    def url(self):
        return 'rabbit://guest:guest@%s:%d/' % self.address

    def start(self):
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name='xsm-broker-proxy')
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            self._close(sock)
        if self._thread is not None:
            self._thread.join(5)

    @staticmethod
    def _close(sock):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self):
        while not self._stopping:
            try:
                client, _peer = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._close(client)
                continue
            with self._lock:
                if self._stopping:
                    self._close(client)
                    self._close(upstream)
                    return
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst),
                                 daemon=True,
                                 name='xsm-broker-proxy-pump').start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass


class Capture:
    """``tshark`` writing what crosses an interface of a namespace to a file.

    :param hosts: the :class:`TwoHosts`.
    :param role: the host whose interface is captured.
    :param path: the pcapng file.
    """

    def __init__(self, hosts, role, path, interface=MIG):
        self.hosts = hosts
        self.role = role
        self.path = path
        self.interface = interface
        self.log = path + '.log'
        self.proc = None

    def start(self, timeout=20):
        with open(self.log, 'wb') as log:
            self.proc = subprocess.Popen(
                self.hosts.argv(self.role, 'tshark', '-n', '-q', '-i',
                                self.interface, '-w', self.path),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if 'Capturing on' in self.output():
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise NetworkError('tshark did not start capturing on %s in %s: %s'
                           % (self.interface, self.hosts.ns[self.role],
                              self.output().strip()))

    def output(self):
        with open(self.log, errors='replace') as f:
            return f.read()

    def stop(self, timeout=20):
        """Stop the capture (SIGINT, then SIGKILL); tshark's summary."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()

    def data(self):
        with open(self.path, 'rb') as f:
            return f.read()
