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

import os

from tests import base
from xsm_driver.core.block import backends
from xsm_driver.core.migration import workload
from xsm_driver import hypervisor
from xsm_driver.hypervisor import base as hv_base


class TestModelDriver(base.TestCase):

    check_leaks = True

    def disk(self, size=1 << 20):
        path = os.path.join(self.make_tempdir(), 'disk.raw')
        with open(path, 'wb') as f:
            f.truncate(size)
        dev = backends.RawDevice(path, writable=True)
        self.addCleanup(dev.close)
        return dev

    def test_life_cycle(self):
        drv = hypervisor.load('model')
        self.addCleanup(drv.close)
        dev = self.disk()
        spec = hv_base.GuestSpec('g', [hv_base.DiskSpec('d0', device=dev)],
                                 verifier={'rate': 500})
        drv.start(spec)
        self.assertRaises(hv_base.GuestExists, drv.start, spec)
        self.assertEqual(['g'], drv.list())
        self.assertEqual('running', drv.power_state('g'))
        drv.pause('g')
        self.assertEqual('paused', drv.power_state('g'))
        writes = drv.workload('g').writes
        drv.resume('g')
        self.assertEqual('running', drv.power_state('g'))
        drv.reboot('g')
        self.assertEqual('running', drv.power_state('g'))
        work = drv.workload('g')
        self.assertTrue(drv.shutdown('g'))
        self.assertEqual('halted', drv.power_state('g'))
        self.assertIsNone(work.error)
        self.assertGreaterEqual(writes, 0)
        for model in work.models:
            workload.verify(dev, model)
        self.assertEqual({}, drv.recover())
        drv.forget('g')
        self.assertRaises(hv_base.GuestNotFound, drv.power_state, 'g')

    def test_needs_devices(self):
        drv = hypervisor.load('model')
        self.assertRaises(hv_base.HypervisorError, drv.start,
                          hv_base.GuestSpec('g', [hv_base.DiskSpec('d0')]))
