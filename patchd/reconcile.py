"""Restart reconciliation: drive targets a stopped patchd left mid-patch to a safe end.

Any target whose last journal row is not a resting state (a patchd was killed or lost its
engine while working on it) is driven to an end:

- journaled `verified` or `committing` (the new version had passed its checks): it is
  checked again (the backend's own check and the group's probes) and, if healthy,
  committed; the commit is idempotent, so one that was half done is finished. A commit
  that cannot be finished (a vSphere commit needs the process that applied the patch) or
  a failed check falls through to a rollback;
- anything earlier is rolled back from the snapshot data in its journal. Rolling back is
  always safe: every backend's rollback is idempotent and works from a snapshot that was
  only planned or partly taken, and it never removes a container that has no replacement.

Targets whose backend is gone from the config are left alone and reported. So are those
whose backend does not answer now (an engine or vCenter that is down): they stay
unfinished, for the next start or `patchd run` once it is back, rather than be given up
as rollback_failed. A run closed as interrupted is counted again when a later
reconciliation ends its targets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from patchd import health
from patchd.backends.base import (
    JOURNALED_VERSION,
    Backend,
    LeftOutOfService,
    Snapshot,
    Target,
    Update,
)
from patchd.config.settings import Group, Settings
from patchd.runner import RunRefused, group_lock
from patchd.state.base import Keep, Store, TargetRow
from patchd.states import PROVEN, RunStatus, TargetState

# Resting states of a target that counts as failed in its run's recount.
_ENDED_BADLY = frozenset(
    {TargetState.ROLLED_BACK, TargetState.ROLLBACK_FAILED, TargetState.OUT_OF_SERVICE}
)


@dataclass(frozen=True)
class Reconciled:
    run_id: str
    target: str
    was: TargetState
    now: TargetState
    detail: str = ""


def reconcile(
    settings: Settings,
    store: Store,
    backends: Mapping[str, Backend],
    clock: Callable[[], datetime],
) -> list[Reconciled]:
    """Roll back every unfinished target and close runs left "running"; returns what was
    done to each target. A group another process is running right now is left alone."""
    runs = store.runs(limit=10_000)
    groups = {run.id: run.group for run in runs}
    free: dict[str, bool] = {}

    def idle(group: str) -> bool:
        if group not in free:
            try:
                with group_lock(settings, group):
                    free[group] = True
            except RunRefused:
                free[group] = False
        return free[group]

    reachable: dict[str, str | None] = {}  # backend -> why it cannot be reached now

    def unreachable(name: str, backend: Backend) -> str | None:
        if name not in reachable:
            try:
                backend.ping()
                reachable[name] = None
            except Exception as err:
                reachable[name] = str(err) or type(err).__name__
        return reachable[name]

    done: list[Reconciled] = []
    for row in store.unfinished_targets():
        group_name = groups.get(row.run_id, "")
        if group_name and not idle(group_name):
            continue
        group = settings.groups.get(group_name)
        backend = backends.get(group.backend) if group is not None else None
        if group is None or backend is None:
            done.append(
                Reconciled(
                    row.run_id,
                    row.name,
                    row.state,
                    row.state,
                    "its group or backend is no longer configured; left for a person",
                )
            )
            continue
        down = unreachable(group.backend, backend)
        if down is not None:
            detail = f"backend {group.backend} cannot be reached ({down}); left for later"
            done.append(Reconciled(row.run_id, row.name, row.state, row.state, detail))
            continue
        target = Target(id=row.target, name=row.name, kind="unknown")
        snapshot = Snapshot(row.target, dict(row.snapshot or {}))
        was = row.state
        failure = f"patchd stopped during {was}"
        if was in PROVEN:
            error = _commit(store, backend, group, row, target, snapshot, clock)
            if error is None:
                done.append(Reconciled(row.run_id, row.name, was, TargetState.COMMITTED))
                continue
            failure += f"; finishing the commit: {error}"
        store.record(
            row.run_id,
            row.target,
            row.name,
            TargetState.ROLLING_BACK,
            clock(),
            step="reconcile",
            phase="intent",
            error=failure,
        )
        try:
            backend.rollback(target, snapshot)
        except LeftOutOfService as err:
            store.record(
                row.run_id, row.target, row.name, TargetState.OUT_OF_SERVICE, clock(),
                step="reconcile", phase="done", error=f"reconcile: {err}",
            )  # fmt: skip
            done.append(Reconciled(row.run_id, row.name, was, TargetState.OUT_OF_SERVICE, str(err)))
            continue
        except Exception as err:
            store.record(
                row.run_id,
                row.target,
                row.name,
                TargetState.ROLLBACK_FAILED,
                clock(),
                step="reconcile",
                phase="failed",
                error=f"reconcile: {err}",
            )
            done.append(
                Reconciled(row.run_id, row.name, was, TargetState.ROLLBACK_FAILED, str(err))
            )
            continue
        store.record(
            row.run_id, row.target, row.name, TargetState.ROLLED_BACK, clock(),
            step="reconcile", phase="done",
        )  # fmt: skip
        done.append(Reconciled(row.run_id, row.name, was, TargetState.ROLLED_BACK))
    ended = {item.run_id for item in done if item.now != item.was}
    for run in runs:
        recount = run.status == RunStatus.INTERRUPTED and run.id in ended
        if (run.status == RunStatus.RUNNING or recount) and idle(run.group):
            rows = store.targets(run.id)
            store.finish_run(
                run.id,
                RunStatus.INTERRUPTED,
                clock(),
                total=len(rows),
                succeeded=sum(1 for r in rows if r.state == TargetState.COMMITTED),
                failed=sum(1 for r in rows if r.state in _ENDED_BADLY),
                detail={"error": "patchd stopped during this run", "verified": {}},
            )
    return done


def _commit(
    store: Store,
    backend: Backend,
    group: Group,
    row: TargetRow,
    target: Target,
    snapshot: Snapshot,
    clock: Callable[[], datetime],
) -> str | None:
    """Check a target whose new version was verified and commit it; None when committed,
    else why not (the caller rolls it back)."""
    update = Update(ref="", current=row.version_from or "", available=row.version_to or "")
    if row.version_to:
        snapshot = Snapshot(
            snapshot.target_id, {**snapshot.data, JOURNALED_VERSION: row.version_to}
        )
    try:
        if row.state == TargetState.VERIFIED:
            store.record(
                row.run_id, row.target, row.name, TargetState.COMMITTING, clock(),
                step="reconcile", phase="intent",
            )  # fmt: skip
        backend.verify(target, update, group.health)
        health.probe(target, backend.describe(target), group)
        retained = backend.commit(target, snapshot, group.snapshot)
    except Exception as err:
        return str(err) or type(err).__name__
    keep = None
    if retained is not None:
        keep = Keep(group.backend, retained.description, retained.data, clock() + retained.keep)
    store.record(
        row.run_id, row.target, row.name, TargetState.COMMITTED, clock(),
        step="reconcile", phase="done", keep=keep,
    )  # fmt: skip
    return None
