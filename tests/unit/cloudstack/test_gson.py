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

import doctest
import json

from tests import base
from xsm_driver.cloudstack import commands
from xsm_driver.cloudstack import gson


def load_tests(loader, tests, ignore):
    tests.addTests(doctest.DocTestSuite(gson))
    tests.addTests(doctest.DocTestSuite(commands))
    return tests


class TestGson(base.TestCase):

    def test_round_trip_of_the_envelope(self):
        items = [('com.cloud.agent.api.X', {'a': 1, 'b': None,
                                            'c': [None, {'d': None}]})]
        text = gson.encode(items)
        self.assertEqual('[{"com.cloud.agent.api.X":{"a":1,"c":[null,{}]}}]',
                         text)
        self.assertEqual([('com.cloud.agent.api.X',
                           {'a': 1, 'c': [None, {}]})], gson.decode(text))

    def test_a_single_object_is_one_command(self):
        self.assertEqual([('C', {})], gson.decode(b'{"C": {}}'))

    def test_pairs_and_wrapped_interfaces(self):
        self.assertEqual({'t': 1, 'u': 'x'}, gson.pair(1, 'x'))
        self.assertEqual((1, None), gson.unpair({'t': 1}))
        self.assertRaises(gson.GsonError, gson.unpair, {'first': 1})
        self.assertEqual(('C', {'a': 1}), gson.unwrap(gson.wrap('C',
                                                                {'a': 1})))

    def test_errors_name_what_is_wrong(self):
        for text, words in (('[', 'invalid JSON'), ('[]', 'non-empty'),
                            ('[{"A": 1}]', 'fields must be an object'),
                            (b'\xff', 'not UTF-8')):
            exc = self.assertRaises(gson.GsonError, gson.decode, text)
            self.assertIn(words, str(exc))


class TestAnswer(base.TestCase):

    def test_a_successful_answer_has_gsons_defaults(self):
        answer = commands.success(commands.COMPLETE, volumeTos=[])
        self.assertEqual(
            [{'com.cloud.agent.api.MigrateWithStorageCompleteAnswer': {
                'volumeTos': [], 'result': True, 'contextMap': {},
                'wait': 0, 'bypassHostMaintenance': False}}],
            json.loads(answer.to_gson()))

    def test_a_failed_answer_carries_details_and_no_fields(self):
        error = ValueError('boom')
        answer = commands.failure(commands.SEND, error)
        fields = json.loads(answer.to_gson())[0][
            'com.cloud.agent.api.MigrateWithStorageSendAnswer']
        self.assertEqual((False, 'boom'), (fields['result'],
                                           fields['details']))
        self.assertIs(error, answer.error)
