"""The rollout engine with FakeBackend: batches, error budget, window gate, stages, journal."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.backends.base import RollbackFailed, StepFailed, TransientError
from patchd.config.schema import HealthModel, SnapshotModel
from patchd.config.settings import Group
from patchd.config.types import Limit
from patchd.engine import GateResult, NullObserver, RunRequest, RunResult, run_group, stage_gate
from patchd.state import Store, open_store
from patchd.testing import FakeBackend, FakeSelect

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


class Clock:
    """A clock that moves one second each time it is read."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=1)
            return self.now


def group(name: str = "web", **changes: Any) -> Group:
    fields: dict[str, Any] = {
        "name": name,
        "backend": "fake",
        "window": "w",
        "select": FakeSelect(),
        "after": None,
        "soak": timedelta(0),
        "max_concurrency": Limit(count=1),
        "max_errors": Limit(count=1),
        "snapshot": SnapshotModel(),
        "health": HealthModel(),
    }
    fields.update(changes)
    return Group(**fields)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "state.db")


def fleet(count: int, **fields: Any) -> FakeBackend:
    backend = FakeBackend()
    for i in range(count):
        backend.add(f"c{i:02d}", **fields)
    backend.publish("app", "v2")
    return backend


_ids = itertools.count()


def run(
    backend: FakeBackend,
    store: Store,
    grp: Group | None = None,
    *,
    may_start: Callable[[datetime], bool] = lambda now: True,
    clock: Clock | None = None,
    **kw: Any,
) -> RunResult:
    return run_group(
        RunRequest(
            run_id=f"r{next(_ids)}",
            group=grp or group(),
            backend=backend,
            store=store,
            clock=clock or Clock(),
            may_start=may_start,
            observer=NullObserver(),
            **kw,
        )
    )


def test_every_target_is_patched_and_journaled_before_and_after(store: Store) -> None:
    backend = fleet(4)
    result = run(backend, store, group(max_concurrency=Limit(count=2)))
    assert result.status == "completed"
    assert [o.result for o in result.outcomes] == ["success"] * 4
    assert {t.version for t in backend.targets.values()} == {"v2"}
    assert all(not t.snapshots for t in backend.targets.values())  # removed at commit
    assert [(s, p) for s, p, _ in store.journal(result.run_id, "c00")] == [
        ("snapshot", "intent"),
        ("snapshot", "done"),
        ("apply", "intent"),
        ("apply", "done"),
        ("verify", "intent"),
        ("verify", "done"),
        ("commit", "intent"),
        ("commit", "done"),
    ]
    last = store.last_run("web")
    assert last is not None
    assert (last.status, last.total, last.succeeded, last.failed) == ("completed", 4, 4, 0)
    assert last.detail["verified"] == {"app": "v2"}
    assert store.unfinished_targets() == []


def test_current_targets_are_left_alone(store: Store) -> None:
    backend = fleet(2)
    backend.targets["c01"].version = "v2"
    result = run(backend, store)
    assert [o.result for o in result.outcomes] == ["success", "current"]
    assert ("snapshot", "c01") not in backend.calls


def test_unhealthy_update_is_rolled_back(store: Store) -> None:
    backend = fleet(1)
    backend.unhealthy.add("v2")
    result = run(backend, store)
    [outcome] = result.outcomes
    assert outcome.result == "rolled_back"
    assert "unhealthy on v2" in (outcome.error or "")
    assert backend.targets["c00"].version == "v1"
    assert backend.targets["c00"].snapshots == {}
    assert [row.state for row in store.targets(result.run_id)] == ["rolled_back"]
    assert result.status == "halted"


def test_error_budget_halts_the_run(store: Store) -> None:
    backend = fleet(5)
    backend.unhealthy.add("v2")
    result = run(backend, store, group(max_errors=Limit(count=1)))
    assert result.status == "halted"
    assert [o.result for o in result.outcomes] == ["rolled_back"] + ["pending"] * 4
    assert {t.version for t in backend.targets.values()} == {"v1"}
    assert all("error budget spent" in (o.error or "") for o in result.outcomes[1:])
    assert [c for c in backend.calls if c[0] == "apply"] == [("apply", "c00")]


def test_failures_below_the_budget_let_the_run_go_on(store: Store) -> None:
    backend = fleet(4)
    backend.failures[("c01", "apply")] = StepFailed("disk full")
    result = run(backend, store, group(max_errors=Limit(count=2)))
    assert result.status == "completed"
    assert [o.result for o in result.outcomes] == ["success", "rolled_back", "success", "success"]
    assert result.failed == 1


