"""The PostgreSQL implementation of the Store protocol (state/base.py), for several daemons
sharing one database (`[state] url = "postgresql://user@host/db"`).

Durability: each session runs with synchronous_commit=on, so a write method returns only
after PostgreSQL has its commit on disk. Group commit as in the SQLite store: concurrent
writes share one transaction; a batch of `record`s only is ONE statement (pgjournal.py).
The schema is migrated at open under an advisory lock (pgschema.py).

Outages: a write or read whose connection breaks (the server restarted, the network
dropped) is tried again on a new connection until `outage_wait` has passed, then fails
with a StoreError. A commit whose answer was lost is not guessed at: each write
transaction also sets a new mark in this handle's row of `write_marks`; after
reconnecting (and once the old session is gone or idle), the mark says whether it
committed. So a database restart neither loses a returned write nor writes one twice.

Fencing: with leadership on (`set_fence`), every write transaction first checks, in the
database, that the lease still holds this process's epoch (pglease.check_fence); a write
of a process that lost its lease is refused (leader.NotLeader), nothing of it lands, and
the leadership is told at once. The lease itself uses a connection of its own, so a
write waiting out an outage never delays a renewal.

Sessions are pgsession.py's; the schema pgschema.py's; the lease's SQL and the fence
check pglease.py's; the records' statement pgjournal.py's; the outbox pgoutbox.py's.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Json

from patchd.state import pgjournal, pglease, pgschema, pgsession
from patchd.state.base import Keep, RetainedRow, RunRow, StoreError, TargetRow, Then
from patchd.state.groupcommit import GroupCommit, Pending
from patchd.state.leader import Fence, NotLeader
from patchd.state.pgcontrols import PostgresControls
from patchd.state.pgoutbox import Conn, PostgresOutbox, Work
from patchd.states import RESTING, RunStatus, TargetState

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _json(value: Mapping[str, Any] | None) -> Json | None:
    return None if value is None else Json(dict(value))


class _Write(Pending):
    """One write waiting for its group commit: a record's `row` (pgjournal.py's one
    statement for a batch of them) or any other `work`."""

    __slots__ = ("row", "work")

    def __init__(self, work: Work, row: pgjournal.Row | None = None) -> None:
        super().__init__()
        self.work = work
        self.row = row


class PostgresStore(PostgresOutbox, PostgresControls, GroupCommit[_Write]):
    """A thread-safe handle on the shared PostgreSQL state (implements state.base.Store;
    the notifications outbox is pgoutbox.py's, operators' controls pgcontrols.py's)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | Callable[[], str] | None = None,
        readonly: bool = False,
        outage_wait: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.where = pgsession.describe(url)
        self.readonly = readonly
        self.outage_wait = outage_wait
        self._password = password
        self._clock = clock
        self._sleep = sleep
        GroupCommit.__init__(self)  # _lock (also the connection's), _queue
        self._lease_lock = threading.Lock()
        self._conn: Conn | None = None
        self._lease_conn: Conn | None = None
        self._fence: Callable[[], Fence] | None = None
        self._on_refused: Callable[[str], None] | None = None
        self._closed = False
        # This handle's row in write_marks (see _transaction); removed at close.
        self._writer = f"{os.getpid()}-{secrets.token_hex(8)}"
        self._marks = itertools.count(1)  # unique within this handle, whose row it is
        self._session: tuple[int, str] = (0, "")  # the write session: backend pid, start
        self._options = pgsession.options(url)
        with self._lock:
            self._conn = self._with_retries(self._open)

    # --- connections ----------------------------------------------------------------------

    def _connect(self) -> Conn:
        if self._closed:
            raise StoreError(f"state store {self.where} is closed")
        password = self._password
        if password is not None and not isinstance(password, str):
            password = password()  # read at every connection: a rotated one is used
        return pgsession.connect(self.url, self._options, password, self.readonly)

    def _open(self) -> Conn:
        conn = self._connect()
        try:
            if self.readonly:
                pgschema.check_current(conn, self.where)
            else:
                pgschema.migrate(conn, self.where)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> Conn:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            row = self._conn.execute(
                "SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            self._session = (self._conn.info.backend_pid, "" if row is None else row[0])
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def _with_retries(self, fn: Callable[[], T]) -> T:
        """Run `fn` (which may reconnect), again after a lost connection until outage_wait
        has passed. The caller holds self._lock."""
        deadline = self._clock() + self.outage_wait
        while True:
            try:
                return fn()
            except psycopg.Error as err:
                if not pgsession.retryable(err, self._conn):
                    raise StoreError(f"state store {self.where}: {err}") from err
                self._drop()
                if self._clock() >= deadline:
                    raise pgsession.Unreachable(
                        f"state store {self.where} did not answer for {self.outage_wait:g}s:"
                        f" {str(err).strip() or type(err).__name__}"
                    ) from err
                self._sleep(pgsession.RECONNECT_PAUSE)

    def close(self) -> None:
        with self._lock, self._lease_lock:
            if self._conn is not None and not self._conn.closed and not self.readonly:
                with suppress(psycopg.Error):  # this handle's mark row, no longer needed
                    self._conn.execute("DELETE FROM write_marks WHERE writer = %s", (self._writer,))
            self._drop()
            if self._lease_conn is not None:
                with suppress(psycopg.Error):
                    self._lease_conn.close()
                self._lease_conn = None
            self._closed = True

    # --- leadership ------------------------------------------------------------------------

    def set_fence(self, fence: Callable[[], Fence], on_refused: Callable[[str], None]) -> None:
        """Fence every later write: `fence()` gives this process's lease (NotLeader if it
        has none); `on_refused(reason)` is called when the database refuses a write."""
        self._fence = fence
        self._on_refused = on_refused

    def lease_transaction(self, work: Callable[[Conn], T]) -> T:
        """Run `work` in one transaction on the lease's own connection, once: a lost
        connection is a StoreError at once (the leadership loop decides when to retry)."""
        with self._lease_lock:
            try:
                if self._lease_conn is None or self._lease_conn.closed:
                    self._lease_conn = self._connect()
                conn = self._lease_conn
                with conn.transaction():
                    return work(conn)
            except psycopg.Error as err:
                if self._lease_conn is not None and (self._lease_conn.broken or
                                                     self._lease_conn.closed):  # fmt: skip
                    self._lease_conn = None
                raise StoreError(f"state store {self.where} (lease): {err}") from err

    # --- writes ----------------------------------------------------------------------------

    def _write(self, work: Work, row: pgjournal.Row | None = None) -> None:
        """Run `work` in a write transaction; return once it is committed (durable).
        Group commit: groupcommit.py. `row`: what `work` writes, for a batch
        of records only to be written by pgjournal's one statement."""
        if self.readonly:
            raise StoreError(f"state store {self.where} is open read-only")
        entry = _Write(work, row)
        self._group_commit(entry)
        if entry.error is not None:
            raise entry.error

    def _commit_group(self, batch: list[_Write]) -> None:
        """Commit `batch` in one transaction (the caller holds the lock)."""
        unsure: list[str] = []  # the id of a transaction whose COMMIT got no answer
        try:
            self._with_retries(lambda: self._transaction(batch, unsure))
        except NotLeader as err:
            for entry in batch:
                entry.error = err
            if self._on_refused is not None:
                self._on_refused(str(err))
        except Exception as err:
            if len(batch) > 1 and not isinstance(err, pgsession.Unreachable) and not unsure:
                for entry in batch:  # nothing was written: each on its own now
                    self._commit_group([entry])
                return
            for entry in batch:
                entry.error = err
        except BaseException as err:
            for entry in batch:
                entry.error = err
        for entry in batch:
            entry.done = True

    def _transaction(self, batch: list[_Write], unsure: list[str]) -> None:
        """One attempt at committing `batch`. `unsure` holds the mark of an earlier attempt
        whose COMMIT got no answer: whether that one landed is read back first."""
        # The fence first, before waiting on a connection: a leader whose lease may have
        # run out during an outage stops here, not after outage_wait (also with a lost
        # COMMIT unresolved: if that one landed, it landed under the lease it checked).
        fence = self._fence() if self._fence is not None else None
        if unsure:
            mark, pid, started = unsure
            conn = self._connection()
            # The old session may still be finishing that COMMIT (a network break, not a
            # crash): wait until it is gone or idle, so its outcome is final.
            row = conn.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s AND backend_start::text = %s",
                (int(pid), started),
            ).fetchone()
            if row is not None and row[0] not in ("idle", "idle in transaction (aborted)"):
                raise psycopg.errors.SerializationFailure("the lost COMMIT is still running")
            row = conn.execute(
                "SELECT mark FROM write_marks WHERE writer = %s", (self._writer,)
            ).fetchone()
            if row is not None and row[0] == mark:
                return  # it committed: done
            unsure.clear()  # it did not: do it again
        conn = self._connection()
        mark = str(next(self._marks))
        rows = [entry.row for entry in batch if entry.row is not None]
        if len(rows) == len(batch) and pgjournal.distinct(rows):
            self._alone(conn, rows, fence, mark, unsure)
            return
        conn.execute("BEGIN")
        try:
            if fence is not None:
                pglease.check_fence(conn, fence)
            for entry in batch:
                entry.work(conn, None if fence is None else fence.epoch)
            # The transaction's mark, in this handle's own row: after a lost COMMIT it says
            # whether the transaction landed. (Not pg_xact_status: after a crash a
            # transaction id whose WAL was never flushed is handed out again, so a lost
            # transaction could read as another's commit.)
            conn.execute(
                "INSERT INTO write_marks (writer, mark) VALUES (%s, %s)"
                " ON CONFLICT (writer) DO UPDATE SET mark = excluded.mark",
                (self._writer, mark),
            )
        except BaseException:
            if not conn.broken:
                with suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise
        unsure[:] = [mark, str(self._session[0]), self._session[1]]
        conn.execute("COMMIT")
        unsure.clear()

    def _alone(
        self,
        conn: Conn,
        rows: list[pgjournal.Row],
        fence: Fence | None,
        mark: str,
        unsure: list[str],
    ) -> None:
        """A batch of records as one statement (its own transaction, pgjournal.py)."""
        unsure[:] = [mark, str(self._session[0]), self._session[1]]
        try:
            held = pgjournal.write_alone(conn, rows, fence, self._writer, mark)
        except psycopg.Error:
            if not (conn.broken or conn.closed):
                unsure.clear()  # the server answered with an error: nothing landed
            raise
        unsure.clear()
        if not held:
            assert fence is not None
            raise pglease.refused(conn, fence)

    def check_writable(self) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('write_checks', '1') ON CONFLICT (key)"
                " DO UPDATE SET value = (meta.value::bigint + 1)::text"
            )

        self._write(work)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        def attempt() -> list[tuple[Any, ...]]:
            return self._connection().execute(sql, args).fetchall()

        with self._exclusive():
            return self._with_retries(attempt)

    def _known(self, kind: type[E], value: str) -> E:
        try:
            return kind(value)
        except ValueError:
            raise StoreError(
                f"state store {self.where}: unknown {kind.__name__} {value!r} (written by"
                " another patchd version?)"
            ) from None

    # --- runs ------------------------------------------------------------------------------

    def start_run(self, run_id: str, group: str, window: str | None, at: datetime) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                'INSERT INTO runs (id, grp, "window", started, status) VALUES (%s, %s, %s, %s, %s)',
                (run_id, group, window, at, RunStatus.RUNNING.value),
            )

        self._write(work)

    def finish_run(
        self,
        run_id: str,
        status: RunStatus,
        at: datetime,
        total: int,
        succeeded: int,
        failed: int,
        detail: Mapping[str, Any],
    ) -> None:
        status = RunStatus(status)

        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute(
                "UPDATE runs SET finished = %s, status = %s, total = %s, succeeded = %s,"
                " failed = %s, detail = %s WHERE id = %s",
                (at, status.value, total, succeeded, failed, _json(detail), run_id),
            )

        self._write(work)

    def runs(self, group: str | None = None, limit: int = 100) -> list[RunRow]:
        sql = (
            'SELECT id, grp, "window", started, finished, status, total, succeeded, failed,'
            " detail FROM runs"
        )
        args: tuple[Any, ...] = ()
        if group is not None:
            sql += " WHERE grp = %s"
            args = (group,)
        rows = self._read(sql + " ORDER BY started DESC, seq DESC LIMIT %s", (*args, limit))
        return [
            RunRow(
                id=r[0],
                group=r[1],
                window=r[2],
                started=_utc(r[3]),
                finished=None if r[4] is None else _utc(r[4]),
                status=self._known(RunStatus, r[5]),
                total=r[6],
                succeeded=r[7],
                failed=r[8],
                detail=r[9],
            )
            for r in rows
        ]

    def last_run(self, group: str) -> RunRow | None:
        found = self.runs(group, limit=1)
        return found[0] if found else None

    # --- targets and the journal -----------------------------------------------------------

    def record(
        self,
        run_id: str,
        target: str,
        name: str,
        state: TargetState,
        at: datetime,
        *,
        step: str,
        phase: str,
        version_from: str | None = None,
        version_to: str | None = None,
        snapshot: Mapping[str, Any] | None = None,
        error: str | None = None,
        detail: Mapping[str, Any] | None = None,
        keep: Keep | None = None,
        then: Then | None = None,
    ) -> None:
        """Append a journal row (with the writer's epoch) and set the target's state, in
        one transaction; `keep` and `then` in the same one."""
        state = TargetState(state)  # ValueError for a state the code does not know
        row = pgjournal.row(run_id, target, name, state.value, at, step, phase, detail or {},
                            version_from, version_to, snapshot, error, then)  # fmt: skip

        def work(conn: Conn, epoch: int | None) -> None:
            pgjournal.write(conn, [row], epoch)
            if keep is not None:
                conn.execute(
                    "INSERT INTO retained (backend, target, run_id, description, data, expires)"
                    " VALUES (%s, %s, %s, %s, %s, %s)",
                    (keep.backend, name, run_id, keep.description, _json(keep.data),
                     keep.expires),
                )  # fmt: skip

        self._write(work, row if keep is None else None)

    def targets(self, run_id: str) -> list[TargetRow]:
        return self._targets("WHERE run_id = %s ORDER BY seq", (run_id,))

    def unfinished_targets(self) -> list[TargetRow]:
        resting = sorted(s.value for s in RESTING)
        return self._targets("WHERE NOT (state = ANY(%s)) ORDER BY updated, seq", (resting,))

    def rollback_failures(self) -> dict[str, datetime]:
        rows = self._read(
            "SELECT runs.grp, MAX(targets.updated) FROM targets"
            " JOIN runs ON runs.id = targets.run_id"
            " WHERE targets.state = 'rollback_failed' GROUP BY runs.grp"
        )
        return {r[0]: _utc(r[1]) for r in rows}

    def journal(self, run_id: str, target: str) -> list[tuple[str, str, datetime]]:
        rows = self._read(
            "SELECT step, phase, at FROM journal WHERE run_id = %s AND target = %s ORDER BY seq",
            (run_id, target),
        )
        return [(r[0], r[1], _utc(r[2])) for r in rows]

    def _targets(self, where: str, args: tuple[Any, ...]) -> list[TargetRow]:
        rows = self._read(
            "SELECT run_id, target, name, state, version_from, version_to, snapshot, error,"
            f" updated FROM targets {where}",
            args,
        )
        return [
            TargetRow(
                run_id=r[0],
                target=r[1],
                name=r[2],
                state=self._known(TargetState, r[3]),
                version_from=r[4],
                version_to=r[5],
                snapshot=r[6],
                error=r[7],
                updated=_utc(r[8]),
            )
            for r in rows
        ]

    # --- things kept after a commit, to remove when they expire ----------------------------

    def retained(self, due_by: datetime | None = None) -> list[RetainedRow]:
        sql = "SELECT id, backend, target, run_id, description, data, expires FROM retained"
        args: tuple[Any, ...] = ()
        if due_by is not None:
            sql += " WHERE expires <= %s"
            args = (due_by,)
        rows = self._read(sql + " ORDER BY expires, id", args)
        return [RetainedRow(r[0], r[1], r[2], r[3], r[4], r[5], _utc(r[6])) for r in rows]

    def released(self, retained_id: int) -> None:
        def work(conn: Conn, _epoch: int | None) -> None:
            conn.execute("DELETE FROM retained WHERE id = %s", (retained_id,))

        self._write(work)
