"""The vSphere backend passes the backend contract suite against a real vcsim.

Each test gets its own simulator with four VMs. The fleet is the VMs carrying the custom
attribute `fleet = contract`; their "version" is the patch level patchd records in
`patchd.patch_version` (v1 to start with). A healthy v2 is a patch.command that succeeds;
a broken v2 is one that leaves the guest powered off (a patch after which it does not come
back): verify fails, and the rollback must revert and power it on again. Health is the
backend's own signal: powered on, VMware Tools running, heartbeat green (set on the
simulator through `SET.*` extraConfig).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from patchd.backends.vsphere import VSphereSelect
from patchd.config.schema import HealthModel, PatchModel
from patchd.testing.contract import BackendContract
from tests.integration.conftest import VcsimProcess
from tests.integration.vsphere_lab import Sim, WithPatch, fleet, start, tool

HEALTHY = [sys.executable, "-c", "import sys; print('patched', sys.argv[1])", "{name}"]


class VSphereHarness:
    def __init__(self, sim: Sim, tmp_path: Path) -> None:
        self.sim = sim
        self.health = HealthModel(timeout="120s", stable_for="0s")  # a limit, never waited
        self.patch = PatchModel(command=HEALTHY, version="v1")
        self.real = sim.backend(tmp_path, rollback_timeout="5s")
        self.backend = WithPatch(self.real, lambda: self.patch)

    def create_fleet(self, count: int) -> list[str]:
        names = list(self.sim.vms())
        chosen, others = names[:count], names[count:]
        fleet(self.sim, chosen, "v1", fleet="contract")
        fleet(self.sim, others, "v1", fleet="other")  # same state, never selected
        return chosen

    def select(self) -> BaseModel:
        return VSphereSelect(custom_attribute={"fleet": "contract"})

    def publish(self, healthy: bool) -> str:
        url = self.sim.process.url
        command = HEALTHY if healthy else tool("power-off", url, "{moid}")
        self.patch = PatchModel(command=command, version="v2")
        return "v2"

    def version_of(self, name: str) -> str:
        return self.sim.attr(self.sim.vm(name), "patchd.patch_version") or ""

    def is_healthy(self, name: str) -> bool:
        return self.sim.healthy(name)

    def leftovers(self) -> list[str]:
        return self.sim.patchd_snapshots()


class TestVSphereContract(BackendContract):
    @pytest.fixture
    def harness(
        self, vcsim_factory: Callable[..., VcsimProcess], tmp_path: Path
    ) -> Iterator[VSphereHarness]:
        sim = start(vcsim_factory, tmp_path, vms=4)
        harness = VSphereHarness(sim, tmp_path)
        yield harness
        harness.real.close()
        sim.close()