def test_stopped_targets_are_skipped_and_spend_no_error_budget(store: Store) -> None:
    backend = fleet(4)
    backend.targets["c01"].running = False
    backend.targets["c02"].running = False
    result = run(backend, store, group(max_errors=Limit(count=1)))
    assert result.status == "completed"
    assert [o.result for o in result.outcomes] == ["success", "skipped", "skipped", "success"]
    assert result.failed == 0
    assert "skipped (not running): c01 is stopped" in (result.outcomes[1].error or "")
    touched = {name for step, name in backend.calls if step in ("snapshot", "apply")}
    assert touched == {"c00", "c03"}  # and the stopped ones stay stopped, on v1
    assert [(t.version, t.running) for t in backend.targets.values()][1:3] == [("v1", False)] * 2


def test_concurrency_is_reached_and_never_exceeded(store: Store) -> None:
    backend = fleet(9)
    barrier = threading.Barrier(3, timeout=120)
    backend.step_time = 1
    backend.sleep = lambda seconds: barrier.wait() and None  # only passes 3 at a time
    result = run(backend, store, group(max_concurrency=Limit(percent=34)))
    assert [o.result for o in result.outcomes] == ["success"] * 9
    assert backend.max_in_flight == 3


def test_partitions_have_their_own_budget(store: Store) -> None:
    backend = FakeBackend()
    for i in range(6):
        backend.add(f"h{i}", partition=f"cluster-{i % 2}")
    backend.publish("app", "v2")
    barrier = threading.Barrier(2, timeout=120)
    backend.step_time = 1
    backend.sleep = lambda seconds: barrier.wait() and None
    result = run(backend, store, group(max_concurrency=Limit(count=1), max_errors=Limit(count=1)))
    assert [o.result for o in result.outcomes] == ["success"] * 6
    assert backend.max_in_flight_by_partition == {"cluster-0": 1, "cluster-1": 1}
    assert backend.max_in_flight == 2


def test_no_target_starts_after_the_window_gate_closes(store: Store) -> None:
    backend = fleet(4)
    clock = Clock()
    deadline = T0 + timedelta(seconds=20)
    result = run(backend, store, may_start=lambda now: now < deadline, clock=clock)
    assert result.status == "window_closed"
    results = [o.result for o in result.outcomes]
    assert "success" in results and results[-1] == "pending"
    started = [name for step, name in backend.calls if step == "snapshot"]
    assert len(started) == results.count("success")
    run_row = store.last_run("web")
    assert run_row is not None and run_row.detail["pending"]


def test_stop_event_leaves_the_rest_pending(store: Store) -> None:
    backend = fleet(3)
    stop = threading.Event()
    original = backend.commit

    def commit_then_stop(*args: Any) -> Any:
        stop.set()
        return original(*args)

    backend.commit = commit_then_stop  # type: ignore[method-assign]
    result = run(backend, store, stop=stop)
    assert result.status == "stopped"
    assert [o.result for o in result.outcomes] == ["success", "pending", "pending"]


def test_dependencies_go_first_and_a_failed_one_skips_its_dependents(store: Store) -> None:
    backend = FakeBackend()
    backend.add("app", depends_on=("db",))
    backend.add("db")
    backend.add("worker", depends_on=("app",))
    backend.publish("app", "v2")
    result = run(backend, store)
    assert [o.target.name for o in result.outcomes] == ["db", "app", "worker"]
    assert [name for step, name in backend.calls if step == "apply"] == ["db", "app", "worker"]

    backend = FakeBackend()
    backend.add("app", depends_on=("db",))
    backend.add("db")
    backend.add("cache")
    backend.publish("app", "v2")
    backend.failures[("db", "verify")] = StepFailed("db down")
    result = run(backend, store, group(max_errors=Limit(count=5)))
    by_name = {o.target.name: o for o in result.outcomes}
    assert by_name["db"].result == "rolled_back"
    assert by_name["app"].result == "skipped"
    assert "depends on db" in (by_name["app"].error or "")
    assert by_name["cache"].result == "success"


def test_transient_errors_are_retried(store: Store) -> None:
    backend = fleet(1)
    attempts: list[float] = []
    calls = {"n": 0}
    original = backend.apply

    def flaky(*args: Any) -> None:
        calls["n"] += 1
        if calls["n"] < 3:
            raise TransientError("connection reset")
        original(*args)

    backend.apply = flaky  # type: ignore[method-assign]
    result = run(backend, store, sleep=attempts.append)
    assert [o.result for o in result.outcomes] == ["success"]
    assert attempts == [1.0, 2.0]


def test_transient_errors_that_never_clear_roll_back(store: Store) -> None:
    backend = fleet(1)
    backend.failures[("c00", "verify")] = TransientError("timeout")
    result = run(backend, store, sleep=lambda s: None)
    [outcome] = result.outcomes
    assert outcome.result == "rolled_back"
    assert "gave up after 4 attempts" in (outcome.error or "")


