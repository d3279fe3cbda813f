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

"""A small QMP client (QEMU Machine Protocol).

QMP is JSON over a stream socket, one object per line. The server speaks
first with a greeting (``{"QMP": {...}}``); the client answers
``qmp_capabilities``; then each command (``{"execute": NAME,
"arguments": {...}, "id": ID}``) gets one reply with the same ``id`` --
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` -- and
asynchronous events (``{"event": NAME, "data": ..., "timestamp": ...}``)
may arrive at any time in between.

The protocol part is pure (bytes in, messages out: :class:`Parser`,
:func:`encode_command`, :func:`classify`); :class:`Client` is the IO at the
edge: a unix socket with bounded reads and a deadline on every call.
"""

import collections
import json
import logging
import socket
import time

from xsm_driver.core import exception

LOG = logging.getLogger(__name__)

#: the longest line accepted from QEMU (a query-* reply is a few KiB)
MAX_LINE = 1 << 20
#: events kept while nobody waits for them (oldest dropped first)
MAX_EVENTS = 1000

GREETING = 'greeting'
RETURN = 'return'
ERROR = 'error'
EVENT = 'event'


class QMPError(exception.XSMError):
    """QMP failed: the connection, the protocol or a timeout."""


class QMPProtocolError(QMPError):
    """QEMU sent something that is not QMP."""


class QMPTimeout(QMPError):
    """No answer in time."""


class QMPCommandError(QMPError):
    """QEMU answered a command with an error."""

    msg_fmt = 'QMP command %(command)s failed: %(cls)s: %(desc)s'


# -- the protocol, pure ------------------------------------------------------

class Parser:
    """Turn the bytes QEMU sends into JSON messages.

    :meth:`feed` takes any slice of the stream and returns the complete
    messages it finished, in order; a partial line waits for the next
    feed. A line longer than ``max_line`` or that is not a JSON object
    raises :class:`QMPProtocolError`.
    """

    def __init__(self, max_line=MAX_LINE):
        self._buf = bytearray()
        self._max = max_line

    def feed(self, data):
        self._buf += data
        out = []
        while True:
            nl = self._buf.find(b'\n')
            if nl < 0:
                if len(self._buf) > self._max:
                    raise QMPProtocolError(
                        'a QMP line longer than %d bytes' % self._max)
                return out
            if nl > self._max:
                raise QMPProtocolError(
                    'a QMP line longer than %d bytes' % self._max)
            line = bytes(self._buf[:nl]).strip()
            del self._buf[:nl + 1]
            if line:
                out.append(decode_line(line))

    @property
    def pending(self):
        """Bytes of an unfinished line."""
        return len(self._buf)


