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

import json
import os
import socket
import threading
from unittest import mock

import fixtures
import testtools

from tests import base


def _probe(body, check_leaks=False):
    """Return an inner test case whose outcome the real tests inspect."""
    class Probe(base.TestCase):
        def runTest(self):
            self.result = body(self)
    Probe.check_leaks = check_leaks
    return Probe()


class TestBaseHelpers(base.TestCase):

    def _run(self, body, ci):
        self.useFixture(fixtures.EnvironmentVariable(
            'CI', 'true' if ci else None))
        probe = _probe(body)
        result = testtools.TestResult()
        probe.run(result)
        return probe, result

    def test_make_tempdir_is_removed_at_cleanup(self):
        probe, result = self._run(lambda t: t.make_tempdir(), ci=False)
        self.assertTrue(result.wasSuccessful())
        self.assertFalse(os.path.exists(probe.result))

    def test_require_command_found(self):
        probe, result = self._run(
            lambda t: t.require_command('sh'), ci=True)
        self.assertTrue(result.wasSuccessful())
        self.assertTrue(os.path.isabs(probe.result))

    @mock.patch('shutil.which', return_value=None)
    def test_require_command_missing_skips_outside_ci(self, which):
        probe, result = self._run(
            lambda t: t.require_command('qemu-img'), ci=False)
        self.assertEqual(1, len(result.skip_reasons))
        (reason,) = result.skip_reasons
        self.assertIn('apt-get install -y qemu-utils', reason)

    @mock.patch('shutil.which', return_value=None)
    def test_require_command_missing_fails_in_ci(self, which):
        probe, result = self._run(
            lambda t: t.require_command('nbdinfo'), ci=True)
        self.assertEqual(1, len(result.failures))
        self.assertIn('apt-get install -y libnbd-bin', result.failures[0][1])

    def test_vectors_are_in_the_repository(self):
        probe, result = self._run(lambda t: t.vectors_dir(), ci=False)
        self.assertTrue(result.wasSuccessful())
        self.assertEqual(os.path.join(base.REPO_TOP, 'tests', 'data', 'vhd'),
                         probe.result)
        with open(os.path.join(probe.result, 'MANIFEST.json')) as f:
            manifest = json.load(f)
        self.assertEqual(6, len(manifest))
        for name, entry in manifest.items():
            self.assertEqual(entry['file_size'], os.path.getsize(
                os.path.join(probe.result, name)), name)

    def test_vectors_missing_fail_outside_ci_too(self):
        self.useFixture(fixtures.MonkeyPatch(
            'tests.base.VECTORS_DIR', self.make_tempdir()))
        probe, result = self._run(lambda t: t.vectors_dir(), ci=False)
        self.assertEqual(1, len(result.failures))
        self.assertIn('incomplete', result.failures[0][1])


class TestNoLeaks(base.TestCase):

    def run_probe(self, body, **attrs):
        probe = _probe(body, check_leaks=True)
        for name, value in attrs.items():
            setattr(probe, name, value)
        result = testtools.TestResult()
        probe.run(result)
        return result

    def leaked(self, result):
        self.assertEqual(1, len(result.failures + result.errors),
                         result.failures + result.errors)
        return (result.failures + result.errors)[0][1]

    def test_a_clean_test_passes(self):
        def body(t):
            with open(os.devnull) as f:
                f.read()
            thread = threading.Thread(target=lambda: None)
            thread.start()
        self.assertTrue(self.run_probe(body).wasSuccessful())

    def test_a_thread_that_ends_soon_is_waited_for(self):
        def body(t):
            threading.Timer(0.2, lambda: None).start()
        self.assertTrue(self.run_probe(body).wasSuccessful())

    def test_a_running_thread_is_named_with_its_stack(self):
        stop = threading.Event()
        self.addCleanup(stop.set)

        def loop_on_short_sleeps():
            while not stop.wait(0.001):
                pass

        def body(t):
            threading.Thread(target=loop_on_short_sleeps, daemon=True,
                             name='spinner').start()
        text = self.leaked(self.run_probe(body))
        self.assertIn('LeakError', text)
        self.assertIn("thread 'spinner' (daemon), at:", text)
        self.assertIn('in loop_on_short_sleeps: while not stop.wait(0.001)',
                      text)

    def test_an_open_file_is_named(self):
        opened = []
        self.addCleanup(lambda: [f.close() for f in opened])

        def body(t):
            path = os.path.join(t.make_tempdir(), 'journal.sqlite')
            opened.append(open(path, 'w'))
        text = self.leaked(self.run_probe(body))
        self.assertIn('journal.sqlite (deleted)', text)
        self.assertIn('1 file descriptor(s) open', text)

    def test_a_socket_is_named_with_its_addresses(self):
        opened = []
        self.addCleanup(lambda: [s.close() for s in opened])

        def body(t):
            server = socket.socket()
            server.bind(('127.0.0.1', 0))
            server.listen()
            opened.append(server)
        text = self.leaked(self.run_probe(body))
        self.assertIn('tcp 127.0.0.1:%d -> 0.0.0.0:0'
                      % opened[0].getsockname()[1], text)

    def test_what_the_class_allows_is_not_counted(self):
        stop = threading.Event()
        self.addCleanup(stop.set)

        def body(t):
            threading.Thread(target=stop.wait, daemon=True,
                             name='allowed-worker').start()
        result = self.run_probe(body,
                                leak_ignore_threads=('^allowed-',))
        self.assertTrue(result.wasSuccessful())
