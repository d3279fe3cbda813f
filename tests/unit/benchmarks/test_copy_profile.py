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

"""The pure parts of benchmarks/copy_profile.py: perf script samples."""

import collections

from tests import base


cp = base.load_benchmark('copy_profile')

# perf script -F comm,pid,tid,ip,sym,dso (comm right-aligned, frames
# tab-indented, a blank line after each sample)
LIBS = '/usr/lib/x86_64-linux-gnu/'
SCRIPT = '\n'.join([
    ' 1_scheduler  2997/3028  ',
    '\t          241334 [unknown] (/usr/lib/erlang/bin/beam.smp)',
    '\t               0 [unknown] ([unknown])',
    '',
    '      python   396/1481  ',
    '\tffffffff8e2a1b2c _copy_from_iter ([kernel.kallsyms])',
    '\tffffffff8e2a1000 tcp_sendmsg_locked ([kernel.kallsyms])',
    '\t    7f6d2b441ec1 [unknown] (%slibcrypto.so.3)' % LIBS,
    '',
    '      python   396/1483  ',
    '\t    7f6d2b441ec1 [unknown] (%slibcrypto.so.3)' % LIBS,
    '\t    7f6d2b0d329b SSL_write_ex (%slibssl.so.3)' % LIBS,
    '',
    '      python   397/1500  ',
    '\t    7f872398bb75 __memmove_avx512_unaligned_erms (%slibc.so.6)'
    % LIBS,
    '',
    '      python   397/1501  ',
    '\t    7f8722a41f99 [unknown] (%slibcrypto.so.3)' % LIBS,
])


class TestParse(base.TestCase):

    def test_leaf_of_each_sample_of_the_agents_only(self):
        got = cp.parse_perf_script(SCRIPT.splitlines(), [396, 397])
        self.assertEqual({'396', '397'}, set(got))
        self.assertEqual(collections.Counter({
            ('[kernel.kallsyms]', '_copy_from_iter'): 1,
            ('libcrypto.so.3', '[unknown]'): 1}), got['396'])
        # the last sample has no blank line after it: still counted
        self.assertEqual(collections.Counter({
            ('libc.so.6', '__memmove_avx512_unaligned_erms'): 1,
            ('libcrypto.so.3', '[unknown]'): 1}), got['397'])

    def test_a_process_without_samples_has_none(self):
        got = cp.parse_perf_script(SCRIPT.splitlines(), [12345])
        self.assertEqual({'12345': collections.Counter()}, got)


class TestShares(base.TestCase):

    def test_by_object_and_by_symbol(self):
        counter = collections.Counter({
            ('libcrypto.so.3', '[unknown]'): 3,
            ('[kernel.kallsyms]', '_copy_to_iter'): 1,
            ('[kernel.kallsyms]', '_copy_from_iter'): 0,
            ('libc.so.6', 'memmove'): 4,
            ('libcrypto.so.3', 'EVP_EncryptUpdate'): 2})
        self.assertEqual([('libcrypto.so.3', 50.0), ('libc.so.6', 40.0),
                          ('[kernel.kallsyms]', 10.0)],
                         cp.shares(counter, 0))
        self.assertEqual([('libc.so.6:memmove', 40.0),
                          ('libcrypto.so.3:[unknown]', 30.0)],
                         cp.shares(counter, 1, 2))

    def test_nothing_sampled(self):
        self.assertEqual([], cp.shares(collections.Counter()))
