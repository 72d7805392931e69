"""The per-target state machine: snapshot, apply, verify, commit, or roll back.

Each transition is journaled BEFORE the side effect it announces and after it, and every
transition checks the state it comes from (an illegal move is a bug, not a branch).

    pending -> snapshotting -> snapshotted -> applying -> applied -> verifying -> verified
            -> committing -> committed
    (any state from snapshotting to committing) -> rolling_back -> rolled_back
                                                                \\-> rollback_failed

A target whose first row ("snapshotting") cannot be written is not started. A write that
fails later rolls the target back all the same (its rollback rows are written if they
can be), except once "verified" is written: then the commit goes ahead, since that row
tells a restart to check the target again and commit it. Either way the outcome says
`journal_failed`, and the run starts no new target.

With leadership (`may_act` set: several daemons share a PostgreSQL store), nothing is
done blind: a step starts only while this node leads and after its intent row is written,
and a target whose journal cannot be written, or whose node lost the lease, is left where
its last row says, for the reconciliation of whichever node leads next (never rolled back
or committed without a record). Its outcome is `pending` with `journal_failed`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

from patchd import acting, faults
from patchd.backends.base import (
    Backend,
    LeftOutOfService,
    NotNow,
    NotRunning,
    Retained,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.config.settings import Group
from patchd.engine.controls import Quarantine
from patchd.engine.packages import StoreFirstSeen, assess, held_summary
from patchd.guest.assessment import AssessesPackages
from patchd.state.base import Keep, Store, StoreError, Then
from patchd.states import FAILED_RESULTS, PROVEN, TargetResult, TargetState

T = TypeVar("T")

S = TargetState
R = TargetResult
_WORKING = (S.SNAPSHOTTING, S.SNAPSHOTTED, S.APPLYING, S.APPLIED, S.VERIFYING, S.VERIFIED)
# state -> the states it may be entered from
TRANSITIONS: Mapping[TargetState, frozenset[TargetState]] = {
    S.SNAPSHOTTING: frozenset({S.PENDING}),
    S.SNAPSHOTTED: frozenset({S.SNAPSHOTTING}),
    S.APPLYING: frozenset({S.SNAPSHOTTED}),
    S.APPLIED: frozenset({S.APPLYING}),
    S.VERIFYING: frozenset({S.APPLIED}),
    S.VERIFIED: frozenset({S.VERIFYING}),
    S.COMMITTING: frozenset({S.VERIFIED}),
    S.COMMITTED: frozenset({S.COMMITTING}),
    S.ROLLING_BACK: frozenset({*_WORKING, S.COMMITTING}),
    S.ROLLED_BACK: frozenset({S.ROLLING_BACK}),
    S.ROLLBACK_FAILED: frozenset({S.ROLLING_BACK}),
    S.OUT_OF_SERVICE: frozenset({S.ROLLING_BACK}),
}

__all__ = ["FAILED_RESULTS", "TRANSITIONS"]  # FAILED_RESULTS: kept importable from here


@dataclass(frozen=True)
class TargetOutcome:
    """How one target ended in a run (states.TargetResult says what each result means)."""

    target: Target
    result: TargetResult
    update: Update | None = None
    error: str | None = None
    seconds: float = 0.0
    retained: Retained | None = None
    # A journal write for this target failed: the run starts no new target.
    journal_failed: bool = False
    # The version failed its verification on this target: the group quarantines it
    # (patchd.engine.controls).
    quarantine: bool = False


class Observer(Protocol):
    """What the engine reports: every transition and outcome of a target. Both take the
    Group. patchd.observers fans them out (with the runtime's events) to logs and metrics."""

    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        """A target moved to `state`."""

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        """A target reached its end in this run."""


class NullObserver:
    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        return None

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        return None


class IllegalTransition(RuntimeError):
    pass


Probe = Callable[[Target, Mapping[str, str], Group], None]


def no_probe(target: Target, facts: Mapping[str, str], group: Group) -> None:
    return None


@dataclass
class TargetContext:
    """What one target's patch needs; built by the rollout for each target."""

    run_id: str
    group: Group
    backend: Backend
    store: Store
    clock: Callable[[], datetime]
    observer: Observer
    pins: Mapping[str, str]
    require_pin: bool = False
    probe: Probe = no_probe
    # (ref, version) -> why it is not installed (the group's and earlier stages');
    # the rollout adds to it when a version fails during the run.
    quarantined: dict[tuple[str, str], Quarantine] = field(default_factory=dict)
    sleep: Callable[[float], None] = time.sleep
    retries: int = 3
    backoff: float = 1.0
    stop: threading.Event = field(default_factory=threading.Event)
    # Leadership: whether this node may touch a target now (None: no leadership, SQLite).
    may_act: Callable[[], bool] | None = None


class _Journal:
    def __init__(self, ctx: TargetContext, target: Target) -> None:
        self.ctx = ctx
        self.target = target
        self.state = TargetState.PENDING
        self.recorded = TargetState.PENDING  # the last state the store took
        self.failed = False  # a write to the store failed

    def move(
        self, state: TargetState, step: str, phase: str, then: Then | None = None, **fields: Any
    ) -> None:
        """Journal a step (and `then`, the next step's intent, in the same write)."""
        steps = [(state, step, phase)] + (
            [] if then is None else [(then.state, then.step, then.phase)]
        )
        before = self.state
        for moved, _, _ in steps:
            if before not in TRANSITIONS[moved]:
                raise IllegalTransition(f"{self.target.name}: {before} -> {moved}")
            before = moved
        ctx = self.ctx
        for moved, _, _ in steps:
            faults.hit(f"journal.before.{moved}")
        try:
            ctx.store.record(
                ctx.run_id,
                self.target.id,
                self.target.name,
                state,
                ctx.clock(),
                step=step,
                phase=phase,
                then=then,
                **fields,
            )
        except StoreError:
            self.failed = True
            raise
        self.state = self.recorded = before
        for moved, step_, phase_ in steps:
            faults.hit(f"journal.after.{moved}")
            ctx.observer.step(ctx.run_id, ctx.group, self.target, moved, step=step_, phase=phase_)

    def move_anyway(self, state: TargetState, step: str, phase: str, **fields: Any) -> None:
        """Journal a step whose side effect must happen even if the write fails.

        The target's state on the backend matters more than its record. Used where the
        last row written leads a restart's reconciliation to the same end: before a
        rollback (any earlier row is rolled back again) and before the commit of a
        verified target ("verified" is checked again and committed); both are idempotent.
        """
        try:
            self.move(state, step, phase, **fields)
        except StoreError as err:
            if self.ctx.may_act is not None:
                raise  # leadership: never blind; the next leader reconciles the target
            self.state = state
            ctx = self.ctx
            ctx.observer.step(
                ctx.run_id,
                ctx.group,
                self.target,
                state,
                step=step,
                phase=phase,
                journal_error=str(err),
            )


def _retrying(ctx: TargetContext, call: Callable[[], T]) -> T:
    """Run a backend call, retrying TransientError with backoff; then it is a failure."""
    for attempt in range(ctx.retries + 1):
        try:
            return call()
        except TransientError as err:
            if attempt == ctx.retries:
                raise StepFailed(f"gave up after {ctx.retries + 1} attempts: {err}") from err
            ctx.sleep(ctx.backoff * 2**attempt)
    raise AssertionError("unreachable")


def _act(ctx: TargetContext, step: str) -> None:
    """NotActing unless this node may touch a target now (leadership only)."""
    if ctx.may_act is not None and not ctx.may_act():
        raise acting.NotActing(f"{step} not started: this node no longer holds the leader lease")


def _keep(ctx: TargetContext, retained: Retained | None) -> Keep | None:
    if retained is None:
        return None
    return Keep(ctx.group.backend, retained.description, retained.data, ctx.clock() + retained.keep)


def find_update(ctx: TargetContext, target: Target) -> tuple[Update | None, str | None]:
    """The update available (None: the target is current, or its baseline holds back
    everything pending) and, when it is not to be installed in this run, why (its
    baseline holds it back, its version is quarantined or not yet verified by the earlier
    stage). A held update is still returned: the target has it waiting."""
    found = None
    if isinstance(ctx.backend, AssessesPackages):  # packages: the group's baseline decides
        journal = StoreFirstSeen(ctx.store)
        found = _retrying(
            ctx, lambda: assess(ctx.backend, target, ctx.pins, ctx.group, journal, ctx.clock())
        )
    if found is not None:
        if found.update is None:
            return None, held_summary(found, ctx.group) if found.decision.held else None
        update: Update | None = found.update
    else:  # not patched package by package: the backend's own check
        update = _retrying(ctx, lambda: ctx.backend.check_update(target, ctx.pins, ctx.group.patch))
    if update is None:
        return None, None
    held = ctx.quarantined.get((update.ref, update.available))
    if held is not None:
        return update, held.describe()
    if ctx.require_pin and ctx.pins.get(update.ref) != update.available:
        return update, f"{update.ref} has no version verified by stage {ctx.group.after!r}"
    return update, None


def peek_update(ctx: TargetContext, target: Target) -> Update | None:
    """The update waiting for a target the run leaves alone (pending, or skipped for a
    failed dependency), for the dashboards: one read, no retries; None when unknown."""
    try:
        if isinstance(ctx.backend, AssessesPackages):  # what its baseline lets in, as a run
            seen = StoreFirstSeen(ctx.store, record=False)  # a peek journals nothing
            found = assess(ctx.backend, target, ctx.pins, ctx.group, seen, ctx.clock())
            if found is not None:
                return found.update
        return ctx.backend.check_update(target, ctx.pins, ctx.group.patch)
    except Exception:
        return None  # unknown: the metric keeps what it last knew


def patch_target(ctx: TargetContext, target: Target) -> TargetOutcome:
    """Drive one target to committed, rolled_back or rollback_failed. Never raises."""
    with acting.guard(ctx.may_act):  # each backend call asks too (patchd.acting)
        return _patch_target(ctx, target)


def _patch_target(ctx: TargetContext, target: Target) -> TargetOutcome:
    started = ctx.clock()
    journal = _Journal(ctx, target)

    def done(result: TargetResult, **kw: Any) -> TargetOutcome:
        seconds = (ctx.clock() - started).total_seconds()
        return TargetOutcome(target, result, seconds=seconds, journal_failed=journal.failed, **kw)

    try:
        update, reason = find_update(ctx, target)
    except NotNow as err:  # not started, through no fault of its own: a later run
        return done(R.PENDING, error=str(err))
    except NotRunning as err:  # stopped by a person: not a failure of the patch
        return done(R.SKIPPED, error=f"skipped (not running): {err}")
    except Exception as err:  # fail closed: a target we cannot read is not patched
        if ctx.may_act is not None and not ctx.may_act():
            return done(R.PENDING, error=f"not started: {err}")
        return done(R.FAILED, error=f"checking for an update: {err}")
    if update is None:  # current, or all its baseline holds back (the reason says)
        return done(R.SKIPPED if reason else R.CURRENT, error=reason)
    if reason is not None:
        return done(R.SKIPPED, update=update, error=reason)

    backend = ctx.backend
    try:
        snapshot: Snapshot = backend.plan_snapshot(target, ctx.run_id)
    except Exception as err:  # nothing was changed yet
        return done(R.FAILED, update=update, error=f"planning the snapshot: {err}")
    try:
        journal.move(
            S.SNAPSHOTTING,
            "snapshot",
            "intent",
            version_from=update.current,
            version_to=update.available,
            snapshot=snapshot.data,
        )
    except StoreError as err:  # no record, no side effect: the target is not started
        return done(R.FAILED, update=update, error=f"not started, the journal failed: {err}")
    committed = False
    try:
        _act(ctx, "snapshot")
        snapshot = _retrying(ctx, lambda: backend.snapshot(target, snapshot, ctx.group.snapshot))
        faults.hit("engine.after_snapshot")
        # Each step's end goes with the next step's intent: nothing is done between them.
        applying = Then(S.APPLYING, "apply")
        journal.move(S.SNAPSHOTTED, "snapshot", "done", applying, snapshot=snapshot.data)
        _act(ctx, "apply")
        _retrying(ctx, lambda: backend.apply(target, update, snapshot, ctx.group.patch))
        faults.hit("engine.after_apply")
        journal.move(S.APPLIED, "apply", "done", Then(S.VERIFYING, "verify"))
        _act(ctx, "verify")
        _retrying(ctx, lambda: backend.verify(target, update, ctx.group.health))
        faults.hit("engine.during_verify")
        ctx.probe(target, backend.describe(target), ctx.group)
        journal.move(S.VERIFIED, "verify", "done")
        # Rolling back without this row would leave "verified" on record for a target on
        # its old version, which a restart would then commit.
        journal.move_anyway(S.COMMITTING, "commit", "intent")
        _act(ctx, "commit")
        retained = _retrying(ctx, lambda: backend.commit(target, snapshot, ctx.group.snapshot))
        faults.hit("engine.after_commit")
        committed = True
        journal.move(S.COMMITTED, "commit", "done", keep=_keep(ctx, retained))
        return done(R.SUCCESS, update=update, retained=retained)
    except IllegalTransition:
        raise
    except Exception as err:
        if committed and isinstance(err, StoreError):
            # The commit is done and cannot be undone (the old container or snapshot is
            # gone). The journal still says committing: a restart's reconciliation checks
            # the target again and finishes the commit, which is idempotent.
            return done(R.SUCCESS, update=update, retained=retained, error=f"journal: {err}")
        if ctx.may_act is not None and (isinstance(err, StoreError) or not ctx.may_act()):
            return _left(done, update, journal, err)
        failure = f"{journal.state}: {err}"
        # Failing its verification (health checks, the alert gate after the patch) is the
        # version's fault; a failed snapshot, apply or commit, or a backend that stayed
        # unreachable while verifying (transient errors to the last retry), may be the
        # target's or the infrastructure's, and quarantines nothing.
        bad_version = journal.state == S.VERIFYING and not isinstance(err.__cause__, TransientError)
    try:
        if journal.recorded in PROVEN:
            # The record says the new version passed: a restart commits it. Rolling back
            # without "rolling_back" on record would have it commit the old version.
            try:
                journal.move(S.ROLLING_BACK, "rollback", "intent", error=failure)
            except StoreError as err:
                if ctx.may_act is not None:
                    raise  # leadership: the next leader reconciles it (see _left)
                failure = (
                    f"{failure}; not rolled back: the journal cannot record it ({err}) and"
                    f" says {journal.recorded}, so the target keeps its verified new version"
                    " and its snapshot for the next start to check and commit"
                )
                return done(R.FAILED, update=update, error=failure)
        else:
            journal.move_anyway(S.ROLLING_BACK, "rollback", "intent", error=failure)
        _act(ctx, "rollback")
    except (StoreError, acting.NotActing) as err:  # leadership only: see _left
        return _left(done, update, journal, err)
    try:
        _retrying(ctx, lambda: backend.rollback(target, snapshot))
        faults.hit("engine.after_rollback")
    except LeftOutOfService as err:
        failure = f"{failure}; {err}"
        journal.move_anyway(S.OUT_OF_SERVICE, "rollback", "done", error=failure)
        return done(R.OUT_OF_SERVICE, update=update, error=failure)
    except Exception as err:
        failure = f"{failure}; rollback: {err}"
        journal.move_anyway(S.ROLLBACK_FAILED, "rollback", "failed", error=failure)
        return done(R.ROLLBACK_FAILED, update=update, error=failure, quarantine=bad_version)
    journal.move_anyway(S.ROLLED_BACK, "rollback", "done")
    return done(R.ROLLED_BACK, update=update, error=failure, quarantine=bad_version)


def _left(
    done: Callable[..., TargetOutcome], update: Update, journal: _Journal, err: BaseException
) -> TargetOutcome:
    """Leadership: the target is left as its last journal row says (the row the next
    leader's reconciliation reads), neither rolled back nor committed blind."""
    journal.failed = True
    return done(
        R.PENDING, update=update, error=f"left in {journal.state} for reconciliation: {err}"
    )
