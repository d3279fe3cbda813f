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

"""xsm-migrate without a broker: its options, its output, its errors."""

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from unittest import mock

from tests import base
from xsm_driver.cmd import common
from xsm_driver.cmd import demo
from xsm_driver.cmd import migrate
from xsm_driver.cmd import progress

MiB = 1 << 20
GiB = 1 << 30

#: seconds an operator may wait for xsm-migrate to give up on a dead broker
DEAD_BROKER_PATIENCE = 15


def _parse_fails(argv):
    """Parse ``argv``; the exit status and stderr of the failure."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            migrate.build_parser().parse_args(argv)
        except SystemExit as exc:
            return exc.code, err.getvalue()
    raise AssertionError('%s was accepted' % (argv,))


def _status(phase='copy', percent=50.0, rate=2 * MiB, eta=12, **extra):
    status = {'id': '0123456789abcdef-rest-of-the-uuid', 'phase': phase,
              'progress': {'percent': percent, 'rate_bytes_per_s': rate,
                           'eta_s': eta, 'done': 8 * MiB,
                           'elapsed_s': 1.5},
              'finished': None, 'error': None, 'downtime_ms': None}
    status.update(extra)
    return status


class TtyStream(io.StringIO):
    def isatty(self):
        return True


class TestArguments(base.TestCase):

    VM = ['vm', '--vm', 'vm-1', '--to-host', 'host-b']

    def test_vdi_and_vif_maps(self):
        args = migrate.build_parser().parse_args(
            self.VM + ['--vdi-map', 'v1=sr-b', '--vdi-map', 'v2=raw-b',
                       '--vif-map', 'net0=net1', '--bandwidth', '1.5M'])
        self.assertEqual({'v1': 'sr-b', 'v2': 'raw-b'}, dict(args.vdi_map))
        self.assertEqual({'net0': 'net1'}, dict(args.vif_map))
        self.assertEqual(1572864, args.bandwidth)
        self.assertEqual('vm-1', args.vm)
        self.assertEqual('host-b', args.to_host)
        self.assertIs(migrate.cmd_vm, args.func)
        self.assertFalse(args.json)
        self.assertFalse(args.no_wait)
        self.assertFalse(args.copy)
        self.assertEqual(60, args.rpc_timeout)

    def test_a_mapping_value_may_hold_an_equal_sign(self):
        args = migrate.build_parser().parse_args(
            self.VM + ['--vdi-map', 'v1=sr=odd'])
        self.assertEqual([('v1', 'sr=odd')], args.vdi_map)

    def test_sizes(self):
        parser = migrate.build_parser()
        for text, size in (('1048576', MiB), ('512K', 512 << 10),
                           ('1G', GiB), ('16M', 16 * MiB)):
            args = parser.parse_args(['vdi', '--vdi', 'v', '--to-sr', 's',
                                      '--bandwidth', text])
            self.assertEqual(size, args.bandwidth, text)
        # the demo's defaults depend on its guest (a QEMU one by default)
        args = parser.parse_args(['demo'])
        self.assertEqual('qemu', args.guest)
        self.assertIsNone(args.size)
        for guest, size, rate in (('qemu', 64 * MiB, 100),
                                  ('model', 256 * MiB, 200)):
            args = parser.parse_args(['demo', '--guest', guest])
            demo.check_args(args)
            self.assertEqual((size, rate), (args.size, args.write_rate),
                             guest)
        self.assertEqual(16 * MiB, parser.parse_args(
            ['demo', '--size', '16M']).size)

    def test_demo_guest_kit(self):
        given, configured, checkout = (self.make_tempdir() for _ in range(3))
        for folder in (given, configured, checkout):
            for name in demo.KIT_FILES:
                open(os.path.join(folder, name), 'w').close()
        # --guest-kit first, then [hypervisor]guest_kit, then the checkout's
        self.assertEqual(given, demo.find_guest_kit(given, configured,
                                                    checkout))
        self.assertEqual(configured, demo.find_guest_kit(None, configured,
                                                         checkout))
        os.unlink(os.path.join(configured, 'initramfs.cpio.gz'))
        self.assertEqual(checkout, demo.find_guest_kit(None, configured,
                                                       checkout))
        # a --guest-kit that is no kit is an error, whatever else exists
        exc = self.assertRaises(common.CommandError, demo.find_guest_kit,
                                configured, None, checkout)
        self.assertIn('no guest kit (vmlinuz and initramfs.cpio.gz) in %s:'
                      % configured, str(exc))
        os.unlink(os.path.join(checkout, 'vmlinuz'))
        exc = self.assertRaises(common.CommandError, demo.find_guest_kit,
                                None, configured, checkout)
        self.assertIn('in %s nor %s: build one with tools/guest-kit/build.sh'
                      % (configured, checkout), str(exc))
        self.assertIn('--guest model', str(exc))

    def test_bad_mappings_exit_2_naming_the_value(self):
        for bad in ('v1', 'v1=', '=sr-b', ''):
            code, err = _parse_fails(self.VM + ['--vdi-map', bad])
            self.assertEqual(2, code, bad)
            self.assertIn('argument --vdi-map: %r is not KEY=VALUE' % bad,
                          err)
            self.assertIn('usage: xsm-migrate vm', err)
        code, err = _parse_fails(self.VM + ['--vdi-map', 'v=s', '--vif-map',
                                            'net0'])
        self.assertEqual(2, code)
        self.assertIn("argument --vif-map: 'net0' is not KEY=VALUE", err)

    def test_bad_sizes_exit_2_naming_the_value(self):
        for argv, bad in (
                (['vdi', '--vdi', 'v', '--to-sr', 's', '--bandwidth', 'fast'],
                 'fast'),
                (['vdi', '--vdi', 'v', '--to-sr', 's', '--bandwidth', '0'],
                 '0'),
                (['vdi', '--vdi', 'v', '--to-sr', 's', '--bandwidth=-1M'],
                 '-1M'),
                (self.VM + ['--vdi-map', 'v=s', '--bandwidth', '10 MB/s'],
                 '10 MB/s'),
                (['demo', '--size', '12Q'], '12Q')):
            code, err = _parse_fails(argv)
            self.assertEqual(2, code, argv)
            self.assertIn('%r is not a size' % bad, err)
            self.assertIn('xsm-migrate %s: error: argument' % argv[0], err)

    def test_required_arguments(self):
        code, err = _parse_fails(['vm', '--vm', 'x', '--to-host', 'b'])
        self.assertEqual(2, code)
        self.assertIn('--vdi-map', err)
        code, err = _parse_fails([])
        self.assertEqual(2, code)
        self.assertIn('command', err)
        code, err = _parse_fails(['show'])
        self.assertEqual(2, code)
        self.assertIn('id', err)


class TestProgressLine(base.TestCase):

    def test_phase_bar_percent_rate_eta(self):
        line = progress.progress_line(_status())
        self.assertEqual('copy           [%s%s]  50.0%%    2.0 MiB/s ETA 12s'
                         % ('#' * 15, '.' * 15), line)

    def test_no_eta_yet(self):
        line = progress.progress_line(_status(phase='snapshot', percent=0.0,
                                              rate=0, eta=None))
        self.assertTrue(line.startswith('snapshot       [' + '.' * 30 + ']'),
                        line)
        self.assertIn('  0.0%', line)
        self.assertIn(' 0 B/s', line)
        self.assertTrue(line.endswith('ETA --'), line)

    def test_no_progress_at_all(self):
        # before the copy starts a status may have no progress
        for prog in (None, {}):
            line = progress.progress_line({'phase': 'preflight',
                                           'progress': prog})
            self.assertEqual('preflight      [%s]   0.0%%        0 B/s '
                             'ETA --' % ('.' * 30), line)

    def test_full_bar_and_width(self):
        line = progress.progress_line(_status(phase='done', percent=100.0,
                                              rate=3 * GiB, eta=0), width=10)
        self.assertIn('[##########] 100.0%', line)
        self.assertIn('3.0 GiB/s', line)
        self.assertTrue(line.endswith('ETA 0s'), line)

    def test_partial_cells_round_down(self):
        line = progress.progress_line(_status(percent=99.9), width=10)
        self.assertIn('[#########.]  99.9%', line)

    def test_human_sizes(self):
        self.assertEqual('0 B', progress.human(0))
        self.assertEqual('1023 B', progress.human(1023))
        self.assertEqual('1.5 KiB', progress.human(1536))
        self.assertEqual('16.0 MiB', progress.human(16 * MiB))
        self.assertEqual('2048.0 TiB', progress.human(2048 << 40))


class TestFollower(base.TestCase):

    PHASES = ('preflight', 'snapshot', 'copy', 'copy', 'copy', 'mirror',
              'mirror', 'switch-over', 'done')

    def test_a_line_per_phase_change_on_a_pipe(self):
        out = io.StringIO()
        follower = progress.Follower(out)
        for phase in self.PHASES:
            follower.update(_status(phase=phase))
        follower.end()
        self.assertEqual(['01234567: preflight', '01234567: snapshot',
                          '01234567: copy', '01234567: mirror',
                          '01234567: switch-over', '01234567: done'],
                         out.getvalue().splitlines())

    def test_the_demo_shows_the_memory_phase_of_a_qemu_guest(self):
        out = io.StringIO()
        follower = demo._Follower(out)
        for phase, sub in (('compose', None), ('compose', 'memory'),
                           ('compose', 'memory'), ('switch-over', None),
                           ('done', 'memory')):
            status = _status(phase=phase)
            status['progress']['phase'] = sub
            follower.update(status)
        self.assertEqual(['01234567: compose', '01234567: memory',
                          '01234567: switch-over', '01234567: done'],
                         out.getvalue().splitlines())

    def test_a_redrawn_bar_on_a_terminal(self):
        out = TtyStream()
        follower = progress.Follower(out)
        follower.update(_status(phase='copy', percent=10.0))
        follower.update(_status(phase='copy', percent=20.0))
        follower.end()
        text = out.getvalue()
        self.assertEqual(2, text.count('\r'))
        self.assertTrue(text.endswith('\n'))
        self.assertEqual(1, text.count('\n'))
        self.assertIn('\r' + progress.progress_line(
            _status(phase='copy', percent=20.0)), text)

    def test_quiet_prints_nothing(self):
        for out in (io.StringIO(), TtyStream()):
            follower = progress.Follower(out, quiet=True)
            for phase in self.PHASES:
                follower.update(_status(phase=phase))
            follower.end()
            self.assertEqual('', out.getvalue())

    def test_follow_polls_until_the_end(self):
        statuses = [_status(phase=p) for p in self.PHASES[:-1]]
        statuses.append(_status(phase='done', finished=1.0))
        calls = []

        def get(mid):
            calls.append(mid)
            return statuses[len(calls) - 1]

        out = io.StringIO()
        result = progress.follow(get, 'mid', progress.Follower(out),
                                 interval=0)
        self.assertIs(statuses[-1], result)
        self.assertEqual(['mid'] * len(self.PHASES), calls)
        self.assertEqual(6, len(out.getvalue().splitlines()))

    def test_follow_waits_for_the_end_of_the_run(self):
        # (done is said a few ms before the source lets go of everything)
        statuses = [_status(phase='done'), _status(phase='done'),
                    _status(phase='done', finished=3.0)]
        result = progress.follow(lambda mid: statuses.pop(0), 'mid',
                                 progress.Follower(io.StringIO()),
                                 interval=0)
        self.assertEqual(3.0, result['finished'])
        self.assertEqual([], statuses)

    def test_follow_stops_on_a_finished_failure(self):
        statuses = [_status(phase='copy'),
                    _status(phase='aborted', finished=2.0, error='boom')]
        result = progress.follow(lambda mid: statuses.pop(0), 'mid',
                                 progress.Follower(io.StringIO()),
                                 interval=0)
        self.assertEqual('aborted', result['phase'])
        self.assertEqual([], statuses)


class TestPrintResult(base.TestCase):

    def printed(self, status, as_json):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            progress.print_result(status, as_json)
        return out.getvalue()

    def test_done(self):
        status = _status(phase='done', finished=3.0, downtime_ms=12.5)
        self.assertEqual('migration %s done: 8.0 MiB copied in 1.5 s, '
                         'downtime 12.5 ms\n' % status['id'],
                         self.printed(status, False))

    def test_failed(self):
        status = _status(phase='aborted', finished=3.0,
                         error='migration x aborted: cancelled')
        self.assertEqual('migration %s aborted: migration x aborted: '
                         'cancelled\n' % status['id'],
                         self.printed(status, False))

    def test_json_is_one_object_on_one_line(self):
        status = _status(phase='done', finished=3.0, downtime_ms=12.5)
        text = self.printed(status, True)
        self.assertEqual(1, text.count('\n'))
        self.assertEqual(status, json.loads(text))


class TestMain(base.TestCase):

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        # common.run configures logging: keep the test process's as it is
        with contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err), \
                mock.patch('logging.basicConfig'):
            rc = migrate.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def assert_one_line_error(self, command, err):
        self.assertNotIn('Traceback', err)
        lines = [ln for ln in err.splitlines()
                 if ln.startswith('xsm-migrate')]
        self.assertEqual(1, len(lines), err)
        self.assertTrue(lines[0].startswith('xsm-migrate %s: error: '
                                            % command), err)
        return lines[0]

    def test_unknown_transport_driver(self):
        rc, out, err = self.run_main('list', '--transport-url',
                                     'nosuch://x/', '--host', 'h',
                                     '--rpc-timeout', '2')
        self.assertEqual(1, rc)
        self.assertEqual('', out)
        line = self.assert_one_line_error('list', err)
        self.assertIn('nosuch', line)

    def test_missing_config_file(self):
        missing = os.path.join(self.make_tempdir(), 'nowhere.conf')
        rc, out, err = self.run_main('show', 'some-id', '--config-file',
                                     missing, '--rpc-timeout', '2')
        self.assertEqual(1, rc)
        line = self.assert_one_line_error('show', err)
        self.assertIn(missing, line)

    def test_unreachable_broker_fails_within_seconds(self):
        # Nothing listens on port 1. The operator asked for a 2 s answer;
        # whatever the client library does, xsm-migrate must give up soon
        # and say why in one line, instead of retrying for ever.
        env = dict(os.environ, PYTHONPATH=base.REPO_TOP,
                   PYTHONWARNINGS='ignore')
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, '-m', 'xsm_driver.cmd.migrate', 'list',
             '--transport-url', 'rabbit://guest:guest@127.0.0.1:1/',
             '--host', 'host-a', '--rpc-timeout', '2'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env, cwd=base.REPO_TOP)
        try:
            out, err = proc.communicate(timeout=DEAD_BROKER_PATIENCE)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            self.fail('xsm-migrate list --rpc-timeout 2 against a dead '
                      'broker (127.0.0.1:1) was still running after %d s; '
                      'its stderr:\n%s' % (DEAD_BROKER_PATIENCE, err))
        elapsed = time.monotonic() - start
        self.assertEqual(1, proc.returncode, err)
        self.assertEqual('', out)
        self.assert_one_line_error('list', err)
        self.assertLess(elapsed, DEAD_BROKER_PATIENCE)


class TestResolve(base.TestCase):
    """``xsm-migrate resolve ID`` settles a migration in doubt."""

    def run_resolve(self, answer, *extra):
        client = mock.Mock()
        if isinstance(answer, Exception):
            client.migration_resolve.side_effect = answer
        else:
            client.migration_resolve.return_value = answer
        out, err = io.StringIO(), io.StringIO()
        with mock.patch.object(migrate, '_api', return_value=client), \
                contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            code = migrate.main(['resolve', 'm1'] + list(extra))
        client.migration_resolve.assert_called_once_with('m1')
        return code, out.getvalue(), err.getvalue()

    def test_committed_finishes(self):
        code, out, _err = self.run_resolve(
            _status('done', id='m1', source='a', destination='b'))
        self.assertEqual(0, code)
        self.assertIn('migration m1 resolved: host b had committed', out)
        self.assertIn('source copy on host a is retired', out)

    def test_rolled_back_resumes_the_source(self):
        code, out, _err = self.run_resolve(
            _status('aborted', id='m1', source='a', destination='b'))
        self.assertEqual(0, code)
        self.assertIn('rolled the switch-over back', out)
        self.assertIn('stays on host a', out)

    def test_still_in_doubt_exits_3(self):
        from xsm_driver.core.migration import errors
        code, out, err = self.run_resolve(errors.InDoubt(
            id='m1', host='b', waited=1, last='timed out'))
        self.assertEqual(migrate.IN_DOUBT_STATUS, code)
        self.assertEqual('', out)
        self.assertIn("run 'xsm-migrate resolve m1'", err)

    def test_json(self):
        code, out, _err = self.run_resolve(_status('done', id='m1'),
                                           '--json')
        self.assertEqual(0, code)
        self.assertEqual('done', json.loads(out)['phase'])

    def test_an_in_doubt_migration_followed_exits_3(self):
        client = mock.Mock()
        client.migration_get.return_value = _status(
            'in-doubt', finished=1.0, error='migration m1 is in doubt: ...')
        args = migrate.build_parser().parse_args(['vm', '--vm', 'v',
                                                  '--to-host', 'b',
                                                  '--vdi-map', 'x=y',
                                                  '--json'])
        with contextlib.redirect_stdout(io.StringIO()):
            self.assertEqual(migrate.IN_DOUBT_STATUS,
                             migrate._start_and_follow(args, client, 'm1'))
