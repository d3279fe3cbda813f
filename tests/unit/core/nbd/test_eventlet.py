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

"""Our NBD client and server in a process monkey-patched by eventlet.

nova-compute in eventlet mode patches ``threading``, ``socket`` and
``ssl``: the client's reader and the server's threads are then green
threads on eventlet's green (TLS) sockets. Each test runs one scenario
script in a child process (this process stays unpatched) under a hard
timeout: a close or stop that hangs fails the test, with the stacks of the
green threads at that moment.
"""

import importlib.util
import subprocess
import sys

from tests import base

#: seconds before the child dumps its green threads' stacks and exits
WATCHDOG = 60
#: seconds before this process kills the child
HARD_TIMEOUT = WATCHDOG + 30

CHILD = r'''
import os
import sys
import tempfile

MODE = sys.argv[1]
if MODE == 'eventlet':
    import eventlet
    eventlet.monkey_patch()

import errno
import gc
import shutil
import socket
import threading
import time
import traceback


def watchdog(seconds):
    time.sleep(seconds)
    print('HANG: still running after %d s; the threads:' % seconds,
          file=sys.stderr)
    if MODE == 'eventlet':
        import greenlet
        for g in gc.get_objects():
            if isinstance(g, greenlet.greenlet) and g.gr_frame is not None:
                print('--- %r' % g, file=sys.stderr)
                traceback.print_stack(g.gr_frame, file=sys.stderr)
    else:
        import faulthandler
        faulthandler.dump_traceback(all_threads=True)
    sys.stderr.flush()
    os._exit(3)


if MODE == 'eventlet':
    # a real thread: green threads stuck in the hub must not stop it
    real = eventlet.patcher.original('threading')
    real.Thread(target=watchdog, args=(int(sys.argv[2]),),
                daemon=True).start()
    assert eventlet.patcher.is_monkey_patched('thread')
    assert eventlet.patcher.is_monkey_patched('socket')
else:
    threading.Thread(target=watchdog, args=(int(sys.argv[2]),),
                     daemon=True).start()

from xsm_driver.core.block import backends
from xsm_driver.core.nbd import client as nbd_client
from xsm_driver.core.nbd import server as nbd_server
from xsm_driver.core.nbd import tls
from xsm_driver.core.vhd import ops

MiB = 1 << 20
top = tempfile.mkdtemp(prefix='xsm-eventlet-')
try:
    files = tls.make_credentials(os.path.join(top, 'pki'))
    server_ctx = tls.server_context(files[tls.SERVER_CERT],
                                    files[tls.SERVER_KEY],
                                    files[tls.CA_CERT])
    client_ctx = tls.client_context(files[tls.CA_CERT],
                                    files[tls.CLIENT_CERT],
                                    files[tls.CLIENT_KEY])
    ops.create(os.path.join(top, 'disk.vhd'), 16 * MiB)
    dev = backends.VHDDevice(os.path.join(top, 'disk.vhd'), writable=True)

    def connect(server, tls_on=True):
        host, port = server.address
        return nbd_client.Client(host, port, 'disk', timeout=10,
                                 tls_context=client_ctx if tls_on else None,
                                 server_hostname='localhost').connect()

    def wait_idle(server):
        deadline = time.monotonic() + 10
        while server.connections:
            assert time.monotonic() < deadline, 'server connection left'
            time.sleep(0.01)

    def fails(request, *args):
        """The errno of the request (None when it succeeds)."""
        try:
            request(*args).wait(10)
        except nbd_client.NBDError as exc:
            return exc.errno
        return None

    def green(obj):
        return type(obj).__module__.startswith('eventlet')

    for tls_on in (True, False):
        what = 'tls' if tls_on else 'plain'
        server = nbd_server.Server({'disk': dev}, workers=2,
                                   tls_context=server_ctx if tls_on
                                   else None).start()

        # a round trip through the inline and the pooled paths, then close
        client = connect(server, tls_on)
        assert green(client._sock) == (MODE == 'eventlet'), client._sock
        data = os.urandom(3 * MiB + 7)
        client.pwrite(data, MiB - 3, fua=True)
        assert bytes(client.pread(MiB - 3, len(data))) == data
        client.flush()
        assert client.block_status(0, 16 * MiB)
        client.close()
        assert not client._reading
        wait_idle(server)
        print('ok %s round trip and close' % what, flush=True)

        # close with requests in flight: each ends, none hangs
        client = connect(server, tls_on)
        pending = [client.aio_pread(i * 64 * 1024, 64 * 1024)
                   for i in range(32)]
        client.close()
        assert not client._reading
        assert {fails(lambda: p) for p in pending} <= {None, errno.ESHUTDOWN}
        wait_idle(server)
        print('ok %s close with requests in flight' % what, flush=True)

        # abort, then close
        client = connect(server, tls_on)
        client.pread(0, 4096)
        client.abort()
        assert fails(client.aio_pread, 0, 4096) == errno.ECONNABORTED
        client.close()
        assert not client._reading
        wait_idle(server)
        print('ok %s abort and close' % what, flush=True)

        # the server stops under a connected client
        client = connect(server, tls_on)
        client.pread(0, 4096)
        server.stop()
        assert server.connections == 0
        assert fails(client.aio_pread, 0, 4096) is not None
        client.close()
        assert not client._reading
        print('ok %s server stop with a client' % what, flush=True)

        # a server that stops reading: a send blocked past its deadline
        # ends there (the watchdog shuts the socket down under it)
        transmit = nbd_server._Handler._transmit
        nbd_server._Handler._transmit = (
            lambda handler, _dev: handler.server._stopping.wait())
        try:
            server = nbd_server.Server({'disk': dev}, workers=2,
                                       tls_context=server_ctx if tls_on
                                       else None).start()
            client = connect(server, tls_on)
            data = bytes(4 * MiB)
            slowest = 0.0
            for n in range(64):
                start = time.monotonic()
                try:
                    client.aio_pwrite(data, (n % 4) * 4 * MiB,
                                      deadline=start + 0.5)
                except nbd_client.NBDError as exc:
                    assert exc.errno == errno.ETIMEDOUT, exc
                slowest = max(slowest, time.monotonic() - start)
                if client._failure is not None:
                    break
            assert client._failure is not None, 'no send ever blocked'
            assert client._failure.errno == errno.ETIMEDOUT, client._failure
            assert 0.25 < slowest < 2.0, slowest
            client.close()
            assert not client._reading
            server.stop()
        finally:
            nbd_server._Handler._transmit = transmit
        print('ok %s send deadline on a server that stopped reading'
              % what, flush=True)
    # a unix-socket server (a QEMU guest's disk) stops, with a client
    # and without: its accept() wakes up
    path = os.path.join(top, 'nbd.sock')
    for with_client in (True, False):
        server = nbd_server.Server({'disk': dev}, path=path).start()
        if with_client:              # (in the handshake: it said nothing)
            peer = socket.socket(socket.AF_UNIX)
            peer.settimeout(10)
            peer.connect(path)
            assert peer.recv(8) == b'NBDMAGIC'
        server.stop()
        assert not os.path.exists(path)
        if with_client:
            while peer.recv(4096):       # the server hung up
                pass
            peer.close()
    print('ok unix server stop', flush=True)
    dev.close()
finally:
    shutil.rmtree(top, ignore_errors=True)
print('done', flush=True)
'''

