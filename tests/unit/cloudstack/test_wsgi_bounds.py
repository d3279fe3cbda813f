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

"""The HTTP server of xsm-cloudstack-api under floods, with real sockets.

Half-open and dribbling connections are closed after request_timeout, a
bounded pool serves them (threads do not grow with connections), one
connection over max_connections gets 503 at once, and a large body
without credentials is refused before it is read. Deadlines are short and
margins wide: a loaded 2-core machine must not fail these tests.
"""

import json
import logging
import re
import socket
import threading
import time
import urllib.parse
import urllib.request

import fixtures

from tests import base
from tests.unit.cloudstack.test_api import FakeAPI
from xsm_driver.cloudstack import signature
from xsm_driver.cloudstack import wsgi

TIMEOUT = 1.0
WORKERS = 4
MAX_CONNECTIONS = 40
THREAD_PREFIX = 'xsm-cloudstack-api'


def rss_kib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    raise AssertionError('no VmRSS in /proc/self/status')


def pool_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith(THREAD_PREFIX)]


def closed(sock, timeout):
    """Read until the server closes ``sock``; what it sent, or None."""
    data = b''
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            return None
        if not chunk:
            return data
        data += chunk


class BoundsTest(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.log = self.useFixture(fixtures.FakeLogger(
            name=wsgi.__name__, level=logging.DEBUG,
            format='%(levelname)s %(message)s'))
        self.app = wsgi.Application(FakeAPI(), {'K': 'S'},
                                    command_token='T',
                                    require_expires=False)
        self.socks = []

    def start(self, request_timeout=TIMEOUT):
        self.server = wsgi.make_server(
            self.app, '127.0.0.1', 0, workers=WORKERS,
            max_connections=MAX_CONNECTIONS, request_timeout=request_timeout)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       name='serve', daemon=True)
        self.thread.start()
        self.addCleanup(self.stop)
        self.address = self.server.server_address[:2]

    def stop(self):
        for sock in self.socks:
            sock.close()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def connect(self):
        sock = socket.create_connection(self.address, timeout=10)
        self.socks.append(sock)
        return sock

    def signed_get(self):
        params = {'command': 'listVolumes', 'apiKey': 'K',
                  'response': 'json'}
        params['signature'] = signature.sign(params, 'S')
        url = 'http://%s:%d/client/api?%s' % (
            self.address + (urllib.parse.urlencode(params),))
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, json.loads(reply.read())

    def test_half_open_connections_are_closed_and_threads_stay_bounded(self):
        # long enough for all of them to be open at once on a slow machine
        timeout = 5.0
        self.start(timeout)
        self.assertEqual((200, {'listvolumesresponse': {}}),
                         self.signed_get())
        before = rss_kib()
        half = []
        for i in range(MAX_CONNECTIONS):
            sock = self.connect()
            sock.sendall(b'GET /client/api?command=listVolumes' if i % 2
                         else b'POST /client/api HTTP/1.1\r\nContent-Le')
            half.append(sock)
        self.assertTrue(self._settle(
            lambda: self.server.connections == MAX_CONNECTIONS))
        extra = [self.connect() for _ in range(20)]
        for sock in extra:
            answer = closed(sock, 5)
            self.assertIsNotNone(answer, 'an extra connection was kept')
            self.assertTrue(answer.startswith(b'HTTP/1.0 503 '), answer)
        self.assertEqual(20, self.server.refused)
        self.assertEqual(1, len(re.findall(r'max_connections \(40\) '
                                           r'reached', self.log.output)))
        self.assertLessEqual(len(pool_threads()), WORKERS)
        # every half-open one is closed, long before 40 x TIMEOUT: the
        # deadline runs from acceptance, queued or not
        start = time.monotonic()
        for sock in half:
            self.assertIsNotNone(closed(sock, timeout + 10),
                                 'a half-open connection was kept')
        elapsed = time.monotonic() - start
        self.assertLess(elapsed, timeout + 10)
        self.assertLessEqual(len(pool_threads()), WORKERS)
        self.assertTrue(self._settle(lambda: self.server.connections == 0))
        self.assertEqual((200, {'listvolumesresponse': {}}),
                         self.signed_get())
        self.assertIn('accepting connections again; 20 refused',
                      self.log.output)
        # a few MiB at most (the thread stacks are not even touched)
        self.assertLess(rss_kib() - before, 32 * 1024)

    def test_a_dribbling_client_is_cut_at_the_deadline(self):
        self.start()
        sock = self.connect()
        start = time.monotonic()
        cut = None
        for byte in b'GET /client/api?command=listVolumes&x=' + b'y' * 200:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = time.monotonic() - start
                break
            time.sleep(0.1)
            sock.settimeout(0.01)
            try:
                if not sock.recv(1):
                    cut = time.monotonic() - start
                    break
            except socket.timeout:
                pass
            except ConnectionResetError:
                cut = time.monotonic() - start
                break
        self.assertIsNotNone(cut, 'a dribbling client was kept 20 s')
        self.assertGreaterEqual(cut, TIMEOUT * 0.9)
        self.assertLess(cut, TIMEOUT + 5)

    def test_an_unsigned_large_body_is_refused_unread(self):
        self.start()
        before = rss_kib()
        socks = []
        for _ in range(20):
            sock = self.connect()
            sock.sendall(b'POST /client/api HTTP/1.1\r\nHost: x\r\n'
                         b'Content-Type: application/x-www-form-urlencoded'
                         b'\r\nContent-Length: 16000000\r\n\r\n'
                         b'command=listVolumes&' + b'a' * 1000)
            socks.append(sock)
        for sock in socks:
            # answered while 15.99 MB of the body have not been sent
            answer = closed(sock, 5)
            self.assertIsNotNone(answer)
            head, _, body = answer.partition(b'\r\n\r\n')
            self.assertRegex(head, rb'^HTTP/1\.[01] 413 ')
            self.assertIn(b'is larger than 65536 bytes', body)
        self.assertLess(rss_kib() - before, 32 * 1024)
        # a command body without the token is not read either
        sock = self.connect()
        sock.sendall(b'POST /xsm/v1/hosts/host-a/commands HTTP/1.1\r\n'
                     b'Content-Length: 16000000\r\n\r\n[')
        answer = closed(sock, 5)
        self.assertRegex(answer, rb'^HTTP/1\.[01] 401 ')

    def test_a_body_at_the_limit_is_read(self):
        self.start()
        params = {'command': 'listVolumes', 'apiKey': 'K',
                  'response': 'json', 'pad': 'p' * 60000}
        params['signature'] = signature.sign(params, 'S')
        body = urllib.parse.urlencode(params).encode()
        self.assertLess(len(body), wsgi.MAX_API_BODY)
        request = urllib.request.Request(
            'http://%s:%d/client/api' % self.address, data=body,
            headers={'Content-Type': 'application/x-www-form-urlencoded'})
        with urllib.request.urlopen(request, timeout=30) as reply:
            self.assertEqual(200, reply.status)

    def test_server_close_with_connections_in_every_state(self):
        self.start(request_timeout=30.0)
        idle = self.connect()
        half = self.connect()
        half.sendall(b'GET /client/api?comm')
        body_missing = self.connect()
        body_missing.sendall(b'POST /xsm/v1/hosts/host-a/commands HTTP/1.1'
                             b'\r\nAuthorization: Bearer T\r\n'
                             b'Content-Length: 100\r\n\r\n[')
        queued = [self.connect() for _ in range(10)]
        self.assertTrue(self._settle(
            lambda: self.server.connections == 13))
        start = time.monotonic()
        self.server.shutdown()
        self.server.server_close()
        self.assertLess(time.monotonic() - start, 5.0)
        for sock in [idle, half, body_missing] + queued:
            self.assertIsNotNone(closed(sock, 5))
        self.assertEqual([], pool_threads())

    @staticmethod
    def _settle(probe, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
