"""Operators' controls (pause, approval, quarantine) and their audit trail in the
PostgreSQL store (the Store protocol's control methods, state/base.py), as a mixin of
PostgresStore: the same semantics as the SQLite store's (state/sqlite.py), written through
PostgresStore's fenced group commit (`_write`) and read through its retrying `_read`.
The tables are pgschema.py's migration 3; a read-only handle on a database that has not
been migrated to it yet reads no controls, as SQLite's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Json

from patchd.state.base import AuditRow, ControlRow
from patchd.state.pgoutbox import Conn, Work


class PostgresControls:
    """The control methods; the class that mixes this in gives `_write` and `_read`."""

    def _write(self, work: Work) -> None:
        raise NotImplementedError  # PostgresStore._write

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # PostgresStore._read

    def _has(self, table: str) -> bool:
        [(present,)] = self._read("SELECT to_regclass(%s) IS NOT NULL", (table,))
        return bool(present)

    def put_control(
        self, kind: str, group: str, key: str, data: Mapping[str, Any], at: datetime
    ) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                "INSERT INTO controls (kind, grp, key, data, at) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (kind, grp, key) DO UPDATE SET data = excluded.data,"
                " at = excluded.at",
                (kind, group, key, Json(dict(data)), at),
            )

        self._write(work)

    def drop_control(self, kind: str, group: str, key: str | None = None) -> int:
        sql = "DELETE FROM controls WHERE kind = %s AND grp = %s"
        args: tuple[Any, ...] = (kind, group)
        if key is not None:
            sql += " AND key = %s"
            args = (*args, key)
        removed = [0]  # the count of the transaction that committed (a retry redoes it)

        def work(conn: Conn, _epoch: int | None) -> None:
            removed[0] = conn.execute(sql, args).rowcount

        self._write(work)
        return removed[0]

    def controls(self, kind: str, group: str | None = None) -> list[ControlRow]:
        if not self._has("controls"):  # a read-only handle before migration 3: none
            return []
        sql = "SELECT kind, grp, key, data, at FROM controls WHERE kind = %s"
        args: tuple[Any, ...] = (kind,)
        if group is not None:
            sql += " AND grp = %s"
            args = (kind, group)
        rows = self._read(sql + " ORDER BY at, grp, key", args)
        return [ControlRow(r[0], r[1], r[2], r[3], r[4].astimezone(UTC)) for r in rows]

    def audit(
        self,
        at: datetime,
        uid: int,
        pid: int,
        user: str,
        action: str,
        group: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                "INSERT INTO audit (at, uid, pid, usr, action, grp, detail)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (at, uid, pid, user, action, group, Json(dict(detail))),
            )

        self._write(work)

    def audit_trail(self, limit: int = 100) -> list[AuditRow]:
        if not self._has("audit"):
            return []
        rows = self._read(
            "SELECT at, uid, pid, usr, action, grp, detail FROM audit ORDER BY seq DESC LIMIT %s",
            (limit,),
        )
        return [AuditRow(r[0].astimezone(UTC), r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]
