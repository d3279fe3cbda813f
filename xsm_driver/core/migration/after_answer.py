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

"""Work a call leaves to after its answer has been sent.

The destination's commit answers first and makes the switch-over durable
afterwards (see :mod:`destination`). Started in a thread of its own while
the answer is still being sent, that work took the GIL and the CPUs from
the thread sending the answer: the source's guest stayed paused the
longer. Starting a thread costs too (``Thread.start`` waits until the new
thread runs), inside the pause.

An RPC server that knows when its answer is on its way wraps each call in
:func:`scope`: what the call :func:`defer`\\ s runs in the same thread, in
order, once the answer is sent. Outside a scope (a call made in-process, a
test) the work runs at once in a thread of its own, as before.
"""

import contextlib
import logging
import threading

LOG = logging.getLogger(__name__)

_local = threading.local()


class Later:
    """Work deferred by :func:`defer`; waitable as a thread is."""

    def __init__(self, func, name):
        self.name = name
        self._func = func
        self._done = threading.Event()

    def run(self):
        try:
            self._func()
        except Exception:
            LOG.exception('%s failed', self.name)
        finally:
            self._done.set()

    def is_alive(self):
        """True until the work has run (or failed)."""
        return not self._done.is_set()

    def join(self, timeout=None):
        """Wait for the work; True once it has run."""
        return self._done.wait(timeout)


@contextlib.contextmanager
def scope():
    """Run what the block defers once it ends (the answer is sent)."""
    outer = getattr(_local, 'pending', None)
    pending = _local.pending = []
    try:
        yield
    finally:
        _local.pending = outer
        for later in pending:
            later.run()


def defer(func, name):
    """Run ``func`` after this call's answer; a :class:`Later`.

    In a :func:`scope`: when the scope ends, in its thread. Outside one:
    now, in a new daemon thread named ``name``.
    """
    later = Later(func, name)
    pending = getattr(_local, 'pending', None)
    if pending is not None:
        pending.append(later)
    else:
        threading.Thread(target=later.run, daemon=True, name=name).start()
    return later
