"""The state store on disk: embedded SQLite in WAL mode, one transaction per loop pass.

The in-memory :class:`~broker.state.store.StateStore` is the truth while the service
runs; this file is how it survives a restart. After each pass of the loop the server
calls :meth:`StatePersistence.commit` once, with everything the pass changed (a key
written many times in one pass is written once), and only then sends the replies: an
acknowledged write is on disk. ``synchronous=NORMAL`` in WAL mode keeps committed rows
through a SIGKILL of the process (measured: DESIGN.md), though not through a power loss.

Times: the store runs on a monotonic clock, which means nothing after a restart, so key
expiry is stored as wall-clock time and turned back into the monotonic clock on load.

Versions: the database's layout is :data:`SCHEMA_VERSION`, stored in ``meta`` under
``schema``. A change of layout bumps it and adds a step to :data:`_MIGRATIONS`; opening
an older database runs the steps from its schema on, each in one transaction with the
new number. A newer schema, an older one without a step, a database without ``meta`` or
a file that is not SQLite is refused (:class:`StateFormatError`, whose message says what
to do) before anything in the file changes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from broker import __version__
from broker.state.store import StateStore

logger = logging.getLogger(__name__)

#: The layout of the database, stored in ``meta`` (module docstring, "Versions").
#: History: 1: tables ``meta``, ``kv``, ``fences``, ``leases``.
SCHEMA_VERSION: Final = 1
#: The SQL that takes a database from each older schema to the next one, by the older
#: number (the step from 1 to 2 is ``_MIGRATIONS[1]``). None yet: 1 is the first schema.
_MIGRATIONS: Final[dict[int, str]] = {}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, version INTEGER NOT NULL, expires_wall REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fences (name TEXT PRIMARY KEY, token INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, session BLOB NOT NULL, holder TEXT NOT NULL,
    token INTEGER NOT NULL, ttl_s REAL NOT NULL
) WITHOUT ROWID;
"""


class StateFormatError(RuntimeError):
    """Raised when ``state.db`` is not a database this release can use: a newer schema,
    an older one it cannot migrate, or not a state database at all. The message says
    what to do."""


