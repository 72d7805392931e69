"""Retrying rollbacks that failed, while the daemon runs: bounded, with backoff, journaled.

A target whose rollback failed (`rollback_failed`: a person is alerted) often failed for
a passing reason: an engine restarting, a vCenter task queue full, a datastore briefly
out of space. The daemon tries its rollback again, from the snapshot data in its journal,
on the schedule of a `RetryPolicy` (by default 5 retries, 2 minutes after the failure and
then three times as long each time, capped at 4 hours): the runtime asks `pending()` what
is due and when the next one is, the daemon arms one timer for that instant, and
`retry()` runs one.

Everything a retry needs is in the journal, so the schedule survives a restart: each
retry writes a `rolling_back` row with step `rollback_retry` BEFORE touching the target
(the number of those rows is the number of retries done) and its result after, and the
time of the newest `rollback_failed` row is what the next delay counts from. Failures
older than `max_age` are left alone: by then a person has looked at them (they were
alerted), and may have fixed the target by hand. A retry takes the group's lock, so it
never runs beside a run of the group (another process's included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from patchd.backends.base import Backend, LeftOutOfService, Snapshot, Target
from patchd.config.settings import Settings
from patchd.reconcile import Reconciled
from patchd.runner import group_lock
from patchd.state.base import Store, TargetRow
from patchd.states import TargetState

STEP = "rollback_retry"  # the journal step (and log event) of a retry


@dataclass(frozen=True)
class RetryPolicy:
    """When failed rollbacks are tried again. Not configurable (yet): the defaults."""

    attempts: int = 5
    first: timedelta = timedelta(minutes=2)
    factor: int = 3
    cap: timedelta = timedelta(hours=4)
    max_age: timedelta = timedelta(days=1)  # older failures are left to a person
    recent_runs: int = 100  # how many of a group's newest runs are looked at

    def delay(self, done: int) -> timedelta:
        """How long after the newest failure the retry after `done` retries is due."""
        return min(self.first * int(self.factor**done), self.cap)


@dataclass(frozen=True)
class Due:
    """A target in rollback_failed with retries left: its next retry and when."""

    group: str
    row: TargetRow
    attempt: int  # the number of the next retry, from 1
    at: datetime


def pending(store: Store, settings: Settings, now: datetime, policy: RetryPolicy) -> list[Due]:
    """The targets whose rollback failed and may be retried, soonest first. Targets of
    groups no longer configured are left for a person (as reconciliation leaves them), and
    so is a target a later run of its group worked on: its old snapshot is not its state
    to go back to any more."""
    found: list[Due] = []
    oldest = now - policy.max_age
    for group, newest in store.rollback_failures().items():
        if newest < oldest or group not in settings.groups:
            continue
        later: set[str] = set()  # targets of newer runs (runs() lists the newest first)
        for run in store.runs(group, limit=policy.recent_runs):
            for row in store.targets(run.id):
                touched_since = row.target in later
                later.add(row.target)
                if touched_since or row.state != TargetState.ROLLBACK_FAILED:
                    continue
                if row.updated < oldest:
                    continue
                done = retries_done(store, row)
                if done < policy.attempts:
                    at = row.updated + policy.delay(done)
                    found.append(Due(group, row, done + 1, at))
    return sorted(found, key=lambda due: due.at)


def retries_done(store: Store, row: TargetRow) -> int:
    """How many retries of this target's rollback were started (its journal says)."""
    steps = store.journal(row.run_id, row.target)
    return sum(1 for step, phase, _ in steps if step == STEP and phase == "intent")


def retry(
    settings: Settings,
    store: Store,
    backends: Mapping[str, Backend],
    due: Due,
    clock: Callable[[], datetime],
) -> Reconciled:
    """Try one target's rollback again and journal the outcome. Raises RunRefused when
    the group is being run (the retry stays due), StoreError when its first row cannot be
    written (nothing was touched)."""
    row = due.row
    backend = backends[settings.groups[due.group].backend]
    target = Target(id=row.target, name=row.name, kind="unknown")
    snapshot = Snapshot(row.target, dict(row.snapshot or {}))
    detail = f"retry {due.attempt}"
    with group_lock(settings, due.group):
        store.record(
            row.run_id, row.target, row.name, TargetState.ROLLING_BACK, clock(),
            step=STEP, phase="intent", error=row.error,
        )  # fmt: skip
        try:
            backend.rollback(target, snapshot)
        except LeftOutOfService as err:
            store.record(
                row.run_id, row.target, row.name, TargetState.OUT_OF_SERVICE, clock(),
                step=STEP, phase="done", error=f"{row.error}; {detail}: {err}",
            )  # fmt: skip
            return Reconciled(row.run_id, row.name, row.state, TargetState.OUT_OF_SERVICE, str(err))
        except Exception as err:
            why = str(err) or type(err).__name__
            store.record(
                row.run_id, row.target, row.name, TargetState.ROLLBACK_FAILED, clock(),
                step=STEP, phase="failed", error=f"{row.error}; {detail}: {why}",
            )  # fmt: skip
            return Reconciled(row.run_id, row.name, row.state, TargetState.ROLLBACK_FAILED, why)
        store.record(
            row.run_id, row.target, row.name, TargetState.ROLLED_BACK, clock(),
            step=STEP, phase="done",
        )  # fmt: skip
    return Reconciled(row.run_id, row.name, row.state, TargetState.ROLLED_BACK, detail)
