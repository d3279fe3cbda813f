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

"""The four commands, as CloudStack's JSON in, answers' JSON checked.

The agents are fakes that keep what they were asked; the real engine is
in the functional tests.
"""

import json

from tests import base
from tests.unit.cloudstack import fixtures
from xsm_driver.cloudstack import gson
from xsm_driver.cloudstack import resource
from xsm_driver.core.migration import errors

MiB = 1 << 20
API = 'com.cloud.agent.api.'


class FakeAgent:
    """What the resource asks of an agent, answered from memory."""

    def __init__(self, world, name, srs):
        self.world, self.name = world, name
        self.srs = srs
        self.vms = []
        self.calls = []
        self.refuse = None
        self.end = 'done'

    def host_info(self):
        return {'name': self.name, 'vms': len(self.vms),
                'active_migrations': 0,
                'srs': [{'name': s, 'type': 'vhd', 'size': 100 * MiB,
                         'free': 50 * MiB, 'path': '/srv/' + s}
                        for s in self.srs]}

    def vm_list(self):
        return [dict(vm) for vm in self.vms]

    def migrate_vm(self, vm, dest_host, vdi_map, vif_map=None, **options):
        self.calls.append(('migrate_vm', vm, dest_host, vdi_map, vif_map))
        if self.refuse is not None:
            raise self.refuse
        [record] = [v for v in self.vms if v['uuid'] == vm]
        new = {d['vdi']: 'new-' + d['vdi'] for d in record['disks']}
        if self.end == 'done':
            self.vms.remove(record)
            self.world[dest_host].vms.append(dict(record, disks=[
                dict(d, vdi=new[d['vdi']], sr=vdi_map[d['vdi']])
                for d in record['disks']]))
        self.status = {'id': 'mid-1', 'phase': self.end,
                       'finished': 1.0, 'downtime_ms': 3.0,
                       'error': None if self.end == 'done' else
                       'No space left on device',
                       'result': {'vdis': new, 'vm': vm}
                       if self.end == 'done' else None}
        return 'mid-1'

    def migration_get(self, mid):
        return self.status

    def migration_abort(self, mid):
        self.calls.append(('migration_abort', mid))


VM = {'uuid': '3b0c5f0e-7a71-4d1e-9b7a-0f4c9e1d2a3b', 'name': 'i-2-42-VM',
      'power_state': 'running', 'vifs': ['net0'],
      'disks': [{'name': 'xvda', 'vdi': 'aaaa0000-0000-4000-8000-000000000001',
                 'sr': 'sr-a'},
                {'name': 'xvdb', 'vdi': 'aaaa0000-0000-4000-8000-000000000002',
                 'sr': 'sr-a'}]}
SIZES = [8 * MiB, 12 * MiB]


class ResourceTest(base.TestCase):

    check_leaks = True

    def setUp(self):
        super().setUp()
        self.world = {}
        self.world['host-a'] = FakeAgent(self.world, 'host-a', ['sr-a'])
        self.world['host-b'] = FakeAgent(self.world, 'host-b',
                                         ['sr-b', 'sr-c'])
        self.world['host-a'].vms.append(json.loads(json.dumps(VM)))

    def resource(self, host, **kw):
        return resource.Resource(host, self.world.__getitem__,
                                 hosts=sorted(self.world), poll_interval=0,
                                 **kw)

    def answer(self, host, text):
        out = json.loads(self.resource(host).handle(text))
        self.assertEqual(1, len(out))
        [(name, fields)] = out[0].items()
        return name, fields

    def receive_answer(self, labels=('sr-b', 'sr-c')):
        return self.answer('host-b', fixtures.receive(VM, SIZES,
                                                      list(labels)))


