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

"""The xsm-vhd command, run as an operator runs it."""

import contextlib
import io
import json
import os
import subprocess
import sys

from tests import base
from xsm_driver.cmd import vhd as cmd

MiB = 1024 * 1024
COMMANDS = ('create', 'snapshot', 'write', 'export', 'info', 'check', 'map',
            'coalesce', 'set-parent', 'set-hidden')


class XsmVhdTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.make_tempdir()

    def path(self, name):
        return os.path.join(self.dir, name)

    def run_main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cmd.main(list(argv))
            except SystemExit as exc:
                rc = exc.code
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *argv):
        rc, out, err = self.run_main(*argv)
        self.assertEqual(0, rc, 'xsm-vhd %s: %s' % (' '.join(argv), err))
        return out

    def fails(self, *argv):
        rc, out, err = self.run_main(*argv)
        self.assertNotEqual(0, rc)
        self.assertNotIn('Traceback', err)
        return out + err

    def test_session(self):
        data = self.path('data.bin')
        with open(data, 'wb') as f:
            f.write(b'\x42' * (3 * MiB))
        self.ok('create', self.path('base.vhd'), '--size', '64M')
        self.ok('write', self.path('base.vhd'), '--offset', '1M',
                '--input', data)
        self.ok('snapshot', self.path('leaf.vhd'), '--parent',
                self.path('base.vhd'))
        self.ok('write', self.path('leaf.vhd'), '--offset', '0',
                '--input', data)
        self.assertIn('is valid', self.ok('check', self.path('leaf.vhd'),
                                          '--chain'))
        facts = json.loads(self.ok('info', self.path('leaf.vhd'), '--json'))
        self.assertEqual(2, facts['chain_depth'])
        self.assertEqual(4 * MiB, facts['chain_allocated_bytes'])
        self.assertIn('differencing', self.ok('info', self.path('leaf.vhd')))
        extents = json.loads(self.ok('map', self.path('leaf.vhd'), '--json'))
        self.assertEqual([{'offset': 0, 'length': 4 * MiB,
                           'allocated': True},
                          {'offset': 4 * MiB, 'length': 60 * MiB,
                           'allocated': False}], extents)
        self.assertIn('hole', self.ok('map', self.path('leaf.vhd')))
        self.ok('export', self.path('leaf.vhd'), self.path('out.raw'))
        with open(self.path('out.raw'), 'rb') as f:
            self.assertEqual(b'\x42' * (4 * MiB), f.read(4 * MiB))
        self.ok('coalesce', self.path('leaf.vhd'))
        self.ok('create', self.path('other.vhd'), '--size', '64M')
        self.ok('snapshot', self.path('leaf2.vhd'), '--parent',
                self.path('other.vhd'))
        self.ok('set-parent', self.path('leaf2.vhd'), self.path('base.vhd'))
        self.ok('set-hidden', self.path('base.vhd'), '1')
        self.assertIn('is valid', self.ok('check', self.path('leaf2.vhd'),
                                          '--chain'))

    def test_fixed(self):
        self.ok('create', self.path('f.vhd'), '--size', '4M', '--fixed')
        self.assertEqual(4 * MiB + 512, os.path.getsize(self.path('f.vhd')))

    def test_errors_name_the_file(self):
        out = self.fails('info', self.path('nope.vhd'))
        self.assertIn('nope.vhd', out)
        with open(self.path('junk.vhd'), 'wb') as f:
            f.write(b'not a vhd!' * 1024)
        out = self.fails('check', self.path('junk.vhd'))
        self.assertIn('junk.vhd', out)
        self.assertIn('invalid cookie', out)
        self.ok('create', self.path('a.vhd'), '--size', '4M')
        out = self.fails('create', self.path('a.vhd'), '--size', '4M')
        self.assertIn('already exists', out)
        self.assertIn("'lots' is not a size",
                      self.fails('create', self.path('b.vhd'), '--size',
                                 'lots'))
        self.assertFalse(os.path.exists(self.path('b.vhd')))
        out = self.fails('write', self.path('a.vhd'), '--offset', '4M',
                         '--input', self.path('a.vhd'))
        self.assertIn('outside the virtual disk', out)
        out = self.fails('coalesce', self.path('a.vhd'))
        self.assertIn('no parent', out)

    def test_help_everywhere(self):
        rc, out, _err = self.run_main('--help')
        self.assertEqual(0, rc)
        for name in COMMANDS:
            self.assertIn(name, out)
            rc, out_sub, _err = self.run_main(name, '--help')
            self.assertEqual(0, rc, name)
            self.assertIn('usage: xsm-vhd %s' % name, out_sub)

    def test_console_script(self):
        script = os.path.join(os.path.dirname(sys.executable), 'xsm-vhd')
        if not os.path.exists(script):
            self.missing('xsm-vhd is not installed in %s: run pip install '
                         '-e .' % os.path.dirname(sys.executable))
        result = subprocess.run([script, 'create', self.path('c.vhd'),
                                 '--size', '2M'], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(0, result.returncode, result.stderr)
        result = subprocess.run([script, 'check', self.path('c.vhd')],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertIn('is valid', result.stdout)
