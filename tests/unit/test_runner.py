"""Runner (gates, lock, retained items) and the plan/status/history reports, on FakeBackend."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd import reports
from patchd.config import Settings, load_settings
from patchd.engine import GateResult, NullObserver
from patchd.runner import Runner, RunRefused, group_lock
from patchd.state import SqliteStore
from patchd.testing import FakeBackend
from tests.conftest import write_config
from tests.unit.fake_prometheus import FakePrometheus, serve, vector


def config(state: Path) -> dict[str, Any]:
    return {
        "daemon": {"state_dir": state},
        "windows": {
            "sat": {"days": ["sat"], "start": "02:00", "duration": "4h", "cutoff": "1h"},
        },
        "freezes": {
            "f": {
                "start": datetime(2026, 12, 12, tzinfo=UTC),
                "end": datetime(2026, 12, 13, tzinfo=UTC),
            }
        },
        "backends": {"d": {"type": "docker"}},
        "groups": {
            "staging": {
                "backend": "d",
                "window": "sat",
                "select": {"labels": {"tier": "staging"}},
                "snapshot": {"keep": "1h"},
            },
            "prod": {
                "backend": "d",
                "window": "sat",
                "after": "staging",
                "soak": "30m",
                "max_concurrency": "50%",
                "select": {"labels": {"tier": "prod"}},
            },
        },
    }


OPEN = datetime(2026, 11, 28, 2, 30, tzinfo=UTC)  # Saturday, inside the window


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_config(tmp_path / "patchd.toml", config(tmp_path / "state")))


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend("d")
    backend.add("s1", labels={"tier": "staging"})
    for i in range(4):
        backend.add(f"p{i}", labels={"tier": "prod"})
    backend.publish("app", "v2")
    return backend


def make_runner(settings: Settings, fake: FakeBackend, clock: Clock) -> Runner:
    store = SqliteStore(settings.daemon.state_dir / "patchd.db")
    return Runner(settings, store, {"d": fake}, NullObserver(), clock)


def test_window_cutoff_and_freeze_gates(settings: Settings, fake: FakeBackend) -> None:
    clock = Clock(datetime(2026, 11, 27, 12, tzinfo=UTC))  # Friday: closed
    runner = make_runner(settings, fake, clock)
    with pytest.raises(RunRefused, match="does not allow a start now"):
        runner.run("staging")
    clock.now = OPEN.replace(hour=5, minute=10)  # inside the last hour: cutoff
    with pytest.raises(RunRefused, match="cutoff"):
        runner.run("staging")
    clock.now = datetime(2026, 12, 12, 2, 30, tzinfo=UTC)  # a Saturday in the freeze
    with pytest.raises(RunRefused, match="freeze 'f'"):
        runner.run("staging", now=True)
    result = runner.run("staging", force=True)
    assert result.status == "completed"


def test_stage_promotion_through_the_runner(settings: Settings, fake: FakeBackend) -> None:
    clock = Clock(OPEN)
    runner = make_runner(settings, fake, clock)
    with pytest.raises(RunRefused, match="has not run yet"):
        runner.run("prod")
    assert runner.run("staging").status == "completed"
    fake.publish("app", "v3")
    with pytest.raises(RunRefused, match="soaking"):
        runner.run("prod")
    clock.now = OPEN + timedelta(minutes=31)
    result = runner.run("prod")
    assert [o.result for o in result.outcomes] == ["success"] * 4
    assert {fake.targets[f"p{i}"].version for i in range(4)} == {"v2"}


def test_retained_items_are_recorded_and_released_when_due(
    settings: Settings, fake: FakeBackend
) -> None:
    clock = Clock(OPEN)
    runner = make_runner(settings, fake, clock)
    runner.run("staging")
    [row] = runner.store.retained()
    assert row.target == "s1"
    assert row.expires == OPEN + timedelta(hours=1)
    assert runner.release_expired() == 0
    assert fake.targets["s1"].snapshots
    clock.now = OPEN + timedelta(hours=1)
    assert runner.release_expired() == 1
    assert not fake.targets["s1"].snapshots
    assert runner.store.retained() == []


def test_one_run_per_group_at_a_time(settings: Settings, fake: FakeBackend) -> None:
    runner = make_runner(settings, fake, Clock(OPEN))
    with group_lock(settings, "staging"), pytest.raises(RunRefused, match="already"):
        runner.run("staging")


def test_plan_changes_nothing_and_shows_batches(settings: Settings, fake: FakeBackend) -> None:
    clock = Clock(OPEN)
    runner = make_runner(settings, fake, clock)
    runner.run("staging")
    clock.now = OPEN + timedelta(hours=1)
    fake.calls.clear()
    doc = reports.plan(settings, runner.store, {"d": fake}, "prod", clock.now)
    assert doc["stage_gate"]["open"] is True
    assert doc["stage_gate"]["pins"] == {"app": "v2"}
    assert [(t["name"], t["action"], t.get("batch")) for t in doc["targets"]] == [
        ("p0", "patch", 1),
        ("p1", "patch", 1),
        ("p2", "patch", 2),
        ("p3", "patch", 2),
    ]
    assert {step for step, _ in fake.calls} == {"discover", "check_update"}
    assert "batch 2: p3  app  v1 -> v2" in reports.render_plan(doc)
    json.dumps(doc)


def test_plan_shows_a_stopped_target_as_skipped(settings: Settings, fake: FakeBackend) -> None:
    store = SqliteStore(Path(":memory:"))
    [shown] = reports.plan(settings, store, {"d": fake}, "staging", OPEN)["targets"]
    assert shown["action"] == "patch"
    fake.targets["s1"].running = False  # a run would skip it, spending no error budget
    [shown] = reports.plan(settings, store, {"d": fake}, "staging", OPEN)["targets"]
    assert shown["action"] == "skip"
    assert shown["reason"] == "not running: s1 is stopped: patchd patches running targets only"


def test_plan_checks_targets_max_concurrency_at_once(
    settings: Settings, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(OPEN)
    runner = make_runner(settings, fake, clock)
    runner.run("staging")
    clock.now = OPEN + timedelta(hours=1)
    # prod's max_concurrency is 2: each check passes only when another runs beside it
    # (checked one by one, the first would wait for the barrier's timeout and fail).
    meeting = threading.Barrier(2, timeout=20)
    check = fake.check_update

    def together(*args: Any) -> Any:
        meeting.wait()
        return check(*args)

    monkeypatch.setattr(fake, "check_update", together)
    doc = reports.plan(settings, runner.store, {"d": fake}, "prod", clock.now)
    assert [(t["name"], t["action"]) for t in doc["targets"]] == [
        ("p0", "patch"), ("p1", "patch"), ("p2", "patch"), ("p3", "patch"),
    ]  # fmt: skip


def test_status_and_history(settings: Settings, fake: FakeBackend) -> None:
    clock = Clock(OPEN)
    runner = make_runner(settings, fake, clock)
    fake.unhealthy.add("v2")
    runner.run("staging")
    doc = reports.status(settings, runner.store, clock.now)
    staging = next(g for g in doc["groups"] if g["group"] == "staging")
    assert staging["last_run"]["failed"] == 1
    assert staging["window_open"] is True
    prod = next(g for g in doc["groups"] if g["group"] == "prod")
    assert prod["stage_gate"]["open"] is False
    assert "staging: last run" in reports.render_status(doc)
    runs = reports.history(runner.store, "staging", 10)
    assert runs[0]["targets"] == [
        {
            "target": "s1",
            "state": "rolled_back",
            "from": "v1",
            "to": "v2",
            "change": "v1 -> v2",  # named as every output names versions (patchd.versions)
            "error": runs[0]["targets"][0]["error"],
        }
    ]
    assert "unhealthy on v2" in runs[0]["targets"][0]["error"]
    assert "s1: rolled_back v1 -> v2" in reports.render_history(runs)
    json.dumps(doc)


# --- the alert gate, wired by the runner --------------------------------------------------


def gated_runner(tmp_path: Path, fake: FakeBackend, url: str) -> tuple[Runner, list[Any]]:
    values = config(tmp_path / "state")
    values["groups"]["gated"] = {
        "backend": "d",
        "window": "sat",
        "select": {"labels": {"tier": "gated"}},
        "health": {
            "prometheus": {
                "url": url,
                "query": 'ALERTS{alertstate="firing"}',
                "observe": "0s",
                "interval": "1s",
            }
        },
    }
    path = write_config(tmp_path / "gated.toml", values)
    fake.add("g1", labels={"tier": "gated"})
    runner = make_runner(load_settings(path), fake, Clock(OPEN))
    answers: list[Any] = []
    runner.on_alert_gate = lambda group, check, answer: answers.append((group, check, answer))
    return runner, answers


def test_an_unreachable_prometheus_holds_every_start(tmp_path: Path, fake: FakeBackend) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    runner, answers = gated_runner(tmp_path, fake, f"http://127.0.0.1:{port}")
    stop = threading.Event()

    def stop_after_two(group: str, check: str, answer: GateResult) -> None:
        answers.append((group, check, answer))
        if len(answers) == 2:
            stop.set()

    runner.on_alert_gate = stop_after_two
    result = runner.run("gated", stop=stop)
    assert result.status == "stopped"
    [outcome] = result.outcomes
    assert outcome.result == "pending"
    assert "alert gate was shut (unreachable: http://127.0.0.1:" in (outcome.error or "")
    assert [(g, c, a.reason) for g, c, a in answers] == [
        ("gated", "before_start", "unreachable")
    ] * 2
    assert ("check_update", "g1") not in fake.calls


@pytest.fixture
def prometheus() -> Iterator[str]:
    with serve() as url:
        yield url


def test_an_alert_after_the_patch_rolls_the_target_back(
    tmp_path: Path, fake: FakeBackend, prometheus: str
) -> None:
    firing = vector({"__name__": "ALERTS", "alertname": "Errors", "alertstate": "firing"})
    FakePrometheus.answers = [(200, vector()), (200, firing)]
    runner, answers = gated_runner(tmp_path, fake, prometheus)
    result = runner.run("gated")
    [outcome] = result.outcomes
    assert outcome.result == "rolled_back"
    assert "alert gate 'ALERTS{alertstate=\"firing\"}': alerts_firing: 1 series" in (
        outcome.error or ""
    )
    assert fake.targets["g1"].version == "v1"
    assert [(c, a.open, a.reason) for _, c, a in answers] == [
        ("before_start", True, "ok"),
        ("after_patch", False, "alerts_firing"),
    ]
    assert FakePrometheus.queries == ['ALERTS{alertstate="firing"}'] * 2