class TestReceive(ResourceTest):

    def test_answers_the_maps_and_the_token(self):
        name, fields = self.receive_answer()
        self.assertEqual(API + 'MigrateWithStorageReceiveAnswer', name)
        self.assertIs(True, fields['result'])
        self.assertNotIn('details', fields)
        self.assertEqual({}, fields['contextMap'])
        self.assertEqual(0, fields['wait'])
        self.assertIs(False, fields['bypassHostMaintenance'])
        sent = json.loads(fixtures.receive(VM, SIZES, ['sr-b', 'sr-c']))[0][
            API + 'MigrateWithStorageReceiveCommand']
        # each VolumeTO comes back whole, paired with its destination SR
        self.assertEqual([p['t'] for p in sent['volumeToStorageUuid']],
                         [p['t'] for p in fields['volumeToSr']])
        self.assertEqual([{'host': 'host-b', 'sr': 'sr-b'},
                          {'host': 'host-b', 'sr': 'sr-c'}],
                         [p['u'] for p in fields['volumeToSr']])
        self.assertEqual(sent['vm']['nics'],
                         [p['t'] for p in fields['nicToNetwork']])
        self.assertEqual([{'host': 'host-b', 'network': 'net0'}],
                         [p['u'] for p in fields['nicToNetwork']])
        self.assertEqual('host-b', fields['token']['host'])
        self.assertTrue(all(isinstance(v, str)
                            for v in fields['token'].values()))
        self.assertEqual([], self.world['host-b'].calls)

    def test_a_label_the_host_has_no_sr_for_is_refused(self):
        name, fields = self.receive_answer(labels=('sr-b', 'nfs-gold'))
        self.assertEqual(API + 'MigrateWithStorageReceiveAnswer', name)
        self.assertIs(False, fields['result'])
        for word in ('MigrateWithStorageReceiveCommand', 'host-b',
                     "'nfs-gold'", 'sr-b, sr-c', '[cloudstack]sr_labels'):
            self.assertIn(word, fields['details'])
        self.assertNotIn('volumeToSr', fields)
        self.assertNotIn('token', fields)

    def test_sr_labels_map_cloudstack_pool_uuids(self):
        out = json.loads(self.resource(
            'host-b', sr_labels={'7f1c-pool': 'sr-c'}).handle(
            fixtures.receive(VM, SIZES, ['sr-b', '7f1c-pool'])))
        fields = out[0][API + 'MigrateWithStorageReceiveAnswer']
        self.assertEqual('sr-c', fields['volumeToSr'][1]['u']['sr'])

    def test_the_pre_4_9_volume_to_filer_form(self):
        # CloudStack before 4.9 paired each VolumeTO with a StorageFilerTO
        text = fixtures.receive(VM, SIZES, ['sr-b', 'sr-c'])
        [cmd] = json.loads(text)
        fields = cmd[API + 'MigrateWithStorageReceiveCommand']
        fields['volumeToFiler'] = [
            {'t': p['t'], 'u': json.loads(fixtures.render(
                fixtures.FILER, label=p['u']))}
            for p in fields.pop('volumeToStorageUuid')]
        _, out = self.answer('host-b', json.dumps([cmd]))
        self.assertIs(True, out['result'], out.get('details'))
        self.assertEqual(['sr-b', 'sr-c'],
                         [p['u']['sr'] for p in out['volumeToSr']])

    def test_without_a_volume_map_it_names_both_forms(self):
        [cmd] = json.loads(fixtures.receive(VM, SIZES, ['sr-b', 'sr-c']))
        del cmd[API + 'MigrateWithStorageReceiveCommand'][
            'volumeToStorageUuid']
        _, out = self.answer('host-b', json.dumps([cmd]))
        self.assertIs(False, out['result'])
        self.assertIn("'volumeToStorageUuid' (or, before CloudStack 4.9, "
                      "'volumeToFiler') is missing", out['details'])

    def test_a_vm_already_on_the_destination_is_refused(self):
        self.world['host-b'].vms.append(dict(VM))
        _, fields = self.receive_answer()
        self.assertIs(False, fields['result'])
        self.assertIn('already on host host-b', fields['details'])


