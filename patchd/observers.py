"""Who hears what patchd does: the fan-out of events to observers, and the log observers.

The engine reports each target's transitions and outcomes (`Observer`: step and outcome,
both taking the Group; the engine defines that protocol, as the port it reports through,
so that it imports nothing above it; it is re-exported here). The runtime adds what
happens around a run: a backend checked, a target reconciled, a run started, refused,
finished or failed, an alert gate's answer, an event for people (`notify`: what the
control socket reports, such as a pause, goes this way) and a notification's delivery
result. An observer subclasses `BaseObserver` and
overrides the events it cares about; `Observers` fans every event out to a list of them.
Logs (here), metrics (patchd.metrics.observer) and, next, notifications plug in this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchd import log, versions
from patchd.backends.base import Target
from patchd.config.settings import Group
from patchd.engine.rollout import GateResult, RunResult
from patchd.engine.target import NullObserver, Observer, TargetOutcome
from patchd.notifications.events import Event
from patchd.reconcile import Reconciled
from patchd.runner import Refusal
from patchd.states import RunStatus, TargetResult, TargetState

__all__ = ["BaseObserver", "LogObserver", "NullObserver", "Observer", "Observers", "RunLog"]


class BaseObserver:
    """Every event, each doing nothing: subclass it and override what you need."""

    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        """A target moved to `state`."""

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        """A target reached its end in this run."""

    def backend_checked(self, backend: str, error: str | None) -> None:
        """A backend's service answered (error None) or did not."""

    def reconciled(self, item: Reconciled) -> None:
        """A target a stopped patchd left half-done was finished (or left, and why)."""

    def run_started(self, group: Group) -> None:
        """A run of the group is about to pass its gates (a refusal may follow)."""

    def run_refused(self, group: Group, refusal: Refusal) -> None:
        """A gate kept the run from starting."""

    def run_finished(self, group: Group, result: RunResult) -> None:
        """The run ended (any status)."""

    def run_failed(self, group: Group, error: str) -> None:
        """The run could not start: the state directory cannot be written."""

    def run_crashed(self, group: Group, error: BaseException) -> None:
        """The run ended with an unexpected error (a bug); called inside its except block."""

    def run_ended(self, group: Group) -> None:
        """The run is over, whichever way it went; run_finished, if any, comes after."""

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        """An answer of the group's alert gate; `changed` when the pre-start gate shut,
        changed its reason or opened again (not at every re-check)."""

    def notify(self, event: Event) -> None:
        """An event for people that no engine transition carries (paused, resumed,
        approval needed, quarantined): the notifications observer queues it."""

    def notification(self, channel: str, result: str) -> None:
        """A notification to `channel` was sent, will be retried, or was dropped."""

    def operator(self, group: str, action: str, by: str, detail: str) -> None:
        """An operator changed a control over the control socket: `action` is paused,
        resumed, approved or quarantine_cleared; `by` the user; `detail` in plain words
        (the pause's description, the approved versions, the versions cleared)."""


class Observers(BaseObserver):
    """Fans every event out to several observers, in order."""

    def __init__(self, observers: Sequence[Observer | BaseObserver]) -> None:
        self.observers = list(observers)

    def _each(self) -> list[BaseObserver]:
        # Engine-only observers (step and outcome alone) are welcome; they hear no more.
        return [o for o in self.observers if isinstance(o, BaseObserver)]

    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        for observer in self.observers:
            observer.step(run_id, group, target, state, **fields)

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        for observer in self.observers:
            observer.outcome(run_id, group, outcome)

    def backend_checked(self, backend: str, error: str | None) -> None:
        for observer in self._each():
            observer.backend_checked(backend, error)

    def reconciled(self, item: Reconciled) -> None:
        for observer in self._each():
            observer.reconciled(item)

    def run_started(self, group: Group) -> None:
        for observer in self._each():
            observer.run_started(group)

    def run_refused(self, group: Group, refusal: Refusal) -> None:
        for observer in self._each():
            observer.run_refused(group, refusal)

    def run_finished(self, group: Group, result: RunResult) -> None:
        for observer in self._each():
            observer.run_finished(group, result)

    def run_failed(self, group: Group, error: str) -> None:
        for observer in self._each():
            observer.run_failed(group, error)

    def run_crashed(self, group: Group, error: BaseException) -> None:
        for observer in self._each():
            observer.run_crashed(group, error)

    def run_ended(self, group: Group) -> None:
        for observer in self._each():
            observer.run_ended(group)

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        for observer in self._each():
            observer.alert_gate(group, check, answer, changed)

    def notify(self, event: Event) -> None:
        for observer in self._each():
            observer.notify(event)

    def notification(self, channel: str, result: str) -> None:
        for observer in self._each():
            observer.notification(channel, result)

    def operator(self, group: str, action: str, by: str, detail: str) -> None:
        for observer in self._each():
            observer.operator(group, action, by, detail)


