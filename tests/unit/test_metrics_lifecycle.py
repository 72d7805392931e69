"""Metrics across the daemon's life (issue 15): rebuilt from the journal after a restart,
series of removed targets and groups dropped,
a group that selects nothing seen, process metrics exported and no `_created` series.

The runtime runs the real engine on FakeBackend; the metrics are read from the registry's
exposition text, as Prometheus reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from patchd.backends.base import StepFailed
from patchd.metrics import Metrics, MetricsObserver
from patchd.runtime import Runtime
from patchd.testing import FakeBackend
from tests.unit.test_runner import OPEN, Clock, config
from tests.unit.test_runtime import settings_at


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend("d")
    backend.add("s1", labels={"tier": "staging"})
    backend.add("s2", labels={"tier": "staging"})
    backend.publish("app", "v2")
    return backend


def runtime_with(
    tmp_path: Path, fake: FakeBackend, metrics: Metrics, values: dict[str, Any] | None = None
) -> Runtime:
    clock = Clock(OPEN)
    return Runtime(
        settings_at(tmp_path, values), clock, [MetricsObserver(metrics, clock)], lambda spec: fake
    )


def test_last_success_is_rebuilt_from_the_journal_after_a_restart(
    tmp_path: Path, fake: FakeBackend
) -> None:
    runtime = runtime_with(tmp_path, fake, Metrics())
    try:
        runtime.run("staging")
    finally:
        runtime.close()
    restarted = Metrics()
    runtime = runtime_with(tmp_path, fake, restarted)
    try:
        restarted.prepare(runtime.settings)
        restarted.restore(runtime.settings, runtime.store)
    finally:
        runtime.close()
    for name in ("s1", "s2"):
        at = sample(
            restarted,
            "patchd_target_last_success_timestamp_seconds",
            backend="d",
            group="staging",
            target=name,
        )
        assert at is not None and abs(at - OPEN.timestamp()) < 5


def test_series_of_removed_targets_and_groups_are_dropped(
    tmp_path: Path, fake: FakeBackend
) -> None:
    metrics = Metrics()
    runtime = runtime_with(tmp_path, fake, metrics)
    try:
        runtime.run("staging")
        assert sample(metrics, "patchd_group_targets", group="staging") == 2
        del fake.targets["s2"]
        runtime.run("staging")
    finally:
        runtime.close()
    labels = {"backend": "d", "group": "staging"}
    assert sample(metrics, "patchd_target_last_success_timestamp_seconds", **labels, target="s1")
    assert (
        sample(metrics, "patchd_target_last_success_timestamp_seconds", **labels, target="s2")
        is None
    )
    assert sample(metrics, "patchd_group_targets", group="staging") == 1
    # A reload without the group: its series go.
    values = config(tmp_path / "state")
    groups = values["groups"]
    del groups["prod"]["after"], groups["prod"]["soak"]
    groups["gone"] = groups.pop("staging")
    without = settings_at(tmp_path, values)
    metrics.prepare(without)
    assert "s1" not in exposition(metrics)


def test_a_group_that_selects_nothing_is_warned_about_and_counted(
    tmp_path: Path, fake: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    from patchd import log

    log.setup("json", "info")
    metrics = Metrics()
    fake.targets.clear()
    runtime = runtime_with(tmp_path, fake, metrics)
    try:
        runtime.run("staging")
    finally:
        runtime.close()
    assert sample(metrics, "patchd_group_targets", group="staging") == 0
    err = capsys.readouterr().err
    assert '"event": "group_selects_nothing"' in err and '"level": "warning"' in err


def test_process_metrics_are_exported_and_created_series_are_not() -> None:
    metrics = Metrics()
    metrics.runs.labels("web", "completed").inc()
    text = exposition(metrics)
    assert "process_resident_memory_bytes" in text
    assert "python_info" in text
    assert "_created" not in text


@pytest.mark.parametrize("max_errors", [1, 2])
def test_update_available_covers_targets_the_run_did_not_start(
    tmp_path: Path, fake: FakeBackend, max_errors: int
) -> None:
    """s1 fails its verification. With max_errors 1 the run halts and s2, s3 stay pending;
    with 2, s2 (depending on s1) and s3 (its version now quarantined) are skipped. A target
    left alone still has its update waiting: the gauge says 1 for it, not nothing."""
    fake.targets["s2"].depends_on = ("s1",)
    fake.add("s3", labels={"tier": "staging"})
    fake.failures[("s1", "verify")] = StepFailed("s1 is unhealthy on v2")
    values = config(tmp_path / "state")
    values["groups"]["staging"]["max_errors"] = max_errors
    metrics = Metrics()
    runtime = runtime_with(tmp_path, fake, metrics, values)
    try:
        result = runtime.run("staging")
    finally:
        runtime.close()
    by_name = {o.target.name: o.result for o in getattr(result, "outcomes", ())}
    labels = {"backend": "d", "group": "staging"}
    if max_errors == 1:
        assert by_name == {"s1": "rolled_back", "s2": "pending", "s3": "pending"}
    else:  # s3 is skipped too: the version that failed on s1 is quarantined
        assert by_name == {"s1": "rolled_back", "s2": "skipped", "s3": "skipped"}
    for name in ("s1", "s2", "s3"):
        assert sample(metrics, "patchd_target_update_available", **labels, target=name) == 1, name
