"""The names of states, as types: a target's journaled state, a target's result in a
run, and a run's status.

A leaf module (it imports nothing of patchd) so that the engine, the store, reconcile,
faults, metrics and reports all share one spelling. The enums are StrEnums: a member is
the string it stands for (`TargetState.COMMITTED == "committed"`), so journals, JSON
documents and metric labels written before the enums existed read the same.
"""

from __future__ import annotations

from enum import StrEnum


class TargetState(StrEnum):
    """Where a target is in the per-target state machine (engine/target.py); the value
    the journal records for it. Declared in the machine's order."""

    PENDING = "pending"  # not started (the engine's starting point; never journaled)
    SNAPSHOTTING = "snapshotting"
    SNAPSHOTTED = "snapshotted"
    APPLYING = "applying"
    APPLIED = "applied"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    # Nothing to roll back to (an ESXi host): safely out of service for a person to fix.
    OUT_OF_SERVICE = "out_of_service"
    # Not written by today's engine; a journal row in it is treated as resting, as the
    # first store did.
    SKIPPED = "skipped"


# The states the engine journals (each has a journal.before/after fault point).
JOURNALED: tuple[TargetState, ...] = tuple(
    s for s in TargetState if s not in (TargetState.PENDING, TargetState.SKIPPED)
)

# States a target may rest in when no patchd is working on it; any other state found in
# the journal means a patchd stopped while working on the target.
RESTING = frozenset(
    {
        TargetState.COMMITTED,
        TargetState.ROLLED_BACK,
        TargetState.ROLLBACK_FAILED,
        TargetState.OUT_OF_SERVICE,
        TargetState.SKIPPED,
        TargetState.PENDING,
    }
)

# Journaled states after which the target's new version had passed its checks: a
# restart checks it again and commits rather than rolls back.
PROVEN = frozenset({TargetState.VERIFIED, TargetState.COMMITTING})


class TargetResult(StrEnum):
    """How one target ended in a run (engine.TargetOutcome.result)."""

    SUCCESS = "success"  # patched, verified and committed
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"  # needs a person
    OUT_OF_SERVICE = "out_of_service"  # failed, taken out of service (not rolled back)
    # Nothing was changed (its update could not be read or started), or a failed commit
    # whose rollback the journal could not record: left verified for a restart to commit.
    FAILED = "failed"
    CURRENT = "current"  # no update
    SKIPPED = "skipped"  # not to be patched in this run
    PENDING = "pending"  # left for the next window


# Results that spend the error budget.
FAILED_RESULTS = frozenset(
    {
        TargetResult.ROLLED_BACK,
        TargetResult.ROLLBACK_FAILED,
        TargetResult.OUT_OF_SERVICE,
        TargetResult.FAILED,
    }
)


class RunStatus(StrEnum):
    """A run's status in the journal (and engine.RunResult.status)."""

    RUNNING = "running"  # started, not finished (or its patchd died: see INTERRUPTED)
    COMPLETED = "completed"
    HALTED = "halted"  # the error budget was spent
    WINDOW_CLOSED = "window_closed"  # the window, its cutoff or a freeze stopped starts
    STOPPED = "stopped"  # patchd was stopping
    FAILED = "failed"  # the journal or discovery failed
    INTERRUPTED = "interrupted"  # closed by a restart's reconciliation


# Statuses of runs that ended on their own terms: what they verified may pin a later
# stage (engine/stages.py).
ENDED = frozenset(
    {RunStatus.COMPLETED, RunStatus.HALTED, RunStatus.WINDOW_CLOSED, RunStatus.STOPPED}
)
