"""The PostgreSQL store's schema migrations (patchd/state/pgschema.py), on the lab's
PostgreSQL: a database of an older patchd is migrated at open and keeps its rows; a
read-only handle reads one that lacks only additive migrations."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
import pytest

from patchd.state import pgschema
from patchd.state.base import StoreError
from patchd.state.postgres import PostgresStore

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def _version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row is not None
    return str(row[0])


def _make_v1(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database as the patchd of schema version 1 left it (before the outbox)."""
    with monkeypatch.context() as m:
        m.setattr(pgschema, "MIGRATIONS", pgschema.MIGRATIONS[:1])
        m.setattr(pgschema, "CURRENT", 1)
        old = PostgresStore(url, outage_wait=10)
        old.start_run("r1", "web", None, AT)
        old.close()
    assert _version(url) == "1"


def test_a_version_1_database_gets_the_outbox_at_open_and_keeps_its_runs(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_v1(pg_url, monkeypatch)
    store = PostgresStore(pg_url, outage_wait=10)
    try:
        assert _version(pg_url) == str(pgschema.CURRENT)  # every migration since 1
        assert [r.id for r in store.runs()] == ["r1"]
        store.enqueue_notifications([("mail", "halted", {"n": 1})], AT)
        assert [(r.channel, r.due) for r in store.due_notifications()] == [("mail", AT)]
    finally:
        store.close()


def test_a_read_only_handle_reads_a_database_short_only_of_additive_migrations(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_v1(pg_url, monkeypatch)
    reader = PostgresStore(pg_url, readonly=True, outage_wait=10)
    try:
        assert [r.id for r in reader.runs()] == ["r1"]
    finally:
        reader.close()
    assert _version(pg_url) == "1"  # a read-only handle does not migrate


def test_a_read_only_handle_refuses_an_empty_database(pg_url: str) -> None:
    expected = f"has schema version 0; this patchd reads version {pgschema.CURRENT}"
    with pytest.raises(StoreError, match=expected):
        PostgresStore(pg_url, readonly=True, outage_wait=10)
