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

"""``fake://`` without its polling: agents of one process, woken at once.

oslo.messaging's ``fake`` driver passes messages in memory, but its
listener looks at its queues every 50 ms and sleeps in between: each call
to an agent in the same process waits 0 to 50 ms (25 on average) before
it is even seen. The demo (``xsm-migrate demo``) and the in-process
benchmarks put both hosts on ``fake://``, so the switch-over's commit
round trip measured there was mostly that sleep (issue 18: 30 ms of a
64 ms pause), a cost no broker has.

:class:`LocalDriver` is the same driver (same queues, same messages, same
JSON check, same replies) whose listener waits on a condition that every
delivery notifies. :func:`api.get_transport` uses it for ``fake://``.
"""

import threading
import time

import oslo_messaging
from oslo_messaging._drivers import base
from oslo_messaging._drivers import impl_fake

#: notified on every delivery to any local exchange (and on a stop)
_DELIVERED = threading.Condition()


def _notify():
    with _DELIVERED:
        _DELIVERED.notify_all()


class LocalExchange(impl_fake.FakeExchange):
    """A fake exchange that wakes its listeners when a message arrives."""

    def deliver_message(self, topic, ctxt, message, server=None,
                        fanout=False, reply_q=None):
        super().deliver_message(topic, ctxt, message, server=server,
                                fanout=fanout, reply_q=reply_q)
        _notify()


class LocalExchangeManager(impl_fake.FakeExchangeManager):
    # (its own exchanges: the fake driver's are plain FakeExchanges)
    _exchanges_lock = threading.Lock()
    _exchanges = {}

    def get_exchange(self, name):
        if name is None:
            name = self._default_exchange
        with self._exchanges_lock:
            return self._exchanges.setdefault(name, LocalExchange(name))


class LocalListener(impl_fake.FakeListener):
    """Waits for a delivery instead of sleeping 50 ms between looks."""

    def __init__(self, exchange_manager, targets, pool=None):
        super().__init__(exchange_manager, targets, pool)
        self._stopped = threading.Event()

    def _take(self):
        for target in self._targets:
            exchange = self._exchange_manager.get_exchange(target.exchange)
            ctxt, message, reply_q, requeue = exchange.poll(target,
                                                            self._pool)
            if message is not None:
                return impl_fake.FakeIncomingMessage(ctxt, message, reply_q,
                                                     requeue)
        return None

    @base.batch_poll_helper
    def poll(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # under the condition: a delivery or a stop between the look
            # and the wait cannot be missed (each notifies under it)
            with _DELIVERED:
                if self._stopped.is_set():
                    return None
                message = self._take()
                if message is not None:
                    return message
                if deadline is None:
                    _DELIVERED.wait()
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    _DELIVERED.wait(left)

    def stop(self):
        self._stopped.set()
        _notify()


class LocalDriver(impl_fake.FakeDriver):
    """oslo.messaging's fake driver, its listeners woken by deliveries."""

    def __init__(self, conf, url, default_exchange=None,
                 allowed_remote_exmods=None):
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        self._exchange_manager = LocalExchangeManager(default_exchange)

    def listen(self, target, batch_size, batch_timeout):
        # (as FakeDriver.listen, with a LocalListener)
        exchange = target.exchange or self._default_exchange
        listener = LocalListener(
            self._exchange_manager,
            [oslo_messaging.Target(topic=target.topic, server=target.server,
                                   exchange=exchange),
             oslo_messaging.Target(topic=target.topic, exchange=exchange)])
        return base.PollStyleListenerAdapter(listener, batch_size,
                                             batch_timeout)

    def listen_for_notifications(self, targets_and_priorities, pool,
                                 batch_size, batch_timeout):
        targets = [oslo_messaging.Target(
            topic='%s.%s' % (target.topic, priority),
            exchange=target.exchange)
            for target, priority in targets_and_priorities]
        listener = LocalListener(self._exchange_manager, targets, pool)
        return base.PollStyleListenerAdapter(listener, batch_size,
                                             batch_timeout)