def test_failed_rollback_is_reported_and_nothing_is_deleted(store: Store) -> None:
    backend = fleet(1)
    backend.unhealthy.add("v2")
    backend.failures[("c00", "rollback")] = RollbackFailed("old container is gone")
    result = run(backend, store)
    [outcome] = result.outcomes
    assert outcome.result == "rollback_failed"
    assert "old container is gone" in (outcome.error or "")
    assert backend.targets["c00"].snapshots  # the snapshot is kept for a person
    assert [row.state for row in store.targets(result.run_id)] == ["rollback_failed"]


def test_a_target_that_cannot_be_read_fails_closed(store: Store) -> None:
    backend = fleet(1)
    backend.failures[("c00", "check_update")] = StepFailed("registry says 500")
    result = run(backend, store)
    assert [o.result for o in result.outcomes] == ["failed"]
    assert store.targets(result.run_id) == []  # nothing was changed, nothing journaled


def test_discovery_failure_fails_the_run(store: Store) -> None:
    backend = fleet(1)
    backend.up = False
    result = run(backend, store)
    assert result.status == "failed"
    assert "discovering targets" in (result.error or "")


def test_keep_returns_a_retained_snapshot(store: Store) -> None:
    backend = fleet(1)
    grp = group(snapshot=SnapshotModel(keep=timedelta(hours=24)))
    [outcome] = run(backend, store, grp).outcomes
    assert outcome.retained is not None
    assert outcome.retained.keep == timedelta(hours=24)
    assert backend.targets["c00"].snapshots  # kept until released


def test_production_waits_for_staging_soak_and_gets_its_version(store: Store) -> None:
    staging = FakeBackend()
    staging.add("web-staging")
    production = FakeBackend()
    production.add("web-1")
    production.add("web-2")
    staging.publish("app", "v2")
    production.publish("app", "v2")
    prod = group("prod", after="staging", soak=timedelta(hours=1))

    gate = stage_gate(prod, store, T0)
    assert not gate.open and "has not run" in gate.reason

    clock = Clock()
    staged = run(staging, store, group("staging"), clock=clock)
    assert staged.status == "completed"
    gate = stage_gate(prod, store, clock.now + timedelta(minutes=30))
    assert not gate.open and "soaking until" in gate.reason

    # The tag moves on after staging verified v2; production still gets v2.
    production.publish("app", "v3")
    gate = stage_gate(prod, store, clock.now + timedelta(hours=2))
    assert gate.open
    assert gate.pins == {"app": "v2"}
    result = run(production, store, prod, pins=gate.pins)
    assert [o.result for o in result.outcomes] == ["success", "success"]
    assert {t.version for t in production.targets.values()} == {"v2"}


def test_failed_staging_blocks_production(store: Store) -> None:
    staging = FakeBackend()
    staging.add("s1")
    staging.publish("app", "v2")
    staging.unhealthy.add("v2")
    run(staging, store, group("staging"))
    gate = stage_gate(group("prod", after="staging"), store, T0 + timedelta(days=1))
    assert not gate.open
    assert "with 1 failed" in gate.reason


def test_production_skips_what_staging_never_verified(store: Store) -> None:
    staging = FakeBackend()
    staging.add("s1")
    staging.publish("app", "v2")
    run(staging, store, group("staging"))
    production = FakeBackend()
    production.add("p1", ref="other")
    production.publish("other", "v9")
    gate = stage_gate(group("prod", after="staging"), store, T0 + timedelta(days=1))
    result = run(production, store, group("prod", after="staging"), pins=gate.pins)
    [outcome] = result.outcomes
    assert outcome.result == "skipped"
    assert "no version verified by stage 'staging'" in (outcome.error or "")
    assert production.targets["p1"].version == "v1"


def test_a_snapshot_that_cannot_be_planned_fails_the_target_only(store: Store) -> None:
    backend = fleet(2)

    def refuse(target: Any, run_id: str) -> Any:
        if target.name == "c00":
            raise StepFailed("started with --rm: stopping it would delete it")
        return FakeBackend.plan_snapshot(backend, target, run_id)

    backend.plan_snapshot = refuse  # type: ignore[method-assign]
    result = run(backend, store, group(max_errors=Limit(count=2)))
    assert [o.result for o in result.outcomes] == ["failed", "success"]
    assert "planning the snapshot" in (result.outcomes[0].error or "")
    assert backend.targets["c00"].version == "v1"


# --- the alert gate (health.prometheus) before targets start ------------------------------


