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

import gc
import threading

from tests import base
from xsm_driver.core.migration import collector


class TestHeld(base.TestCase):

    def setUp(self):
        super().setUp()
        self.addCleanup(gc.enable if gc.isenabled() else gc.disable)
        gc.enable()

    def test_no_collection_inside_nested_and_threaded_holds(self):
        started = []
        gc.callbacks.append(lambda phase, info: started.append(phase))
        self.addCleanup(gc.callbacks.pop)
        with collector.held():
            self.assertFalse(gc.isenabled())
            other = threading.Event()
            release = threading.Event()

            def hold():
                with collector.held():
                    other.set()
                    release.wait(10)
            t = threading.Thread(target=hold)
            t.start()
            other.wait(10)
            with collector.held():
                pass
            for _ in range(20000):      # far past the collector's threshold
                cycle = []
                cycle.append(cycle)
            self.assertEqual([], started)
            self.assertFalse(gc.isenabled())
        # the other thread still holds it
        self.assertFalse(gc.isenabled())
        release.set()
        t.join()
        self.assertTrue(gc.isenabled())

    def test_a_collector_disabled_before_stays_disabled(self):
        gc.disable()
        with collector.held():
            pass
        self.assertFalse(gc.isenabled())

    def test_an_error_inside_releases(self):
        def fail():
            with collector.held():
                raise ValueError('x')
        self.assertRaises(ValueError, fail)
        self.assertTrue(gc.isenabled())
