"""The runtime on FakeBackend: a refusal's retry instant, the daemon scheduling on it, and
the backend pool (reuse on reload, retire, close)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.config import Settings, load_settings
from patchd.daemon import Daemon
from patchd.engine import RunResult
from patchd.runtime import Refusal, Runtime
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from tests.conftest import write_config
from tests.unit.test_runner import OPEN, Clock, config


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend("d")
    backend.add("s1", labels={"tier": "staging"})
    backend.add("p1", labels={"tier": "prod"})
    backend.publish("app", "v2")
    return backend


def settings_at(tmp_path: Path, values: dict[str, Any] | None = None) -> Settings:
    values = config(tmp_path / "state") if values is None else values
    return load_settings(write_config(tmp_path / "patchd.toml", values))


def test_a_soaking_stage_is_refused_until_its_soak_ends(tmp_path: Path, fake: FakeBackend) -> None:
    clock = Clock(OPEN)
    runtime = Runtime(settings_at(tmp_path), clock, connector=lambda spec: fake)
    try:
        first = runtime.run("prod")
        assert first == Refusal("stage 'staging' has not run yet", None)  # no instant helps
        staging = runtime.run("staging")
        assert isinstance(staging, RunResult) and staging.status == "completed"
        refused = runtime.run("prod")
        assert isinstance(refused, Refusal) and "soaking" in refused.reason
        last = runtime.store.last_run("staging")
        assert last is not None and last.finished is not None
        assert refused.retry_at == last.finished + timedelta(minutes=30)
        clock.now = refused.retry_at
        assert isinstance(runtime.run("prod"), RunResult)
        # Staging runs again late in the window: its soak ends after the cutoff (05:00),
        # so the window's next opening starts staging first; no instant to retry at.
        fake.publish("app", "v3")
        clock.now = OPEN.replace(hour=4, minute=45)
        assert isinstance(runtime.run("staging"), RunResult)
        late = runtime.run("prod")
        assert isinstance(late, Refusal) and "soaking" in late.reason
        assert late.retry_at is None
    finally:
        runtime.close()


def test_the_daemon_schedules_a_refused_run_at_its_retry_instant(
    tmp_path: Path, fake: FakeBackend
) -> None:
    clock = Clock(OPEN)
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state"))
    daemon = Daemon(path, None, clock=clock, connector=lambda spec: fake, notifier=Notifier(""))
    daemon.scheduler.start = lambda *a, **k: type(daemon.scheduler).start(  # type: ignore[method-assign]
        daemon.scheduler, paused=True
    )  # the clock here is not the real one: nothing may fire by itself
    daemon.start_run = lambda group: False  # type: ignore[method-assign]  # no run at start
    daemon.start()
    try:
        assert isinstance(daemon.runtime.run("staging"), RunResult)
        daemon._run("prod")
        job = daemon.scheduler.get_job("stage:prod")
        last = daemon.store.last_run("staging")
        assert job is not None and last is not None and last.finished is not None
        assert job.next_run_time == last.finished + timedelta(minutes=30)
    finally:
        daemon.shutdown()


def test_the_pool_reuses_unchanged_backends_and_closes_replaced_ones(tmp_path: Path) -> None:
    made: list[FakeBackend] = []

    def connector(spec: object) -> FakeBackend:
        made.append(FakeBackend("d"))
        return made[-1]

    runtime = Runtime(settings_at(tmp_path), Clock(OPEN), connector=connector)
    first = runtime.backend("d")
    unkept = config(tmp_path / "state")
    del unkept["groups"]["staging"]["snapshot"]
    runtime.reload(settings_at(tmp_path, unkept))
    assert runtime.backend("d") is first  # same backend spec: kept, not reconnected
    assert ("close", "") not in first.calls
    changed = config(tmp_path / "state")
    changed["backends"]["d"]["url"] = "unix:///other.sock"
    runtime.reload(settings_at(tmp_path, changed))
    assert ("close", "") in first.calls  # replaced, and no run was using it
    second = runtime.backend("d")
    assert second is not first
    runtime.close()
    assert ("close", "") in second.calls
    assert len(made) == 2


def test_a_group_gone_after_a_reload_is_refused_not_crashed(tmp_path: Path) -> None:
    runtime = Runtime(settings_at(tmp_path), Clock(OPEN), connector=lambda spec: FakeBackend("d"))
    try:
        refused = runtime.run("nope")
        assert refused == Refusal("group 'nope' is no longer configured")
    finally:
        runtime.close()