class Gate:
    """An alert gate that gives the answers it is told, then stays open; it records what
    the backend had done when each answer was asked for."""

    def __init__(self, backend: FakeBackend, *answers: bool) -> None:
        self.backend = backend
        self.answers = list(answers)
        self.asked: list[int] = []  # snapshots taken by then

    def __call__(self) -> GateResult:
        self.asked.append(sum(1 for step, _ in self.backend.calls if step == "snapshot"))
        is_open = self.answers.pop(0) if self.answers else True
        if is_open:
            return GateResult(True)
        return GateResult(False, "alerts_firing", '1 series: ALERTS{alertname="Down"}')


def test_a_shut_gate_holds_starts_until_it_opens(store: Store) -> None:
    backend = fleet(3)
    gate = Gate(backend, False, False, True)
    pauses: list[float] = []
    result = run(backend, store, gate=gate, gate_recheck=15.0, pause=pauses.append)
    assert result.status == "completed"
    assert [o.result for o in result.outcomes] == ["success"] * 3
    assert pauses == [15.0, 15.0]  # asked again after each pause, nothing started meanwhile
    assert gate.asked[:3] == [0, 0, 0]
    assert len(gate.asked) == 5  # once before each start (concurrency 1)


def test_the_gate_is_asked_once_per_pass_of_starts(store: Store) -> None:
    backend = fleet(3)
    gate = Gate(backend)
    result = run(backend, store, group(max_concurrency=Limit(count=3)), gate=gate)
    assert [o.result for o in result.outcomes] == ["success"] * 3
    assert gate.asked == [0]  # the three started together share one answer


def test_a_gate_shut_between_targets_holds_the_rest(store: Store) -> None:
    backend = fleet(3)
    gate = Gate(backend, True, False, True)
    pauses: list[float] = []
    result = run(backend, store, gate=gate, pause=pauses.append)
    assert [o.result for o in result.outcomes] == ["success"] * 3
    assert gate.asked == [0, 1, 1, 2]
    assert len(pauses) == 1


def test_a_gate_still_shut_when_the_window_closes_leaves_targets_pending(store: Store) -> None:
    backend = fleet(3)
    clock = Clock()
    deadline = T0 + timedelta(minutes=5)
    gate = Gate(backend, *[False] * 1000)

    def pause(seconds: float) -> None:
        clock.now += timedelta(seconds=seconds)

    result = run(
        backend,
        store,
        gate=gate,
        gate_recheck=30.0,
        pause=pause,
        clock=clock,
        may_start=lambda now: now < deadline,
    )
    assert result.status == "window_closed"
    assert [o.result for o in result.outcomes] == ["pending"] * 3
    assert ("snapshot", "c00") not in backend.calls
    # Only read afterwards, for patchd_target_update_available: each has its update waiting.
    assert all(o.update is not None for o in result.outcomes)
    error = result.outcomes[0].error or ""
    assert "window closed" in error
    assert "alert gate was shut (alerts_firing: 1 series" in error
    assert 9 <= len(gate.asked) <= 11  # every 30 s for 5 minutes
    run_row = store.last_run("web")
    assert run_row is not None and run_row.detail["pending"] == ["c00", "c01", "c02"]


def test_a_stop_ends_the_wait_for_a_shut_gate(store: Store) -> None:
    backend = fleet(2)
    stop = threading.Event()
    gate = Gate(backend, *[False] * 1000)
    # Without an injected pause the run waits on `stop` itself: setting it ends the wait.
    threading.Timer(0.05, stop.set).start()
    result = run(backend, store, gate=gate, gate_recheck=3600.0, stop=stop)
    assert result.status == "stopped"
    assert [o.result for o in result.outcomes] == ["pending", "pending"]
    assert len(gate.asked) == 1


def test_a_shut_gate_lets_targets_in_flight_finish(store: Store) -> None:
    backend = fleet(3)
    release = threading.Event()
    original = backend.apply

    def apply(target: Any, *args: Any) -> Any:
        if target.name == "c01":
            assert release.wait(120)  # a limit: the test releases it
        return original(target, *args)

    backend.apply = apply  # type: ignore[method-assign]
    answers: list[tuple[bool, bool]] = []  # (gate open, c01 finished) at each answer

    def gate() -> GateResult:
        c01_done = backend.targets["c01"].version == "v2"
        is_open = len(answers) == 0 or c01_done
        answers.append((is_open, c01_done))
        if is_open:
            return GateResult(True)
        release.set()  # c01 finishes while the gate is shut
        return GateResult(False, "alerts_firing")

    result = run(
        backend, store, group(max_concurrency=Limit(count=2)), gate=gate, gate_recheck=0.01
    )
    assert [o.result for o in result.outcomes] == ["success"] * 3
    assert answers[0] == (True, False)  # c00 and c01 start
    assert (False, False) in answers  # c00 done, c02 held while c01 is still in flight
    assert answers[-1] == (True, True)  # c02 starts once the gate opens
