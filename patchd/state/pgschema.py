"""Schema versions of the PostgreSQL store and the migrations between them.

The version is meta.schema_version. Opening a store read-write applies, in ONE transaction
taken under a transaction-level advisory lock, every migration above the database's
version: several daemons starting at once against a new database migrate it once (the
others wait for the lock, then find nothing to do), and PostgreSQL's DDL is transactional,
so a database is never left half migrated.

The tables match the SQLite store's (patchd/state/migrations.py) with PostgreSQL types:
TIMESTAMPTZ times, JSON details (kept as written, as SQLite's text), a `seq` column for
"in the order recorded" (SQLite's rowid), the writer's lease epoch on each journal row
(proof of who wrote it), the lease row of leader.py, and each store handle's last
write mark.

To add a migration: append Migration(N + 1, ...) whose statements take version N to N + 1.
"""

from __future__ import annotations

from typing import Any

from patchd.state.base import StoreError
from patchd.state.migrations import Migration

# pg_advisory_xact_lock key for migrations: "patchd" in ASCII, as a bigint.
MIGRATION_LOCK = 0x706174636864

_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        grp TEXT NOT NULL,
        "window" TEXT,
        started TIMESTAMPTZ NOT NULL,
        finished TIMESTAMPTZ,
        status TEXT NOT NULL,
        total INTEGER NOT NULL DEFAULT 0,
        succeeded INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        detail JSON NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX runs_by_group ON runs (grp, started)",
    """CREATE TABLE targets (
        run_id TEXT NOT NULL REFERENCES runs (id),
        target TEXT NOT NULL,
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        version_from TEXT,
        version_to TEXT,
        snapshot JSON,
        error TEXT,
        updated TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (run_id, target)
    )""",
    "CREATE INDEX targets_by_state ON targets (state)",
    """CREATE TABLE journal (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id TEXT NOT NULL,
        target TEXT NOT NULL,
        step TEXT NOT NULL,
        phase TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        detail JSON NOT NULL DEFAULT '{}',
        epoch BIGINT
    )""",
    "CREATE INDEX journal_by_target ON journal (run_id, target)",
    """CREATE TABLE retained (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        backend TEXT NOT NULL,
        target TEXT NOT NULL,
        run_id TEXT NOT NULL,
        description TEXT NOT NULL,
        data JSON NOT NULL,
        expires TIMESTAMPTZ NOT NULL
    )""",
    # The leader lease (leader.py): one row per lease name; "leader" is the daemon-wide one.
    # expires NULL: never held. epoch only grows.
    """CREATE TABLE ha_lease (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL DEFAULT '',
        epoch BIGINT NOT NULL DEFAULT 0,
        acquired TIMESTAMPTZ,
        renewed TIMESTAMPTZ,
        expires TIMESTAMPTZ
    )""",
    "INSERT INTO ha_lease (name) VALUES ('leader')",
    # One row per open store handle: the mark of its last committed write transaction,
    # read back after a COMMIT whose answer was lost (postgres.py).
    "CREATE TABLE write_marks (writer TEXT PRIMARY KEY, mark TEXT NOT NULL)",
)

# The notifications outbox (pgoutbox.py): one row per message and channel until it is
# delivered or dropped; as SQLite's migration 3.
_V2 = (
    """CREATE TABLE outbox (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel TEXT NOT NULL,
        event TEXT NOT NULL,
        document JSON NOT NULL,
        created TIMESTAMPTZ NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due TIMESTAMPTZ NOT NULL,
        error TEXT
    )""",
    "CREATE INDEX outbox_by_due ON outbox (due, id)",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, targets, journal, retained, meta and the leader lease", _V1),
    Migration(2, "the notifications outbox", _V2, additive=True),
)
CURRENT = MIGRATIONS[-1].version


def found_version(conn: Any, where: str) -> int:
    """The database's schema version (0: no patchd tables yet)."""
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise StoreError(f"state store {where} has a table meta but no schema_version in it")
    return int(row[0])


def _refuse_newer(version: int, where: str) -> None:
    if version > CURRENT:
        raise StoreError(
            f"state store {where} has schema version {version}, newer than this patchd knows"
            f" ({CURRENT}): it was written by a newer patchd; run that one"
        )


def migrate(conn: Any, where: str) -> int:
    """Bring the schema to CURRENT in one transaction under the migration lock; returns
    the version it had. `conn` is a psycopg connection in autocommit mode."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        was = found_version(conn, where)
        _refuse_newer(was, where)
        for migration in MIGRATIONS:
            if migration.version > was:
                for statement in migration.statements:
                    conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(CURRENT),),
        )
    return was


def check_current(conn: Any, where: str) -> int:
    """For a read-only handle: the version if this code reads it as it is, else StoreError."""
    version = found_version(conn, where)
    _refuse_newer(version, where)
    # A database short only of additive migrations reads the same (migrations.Migration).
    if not all(m.additive for m in MIGRATIONS if m.version > version):
        raise StoreError(
            f"state store {where} has schema version {version}; this patchd reads version"
            f" {CURRENT} and migrates when a daemon opens it for writing"
        )
    return version
