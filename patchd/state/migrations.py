"""Schema versions of the SQLite journal and the migrations between them.

The version is SQLite's `PRAGMA user_version`. MIGRATIONS is an ordered list; opening a
journal read-write applies, in ONE transaction, every migration above its version and
sets the new version, so a journal is never left half migrated and two processes
opening it at once do not both migrate (the second waits for the first's lock and then
finds nothing to do).

Version 1 is the schema of the first store. That store did not set user_version (it
stayed 0) and wrote meta.schema_version = '1' instead; a journal with user_version 0 and
that meta row is recognised as version 1 and only gets its user_version set. The meta
row is kept equal to the version, because the first store refuses any journal whose
meta.schema_version is not '1': a downgraded patchd then refuses a newer journal
instead of misreading it.

A journal whose version is newer than this code knows is refused with a StoreError:
patchd never writes a schema it does not understand.

To add a migration: append Migration(N + 1, ...) whose statements take a version-N
journal to N + 1 (plain SQL, no COMMIT; `executescript` is not used because it commits),
and add a journal of version N to the migration test.
"""

from __future__ import annotations

import sqlite3
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from patchd.state.base import StoreError


@dataclass(frozen=True)
class Migration:
    version: int  # the version the journal has after it
    description: str
    statements: tuple[str, ...]
    # Only adds tables or indexes: what older versions hold reads the same, so a
    # read-only handle (which cannot migrate) may read a journal that lacks it.
    additive: bool = False


_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY,
        grp TEXT NOT NULL,
        window TEXT,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,
        total INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS runs_by_group ON runs (grp, started)",
    """CREATE TABLE IF NOT EXISTS targets (
        run_id TEXT NOT NULL REFERENCES runs (id),
        target TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        version_from TEXT,
        version_to TEXT,
        snapshot TEXT,
        error TEXT,
        updated REAL NOT NULL,
        PRIMARY KEY (run_id, target)
    )""",
    "CREATE INDEX IF NOT EXISTS targets_by_state ON targets (state)",
    """CREATE TABLE IF NOT EXISTS journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        target TEXT NOT NULL,
        step TEXT NOT NULL,
        phase TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX IF NOT EXISTS journal_by_target ON journal (run_id, target)",
    """CREATE TABLE IF NOT EXISTS retained (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        backend TEXT NOT NULL,
        target TEXT NOT NULL,
        run_id TEXT NOT NULL,
        description TEXT NOT NULL,
        data TEXT NOT NULL,
        expires REAL NOT NULL
    )""",
)

# The notifications outbox: one row per message and channel until it is delivered or
# dropped (patchd.notifications.outbox).
_V3 = (
    """CREATE TABLE IF NOT EXISTS outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        event TEXT NOT NULL,
        document TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due REAL NOT NULL,
        error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS outbox_by_due ON outbox (due)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, targets, journal, retained and meta (the first store)", _V1),
    # Reserved for the control socket's tables (branch "control"): merging it replaces this.
    Migration(2, "reserved (the control socket's tables)", (), additive=True),
    Migration(3, "the notifications outbox", _V3, additive=True),
)
CURRENT = MIGRATIONS[-1].version


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def found_version(db: sqlite3.Connection, path: Path) -> int:
    """The journal's schema version (0: empty, nothing created yet); StoreError for a
    file that is not a patchd journal."""
    version = user_version(db)
    if version != 0:
        return version
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return 0
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and row[0] == "1":
            return 1  # written by the first store, which did not set user_version
        if row is not None:
            raise StoreError(f"state store {path} has schema {row[0]}, expected {CURRENT}")
    raise StoreError(
        f"state store {path} is not a patchd journal (it has tables {', '.join(sorted(tables))}"
        " but no schema version)"
    )


def _refuse_newer(version: int, path: Path) -> None:
    if version > CURRENT:
        raise StoreError(
            f"state store {path} has schema version {version}, newer than this patchd knows"
            f" ({CURRENT}): it was written by a newer patchd; run that one (or a journal"
            " backup) rather than lose what the newer one recorded"
        )


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the journal to CURRENT in one transaction; returns the version it had.

    `db` is in autocommit mode (isolation_level=None) and outside a transaction. A
    journal already current is only read: opening it writes nothing, so it opens on a
    full disk (and its first real write is what fails) and takes no write lock that
    would make other patchd processes wait."""
    was = found_version(db, path)
    _refuse_newer(was, path)
    if was == CURRENT and user_version(db) == CURRENT:
        return was
    db.execute("BEGIN IMMEDIATE")
    try:
        was = found_version(db, path)  # again, under the lock: another may have migrated
        _refuse_newer(was, path)
        for migration in MIGRATIONS:
            if migration.version > was:
                for statement in migration.statements:
                    db.execute(statement)
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(CURRENT),),
        )
        db.execute(f"PRAGMA user_version = {CURRENT:d}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            with suppress(sqlite3.Error):  # on a full disk this may fail too
                db.execute("ROLLBACK")
        raise
    return was


def check_current(db: sqlite3.Connection, path: Path) -> int:
    """For a read-only handle, which cannot migrate: the journal's version if this code
    can read it as it is (it is current, or only additive migrations are missing, whose
    tables such a handle then cannot read), else StoreError."""
    version = found_version(db, path)
    _refuse_newer(version, path)
    if all(m.additive for m in MIGRATIONS if m.version > version):
        return version  # what is missing are only tables added since: it reads the same
    if version != CURRENT:
        raise StoreError(
            f"state store {path} has schema version {version}; this patchd reads version"
            f" {CURRENT} and migrates when it opens the journal for writing (start the"
            " daemon or run `patchd run` once)"
        )
    return version
