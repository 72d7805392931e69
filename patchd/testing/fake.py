"""FakeBackend, an in-memory backend with no I/O (also the backend type `fake`).

The engine's own tests, the benchmarks and third-party backend authors use it; a config
may name it (`type = "fake"`, no keys; its select takes `labels` and `names`) to try
patchd's commands without touching anything: it starts with no targets. It keeps
the contract of `patchd.backends.base.Backend` (the contract suite runs against it too),
and can be told to fail at any step, to report some versions as unhealthy, and to take a
fixed time per step through an injected sleep. A target that is not `running` is refused
by check_update's pre-check (NotRunning), as a stopped container or powered-off VM is.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from patchd.backends.base import (
    NotRunning,
    Retained,
    RollbackFailed,
    Snapshot,
    StepFailed,
    Target,
    TransientError,
    Update,
)
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FakeSelect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[str, str] = Field(default_factory=dict)
    names: list[str] = Field(default_factory=list)


@dataclass
class FakeTarget:
    """One fake machine: what it runs, whether it runs, and its snapshots."""

    name: str
    ref: str = "app"
    version: str = "v1"
    running: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    partition: str | None = None
    snapshots: dict[str, str] = field(default_factory=dict)


class FakeBackend:
    """An in-memory backend. Thread-safe; every call is recorded in `calls`."""

    config_model: ClassVar[type[BaseModel]] = FakeConfig
    select_model: ClassVar[type[BaseModel]] = FakeSelect

    def __init__(self, name: str = "fake", config: Any = None) -> None:
        self.name = name
        self.targets: dict[str, FakeTarget] = {}
        self.latest: dict[str, str] = {}
        self.unhealthy: set[str] = set()
        # (target name, step) -> exception to raise there; step is a method name.
        self.failures: dict[tuple[str, str], BaseException] = {}
        self.step_time = 0.0
        self.sleep: Callable[[float], None] = lambda seconds: None
        self.up = True
        self.calls: list[tuple[str, str]] = []
        self.released: list[Mapping[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_in_flight_by_partition: dict[str, int] = {}
        self._partition_in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- building a fleet -----------------------------------------------------------------

    def add(self, name: str, **fields: Any) -> FakeTarget:
        target = FakeTarget(name, **fields)
        self.targets[name] = target
        self.latest.setdefault(target.ref, target.version)
        return target

    def publish(self, ref: str, version: str) -> None:
        self.latest[ref] = version

    # --- the Backend protocol -------------------------------------------------------------

    def _enter(self, step: str, target: Target | None) -> None:
        name = target.name if target is not None else ""
        with self._lock:
            self.calls.append((step, name))
            failure = self.failures.get((name, step))
        if not self.up:
            raise TransientError(f"fake backend {self.name} is down")
        if failure is not None:
            raise failure

    def _work(self, target: Target) -> None:
        """Spend step_time on `target`, tracking how many targets are worked on at once."""
        if not self.step_time:
            return
        part = target.partition or ""
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            count = self._partition_in_flight.get(part, 0) + 1
            self._partition_in_flight[part] = count
            best = self.max_in_flight_by_partition.get(part, 0)
            self.max_in_flight_by_partition[part] = max(best, count)
        try:
            self.sleep(self.step_time)
        finally:
            with self._lock:
                self.in_flight -= 1
                self._partition_in_flight[part] -= 1

    def ping(self) -> None:
        self._enter("ping", None)

    def discover(self, select: BaseModel) -> Sequence[Target]:
        self._enter("discover", None)
        # Any selector with `labels` and `names` works, so configs written for Docker do too.
        labels: dict[str, str] = getattr(select, "labels", {})
        names: list[str] = getattr(select, "names", [])
        found = []
        for item in sorted(self.targets.values(), key=lambda t: t.name):
            if any(item.labels.get(k) != v for k, v in labels.items()):
                continue
            if names and not any(fnmatch.fnmatch(item.name, p) for p in names):
                continue
            found.append(
                Target(
                    id=item.name,
                    name=item.name,
                    kind="fake",
                    labels=dict(item.labels),
                    depends_on=item.depends_on,
                    partition=item.partition,
                )
            )
        return found

    def check_update(
        self, target: Target, pins: Mapping[str, str], patch: PatchModel | None = None
    ) -> Update | None:
        self._enter("check_update", target)
        item = self.targets[target.id]
        if not item.running:  # as a stopped container or a powered-off VM
            raise NotRunning(f"{item.name} is stopped: patchd patches running targets only")
        wanted = pins.get(item.ref, self.latest.get(item.ref, item.version))
        if wanted == item.version:
            return None
        return Update(ref=item.ref, current=item.version, available=wanted)

    def describe(self, target: Target) -> Mapping[str, str]:
        item = self.targets[target.id]
        return {"name": item.name, "version": item.version, "ref": item.ref}

    def plan_snapshot(self, target: Target, run_id: str) -> Snapshot:
        return Snapshot(target.id, {"name": f"patchd-{run_id}"})

    def snapshot(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Snapshot:
        self._enter("snapshot", target)
        item = self.targets[target.id]
        with self._lock:
            item.snapshots[snapshot.data["name"]] = item.version
        return Snapshot(target.id, {**snapshot.data, "version": item.version})

    def apply(
        self, target: Target, update: Update, snapshot: Snapshot, patch: PatchModel | None = None
    ) -> None:
        self._enter("apply", target)
        self._work(target)
        self.targets[target.id].version = update.available

    def verify(self, target: Target, update: Update, health: HealthModel) -> None:
        self._enter("verify", target)
        item = self.targets[target.id]
        if item.version in self.unhealthy or not item.running:
            raise StepFailed(f"{item.name} is unhealthy on {item.version}")

    def commit(self, target: Target, snapshot: Snapshot, options: SnapshotModel) -> Retained | None:
        self._enter("commit", target)
        item = self.targets[target.id]
        name = snapshot.data["name"]
        if options.keep:
            return Retained({"target": target.id, "snapshot": name}, options.keep, name)
        with self._lock:
            item.snapshots.pop(name, None)
        return None

    def release(self, retained: Mapping[str, Any]) -> None:
        self._enter("release", None)
        item = self.targets.get(retained["target"])
        if item is not None:
            with self._lock:
                item.snapshots.pop(retained["snapshot"], None)
        self.released.append(retained)

    def rollback(self, target: Target, snapshot: Snapshot) -> None:
        try:
            self._enter("rollback", target)
        except (StepFailed, TransientError) as err:
            raise RollbackFailed(str(err)) from err
        item = self.targets[target.id]
        name = snapshot.data["name"]
        with self._lock:
            if name in item.snapshots:
                item.version = item.snapshots.pop(name)
        item.running = True

    def close(self) -> None:
        self.calls.append(("close", ""))
