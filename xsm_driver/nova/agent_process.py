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

When nova-compute runs monkey-patched by eventlet, the migration engine
must not run in its (green) threads: its NBD data path relies on real
threads and blocking sockets. nova-compute then starts ``xsm-agent`` as a
child process with a configuration file written from nova.conf's ``[xsm]``
group, and talks to it over the message bus like to any other host's
agent; it stops the child when the compute service stops.

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


def config_text(host, repositories, state_path, transport_url,
                control_exchange, migration_address,
                max_concurrent_migrations, leaf_headroom_mb):
    """The child's configuration file.

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
             'leaf_headroom_mb = %d' % leaf_headroom_mb, '', '[sr]']
    lines += ['repositories = %s' % spec for spec in repositories]
    return '\n'.join(lines) + '\n'


class AgentProcess:
    """``python -m xsm_driver.cmd.agent`` for one host.

    :param folder: where its configuration file and log go.
    :param text: its configuration (see :func:`config_text`).
    :param ping: called without arguments until it stops raising, to
        learn that the child serves.
    """

    def __init__(self, folder, text, ping):
        self.folder = folder
        self.config = os.path.join(folder, 'xsm-agent.conf')
        self.log = os.path.join(folder, 'xsm-agent.log')
        self._text = text
        self._ping = ping
        self.proc = None

    def start(self):
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        fd = os.open(self.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o600)          # it holds the transport's credentials
        with os.fdopen(fd, 'w') as f:
            f.write(self._text)
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'xsm_driver.cmd.agent',
                 '--config-file', self.config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                close_fds=True)
        LOG.info('xsm-agent child %d started (config %s, log %s)',
                 self.proc.pid, self.config, self.log)
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

    def stop(self):
        """SIGTERM (the agent aborts what runs and exits), then SIGKILL."""
        proc, self.proc = self.proc, None
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
