"""One run: a group's targets patched with bounded concurrency and an error budget.

At most `max_concurrency` targets are worked on at once (per partition, such as an ESXi
cluster); a new one starts as soon as one finishes, in dependency order. No target starts
once failures reach `max_errors`, once `may_start` says the window (cutoff, freezes) no
longer allows it, or once `stop` is set; targets that never started are reported pending.

The alert gate (`gate`, optional) is asked each time targets are about to start; the
targets started in one pass share its answer. While it is shut nothing new starts, but
the run does not end: targets already in flight finish, and the gate is asked again
every `gate_recheck` seconds until it opens (the run goes on), the window stops allowing
starts, the error budget is spent or `stop` is set. Targets still not started then are
pending, and their reason names the gate's last answer.

A version that fails once installed on a target (patch_target says so) is quarantined
for the group here, as it fails: no later target of the run, nor a later run of the
group or of a later stage, installs it (patchd.engine.controls; targets offered it are
skipped with the quarantine's reason).

The journal comes first: a run whose row cannot be written starts nothing (status
`failed`), and once a target's journal write fails no new target starts (status `failed`,
the rest pending) while those in flight finish or roll back. A run whose final row
cannot be written is still reported, with that error.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime

from patchd.backends.base import Backend, PreparesRun, Target, Update
from patchd.config.settings import Group
from patchd.engine.controls import Quarantine, quarantine, quarantined, supersede
from patchd.engine.target import (
    Observer,
    Probe,
    TargetContext,
    TargetOutcome,
    no_probe,
    patch_target,
    peek_update,
)
from patchd.state.base import Store, StoreError
from patchd.states import FAILED_RESULTS, RunStatus, TargetResult


@dataclass(frozen=True)
class GateResult:
    """One answer of the alert gate.

    reason: ok | alerts_firing | unreachable | bad_response | query_error.
    """

    open: bool
    reason: str = "ok"
    detail: str = ""

    def describe(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class RunResult:
    """How a run ended (states.RunStatus, never `running` or `interrupted` here)."""

    run_id: str
    group: str
    status: RunStatus
    outcomes: tuple[TargetOutcome, ...]
    error: str | None = None

    def count(self, *results: TargetResult) -> int:
        return sum(1 for o in self.outcomes if o.result in results)

    @property
    def failed(self) -> int:
        return self.count(*FAILED_RESULTS)

    @property
    def verified(self) -> dict[str, str]:
        """ref -> version for every target this run patched and committed."""
        return {
            o.update.ref: o.update.available
            for o in self.outcomes
            if o.result == TargetResult.SUCCESS and o.update is not None
        }


@dataclass
class RunRequest:
    run_id: str
    group: Group
    backend: Backend
    store: Store
    clock: Callable[[], datetime]
    may_start: Callable[[datetime], bool]
    observer: Observer
    window: str | None = None
    pins: Mapping[str, str] = field(default_factory=dict)
    probe: Probe = no_probe
    sleep: Callable[[float], None] | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    on_progress: Callable[[TargetOutcome, int, int], None] | None = None
    # The alert gate: asked before targets start; a shut gate holds new starts.
    gate: Callable[[], GateResult] | None = None
    gate_recheck: float = 15.0
    # How to pause while the gate is shut and nothing is in flight (default: wait on
    # `stop` for `gate_recheck` seconds, so a stop ends the pause at once).
    pause: Callable[[float], None] | None = None
    # Leadership (a shared PostgreSQL store): whether this node may touch targets now;
    # once it may not, no target starts and in-flight ones go only as far as they can
    # be journaled (engine/target.py). None: no leadership.
    may_act: Callable[[], bool] | None = None


def dependency_order(targets: Sequence[Target]) -> list[Target]:
    """Targets with each one after those it depends on (inside this run); stable."""
    names = {t.name for t in targets}
    placed: set[str] = set()
    ordered: list[Target] = []
    remaining = list(targets)
    while remaining:
        progress = False
        for target in list(remaining):
            if all(d in placed or d not in names for d in target.depends_on):
                ordered.append(target)
                placed.add(target.name)
                remaining.remove(target)
                progress = True
        if not progress:  # a cycle: keep the rest in discovery order, deps unmet
            ordered.extend(remaining)
            break
    return ordered


def partition_limits(group: Group, targets: Iterable[Target]) -> dict[str | None, int]:
    sizes: dict[str | None, int] = {}
    for target in targets:
        sizes[target.partition] = sizes.get(target.partition, 0) + 1
    return {part: group.max_concurrency.resolve(size) for part, size in sizes.items()}


def run_group(request: RunRequest) -> RunResult:
    """Patch the group's targets; never raises for a target's failure."""
    req = request
    group = req.group
    started = req.clock()
    try:
        req.store.start_run(req.run_id, group.name, req.window, started)
    except StoreError as err:
        error = f"no target was started, the journal cannot be written: {err}"
        return RunResult(req.run_id, group.name, RunStatus.FAILED, (), error)
    try:
        targets = dependency_order(req.backend.discover(group.select))
    except Exception as err:
        return _finish(req, RunStatus.FAILED, [], error=f"discovering targets: {err}")
    try:  # versions not to install: the group's and its earlier stage's quarantine
        not_again = quarantined(req.store, [group.name, group.after])
    except StoreError as err:
        return _finish(req, RunStatus.FAILED, [], error=f"reading quarantined versions: {err}")
    if isinstance(req.backend, PreparesRun) and targets:
        # Batch work for the whole run (the Docker backend asks the registry about every
        # image at once and starts the pulls). Only an optimisation: each target still
        # checks itself and reports its own failure, so an error here is not the run's.
        with contextlib.suppress(Exception):
            req.backend.prepare(targets, req.pins)

    ctx = TargetContext(
        run_id=req.run_id,
        group=group,
        backend=req.backend,
        store=req.store,
        clock=req.clock,
        observer=req.observer,
        pins=req.pins,
        require_pin=group.after is not None,
        probe=req.probe,
        quarantined=not_again,
        stop=req.stop,
        may_act=req.may_act,
    )
    if req.sleep is not None:
        ctx.sleep = req.sleep
    limits = partition_limits(group, targets)
    max_errors = group.max_errors.resolve(len(targets))
    names_in_run = {t.name for t in targets}
    pending = list(targets)
    results: dict[str, TargetOutcome] = {}
    running: dict[Future[TargetOutcome], Target] = {}
    busy: dict[str | None, int] = dict.fromkeys(limits, 0)
    failures = 0
    # (ref, version) pairs whose success already superseded the older quarantines: the
    # next target passing the same version has nothing to supersede (a read per target
    # would be a database round trip in this loop, on every target's path).
    superseded: set[tuple[str, str]] = set()
    status = RunStatus.COMPLETED
    journal_error: str | None = None
    stopped = "patchd is stopping"

    def record(outcome: TargetOutcome) -> None:
        results[outcome.target.name] = outcome
        req.observer.outcome(req.run_id, group, outcome)
        if req.on_progress is not None:
            req.on_progress(outcome, len(results), len(targets))

    def pause(seconds: float) -> None:
        if req.pause is not None:
            req.pause(seconds)
        else:
            req.stop.wait(seconds)

    shut: GateResult | None = None  # the gate's last answer while it holds starts
    # Finished targets arrive here (a done callback), so waiting for the next one costs
    # the same with 50 running as with 1 (concurrent.futures.wait locks every future).
    done: queue.SimpleQueue[Future[TargetOutcome]] = queue.SimpleQueue()
    with ThreadPoolExecutor(max_workers=max(1, sum(limits.values()))) as pool:
        while True:
            if status == RunStatus.COMPLETED:
                if req.may_act is not None and not req.may_act():
                    # Before the journal's failure: a lost lease is why writes fail.
                    status = RunStatus.STOPPED
                    stopped = "this node no longer holds the leader lease"
                elif journal_error is not None:
                    status = RunStatus.FAILED
                elif req.stop.is_set():
                    status = RunStatus.STOPPED
                elif failures >= max_errors:
                    status = RunStatus.HALTED
                elif pending and not req.may_start(req.clock()):
                    status = RunStatus.WINDOW_CLOSED
            held = False
            if status == RunStatus.COMPLETED:
                ready: list[Target] = []
                slots = dict(busy)
                for target in list(pending):
                    if slots[target.partition] >= limits[target.partition]:
                        continue
                    deps = [d for d in target.depends_on if d in names_in_run]
                    broken = [
                        d
                        for d in deps
                        if d in results
                        and results[d].result != TargetResult.SUCCESS
                        and results[d].result != TargetResult.CURRENT
                    ]
                    if broken:
                        pending.remove(target)
                        record(
                            TargetOutcome(
                                target,
                                TargetResult.SKIPPED,
                                update=peek_update(ctx, target),
                                error=f"depends on {', '.join(broken)}, which failed",
                            )
                        )
                        continue
                    if any(d not in results for d in deps):
                        continue
                    slots[target.partition] += 1
                    ready.append(target)
                    if all(slots[part] >= limits[part] for part in limits):
                        break  # every partition is full: the rest would all be passed over
                if ready and req.gate is not None:
                    answer = req.gate()
                    shut = None if answer.open else answer
                    held = not answer.open
                if not held:
                    for target in ready:
                        pending.remove(target)
                        busy[target.partition] += 1
                        future = pool.submit(patch_target, ctx, target)
                        running[future] = target
                        future.add_done_callback(done.put)
            if not running:
                if held:
                    pause(req.gate_recheck)
                    continue
                break
            for future in _finished(done, req.gate_recheck if held else None):
                target = running.pop(future)
                busy[target.partition] -= 1
                outcome = future.result()
                if outcome.result in FAILED_RESULTS:
                    failures += 1
                if outcome.journal_failed and journal_error is None:
                    journal_error = f"the journal cannot be written (see {target.name})"
                if outcome.quarantine and outcome.update is not None:
                    bad = _quarantine(req, outcome)
                    ctx.quarantined[(bad.ref, bad.version)] = bad
                    superseded = {key for key in superseded if key[0] != bad.ref}
                elif outcome.result == TargetResult.SUCCESS and outcome.update is not None:
                    passed = (outcome.update.ref, outcome.update.available)
                    if passed not in superseded and _supersede(req, outcome.update):
                        superseded.add(passed)
                record(outcome)
    reason = {
        RunStatus.HALTED: f"error budget spent: {failures} failed (max_errors {max_errors})",
        RunStatus.WINDOW_CLOSED: "the window closed (or its cutoff or a freeze began)",
        RunStatus.STOPPED: stopped,
        RunStatus.FAILED: f"{journal_error}; no new target was started",
        RunStatus.COMPLETED: "dependency cycle",
    }[status]
    if shut is not None and status != RunStatus.COMPLETED:
        reason += f"; the alert gate was shut ({shut.describe()})"
    for target in pending:
        # Whether a target left for later has an update waiting is read once (no retries)
        # for patchd_target_update_available; not while patchd is stopping.
        update = None if status == RunStatus.STOPPED else peek_update(ctx, target)
        record(TargetOutcome(target, TargetResult.PENDING, update=update, error=reason))
    return _finish(req, status, [results[t.name] for t in targets], error=journal_error)


def _finished(
    done: queue.SimpleQueue[Future[TargetOutcome]], timeout: float | None
) -> list[Future[TargetOutcome]]:
    """The targets that finished: waits for the first (up to `timeout`; none then),
    takes every other one already there."""
    try:
        found = [done.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            found.append(done.get_nowait())
        except queue.Empty:
            return found


def _quarantine(req: RunRequest, outcome: TargetOutcome) -> Quarantine:
    """Quarantine the version that failed on this target for the whole group, from now
    on: no later target of this run, nor any later run, installs it."""
    assert outcome.update is not None
    reason = (outcome.error or "failed").split("; rollback:")[0]
    held = Quarantine(
        req.group.name,
        outcome.update.ref,
        outcome.update.available,
        req.clock(),
        outcome.target.name,
        reason,
    )
    # A journal that cannot be written: held for the rest of this run all the same (the
    # target's rows, if any, tell the rest; the run stops starting targets anyway).
    with suppress(StoreError):
        quarantine(req.store, held)
    return held


def _supersede(req: RunRequest, update: Update) -> bool:
    """A version passed: older quarantined versions of its ref are superseded (the
    journal can say so later if it cannot now: the next success writes it again).
    False when the store could not be read or written."""
    try:
        supersede(req.store, req.group.name, update.ref, update.available)
    except StoreError:
        return False
    return True


def _finish(
    req: RunRequest, status: RunStatus, outcomes: list[TargetOutcome], error: str | None = None
) -> RunResult:
    result = RunResult(req.run_id, req.group.name, status, tuple(outcomes), error)
    try:
        req.store.finish_run(
            req.run_id,
            status,
            req.clock(),
            total=len(outcomes),
            succeeded=result.count(TargetResult.SUCCESS),
            failed=result.failed,
            detail={
                "verified": result.verified,
                "error": error,
                "pending": [o.target.name for o in outcomes if o.result == TargetResult.PENDING],
            },
        )
    except StoreError as err:
        # What was done to the targets is done; the run row stays "running" until a
        # restart's reconciliation closes it as interrupted.
        note = f"the run's end was not journaled: {err}"
        return replace(result, error=f"{error}; {note}" if error else note)
    return result
