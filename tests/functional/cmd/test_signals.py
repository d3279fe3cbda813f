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

"""The daemons stop on a SIGTERM whichever of their threads the kernel hands
it to.

``kill PID`` may be delivered to any thread of the process that does not
block the signal (signal(7)); Python runs the handler in the main thread
only, the next time that thread runs Python code. Here the signal goes to
a thread other than the main one on purpose (``tgkill``), which is what
the kernel does now and then with ``kill``.
"""

import ctypes
import os
import platform
import signal
import subprocess
import sys
import time
import uuid as uuidlib

from tests import base
from xsm_driver.core.nbd import tls
from xsm_driver.testing import harness

#: tgkill's system call number (asm/unistd_64.h, asm-generic/unistd.h)
SYS_TGKILL = {'x86_64': 234, 'aarch64': 131}


def tgkill(pid, tid, sig):
    nr = SYS_TGKILL.get(platform.machine())
    if nr is None:
        raise AssertionError('no tgkill number for %s' % platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), 'tgkill %d/%d' % (pid, tid))


def other_thread(pid, timeout=10):
    """A thread of ``pid`` that is not its main thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tids = [int(t) for t in os.listdir('/proc/%d/task' % pid)
                if int(t) != pid]
        if tids:
            return tids[-1]
        time.sleep(0.05)
    raise AssertionError('process %d has no thread but its main one' % pid)


class TestSigtermToAnotherThread(base.TestCase):

    def wait_exit(self, proc, timeout=10):
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.fail('still running %d s after SIGTERM to one of its '
                      'threads' % timeout)

    def test_agent(self):
        problem = harness.broker_problem()
        if problem:
            self.missing(problem)
        deployment = harness.one_agent(self.make_tempdir(),
                                       uuidlib.uuid4().hex[:10])
        agent = deployment.agents['a']
        self.addCleanup(deployment.close)
        deployment.start()
        tgkill(agent.pid, other_thread(agent.pid), signal.SIGTERM)
        self.assertEqual(0, self.wait_exit(agent.proc), agent.tail())
        self.assertRegex(agent.tail(), r' INFO \S+ stopping\n')

    def test_nbd_serve(self):
        root = self.make_tempdir()
        pki = os.path.join(root, 'pki')
        tls.make_credentials(pki)
        image = os.path.join(root, 'disk.raw')
        with open(image, 'wb') as f:
            f.truncate(1 << 20)
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), 'xsm-nbd'),
             'serve', '--port', '0',
             '--tls-cert', os.path.join(pki, tls.SERVER_CERT),
             '--tls-key', os.path.join(pki, tls.SERVER_KEY), image],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and (
            proc.kill(), proc.wait()))
        self.assertIn('serving', proc.stdout.readline())
        tgkill(proc.pid, other_thread(proc.pid), signal.SIGTERM)
        self.assertEqual(0, self.wait_exit(proc), proc.stderr.read())
