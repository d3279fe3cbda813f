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

"""xsm-cloudstack-extension: a CloudStack Orchestrator Extension executable.

``xsm-cloudstack-extension ACTION JSON-FILE [TIMEOUT]``, as CloudStack's
management server runs it (see :mod:`xsm_driver.cloudstack.extension`).
It prints one JSON object on standard output and exits 0 on success, 1 on
failure (``{"error": "..."}``) and 2 when it is called wrongly. Logs go to
standard error (warnings only, unless ``XSM_EXTENSION_DEBUG=1``).
"""

import json
import logging
import os
import sys

from xsm_driver.cloudstack import extension

LOG = logging.getLogger(__name__)

PROG = 'xsm-cloudstack-extension'


def _emit(data):
    sys.stdout.write(json.dumps(data, sort_keys=True) + '\n')
    sys.stdout.flush()


def _timeout(text):
    try:
        value = int(float(text))
    except (TypeError, ValueError):
        return extension.DEFAULT_TIMEOUT
    return value if value > 0 else extension.DEFAULT_TIMEOUT


class _Clients:
    """``client(host)`` over the transport of the configuration's broker.

    Built on first use, so that an invocation refused before any agent is
    called (bad JSON, unknown action) needs no broker.
    """

    def __init__(self, conf_details, timeout):
        self.path = extension.config_file(conf_details)
        self.timeout = timeout
        self.transport = None
        self._clients = {}

    def _connect(self):
        from oslo_config import cfg

        from xsm_driver.cmd import agent as agent_cmd
        from xsm_driver.cmd import common
        from xsm_driver.cmd import migrate as migrate_cmd
        from xsm_driver.core.rpc import api as rpc_api
        if not os.path.exists(self.path):
            raise extension.ExtensionError(
                'no xsm-driver configuration at %s: set the extension (or '
                'host) detail xsm_config_file' % self.path)
        try:
            conf = agent_cmd.load_config(['--config-file', self.path], PROG)
        except cfg.Error as exc:
            raise extension.ExtensionError('%s: %s' % (self.path, exc))
        transport = rpc_api.get_transport(conf)
        try:
            migrate_cmd.check_broker(conf, conf.transport_url)
        except common.CommandError as exc:
            transport.cleanup()
            raise extension.ExtensionError(str(exc))
        self.transport = transport
        self.rpc_timeout = min(getattr(conf, 'rpc_response_timeout', 60),
                               self.timeout)

    def __call__(self, host):
        from xsm_driver.core.rpc import api as rpc_api
        if self.transport is None:
            self._connect()
        if host not in self._clients:
            self._clients[host] = rpc_api.AgentAPI(
                self.transport, host, timeout=self.rpc_timeout)
        return self._clients[host]

    def close(self):
        if self.transport is not None:
            self.transport.cleanup()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get('XSM_EXTENSION_DEBUG') == '1'
        else logging.WARNING, stream=sys.stderr,
        format='%(asctime)s %(levelname)s %(name)s %(message)s')
    if len(argv) < 2:
        _emit({'error': 'usage: %s ACTION JSON-FILE [TIMEOUT]' % PROG})
        return 2
    action, path = argv[0], argv[1]
    timeout = _timeout(argv[2] if len(argv) > 2 else None)
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        _emit({'error': 'cannot read the JSON file %s: %s'
               % (path, getattr(exc, 'strerror', None) or exc)})
        return 1
    made = []

    def factory(conf_details):
        clients = _Clients(conf_details, timeout)
        made.append(clients)
        return clients

    try:
        status, data = extension.answer(action, text, factory,
                                        timeout=timeout)
    finally:
        for clients in made:
            try:
                clients.close()
            except Exception as exc:      # never a traceback on stdout
                LOG.warning('closing the transport: %s', exc)
    _emit(data)
    return status


if __name__ == '__main__':
    sys.exit(main())
