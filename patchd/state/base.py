"""The Store contract: what every state store (SQLite today, PostgreSQL next) promises,
the rows it hands back, and the one error it raises.

The store holds runs, the per-target journal (an append-only list of steps) with each
target's current state, what commits kept (snapshots, old images) until it expires, the
operators' controls (pauses, approvals, quarantined versions: plain keyed JSON values
whose meaning patchd.engine.controls owns) and the audit trail of control requests.
The engine writes a target's intent BEFORE each side effect and its outcome after, so a
restart finds targets a dead patchd left mid-patch by their last journal row.

Contract shared by every method and every implementation (tests/store/ checks it):

- Durability: a write method that returns has made its write durable. A process that
  dies (kill -9, power loss) right after the call returns loses nothing of it; a call
  that raises wrote nothing of that call (each write is one transaction).
- Group commit: write methods may be called from many threads at once. An implementation
  may carry concurrent writes in one transaction (one fsync for many targets), but each
  caller still returns only after its own write is durable, and a write that fails
  fails only its own caller: the others land.
- Errors: every failure to open, read or write is a StoreError whose message names the
  store (its path or address) and the cause in plain words. Nothing else escapes except
  ValueError for a state or status the code does not know (a programming error).
- Times go in as aware datetimes and come back in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from patchd.states import RunStatus, TargetState


class StoreError(Exception):
    """The store cannot be read or written; patchd must not touch targets without it."""


@dataclass(frozen=True)
class RetainedRow:
    """Something a commit kept, as stored: `id` is what `released` takes."""

    id: int
    backend: str
    target: str
    run_id: str
    description: str
    data: Mapping[str, Any]
    expires: datetime


@dataclass(frozen=True)
class Keep:
    """Something a commit kept (a snapshot, an old image), to remove when it expires."""

    backend: str
    description: str
    data: Mapping[str, Any]
    expires: datetime


@dataclass(frozen=True)
class Then:
    """The next step's row, written by `record` in the same transaction as the step
    before it. For a step's end and the next step's intent: nothing is done between the
    two, so one durable write can carry both (a crash finds both rows or neither, as it
    would just before the first), and a target waits for 6 commits instead of 8."""

    state: TargetState
    step: str
    phase: str = "intent"


@dataclass(frozen=True)
class RunRow:
    id: str
    group: str
    window: str | None
    started: datetime
    finished: datetime | None
    status: RunStatus
    total: int
    succeeded: int
    failed: int
    detail: Mapping[str, Any]


@dataclass(frozen=True)
class TargetRow:
    """A target's current state in one run (the newest of its journal rows), with the
    versions, snapshot data and error its rows carried."""

    run_id: str
    target: str
    name: str
    state: TargetState
    version_from: str | None
    version_to: str | None
    snapshot: Mapping[str, Any] | None
    error: str | None
    updated: datetime


@dataclass(frozen=True)
class OutboxRow:
    """A notification waiting for delivery to one channel: `id` is what
    `notification_retry` and `notification_done` take."""

    id: int
    channel: str
    event: str
    document: Mapping[str, Any]
    created: datetime
    attempts: int  # delivery attempts made so far
    due: datetime  # when to try (again)
    error: str | None  # why the last attempt failed


@dataclass(frozen=True)
class ControlRow:
    """One control in force: `kind` (pause, approval, quarantine) for a group, under
    `key` ("" when the kind has one value per group), with its JSON-able data."""

    kind: str
    group: str
    key: str
    data: Mapping[str, Any]
    at: datetime


@dataclass(frozen=True)
class AuditRow:
    """One control request as received: who (uid, pid, user name), what, when."""

    at: datetime
    uid: int
    pid: int
    user: str
    action: str
    group: str | None
    detail: Mapping[str, Any]


class Store(Protocol):
    """A handle on patchd's state; thread-safe. See the module docstring for the
    durability, group-commit and error contract every method keeps."""

    def close(self) -> None:
        """Release the handle; later calls are errors. Idempotent."""

    def check_writable(self) -> None:
        """Write and commit something harmless, so a store that cannot be written (a
        read-only or full file system, a read-only handle) is found before anything
        depends on it; StoreError if not."""

    # --- runs ---------------------------------------------------------------------------

    def start_run(self, run_id: str, group: str, window: str | None, at: datetime) -> None:
        """Record a new run with status `running`. A run id is used once."""

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
        """Set a run's end: its status, counts and detail (JSON-able). May be called again
        for the same run (a reconciliation recounts an interrupted run)."""

    def runs(self, group: str | None = None, limit: int = 100) -> list[RunRow]:
        """Runs newest first (by start; among equal starts, the later recorded first), of
        one group or all, at most `limit`."""

    def last_run(self, group: str) -> RunRow | None:
        """The group's newest run (as `runs(group, 1)`), None if it never ran."""

    # --- targets and the journal --------------------------------------------------------

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
        """Append a journal row (step, phase) and set the target's state, in one
        transaction. Fields given as None keep their previous value. `keep` is recorded in
        the same transaction, so a commit and what it kept are never journaled apart;
        so is `then`, a second row after this one (the target ends in its state).
        The run must have been started (StoreError otherwise). This is the write the
        group commit is for."""

    def targets(self, run_id: str) -> list[TargetRow]:
        """The run's targets in the order they were first recorded."""

    def unfinished_targets(self) -> list[TargetRow]:
        """Targets, of any run, whose state is not a resting one (states.RESTING): a
        patchd stopped while working on them. Least recently updated first."""

    def rollback_failures(self) -> dict[str, datetime]:
        """group -> when its newest target in rollback_failed was recorded."""

    def journal(self, run_id: str, target: str) -> list[tuple[str, str, datetime]]:
        """A target's journal rows in a run, in the order written: (step, phase, at)."""

    # --- things kept after a commit, to remove when they expire -------------------------

    def retained(self, due_by: datetime | None = None) -> list[RetainedRow]:
        """Everything retained, soonest expiry first; only what expires by `due_by` (that
        instant included) if given."""

    def released(self, retained_id: int) -> None:
        """Forget a retained item (it was removed); an unknown id is no error."""

    # --- the notifications outbox -------------------------------------------------------

    def enqueue_notifications(
        self, messages: Sequence[tuple[str, str, Mapping[str, Any]]], at: datetime
    ) -> None:
        """Queue (channel, event, document) messages, due at once, in one transaction."""

    def due_notifications(self, by: datetime | None = None, limit: int = 100) -> list[OutboxRow]:
        """Queued messages, soonest due first (then in the order queued); only those due by
        `by` (that instant included) if given; at most `limit`."""

    def notification_retry(self, outbox_id: int, attempts: int, due: datetime, error: str) -> None:
        """Record a failed attempt: the message is tried again at `due`."""

    def notification_done(self, outbox_id: int) -> None:
        """Forget a message (delivered or dropped); an unknown id is no error."""

    # --- operators' controls and their audit trail --------------------------------------

    def put_control(
        self, kind: str, group: str, key: str, data: Mapping[str, Any], at: datetime
    ) -> None:
        """Set the control (kind, group, key), replacing one already there."""

    def drop_control(self, kind: str, group: str, key: str | None = None) -> int:
        """Remove the control (kind, group, key), or every key of (kind, group) when key
        is None; returns how many were removed (0 is no error)."""

    def controls(self, kind: str, group: str | None = None) -> list[ControlRow]:
        """The controls of a kind (of one group if given), oldest first."""

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
        """Append a control request to the audit trail."""

    def audit_trail(self, limit: int = 100) -> list[AuditRow]:
        """The newest control requests first, at most `limit`."""