SCENARIOS = ['%s %s' % (what, step) for what in ('tls', 'plain')
             for step in ('round trip and close',
                          'close with requests in flight',
                          'abort and close',
                          'server stop with a client',
                          'send deadline on a server that stopped reading')
             ] + ['unix server stop']


class EventletTest(base.TestCase):

    def run_child(self, mode):
        try:
            proc = subprocess.run(
                [sys.executable, '-W', 'ignore', '-c', CHILD, mode,
                 str(WATCHDOG)], cwd=base.REPO_TOP, capture_output=True,
                text=True, timeout=HARD_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self.fail('the %s child hung for %d s (even its watchdog):\n'
                      '%s\n%s' % (mode, HARD_TIMEOUT, exc.stdout,
                                  exc.stderr))
        self.assertEqual(0, proc.returncode,
                         'the %s child failed:\n%s\n%s' % (
                             mode, proc.stdout, proc.stderr))
        lines = proc.stdout.splitlines()
        self.assertEqual(['ok %s' % s for s in SCENARIOS] + ['done'], lines)

    def test_native_threads(self):
        self.run_child('native')

    def test_eventlet_monkey_patched(self):
        if importlib.util.find_spec('eventlet') is None:
            self.missing('eventlet is not installed; install the test '
                         'requirements: pip install -r test-requirements.txt')
        self.run_child('eventlet')
