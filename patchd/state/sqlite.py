"""The SQLite implementation of the Store protocol (state/base.py): one file in WAL mode.

Durability: synchronous=FULL, so a transaction that committed is on disk; a write method
returns only after its transaction committed. Group commit: concurrent journal writes
share one transaction (see `SqliteStore._write`). The schema is created and migrated at
open (state/migrations.py); a read-only handle (`readonly=True`) opens the file with
SQLite's `mode=ro`, never creates it and never migrates it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from patchd.state import migrations
from patchd.state.base import (
    AuditRow,
    ControlRow,
    Keep,
    OutboxRow,
    RetainedRow,
    RunRow,
    StoreError,
    TargetRow,
    Then,
)
from patchd.state.groupcommit import GroupCommit, Pending
from patchd.states import RESTING, RunStatus, TargetState

# Kept for callers of the first store; the version is migrations.CURRENT.
SCHEMA_VERSION = migrations.CURRENT

E = TypeVar("E", bound=StrEnum)


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _utc(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _why(directory: Path) -> str:
    """What SQLite's terse error ("unable to open database file", "disk I/O error") may
    mean for the state directory, as a suffix for the message."""
    with suppress(OSError):
        if not os.access(directory, os.W_OK):
            return f" ({directory} is not writable)"
        if shutil.disk_usage(directory).free < 1 << 20:
            return f" (the file system of {directory} is full)"
    return ""


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, if one is open. On a full disk (or a closed handle) this
    may fail too: the caller must still see the first error, as a StoreError."""
    with suppress(sqlite3.Error):
        if db.in_transaction:
            db.execute("ROLLBACK")


class _Write(Pending):
    """A journal write waiting for the next group commit (see `SqliteStore._write`)."""

    __slots__ = ("work",)

    def __init__(self, work: Callable[[sqlite3.Connection], None]) -> None:
        super().__init__()
        self.work = work


