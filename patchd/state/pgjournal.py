"""The PostgreSQL store's hot write: the journal rows and target states of `record`
(PostgresStore.record), a whole group-commit batch of them in ONE statement.

Why: a rollout writes 8 journal rows (in 6 writes) per target, and with psycopg each
statement costs the client tens of microseconds of CPU whether or not it waits for the
answer. A batch as
its own transaction (BEGIN, the fence check, a journal insert and a targets upsert per
row, the write mark, COMMIT) is 4 + 2N statements; here it is one: the rows go as arrays,
unnested once, inserted into the journal and upserted into targets by data-modifying
CTEs, with the fence check and the write mark in the same statement. Run on an
autocommit session, that one statement is its own transaction: it lands whole or not at
all, and synchronous_commit=on makes it durable before the answer comes back.

The guarantees are PostgresStore's, kept as they were:
- fencing: the CTE `f` is pglease's fence check (FOR SHARE on the lease row, so a
  takeover waits for this statement or it sees the new epoch); every insert takes its
  rows joined with `f`, so a refused fence writes nothing, and the statement answers 0;
- the lost COMMIT: the write mark is set in the same statement, so after a lost answer
  the mark says whether it landed, as for a transaction;
- order: journal and targets rows get their `seq` in the batch's order (WITH ORDINALITY);
- times: `at` goes as ISO 8601 with its offset, read as timestamptz to the microsecond.

A batch with the same target twice (an upsert cannot touch a row twice in one statement)
or anything but such rows goes through PostgresStore's general transaction, which runs
`write` below for the rows: the same statement without the fence and the mark.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from patchd.state import pglease
from patchd.state.base import Then
from patchd.state.leader import Fence
from patchd.states import TargetState


@dataclass(frozen=True, slots=True)
class Row:
    """One `record` call: a journal row and the target's new state, as the JSON object
    the statement reads (made in the caller's thread: a detail that is not JSON fails
    that caller, not its batch); with `then`, two objects, the second the next step's."""

    run_id: str
    target: str
    doc: str


def row(
    run_id: str,
    target: str,
    name: str,
    state: str,
    at: datetime,
    step: str,
    phase: str,
    detail: Mapping[str, Any],
    version_from: str | None,
    version_to: str | None,
    snapshot: Mapping[str, Any] | None,
    error: str | None,
    then: Then | None = None,
) -> Row:
    """`then`: a second journal row after this one (Store.record's)."""
    doc = {"run_id": run_id, "target": target, "name": name, "state": state,
           "at": at.isoformat(), "step": step, "phase": phase, "detail": dict(detail),
           "version_from": version_from, "version_to": version_to,
           "snapshot": None if snapshot is None else dict(snapshot), "error": error}  # fmt: skip
    text = json.dumps(doc)
    if then is not None:
        # The targets row is upserted once per target, from its last object: that one
        # carries the first one's fields too, so it leaves what the two would in turn.
        doc.update(state=TargetState(then.state).value, step=then.step, phase=then.phase,
                   detail={})  # fmt: skip
        text += "," + json.dumps(doc)
    return Row(run_id, target, text)


# One parameter for the whole batch: a JSON array of Row.doc (json.dumps is one C call; an
# array parameter per column costs psycopg far more). A JSON null reads as SQL NULL; a
# json column keeps its text as written (json.dumps's, as psycopg's Json would send it).
_ROWS = (
    "rows AS (SELECT r.* FROM ROWS FROM (json_to_recordset(%(rows)s::json) AS (run_id text,"
    " target text, name text, state text, at timestamptz, step text, phase text,"
    " detail json, version_from text, version_to text, snapshot json, error text))"
    " WITH ORDINALITY AS r(run_id, target, name, state, at, step, phase, detail,"
    " version_from, version_to, snapshot, error, ord), f)"
)
_JOURNAL = (
    "j AS (INSERT INTO journal (run_id, target, step, phase, at, detail, epoch)"
    " SELECT run_id, target, step, phase, at, detail, %(epoch)s::bigint FROM rows ORDER BY ord)"
)
# As SqliteStore.record: a version, snapshot or error given once stays unless replaced.
# A target's last row only (a record with `then` has two): an upsert may not touch a row
# twice in one statement.
_TARGETS = (
    "t AS (INSERT INTO targets AS t (run_id, target, name, state, version_from, version_to,"
    " snapshot, error, updated)"
    " SELECT run_id, target, name, state, version_from, version_to, snapshot, error, at"
    " FROM (SELECT DISTINCT ON (run_id, target) * FROM rows ORDER BY run_id, target, ord DESC)"
    " AS last ORDER BY ord"
    " ON CONFLICT (run_id, target) DO UPDATE SET"
    " name = excluded.name, state = excluded.state,"
    " version_from = COALESCE(excluded.version_from, t.version_from),"
    " version_to = COALESCE(excluded.version_to, t.version_to),"
    " snapshot = COALESCE(excluded.snapshot, t.snapshot),"
    " error = COALESCE(excluded.error, t.error), updated = excluded.updated)"
)
_MARK = (
    "m AS (INSERT INTO write_marks (writer, mark) SELECT %(writer)s, %(mark)s FROM f"
    " ON CONFLICT (writer) DO UPDATE SET mark = excluded.mark)"
)
_FENCE = f"f AS MATERIALIZED ({pglease.FENCE_NAMED})"
_NO_FENCE = "f AS (SELECT 1)"


def _statement(fence: str, mark: bool) -> str:
    parts = [fence, _ROWS, _JOURNAL, _TARGETS] + ([_MARK] if mark else [])
    return "WITH " + ", ".join(parts) + " SELECT count(*) FROM f"


_INSIDE = _statement(_NO_FENCE, mark=False)  # in a transaction that fences and marks
_ALONE = _statement(_NO_FENCE, mark=True)
_ALONE_FENCED = _statement(_FENCE, mark=True)


def distinct(rows: Sequence[Row]) -> bool:
    """Whether no target comes twice (so that one statement may take them all)."""
    return len({(r.run_id, r.target) for r in rows}) == len(rows)


def _params(rows: Sequence[Row], epoch: int | None) -> dict[str, Any]:
    return {"rows": "[" + ",".join(r.doc for r in rows) + "]", "epoch": epoch}


def write(conn: psycopg.Connection[Any], rows: Sequence[Row], epoch: int | None) -> None:
    """Inside the caller's transaction (which checks the fence and sets the mark): the
    rows, whose targets are distinct."""
    conn.execute(_INSIDE, _params(rows, epoch))


def write_alone(
    conn: psycopg.Connection[Any],
    rows: Sequence[Row],
    fence: Fence | None,
    writer: str,
    mark: str,
    lease: str = pglease.LEASE,
) -> bool:
    """On an autocommit session: the rows (distinct targets), the fence check and the
    write mark as one statement, which is one transaction. False if the fence refused
    (then nothing was written)."""
    params = _params(rows, None if fence is None else fence.epoch)
    params.update(writer=writer, mark=mark)
    if fence is None:
        sql = _ALONE
    else:
        sql = _ALONE_FENCED
        params.update(lease=lease, holder=fence.holder)
    row = conn.execute(sql, params).fetchone()
    return row is not None and row[0] == 1
