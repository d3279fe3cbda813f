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

"""Work a call defers runs after its answer (:mod:`after_answer`)."""

import gc
import threading

import fixtures
from oslo_config import cfg
import oslo_messaging as messaging

from tests import base
from xsm_driver.core.migration import after_answer
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api


class TestDefer(base.TestCase):

    def test_outside_a_scope_it_runs_now_in_a_thread(self):
        ran = []
        later = after_answer.defer(
            lambda: ran.append(threading.current_thread().name), 'xsm-t1')
        self.assertTrue(later.join(10))
        self.assertFalse(later.is_alive())
        self.assertEqual(['xsm-t1'], ran)

    def test_in_a_scope_it_runs_at_its_end_in_order_in_its_thread(self):
        ran = []
        me = threading.current_thread()
        with after_answer.scope():
            def note(name):
                return lambda: ran.append(
                    (name, threading.current_thread() is me))
            first = after_answer.defer(note('a'), 'a')
            after_answer.defer(note('b'), 'b')
            self.assertEqual([], ran)
            self.assertTrue(first.is_alive())
            self.assertFalse(first.join(0.01))
        self.assertEqual([('a', True), ('b', True)], ran)
        self.assertFalse(first.is_alive())

    def test_a_failure_is_logged_and_the_rest_still_runs(self):
        logger = self.useFixture(fixtures.FakeLogger(
            name='xsm_driver.core.migration.after_answer'))
        ran = []

        def fail():
            raise RuntimeError('boom')
        with after_answer.scope():
            failed = after_answer.defer(fail, 'failing')
            after_answer.defer(lambda: ran.append(1), 'next')
        self.assertFalse(failed.is_alive())
        self.assertEqual([1], ran)
        self.assertIn('failing failed', logger.output)

    def test_scopes_nest(self):
        ran = []
        with after_answer.scope():
            with after_answer.scope():
                after_answer.defer(lambda: ran.append('inner'), 'i')
            self.assertEqual(['inner'], ran)
            after_answer.defer(lambda: ran.append('outer'), 'o')
            self.assertEqual(['inner'], ran)
        self.assertEqual(['inner', 'outer'], ran)


class _Endpoint:
    target = messaging.Target(version='1.0')

    def __init__(self, test):
        self.test = test
        self.seen = {}
        self.answered = threading.Event()

    def _call(self, name):
        me = threading.current_thread()
        self.seen[name + '_gc'] = gc.isenabled()

        def later():
            self.seen[name + '_same_thread'] = (
                threading.current_thread() is me)
            # the caller has had its answer before this runs
            self.seen[name + '_after_answer'] = self.answered.wait(10)
            self.seen[name + '_gc_after'] = gc.isenabled()
        self.seen[name + '_later'] = after_answer.defer(later, name)
        return name

    def receive_complete(self, ctxt):
        return self._call('receive_complete')

    def receive_status(self, ctxt):
        return self._call('receive_status')


class TestServer(base.TestCase):
    """The agent's RPC server: deferred work after the answer is sent."""

    def setUp(self):
        super().setUp()
        self.transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
        self.addCleanup(self.transport.cleanup)
        self.endpoint = _Endpoint(self)
        server = messaging.get_rpc_server(
            self.transport, messaging.Target(topic='t-after', server='h1'),
            [self.endpoint], executor='threading',
            server_cls=agent_mod._Server)
        server.start()
        server.spawn_workers()
        self.server = server

        def stop():
            server.stop()
            server.wait()
        self.addCleanup(stop)
        self.client = messaging.get_rpc_client(
            self.transport, messaging.Target(topic='t-after', server='h1'),
            timeout=30)
        self.assertTrue(gc.isenabled())

    def _call(self, name):
        self.assertEqual(name, self.client.call({}, name))
        self.endpoint.answered.set()
        later = self.endpoint.seen[name + '_later']
        self.assertTrue(later.join(10))
        return self.endpoint.seen

    def test_the_commit_settles_after_its_answer_without_gc(self):
        seen = self._call('receive_complete')
        # no collection from dispatch to the answer's sending
        self.assertFalse(seen['receive_complete_gc'])
        # the deferred work ran in the call's thread, after the answer,
        # with the collector back on
        self.assertTrue(seen['receive_complete_same_thread'])
        self.assertTrue(seen['receive_complete_after_answer'])
        self.assertTrue(seen['receive_complete_gc_after'])
        self.assertTrue(gc.isenabled())

    def test_other_calls_do_not_hold_the_collector(self):
        seen = self._call('receive_status')
        self.assertTrue(seen['receive_status_gc'])
        self.assertTrue(seen['receive_status_same_thread'])
        self.assertTrue(seen['receive_status_after_answer'])

    def test_the_worker_threads_start_with_the_server(self):
        # not one per call (Thread.start inside a commit's round trip)
        executor = self.server._work_executor
        self.assertGreater(executor._max_workers, 1)
        self.assertEqual(executor._max_workers, len(executor._workers))
        self._call('receive_status')
        self.assertEqual(executor._max_workers, len(executor._workers))
