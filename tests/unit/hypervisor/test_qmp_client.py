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

import json
import os
import socket
import threading
import time

from tests import base
from xsm_driver.hypervisor import qmp


class FakeQEMU:
    """A QMP server on a unix socket that plays a script of replies."""

    def __init__(self, path, handler, greet=True):
        self.path = path
        self.handler = handler
        self.greet = greet
        self.received = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        conn, _ = self._listener.accept()
        with conn:
            if self.greet:
                conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 7}},'
                             b' "capabilities": []}}\r\n')
            buf = b''
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buf += data
                while b'\n' in buf:
                    line, buf = buf.split(b'\n', 1)
                    cmd = json.loads(line)
                    self.received.append(cmd)
                    for out in self.handler(cmd):
                        if out is None:
                            return
                        conn.sendall(json.dumps(out).encode() + b'\r\n')

    def close(self):
        self._listener.close()
        self._thread.join(5)


def answer(cmd):
    name = cmd['execute']
    if name == 'qmp_capabilities':
        return [{'return': {}, 'id': cmd['id']}]
    if name == 'stop':
        return [{'event': 'STOP', 'data': {}},
                {'return': {}, 'id': 'someone-else'},
                {'return': {}, 'id': cmd['id']}]
    if name == 'query-status':
        return [{'return': {'status': 'paused', 'running': False},
                 'id': cmd['id']}]
    if name == 'hang':
        return []
    if name == 'bye':
        return [None]
    return [{'error': {'class': 'CommandNotFound', 'desc': name},
             'id': cmd['id']}]


class TestClient(base.TestCase):

    check_leaks = True
    leak_ignore_threads = ('Thread-',)

    def server(self, handler=answer, greet=True):
        path = os.path.join(self.make_tempdir(), 'qmp.sock')
        fake = FakeQEMU(path, handler, greet)
        self.addCleanup(fake.close)
        return fake

    def test_handshake_commands_and_events(self):
        fake = self.server()
        with qmp.Client(fake.path, timeout=5) as c:
            self.assertEqual(7, c.greeting['version']['qemu']['major'])
            self.assertEqual({}, c.execute('stop'))
            self.assertEqual('paused', c.execute('query-status')['status'])
            self.assertEqual(['STOP'], [e['event'] for e in c.events])
            self.assertEqual('STOP', c.wait_event('STOP', 1)['event'])
            self.assertEqual(0, len(c.events))
            exc = self.assertRaises(qmp.QMPCommandError, c.execute, 'nope')
            self.assertIn('CommandNotFound', str(exc))
        self.assertEqual('qmp_capabilities', fake.received[0]['execute'])
        self.assertEqual(len(fake.received),
                         len({m['id'] for m in fake.received}))

    def test_timeout(self):
        fake = self.server()
        with qmp.Client(fake.path, timeout=5) as c:
            t0 = time.monotonic()
            self.assertRaises(qmp.QMPTimeout, c.execute, 'hang',
                              timeout=0.2)
            self.assertLess(time.monotonic() - t0, 2)
            self.assertRaises(qmp.QMPTimeout, c.wait_event, 'X', 0.1)

    def test_no_greeting_times_out(self):
        fake = self.server(greet=False)
        c = qmp.Client(fake.path, timeout=0.3)
        self.assertRaises(qmp.QMPTimeout, c.connect)
        self.assertFalse(c.connected)

    def test_closed_connection(self):
        fake = self.server()
        c = qmp.Client(fake.path, timeout=5).connect()
        self.assertRaises(qmp.QMPError, c.execute, 'bye')
        self.assertFalse(c.connected)
        self.assertRaises(qmp.QMPError, c.execute, 'stop')

    def test_no_socket(self):
        c = qmp.Client(os.path.join(self.make_tempdir(), 'none'), 1)
        self.assertRaises(OSError, c.connect)
