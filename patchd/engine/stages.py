"""Staged promotion: when a later stage may run, and which versions it must install."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from patchd.config.settings import Group
from patchd.state.base import Store
from patchd.states import ENDED, RunStatus


@dataclass(frozen=True)
class StageGate:
    """Whether a group's `after` stage allows it to run now, and why (never a bare bool)."""

    open: bool
    reason: str
    pins: dict[str, str]


def stage_gate(group: Group, store: Store, now: datetime) -> StageGate:
    """A group with `after` runs only when that group's last run completed with no
    failures at least `soak` ago. It is pinned to what the earlier stage verified: for each
    ref, the version of the most recent run of that stage that committed it."""
    if group.after is None:
        return StageGate(True, "no earlier stage", {})
    runs = store.runs(group.after, limit=1000)
    if not runs:
        return StageGate(False, f"stage {group.after!r} has not run yet", {})
    last = runs[0]
    if last.status != RunStatus.COMPLETED or last.failed or last.finished is None:
        return StageGate(
            False,
            f"stage {group.after!r} last run {last.id} ended {last.status} "
            f"with {last.failed} failed",
            {},
        )
    ready_at = last.finished + group.soak
    if now < ready_at:
        return StageGate(
            False, f"stage {group.after!r} is soaking until {ready_at.isoformat()}", {}
        )
    pins: dict[str, str] = {}
    for run in reversed(runs):  # oldest first, so the newest verification wins
        if run.status in ENDED:
            pins.update(run.detail.get("verified", {}))
    return StageGate(True, f"stage {group.after!r} passed at {last.finished.isoformat()}", pins)
