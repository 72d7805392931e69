"""Operators' controls as the engine and runner hold them, with FakeBackend and a real
SQLite store: quarantine (decided once, carried with its reason), pause, approval."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.backends.base import StepFailed, TransientError
from patchd.config import Settings
from patchd.config.types import Limit
from patchd.engine import GateResult, stage_gate
from patchd.engine.controls import (
    PAUSE,
    Pause,
    Quarantine,
    approval_of,
    approve,
    clear_quarantine,
    open_quarantines,
    pause_of,
    pauses,
    quarantine,
    quarantined,
    supersede,
)
from patchd.engine.stages import approvable
from patchd.metrics import JournalCollector, journal_view
from patchd.runner import RunRefused
from patchd.state import SqliteStore, Store, open_store
from patchd.states import RunStatus, TargetResult
from patchd.testing import FakeBackend
from tests.unit.test_engine import fleet, group, run
from tests.unit.test_runner import OPEN, make_runner, settings
from tests.unit.test_runner import Clock as FixedClock

__all__ = ["settings"]  # the runner's fixture, used here too

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "state.db")


def test_a_version_that_fails_verification_is_quarantined_once(store: Store) -> None:
    backend = fleet(3)
    backend.unhealthy.add("v2")
    grp = group(max_errors=Limit(count=5))
    first = run(backend, store, grp)
    results = [o.result for o in first.outcomes]
    # The first target fails and rolls back; the others are not offered v2 again.
    assert results == [TargetResult.ROLLED_BACK, TargetResult.SKIPPED, TargetResult.SKIPPED]
    assert "quarantined since" in (first.outcomes[1].error or "")
    assert "failed on c00" in (first.outcomes[1].error or "")
    [held] = quarantined(store, ["web"]).values()
    assert (held.ref, held.version, held.target) == ("app", "v2", "c00")
    assert "unhealthy on v2" in held.reason
    # A later run (a restart, a reload, a trigger, the next window) installs nothing.
    applies = [c for c in backend.calls if c[0] == "apply"]
    again = run(backend, store, grp)
    assert {o.result for o in again.outcomes} == {TargetResult.SKIPPED}
    assert [c for c in backend.calls if c[0] == "apply"] == applies
    # A newer version is another version: it goes through.
    backend.unhealthy.clear()
    backend.publish("app", "v3")
    newer = run(backend, store, grp)
    assert {o.result for o in newer.outcomes} == {TargetResult.SUCCESS}
    assert {t.version for t in backend.targets.values()} == {"v3"}


def quarantined_gauge(settings: Settings, store: Store) -> dict[str, float]:
    return {
        s.labels["group"]: s.value
        for family in JournalCollector(lambda: journal_view(settings, store)).collect()
        for s in family.samples
        if s.name == "patchd_quarantined_versions"
    }


def test_a_newer_version_that_passes_supersedes_the_quarantine_and_the_gauge_drops(
    settings: Settings, store: Store
) -> None:
    backend = fleet(2)
    backend.unhealthy.add("v2")
    grp = group("staging", max_errors=Limit(count=5))  # a group of `settings`
    run(backend, store, grp)
    assert quarantined_gauge(settings, store)["staging"] == 1.0
    # An unrelated ref passing supersedes nothing.
    backend.publish("other", "v9")
    backend.unhealthy.clear()
    backend.publish("app", "v3")
    newer = run(backend, store, grp)
    assert {o.result for o in newer.outcomes} == {TargetResult.SUCCESS}
    assert quarantined_gauge(settings, store)["staging"] == 0.0
    assert open_quarantines(store, "staging") == []
    # Still kept and still never installed: the record says what replaced it.
    [held] = quarantined(store, ["staging"]).values()
    assert (held.version, held.superseded_by) == ("v2", "v3")
    assert "superseded by v3" in held.describe()
    backend.publish("app", "v2")  # the tag moved back to the broken version
    back = run(backend, store, grp)
    assert {o.result for o in back.outcomes} == {TargetResult.SKIPPED}
    assert {t.version for t in backend.targets.values()} == {"v3"}


def test_a_run_reads_the_quarantines_to_supersede_once_per_passing_version(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Superseding is a read of the group's quarantines (and a write when one is open):
    # once per version that passes in a run, not once per target (on PostgreSQL each
    # read is a round trip in the loop that starts the targets).
    quarantine(store, Quarantine("web", "app", "v1", T0, "c09", "unhealthy on v1"))
    reads: list[str] = []
    controls = store.controls

    def counted(kind: str, group: str | None = None) -> object:
        reads.append(kind)
        return controls(kind, group)

    monkeypatch.setattr(store, "controls", counted)
    backend = fleet(6)
    result = run(backend, store, group())
    assert {o.result for o in result.outcomes} == {TargetResult.SUCCESS}
    assert len(reads) == 2  # the run's quarantine list, then one supersede
    monkeypatch.undo()
    [held] = quarantined(store, ["web"]).values()
    assert held.superseded_by == "v2"


def test_only_the_same_ref_supersedes(store: Store) -> None:
    quarantine(store, Quarantine("web", "app", "v2", T0, "c1", "broken"))
    quarantine(store, Quarantine("web", "db", "v7", T0, "c2", "broken"))
    assert supersede(store, "web", "app", "v2") == 0  # the broken one itself: no
    assert supersede(store, "web", "app", "v3") == 1
    assert supersede(store, "web", "app", "v4") == 0  # already superseded
    assert [(q.ref, q.version) for q in open_quarantines(store, "web")] == [("db", "v7")]


def test_a_failed_snapshot_does_not_quarantine_the_version(store: Store) -> None:
    backend = fleet(1)
    backend.failures[("c00", "snapshot")] = StepFailed("datastore full")
    result = run(backend, store)
    assert result.outcomes[0].result == TargetResult.ROLLED_BACK
    assert quarantined(store, ["web"]) == {}


def test_a_backend_unreachable_while_verifying_does_not_quarantine(store: Store) -> None:
    backend = fleet(1)
    backend.failures[("c00", "verify")] = TransientError("engine restarting")
    result = run(backend, store, sleep=lambda seconds: None)
    assert result.outcomes[0].result == TargetResult.ROLLED_BACK
    assert "gave up after" in (result.outcomes[0].error or "")
    assert quarantined(store, ["web"]) == {}


def test_a_later_stage_never_receives_a_version_quarantined_before_it(store: Store) -> None:
    backend = fleet(2)
    # Staging verified v2 on an earlier run, then v2 failed on a staging target.
    store.start_run("r1", "staging", None, T0)
    store.finish_run("r1", RunStatus.COMPLETED, T0, 1, 1, 0, {"verified": {"app": "v2"}})
    quarantine(store, Quarantine("staging", "app", "v2", T0, "c00", "verifying: broken"))
    prod = group("prod", after="staging")
    result = run(backend, store, prod, pins={"app": "v2"})
    assert {o.result for o in result.outcomes} == {TargetResult.SKIPPED}
    assert all("quarantined" in (o.error or "") for o in result.outcomes)


def test_clear_by_version_prefix_and_all(store: Store) -> None:
    quarantine(store, Quarantine("web", "app", "sha256:" + "a" * 64, T0, "c1", "x"))
    quarantine(store, Quarantine("web", "app", "sha256:" + "b" * 64, T0, "c2", "y"))
    assert clear_quarantine(store, "web", "sha256:") == 0  # too short to be a prefix
    assert clear_quarantine(store, "web", "sha256:aaaaaa") == 1
    assert [q.target for q in quarantined(store, ["web"]).values()] == ["c2"]
    assert clear_quarantine(store, "web") == 1
    assert quarantined(store, ["web"]) == {}


def test_a_pause_expires_by_time_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = open_store(path)
    until = T0 + timedelta(minutes=30)
    pause = Pause("web", T0, until, "incident", "alice")
    store.put_control(PAUSE, "web", "", pause.data(), T0)
    store.close()
    store = SqliteStore(path)  # a restart
    found = pause_of(store, "web", T0 + timedelta(minutes=1))
    assert found == pause
    assert "paused by alice" in found.describe() and "incident" in found.describe()
    assert pause_of(store, "web", until) is None
    assert pauses(store, until) == {}


def test_a_paused_group_is_refused_with_the_instant_it_ends(settings: Settings) -> None:
    backend = FakeBackend("d")
    backend.add("s1", labels={"tier": "staging"})
    backend.publish("app", "v2")
    runner = make_runner(settings, backend, FixedClock(OPEN))
    until = OPEN + timedelta(minutes=5)
    pause = Pause("staging", OPEN, until, "", "root")
    runner.store.put_control(PAUSE, "staging", "", pause.data(), OPEN)
    with pytest.raises(RunRefused) as refused:
        runner.run("staging", force=True)  # even --force
    assert "paused by root" in refused.value.refusal.reason
    assert refused.value.refusal.retry_at == until
    assert backend.targets["s1"].version == "v1"
    runner.clock = FixedClock(until)
    assert runner.run("staging").status == RunStatus.COMPLETED
    assert backend.targets["s1"].version == "v2"


def test_a_pause_holds_new_starts_and_in_flight_targets_finish(settings: Settings) -> None:
    backend = FakeBackend("d")
    for i in range(3):
        backend.add(f"s{i}", labels={"tier": "staging"})
    backend.publish("app", "v2")
    clock = FixedClock(OPEN)
    runner = make_runner(settings, backend, clock)
    store = runner.store
    gate = runner.pause_gate(settings.groups["staging"], None)
    assert gate().open
    store.put_control(PAUSE, "staging", "", Pause("staging", OPEN, None, "", "root").data(), OPEN)
    answer = gate()
    assert not answer.open and answer.reason == "paused" and "root" in answer.detail
    store.drop_control(PAUSE, "staging")
    assert gate() == GateResult(True)


def test_manual_approval_waits_then_pins_exactly_stagings_versions(store: Store) -> None:
    prod = group("prod", after="staging", approval="manual")
    store.start_run("r1", "staging", None, T0)
    store.finish_run("r1", RunStatus.COMPLETED, T0, 1, 1, 0, {"verified": {"app": "v2"}})
    gate = stage_gate(prod, store, T0 + timedelta(minutes=1))
    assert not gate.open and gate.reason.startswith("awaiting approval")
    assert "patchd approve prod" in gate.reason
    pins, _ = approvable(prod, store, T0)
    assert pins == {"app": "v2"}
    approve(store, "prod", pins, "alice", T0)
    gate = stage_gate(prod, store, T0 + timedelta(minutes=1))
    assert gate.open and gate.pins == {"app": "v2"} and "approved by alice" in gate.reason
    # Staging verifies something newer: the approval no longer covers it.
    store.start_run("r2", "staging", None, T0 + timedelta(minutes=2))
    store.finish_run("r2", RunStatus.COMPLETED, T0 + timedelta(minutes=2), 1, 1, 0,
                     {"verified": {"app": "v3"}})  # fmt: skip
    gate = stage_gate(prod, store, T0 + timedelta(minutes=3))
    assert not gate.open and "awaiting approval" in gate.reason
    assert approval_of(store, "prod") is not None


def test_approval_is_refused_while_the_earlier_stage_failed(store: Store) -> None:
    prod = group("prod", after="staging", approval="manual")
    store.start_run("r1", "staging", None, T0)
    store.finish_run("r1", RunStatus.HALTED, T0, 2, 1, 1, {"verified": {"app": "v2"}})
    pins, why = approvable(prod, store, T0)
    assert pins is None and "halted" in why
    pins, why = approvable(group("web"), store, T0)
    assert pins is None and "nothing to approve" in why


def test_the_audit_trail_keeps_who_did_what(store: Store) -> None:
    store.audit(T0, 1000, 4242, "alice", "pause", "web", {"reason": "incident"})
    store.audit(T0, 65534, 4243, "nobody", "refused pause", None, {})
    [last, first] = store.audit_trail()
    assert (first.user, first.action, first.group, first.detail) == (
        "alice",
        "pause",
        "web",
        {"reason": "incident"},
    )
    assert (last.uid, last.action, last.group) == (65534, "refused pause", None)
