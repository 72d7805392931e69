"""FakeBackend passes the shipped backend contract suite (so the suite itself is exercised
fast), and is usable from a config as `type = "fake"`."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from patchd.backends import connect, installed_types
from patchd.cli import main
from patchd.config import load_settings
from patchd.config.schema import HealthModel, PatchModel
from patchd.testing import FakeBackend, FakeSelect
from patchd.testing.contract import BackendContract
from tests.conftest import write_config


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


def test_type_fake_works_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """FakeBackend is the installed backend type `fake` (an entry point), a testing aid."""
    config = write_config(
        tmp_path / "patchd.toml",
        {
            "windows": {"nightly": {"days": ["mon"], "start": "01:00", "duration": "2h"}},
            "backends": {"lab": {"type": "fake"}},
            "groups": {
                "web": {
                    "backend": "lab",
                    "window": "nightly",
                    "select": {"labels": {"app": "web"}, "names": ["web-*"]},
                }
            },
        },
    )
    assert "fake" in installed_types()
    settings = load_settings(config)
    backend = connect(settings.backends["lab"])
    assert isinstance(backend, FakeBackend) and backend.name == "lab"
    assert settings.groups["web"].select == FakeSelect(labels={"app": "web"}, names=["web-*"])
    assert main(["check-config", "-c", str(config)]) == 0
    assert "1 backend" in capsys.readouterr().out
