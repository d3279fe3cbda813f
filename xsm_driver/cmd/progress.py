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

"""Progress and results of a migration, as ``xsm-migrate`` and its demo
print them."""

import json
import sys
import time


def human(n):
    """``n`` bytes for people: ``1.5 KiB``, ``16.0 MiB``."""
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if abs(n) < 1024 or unit == 'TiB':
            return ('%.1f %s' % (n, unit)) if unit != 'B' else '%d B' % n
        n /= 1024.0


def progress_line(status, width=30):
    """One line for a terminal: phase, bar, %, rate, ETA."""
    prog = status.get('progress') or {}
    pct = prog.get('percent') or 0.0
    filled = int(width * pct / 100)
    eta = prog.get('eta_s')
    return '%-14s [%s%s] %5.1f%% %10s/s ETA %s' % (
        status['phase'], '#' * filled, '.' * (width - filled), pct,
        human(prog.get('rate_bytes_per_s') or 0),
        '--' if eta is None else '%ds' % eta)


class Follower:
    """Print a migration's progress until it ends."""

    def __init__(self, out=sys.stdout, quiet=False):
        self.out = out
        self.tty = out.isatty() and not quiet
        self.quiet = quiet
        self._phase = None

    def update(self, status):
        if self.quiet:
            return
        if self.tty:
            self.out.write('\r' + progress_line(status))
            self.out.flush()
        elif status['phase'] != self._phase:
            self.out.write('%s: %s\n' % (status['id'][:8], status['phase']))
            self.out.flush()
        self._phase = status['phase']

    def end(self):
        if self.tty:
            self.out.write('\n')


def follow(get, mid, follower, interval=0.2):
    """Poll ``get(mid)`` until the migration's run ends; its status.

    The end is ``finished``: a source says ``done`` or ``aborted`` a few
    milliseconds before, while it still lets go of what it held.
    """
    while True:
        status = get(mid)
        follower.update(status)
        if status.get('finished') is not None:
            follower.end()
            return status
        time.sleep(interval)


def print_result(status, as_json):
    if as_json:
        print(json.dumps(status, sort_keys=True))
        return
    if status['phase'] == 'done':
        prog = status['progress']
        print('migration %s done: %s copied in %.1f s, downtime %s ms'
              % (status['id'], human(prog['done']), prog['elapsed_s'],
                 status['downtime_ms']))
    else:
        print('migration %s %s: %s' % (status['id'], status['phase'],
                                       status['error']))
