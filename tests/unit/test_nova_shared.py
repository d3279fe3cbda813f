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


"""The migration poller the two Nova suites share (tests/nova_shared)."""

import json
import threading
import time

from tests import base
from tests import nova_shared


class Response:
    def __init__(self, status_code, body):
        self.status_code, self.text = status_code, json.dumps(body)

    def json(self):
        return json.loads(self.text)


class TestMigrationPoller(base.TestCase):

    def test_problems_records_and_a_deleted_server(self):
        answers = {'/servers/s1/migrations': [
            Response(200, {'migrations': [{'id': 1}]}),
            Response(404, {'itemNotFound': {}})],
            '/os-migrations': [Response(400, {'badRequest': 'x'}),
                               Response(200, {'migrations': []}),
                               Response(200, {'migrations': []})]}
        asked = []

        def get(url):
            asked.append(url)
            return answers[url].pop(0)
        poller = nova_shared.MigrationPoller(get, 's1', 60, prefix='/')
        poller.poll_once()
        self.assertEqual([{'id': 1}], poller.seen)
        problem = 'GET /os-migrations: 400 {"badRequest": "x"}'
        self.assertEqual([problem], poller.problems)
        # the server is gone: its URL is polled no more, nor a problem
        poller.poll_once()
        poller.poll_once()
        self.assertEqual(['/servers/s1/migrations', '/os-migrations'] * 2 +
                         ['/os-migrations'], asked)
        self.assertEqual([problem], poller.problems)

    def test_the_thread_polls_until_stopped_and_goes_on_after_errors(self):
        calls = []
        polled = threading.Event()

        def get(url):
            calls.append(url)
            if len(calls) >= 4:
                polled.set()
            if len(calls) == 1:
                raise ConnectionError('refused')
            return Response(200, {'migrations': []})
        poller = nova_shared.MigrationPoller(get, 's1', 0.01).start()
        self.assertTrue(polled.wait(30))
        self.assertEqual(["GET: ConnectionError('refused')"],
                         poller.stop(30))
        stopped = len(calls)
        time.sleep(0.05)
        self.assertEqual(stopped, len(calls))
