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

"""Base test case and helpers shared by every xsm-driver test."""

import os
import shutil
import tempfile

import testtools

# Debian package that provides each external command the tests may use.
DEBIAN_PACKAGES = {
    'qemu-img': 'qemu-utils',
    'qemu-io': 'qemu-utils',
    'qemu-nbd': 'qemu-utils',
    'nbdinfo': 'libnbd-bin',
    'nbdcopy': 'libnbd-bin',
    'nbdkit': 'nbdkit',
}

REPO_TOP = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def in_ci():
    return os.environ.get('CI') == 'true'


class TestCase(testtools.TestCase):
    """Base class of xsm-driver tests."""

    def missing(self, message):
        """Fail in CI, skip elsewhere: CI must never hide a missing tool."""
        if in_ci():
            self.fail(message)
        self.skipTest(message)

    def make_tempdir(self):
        """Return a new temporary directory removed at cleanup."""
        path = tempfile.mkdtemp(prefix='xsm-test-')
        self.addCleanup(shutil.rmtree, path, ignore_errors=True)
        return path

    def require_command(self, name):
        """Return the path of command ``name``, or fail/skip when missing."""
        path = shutil.which(name)
        if path is None:
            package = DEBIAN_PACKAGES.get(name, name)
            self.missing('command %s not found: install it with '
                         '"apt-get install -y %s" (or run '
                         'tools/run-tests.sh)' % (name, package))
        return path

    def vectors_dir(self):
        """Return the folder of the shared VHD test vectors.

        It is ``$XSM_VECTORS_DIR`` when set, else ``shared/vectors/vhd``
        beside the repository top.
        """
        path = os.environ.get('XSM_VECTORS_DIR') or os.path.join(
            REPO_TOP, os.pardir, 'shared', 'vectors', 'vhd')
        path = os.path.normpath(path)
        if not os.path.isfile(os.path.join(path, 'MANIFEST.json')):
            self.missing('VHD test vectors not found in %s: put shared/ '
                         'beside the repository or set XSM_VECTORS_DIR'
                         % path)
        return path
