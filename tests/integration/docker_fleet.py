"""Images, registry repositories and containers for the Docker backend's integration tests.

Images are made from the lab's busybox image by committing one container with a full
Config (`commit(conf=...)`): on vfs every Dockerfile step costs about a second, while
commits run in parallel, so all variants are ready in about one second. Every variant
carries its own ENV, LABEL, CMD, WORKDIR, EXPOSE (and HEALTHCHECK for `app`), so a test
can tell the values a container inherited from its image from those its creator set.

Each test gets a `Fleet` with a unique token: its registry repositories, containers,
networks and volumes are named after it and removed afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import docker

from patchd.backends.docker import DockerBackend, DockerConfig, DockerSelect
from patchd.backends.docker_recreate import parse_ref, repo_digests
from patchd.config.schema import HealthModel
from tests.conftest import wait_until

TEST_LABEL = "patchd.test"
SECOND = 10**9
LOCAL = "patchd-test/img"  # local repository of the built variants: LOCAL:<variant>

# A probe's timeout is a limit for a loaded machine (one that took 2 s made a healthy
# container unhealthy). Healthy variants have a start period: a probe that runs before
# the command created /tmp/ok does not count; the broken one fails from its first probe.
_HEALTH = {"Interval": SECOND, "Timeout": 30 * SECOND, "Retries": 1}
_START_PERIOD = {"StartPeriod": 120 * SECOND}


def _app(version: int, healthy: bool = True) -> dict[str, Any]:
    """An app with a HEALTHCHECK; broken = its healthcheck never passes, whatever runs."""
    ready = "touch /tmp/ok; " if healthy else ""
    check = f"test -f /tmp/ok && echo v{version}" if healthy else "echo broken; exit 1"
    return {
        "Env": [f"APP_VERSION={version}", f"APP_COLOR=color{version}"],
        "Labels": {"app.version": str(version), "app.kind": "demo"},
        "Cmd": ["sh", "-c", f"echo {version} > /tmp/version; {ready}exec sleep 86400"],
        "WorkingDir": f"/srv/v{version}",
        "ExposedPorts": {f"80{version:02d}/tcp": {}},
        "Healthcheck": {
            "Test": ["CMD-SHELL", check],
            **_HEALTH,
            **(_START_PERIOD if healthy else {}),
        },
        "StopSignal": "SIGTERM",
    }


def _plain(version: int, healthy: bool = True) -> dict[str, Any]:
    """No HEALTHCHECK; broken = it exits shortly after starting."""
    run = "exec sleep 86400" if healthy else "sleep 0.3; exit 3"
    return {
        "Env": [f"PLAIN_VERSION={version}"],
        "Labels": {"plain.version": str(version)},
        "Cmd": ["sh", "-c", f"echo {version} > /tmp/version; {run}"],
        "WorkingDir": f"/opt/v{version}",
    }


VARIANTS: Mapping[str, dict[str, Any]] = {
    "app-v1": _app(1),
    "app-v2": _app(2),
    "app-v2-broken": _app(2, healthy=False),
    "app-v3": _app(3),
    "vol-v1": {**_app(1), "Volumes": {"/state": {}}},
    "vol-v2": {**_app(2), "Volumes": {"/state": {}}},
    "plain-v1": _plain(1),
    "plain-v2": _plain(2),
    "plain-v2-broken": _plain(2, healthy=False),
}


def build_images(client: docker.DockerClient, base_image: str) -> dict[str, str]:
    """Commit every variant (once per engine); variant -> image id."""
    return build_variants(client, base_image, dict(VARIANTS))


def build_variants(
    client: docker.DockerClient, base_image: str, variants: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Commit each variant's Config as `LOCAL:<name>`; name -> image id."""
    seed = client.api.create_container(base_image, command=["true"])["Id"]
    try:

        def commit(name: str) -> tuple[str, str]:
            conf = dict(variants[name])
            result = client.api.commit(seed, LOCAL, name, conf=conf, pause=False)
            return name, str(result["Id"])

        with ThreadPoolExecutor(max_workers=max(1, len(variants))) as pool:
            return dict(pool.map(commit, variants))
    finally:
        client.api.remove_container(seed, force=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """One test's repositories, containers, networks and volumes, named after `token`."""

    def __init__(
        self, client: docker.DockerClient, registry: str, docker_host: str, images: dict[str, str]
    ) -> None:
        self.client = client
        self.registry = registry
        self.docker_host = docker_host
        self.images = images
        self.token = f"t{uuid.uuid4().hex[:8]}"
        self.health = HealthModel(timeout=timedelta(seconds=120), stable_for=timedelta(seconds=1))

    # --- names --------------------------------------------------------------------------

    def name(self, short: str) -> str:
        return f"{self.token}-{short}"

    def repo(self, short: str) -> str:
        return f"{self.registry}/{self.token}-{short}"

    def ref(self, short: str, tag: str = "stable") -> str:
        return f"{self.repo(short)}:{tag}"

    @property
    def labels(self) -> dict[str, str]:
        return {TEST_LABEL: self.token}

    def select(self, **kw: Any) -> DockerSelect:
        return DockerSelect(labels={TEST_LABEL: self.token, **kw.pop("labels", {})}, **kw)

    def backend(self, **config: Any) -> DockerBackend:
        settings: dict[str, Any] = {"url": self.docker_host, "timeout": "30s"}
        settings.update(rollback_timeout="20s", **config)
        return DockerBackend("lab", DockerConfig.model_validate(settings))

    # --- registry -----------------------------------------------------------------------

    def publish(self, image: str, repo: str, tag: str = "stable") -> str:
        """Push a variant (or an image id) as repo:tag; returns the registry's digest.

        As if pushed from elsewhere (a CI): the engine's own tag is left as it was.
        """
        api = self.client.api
        source = self.images.get(image, image)
        ref = self.ref(repo, tag)
        try:
            previous: str | None = api.inspect_image(ref)["Id"]
        except docker.errors.ImageNotFound:
            previous = None
        api.tag(source, self.repo(repo), tag)
        digest = None
        try:
            for event in api.push(self.repo(repo), tag=tag, stream=True, decode=True):
                if "error" in event:
                    raise RuntimeError(f"push of {ref} failed: {event['error']}")
                digest = (event.get("aux") or {}).get("Digest", digest)
        finally:
            if previous is not None:
                api.tag(previous, self.repo(repo), tag)
            else:
                api.remove_image(ref)  # only untags: `source` has another tag or an id
        assert digest is not None, f"push of {ref} reported no digest"
        return str(digest)

    # --- containers ---------------------------------------------------------------------

    def run(self, short: str, repo: str, *, start: bool = True, **kwargs: Any) -> Any:
        """Create (and start) a container from repo:stable, with init for fast stops."""
        kwargs.setdefault("init", True)
        kwargs["labels"] = {**self.labels, **kwargs.get("labels", {})}
        self.pull(repo)
        container = self.client.containers.create(self.ref(repo), name=self.name(short), **kwargs)
        if start:
            container.start()
        return container

    def pull(self, repo: str) -> None:
        """Pull repo:stable unless the engine has it (as `docker run` does)."""
        try:
            self.client.api.inspect_image(self.ref(repo))
        except docker.errors.ImageNotFound:
            self.client.api.pull(self.repo(repo), tag="stable")

    def network(self, short: str) -> Any:
        return self.client.networks.create(self.name(short), driver="bridge", labels=self.labels)

    def volume(self, short: str) -> Any:
        return self.client.volumes.create(self.name(short), labels=self.labels)

    def inspect(self, name: str) -> dict[str, Any]:
        return dict(self.client.api.inspect_container(name))

    def exists(self, name: str) -> bool:
        try:
            self.client.api.inspect_container(name)
        except docker.errors.NotFound:
            return False
        return True

    def exec(self, name: str, *cmd: str) -> str:
        code, output = self.client.containers.get(name).exec_run(list(cmd))
        assert code == 0, f"{cmd} in {name} exited {code}: {output!r}"
        return str(output.decode())

    def digest_of(self, name: str) -> str:
        """The registry digest of the image the named container runs."""
        attrs = self.inspect(name)
        image = self.client.api.inspect_image(attrs["Image"])
        found = repo_digests(image, parse_ref(attrs["Config"]["Image"]).repository)
        return found[0] if found else ""

    def is_healthy(self, name: str) -> bool:
        state = self.inspect(name)["State"]
        if not state["Running"] or state["Restarting"]:
            return False
        health = state.get("Health")
        return health is None or health["Status"] == "healthy"

    def wait_healthy(self, *names: str, timeout: float = 180) -> None:
        for name in names:
            wait_until(
                lambda name=name: self.is_healthy(name),
                timeout,
                f"{name} to be healthy",
                give_up=lambda name=name: self._hopeless(name),
            )

    def _hopeless(self, name: str) -> str | None:
        # Not "unhealthy": a later probe that passes makes it healthy again.
        state = self.inspect(name)["State"]
        if not (state["Running"] or state["Restarting"]):
            return f"{name} is {state['Status']}: {state}"
        return None

    def leftovers(self) -> list[str]:
        """Containers of this fleet patchd renamed as snapshots."""
        found = self.client.api.containers(all=True, filters={"name": ".patchd-"})
        return sorted(
            n.lstrip("/") for c in found for n in c["Names"] if n.lstrip("/").startswith(self.token)
        )

    def cleanup(self) -> None:
        api = self.client.api
        used: set[str] = set()
        for c in api.containers(all=True, filters={"name": self.token}):
            used |= {m["Name"] for m in c.get("Mounts") or [] if m.get("Type") == "volume"}
            api.remove_container(c["Id"], force=True, v=True)
        # Anonymous volumes a patch handed over as explicit mounts outlive remove(v=True).
        for name in used:
            with contextlib.suppress(docker.errors.APIError):  # gone, or named and shared
                api.remove_volume(name)
        for n in api.networks(filters={"label": f"{TEST_LABEL}={self.token}"}):
            api.remove_network(n["Id"])
        for v in (api.volumes(filters={"label": f"{TEST_LABEL}={self.token}"}) or {}).get(
            "Volumes"
        ) or []:
            api.remove_volume(v["Name"], force=True)


@contextmanager
def fleet(
    client: docker.DockerClient, registry: str, docker_host: str, images: dict[str, str]
) -> Iterator[Fleet]:
    f = Fleet(client, registry, docker_host, images)
    try:
        yield f
    finally:
        f.cleanup()
