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

"""The pure parts of the harness (its integration tests: tests/functional)."""

import configparser
import os

from tests import base
from xsm_driver.testing import harness


class TestRunNames(base.TestCase):

    def test_exchange_and_hosts_of_a_run(self):
        names = harness.run_names('soak', 'soak', 'ab12')
        self.assertEqual('xsm-soak-ab12', names.exchange)
        self.assertEqual({'a': 'soak-a-ab12', 'b': 'soak-b-ab12'},
                         names.hosts)

    def test_other_roles(self):
        self.assertEqual({'x': 'h-x-t'},
                         harness.run_names('k', 'h', 't', ('x',)).hosts)

    def test_bad_names_are_named(self):
        for args in (('', 'h', 't'), ('k', 'a b', 't'), ('k', 'h', ''),
                     ('k', 'h', 't/..')):
            exc = self.assertRaises(ValueError, harness.run_names, *args)
            self.assertIn('letters, digits', str(exc))
        exc = self.assertRaises(ValueError, harness.run_names, 'k', 'h',
                                't', ('a', 'a'))
        self.assertIn("roles ('a', 'a')", str(exc))


class TestSrSpecs(base.TestCase):

    def test_sorted_specs(self):
        self.assertEqual(['raw-a:raw:/r', 'sr-a:vhd:/s'], harness.sr_specs(
            {'sr-a': ('vhd', '/s'), 'raw-a': ('raw', '/r')}))

    def test_a_colon_in_a_name_is_refused(self):
        exc = self.assertRaises(ValueError, harness.sr_specs,
                                {'sr:a': ('vhd', '/s')})
        self.assertIn("'sr:a'", str(exc))


class TestConfigText(base.TestCase):

    def parse(self, text):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(text)
        return parser

    def test_what_every_agent_gets(self):
        conf = self.parse(harness.config_text(
            'host-a-t', 'xsm-test-t', {'sr-a': ('vhd', '/f/sr-a')},
            '/f/state'))
        self.assertEqual({'transport_url': harness.RABBIT_URL,
                          'control_exchange': 'xsm-test-t',
                          'rpc_response_timeout': '30'},
                         dict(conf['DEFAULT']))
        self.assertEqual({'host': 'host-a-t', 'state_path': '/f/state',
                          'migration_address': '127.0.0.1',
                          'progress_interval': '3600'},
                         {k: v for k, v in conf['agent'].items()
                          if k not in conf['DEFAULT']})
        self.assertEqual('sr-a:vhd:/f/sr-a', conf['sr']['repositories'])

    def test_options_defaults_and_sections_override(self):
        conf = self.parse(harness.config_text(
            'h', 'x', {}, '/s',
            options={'copy_connections': 4, 'migration_address': '10.0.0.2'},
            transport_url='rabbit://guest:guest@10.0.0.1:5672/vh',
            defaults={'rpc_response_timeout': 120},
            sections={'hypervisor': {'driver': 'qemu', 'accel': 'tcg'}}))
        self.assertEqual('4', conf['agent']['copy_connections'])
        self.assertEqual('10.0.0.2', conf['agent']['migration_address'])
        self.assertEqual('120', conf['DEFAULT']['rpc_response_timeout'])
        self.assertEqual('rabbit://guest:guest@10.0.0.1:5672/vh',
                         conf['DEFAULT']['transport_url'])
        self.assertEqual({'driver': 'qemu', 'accel': 'tcg'},
                         {k: v for k, v in conf['hypervisor'].items()
                          if k not in conf['DEFAULT']})
        self.assertNotIn('repositories', conf['sr'])

    def test_several_srs_one_line_each(self):
        text = harness.config_text('h', 'x', {'b': ('raw', '/b'),
                                              'a': ('vhd', '/a')}, '/s')
        self.assertIn('[sr]\nrepositories = a:vhd:/a\n'
                      'repositories = b:raw:/b\n', text)

    def test_own_sections_go_through_their_parameters(self):
        for section, param in (('agent', 'options'), ('sr', 'srs'),
                               ('DEFAULT', 'defaults')):
            exc = self.assertRaises(
                ValueError, harness.config_text, 'h', 'x', {}, '/s',
                sections={section: {'k': 'v'}})
            self.assertIn('[%s]: give its options as %s' % (section, param),
                          str(exc))

    def test_a_value_of_two_lines_is_refused(self):
        exc = self.assertRaises(ValueError, harness.config_text, 'h', 'x',
                                {}, '/s', options={'k': 'a\nb'})
        self.assertIn("option 'k' of [agent]", str(exc))


