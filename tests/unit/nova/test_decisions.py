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

"""The Nova driver's pure parts; these run where nova is not installed."""

import doctest
import os
import sys
from unittest import mock

from oslo_config import cfg

from tests import base
from xsm_driver import conf as xsm_conf
from xsm_driver.conf import nova as nova_conf
from xsm_driver.conf import opts
from xsm_driver.nova import agent_process
from xsm_driver.nova import decisions
from xsm_driver.nova import shim

GiB, MiB = decisions.GiB, decisions.MiB


class TestDocExamples(base.TestCase):

    def test_worked_examples(self):
        for module in (decisions, agent_process):
            failed, tried = doctest.testmod(module)
            self.assertGreater(tried, 0, module.__name__)
            self.assertEqual(0, failed, module.__name__)


class TestDiskSizes(base.TestCase):

    def test_root_only(self):
        self.assertEqual([GiB], decisions.disk_sizes(1))

    def test_root_ephemeral_swap(self):
        self.assertEqual([20 * GiB, 5 * GiB, 512 * MiB],
                         decisions.disk_sizes(20, 5, 512))

    def test_root_zero_takes_the_image_size(self):
        self.assertEqual([40 * MiB], decisions.disk_sizes(0, image_size=40 *
                                                          MiB))
        self.assertEqual([MiB], decisions.disk_sizes(0))


class TestTimeout(base.TestCase):

    def test_per_gib_with_a_floor_of_two(self):
        self.assertEqual(1600.0, decisions.completion_timeout(800, 0))
        self.assertEqual(1600.0, decisions.completion_timeout(800, 2 * GiB))
        self.assertEqual(2400.0, decisions.completion_timeout(800, 3 * GiB))

    def test_zero_disables(self):
        self.assertIsNone(decisions.completion_timeout(0, 100 * GiB))
        self.assertFalse(decisions.should_trigger_timeout_action(1e9, None))

    def test_trigger_only_past_the_timeout(self):
        self.assertFalse(decisions.should_trigger_timeout_action(2.0, 2.0))
        self.assertTrue(decisions.should_trigger_timeout_action(2.1, 2.0))

    def test_action_taken_once(self):
        self.assertEqual('force_complete',
                         decisions.timeout_action('force_complete', False))
        self.assertIsNone(decisions.timeout_action('force_complete', True))
        self.assertRaises(ValueError, decisions.timeout_action, 'pause',
                          False)


class TestProgress(base.TestCase):

    def test_progress(self):
        self.assertEqual((8, 2, 6, 25),
                         decisions.progress({'done': 2, 'total': 8}))

    def test_unknown_total(self):
        self.assertEqual((0, 0, 0, 0), decisions.progress({}))
        self.assertEqual((0, 0, 0, 0),
                         decisions.progress({'done': None, 'total': None}))

    def test_done_never_exceeds_total(self):
        self.assertEqual((4, 4, 0, 100),
                         decisions.progress({'done': 5, 'total': 4}))


class TestMigrationProgress(base.TestCase):
    """Nova 34's API schemas: each disk field null or at least 1."""

    def assert_schema_valid(self, fields):
        for name, value in fields.items():
            self.assertTrue(value is None or (isinstance(value, int) and
                                              value >= 1), (name, value))

    def test_nothing_copied_yet_is_null(self):
        fields = decisions.migration_progress(
            decisions.progress({'done': 0, 'total': 8}))
        self.assertEqual({'disk_total': 8, 'disk_processed': None,
                          'disk_remaining': 8}, fields)
        self.assert_schema_valid(fields)

    def test_nothing_left_is_null(self):
        fields = decisions.migration_progress(
            decisions.progress({'done': 8, 'total': 8}))
        self.assertEqual({'disk_total': 8, 'disk_processed': 8,
                          'disk_remaining': None}, fields)
        self.assert_schema_valid(fields)

    def test_unknown_total_is_all_null(self):
        fields = decisions.migration_progress(decisions.progress({}))
        self.assertEqual({None}, set(fields.values()))

    def test_every_step_valid(self):
        for done in range(0, 9):
            self.assert_schema_valid(decisions.migration_progress(
                decisions.progress({'done': done, 'total': 8})))


