"""The metrics observer: engine transitions and outcomes, and the runtime's run events,
counted into a Metrics object."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from patchd.backends.base import Target
from patchd.config.settings import Group
from patchd.engine import GateResult, RunResult
from patchd.engine.target import TargetOutcome
from patchd.metrics.definitions import Metrics
from patchd.observers import BaseObserver
from patchd.states import RunStatus, TargetResult, TargetState


class MetricsObserver(BaseObserver):
    """Feeds engine transitions and outcomes, and the runtime's run events, into Metrics."""

    def __init__(self, metrics: Metrics, clock: Callable[[], datetime]) -> None:
        self.metrics = metrics
        self.clock = clock

    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        self.metrics.target_state.labels(group.name, target.name).set(self.clock().timestamp())

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        m = self.metrics
        name = outcome.target.name
        if outcome.result == TargetResult.CURRENT:
            m.update_available.labels(group.backend, group.name, name).set(0)
            return
        if outcome.result in (TargetResult.PENDING, TargetResult.SKIPPED):
            # Not started (left for later, held back, or its dependency failed): it still
            # has the update waiting. Unknown (None) keeps what the gauge last said.
            if outcome.update is not None:
                m.update_available.labels(group.backend, group.name, name).set(1)
            if outcome.result == TargetResult.SKIPPED:  # an operation, of no duration
                m.operations.labels(group.backend, group.name, outcome.result).inc()
            return
        m.operations.labels(group.backend, group.name, outcome.result).inc()
        if outcome.update is not None:  # it had a patch to time (not a failed check)
            m.duration.labels(group.backend).observe(outcome.seconds)
        if outcome.result == TargetResult.SUCCESS:
            m.update_available.labels(group.backend, group.name, name).set(0)
            m.last_success.labels(group.backend, group.name, name).set(self.clock().timestamp())
        elif outcome.update is not None:
            m.update_available.labels(group.backend, group.name, name).set(1)

    def backend_checked(self, backend: str, error: str | None) -> None:
        self.metrics.backend_up.labels(backend).set(1 if error is None else 0)

    def run_started(self, group: Group) -> None:
        self.metrics.run_in_progress.labels(group.name).set(1)

    def run_ended(self, group: Group) -> None:
        self.metrics.run_in_progress.labels(group.name).set(0)

    def run_failed(self, group: Group, error: str) -> None:
        self.metrics.runs.labels(group.name, RunStatus.FAILED).inc()

    def run_finished(self, group: Group, result: RunResult) -> None:
        m = self.metrics
        m.runs.labels(group.name, result.status).inc()
        if result.status == RunStatus.HALTED:
            m.run_halted.labels(group.name).inc()
        m.targets_pending.labels(group.name).set(result.count(TargetResult.PENDING))
        if result.status == RunStatus.COMPLETED:  # every target the group selects has its outcome
            m.group_targets.labels(group.name).set(len(result.outcomes))
            m.forget_targets(group.backend, group.name, {o.target.name for o in result.outcomes})

    def notification(self, channel: str, result: str) -> None:
        self.metrics.notifications.labels(channel, result).inc()

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        if not answer.open:
            self.metrics.alert_gate_blocked.labels(group.name, check, answer.reason).inc()