class TestSendAndComplete(ResourceTest):

    def send(self):
        _, received = self.receive_answer()
        text = fixtures.send(VM, SIZES, {
            API + 'MigrateWithStorageReceiveAnswer': received})
        return self.answer('host-a', text)

    def test_send_runs_the_migration_from_the_source(self):
        name, fields = self.send()
        self.assertEqual(API + 'MigrateWithStorageSendAnswer', name)
        self.assertIs(True, fields['result'], fields.get('details'))
        [call] = self.world['host-a'].calls
        self.assertEqual(('migrate_vm', VM['uuid'], 'host-b',
                          {VM['disks'][0]['vdi']: 'sr-b',
                           VM['disks'][1]['vdi']: 'sr-c'},
                          {'net0': 'net0'}), call)
        self.assertEqual(['new-' + d['vdi'] for d in VM['disks']],
                         [v['path'] for v in fields['volumeToSet']])

    def test_complete_answers_the_new_paths(self):
        self.send()
        name, fields = self.answer('host-b', fixtures.complete(VM, SIZES))
        self.assertEqual(API + 'MigrateWithStorageCompleteAnswer', name)
        self.assertIs(True, fields['result'])
        # the ISO drive is no volume; ids are the VolumeObjectTOs' ids
        self.assertEqual([
            {'path': 'new-' + VM['disks'][0]['vdi'], 'id': 100,
             'accountId': 0, 'directDownload': False, 'deployAsIs': False},
            {'path': 'new-' + VM['disks'][1]['vdi'], 'id': 101,
             'accountId': 0, 'directDownload': False, 'deployAsIs': False}],
            fields['volumeTos'])

    def test_a_refused_migration_answers_false_with_the_reason(self):
        self.world['host-a'].refuse = errors.InsufficientSpace(
            sr='sr-b', host='host-b', needed=40 * MiB, free=20 * MiB)
        _, fields = self.send()
        self.assertIs(False, fields['result'])
        self.assertIn("SR 'sr-b' on host host-b needs 40.0 MiB",
                      fields['details'])
        self.assertIn('MigrateWithStorageSendCommand on host host-a',
                      fields['details'])
        self.assertNotIn('volumeToSet', fields)
        self.assertEqual([], self.world['host-b'].vms)

    def test_a_migration_that_aborts_answers_false(self):
        self.world['host-a'].end = 'aborted'
        _, fields = self.send()
        self.assertIs(False, fields['result'])
        self.assertIn('ended aborted: No space left on device',
                      fields['details'])
        self.assertIn('keeps running on host-a', fields['details'])

    def test_complete_without_the_vm_fails(self):
        name, fields = self.answer('host-b', fixtures.complete(VM, SIZES))
        self.assertIs(False, fields['result'])
        self.assertIn('is not on host host-b', fields['details'])

    def test_a_token_naming_an_unknown_host_is_refused(self):
        _, received = self.receive_answer()
        received['token']['host'] = 'host-z'
        _, fields = self.answer('host-a', fixtures.send(VM, SIZES, {
            API + 'MigrateWithStorageReceiveAnswer': received}))
        self.assertIs(False, fields['result'])
        self.assertIn("host 'host-z' is not managed here", fields['details'])
        self.assertEqual([], self.world['host-a'].calls)


