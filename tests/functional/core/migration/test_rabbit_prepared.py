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

"""The destination prepares the receive ahead (Nova's order), over RabbitMQ.

Two ``xsm-agent`` processes on the real broker: ``migrate_vm_begin`` on
the source, ``receive_prepare_ahead`` on the destination, ``migrate_vm``
with the id and the receive on the source (RPC API 1.1).
"""

import time

from tests.functional.core.migration import test_rabbit
from xsm_driver.core.migration import errors

MiB = test_rabbit.MiB


class TestPreparedAheadOverRPC(test_rabbit.RabbitMigrationTest):

    def begin(self, vm, **options):
        return self.a.migrate_vm_begin(
            vm['uuid'], self.agents['b'].name,
            {d['vdi']: 'sr-b' for d in vm['disks']}, {'net0': 'net0'},
            **options)

    def test_the_three_steps_move_the_vm(self):
        vm = self.make_vm(snapshots=1)
        begun = self.begin(vm)
        receive = self.b.receive_prepare_ahead(begun['request'])
        self.assertEqual(set(d['vdi'] for d in vm['disks']),
                         set(receive['exports']))
        self.assertEqual(2 * len(vm['disks']), len(self.b.vdi_list()))
        mid = self.a.migrate_vm(vm['uuid'], self.agents['b'].name,
                                {d['vdi']: 'sr-b' for d in vm['disks']},
                                {'net0': 'net0'}, migration_id=begun['id'],
                                receive=receive)
        self.assertEqual(begun['id'], mid)
        status = self.wait(self.a, mid)
        self.assertEqual('done', status['phase'],
                         '%s%s' % (status['error'], self.logs()))
        self.assertGreater(status['guest_writes_during_migration'], 0)
        self.assertEqual([], self.a.vm_list())
        self.assertEqual([], self.a.vdi_list())
        self.assert_guest_verifies(self.b, vm, 40 * MiB)
        # claimed once: a second claim is refused
        exc = self.assertRaises(errors.InvalidPhase,
                                api_claim(self.b), mid,
                                self.agents['a'].name)
        self.assertIn('claimed already', str(exc))

    def test_an_unclaimed_receive_times_out(self):
        vm = self.make_vm(snapshots=0)
        before = test_rabbit.records(self.a.vdi_list())
        begun = self.begin(vm)
        receive = self.b.receive_prepare_ahead(begun['request'],
                                               prepared_timeout=1)
        self.assertEqual(1, receive['prepared_timeout'])
        self.assertNotEqual([], self.b.vdi_list())
        deadline = time.monotonic() + 30
        while self.b.vdi_list() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assert_nothing_received()
        # the begun migration is dropped on request, with its credentials
        self.assertEqual('aborted',
                         self.a.migration_abort(begun['id'])['phase'])
        self.assertEqual(before, test_rabbit.records(self.a.vdi_list()))
        self.assert_guest_verifies(self.a, vm)


def api_claim(client):
    return lambda mid, source: client.call('receive_claim', version='1.1',
                                           migration=mid,
                                           source_host=source)
