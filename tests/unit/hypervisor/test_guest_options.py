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

"""The checks of a VM record's ``qemu`` options (hypervisor.base)."""

import os

from tests import base
from xsm_driver.hypervisor import base as hv_base


class TestGuestOptions(base.TestCase):

    def refused(self, options, *words):
        exc = self.assertRaises(hv_base.InvalidGuestOptions,
                                hv_base.guest_options, options)
        for word in words:
            self.assertIn(word, str(exc))

    def test_good_options_are_kept(self):
        kernel = os.path.join(self.make_tempdir(), 'vmlinuz')
        open(kernel, 'wb').close()
        options = {'memory_mib': 128, 'vcpus': 2, 'kernel': kernel,
                   'cmdline': 'quiet', 'verifier': {'rate': 0, 'blocks': 8},
                   'firmware': 'seabios'}
        got = hv_base.guest_options(options)
        self.assertEqual(options, got)
        got['verifier']['rate'] = 5             # a copy, not the caller's
        self.assertEqual(0, options['verifier']['rate'])
        self.assertIsNone(hv_base.guest_options(None))
        self.assertEqual({}, hv_base.guest_options({}))

    def test_each_wrong_option_is_named(self):
        self.refused([], 'expected an object')
        self.refused({'memory': 128}, "unknown option 'memory'",
                     'memory_mib')
        self.refused({'memory_mib': 8}, 'memory_mib must be int in [16,')
        self.refused({'memory_mib': '128'}, 'memory_mib', "'128'")
        self.refused({'vcpus': True}, 'vcpus')
        self.refused({'vcpus': 0}, 'vcpus must be int in [1, 256]')
        self.refused({'cmdline': 'a\nb'}, 'cmdline must be one line')
        self.refused({'firmware': 'ovmf'}, 'firmware must be one of qboot, '
                     "seabios, not 'ovmf'")
        self.refused({'firmware': 1}, 'firmware must be str')
        self.refused({'verifier': {'speed': 1}},
                     "unknown verifier option 'speed'", 'rate')
        self.refused({'verifier': {'rate': -1}}, 'verifier option rate',
                     '[0, 1000000]')
        self.refused({'verifier': {'report_ms': 1.5}}, 'report_ms')
        self.refused({'verifier': 'rate=5'}, 'verifier must be dict')

    def test_kernel_and_initrd_are_files_of_this_host(self):
        folder = self.make_tempdir()
        self.refused({'kernel': 'vmlinuz'}, "kernel 'vmlinuz' is not an "
                     'absolute path')
        self.refused({'initrd': folder}, 'initrd')
        self.refused({'initrd': os.path.join(folder, 'gone')}, 'initrd')
