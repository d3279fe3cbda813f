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

"""The host's xsm agent as a child process of nova-compute.

With ``[xsm]agent = process`` nova-compute starts ``xsm-agent`` as a child
process with a configuration file written from nova.conf's ``[xsm]``
group, and talks to it over the message bus like to any other host's
agent (so the bus must be one other processes reach, not ``fake://``); it
stops the child when the compute service stops. A child outlives a
nova-compute that dies without stopping it (SIGKILL, a crash); the next
one's child then shares the host's RPC queue
(``xsm-agent@EXCHANGE.HOST``) with it, which takes part of the calls: stop
the old one by hand.

``auto`` used to choose this under eventlet, because the NBD client's
``close()`` hung there: ``SSLSocket.shutdown`` dropped the TLS object and
the descriptor was closed while the client's reader, a green thread, was
parked in eventlet's hub waiting for that descriptor to become readable.
The hub is never told of a descriptor closed under it (epoll forgets it),
so the reader never woke and ``close()`` joined it forever; had it woken,
it would have read from an SSL socket without its TLS object (ValueError).
The server's ``stop()`` had the same flaw with its listening socket, and
its and the client's ``abort()`` called ``socket.socket.shutdown``, which
eventlet's green socket class does not have. Now the client and the
server shut the socket down (the plain ``shutdown(2)``), let the reader
see the end of the stream and leave, and close only then; ``auto`` runs
the agent in nova-compute's threads in both modes (tests:
tests/unit/core/nbd/test_eventlet.py and the eventlet run of
tools/run-nova-tests.sh).

The child remains the choice for keeping the engine out of nova-compute:
under eventlet, the engine's blocking system calls (file reads and writes,
fsync, unlink, an SR's flock held by another process) and its CPU work
(TLS, copying) run on nova-compute's one OS thread and pause its other
green threads while they last.

With ``[xsm]agent = auto`` on a real message bus, the agent is not a
child but a process of its own (``detached``): started in a session of
its own when no agent of the host answers, adopted when one does (a
nova-compute that restarts finds the agent it left), and never stopped
by nova-compute: stopping, restarting or upgrading nova-compute leaves
the host's guests running. (Under systemd, nova-compute's unit kills
every process of its control group when it stops: run ``xsm-agent`` as
a service of its own -- ``[xsm]agent = external`` -- or give
nova-compute's unit ``KillMode=process``.)

Nothing here imports nova or eventlet.
"""

import logging
import os
import signal
import subprocess
import sys
import time

LOG = logging.getLogger(__name__)

#: seconds to wait for a child to answer, and to stop on SIGTERM
START_TIMEOUT = 60
STOP_TIMEOUT = 30


def auth_lines(group):
    """The child's ``[agent]`` lines of the trust options of ``group``.

    (nova.conf's ``[xsm]``: the child is the host's agent, with the host's
    identity key and the trusted keys of nova-compute's configuration.)
    """
    from xsm_driver.core.rpc import keys
    lines = ['identity_key_file = %s' % keys.identity_path(group)]
    for name in ('trusted_hosts', 'trusted_operators'):
        value = getattr(group, name) or {}
        if value:
            lines.append('%s = %s' % (name, ','.join(
                '%s:%s' % item for item in sorted(value.items()))))
    if group.trusted_hosts_file:
        lines.append('trusted_hosts_file = %s' % group.trusted_hosts_file)
    lines += ['clock_skew = %r' % group.clock_skew,
              'replay_cache_size = %d' % group.replay_cache_size]
    return lines


def hypervisor_lines(group):
    """The child's ``[hypervisor]`` lines: nova.conf's ``[hypervisor]``.

    >>> import types
    >>> print('\\n'.join(hypervisor_lines(types.SimpleNamespace(
    ...     driver='qemu', qemu_binary='qemu-system-x86_64', accel='tcg',
    ...     default_memory_mib=256, shutdown_timeout=30,
    ...     nbd_reconnect_delay=60, guest_kit='/kit'))))
    driver = qemu
    qemu_binary = qemu-system-x86_64
    accel = tcg
    default_memory_mib = 256
    shutdown_timeout = 30
    nbd_reconnect_delay = 60
    guest_kit = /kit
    """
    return ['%s = %s' % (name, getattr(group, name))
            for name in ('driver', 'qemu_binary', 'accel',
                         'default_memory_mib', 'shutdown_timeout',
                         'nbd_reconnect_delay', 'guest_kit')]