class StatePersistence:
    """One SQLite database file holding keys, fencing counters and leases.

    Args:
        path: the database file (created with its directory if missing).
        wall_clock: wall-clock time, only to carry key expiry across restarts.
    """

    def __init__(self, path: Path, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.wall_clock = wall_clock
        self.commits = 0
        self.rows_written = 0
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open (or create) the database.

        The connection is made here, in the thread that starts the service, and then used
        only by the service's own thread: hence ``check_same_thread=False``.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            # The schema is checked before anything is written, WAL mode included.
            found = self._stored_schema(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if found is not None and found < SCHEMA_VERSION:
                self._migrate(db, found)
            # Creates a new database, or what is missing from one (a table, the row).
            db.executescript(f"BEGIN;\n{_SCHEMA}\nINSERT OR IGNORE INTO meta VALUES "
                             f"('schema', {SCHEMA_VERSION});\nCOMMIT;")
        except BaseException:
            db.close()
            raise
        self._db = db

    def _stored_schema(self, db: sqlite3.Connection) -> int | None:
        """The schema of the database (None: a new, empty one).

        Raises:
            StateFormatError: not a state database, a newer schema than this release's, or
                an older one it has no migration steps from.
        """
        aside = (f"move {self.path} (and its -wal and -shm files) aside to start with "
                 "empty state")
        try:
            tables = {name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return None
            if "meta" not in tables:
                raise StateFormatError(f"{self.path} is not a state database (no meta table): "
                                       f"point --data-dir elsewhere, or {aside}")
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StateFormatError(f"{self.path} is not a state database ({e}): point "
                                   f"--data-dir elsewhere, or {aside}") from e
        # A meta table without the row: created by schema 1, which wrote the row after
        # the tables, outside their transaction.
        found = 1 if row is None else row[0]
        if type(found) is not int or found > SCHEMA_VERSION:
            raise StateFormatError(
                f"{self.path} is state schema {found!r}, newer than this release (Orchestrator "
                f"{__version__}) reads (schema {SCHEMA_VERSION}): run the release that wrote "
                f"it or a later one, or {aside}")
        oldest = SCHEMA_VERSION
        while oldest - 1 in _MIGRATIONS:
            oldest -= 1
        if found < oldest:
            raise StateFormatError(
                f"{self.path} is state schema {found}, older than this release (Orchestrator "
                f"{__version__}) migrates (schema {oldest} and later): open it first with an "
                f"earlier release that migrates it, or {aside}")
        return found

    def _migrate(self, db: sqlite3.Connection, found: int) -> None:
        """Take the database from schema ``found`` (one :meth:`_stored_schema` accepted)
        to :data:`SCHEMA_VERSION`, one step (one transaction) at a time."""
        for version in range(found, SCHEMA_VERSION):
            try:
                db.executescript(f"BEGIN;\n{_MIGRATIONS[version]}\nINSERT OR REPLACE INTO "
                                 f"meta VALUES ('schema', {version + 1});\nCOMMIT;")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            logger.warning("state database %s migrated from schema %d to %d", self.path,
                           version, version + 1)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def load(self, store: StateStore, now: float) -> None:
        """Fill an empty store from the database. Keys that expired while the service was
        down come back already due and are deleted by the store's first tick."""
        db = self._require()
        wall_now = self.wall_clock()
        row = db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
        rows = [(key, value, version, None if expires is None else now + (expires - wall_now))
                for key, value, version, expires
                in db.execute("SELECT key, value, version, expires_wall FROM kv")]
        store.keys.load(rows, row[0] if row else 0)
        store.mirror_loaded_usage()
        fences = dict(db.execute("SELECT name, token FROM fences").fetchall())
        leases = [(name, bytes(session), holder, token, ttl_s) for name, session, holder, token, ttl_s
                  in db.execute("SELECT name, session, holder, token, ttl_s FROM leases")]
        store.restore_leases(leases, fences, now)
        logger.info("state loaded from %s: %d key(s) at version %d, %d lease(s), %d lock "
                    "counter(s)", self.path, len(rows), store.keys.version, len(leases),
                    len(fences))

    def commit(self, store: StateStore, now: float) -> int:
        """Write everything changed since the last commit in one transaction; returns the
        number of rows written (0: nothing changed, no transaction)."""
        keys = store.keys.take_dirty()
        lease_names, fence_names = store.locks.take_dirty()
        if not (keys or lease_names or fence_names):
            return 0
        db = self._require()
        wall_offset = self.wall_clock() - now
        records = store.keys.records
        upserts = []
        deletes = []
        for key in keys:
            record = records.get(key)
            if record is None:
                deletes.append((key,))
            else:
                upserts.append((key, record.value, record.version,
                                None if record.expires_at is None
                                else record.expires_at + wall_offset))
        leases = store.locks.leases
        lease_rows = [(n, leases[n].session, leases[n].holder, leases[n].token, leases[n].ttl_s)
                      for n in lease_names if n in leases]
        lease_deletes = [(n,) for n in lease_names if n not in leases]
        fences = store.locks.fences
        fence_rows = [(n, fences[n]) for n in fence_names]
        db.execute("BEGIN")
        try:
            if upserts:
                db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", upserts)
            if deletes:
                db.executemany("DELETE FROM kv WHERE key = ?", deletes)
            if keys:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)",
                           (store.keys.version,))
            if fence_rows:
                db.executemany("INSERT OR REPLACE INTO fences VALUES (?, ?)", fence_rows)
            if lease_rows:
                db.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)", lease_rows)
            if lease_deletes:
                db.executemany("DELETE FROM leases WHERE name = ?", lease_deletes)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        written = len(upserts) + len(deletes) + len(fence_rows) + len(lease_rows) + len(lease_deletes)
        self.commits += 1
        self.rows_written += written
        return written

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the state database is not open")
        return self._db
