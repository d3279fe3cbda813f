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

"""The commands hide other packages' deprecation notices, and only those.

Each case runs a fresh interpreter: warning filters and the
once-per-location registry are process state.
"""

import configparser
import os
import subprocess
import sys
import textwrap

from tests import base

# A third-party package as the commands meet them: deprecation notices of
# every shape, and warnings that are real problems.
THIRD_PARTY = '''
import warnings


class VendorDeprecationWarning(UserWarning):
    pass


def warn_all():
    warnings.warn('old API', DeprecationWarning, stacklevel=1)
    warnings.warn('going away', PendingDeprecationWarning, stacklevel=1)
    warnings.warn('will change', FutureWarning, stacklevel=1)
    warnings.warn('DSA is deprecated', VendorDeprecationWarning, stacklevel=1)
    warnings.warn('\\nThis library is DEPRECATED.', Warning, stacklevel=1)
    warnings.warn('socket left open', ResourceWarning, stacklevel=1)
    warnings.warn('overflow in add', RuntimeWarning, stacklevel=1)
    warnings.warn('odd certificate', UserWarning, stacklevel=1)


warn_all()
'''


class TestQuietDependencies(base.TestCase):

    def _run(self, code, env=None):
        lib = self.make_tempdir()
        with open(os.path.join(lib, 'vendorpkg.py'), 'w') as f:
            f.write(THIRD_PARTY)
        full_env = dict(os.environ)
        full_env.pop('PYTHONWARNINGS', None)
        full_env.update(env or {})
        full_env['PYTHONPATH'] = os.pathsep.join(
            [lib, base.REPO_TOP] + [p for p in [os.environ.get('PYTHONPATH')]
                                    if p])
        proc = subprocess.run(
            [sys.executable, '-c', textwrap.dedent(code)],
            capture_output=True, text=True, timeout=120, env=full_env,
            cwd=lib)
        self.assertEqual(0, proc.returncode, proc.stderr)
        return proc.stderr

    def test_other_packages_deprecations_hidden_real_problems_shown(self):
        err = self._run('''
            import warnings
            warnings.simplefilter('default')   # what -W default would show
            import xsm_driver.cmd
            xsm_driver.cmd.quiet_dependencies(warnoptions=[])
            import vendorpkg
        ''')
        for hidden in ('old API', 'going away', 'will change',
                       'DSA is deprecated', 'DEPRECATED'):
            self.assertNotIn(hidden, err)
        for shown in ('socket left open', 'overflow in add',
                      'odd certificate'):
            self.assertIn(shown, err)

    def test_our_own_deprecations_show(self):
        err = self._run('''
            import warnings
            warnings.simplefilter('default')
            import xsm_driver.cmd
            xsm_driver.cmd.quiet_dependencies(warnoptions=[])
            import types
            mod = types.ModuleType('xsm_driver.core.fake')
            exec("import warnings\\n"
                 "warnings.warn('our old option', DeprecationWarning)\\n"
                 "warnings.warn('our format is deprecated', UserWarning)\\n",
                 mod.__dict__)
            warnings.warn('main is ours too', DeprecationWarning)
        ''')
        self.assertIn('our old option', err)
        self.assertIn('our format is deprecated', err)
        self.assertIn('main is ours too', err)

    def test_operator_warning_options_win(self):
        err = self._run('''
            import xsm_driver.cmd
            import vendorpkg
        ''', env={'PYTHONWARNINGS': 'default'})
        self.assertIn('DSA is deprecated', err)
        self.assertIn('old API', err)

    def test_every_command_imports_quietly(self):
        # The real dependencies: importing each command's module and
        # what it brings in at run time (oslo.messaging and its RabbitMQ
        # driver, the agent, the engines) prints nothing.
        parser = configparser.ConfigParser()
        parser.read(os.path.join(base.REPO_TOP, 'setup.cfg'))
        scripts = parser['entry_points']['console_scripts'].split('\n')
        targets = sorted({line.split('=')[1].strip().split(':')[0]
                          for line in scripts if '=' in line})
        self.assertIn('xsm_driver.cmd.migrate', targets)
        for target in targets:
            self.assertTrue(target.startswith('xsm_driver.cmd.'), target)
        err = self._run('\n'.join(
            ['import %s' % t for t in targets] +
            ['import oslo_messaging',
             'from oslo_messaging._drivers import impl_rabbit',
             'from xsm_driver.core.rpc import agent',
             'from xsm_driver.core.xenapi import engine',
             'from xsm_driver.cloudstack import api']))
        self.assertEqual('', err)
