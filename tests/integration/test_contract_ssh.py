"""The ssh backend passes the backend contract suite on the lab's real Debian machines.

A target's "version" here is the identity of the versions of the harness's package (a
service that is healthy in 1.0 and 2.0, or broken in 2.0-broken), read from dpkg."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import BaseModel

from patchd.backends.ssh import SSHBackend, SSHSelect
from patchd.config.schema import HealthModel, PatchModel
from patchd.testing.contract import BackendContract
from tests.integration.guest_bed import HEALTH_TIMEOUT, Bed, bed, machines, versions_id

__all__ = ["bed", "machines"]  # fixtures


class SSHHarness:
    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.package = f"lab-contract-{bed.token()}"
        self.backend: SSHBackend = bed.backend()
        self.health = HealthModel(timeout=HEALTH_TIMEOUT)
        self.patch = PatchModel()
        self.names: list[str] = []

    def create_fleet(self, count: int) -> list[str]:
        self.names = self.bed.names[:count]
        self.bed.repo.service(self.package, "1.0")
        self.bed.install(self.names, {self.package: "1.0"})
        return list(self.names)

    def select(self) -> BaseModel:
        return SSHSelect(names=self.names)

    def publish(self, healthy: bool) -> str:
        version = "2.0" if healthy else "2.0-broken"
        self.bed.repo.service(self.package, version, healthy=healthy)
        return versions_id({self.package: version})

    def version_of(self, name: str) -> str:
        return versions_id({self.package: self.bed.installed(name, self.package)})

    def is_healthy(self, name: str) -> bool:
        return self.bed.wait_running(name) == "running"

    def leftovers(self) -> list[str]:
        # No snapshot exists to leave behind; what could be left is a package dpkg did
        # not finish installing.
        return [f"{n}: {audit}" for n in self.names if (audit := self.bed.audit(n))]


class TestSSHContract(BackendContract):
    @pytest.fixture
    def harness(self, bed: Bed) -> Iterator[SSHHarness]:
        harness = SSHHarness(bed)
        yield harness
        harness.backend.close()