class SqliteStore(GroupCommit[_Write]):
    """A thread-safe handle on the SQLite state file (implements state.base.Store)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        GroupCommit.__init__(self)  # _lock (also the connection's), _queue
        self.version = migrations.CURRENT  # a read-only handle may find an older one
        self._db = self._open_readonly() if readonly else self._open()

    def _open(self) -> sqlite3.Connection:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as err:
            raise StoreError(f"cannot open state store {path}: {err}{_why(path.parent)}") from err
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            migrations.migrate(db, path)
        except (sqlite3.Error, OSError, StoreError) as err:
            db.close()
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"cannot open state store {path}: {err}{_why(path.parent)}") from err
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        path = self.path
        if not path.exists():
            # mode=ro would fail with SQLite's "unable to open database file"; say why.
            raise StoreError(
                f"state store {path} does not exist yet: no patchd has run with this state_dir"
            )
        try:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        except (sqlite3.Error, OSError) as err:
            raise StoreError(f"cannot open state store {path} to read: {err}") from err
        try:
            self.version = migrations.check_current(db, path)
        except (sqlite3.Error, StoreError) as err:
            db.close()
            if isinstance(err, StoreError):
                raise
            raise StoreError(f"cannot read state store {path}: {err}") from err
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._exclusive():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                _rollback(self._db)
                raise StoreError(f"state store {self.path}: {err}") from err

    def _write(self, work: Callable[[sqlite3.Connection], None]) -> None:
        """Run `work` in a write transaction; return once it is committed (on disk).

        Group commit (groupcommit.py): writes that arrive while another thread commits
        wait for it, then one of them commits them all in one transaction and one fsync.
        Concurrent targets share fsyncs instead of queueing for one each, and every
        caller still returns only after its own write is durable. If the shared
        transaction fails, each write is tried again alone, so one bad write fails only
        its own caller.
        """
        entry = _Write(work)
        self._group_commit(entry)
        if isinstance(entry.error, sqlite3.Error):
            raise StoreError(f"state store {self.path}: {entry.error}") from entry.error
        if entry.error is not None:
            raise entry.error

    def _commit_group(self, batch: list[_Write]) -> None:
        """Commit `batch` in one transaction (the caller holds the lock)."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for entry in batch:
                entry.work(db)
            db.execute("COMMIT")
        except BaseException as err:
            _rollback(db)
            if len(batch) > 1 and isinstance(err, Exception):
                for entry in batch:  # nothing was written: each on its own now
                    self._commit_group([entry])
                return
            for entry in batch:
                entry.error = err
        for entry in batch:
            entry.done = True

    def check_writable(self) -> None:
        """Write and commit a row, so that a store that cannot be written (a read-only or
        full file system) is found before anything depends on it; StoreError if not."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('write_checks', '1') ON CONFLICT (key)"
                " DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[Any]:
        """Run a read; a failure (a closed handle, an I/O error) is a StoreError."""
        with self._exclusive():
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as err:
                raise StoreError(f"state store {self.path}: {err}") from err

    def _known(self, kind: type[E], value: str) -> E:
        """A state or status read back; one this code does not know is a StoreError."""
        try:
            return kind(value)
        except ValueError:
            raise StoreError(
                f"state store {self.path}: unknown {kind.__name__} {value!r} (written by"
                " another patchd version?)"
            ) from None

    # --- runs -----------------------------------------------------------------------------

    def start_run(self, run_id: str, group: str, window: str | None, at: datetime) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (id, grp, window, started, status) VALUES (?, ?, ?, ?, ?)",
                (run_id, group, window, _ts(at), RunStatus.RUNNING.value),
            )

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
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET finished = ?, status = ?, total = ?, succeeded = ?, failed = ?,"
                " detail = ? WHERE id = ?",
                (
                    _ts(at), RunStatus(status).value, total, succeeded, failed,
                    json.dumps(dict(detail)), run_id,
                ),
            )  # fmt: skip

    def runs(self, group: str | None = None, limit: int = 100) -> list[RunRow]:
        sql = "SELECT * FROM runs"
        args: tuple[object, ...] = ()
        if group is not None:
            sql += " WHERE grp = ?"
            args = (group,)
        sql += " ORDER BY started DESC, rowid DESC LIMIT ?"
        rows = self._query(sql, (*args, limit))
        return [
            RunRow(
                id=r[0],
                group=r[1],
                window=r[2],
                started=datetime.fromtimestamp(r[3], UTC),
                finished=_dt(r[4]),
                status=self._known(RunStatus, r[5]),
                total=r[6],
                succeeded=r[7],
                failed=r[8],
                detail=json.loads(r[9]),
            )
            for r in rows
        ]

    def last_run(self, group: str) -> RunRow | None:
        found = self.runs(group, limit=1)
        return found[0] if found else None

    # --- targets and the journal ----------------------------------------------------------

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
        """Append a journal row and set the target's state, in one transaction.

        Fields given as None keep their previous value. `keep` is recorded in the same
        transaction, so a commit and what it kept are never journaled apart; so is
        `then`, the next step's row.
        """
        state = TargetState(state)  # ValueError for a state the code does not know
        snap = None if snapshot is None else json.dumps(dict(snapshot))
        info = json.dumps(dict(detail or {}))
        rows = [(state.value, step, phase, info, version_from, version_to, snap, error)]
        if then is not None:
            rows.append((TargetState(then.state).value, then.step, then.phase, "{}", None,
                         None, None, None))  # fmt: skip

        def work(db: sqlite3.Connection) -> None:
            for now, step_, phase_, info_, v_from, v_to, snap_, error_ in rows:
                db.execute(
                    "INSERT INTO journal (run_id, target, step, phase, at, detail)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, target, step_, phase_, _ts(at), info_),
                )
                db.execute(
                    "INSERT INTO targets (run_id, target, name, state, version_from,"
                    " version_to, snapshot, error, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (run_id, target) DO UPDATE SET"
                    " name = excluded.name, state = excluded.state,"
                    " version_from = COALESCE(excluded.version_from, version_from),"
                    " version_to = COALESCE(excluded.version_to, version_to),"
                    " snapshot = COALESCE(excluded.snapshot, snapshot),"
                    " error = COALESCE(excluded.error, error), updated = excluded.updated",
                    (run_id, target, name, now, v_from, v_to, snap_, error_, _ts(at)),
                )
            if keep is not None:
                db.execute(
                    "INSERT INTO retained (backend, target, run_id, description, data, expires)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        keep.backend, name, run_id, keep.description,
                        json.dumps(dict(keep.data)), _ts(keep.expires),
                    ),
                )  # fmt: skip

        self._write(work)

    def targets(self, run_id: str) -> list[TargetRow]:
        return self._targets("WHERE run_id = ? ORDER BY rowid", (run_id,))

    def unfinished_targets(self) -> list[TargetRow]:
        """Targets whose last state is not a resting one: a patchd died working on them."""
        resting = tuple(sorted(s.value for s in RESTING))
        marks = ",".join("?" for _ in resting)
        return self._targets(f"WHERE state NOT IN ({marks}) ORDER BY updated", resting)

    def rollback_failures(self) -> dict[str, datetime]:
        """group -> when its newest target in rollback_failed was recorded."""
        rows = self._query(
            "SELECT runs.grp, MAX(targets.updated) FROM targets"
            " JOIN runs ON runs.id = targets.run_id"
            " WHERE targets.state = ? GROUP BY runs.grp",
            (TargetState.ROLLBACK_FAILED.value,),
        )
        return {r[0]: datetime.fromtimestamp(r[1], UTC) for r in rows}

    def journal(self, run_id: str, target: str) -> list[tuple[str, str, datetime]]:
        rows = self._query(
            "SELECT step, phase, at FROM journal WHERE run_id = ? AND target = ? ORDER BY seq",
            (run_id, target),
        )
        return [(r[0], r[1], datetime.fromtimestamp(r[2], UTC)) for r in rows]

    def _targets(self, where: str, args: tuple[object, ...]) -> list[TargetRow]:
        rows = self._query(
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
                snapshot=None if r[6] is None else json.loads(r[6]),
                error=r[7],
                updated=datetime.fromtimestamp(r[8], UTC),
            )
            for r in rows
        ]

    # --- things kept after a commit, to remove when they expire ---------------------------

    def retained(self, due_by: datetime | None = None) -> list[RetainedRow]:
        """Everything retained, oldest expiry first; only what expires by `due_by` if given."""
        sql = "SELECT id, backend, target, run_id, description, data, expires FROM retained"
        args: tuple[object, ...] = ()
        if due_by is not None:
            sql += " WHERE expires <= ?"
            args = (_ts(due_by),)
        rows = self._query(sql + " ORDER BY expires", args)
        return [
            RetainedRow(
                r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), datetime.fromtimestamp(r[6], UTC)
            )
            for r in rows
        ]

    def released(self, retained_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM retained WHERE id = ?", (retained_id,))

    # --- the notifications outbox ---------------------------------------------------------

    def enqueue_notifications(
        self, messages: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime
    ) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO outbox (channel, event, document, created, due)"
                " VALUES (?, ?, ?, ?, ?)",
                [(ch, ev, json.dumps(dict(doc)), _ts(at), _ts(at)) for ch, ev, doc in messages],
            )

    def due_notifications(self, by: datetime | None = None, limit: int = 100) -> list[OutboxRow]:
        sql = "SELECT id, channel, event, document, created, attempts, due, error FROM outbox"
        args: tuple[object, ...] = ()
        if by is not None:
            sql += " WHERE due <= ?"
            args = (_ts(by),)
        rows = self._query(sql + " ORDER BY due, id LIMIT ?", (*args, limit))
        return [
            OutboxRow(
                r[0], r[1], r[2], json.loads(r[3]), datetime.fromtimestamp(r[4], UTC), r[5],
                datetime.fromtimestamp(r[6], UTC), r[7],
            )
            for r in rows
        ]  # fmt: skip

    def notification_retry(self, outbox_id: int, attempts: int, due: datetime, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE outbox SET attempts = ?, due = ?, error = ? WHERE id = ?",
                (attempts, _ts(due), error, outbox_id),
            )

    def notification_done(self, outbox_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,))

    # --- operators' controls and their audit trail ----------------------------------------

    def put_control(
        self, kind: str, group: str, key: str, data: Mapping[str, Any], at: datetime
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO controls (kind, grp, key, data, at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (kind, grp, key) DO UPDATE SET data = excluded.data,"
                " at = excluded.at",
                (kind, group, key, json.dumps(dict(data)), _ts(at)),
            )

    def drop_control(self, kind: str, group: str, key: str | None = None) -> int:
        sql = "DELETE FROM controls WHERE kind = ? AND grp = ?"
        args: tuple[object, ...] = (kind, group)
        if key is not None:
            sql += " AND key = ?"
            args = (*args, key)
        with self._tx() as db:
            return int(db.execute(sql, args).rowcount)

    def controls(self, kind: str, group: str | None = None) -> list[ControlRow]:
        if self.version < 2:  # a read-only handle on a journal before controls: none
            return []
        sql = "SELECT kind, grp, key, data, at FROM controls WHERE kind = ?"
        args: tuple[object, ...] = (kind,)
        if group is not None:
            sql += " AND grp = ?"
            args = (kind, group)
        rows = self._query(sql + " ORDER BY at, grp, key", args)
        return [ControlRow(r[0], r[1], r[2], json.loads(r[3]), _utc(r[4])) for r in rows]

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
        with self._tx() as db:
            db.execute(
                "INSERT INTO audit (at, uid, pid, user, action, grp, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_ts(at), uid, pid, user, action, group, json.dumps(dict(detail))),
            )

    def audit_trail(self, limit: int = 100) -> list[AuditRow]:
        if self.version < 2:
            return []
        rows = self._query(
            "SELECT at, uid, pid, user, action, grp, detail FROM audit ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        return [AuditRow(_utc(r[0]), r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]
