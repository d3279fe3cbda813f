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

"""The migration journal: durable, merged, recoverable."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

from tests import base
from xsm_driver.core.migration import errors
from xsm_driver.core.migration import journal


class JournalTestCase(base.TestCase):

    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.make_tempdir(), 'state',
                                 'journal.sqlite')
        self.now = [1000.0]

    def open(self):
        j = journal.Journal(self.path, clock=lambda: self.now[0])
        self.addCleanup(j.close)
        return j


class JournalTest(JournalTestCase):

    def test_record_and_get(self):
        j = self.open()
        self.assertIsNone(j.get('m1'))
        entry = j.record('m1', 'source', 'preflight', vm='vm-1',
                         vdis=['a', 'b'])
        self.assertEqual(journal.Entry('m1', 'source', 'preflight',
                                       {'vm': 'vm-1', 'vdis': ['a', 'b']},
                                       1000.0, 1000.0), entry)
        self.assertEqual(entry, j.get('m1'))
        self.assertFalse(entry.finished)

    def test_state_is_merged_and_phase_set(self):
        j = self.open()
        j.record('m1', 'destination', 'preflight', sr='fast', a=1)
        self.now[0] = 1005.0
        entry = j.record('m1', 'destination', 'prepare-receive', a=2,
                         export='x')
        self.assertEqual('prepare-receive', entry.phase)
        self.assertEqual({'sr': 'fast', 'a': 2, 'export': 'x'}, entry.state)
        self.assertEqual((1000.0, 1005.0), (entry.created, entry.updated))
        self.assertEqual(entry, j.get('m1'))

    def test_unfinished_list_and_finish(self):
        j = self.open()
        for i, phase in enumerate(['copy', 'mirror', 'preflight']):
            self.now[0] = 1000.0 + i
            j.record('m%d' % i, 'source', phase)
        self.now[0] = 1010.0
        done = j.finish('m1', 'done', downtime=0.2)
        self.assertEqual('done', done.phase)
        self.assertEqual({'downtime': 0.2}, done.state)
        self.assertTrue(done.finished)
        j.finish('m2', 'aborted')
        self.assertEqual(['m0'], [e.id for e in j.unfinished()])
        self.assertEqual(['m2', 'm1', 'm0'], [e.id for e in j.list()])
        self.assertEqual(['m2'], [e.id for e in j.list(limit=1)])

    def test_finish_checks(self):
        j = self.open()
        self.assertRaises(errors.MigrationNotFound, j.finish, 'nope', 'done')
        j.record('m1', 'source', 'copy')
        err = self.assertRaises(errors.InvalidPhase, j.finish, 'm1', 'copy')
        self.assertIn('done or aborted', str(err))
        self.assertEqual('copy', j.get('m1').phase)

    def test_record_checks(self):
        j = self.open()
        self.assertRaises(errors.InvalidPhase, j.record, 'm1', 'source',
                          'copying')
        self.assertRaises(ValueError, j.record, 'm1', 'sauce', 'copy')
        self.assertRaises(TypeError, j.record, 'm1', 'source', 'copy',
                          blob=object())
        self.assertIsNone(j.get('m1'))

    def test_both_roles_of_a_move_within_the_host(self):
        j = self.open()
        j.record('m1', 'source', 'copy', snapshot='s')
        j.record('m1', 'destination', 'prepare-receive', created=['x'])
        err = self.assertRaises(errors.JournalError, j.get, 'm1')
        self.assertIn('both destination and source', str(err))
        self.assertRaises(errors.JournalError, j.finish, 'm1', 'aborted')
        src = j.get('m1', role='source')
        dst = j.get('m1', role='destination')
        self.assertEqual(('copy', {'snapshot': 's'}), (src.phase, src.state))
        self.assertEqual(('prepare-receive', {'created': ['x']}),
                         (dst.phase, dst.state))
        self.assertEqual([('m1', 'destination'), ('m1', 'source')],
                         sorted((e.id, e.role) for e in j.unfinished()))
        j.finish('m1', 'aborted', role='destination')
        self.assertEqual('copy', j.get('m1', 'source').phase)
        self.assertEqual(['source'], [e.role for e in j.unfinished()])
        self.assertIsNone(j.get('m2', role='source'))
        self.assertRaises(errors.MigrationNotFound, j.finish, 'm1', 'done',
                          role='nope')

    def test_durable_across_reopen(self):
        j = self.open()
        j.record('m1', 'source', 'mirror', remote='nbd://h:1/x')
        j.record('m2', 'destination', 'copy')
        j.finish('m2', 'done')
        j.close()
        j = self.open()
        self.assertEqual({'remote': 'nbd://h:1/x'}, j.get('m1').state)
        self.assertEqual(['m1'], [e.id for e in j.unfinished()])
        self.assertEqual('done', j.get('m2').phase)

    def test_many_threads(self):
        j = self.open()

        def work(n):
            for i in range(20):
                j.record('m%d' % n, 'source', 'copy', **{'k%d' % i: i})

        threads = [threading.Thread(target=work, args=(n,))
                   for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(8, len(j.unfinished()))
        self.assertEqual({'k%d' % i: i for i in range(20)},
                         j.get('m3').state)

    def test_closed(self):
        j = self.open()
        j.close()
        j.close()
        err = self.assertRaises(errors.JournalError, j.get, 'm1')
        self.assertIn(self.path, str(err))


class DamagedJournalTest(JournalTestCase):

    def test_corrupt_file(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, 'wb') as f:
            f.write(b'this is not a database' * 100)
        err = self.assertRaises(errors.JournalError, journal.Journal,
                                self.path)
        self.assertIn(self.path, str(err))
        self.assertIn('corrupt', str(err))

    def test_newer_schema(self):
        os.makedirs(os.path.dirname(self.path))
        db = sqlite3.connect(self.path)
        db.execute('PRAGMA user_version=%d' % (journal.SCHEMA_VERSION + 1))
        db.close()
        err = self.assertRaises(errors.JournalError, journal.Journal,
                                self.path)
        self.assertIn(self.path, str(err))
        self.assertIn('newer', str(err))

    def test_schema_version_written(self):
        self.open().close()
        db = sqlite3.connect(self.path)
        self.addCleanup(db.close)
        self.assertEqual(journal.SCHEMA_VERSION,
                         db.execute('PRAGMA user_version').fetchone()[0])


class CrashTest(JournalTestCase):

    def test_record_survives_sigkill_right_after_it_returns(self):
        child = textwrap.dedent('''
            import os, signal, sys
            from xsm_driver.core.migration import journal
            j = journal.Journal(sys.argv[1])
            j.record('m1', 'source', 'preflight')
            j.record('m1', 'source', 'snapshot', snapshot='s.vhd')
            os.kill(os.getpid(), signal.SIGKILL)
        ''')
        proc = subprocess.run([sys.executable, '-c', child, self.path],
                              cwd=base.REPO_TOP, capture_output=True,
                              timeout=60)
        self.assertEqual(-signal.SIGKILL, proc.returncode, proc.stderr)
        entry = self.open().get('m1')
        self.assertEqual('snapshot', entry.phase)
        self.assertEqual({'snapshot': 's.vhd'}, entry.state)
