"""FakeBackend passes the backend contract suite (so the suite itself is exercised fast)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from patchd.config.schema import HealthModel, PatchModel
from patchd.testing import FakeBackend, FakeSelect
from patchd.testing.contract import BackendContract


class FakeHarness:
    def __init__(self) -> None:
        self.backend = FakeBackend()
        self.fake = self.backend
        self.health = HealthModel()
        self.patch = PatchModel()

    def create_fleet(self, count: int) -> list[str]:
        names = [f"t{i}" for i in range(count)]
        for name in names:
            self.fake.add(name, labels={"fleet": "contract"})
        self.fake.add("other")  # must never be selected
        return names

    def select(self) -> BaseModel:
        return FakeSelect(labels={"fleet": "contract"})

    def publish(self, healthy: bool) -> str:
        self.fake.publish("app", "v2")
        if not healthy:
            self.fake.unhealthy.add("v2")
        return "v2"

    def version_of(self, name: str) -> str:
        return self.fake.targets[name].version

    def is_healthy(self, name: str) -> bool:
        target = self.fake.targets[name]
        return target.running and target.version not in self.fake.unhealthy

    def leftovers(self) -> list[str]:
        return [f"{t.name}:{s}" for t in self.fake.targets.values() for s in t.snapshots]


class TestFakeBackendContract(BackendContract):
    @pytest.fixture
    def harness(self) -> FakeHarness:
        return FakeHarness()
