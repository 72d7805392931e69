"""Restart reconciliation: drive targets a stopped patchd left mid-patch to a safe end.

Any target whose last journal row is not a resting state (a patchd was killed or lost its
engine while working on it) is rolled back from the snapshot data in its journal. Rolling
back is always safe: every backend's rollback is idempotent and works from a snapshot that
was only planned or partly taken, and it never removes a container that has no replacement.
Targets whose backend is gone from the config are left alone and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from patchd.backends.base import Backend, Snapshot, Target
from patchd.config.settings import Settings
from patchd.runner import RunRefused, group_lock
from patchd.state import Store


@dataclass(frozen=True)
class Reconciled:
    run_id: str
    target: str
    was: str
    now: str
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

    done: list[Reconciled] = []
    for row in store.unfinished_targets():
        group_name = groups.get(row.run_id, "")
        if group_name and not idle(group_name):
            continue
        group = settings.groups.get(group_name)
        backend = backends.get(group.backend) if group is not None else None
        if backend is None:
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
        target = Target(id=row.target, name=row.name, kind="unknown")
        snapshot = Snapshot(row.target, dict(row.snapshot or {}))
        was = row.state
        store.record(
            row.run_id,
            row.target,
            row.name,
            "rolling_back",
            clock(),
            step="reconcile",
            phase="intent",
            error=f"patchd stopped during {was}",
        )
        try:
            backend.rollback(target, snapshot)
        except Exception as err:
            store.record(
                row.run_id,
                row.target,
                row.name,
                "rollback_failed",
                clock(),
                step="reconcile",
                phase="failed",
                error=f"reconcile: {err}",
            )
            done.append(Reconciled(row.run_id, row.name, was, "rollback_failed", str(err)))
            continue
        store.record(
            row.run_id, row.target, row.name, "rolled_back", clock(), step="reconcile", phase="done"
        )
        done.append(Reconciled(row.run_id, row.name, was, "rolled_back"))
    for run in runs:
        if run.status == "running" and idle(run.group):
            rows = store.targets(run.id)
            store.finish_run(
                run.id,
                "interrupted",
                clock(),
                total=len(rows),
                succeeded=sum(1 for r in rows if r.state == "committed"),
                failed=sum(1 for r in rows if r.state in ("rolled_back", "rollback_failed")),
                detail={"error": "patchd stopped during this run", "verified": {}},
            )
    return done