class TestMigrateWithStorage(ResourceTest):

    def test_sent_to_the_destination_it_moves_the_vm(self):
        name, fields = self.answer('host-b', fixtures.migrate(
            VM, SIZES, ['sr-b', 'sr-b']))
        self.assertEqual(API + 'MigrateWithStorageAnswer', name)
        self.assertIs(True, fields['result'], fields.get('details'))
        self.assertEqual([100, 101], [v['id'] for v in fields['volumeTos']])
        self.assertEqual(['new-' + d['vdi'] for d in VM['disks']],
                         [v['path'] for v in fields['volumeTos']])
        self.assertEqual('host-b',
                         self.world['host-a'].calls[0][2])
        self.assertEqual([], self.world['host-b'].calls)

    def test_sent_to_the_source_with_tgthost(self):
        [cmd] = json.loads(fixtures.migrate(VM, SIZES, ['sr-c', 'sr-b']))
        cmd[API + 'MigrateWithStorageCommand']['tgtHost'] = 'host-b'
        name, fields = self.answer('host-a', json.dumps([cmd]))
        self.assertEqual(API + 'MigrateWithStorageAnswer', name)
        self.assertIs(True, fields['result'], fields.get('details'))
        [call] = self.world['host-a'].calls
        self.assertEqual(('migrate_vm', VM['uuid'], 'host-b',
                          {VM['disks'][0]['vdi']: 'sr-c',
                           VM['disks'][1]['vdi']: 'sr-b'},
                          {'net0': 'net0'}), call)
        self.assertEqual([(100, 'new-' + VM['disks'][0]['vdi']),
                          (101, 'new-' + VM['disks'][1]['vdi'])],
                         [(v['id'], v['path']) for v in fields['volumeTos']])

    def test_a_failed_one_answers_false_and_moves_nothing(self):
        self.world['host-a'].refuse = errors.InsufficientSpace(
            sr='sr-b', host='host-b', needed=40 * MiB, free=20 * MiB)
        name, fields = self.answer('host-b', fixtures.migrate(
            VM, SIZES, ['sr-b', 'sr-b']))
        self.assertEqual(API + 'MigrateWithStorageAnswer', name)
        self.assertIs(False, fields['result'])
        self.assertIn("MigrateWithStorageCommand on host host-b failed: SR "
                      "'sr-b' on host host-b needs 40.0 MiB",
                      fields['details'])
        self.assertNotIn('volumeTos', fields)
        self.assertEqual([], self.world['host-b'].vms)


