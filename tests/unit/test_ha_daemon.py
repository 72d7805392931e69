"""patchd.ha: what a daemon does on a change of role, with a runtime stand-in (the lease
itself is tests/unit/test_leader.py's; two real daemons are tests/integration/
test_ha_daemons.py's)."""

from __future__ import annotations

import threading
import types
from typing import Any

import pytest

from patchd import ha
from patchd.metrics import Metrics
from patchd.state import StoreError
from patchd.state.leader import Change, Role
from patchd.states import RunStatus
from tests.conftest import wait_until


class FakeRuntime:
    """What DaemonHa asks of the runtime: acting, reconcile, the store's runs, the outbox."""

    def __init__(self, failures: int, running: bool) -> None:
        self.failures = failures
        self.leading_now = True
        self.reconciled = 0
        self.ha = None
        self.woken = threading.Event()
        self.outbox = types.SimpleNamespace(wake=self.woken.set)
        status = RunStatus.RUNNING if running else RunStatus.COMPLETED
        self.store = types.SimpleNamespace(
            runs=lambda limit: [types.SimpleNamespace(status=status)]
        )

    def acting(self) -> bool:
        return self.leading_now

    def reconcile(self) -> list[Any]:
        if self.failures:
            self.failures -= 1
            raise StoreError("state store db (lease): server closed the connection")
        self.reconciled += 1
        return []


def _daemon_ha(runtime: FakeRuntime, metrics: Metrics) -> tuple[ha.DaemonHa, list[str]]:
    calls: list[str] = []
    daemon_ha = ha.DaemonHa(
        runtime,  # type: ignore[arg-type]
        metrics,
        lambda: calls.append("lead"),
        lambda: calls.append("standby"),
        lambda: calls.append("wait_runs"),
    )
    return daemon_ha, calls


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_a_takeover_retries_its_reconciliation_then_arms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ha, "RETRY", 0.01)
    runtime, metrics = FakeRuntime(failures=2, running=True), Metrics()
    daemon_ha, calls = _daemon_ha(runtime, metrics)
    daemon_ha._changed(Change(Role.LEADER, 7, "took the lease at epoch 7", "b/1/x"))
    wait_until(lambda: "lead" in calls, 10, "armed after reconciling")
    assert calls == ["wait_runs", "lead"]  # nothing armed before the reconcile succeeded
    assert runtime.reconciled == 1 and runtime.woken.is_set()
    assert _sample(metrics, "patchd_ha_leader") == 1
    assert _sample(metrics, "patchd_ha_takeovers_total", during_run="true") == 1
    assert _sample(metrics, "patchd_ha_takeovers_total", during_run="false") == 0
    daemon_ha._changed(Change(Role.STANDBY, 7, "lease of epoch 7 was taken over"))
    wait_until(lambda: calls[-1] == "standby", 10, "disarmed")
    assert _sample(metrics, "patchd_ha_leader") == 0
    daemon_ha.stop()


def test_a_lease_lost_during_the_retries_arms_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ha, "RETRY", 0.01)
    runtime = FakeRuntime(failures=1000, running=False)
    daemon_ha, calls = _daemon_ha(runtime, Metrics())
    daemon_ha._changed(Change(Role.LEADER, 1, "took the lease at epoch 1"))  # first leader
    wait_until(lambda: runtime.failures < 995, 10, "a few attempts")
    runtime.leading_now = False
    # One worker: this runs only once the retrying takeover gave up by itself.
    daemon_ha._work.submit(lambda: None).result(timeout=10)
    assert "lead" not in calls and runtime.reconciled == 0
    daemon_ha.stop()


def test_after_shutdown_a_step_down_schedules_nothing() -> None:
    runtime, metrics = FakeRuntime(failures=0, running=False), Metrics()
    daemon_ha, calls = _daemon_ha(runtime, metrics)
    daemon_ha.stop()
    daemon_ha._changed(Change(Role.STANDBY, 3, "stepped down: shutting down"))  # no raise
    assert calls == [] and _sample(metrics, "patchd_ha_leader") == 0
