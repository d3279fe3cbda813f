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

"""No garbage collection inside the switch-over's pause.

CPython's cyclic collector stops every thread of the process while it
runs; a full collection of an agent (tens of thousands of objects) took
15 to 50 ms on a busy 2-CPU machine, more than the whole pause is allowed.
:func:`held` keeps it from starting while a pause is under way in this
process; it runs at the next allocation after the last hold ends, if it
is due by then. Holds nest and may be taken by several threads at once
(both halves of a move between two SRs of one host).
"""

import contextlib
import gc
import threading

_lock = threading.Lock()
_holders = 0
_was_enabled = False


@contextlib.contextmanager
def held():
    """No automatic collection in this process within the block."""
    global _holders, _was_enabled
    with _lock:
        if not _holders:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if not _holders and _was_enabled:
                gc.enable()
