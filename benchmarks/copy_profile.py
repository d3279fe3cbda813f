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

"""Where the CPU of a dense copy goes, in each agent: kernel, OpenSSL, Python.

Runs ``migration_bench.py --cases copy`` (idle dense and sparse copies
between two agent processes over TLS, the agents kept for the whole run
with ``--no-restart-agents``), waits until both agents are busy and the
benchmark itself is idle (the copy, not the agents' start-up nor the
making of the images), then samples every CPU with ``perf record -a -g``
for ``--seconds``. The samples of each agent process are then split by the
shared object of the sampled instruction (``[kernel.kallsyms]``,
``libcrypto``, ``libpython``, ``libc``...) and by symbol.

``perf`` is Linux's (Debian ``linux-perf``); run as root or with
``kernel.perf_event_paranoid`` <= 0. Python 3.11 has no perf trampoline,
so Python functions show as ``libpython`` (``py-spy record --native``
names them, at the cost of pausing the process for each sample).

Example::

    .venv/bin/python benchmarks/copy_profile.py --scale 1 --json out.json
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = 'xsm_driver.cmd.agent'
_HEAD = re.compile(r'(?:^|\s)(\d+)/(\d+)\s')
_FRAME = re.compile(r'^\t\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$')


def parse_perf_script(lines, pids):
    """Samples of ``pids`` from ``perf script -F comm,pid,tid,ip,sym,dso``.

    :returns: ``{pid: Counter((dso, symbol) of the sampled instruction)}``
        (the first frame of each stack); the other processes are left out.
    """
    pids = {str(p) for p in pids}
    out = {p: collections.Counter() for p in pids}
    pid, leaf = None, None
    for line in list(lines) + ['']:
        if not line.strip():
            if pid in out and leaf is not None:
                out[pid][leaf] += 1
            pid, leaf = None, None
            continue
        head = _HEAD.search(line)
        if head and not line.startswith('\t'):
            pid, leaf = head.group(1), None
            continue
        frame = _FRAME.match(line)
        if frame and pid is not None and leaf is None:
            leaf = (os.path.basename(frame.group(2)), frame.group(1))
    return out


def shares(counter, key=0, top=None):
    """``[(name, percent)]`` of a Counter of (dso, symbol) by ``key``.

    ``key`` 0: by shared object; 1: by symbol (``dso:symbol``).
    """
    total = sum(counter.values())
    if not total:
        return []
    by = collections.Counter()
    for (dso, sym), n in counter.items():
        by[dso if key == 0 else '%s:%s' % (dso, sym)] += n
    return [(name, 100.0 * n / total) for name, n in by.most_common(top)]


def _ticks(pid):
    """User + system clock ticks of a process (0 once it is gone)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _agents(parent):
    """Pids of the agent processes started by ``parent``."""
    found = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            with open('/proc/%s/cmdline' % name, 'rb') as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and AGENT.encode() in cmd:
            found.append(int(name))
    return sorted(found)


def _label(pid):
    """The agent's config file (host-a: the source of migration_bench)."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = f.read().decode(errors='replace').split('\0')
    except OSError:
        return '?'
    for i, arg in enumerate(argv[:-1]):
        if arg == '--config-file':
            return os.path.basename(os.path.dirname(argv[i + 1]))
    return '?'


def wait_for_copy(bench, settle, timeout, say):
    """The two agents' pids once they copy (busy while the bench idles)."""
    hz = os.sysconf('SC_CLK_TCK')
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if bench.poll() is not None:
            raise SystemExit('the benchmark ended before a copy was seen '
                             '(exit %s)' % bench.returncode)
        pids = _agents(bench.pid)
        if len(pids) < 2:
            time.sleep(0.2)
            continue
        before = sum(_ticks(p) for p in pids), _ticks(bench.pid)
        time.sleep(0.5)
        after = sum(_ticks(p) for p in pids), _ticks(bench.pid)
        busy = (after[0] - before[0]) / (0.5 * hz)
        idle = (after[1] - before[1]) / (0.5 * hz)
        if time.monotonic() - start >= settle and busy >= 1.0 and \
                idle <= 0.2:
            say('agents %s busy (%.1f CPUs), benchmark idle' % (pids, busy))
            return pids
    raise SystemExit('no copy seen within %s s' % timeout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--scale', default='1',
                    help='migration_bench --scale (default 1: 4 GiB dense)')
    ap.add_argument('--seconds', type=float, default=3.0,
                    help='seconds sampled (default 3)')
    ap.add_argument('--frequency', type=int, default=999,
                    help='samples per second per CPU (default 999)')
    ap.add_argument('--settle', type=float, default=12.0,
                    help='seconds after the agents start before sampling '
                    '(their start-up is busy too; default 12)')
    ap.add_argument('--timeout', type=float, default=600.0,
                    help='seconds to wait for the copy to start (default '
                    '600)')
    ap.add_argument('--top', type=int, default=15,
                    help='symbols listed per agent (default 15)')
    ap.add_argument('--json', metavar='OUT',
                    help='write the profile to OUT')
    args = ap.parse_args(argv)

    def say(text):
        print('copy_profile: %s' % text, file=sys.stderr, flush=True)

    work = tempfile.mkdtemp(prefix='copy-profile-')
    data = os.path.join(work, 'perf.data')
    cmd = [sys.executable, os.path.join(HERE, 'migration_bench.py'),
           '--cases', 'copy', '--scale', args.scale, '--runs', '1',
           '--load-rate', '0', '--no-fio', '--no-restart-agents',
           '--quiet', '--json', os.path.join(work, 'bench.json')]
    with open(os.path.join(work, 'bench.log'), 'w') as log:
        bench = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=os.path.dirname(HERE))
        try:
            pids = wait_for_copy(bench, args.settle, args.timeout, say)
            loads = os.getloadavg()
            labels = {pid: _label(pid) for pid in pids}
            subprocess.run(['perf', 'record', '-F', str(args.frequency),
                            '-g', '-a', '-o', data, '--', 'sleep',
                            str(args.seconds)], check=True,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            bench.wait()
        finally:
            if bench.poll() is None:
                bench.terminate()
                bench.wait()
    script = subprocess.run(['perf', 'script', '-i', data, '-F',
                             'comm,pid,tid,ip,sym,dso'], check=True,
                            capture_output=True, text=True).stdout
    samples = parse_perf_script(script.splitlines(), pids)
    result = {'load_average': loads, 'seconds': args.seconds,
              'frequency': args.frequency, 'workdir': work, 'agents': {}}
    for pid in pids:
        counter = samples[str(pid)]
        result['agents'][pid] = {'host': labels[pid],
                                 'samples': sum(counter.values()),
                                 'dso': shares(counter, 0),
                                 'symbols': shares(counter, 1, args.top)}
        print('agent %d (%s): %d samples (load average %.2f %.2f %.2f)'
              % ((pid, labels[pid], sum(counter.values())) + tuple(loads)))
        for name, pct in shares(counter, 0):
            print('  %5.1f%%  %s' % (pct, name))
        for name, pct in shares(counter, 1, args.top):
            print('      %5.1f%%  %s' % (pct, name))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    say('perf data and benchmark log in %s' % work)


if __name__ == '__main__':
    main()