class TestProtocol(ResourceTest):

    def test_an_unknown_command_gets_an_unsupported_answer(self):
        name, fields = self.answer('host-a', json.dumps(
            [{API + 'StartCommand': {'vm': {}, 'wait': 0}}]))
        self.assertEqual(API + 'UnsupportedAnswer', name)
        self.assertIs(False, fields['result'])
        self.assertIn('MigrateWithStorageReceiveCommand', fields['details'])

    def test_a_command_without_its_vm_fails_clearly(self):
        _, fields = self.answer('host-b', json.dumps(
            [{API + 'MigrateWithStorageCompleteCommand': {'wait': 0}}]))
        self.assertIs(False, fields['result'])
        self.assertIn("field 'vm' is missing", fields['details'])

    def test_wrong_types_fail_clearly(self):
        """What an operator may get wrong: each answer names the field."""
        vm = {'name': VM['name'], 'uuid': VM['uuid']}
        vdi = VM['disks'][0]['vdi']
        complete = API + 'MigrateWithStorageCompleteCommand'
        receive = API + 'MigrateWithStorageReceiveCommand'
        send = API + 'MigrateWithStorageSendCommand'
        migrate = API + 'MigrateWithStorageCommand'
        token = {'host': 'host-b'}
        cases = [
            (complete, {'vm': 'i-2-42-VM'}, "field 'vm' must be dict"),
            (complete, {'vm': {'name': 5}}, "field 'name' must be str"),
            (complete, {'vm': dict(vm, disks='xvda')},
             "field 'disks' must be list"),
            (complete, {'vm': dict(vm, disks=[5])},
             'a DiskTO of vm.disks must be an object, not 5'),
            (complete, {'vm': dict(vm, disks=[{'diskSeq': 'first'}])},
             'DiskTO.diskSeq must be an integer, not "first"'),
            (complete, {'vm': dict(vm, disks=[{'data': 'x'}])},
             'DiskTO.data must be an object with exactly one key'),
            (complete, {'vm': dict(vm, nics=[5])},
             'a NicTO must be an object, not 5'),
            (complete, {'vm': dict(vm, nics=[{'deviceId': True}])},
             'NicTO.deviceId must be an integer, not true'),
            (receive, {'vm': vm, 'volumeToStorageUuid': 'sr-b'},
             "field 'volumeToStorageUuid' must be list"),
            (receive, {'vm': vm, 'volumeToStorageUuid': [5]},
             'volumeToStorageUuid entry must be a Pair'),
            (receive, {'vm': vm, 'volumeToStorageUuid': [
                {'t': {'path': vdi}, 'u': 7}]},
             'the storage label of volume %s must be a string' % vdi),
            (receive, {'vm': vm, 'volumeToStorageUuid': [
                {'t': 'vol', 'u': 'sr-b'}]},
             "a VolumeTO must be an object, not 'vol'"),
            (receive, {'vm': vm, 'volumeToStorageUuid': [
                {'t': {'id': 1}, 'u': 'sr-b'}]},
             "field 'path' is missing"),
            (receive, {'vm': vm, 'volumeToFiler': [
                {'t': {'path': vdi}, 'u': 'sr-b'}]},
             'the StorageFilerTO of volume %s in volumeToFiler must be an '
             'object' % vdi),
            (send, {'vm': vm, 'volumeToSr': [], 'token': 'host-b'},
             'token must be the map the MigrateWithStorageReceiveAnswer '
             'gave'),
            (send, {'vm': vm, 'volumeToSr': [], 'token': {'host': 5}},
             'token must be the map'),
            (send, {'vm': vm, 'volumeToSr': [{'t': {'path': vdi},
                                              'u': 5}], 'token': token},
             'volume %s has no destination SR in volumeToSr' % vdi),
            (send, {'vm': vm, 'volumeToSr': [{'t': {'path': vdi},
                                              'u': 'sr-b'}],
                    'nicToNetwork': [{'t': {'deviceId': 'eth0'}, 'u': 'n'}],
                    'token': token},
             'NicTO.deviceId must be an integer, not "eth0"'),
            (send, {'vm': vm, 'volumeToSr': [{'t': {'path': vdi},
                                              'u': 'sr-b'}],
                    'nicToNetwork': [{'t': {'deviceId': 7}, 'u': 'n'}],
                    'token': token},
             'NIC with deviceId 7: VM i-2-42-VM has 1 network interfaces'),
            (send, {'vm': vm, 'volumeToSr': [{'t': {'path': vdi},
                                              'u': 'sr-b'}],
                    'nicToNetwork': [{'t': {'deviceId': 0}, 'u': 5}],
                    'token': token},
             'NIC with deviceId 0: the network must be a string'),
            (migrate, {'vm': vm, 'volumeToFilerAsList': [
                {'t': {'path': vdi}, 'u': 'sr-b'}], 'tgtHost': 'host-b'},
             'the StorageFilerTO of volume %s in volumeToFilerAsList must '
             'be an object' % vdi),
            (migrate, {'vm': vm, 'volumeToFilerAsList': [
                {'t': {'path': vdi}, 'u': {'port': 0}}], 'tgtHost': 'host-b'},
             'has neither uuid nor path'),
            (migrate, {'vm': vm, 'volumeToFilerAsList': [
                {'t': {'path': vdi}, 'u': {'uuid': 'sr-b'}}], 'tgtHost': 5},
             'tgtHost must be a host name, not 5'),
            (migrate, {'vm': vm, 'volumeToFiler': {'{...}': {}}},
             'volumeToFilerAsList is missing'),
        ]
        for name, fields, words in cases:
            out = json.loads(self.resource('host-a').handle(json.dumps(
                [{name: fields}])))
            [(answer, got)] = out[0].items()
            self.assertIs(False, got['result'], (name, fields))
            self.assertIn(words, got['details'], (name, fields))
            self.assertTrue(got['details'].startswith(
                name.rsplit('.', 1)[1] + ' on host host-a failed: '),
                got['details'])
            for python in ('Error:', 'Traceback', 'Exception'):
                self.assertNotIn(python, got['details'])
        # none of them reached an agent
        self.assertEqual([], self.world['host-a'].calls)
        self.assertEqual([], self.world['host-b'].calls)

    def test_text_that_is_not_gson_raises(self):
        for text in ('{', '[]', '[{"a": 1, "b": 2}]', '[{"x": []}]', '7'):
            self.assertRaises(gson.GsonError,
                              self.resource('host-a').handle, text)

    def test_several_commands_get_answers_in_order(self):
        one = json.loads(fixtures.complete(VM, SIZES))
        out = json.loads(self.resource('host-a').handle(json.dumps(
            one + [{API + 'StopCommand': {}}])))
        self.assertEqual([API + 'MigrateWithStorageCompleteAnswer',
                          API + 'UnsupportedAnswer'],
                         [next(iter(a)) for a in out])
