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

# The test processes import oslo.messaging too: keep their output to what
# the tests print, as the commands keep theirs (xsm_driver.cmd).
import os

from xsm_driver import cmd

cmd.quiet_dependencies()


def gated_load_tests(package_file, env):
    """The ``load_tests`` of a package whose tests run only when ``env=1``.

    (Its own script sets it, in its own venv; the main run over ``tests``
    discovers the package and gets nothing from it.)
    """
    here = os.path.dirname(os.path.abspath(package_file))
    top = os.path.dirname(os.path.dirname(here))

    def load_tests(loader, standard_tests, pattern):
        if os.environ.get(env) == '1':
            standard_tests.addTests(loader.discover(
                start_dir=here, pattern=pattern, top_level_dir=top))
        return standard_tests
    return load_tests
