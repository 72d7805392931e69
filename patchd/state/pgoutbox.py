"""The notifications outbox of the PostgreSQL store (the Store protocol's outbox methods,
state/base.py), as a mixin of PostgresStore: the same semantics as the SQLite store's
(state/sqlite.py), written through PostgresStore's fenced group commit (`_write`, so a
process that lost its lease queues or forgets nothing) and read through its retrying
`_read`. The table is pgschema.py's migration 2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.types.json import Json

from patchd.state.base import OutboxRow

Conn = psycopg.Connection[Any]
Work = Callable[[Conn, int | None], None]


class PostgresOutbox:
    """The outbox methods; the class that mixes this in gives `_write` and `_read`."""

    def _write(self, work: Work) -> None:
        raise NotImplementedError  # PostgresStore._write

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # PostgresStore._read

    def enqueue_notifications(
        self, messages: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime
    ) -> None:
        rows = [(ch, ev, Json(dict(doc)), at, at) for ch, ev, doc in messages]

        def work(conn: Conn, _epoch: int | None) -> None:
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO outbox (channel, event, document, created, due)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        rows,
                    )

        self._write(work)

    def due_notifications(self, by: datetime | None = None, limit: int = 100) -> list[OutboxRow]:
        sql = "SELECT id, channel, event, document, created, attempts, due, error FROM outbox"
        args: tuple[Any, ...] = ()
        if by is not None:
            sql += " WHERE due <= %s"
            args = (by,)
        rows = self._read(sql + " ORDER BY due, id LIMIT %s", (*args, limit))
        return [
            OutboxRow(
                r[0], r[1], r[2], r[3], r[4].astimezone(UTC), r[5], r[6].astimezone(UTC), r[7]
            )
            for r in rows
        ]

    def notification_retry(self, outbox_id: int, attempts: int, due: datetime, error: str) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                "UPDATE outbox SET attempts = %s, due = %s, error = %s WHERE id = %s",
                (attempts, due, error, outbox_id),
            )

        self._write(work)

    def notification_done(self, outbox_id: int) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute("DELETE FROM outbox WHERE id = %s", (outbox_id,))

        self._write(work)
