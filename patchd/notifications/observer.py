"""The notifications observer: engine and runtime events turned into notification events
and queued in the outbox.

A target rolled back or whose rollback failed, a run finished (its summary) and a run
halted come from what the engine and runtime already report; the control socket's events
(paused, resumed, approval needed, quarantined) arrive built, through `notify`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from patchd.config.settings import Group
from patchd.engine.rollout import RunResult
from patchd.engine.target import TargetOutcome
from patchd.notifications import events
from patchd.notifications.events import Event
from patchd.notifications.outbox import Outbox
from patchd.observers import BaseObserver
from patchd.states import RunStatus, TargetResult


class NotificationObserver(BaseObserver):
    def __init__(self, outbox: Outbox, clock: Callable[[], datetime]) -> None:
        self.outbox = outbox
        self.clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, datetime] = {}  # group -> when its run started

    def run_started(self, group: Group) -> None:
        with self._lock:
            self._started[group.name] = self.clock()

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        if outcome.result in (TargetResult.ROLLED_BACK, TargetResult.ROLLBACK_FAILED):
            self.outbox.submit(events.rollback(run_id, group.name, outcome, self.clock()))

    def run_finished(self, group: Group, result: RunResult) -> None:
        finished = self.clock()
        with self._lock:
            started = self._started.pop(group.name, finished)
        self.outbox.submit(events.run_finished(result, group.window, started, finished))
        if result.status == RunStatus.HALTED:
            self.outbox.submit(events.halted(result, group.window, finished))

    def notify(self, event: Event) -> None:
        self.outbox.submit(event)
