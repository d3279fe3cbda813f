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

import json

from tests import base
from xsm_driver.hypervisor import qmp


class TestParser(base.TestCase):

    def test_messages_split_anywhere(self):
        stream = (b'{"QMP": {"version": {}, "capabilities": []}}\r\n'
                  b'{"return": {}, "id": "xsm-1"}\r\n'
                  b'{"event": "STOP", "data": {}, "timestamp": {}}\r\n')
        for cut in range(1, len(stream)):
            p = qmp.Parser()
            msgs = p.feed(stream[:cut]) + p.feed(stream[cut:])
            self.assertEqual(
                [qmp.GREETING, qmp.RETURN, qmp.EVENT],
                [qmp.classify(m) for m in msgs], cut)
            self.assertEqual(0, p.pending)

    def test_partial_line_waits(self):
        p = qmp.Parser()
        self.assertEqual([], p.feed(b'{"return": '))
        self.assertEqual(11, p.pending)
        self.assertEqual([{'return': 1}], p.feed(b'1}\n'))

    def test_blank_lines_ignored(self):
        self.assertEqual([{'return': {}}],
                         qmp.Parser().feed(b'\r\n\n{"return": {}}\n\r\n'))

    def test_line_too_long(self):
        p = qmp.Parser(max_line=16)
        self.assertRaises(qmp.QMPProtocolError, p.feed, b'x' * 17)
        p = qmp.Parser(max_line=16)
        self.assertRaises(qmp.QMPProtocolError, p.feed,
                          b'{"return": "%s"}\n' % (b'y' * 20))

    def test_not_json(self):
        self.assertRaises(qmp.QMPProtocolError, qmp.Parser().feed,
                          b'hello\n')
        self.assertRaises(qmp.QMPProtocolError, qmp.Parser().feed,
                          b'[1, 2]\n')
        self.assertRaises(qmp.QMPProtocolError, qmp.Parser().feed,
                          b'{"a": "\xff"}\n')


class TestMessages(base.TestCase):

    def test_encode_command(self):
        raw = qmp.encode_command('stop', ident='xsm-3')
        self.assertTrue(raw.endswith(b'\r\n'))
        self.assertEqual({'execute': 'stop', 'id': 'xsm-3'},
                         json.loads(raw))
        self.assertEqual(
            {'execute': 'migrate', 'arguments': {'uri': 'tcp:x:1'},
             'id': 7},
            json.loads(qmp.encode_command('migrate', {'uri': 'tcp:x:1'}, 7)))

    def test_classify(self):
        self.assertEqual(qmp.GREETING, qmp.classify({'QMP': {}}))
        self.assertEqual(qmp.RETURN, qmp.classify({'return': {}}))
        self.assertEqual(qmp.ERROR, qmp.classify(
            {'error': {'class': 'GenericError', 'desc': 'x'}}))
        self.assertEqual(qmp.EVENT, qmp.classify({'event': 'STOP'}))
        self.assertRaises(qmp.QMPProtocolError, qmp.classify, {'x': 1})

    def test_result(self):
        self.assertEqual({'status': 'running'}, qmp.result(
            {'return': {'status': 'running'}, 'id': 1}, 'query-status'))
        exc = self.assertRaises(
            qmp.QMPCommandError, qmp.result,
            {'error': {'class': 'CommandNotFound',
                       'desc': "The command nope has not been found"}},
            'nope')
        self.assertIn('nope failed: CommandNotFound', str(exc))
