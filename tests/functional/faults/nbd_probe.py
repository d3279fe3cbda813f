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

"""Try NBD connections, in order, and say which the server accepted.

Run inside a host's namespace (``ip netns exec NS python -m
tests.functional.faults.nbd_probe``) so that it reaches the
other host over the migration link like a peer on that network would.
Reads JSON from stdin::

    {"host": "198.19.0.2", "port": 10809, "timeout": 10,
     "attempts": [{"name": "plain", "export": "..."},
                  {"name": "no client certificate", "export": "...",
                   "tls": {"ca": "server-ca.pem"}},
                  {"name": "valid", "export": "...",
                   "tls": {"ca": "server-ca.pem", "cert": "cert.pem",
                           "key": "key.pem"}}]}

(without ``ca``, any server certificate is taken).

and writes one JSON list: ``{"name", "accepted", "size"}`` or ``{"name",
"accepted": false, "error"}`` per attempt. Each connection is closed
before the next attempt.
"""

import json
import ssl
import sys

from xsm_driver.core.nbd import client as nbd_client


def _context(tls):
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    if tls.get('ca'):
        ctx.load_verify_locations(tls['ca'])
    else:                       # an intruder takes any server
        ctx.verify_mode = ssl.CERT_NONE
    if tls.get('cert'):
        ctx.load_cert_chain(tls['cert'], tls['key'])
    return ctx


def attempt(host, port, item, timeout):
    result = {'name': item['name']}
    client = None
    try:
        client = nbd_client.Client(host, port, item['export'],
                                   tls_context=_context(item.get('tls')),
                                   timeout=timeout).connect()
        # TLS 1.3 checks the client's certificate after the client's
        # handshake has returned: a request shows whether it was taken.
        client.pread(0, 512)
        result.update(accepted=True, size=client.size)
    except Exception as exc:
        result.update(accepted=False, error='%s: %s'
                      % (type(exc).__name__, exc))
    finally:
        if client is not None:
            try:
                client.close()
            except Exception:
                pass
    return result


def main():
    request = json.load(sys.stdin)
    results = [attempt(request['host'], request['port'], item,
                       request.get('timeout', 10))
               for item in request['attempts']]
    json.dump(results, sys.stdout)
    return 0


if __name__ == '__main__':
    sys.exit(main())