class TestKombuUrl(base.TestCase):

    def test_default_and_named_virtual_hosts(self):
        self.assertEqual(harness.KOMBU_URL,
                         harness.kombu_url(harness.RABBIT_URL))
        self.assertEqual('amqp://u:p@10.0.0.1:5672/run-1',
                         harness.kombu_url('rabbit://u:p@10.0.0.1:5672/run-1'))
        self.assertEqual('amqp://u:p@h:5672//',
                         harness.kombu_url('rabbit://u:p@h:5672'))

    def test_what_it_cannot_tidy_is_named(self):
        exc = self.assertRaises(ValueError, harness.kombu_url, 'fake://')
        self.assertIn("'fake://' is not a rabbit:// transport URL", str(exc))
        exc = self.assertRaises(ValueError, harness.kombu_url,
                                'rabbit://a:b@h1:5672,a:b@h2:5672/')
        self.assertIn('several brokers', str(exc))


class TestProcessPieces(base.TestCase):

    def test_ready_line_is_the_agents(self):
        from xsm_driver.cmd import agent
        with open(agent.__file__) as f:
            source = f.read()
        self.assertIn("'xsm-agent: host %s ready, SRs: %s'", source)
        self.assertEqual('xsm-agent: host h ready', harness.ready_line('h'))

    def test_config_file_and_argv(self):
        folder = self.make_tempdir()
        proc = harness.AgentProcess(
            'h-t', folder, {'sr': ('vhd', os.path.join(folder, 'sr'))},
            'xsm-unit-t', options={'copy_connections': 2},
            wrap=lambda argv: ['ip', 'netns', 'exec', 'ns'] + argv)
        with open(proc.config) as f:
            text = f.read()
        self.assertIn('copy_connections = 2\n', text)
        self.assertIn('identity_key_file = ', text)
        self.assertEqual(['ip', 'netns', 'exec', 'ns'], proc.argv()[:4])
        self.assertEqual(['-m', harness.AGENT_MODULE, '--config-file',
                          proc.config], proc.argv()[5:])
        self.assertFalse(proc.running())
        self.assertIsNone(proc.stop())

    def test_deployment_refuses_agents_of_another_exchange(self):
        folder = self.make_tempdir()
        proc = harness.AgentProcess('h', folder, {}, 'xsm-unit-one')
        exc = self.assertRaises(harness.HarnessError, harness.Deployment,
                                folder, 'xsm-unit-two', {'a': proc})
        self.assertIn('exchange xsm-unit-one, not xsm-unit-two', str(exc))

    def test_tail_of_a_missing_log(self):
        self.assertTrue(harness.tail('/nonexistent/log').startswith(
            '(no log:'))


class TestQemuGuestProblems(base.TestCase):

    def test_each_missing_part_is_named(self):
        kit = self.make_tempdir()
        self.assertEqual(
            ['no-such-qemu is not installed (apt-get install -y '
             'qemu-system-x86)',
             'the guest kit has no vmlinuz in %s (build it with '
             'tools/guest-kit/build.sh %s)' % (kit, kit),
             'the guest kit has no initramfs.cpio.gz in %s (build it with '
             'tools/guest-kit/build.sh %s)' % (kit, kit)],
            harness.qemu_guest_problems(kit, 'no-such-qemu'))
        for name in ('vmlinuz', 'initramfs.cpio.gz'):
            open(os.path.join(kit, name), 'wb').close()
        self.assertEqual([], harness.qemu_guest_problems(kit, 'sh'))


class TestLocalHosts(base.TestCase):
    """Real in-process hosts on ``fake://``: nothing is left after close."""

    check_leaks = True

    def layout(self, root, *names):
        return {n: {'sr-' + n: ('vhd', os.path.join(root, n, 'sr-' + n))}
                for n in names}

    def test_hosts_serve_and_close_leaves_nothing(self):
        root = self.make_tempdir()
        local = harness.LocalHosts(root, self.layout(root, 'h1', 'h2'))
        try:
            local.start()
            info = local.client('h2', timeout=10).host_info()
            self.assertEqual(['sr-h2'], [sr['name'] for sr in info['srs']])
            self.assertTrue(os.path.isdir(local.state_path('h1')))
        finally:
            local.close()
        self.assertEqual(({}, {}, None),
                         (local.hosts, local.agents, local.transport))
        local.close()                   # again: nothing

    def test_close_goes_on_after_a_failure_and_raises_it(self):
        root = self.make_tempdir()
        local = harness.LocalHosts(root, self.layout(root, 'h1', 'h2'))
        local.start()
        agent = local.agents['h1']
        stop = agent.stop

        def failing_stop():
            stop()
            raise RuntimeError('h1 would not stop')
        agent.stop = failing_stop
        exc = self.assertRaises(RuntimeError, local.close)
        self.assertEqual('h1 would not stop', str(exc))
        # h2's agent and the transport were closed all the same: the
        # leak check of this test finds no thread left
        self.assertEqual({}, local.agents)
