"""Staged promotion: when a later stage may run, and which versions it must install.

A group with `approval = "manual"` also waits for an operator's approval, which pins
exactly the versions its earlier stage had verified when it was given; once the earlier
stage verifies something else, the group waits for a new approval."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from patchd.config.settings import Group
from patchd.engine.controls import approval_of
from patchd.state.base import RunRow, Store
from patchd.states import ENDED, RunStatus


@dataclass(frozen=True)
class StageGate:
    """Whether a group's `after` stage allows it to run now, and why (never a bare bool)."""

    open: bool
    reason: str
    pins: dict[str, str]
    # When a shut gate opens by time alone (the end of the soak); None if it does not.
    opens_at: datetime | None = None


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
            False, f"stage {group.after!r} is soaking until {ready_at.isoformat()}", {}, ready_at
        )
    pins = verified_pins(store, group.after, runs)
    passed = f"stage {group.after!r} passed at {last.finished.isoformat()}"
    if group.approval != "manual":
        return StageGate(True, passed, pins)
    approval = approval_of(store, group.name)
    if approval is None or dict(approval.pins) != pins:
        again = "" if approval is None else " (the versions it approved are not the newest)"
        return StageGate(
            False, f"awaiting approval{again}: {passed}; run `patchd approve {group.name}`", {}
        )
    return StageGate(True, f"{passed}; {approval.describe()}", dict(approval.pins))


def approvable(group: Group, store: Store, now: datetime) -> tuple[dict[str, str] | None, str]:
    """What `patchd approve` would pin now: the versions the earlier stage verified, once
    its last run passed (its soak may still be running); else None and why not."""
    if group.after is None or group.approval != "manual":
        return None, f'group {group.name!r} has no approval = "manual" (nothing to approve)'
    gate = stage_gate(replace(group, approval="auto"), store, now)
    if not gate.open and gate.opens_at is None:
        return None, gate.reason
    return verified_pins(store, group.after), gate.reason


def verified_pins(store: Store, stage: str, runs: list[RunRow] | None = None) -> dict[str, str]:
    """ref -> the version of the most recent run of `stage` that committed it."""
    pins: dict[str, str] = {}
    for run in reversed(store.runs(stage, limit=1000) if runs is None else runs):
        if run.status in ENDED:  # oldest first, so the newest verification wins
            pins.update(run.detail.get("verified", {}))
    return pins
