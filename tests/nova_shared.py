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


"""What the two Nova suites share (tests/nova_functional: nova's own
harness in this process; tests/nova_deployment: nova's services as
processes)."""

import threading


def assert_verified(test, result):
    """``result``, an agent's ``guest_verify`` of a QEMU guest, is clean.

    The guest wrote, every block it wrote was read back and compared,
    and nothing mismatched or failed.
    """
    test.assertEqual('qemu', result['kind'], result)
    test.assertTrue(result['verified'], result)
    test.assertGreater(result['writes'], 0, result)
    test.assertGreater(result['blocks_checked'], 0, result)
    test.assertEqual(0, result['mismatches'], result)
    test.assertEqual(0, result['io_errors'], result)
    return result


class MigrationPoller:
    """GETs of nova's migration APIs in a thread, until :meth:`stop`.

    :param get: ``get(url)`` -> a response with ``status_code``, ``text``
        and ``json()``: a GET at the newest microversion, which nova-api
        validates against its schemas ([api]response_validation = error:
        a field the schema refuses answers 400).
    :param server_id: the server whose ``servers/{id}/migrations`` is
        polled, besides ``os-migrations``.
    :param prefix: what the URLs start with (``''`` or ``'/'``).

    Every answer but a 200 is a problem, except a 404 of the server's
    URL: the test deleted the server, which is no longer polled.
    ``seen`` gets the records of the server's migrations.
    """

    def __init__(self, get, server_id, interval, prefix=''):
        self.get, self.interval = get, interval
        self.server_url = '%sservers/%s/migrations' % (prefix, server_id)
        self.urls = [self.server_url, prefix + 'os-migrations']
        self.problems, self.seen = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def poll_once(self):
        for url in list(self.urls):
            resp = self.get(url)
            if resp.status_code == 404 and url == self.server_url:
                self.urls.remove(url)
            elif resp.status_code != 200:
                self.problems.append('GET %s: %s %s' % (
                    url, resp.status_code, resp.text[:500]))
            elif url == self.server_url:
                self.seen.extend(resp.json()['migrations'])

    def _poll(self):
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:        # keep polling; report it
                self.problems.append('GET: %r' % exc)
            self._stop.wait(self.interval)

    def stop(self, timeout):
        """Stop, poll once more; the first five problems."""
        self._stop.set()
        self._thread.join(timeout)
        self.poll_once()
        return self.problems[:5]