class TestOutcome(base.TestCase):

    def test_running(self):
        self.assertEqual(decisions.RUNNING, decisions.outcome(
            {'finished': None, 'phase': 'switch-over'}, True))

    def test_done(self):
        self.assertEqual(decisions.SUCCEEDED, decisions.outcome(
            {'finished': 3.0, 'phase': 'done', 'result': {}}, True))

    def test_committed_but_source_clean_up_failed(self):
        # the instance runs on the destination: Nova must follow it there
        self.assertEqual(decisions.SUCCEEDED, decisions.outcome(
            {'finished': 3.0, 'phase': 'clean-up',
             'result': {'vm': 'u', 'vdis': {}}}))

    def test_failed_before_the_commit(self):
        self.assertEqual(decisions.FAILED, decisions.outcome(
            {'finished': 3.0, 'phase': 'clean-up', 'result': None}))
        self.assertEqual(decisions.FAILED, decisions.outcome(
            {'finished': 3.0, 'phase': 'aborted'}))

    def test_cancelled_only_when_asked(self):
        self.assertEqual(decisions.CANCELLED, decisions.outcome(
            {'finished': 3.0, 'phase': 'aborted'}, abort_requested=True))

    def test_in_doubt_is_neither_failure_nor_success(self):
        # the guest is paused on the source and may run on the
        # destination: never rolled back, never called done (the engine
        # marks its run finished; the phase is what counts)
        for finished in (None, 3.0):
            for asked in (False, True):
                status = {'finished': finished, 'phase': 'in-doubt',
                          'error': 'no answer from host2', 'result': None}
                self.assertEqual(decisions.IN_DOUBT,
                                 decisions.outcome(status, asked))
        self.assertNotIn(decisions.IN_DOUBT, (
            decisions.RUNNING, decisions.SUCCEEDED, decisions.CANCELLED,
            decisions.FAILED))

    def test_resolved_in_doubt_follows_the_destination(self):
        self.assertEqual(decisions.SUCCEEDED, decisions.outcome(
            {'finished': 4.0, 'phase': 'done', 'result': {}}))
        self.assertEqual(decisions.FAILED, decisions.outcome(
            {'finished': 4.0, 'phase': 'aborted', 'result': None}))


class TestBandwidth(base.TestCase):

    def test_mib_per_second(self):
        self.assertIsNone(decisions.bandwidth(0))
        self.assertEqual(100 * MiB, decisions.bandwidth(100))


class TestAgentProcessConfig(base.TestCase):

    def test_parsed_by_xsm_agent(self):
        text = agent_process.config_text(
            'host1', ['local:vhd:/srv/a', 'fast:raw:/srv/b'], '/st',
            'rabbit://u:p@h:5672/', 'nova', '192.0.2.1', 2, 32)
        path = os.path.join(self.make_tempdir(), 'a.conf')
        with open(path, 'w') as f:
            f.write(text)
        conf = cfg.ConfigOpts()
        xsm_conf.register_opts(conf)
        conf.register_opts([cfg.StrOpt('transport_url'),
                            cfg.StrOpt('control_exchange')])
        conf(['--config-file', path])
        self.assertEqual('host1', conf.agent.host)
        self.assertEqual(['local:vhd:/srv/a', 'fast:raw:/srv/b'],
                         conf.sr.repositories)
        self.assertEqual(32, conf.agent.leaf_headroom_mb)
        self.assertEqual('rabbit://u:p@h:5672/', conf.transport_url)


class TestShim(base.TestCase):

    def test_install_is_idempotent_and_removable(self):
        virt = self.make_tempdir()
        self.assertFalse(shim.is_installed(virt))
        path = shim.install(virt)
        shim.install(virt)
        self.assertTrue(shim.is_installed(virt))
        self.assertEqual(shim.SHIM, open(path).read())
        shim.remove(virt)
        shim.remove(virt)
        self.assertEqual([], os.listdir(virt))

    def test_shim_only_reexports_the_driver(self):
        self.assertIn('from xsm_driver.nova.driver import XSMDriver',
                      shim.SHIM)

    def test_without_nova(self):
        if 'nova' in sys.modules or shim.importlib.util.find_spec('nova'):
            self.skipTest('nova is installed here')
        self.assertRaises(RuntimeError, shim.virt_dir)
        self.assertEqual(1, shim.main(['check']))


