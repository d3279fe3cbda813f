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

"""The demo's switch-over, run after run, with its per-step breakdown.

Runs ``xsm-migrate demo --json`` (a QEMU guest with two disks, its
in-guest verifier writing and checking, migrated between two in-process
hosts; see ``xsm_driver/cmd/demo.py``) ``--runs`` times, one after the
other, and keeps each run's JSON: ``downtime_ms`` (storage paused),
``qemu_downtime_ms`` (the VM stopped, by QEMU), the guest's longest
stall and ``switch_over_steps_ms``. Reported: every run, p50/p99 by
nearest rank of ``downtime_ms`` (issue 18's target: p99 <= 20 ms), and
the median of each step over the runs. A run whose demo exits non-zero
(the guest did not verify, something was left on the source) is kept and
counted as failed.

``python benchmarks/demo_bench.py --runs 3 --json OUT``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _common  # noqa: E402

TIMEOUT = 900


def demo_argv(extra=()):
    """``xsm-migrate demo --json``, run by this interpreter."""
    return [sys.executable, '-c', 'import sys; from xsm_driver.cmd.migrate '
            'import main; sys.exit(main())', 'demo', '--json'] + list(extra)


def parse_demo(text):
    """The demo's one JSON object (its last line that is one), or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def summarise(runs):
    """p50/p99 of the downtimes and the median of each step (pure)."""
    ok = [r for r in runs if r.get('result')]
    downs = [r['result'].get('downtime_ms') for r in ok]
    downs = [d for d in downs if d is not None]
    steps = {}
    for r in ok:
        for name, ms in (r['result'].get('switch_over_steps_ms') or
                         {}).items():
            steps.setdefault(name, []).append(ms)
    return {'runs': len(runs), 'failed': sum(1 for r in runs if r['rc']),
            'downtime_ms': downs,
            'p50_ms': _common.nearest_rank(downs, 50),
            'p99_ms': _common.nearest_rank(downs, 99),
            'qemu_downtime_ms': [r['result'].get('qemu_downtime_ms')
                                 for r in ok],
            'guest_stall_ms': [r['result'].get('guest_stall_ms')
                               for r in ok],
            'median_steps_ms': {k: _common.median(v)
                                for k, v in steps.items()},
            'steps_ms_runs': steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=3,
                   help='demo runs, one after the other (default 3)')
    p.add_argument('--guest', choices=('qemu', 'model'), default='qemu',
                   help='the demo\'s --guest (default qemu, its default)')
    p.add_argument('--json', metavar='OUT', help='write every run to OUT')
    a = p.parse_args(argv)
    if a.runs < 1:
        p.error('--runs must be >= 1, not %d' % a.runs)
    argv = demo_argv(['--guest', a.guest])
    runs = []
    for i in range(a.runs):
        t = time.monotonic()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=TOP,
                                  timeout=TIMEOUT)
            rc, out, err = (proc.returncode, proc.stdout.decode(
                'utf-8', 'replace'), proc.stderr.decode('utf-8', 'replace'))
        except subprocess.TimeoutExpired:
            rc, out, err = None, '', 'timed out after %d s' % TIMEOUT
        result = parse_demo(out)
        runs.append({'rc': rc, 'seconds': round(time.monotonic() - t, 1),
                     'loadavg': os.getloadavg(), 'result': result,
                     'stderr_tail': err[-2000:] if rc else ''})
        print('demo run %d/%d: exit %s, downtime %s ms, QEMU downtime %s ms, '
              'steps %s' % (i + 1, a.runs, rc,
                            (result or {}).get('downtime_ms'),
                            (result or {}).get('qemu_downtime_ms'),
                            (result or {}).get('switch_over_steps_ms')),
              file=sys.stderr, flush=True)
    summary = summarise(runs)
    print('xsm-migrate demo --guest %s, %d run(s), %d failed'
          % (a.guest, summary['runs'], summary['failed']))
    print('downtime ms (storage paused): %s; p50 %s, p99 %s (target p99 '
          '<= 20)' % (' '.join('%g' % d for d in summary['downtime_ms']),
                      summary['p50_ms'], summary['p99_ms']))
    print('QEMU downtime ms: %s; guest stall ms: %s' % (
        summary['qemu_downtime_ms'], summary['guest_stall_ms']))
    print('switch-over steps, median ms [runs]:')
    for name, ms in sorted(summary['median_steps_ms'].items(),
                           key=lambda kv: -(kv[1] or 0)):
        print('  %-20s %8.3f  [%s]' % (name, ms, ' '.join(
            '%g' % x for x in summary['steps_ms_runs'][name])))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump({'config': {'runs': a.runs, 'guest': a.guest,
                                  'argv': argv},
                       'machine': _common.machine(), 'runs': runs,
                       'summary': summary}, f, indent=1)
    return 1 if summary['failed'] or not summary['downtime_ms'] else 0


if __name__ == '__main__':
    sys.exit(main())
