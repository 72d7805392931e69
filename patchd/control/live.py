"""What the daemon is doing right now, for `patchd status`: each run in progress, each
of its targets' current step and since when, and the alert gate holding starts.

An observer of the runtime (it hears every transition); the instants come from the
runtime's clock, passed in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from patchd.backends.base import Target
from patchd.config.settings import Group
from patchd.engine import GateResult
from patchd.engine.target import TargetOutcome
from patchd.observers import BaseObserver


class LiveState(BaseObserver):
    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}  # group -> its run going on

    def run_started(self, group: Group) -> None:
        with self._lock:
            self._runs[group.name] = {"started": self.clock(), "run_id": None, "targets": {},
                                      "done": 0, "held": None}  # fmt: skip

    def step(self, run_id: str, group: Group, target: Target, state: str, **fields: Any) -> None:
        with self._lock:
            run = self._runs.get(group.name)
            if run is not None:
                run["run_id"] = run_id
                run["targets"][target.name] = (str(state), self.clock())

    def outcome(self, run_id: str, group: Group, outcome: TargetOutcome) -> None:
        with self._lock:
            run = self._runs.get(group.name)
            if run is not None:
                run["run_id"] = run_id
                run["targets"].pop(outcome.target.name, None)
                run["done"] += 1

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        if check != "before_start":
            return
        with self._lock:
            run = self._runs.get(group.name)
            if run is not None:
                run["held"] = None if answer.open else f"alert gate: {answer.describe()}"

    def run_ended(self, group: Group) -> None:
        with self._lock:
            self._runs.pop(group.name, None)

    def snapshot(self, now: datetime) -> list[dict[str, Any]]:
        """The runs going on, as JSON-able dicts."""
        with self._lock:
            runs = {g: {**r, "targets": dict(r["targets"])} for g, r in self._runs.items()}
        return [
            {
                "group": group,
                "run_id": run["run_id"],
                "started": run["started"].isoformat(),
                "seconds": round((now - run["started"]).total_seconds(), 1),
                "finished_targets": run["done"],
                "held": run["held"],
                "targets": [
                    {
                        "target": name,
                        "step": state,
                        "since": at.isoformat(),
                        "seconds": round((now - at).total_seconds(), 1),
                    }
                    for name, (state, at) in sorted(run["targets"].items())
                ],
            }
            for group, run in sorted(runs.items())
        ]


def render_live(doc: dict[str, Any]) -> str:
    """The live part of `patchd status` (the journal's part follows it)."""
    role = f" (node {doc['node']}, {doc['role']})" if doc.get("role") else ""
    lines = [f"daemon pid {doc['pid']}{role}: live state at {doc['at']}"]
    for run in doc["runs"]:
        lines.append(
            f"  run {run['run_id'] or '(starting)'} of {run['group']}: {run['seconds']:.0f}s,"
            f" {run['finished_targets']} target(s) done"
        )
        if run.get("held"):
            lines.append(f"    new starts held: {run['held']}")
        lines.extend(
            f"    {t['target']}: {t['step']} for {t['seconds']:.0f}s" for t in run["targets"]
        )
    if not doc["runs"]:
        lines.append("  no run in progress")
    for group, reason in sorted(doc["waiting"].items()):
        lines.append(f"  {group} waits: {reason}")
    return "\n".join(lines)
