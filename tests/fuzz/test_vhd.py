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

"""Bounded fuzzing of the VHD parser (see the vhd fuzz target)."""

from hypothesis import given
from hypothesis import strategies as st

from tests import base
from tests.fuzz import common
from tests.fuzz import vhd as target

# A base image, then the mutation program (see vhd.mutate).
programs = st.tuples(
    st.integers(0, len(target.BASES) - 2), st.binary(max_size=160)).map(
        lambda t: bytes([t[0]]) + t[1])
raw_files = st.binary(max_size=4096).map(
    lambda data: bytes([len(target.BASES) - 1]) + data)


class VHDFuzzTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.workspace = target.Workspace(self.vectors_dir())
        self.addCleanup(self.workspace.close)
        self.addCleanup(common.stop_tracing)

    def one_input(self, data):
        self.assertTrue(target.one_input_in(self.workspace, data))

    @common.fuzz_settings(max_examples=400, deadline=30000)
    @given(programs)
    def test_mutated_images(self, data):
        self.one_input(data)

    @common.fuzz_settings(max_examples=100, deadline=30000)
    @given(raw_files)
    def test_arbitrary_files(self, data):
        self.one_input(data)

    def test_directory_instead_of_an_image(self):
        """Regression: IsADirectoryError, unnamed, from os.pread."""
        folder = self.make_tempdir()
        for opener in (target.vhd_chain.Chain, target.vhd_image.Image):
            exc = self.assertRaises(target.errors.VHDError, opener, folder)
            self.assertEqual('%s: cannot read: Is a directory' % folder,
                             str(exc))
        self.assertEqual(['%s: cannot read: Is a directory' % folder],
                         target.check.check(folder))

    def test_corpus(self):
        files = common.corpus_files(target.TARGET)
        self.assertGreater(len(files), 10)
        for path in files:
            with open(path, 'rb') as f:
                self.one_input(f.read())
