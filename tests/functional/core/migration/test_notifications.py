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

"""The agents' progress notifications, heard on the real RabbitMQ.

A listener on the test's exchange, topic ``xsm_notifications``, as a
monitoring service would have one, while two ``xsm-agent`` processes move
a VM at a limited rate.
"""

import signal
import threading
import time

import oslo_messaging as messaging

from tests.functional.core.migration import fixtures
from xsm_driver.core import rpc

MiB = fixtures.MiB
PROGRESS = 'xsm.migration.progress'
END = 'xsm.migration.end'
#: seconds between two progress notifications of the agents
INTERVAL = 0.2


class Recorder:
    """A notification endpoint that keeps what it hears."""

    def __init__(self):
        self.heard = []
        self.changed = threading.Condition()

    def _keep(self, priority, publisher_id, event_type, payload):
        with self.changed:
            self.heard.append((priority, publisher_id, event_type, payload))
            self.changed.notify_all()

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self._keep('info', publisher_id, event_type, payload)

    def warn(self, ctxt, publisher_id, event_type, payload, metadata):
        self._keep('warn', publisher_id, event_type, payload)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        self._keep('error', publisher_id, event_type, payload)

    def wait_for(self, predicate, timeout):
        """Wait until ``predicate(heard)``; what was heard by then."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.heard):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return list(self.heard)


class TestProgressNotifications(fixtures.RabbitAgentsFixture):

    def agent_options(self, role):
        return {'progress_interval': INTERVAL}

    def setUp(self):
        super().setUp()
        self.addCleanup(self._stop_agents_together)
        self.recorder = Recorder()
        # a queue of this test only (the pool), bound to this test's
        # exchange: parallel tests and earlier runs never share it
        pool = 'xsm-notifications-%s' % self.token
        # the agents' notifier declares the default queue of the topic
        # too (xsm_notifications.info, which nobody reads here): remove it
        # with ours, or it keeps every notification of every run
        self.addCleanup(fixtures._delete_from_broker,
                        [pool, '%s.info' % rpc.NOTIFICATION_TOPIC],
                        self.exchange)
        transport = messaging.get_notification_transport(
            self.client_conf(), url=fixtures.RABBIT_URL)
        self.addCleanup(transport.cleanup)
        self.listener = messaging.get_notification_listener(
            transport, [messaging.Target(topic=rpc.NOTIFICATION_TOPIC)],
            [self.recorder], executor='threading', pool=pool)
        self.listener.start()
        self.addCleanup(self._stop_listener)

    def _stop_agents_together(self):
        # before the fixture's stops, which take them one after the other
        for agent in self.agents.values():
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            agent.stop()

    def _stop_listener(self):
        self.listener.stop()
        self.listener.wait()

    def of(self, heard, mid, event_type=None):
        return [h for h in heard if h[3].get('id') == mid and
                (event_type is None or h[2] == event_type)]

    def test_progress_then_one_end(self):
        vm = self.a.vm_create('vm-%s' % self.token,
                              [{'sr': 'sr-a', 'size': 8 * MiB}],
                              vifs=['net0'])
        self.a.vm_start(vm['uuid'])
        self.a.guest_start(vm['uuid'], rate=100, fill=1.0)
        # 8 MiB at 4 MiB/s: about 2 s of copying
        mid = self.a.migrate_vm(vm['uuid'], self.agents['b'].name,
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'}, bandwidth=4 * MiB)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'], self.logs())
        took = status['finished'] - status['started']
        self.assertGreater(took, 1.0, status)

        heard = self.recorder.wait_for(
            lambda h: self.of(h, mid, END), timeout=10)
        # a few more intervals: a second end notification would come now
        time.sleep(5 * INTERVAL)
        heard = self.recorder.wait_for(lambda h: False, timeout=0)
        mine = self.of(heard, mid)
        self.assertTrue(mine, 'no notification about migration %s; heard: '
                        '%s%s' % (mid, heard, self.logs()))

        publisher = 'xsm-agent.%s' % self.agents['a'].name
        for priority, publisher_id, event_type, payload in mine:
            self.assertEqual('info', priority)
            self.assertEqual(publisher, publisher_id)
            self.assertIn(event_type, (PROGRESS, END))
            self.assertEqual(vm['uuid'], payload['vm'])
            self.assertIn('phase', payload)
            self.assertIn('progress', payload)

        progress = [p for _, _, e, p in mine if e == PROGRESS]
        ends = [p for _, _, e, p in mine if e == END]
        # one every INTERVAL while it ran: several, and at least one while
        # copying, with the copy's figures
        self.assertGreaterEqual(len(progress), 2, [p['phase'] for p in
                                                   progress])
        copying = [p for p in progress if p['phase'] == 'copy']
        self.assertTrue(copying, [p['phase'] for p in progress])
        self.assertTrue(any(0 < p['progress']['done'] <
                            p['progress']['total'] for p in copying),
                        [p['progress'] for p in copying])
        for p in progress:
            self.assertIsNone(p['finished'])
            self.assertNotIn(p['phase'], ('done', 'aborted'))
        # (the listener's threads may hand them over out of order: sort
        # them by when the agent took them)
        progress.sort(key=lambda p: p['time'])
        done = [p['progress']['done'] for p in progress]
        self.assertEqual(sorted(done), done)

        self.assertEqual(1, len(ends), ends)
        end = ends[0]
        self.assertEqual('done', end['phase'])
        self.assertIsNone(end['error'])
        self.assertIsNotNone(end['finished'])
        self.assertEqual(status['bytes_copied'], end['bytes_copied'])
        self.assertEqual(status['downtime_ms'], end['downtime_ms'])
        # the end is the last word about it
        self.assertGreaterEqual(end['progress']['elapsed_s'],
                                progress[-1]['progress']['elapsed_s'])
        self.assertGreaterEqual(end['progress']['done'], done[-1])
        # the destination publishes nothing about it
        self.assertEqual([], [h for h in heard if h[1] != publisher])
