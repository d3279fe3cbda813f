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

"""The ``model`` hypervisor driver: the verifying workload plays the guest.

For hosts without QEMU and for scale tests. A guest is a
:class:`xsm_driver.core.migration.workload.Workload` -- one thread per
disk writing generation-stamped blocks to each disk's block device and
reading them back -- and its model of the disks is its "memory". Pause
parks the threads between two I/Os; shutdown and destroy stop them; reboot
restarts the threads with the same model (it describes the disks, which a
reboot does not change: an empty model would expect zeros). Nothing
outlives the agent: :meth:`ModelDriver.recover` finds no guest.
"""

import threading

from xsm_driver.core.migration import workload as workload_mod
from xsm_driver.hypervisor import base


class ModelDriver(base.Driver):
    """Run guests as verifying workload threads.

    :param rate: writes per second per disk when the spec's verifier
        options do not say (``None``: as fast as it can).
    """

    name = 'model'

    def __init__(self, rate=50, **_ignored):
        self.rate = rate
        self._guests = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, conf, state_dir=None):
        return cls()

    def _workload(self, spec, models=None):
        devices = [d.device for d in spec.disks]
        if any(dev is None for dev in devices):
            raise base.HypervisorError('guest %s: the model driver needs a '
                                       'block device for every disk'
                                       % spec.name)
        if models is None:
            models = [workload_mod.DiskModel(i,
                                             dev.size // workload_mod.BLOCK)
                      for i, dev in enumerate(devices)]
        return workload_mod.Workload(
            devices, models, rate=spec.verifier.get('rate', self.rate),
            read_ratio=float(spec.verifier.get('reads', 1.0)))

    def start(self, spec, paused=False):
        with self._lock:
            if spec.name in self._guests:
                raise base.GuestExists(driver=self.name, name=spec.name)
            work = self._workload(spec)
            self._guests[spec.name] = [spec, work, base.RUNNING]
        work.start()
        if paused:
            self.pause(spec.name)

    def _get(self, name):
        with self._lock:
            entry = self._guests.get(name)
        if entry is None:
            raise base.GuestNotFound(driver=self.name, name=name)
        return entry

    def workload(self, name):
        """The guest's :class:`Workload` (counters, export, verify)."""
        return self._get(name)[1]

    def power_state(self, name):
        spec, work, state = self._get(name)
        if state != base.HALTED and work.error is not None:
            return base.CRASHED
        return state

    def pause(self, name):
        entry = self._get(name)
        entry[1].suspend()
        entry[2] = base.PAUSED

    def resume(self, name):
        entry = self._get(name)
        entry[1].resume()
        entry[2] = base.RUNNING

    def reboot(self, name):
        entry = self._get(name)
        entry[1].stop()
        entry[1] = self._workload(entry[0], entry[1].models).start()
        entry[2] = base.RUNNING

    def shutdown(self, name, timeout=None):
        self.destroy(name)
        return True

    def destroy(self, name):
        entry = self._get(name)
        entry[1].stop()
        entry[2] = base.HALTED

    def list(self):
        with self._lock:
            return sorted(self._guests)

    def forget(self, name):
        with self._lock:
            entry = self._guests.pop(name, None)
        if entry is not None:
            entry[1].stop()

    def recover(self):
        return {}

    def close(self):
        with self._lock:
            entries = list(self._guests.values())
        for entry in entries:
            entry[1].stop()
