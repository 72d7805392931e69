"""Fixtures for the integration tests: the local test bed of tests/lab/lab.sh.

The bed (a private dockerd, a registry, vcsim) is described by ``$PATCHD_LAB_DIR/lab.env``
(default ``/tmp/patchd-lab``). When that file is missing or ``lab.sh status`` says a
service does not answer, the ``lab`` fixture runs ``tests/lab/lab.sh up`` itself (through
tests/lab/bed.py, which the benchmarks use too), so ``pytest tests/integration`` works on
its own. A bed that cannot start FAILS the tests; it never skips them.

If this session started the bed, it stops it again at the end
(``lab.sh down``) unless ``PATCHD_LAB_KEEP=1``. A bed that was already up (``make test``
runs ``lab.sh up`` first), even in part (another session's services, which ``lab.sh up``
reuses), is left running.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
from pyVim.connect import Disconnect, SmartConnect

from tests.lab import bed
from tests.pglab import pg, pg_url  # noqa: F401  (the PostgreSQL fixtures, for the HA daemons)

HERE = Path(__file__).resolve().parent
REPO_ROOT = bed.REPO_ROOT
LAB_SH = bed.LAB_SH
DEFAULT_LAB_DIR = "/tmp/patchd-lab"
VCSIM_USER = "user"
VCSIM_PASSWORD = "pass"


@dataclasses.dataclass(frozen=True)
class Lab:
    """Addresses of the running test bed (the values of lab.env)."""

    lab_dir: Path
    docker_host: str  # unix:///…/d.sock (the private engine, never the system one)
    registry: str  # 127.0.0.1:PORT, plain HTTP, no auth, delete enabled
    vcsim_url: str  # http://127.0.0.1:PORT/sdk
    vcsim_host: str
    vcsim_port: int
    vcsim_bin: Path  # the built simulator, to start extra ones (see vcsim_factory)
    base_image: str  # patchd-lab/busybox:latest, present in the private engine
    vcsim_user: str = VCSIM_USER
    vcsim_password: str = VCSIM_PASSWORD


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration (and only those) as ``integration``."""
    for item in items:
        path = Path(str(item.path)).resolve()
        if path == HERE or HERE in path.parents:
            item.add_marker(pytest.mark.integration)


# --- the bed -----------------------------------------------------------------------


def _load_lab(env: dict[str, str], env_file: Path) -> Lab:
    try:
        return Lab(
            lab_dir=Path(env["PATCHD_LAB_DIR"]),
            docker_host=env["PATCHD_LAB_DOCKER_HOST"],
            registry=env["PATCHD_LAB_REGISTRY"],
            vcsim_url=env["PATCHD_LAB_VCSIM_URL"],
            vcsim_host=env["PATCHD_LAB_VCSIM_HOST"],
            vcsim_port=int(env["PATCHD_LAB_VCSIM_PORT"]),
            vcsim_bin=Path(env["PATCHD_LAB_VCSIM_BIN"]),
            base_image=env["PATCHD_LAB_BASE_IMAGE"],
            vcsim_user=env.get("PATCHD_LAB_VCSIM_USER", VCSIM_USER),
            vcsim_password=env.get("PATCHD_LAB_VCSIM_PASSWORD", VCSIM_PASSWORD),
        )
    except KeyError as e:
        raise bed.BedError(f"{env_file} lacks {e.args[0]}") from None


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The running test bed, started by ``tests/lab/lab.sh up`` when needed."""
    directory = bed.lab_dir("PATCHD_LAB_DIR", default=DEFAULT_LAB_DIR)
    keep = (
        os.environ.get("PATCHD_LAB_KEEP", "") not in ("", "0")
        or bool(os.environ.get("PYTEST_XDIST_WORKER"))  # other workers may still use it
    )
    try:
        with bed.running(directory, keep=keep) as env:
            yield _load_lab(env, directory / "lab.env")
    except bed.BedError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def docker_client(lab: Lab) -> Iterator[docker.DockerClient]:
    """Docker SDK client of the lab's private engine."""
    client = docker.DockerClient(base_url=lab.docker_host, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def vcsim_si(lab: Lab) -> Iterator[object]:
    """A pyVmomi ServiceInstance logged in to the lab's vcsim (plain HTTP)."""
    si = SmartConnect(
        host=lab.vcsim_host,
        port=lab.vcsim_port,
        user=lab.vcsim_user,
        pwd=lab.vcsim_password,
        protocol="http",
    )
    yield si
    Disconnect(si)


# --- extra simulators --------------------------------------------------------------


@dataclasses.dataclass
class VcsimProcess:
    """A vcsim started by a test (see vcsim_factory)."""

    proc: subprocess.Popen[bytes]
    url: str  # as printed by vcsim: scheme://user:pass@host:port/sdk
    host: str
    port: int
    scheme: str
    log: Path  # its stderr (and the SOAP trace with -trace)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL after timeout: -9)."""
        return bed.stop_vcsim(self.proc, timeout)


@pytest.fixture
def vcsim_factory(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., VcsimProcess]]:
    """Start extra simulators from the lab's vcsim binary: ``start("-vm", "100")``.

    Flags: -dc -cluster -host (per cluster) -standalone-host -vm (per cluster root pool
    and per standalone host) -pool -ds -autostart -listen (default 127.0.0.1:0, any free
    port) -tls-cert/-tls-key -trace [-trace-file]. Each is stopped at teardown and must
    exit 0 on SIGTERM.
    """
    started: list[VcsimProcess] = []

    def start(*args: str, listen: str = "127.0.0.1:0", timeout: float = 300) -> VcsimProcess:
        work = tmp_path_factory.mktemp("vcsim")
        try:
            proc, url = bed.start_vcsim(
                lab.vcsim_bin, *args, workdir=work, listen=listen, timeout=timeout
            )
        except bed.BedError as e:
            pytest.fail(str(e))
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        vc = VcsimProcess(proc, url, parts.hostname, parts.port, parts.scheme, work / "vcsim.log")
        started.append(vc)
        return vc

    yield start

    failures = []
    for vc in started:
        rc = vc.stop()
        if rc != 0:
            failures.append(f"{vc.url}: exit {rc}\n{bed.tail(vc.log.read_text(), 20)}")
    if failures:
        pytest.fail("vcsim did not stop cleanly:\n" + "\n".join(failures), pytrace=False)


# --- Docker fleets shared by the Docker tests ---------------------------------------------


@pytest.fixture(scope="session")
def images(lab: Lab, docker_client: docker.DockerClient) -> dict[str, str]:
    """The test image variants (tests/integration/docker_fleet.py), built once a session."""
    from tests.integration.docker_fleet import build_images

    return build_images(docker_client, lab.base_image)


@pytest.fixture
def f(lab: Lab, docker_client: docker.DockerClient, images: dict[str, str]) -> Iterator[Any]:
    """A Fleet: this test's registry repositories, containers, networks and volumes."""
    from tests.integration.docker_fleet import fleet

    with fleet(docker_client, lab.registry, lab.docker_host, images) as the_fleet:
        yield the_fleet
