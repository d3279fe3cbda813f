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

"""``fake://`` through :mod:`xsm_driver.core.rpc.local`: no polling.

Real oslo.messaging RPC servers and clients on the transport
:func:`api.get_transport` makes of ``fake://``.
"""

import threading
import time

from oslo_config import cfg
import oslo_messaging as messaging

from tests import base
from xsm_driver.core.rpc import agent as agent_mod
from xsm_driver.core.rpc import api
from xsm_driver.core.rpc import local


class _Echo:
    target = messaging.Target(version='1.0')

    def echo(self, ctxt, value):
        return {'value': value, 'thread': threading.current_thread().name}


class TestLocalTransport(base.TestCase):

    def setUp(self):
        super().setUp()
        self.transport = api.get_transport(cfg.ConfigOpts(), url='fake://')
        self.addCleanup(self.transport.cleanup)

    def test_fake_url_is_the_local_driver(self):
        self.assertIsInstance(self.transport._driver, local.LocalDriver)
        # still oslo.messaging's in-process transport for the agent (no
        # identity needed there)
        self.assertTrue(agent_mod._in_process(self.transport))

    def test_rabbit_url_is_not(self):
        transport = api.get_transport(
            cfg.ConfigOpts(), url='rabbit://guest:guest@127.0.0.1:5672/')
        self.addCleanup(transport.cleanup)
        self.assertNotIsInstance(transport._driver, local.LocalDriver)
        self.assertFalse(agent_mod._in_process(transport))

    def _server(self, topic, name):
        server = messaging.get_rpc_server(
            self.transport, messaging.Target(topic=topic, server=name),
            [_Echo()], executor='threading')
        server.start()

        def stop():
            server.stop()
            server.wait()
        self.addCleanup(stop)
        return server

    def test_calls_are_answered(self):
        self._server('t-local', 'h1')
        client = messaging.get_rpc_client(
            self.transport, messaging.Target(topic='t-local', server='h1'),
            timeout=30)
        for i in range(20):
            self.assertEqual(i, client.call({}, 'echo', value=i)['value'])

    def test_every_call_seen_without_a_poll_interval(self):
        # oslo.messaging's fake listener sleeps 50 ms between two looks
        # at its queues: 20 calls in a row waited 0.5 s on average. Here
        # each wakes the listener; the bound is loose (a loaded machine)
        # but below what the polling needs on average.
        self._server('t-fast', 'h1')
        client = messaging.get_rpc_client(
            self.transport, messaging.Target(topic='t-fast', server='h1'),
            timeout=30)
        client.call({}, 'echo', value=0)
        calls = 20
        start = time.monotonic()
        for i in range(calls):
            client.call({}, 'echo', value=i)
        self.assertLess(time.monotonic() - start, calls * 0.025)

    def test_poll_times_out_empty(self):
        listener = local.LocalListener(
            self.transport._driver._exchange_manager,
            [messaging.Target(topic='t-empty', server='h1')])
        start = time.monotonic()
        self.assertEqual([], listener.poll(timeout=0.1))
        self.assertGreaterEqual(time.monotonic() - start, 0.09)

    def test_a_waiting_poll_gets_a_delivery(self):
        driver = self.transport._driver
        target = messaging.Target(topic='t-wait', server='h1',
                                  exchange='x-wait')
        listener = local.LocalListener(driver._exchange_manager, [target])
        got = []
        poller = threading.Thread(
            target=lambda: got.extend(listener.poll(timeout=30)))
        poller.start()
        time.sleep(0.05)
        driver._exchange_manager.get_exchange('x-wait').deliver_message(
            't-wait', {}, {'method': 'm'}, server='h1')
        poller.join(30)
        self.assertFalse(poller.is_alive())
        self.assertEqual([{'method': 'm'}], [m.message for m in got])

    def test_stop_wakes_a_waiting_poll(self):
        listener = local.LocalListener(
            self.transport._driver._exchange_manager,
            [messaging.Target(topic='t-stop', server='h1')])
        got = []
        poller = threading.Thread(
            target=lambda: got.append(listener.poll(timeout=None)))
        poller.start()
        time.sleep(0.05)
        listener.stop()
        poller.join(30)
        self.assertFalse(poller.is_alive())
        self.assertEqual([[]], got)

    def test_a_stop_just_before_the_wait_is_not_missed(self):
        """A stop between the poll's look at it and its wait ends it."""
        listener = local.LocalListener(
            self.transport._driver._exchange_manager,
            [messaging.Target(topic='t-race', server='h1')])
        stopped = listener._stopped
        looked = []

        class Racing(threading.Event):
            def is_set(self):
                answer = stopped.is_set()
                if not looked:
                    # another thread stops the listener right after this
                    # look (given 0.2 s to get through, if it can)
                    looked.append(True)
                    stopper = threading.Thread(target=listener.stop)
                    stopper.start()
                    stopper.join(0.2)
                return answer
        listener._stopped = racing = Racing()
        racing.set = stopped.set
        got = []
        poller = threading.Thread(
            target=lambda: got.append(listener.poll(timeout=None)),
            daemon=True)
        poller.start()
        poller.join(10)
        if poller.is_alive():
            listener._stopped = stopped
            local._notify()             # (free the hung poll)
        self.assertFalse(poller.is_alive(), 'the poll missed the stop')
        self.assertEqual([[]], got)
