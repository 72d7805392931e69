"""A COMMIT whose answer is lost: the connection breaks after the COMMIT was sent (or the
one statement that is a batch of records' whole transaction, pgjournal.py). The store
must neither report a write that did not land nor write it twice: it asks the database
(the mark each write transaction sets in write_marks) after reconnecting.

Breaking a connection at exactly that instant cannot be arranged from outside the
process, so the store's connection is wrapped: the real COMMIT is sent (or not), then the
real connection is closed and the error libpq gives for a vanished server is raised. The
database is real; only the moment of the break is staged."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from patchd.state.base import Keep
from patchd.state.postgres import PostgresStore
from patchd.states import TargetState

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


class BreakAtCommit:
    """Wraps a psycopg connection; at the first statement that commits (a COMMIT, or one
    that sets the write mark outside a transaction), sends it or not, then breaks."""

    def __init__(self, conn: psycopg.Connection[Any], send: bool) -> None:
        self._conn = conn
        self._send = send
        self.broke = False

    def _commits(self, sql: Any) -> bool:
        idle = self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        return sql == "COMMIT" or (idle and isinstance(sql, str) and "write_marks" in sql)

    def execute(self, sql: Any, *args: Any) -> Any:
        if self._commits(sql) and not self.broke:
            self.broke = True
            if self._send:
                self._conn.execute(sql, *args)
            self._conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize("alone", [True, False], ids=["one-statement", "transaction"])
@pytest.mark.parametrize("sent", [True, False], ids=["committed", "not-committed"])
def test_a_lost_commit_answer_is_resolved_exactly_once(
    pg_url: str, sent: bool, alone: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record alone is one statement; one with a Keep is a transaction of several."""
    keep = None if alone else Keep("fake", "snapshot", {"id": 1}, AT + timedelta(days=1))
    store = PostgresStore(pg_url, outage_wait=10)
    try:
        store.start_run("run-1", "web", None, AT)
        real = store._connection()
        wrapper = BreakAtCommit(real, send=sent)
        monkeypatch.setattr(store, "_conn", wrapper)
        store.record(
            "run-1", "t1", "t1", TargetState.APPLYING, AT, step="apply", phase="intent", keep=keep
        )
        assert wrapper.broke
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT step FROM journal").fetchall()
        kept = conn.execute("SELECT count(*) FROM retained").fetchone()
    assert rows == [("apply",)]
    assert kept == (0 if alone else 1,)


def test_a_write_paused_past_the_idle_timeout_is_tried_again_once(pg_url: str) -> None:
    """The server ends a session idle in a transaction for 2 s (a paused process): the
    store's next statement finds the session gone, and the write is done again, once,
    on a new connection."""
    store = PostgresStore(pg_url, outage_wait=10)
    attempts = 0

    def work(conn: psycopg.Connection[Any], epoch: int | None) -> None:
        nonlocal attempts
        attempts += 1
        conn.execute("INSERT INTO meta (key, value) VALUES ('paused', %s)", (str(attempts),))
        if attempts == 1:
            time.sleep(2.5)  # frozen inside the transaction, past the server's limit

    try:
        store._write(work)
    finally:
        store.close()
    assert attempts == 2
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT value FROM meta WHERE key = 'paused'").fetchall()
    assert rows == [("2",)]
