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

"""Socket side shared by the NBD client and server."""

RECV_SIZE = 256 * 1024


def receive(sock, conn, lock):
    """Receive more bytes from ``sock`` for the sans-IO ``conn``.

    A payload goes straight into its own buffer (``recv_into``); other
    bytes are read in chunks. ``lock`` guards ``conn``.

    :returns: False once the peer has closed (the core is told so).
    """
    with lock:
        size = conn.expected_payload
        view = conn.payload_view(bytearray(size)) if size else None
    if view is None:
        data = sock.recv(RECV_SIZE)
        with lock:
            conn.receive_data(data)
        return bool(data)
    while len(view):
        got = sock.recv_into(view)
        with lock:
            if not got:
                conn.receive_data(b'')
                return False
            conn.payload_received(got)
        view = view[got:]
    return True
