"""Fixtures for the integration tests: the local test bed of tests/lab/lab.sh.

The bed (a private dockerd, a registry, vcsim) is described by ``$PATCHD_LAB_DIR/lab.env``
(default ``/tmp/patchd-lab``). When that file is missing or a service does not answer,
the ``lab`` fixture runs ``tests/lab/lab.sh up`` itself, so ``pytest tests/integration``
works on its own. A bed that cannot start FAILS the tests; it never skips them.

If this session started the bed from nothing, it stops it again at the end
(``lab.sh down``) unless ``PATCHD_LAB_KEEP=1``. A bed that was already up (``make test``
runs ``lab.sh up`` first) is left running.
"""

from __future__ import annotations

import dataclasses
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
import pytest
import requests
from pyVim.connect import Disconnect, SmartConnect

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
LAB_SH = REPO_ROOT / "tests" / "lab" / "lab.sh"
DEFAULT_LAB_DIR = "/tmp/patchd-lab"
LAB_UP_TIMEOUT = 900  # a fresh machine installs the Debian packages and builds vcsim first
LAB_DOWN_TIMEOUT = 120
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


def _lab_dir() -> Path:
    return Path(os.environ.get("PATCHD_LAB_DIR") or DEFAULT_LAB_DIR).absolute()


def _parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if sep:
                values[key] = value
    return values


def _load_lab(env_file: Path) -> Lab:
    env = _parse_env_file(env_file)
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
        raise ValueError(f"{env_file} lacks {e.args[0]}") from None


def _problems(lab: Lab) -> list[str]:
    """What does not answer, in words; empty when the whole bed answers."""
    problems: list[str] = []
    try:
        client = docker.DockerClient(base_url=lab.docker_host, timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        problems.append(f"dockerd at {lab.docker_host}: {e!r}")
    try:
        r = requests.get(f"http://{lab.registry}/v2/", timeout=5)
        if r.status_code != 200:
            problems.append(f"registry at {lab.registry}: /v2/ answered {r.status_code}")
    except requests.RequestException as e:
        problems.append(f"registry at {lab.registry}: {e!r}")
    try:
        r = requests.get(f"http://{lab.vcsim_host}:{lab.vcsim_port}/about", timeout=5)
        if r.status_code != 200:
            problems.append(f"vcsim at {lab.vcsim_url}: /about answered {r.status_code}")
    except requests.RequestException as e:
        problems.append(f"vcsim at {lab.vcsim_url}: {e!r}")
    return problems


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run_lab(command: str, lab_dir: Path, timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PATCHD_LAB_DIR=str(lab_dir))
    try:
        proc = subprocess.run(
            ["bash", str(LAB_SH), command],
            env=env,
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.output if isinstance(e.output, str) else (e.output or b"").decode(errors="replace")
        return -1, f"{out}\n(lab.sh {command} timed out after {timeout}s)"
    return proc.returncode, proc.stdout


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The running test bed, started by ``tests/lab/lab.sh up`` when needed."""
    lab_dir = _lab_dir()
    env_file = lab_dir / "lab.env"
    was_down = not env_file.is_file()
    reason = f"{env_file} missing" if was_down else ""
    if not reason:
        try:
            problems = _problems(_load_lab(env_file))
            reason = "; ".join(problems)
        except (OSError, ValueError) as e:
            reason = f"{env_file} unreadable: {e}"

    if reason:
        started = time.monotonic()
        rc, out = _run_lab("up", lab_dir, LAB_UP_TIMEOUT)
        if rc != 0:
            if was_down:
                _run_lab("down", lab_dir, LAB_DOWN_TIMEOUT)
            pytest.fail(
                f"test bed could not start ({reason}): `{LAB_SH} up` exited {rc} after "
                f"{time.monotonic() - started:.0f}s; its output ends with:\n{_tail(out)}",
                pytrace=False,
            )
        try:
            the_lab = _load_lab(env_file)
            problems = _problems(the_lab)
        except (OSError, ValueError) as e:
            problems = [f"{env_file} unreadable after up: {e}"]
        if problems:
            pytest.fail(
                "test bed started but does not answer: "
                + "; ".join(problems)
                + f"\n`lab.sh up` output ends with:\n{_tail(out)}",
                pytrace=False,
            )
    else:
        the_lab = _load_lab(env_file)

    yield the_lab

    stop = (
        reason
        and was_down
        and os.environ.get("PATCHD_LAB_KEEP", "") in ("", "0")
        and not os.environ.get("PYTEST_XDIST_WORKER")  # other workers may still use it
    )
    if stop:
        rc, out = _run_lab("down", lab_dir, LAB_DOWN_TIMEOUT)
        if rc != 0:
            pytest.fail(f"`{LAB_SH} down` exited {rc}:\n{_tail(out)}", pytrace=False)


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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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

    def start(*args: str, listen: str = "127.0.0.1:0", timeout: float = 60) -> VcsimProcess:
        work = tmp_path_factory.mktemp("vcsim")
        log = work / "vcsim.log"
        (work / "tmp").mkdir()
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [str(lab.vcsim_bin), "-listen", listen, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=dict(os.environ, TMPDIR=str(work / "tmp")),
            )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
            if not ready:
                proc.kill()
                proc.wait()
                pytest.fail(f"vcsim {args} printed no URL in {timeout}s:\n{log.read_text()}")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait()
                pytest.fail(f"vcsim {args} exited {proc.returncode}:\n{log.read_text()}")
            line += chunk
        url = line.decode().strip()
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        vc = VcsimProcess(proc, url, parts.hostname, parts.port, parts.scheme, log)
        started.append(vc)
        return vc

    yield start

    failures = []
    for vc in started:
        rc = vc.stop()
        if vc.proc.stdout is not None:
            vc.proc.stdout.close()
        if rc != 0:
            failures.append(f"{vc.url}: exit {rc}\n{_tail(vc.log.read_text(), 20)}")
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