def decode_line(line):
    """One QMP line (bytes, without its newline) -> a dict."""
    try:
        msg = json.loads(line.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as exc:
        raise QMPProtocolError('not JSON from QMP: %r (%s)'
                               % (line[:200], exc))
    if not isinstance(msg, dict):
        raise QMPProtocolError('not a JSON object from QMP: %r'
                               % (line[:200],))
    return msg


def classify(msg):
    """The kind of a QMP message: GREETING, RETURN, ERROR or EVENT.

    :raises QMPProtocolError: for anything else.
    """
    if 'QMP' in msg:
        return GREETING
    if 'return' in msg:
        return RETURN
    if 'error' in msg:
        return ERROR
    if 'event' in msg:
        return EVENT
    raise QMPProtocolError('unknown QMP message: %r' % (msg,))


def encode_command(name, arguments=None, ident=None):
    """The bytes of one QMP command (a JSON line)."""
    cmd = {'execute': name}
    if arguments:
        cmd['arguments'] = arguments
    if ident is not None:
        cmd['id'] = ident
    return json.dumps(cmd, separators=(',', ':')).encode('utf-8') + b'\r\n'


def result(msg, command):
    """The ``return`` value of a reply, or raise its error."""
    if classify(msg) == ERROR:
        err = msg['error'] if isinstance(msg['error'], dict) else {}
        raise QMPCommandError(command=command,
                              cls=err.get('class', '?'),
                              desc=err.get('desc', msg['error']))
    return msg['return']


# -- the IO at the edge ------------------------------------------------------

class Client:
    """A QMP connection over a unix socket.

    Not thread-safe: one caller at a time (the driver holds a lock).

    :param path: the QMP socket of the VM.
    :param timeout: seconds for connecting and the handshake, and the
        default of each :meth:`execute`.
    """

    def __init__(self, path, timeout=10.0):
        self.path = path
        self.timeout = timeout
        self.events = collections.deque(maxlen=MAX_EVENTS)
        self.greeting = None
        self._sock = None
        self._parser = Parser()
        self._ready = collections.deque()
        self._next_id = 0

    def connect(self):
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
            self._sock = sock
            greeting = self._next_message(deadline)
            if classify(greeting) != GREETING:
                raise QMPProtocolError('QMP at %s did not greet: %r'
                                       % (self.path, greeting))
            self.greeting = greeting['QMP']
            self.execute('qmp_capabilities', deadline=deadline)
        except BaseException:
            self._sock = None
            sock.close()
            raise
        return self

    def close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    @property
    def connected(self):
        return self._sock is not None

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def execute(self, name, arguments=None, timeout=None, deadline=None):
        """Run one command and return its ``return`` value.

        Events that arrive meanwhile are queued in :attr:`events`.

        :raises QMPCommandError: QEMU answered with an error.
        :raises QMPTimeout: no reply within ``timeout`` seconds.
        :raises QMPError: the connection broke (it is closed then).
        """
        if deadline is None:
            deadline = time.monotonic() + (timeout or self.timeout)
        self._next_id += 1
        ident = 'xsm-%d' % self._next_id
        self._send(encode_command(name, arguments, ident), deadline)
        while True:
            msg = self._next_message(deadline)
            kind = classify(msg)
            if kind == EVENT:
                self.events.append(msg)
            elif kind in (RETURN, ERROR) and msg.get('id') == ident:
                return result(msg, name)
            else:
                LOG.debug('QMP %s: ignoring %r', self.path, msg)

    def wait_event(self, names, timeout):
        """The first queued or arriving event named in ``names``.

        Events of other names stay queued, in order.

        :raises QMPTimeout: none within ``timeout`` seconds.
        """
        if isinstance(names, str):
            names = (names,)
        deadline = time.monotonic() + timeout
        while True:
            for ev in list(self.events):
                if ev['event'] in names:
                    self.events.remove(ev)
                    return ev
            msg = self._next_message(deadline)
            if classify(msg) == EVENT:
                self.events.append(msg)

    # -- bytes ---------------------------------------------------------------

    def _send(self, data, deadline):
        if self._sock is None:
            raise QMPError('QMP %s: not connected' % self.path)
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(data)
        except socket.timeout:
            self.close()
            raise QMPTimeout('QMP %s: sending timed out' % self.path)
        except OSError as exc:
            self.close()
            raise QMPError('QMP %s: %s' % (self.path, exc))

    def _next_message(self, deadline):
        while not self._ready:
            if self._sock is None:
                raise QMPError('QMP %s: not connected' % self.path)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout('QMP %s: no answer in time' % self.path)
            try:
                self._sock.settimeout(left)
                data = self._sock.recv(65536)
            except socket.timeout:
                raise QMPTimeout('QMP %s: no answer in time' % self.path)
            except OSError as exc:
                self.close()
                raise QMPError('QMP %s: %s' % (self.path, exc))
            if not data:
                self.close()
                raise QMPError('QMP %s: QEMU closed the connection'
                               % self.path)
            try:
                self._ready.extend(self._parser.feed(data))
            except QMPProtocolError:
                self.close()
                raise
        return self._ready.popleft()