def config_text(host, repositories, state_path, transport_url,
                control_exchange, migration_address,
                max_concurrent_migrations, leaf_headroom_mb, auth=(),
                hypervisor=()):
    """The child's configuration file.

    :param auth: more ``[agent]`` lines (see :func:`auth_lines`).
    :param hypervisor: its ``[hypervisor]`` lines (see
        :func:`hypervisor_lines`); none: the agent's defaults.

    >>> print(config_text('h1', ['local:vhd:/sr'], '/st', 'rabbit://x/',
    ...                   'nova', '10.0.0.1', 3, 64), end='')
    [DEFAULT]
    transport_url = rabbit://x/
    control_exchange = nova
    <BLANKLINE>
    [agent]
    host = h1
    state_path = /st
    migration_address = 10.0.0.1
    max_concurrent_migrations = 3
    leaf_headroom_mb = 64
    <BLANKLINE>
    [sr]
    repositories = local:vhd:/sr
    """
    lines = ['[DEFAULT]', 'transport_url = %s' % transport_url,
             'control_exchange = %s' % control_exchange, '',
             '[agent]', 'host = %s' % host, 'state_path = %s' % state_path,
             'migration_address = %s' % migration_address,
             'max_concurrent_migrations = %d' % max_concurrent_migrations,
             'leaf_headroom_mb = %d' % leaf_headroom_mb]
    lines += list(auth) + ['', '[sr]']
    lines += ['repositories = %s' % spec for spec in repositories]
    if hypervisor:
        lines += ['', '[hypervisor]'] + list(hypervisor)
    return '\n'.join(lines) + '\n'


class AgentProcess:
    """``python -m xsm_driver.cmd.agent`` for one host.

    :param folder: where its configuration file and log go.
    :param text: its configuration (see :func:`config_text`).
    :param ping: called without arguments until it stops raising, to
        learn that the child serves.
    :param detached: the agent outlives nova-compute: adopted when it
        already answers, started in a session of its own otherwise, and
        left running by :meth:`stop`.
    """

    def __init__(self, folder, text, ping, detached=False):
        self.folder = folder
        self.config = os.path.join(folder, 'xsm-agent.conf')
        self.log = os.path.join(folder, 'xsm-agent.log')
        self.pid_file = os.path.join(folder, 'xsm-agent.pid')
        self._text = text
        self._ping = ping
        self.detached = detached
        self.adopted = False
        self.proc = None

    def _answers(self):
        try:
            self._ping()
            return True
        except Exception:
            return False

    def start(self):
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        if self.detached and self._answers():
            self.adopted = True
            written = None
            try:
                with open(self.config) as f:
                    written = f.read()
            except OSError:
                pass
            if written is not None and written != self._text:
                LOG.warning('the running xsm-agent of this host was started '
                            'with another configuration than nova.conf\'s '
                            '[xsm] gives now (%s); restart it, when no guest '
                            'needs it, to apply the new one', self.config)
            LOG.info('xsm-agent %s adopted: it runs on its own and outlives '
                     'nova-compute', self.pid() or '(pid unknown)')
            return self
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)          # it holds the transport's credentials
        with os.fdopen(fd, 'w') as f:
            f.write(self._text)
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'xsm_driver.cmd.agent',
                 '--config-file', self.config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                close_fds=True, start_new_session=self.detached)
        if self.detached:
            with open(self.pid_file, 'w') as f:
                f.write('%d\n' % self.proc.pid)
        LOG.info('xsm-agent %s %d started (config %s, log %s)',
                 'process' if self.detached else 'child', self.proc.pid,
                 self.config, self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError('xsm-agent exited with status %s; see %s'
                                   % (self.proc.returncode, self.log))
            try:
                self._ping()
                return self
            except Exception as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError('xsm-agent did not answer within %d '
                                       's (%s); see %s' % (
                                           START_TIMEOUT, exc, self.log))
                time.sleep(0.2)

    def pid(self):
        """The detached agent's pid, from its pid file; None: unknown."""
        try:
            with open(self.pid_file) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        """Stop a child: SIGTERM, then SIGKILL; a detached agent runs on.

        A child aborts what runs and exits on SIGTERM. A detached agent
        keeps running, and its guests (see :meth:`terminate`).
        """
        if self.detached:
            LOG.info('xsm-agent %s keeps running (its guests with it)',
                     self.pid() or '')
            self.proc = None
            return
        self._stop(self.proc)

    def terminate(self):
        """Stop a detached agent too (tests; an operator's choice)."""
        proc = self.proc
        if proc is None:
            pid = self.pid()
            if pid is None:
                return
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        self._stop(proc)

    def _stop(self, proc):
        self.proc = None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            LOG.warning('xsm-agent child %d did not stop within %d s; '
                        'killing it', proc.pid, STOP_TIMEOUT)
            proc.kill()
            proc.wait()
