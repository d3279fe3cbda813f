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

"""xsm-agent with a test-only hook that holds a migration in a phase.

``python -m tests.functional.faults.hooked_agent ARGS`` is
``xsm-agent ARGS`` whose :class:`~xsm_driver.core.migration.manager.Manager`
has a :class:`PhaseHold` as its ``phase_hook`` (the engine's own hook,
given to every source migration). It lives in the tests, not in the
engine: nothing of it is installed or reachable in production.

The test and the agent talk through files of one folder
(``XSM_TEST_PHASE_HOLD_DIR``), which both see whatever their network
namespaces:

* the test writes ``hold``: ``PHASE [N]`` -- hold the migration the N-th
  time (default 1) it enters ``PHASE``;
* the agent, holding, writes ``held`` (``MIGRATION-ID PHASE``) and waits
  until ``hold`` is gone; then it removes ``held`` and goes on.

The hook runs in the migration's own thread, right after the phase is
journaled and before the phase's work begins (see ``source.Migration.
_set_phase``). Never hold ``preflight``: it runs inside the RPC call that
starts the migration.
"""

import collections
import logging
import os
import sys
import time

from xsm_driver.cmd import agent as agent_cmd
from xsm_driver.core.migration import manager

LOG = logging.getLogger(__name__)

ENV = 'XSM_TEST_PHASE_HOLD_DIR'
#: seconds a migration is held at most, whatever the test does
HOLD_LIMIT = 120


class PhaseHold:
    """``phase_hook(migration, phase)`` that holds where the test asks."""

    def __init__(self, folder):
        self.hold = os.path.join(folder, 'hold')
        self.held = os.path.join(folder, 'held')
        self._seen = collections.Counter()

    def wanted(self):
        try:
            with open(self.hold) as f:
                words = f.read().split()
        except FileNotFoundError:
            return None
        if not words:
            return None
        return words[0], int(words[1]) if len(words) > 1 else 1

    def __call__(self, migration, phase):
        self._seen[migration.id, phase] += 1
        if self.wanted() != (phase, self._seen[migration.id, phase]):
            return
        LOG.warning('test hook: migration %s held in phase %s',
                    migration.id, phase)
        tmp = self.held + '.tmp'
        with open(tmp, 'w') as f:
            f.write('%s %s\n' % (migration.id, phase))
        os.replace(tmp, self.held)
        deadline = time.monotonic() + HOLD_LIMIT
        while os.path.exists(self.hold) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.remove(self.held)
        LOG.warning('test hook: migration %s released in phase %s',
                    migration.id, phase)


def install(folder):
    """Give every Manager made from now on a :class:`PhaseHold`."""
    init = manager.Manager.__init__

    def hooked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.phase_hook = PhaseHold(folder)

    manager.Manager.__init__ = hooked_init


def main():
    install(os.environ[ENV])
    return agent_cmd.main()


if __name__ == '__main__':
    sys.exit(main())
