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

"""The migration journal: what each migration on this host has done.

One SQLite database per host. Every phase change of every migration the
host takes part in (as source or destination) is written, and is durable
(``synchronous=FULL``) before :meth:`Journal.record` returns, so that an
agent restarting after a crash finds each unfinished migration and the
state it needs to finish it or roll it back.

A migration is journaled under its id and this host's role in it. A move
between two SRs of one host plays both roles here, so the key is
``(id, role)``; :meth:`Journal.get` and :meth:`Journal.finish` take the
role when the id alone is ambiguous.

The schema version is the database's ``user_version``; a database written
by a newer release is refused rather than misread.
"""

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time

from xsm_driver.core.migration import errors
from xsm_driver.core.migration import plan

LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ROLES = ('source', 'destination')

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS migrations (
        id TEXT NOT NULL,
        role TEXT NOT NULL,
        phase TEXT NOT NULL,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        PRIMARY KEY (id, role))""",
    "CREATE INDEX IF NOT EXISTS migrations_updated ON migrations (updated)",
    "CREATE INDEX IF NOT EXISTS migrations_phase ON migrations (phase)",
)
_COLUMNS = 'id, role, phase, state, created, updated'


@dataclasses.dataclass(frozen=True)
class Entry:
    """One migration as the journal knows it."""

    id: str
    role: str
    phase: str
    state: dict
    created: float
    updated: float

    @property
    def finished(self):
        return self.phase in plan.TERMINAL


class Journal:
    """The journal of one host.

    Safe to share between threads (one connection, one lock). Each write
    is its own transaction, committed durably before the call returns.

    :param path: the database file; created (with its directory) when
        missing.
    :param clock: wall clock for ``created``/``updated`` (seconds since
        the epoch); tests pass their own.
    """

    def __init__(self, path, clock=time.time):
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._db = None
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0,
                                       isolation_level=None,
                                       check_same_thread=False)
            self._setup()
        except errors.JournalError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise self._error(exc)

    def _error(self, exc, doing='cannot open it'):
        reason = str(exc)
        if isinstance(exc, sqlite3.DatabaseError) and (
                'not a database' in reason or 'malformed' in reason):
            reason = ('the file is corrupt (%s); move it aside to start an '
                      'empty journal, after checking no migration is '
                      'unfinished' % reason)
        return errors.JournalError(path=self.path,
                                   reason='%s: %s' % (doing, reason))

    def _setup(self):
        db = self._db
        version = db.execute('PRAGMA user_version').fetchone()[0]
        if version > SCHEMA_VERSION:
            raise errors.JournalError(
                path=self.path, reason='written by a newer xsm-driver '
                '(schema version %d; this one reads up to %d); upgrade '
                'xsm-driver on this host' % (version, SCHEMA_VERSION))
        db.execute('PRAGMA journal_mode=WAL')
        db.execute('PRAGMA synchronous=FULL')
        if version < SCHEMA_VERSION:
            db.execute('BEGIN IMMEDIATE')
            try:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute('PRAGMA user_version=%d' % SCHEMA_VERSION)
                db.execute('COMMIT')
            except BaseException:
                if db.in_transaction:
                    db.execute('ROLLBACK')
                raise
        # Fail now, not at the first record, on a damaged file.
        db.execute('SELECT count(*) FROM migrations').fetchone()

    # -- helpers -------------------------------------------------------------

    def _conn(self):
        if self._db is None:
            raise errors.JournalError(path=self.path,
                                      reason='the journal is closed')
        return self._db

    @staticmethod
    def _entry(row):
        return Entry(row[0], row[1], row[2], json.loads(row[3]), row[4],
                     row[5])

    def _write(self, doing, func):
        with self._lock:
            db = self._conn()
            try:
                db.execute('BEGIN IMMEDIATE')
                try:
                    result = func(db)
                    db.execute('COMMIT')
                except BaseException:
                    if db.in_transaction:
                        db.execute('ROLLBACK')
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc, doing)
            return result

    def _read(self, doing, sql, args=()):
        with self._lock:
            db = self._conn()
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc, doing)

    # -- API -------------------------------------------------------------

    def record(self, id, role, phase, **state):
        """Insert or update a migration; durable on return.

        :param role: ``source`` or ``destination``: this host's part in
            the migration (a move within the host has one entry of each).
        :param phase: one of :data:`plan.PHASES` or ``aborted``.
        :param state: merged into the stored state (new keys override);
            values must be JSON-serialisable.
        :returns: the :class:`Entry` as stored.
        """
        if role not in ROLES:
            raise ValueError('role must be one of %s, not %r'
                             % (', '.join(ROLES), role))
        plan.check_phase(phase)
        encoded = json.dumps(state, sort_keys=True)   # fail before writing

        def write(db):
            now = self._clock()
            row = db.execute('SELECT %s FROM migrations WHERE id = ? AND '
                             'role = ?' % _COLUMNS, (id, role)).fetchone()
            if row is None:
                db.execute('INSERT INTO migrations (%s) VALUES '
                           '(?, ?, ?, ?, ?, ?)' % _COLUMNS,
                           (id, role, phase, encoded, now, now))
                return Entry(id, role, phase, json.loads(encoded), now, now)
            old = self._entry(row)
            merged = dict(old.state)
            merged.update(json.loads(encoded))
            db.execute('UPDATE migrations SET phase = ?, state = ?, '
                       'updated = ? WHERE id = ? AND role = ?',
                       (phase, json.dumps(merged, sort_keys=True), now, id,
                        role))
            return Entry(id, role, phase, merged, old.created, now)

        entry = self._write('cannot record migration %s' % id, write)
        LOG.debug('journal: migration %s (%s) in phase %s', id, role, phase)
        return entry

    def get(self, id, role=None):
        """The :class:`Entry` of migration ``id``, or None.

        :param role: which entry, when this host plays both roles of the
            migration; without it such an id is ambiguous
            (:class:`errors.JournalError`).
        """
        if role is None:
            rows = self._read('cannot read migration %s' % id,
                              'SELECT %s FROM migrations WHERE id = ? '
                              'ORDER BY role' % _COLUMNS, (id,))
        else:
            rows = self._read('cannot read migration %s' % id,
                              'SELECT %s FROM migrations WHERE id = ? AND '
                              'role = ?' % _COLUMNS, (id, role))
        if len(rows) > 1:
            raise errors.JournalError(
                path=self.path, reason='migration %s is journaled here as '
                'both %s (a move within this host); say which role'
                % (id, ' and '.join(r[1] for r in rows)))
        return self._entry(rows[0]) if rows else None

    def unfinished(self):
        """Migrations neither done nor aborted, oldest first."""
        rows = self._read('cannot list migrations',
                          'SELECT %s FROM migrations WHERE phase NOT IN '
                          '(?, ?) ORDER BY created, id, role' % _COLUMNS,
                          plan.TERMINAL)
        return [self._entry(row) for row in rows]

    def list(self, limit=100):
        """The ``limit`` most recently updated migrations, newest first."""
        rows = self._read('cannot list migrations',
                          'SELECT %s FROM migrations ORDER BY updated DESC, '
                          'rowid DESC LIMIT ?' % _COLUMNS, (int(limit),))
        return [self._entry(row) for row in rows]

    def finish(self, id, phase, role=None, **state):
        """Mark a migration ``done`` or ``aborted``; durable on return.

        :param role: as for :meth:`get`.
        :param state: merged into the stored state, as for :meth:`record`.
        :raises errors.MigrationNotFound: the journal has no such id.
        :raises errors.InvalidPhase: ``phase`` is not terminal.
        """
        if phase not in plan.TERMINAL:
            raise errors.InvalidPhase(phase=phase, reason='a migration '
                                      'finishes as %s' % ' or '.join(
                                          plan.TERMINAL))
        entry = self.get(id, role)
        if entry is None:
            raise errors.MigrationNotFound(id=id)
        return self.record(id, entry.role, phase, **state)

    def close(self):
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
