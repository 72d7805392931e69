"""The notifications observer: engine and runtime events turned into notification events
and queued in the outbox.

A target rolled back or whose rollback failed (in a run, or when a restart finished what
a stopped patchd left), a run finished (its summary) and a run halted come from what the
engine and runtime already report; the control socket's events
(paused, resumed, approval needed, quarantined) arrive built, through `notify`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from patchd import log
from patchd.config.settings import Group
from patchd.engine.rollout import RunResult
from patchd.engine.stages import approvable
from patchd.engine.target import TargetOutcome
from patchd.notifications import events
from patchd.notifications.events import Event
from patchd.notifications.outbox import Outbox
from patchd.observers import BaseObserver
from patchd.reconcile import Reconciled
from patchd.runner import Refusal
from patchd.state import StoreError
from patchd.states import RunStatus, TargetResult, TargetState


class NotificationObserver(BaseObserver):
    def __init__(self, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.outbox = outbox
        self.clock = clock
        self.log = log.get("patchd.notifications")
        self._lock = threading.Lock()
        self._started: dict[str, datetime] = {}  # group -> when its run started
        self._awaiting: set[str] = set()  # groups already announced as awaiting approval

    def _submit(self, build: Callable[[], Event]) -> None:
        """Build an event and queue it. Telling people must never break a patch: an
        event that cannot be built or queued is logged and the run goes on."""
        try:
            self.outbox.submit(build())
        except Exception as err:
            self.log.error("notification_not_queued", error=repr(err))

    def run_started(self, group: Group) -> None:
        with self._lock:
            self._started[group.name] = self.clock()
            self._awaiting.discard(group.name)

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        if outcome.result in (TargetResult.ROLLED_BACK, TargetResult.ROLLBACK_FAILED):
            self._submit(lambda: events.rollback(run_id, group.name, outcome, self.clock()))
        update = outcome.update
        if outcome.quarantine and update is not None:
            self._submit(
                lambda: events.quarantined(
                    group.name,
                    update.available,
                    outcome.target.name,
                    outcome.error or "verification failed",
                    self.clock(),
                )
            )

    def run_refused(self, group: Group, refusal: Refusal) -> None:
        # A stage with approval = "manual" is refused at every window check until it is
        # approved: people hear it once per wait, with the versions an approval would pin.
        waiting = "awaiting approval" in refusal.reason
        with self._lock:
            announced = group.name in self._awaiting
            if waiting:
                self._awaiting.add(group.name)
            else:
                self._awaiting.discard(group.name)
        if not waiting or announced:
            return

        def build() -> Event:
            pins, _ = approvable(group, self.outbox.store, self.clock())
            return events.approval_needed(group.name, pins or {}, refusal.reason, self.clock())

        self._submit(build)

    def reconciled(self, item: Reconciled) -> None:
        if item.now not in (TargetState.ROLLED_BACK, TargetState.ROLLBACK_FAILED):
            return
        failed = None
        if item.now == TargetState.ROLLBACK_FAILED:
            failed = item.detail or "no reason given"
        self._submit(lambda: events.rolled_back_at_restart(
            item.run_id, self._group_of(item.run_id), item.target, item.was.value, failed,
            self.clock(),
        ))  # fmt: skip

    def _group_of(self, run_id: str) -> str | None:
        try:
            return next(
                (r.group for r in self.outbox.store.runs(limit=1000) if r.id == run_id), None
            )
        except StoreError:
            return None

    def run_finished(self, group: Group, result: RunResult) -> None:
        finished = self.clock()
        with self._lock:
            started = self._started.pop(group.name, finished)
        self._submit(lambda: events.run_finished(result, group.window, started, finished))
        if result.status == RunStatus.HALTED:
            self._submit(lambda: events.halted(result, group.window, finished))

    def notify(self, event: Event) -> None:
        self._submit(lambda: event)
