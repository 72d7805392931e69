"""The Docker backend passes the backend contract suite against the lab's real engine."""

from __future__ import annotations

from collections.abc import Iterator

import docker
import pytest
from pydantic import BaseModel

from patchd.backends.docker import DockerBackend
from patchd.config.schema import PatchModel
from patchd.testing.contract import BackendContract
from tests.integration.conftest import Lab
from tests.integration.docker_fleet import Fleet, fleet


class DockerHarness:
    """A fleet of `app` containers on one registry repository of the lab."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.backend: DockerBackend = fleet.backend()
        self.health = fleet.health
        self.patch = PatchModel()  # Docker patches by image; the group's patch is unused

    def create_fleet(self, count: int) -> list[str]:
        self.fleet.publish("app-v1", "app")
        names = [self.fleet.run(f"c{i}", "app").name for i in range(count)]
        self.fleet.run("other", "app")  # same image and label, but not in select()'s names
        return names

    def select(self) -> BaseModel:
        return self.fleet.select(names=[f"{self.fleet.token}-c*"])

    def publish(self, healthy: bool) -> str:
        return self.fleet.publish("app-v2" if healthy else "app-v2-broken", "app")

    def version_of(self, name: str) -> str:
        return self.fleet.digest_of(name)

    def is_healthy(self, name: str) -> bool:
        return self.fleet.is_healthy(name)

    def leftovers(self) -> list[str]:
        return self.fleet.leftovers()


class TestDockerContract(BackendContract):
    @pytest.fixture
    def harness(
        self, lab: Lab, docker_client: docker.DockerClient, images: dict[str, str]
    ) -> Iterator[DockerHarness]:
        with fleet(docker_client, lab.registry, lab.docker_host, images) as f:
            harness = DockerHarness(f)
            yield harness
            harness.backend.close()