class LogObserver(BaseObserver):
    """Logs every engine transition and outcome as one structured event."""

    def __init__(self) -> None:
        self.log = log.get("patchd.engine")

    def step(
        self, run_id: str, group: Group, target: Target, state: TargetState, **fields: Any
    ) -> None:
        self.log.info(
            "target_step",
            run_id=run_id,
            group=group.name,
            target=target.name,
            state=state,
            **fields,
        )

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        fields: dict[str, Any] = {
            "run_id": run_id,
            "group": group.name,
            "backend": group.backend,
            "target": outcome.target.name,
            "result": outcome.result,
            "seconds": round(outcome.seconds, 3),
        }
        if outcome.update is not None:
            fields.update(
                ref=outcome.update.ref,
                version_from=versions.name(outcome.update.ref, outcome.update.current),
                version_to=versions.name(outcome.update.ref, outcome.update.available),
            )
        if outcome.error:
            fields["error"] = outcome.error
        if outcome.result == TargetResult.ROLLBACK_FAILED:
            self.log.error("target_rollback_failed", **fields)
        elif outcome.result in (
            TargetResult.ROLLED_BACK,
            TargetResult.OUT_OF_SERVICE,
            TargetResult.FAILED,
        ):
            # An error, though the rollback worked: the patch failed, and an operator's
            # `journalctl -p err` (issue 15) must find it.
            self.log.error("target_failed", **fields)
        else:
            self.log.info("target_done", **fields)


class RunLog(BaseObserver):
    """Logs what happens around runs, as the daemon reports it (the CLI prints instead)."""

    def __init__(self) -> None:
        self.log = log.get("patchd.daemon")

    def backend_checked(self, backend: str, error: str | None) -> None:
        if error is not None:
            self.log.warning("backend_down", backend=backend, error=error)

    def reconciled(self, item: Reconciled) -> None:
        level = self.log.info if item.now == TargetState.ROLLED_BACK else self.log.error
        level(
            "reconciled",
            run_id=item.run_id,
            target=item.target,
            was=item.was,
            now=item.now,
            detail=item.detail,
        )

    def run_refused(self, group: Group, refusal: Refusal) -> None:
        self.log.info("run_refused", group=group.name, reason=refusal.reason)

    def run_failed(self, group: Group, error: str) -> None:
        self.log.error("run_failed", group=group.name, error=error)

    def run_crashed(self, group: Group, error: BaseException) -> None:
        self.log.exception("run_crashed", group=group.name, error=str(error))

    def run_finished(self, group: Group, result: RunResult) -> None:
        level = self.log.error if result.status == RunStatus.FAILED else self.log.info
        level(
            "run_finished",
            run_id=result.run_id,
            group=group.name,
            status=result.status,
            succeeded=result.count(TargetResult.SUCCESS),
            failed=result.failed,
            pending=result.count(TargetResult.PENDING),
            error=result.error,
        )

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        if not changed:
            return
        if not answer.open:
            self.log.warning(
                "alert_gate_shut", group=group.name, reason=answer.reason, detail=answer.detail
            )
        else:
            self.log.info("alert_gate_open", group=group.name)
