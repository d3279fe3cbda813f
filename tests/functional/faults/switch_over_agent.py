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

"""xsm-agent whose destination role can be held inside the switch-over.

``python -m tests.functional.faults.switch_over_agent ARGS`` is
``xsm-agent ARGS`` with two test-only holds in its destination role
(nothing of it is installed or reachable in production):

* ``complete``: a commit request arrived, the destination has not
  decided yet (before :meth:`destination.Receive.complete`);
* ``commit``: the commit is journaled, nothing else of the switch-over is
  done yet (:meth:`destination.Receive._finish` is about to run).

The test and the agent talk through files of the folder named by
``XSM_TEST_SWITCH_OVER_HOLD_DIR``: while ``hold-POINT`` exists, the
agent, reaching POINT, writes ``held-POINT`` (the migration id) and
waits (at most :data:`HOLD_LIMIT` seconds); then it goes on.
"""

import logging
import os
import sys
import time

from xsm_driver.cmd import agent as agent_cmd
from xsm_driver.core.migration import destination

LOG = logging.getLogger(__name__)

ENV = 'XSM_TEST_SWITCH_OVER_HOLD_DIR'
HOLD_LIMIT = 120
POINTS = {'complete': 'complete', 'commit': '_finish'}


def _hold(folder, point, mid):
    hold = os.path.join(folder, 'hold-' + point)
    if not os.path.exists(hold):
        return
    held = os.path.join(folder, 'held-' + point)
    LOG.warning('test hook: migration %s held at %s', mid, point)
    with open(held + '.tmp', 'w') as f:
        f.write(mid + '\n')
    os.replace(held + '.tmp', held)
    deadline = time.monotonic() + HOLD_LIMIT
    while os.path.exists(hold) and time.monotonic() < deadline:
        time.sleep(0.01)
    LOG.warning('test hook: migration %s released at %s', mid, point)


def install(folder):
    for point, name in POINTS.items():
        original = getattr(destination.Receive, name)

        def held(self, *args, _point=point, _original=original, **kwargs):
            _hold(folder, _point, self.id)
            return _original(self, *args, **kwargs)
        setattr(destination.Receive, name, held)


def main():
    install(os.environ[ENV])
    return agent_cmd.main()


if __name__ == '__main__':
    sys.exit(main())