class TestOptions(base.TestCase):

    def test_listed_for_the_sample(self):
        groups = dict(opts.list_opts())
        self.assertIs(nova_conf.xsm_opts, groups[nova_conf.xsm_group])

    def test_defaults(self):
        conf = cfg.ConfigOpts()
        nova_conf.register_opts(conf)
        conf([])
        self.assertEqual('auto', conf.xsm.agent)
        self.assertEqual(0, conf.xsm.bandwidth_limit)
        self.assertEqual(800, conf.xsm.completion_timeout)
        self.assertEqual('abort', conf.xsm.completion_timeout_action)
        self.assertIsNone(conf.xsm.transport_url)

    def test_timeout_action_choices(self):
        conf = cfg.ConfigOpts()
        nova_conf.register_opts(conf)
        conf([])
        self.assertRaises(ValueError, conf.set_override,
                          'completion_timeout_action', 'pause', 'xsm')

    def test_the_main_run_never_imports_nova(self):
        # xsm_driver.nova's pure modules and the conf module stay nova-free
        self.assertNotIn('nova', sys.modules)


class TestImageFormat(base.TestCase):

    def test_raw_and_vhd_are_written_as_they_are(self):
        self.assertEqual('raw', decisions.image_format('raw', 'bare'))
        self.assertEqual('vhd', decisions.image_format('vhd', None))

    def test_other_formats_are_refused_by_name(self):
        for fmt in ('qcow2', 'vmdk', 'iso', 'ami', None):
            exc = self.assertRaises(ValueError, decisions.image_format, fmt)
            self.assertIn('disk format %r cannot be written' % (fmt,),
                          str(exc))
        exc = self.assertRaises(ValueError, decisions.image_format, 'vhd',
                                'ova')
        self.assertIn("container format 'ova' wraps the disk", str(exc))


class TestDetachedAgent(base.TestCase):
    """``[xsm]agent = auto``: the agent outlives nova-compute."""

    def test_an_agent_that_answers_is_adopted_and_never_stopped(self):
        folder = self.make_tempdir()
        with open(os.path.join(folder, 'xsm-agent.pid'), 'w') as f:
            f.write('4242\n')
        proc = agent_process.AgentProcess(folder, '[agent]\n',
                                          ping=lambda: None, detached=True)
        with mock.patch('subprocess.Popen') as popen:
            self.assertIs(proc, proc.start())
            proc.stop()
        self.assertFalse(popen.called)
        self.assertTrue(proc.adopted)
        self.assertEqual(4242, proc.pid())

    def test_a_child_is_not_adopted(self):
        folder = self.make_tempdir()
        calls = []

        def ping():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError('nobody answers yet')

        proc = agent_process.AgentProcess(folder, '[agent]\n', ping)
        with mock.patch('subprocess.Popen') as popen:
            popen.return_value.poll.return_value = None
            proc.start()
        self.assertFalse(proc.adopted)
        self.assertFalse(popen.call_args.kwargs['start_new_session'])

    def test_a_detached_agent_gets_a_session_of_its_own(self):
        folder = self.make_tempdir()
        answers = iter([RuntimeError('none yet'), None])

        def ping():
            answer = next(answers)
            if answer is not None:
                raise answer

        proc = agent_process.AgentProcess(folder, '[agent]\n', ping,
                                          detached=True)
        with mock.patch('subprocess.Popen') as popen:
            popen.return_value.poll.return_value = None
            popen.return_value.pid = 777
            proc.start()
            proc.stop()
        self.assertTrue(popen.call_args.kwargs['start_new_session'])
        self.assertEqual(777, proc.pid())
        self.assertFalse(popen.return_value.send_signal.called)
