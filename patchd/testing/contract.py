"""The backend contract as a pytest suite that any backend is run through.

Shipped so that a third-party backend runs the same suite as patchd's own: subclass
`BackendContract` in a test module and provide a `harness` fixture (see `Harness`): an
object that builds a small fleet on the backend's real engine (or FakeBackend), publishes
healthy or broken updates, and reads the targets' real state back. Every test asserts on
that real state. Needs pytest (patchd's `test` extra), which only this module imports.

    from patchd.testing.contract import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def harness(self) -> MyHarness:
            return MyHarness()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pytest
from pydantic import BaseModel

from patchd.backends.base import Backend, Snapshot, StepFailed, Target, Update
from patchd.config.schema import HealthModel, PatchModel, SnapshotModel

RUN = "contract1"


class Harness(Protocol):
    backend: Backend
    health: HealthModel
    patch: PatchModel

    def create_fleet(self, count: int) -> list[str]:
        """Start `count` targets on version 1, healthy; return their names."""

    def select(self) -> BaseModel:
        """A selector matching exactly the fleet made by create_fleet."""

    def publish(self, healthy: bool) -> str:
        """Make version 2 available (healthy or not); return its version string."""

    def version_of(self, name: str) -> str:
        """The version the named target runs now, read from the real system."""

    def is_healthy(self, name: str) -> bool:
        """Whether the named target runs and is healthy, read from the real system."""

    def leftovers(self) -> list[str]:
        """Snapshots or kept copies patchd left behind (empty after commit/rollback)."""


def _by_name(targets: Sequence[Target], name: str) -> Target:
    return next(t for t in targets if t.name == name)


class BackendContract:
    """Tests every backend must pass. Needs a `harness` fixture."""

    def test_ping(self, harness: Harness) -> None:
        harness.backend.ping()

    def test_discover_finds_exactly_the_fleet(self, harness: Harness) -> None:
        names = harness.create_fleet(3)
        found = harness.backend.discover(harness.select())
        assert sorted(t.name for t in found) == sorted(names)
        assert [t.name for t in found] == [
            t.name for t in harness.backend.discover(harness.select())
        ]
        assert len({t.id for t in found}) == 3

    def test_check_update_has_no_side_effects(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        target = _by_name(harness.backend.discover(harness.select()), name)
        before = harness.version_of(name)
        assert harness.backend.check_update(target, {}, harness.patch) is None
        new_version = harness.publish(healthy=True)
        update = harness.backend.check_update(target, {}, harness.patch)
        assert update is not None
        assert update.current == before
        assert update.available == new_version
        assert harness.version_of(name) == before
        # Pinned to the running version: nothing to do.
        assert harness.backend.check_update(target, {update.ref: before}, harness.patch) is None
        facts = harness.backend.describe(target)
        assert facts["name"] == name
        assert all(isinstance(v, str) for v in facts.values())

    def test_plan_snapshot_is_pure_and_stable(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        target = _by_name(harness.backend.discover(harness.select()), name)
        first = harness.backend.plan_snapshot(target, RUN)
        assert first == harness.backend.plan_snapshot(target, RUN)
        assert harness.leftovers() == []

    def _patch(self, harness: Harness, name: str) -> tuple[Target, Snapshot]:
        backend = harness.backend
        target = _by_name(backend.discover(harness.select()), name)
        update = backend.check_update(target, {}, harness.patch)
        assert update is not None
        snap = backend.snapshot(target, backend.plan_snapshot(target, RUN), SnapshotModel())
        backend.apply(target, update, snap, harness.patch)
        return target, snap

    def test_patch_verify_commit(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        new_version = harness.publish(healthy=True)
        target, snap = self._patch(harness, name)
        update = harness.backend.check_update(target, {}, harness.patch)
        harness.backend.verify(target, update or _current(harness, target), harness.health)
        harness.backend.commit(target, snap, SnapshotModel())
        assert harness.version_of(name) == new_version
        assert harness.is_healthy(name)
        assert harness.leftovers() == []

    def test_broken_update_fails_verify_and_rolls_back(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        before = harness.version_of(name)
        harness.publish(healthy=False)
        target, snap = self._patch(harness, name)
        with pytest.raises(StepFailed):
            harness.backend.verify(target, _current(harness, target), harness.health)
        harness.backend.rollback(target, snap)
        assert harness.version_of(name) == before
        assert harness.is_healthy(name)
        assert harness.leftovers() == []
        harness.backend.rollback(target, snap)  # idempotent
        assert harness.version_of(name) == before
        assert harness.is_healthy(name)

    def test_rollback_after_snapshot_only(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        before = harness.version_of(name)
        harness.publish(healthy=True)
        backend = harness.backend
        target = _by_name(backend.discover(harness.select()), name)
        snap = backend.snapshot(target, backend.plan_snapshot(target, RUN), SnapshotModel())
        backend.rollback(target, snap)
        assert harness.version_of(name) == before
        assert harness.is_healthy(name)
        assert harness.leftovers() == []

    def test_rollback_of_a_planned_snapshot_never_taken(self, harness: Harness) -> None:
        [name] = harness.create_fleet(1)
        before = harness.version_of(name)
        backend = harness.backend
        target = _by_name(backend.discover(harness.select()), name)
        backend.rollback(target, backend.plan_snapshot(target, RUN))
        assert harness.version_of(name) == before
        assert harness.is_healthy(name)
        assert harness.leftovers() == []


def _current(harness: Harness, target: Target) -> Update:
    """Verify's `update` argument when check_update no longer reports one."""
    version = harness.version_of(target.name)
    return Update(ref="", current=version, available=version)
