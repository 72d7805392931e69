"""One Docker engine as the Docker backend sees it: the lazy SDK client, the mapping of
its errors to the backend contract's, and the reads and waits that several steps share.

The docker SDK has no type hints: its objects stay `Any` inside this module and
`patchd.backends.docker`, and only plain dicts (inspect output) leave them.
"""

from __future__ import annotations

import http.client
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from patchd import acting, poll
from patchd.backends.base import BackendError, StepFailed, TransientError

_POLL = 0.1  # as often as the bench's floor polls (bench/downtime.py)
_SSHCONN = "docker.transport.sshconn"
_import_lock = threading.Lock()


def sdk(url: str | None = None) -> Any:
    """The docker SDK, imported without paramiko unless an ssh:// engine needs it.

    docker-py imports its ssh:// transport, and with it paramiko (about 30 MB resident),
    whenever paramiko is installed, which patchd's own SSH needs: the idle daemon's
    budget (60 MB) would go to an engine transport it does not use. The transport module
    is kept out of the first import and loaded for real when an ssh:// engine connects.
    """
    with _import_lock:
        if "docker" not in sys.modules:
            sys.modules.setdefault(_SSHCONN, None)  # type: ignore[arg-type]
            try:
                import docker
            finally:
                if sys.modules.get(_SSHCONN, False) is None:
                    del sys.modules[_SSHCONN]
        import docker
        import docker.api.client
        import docker.transport

        ssh = url is not None and url.startswith("ssh://")
        if ssh and not hasattr(docker.api.client, "SSHHTTPAdapter"):
            from docker.transport.sshconn import SSHHTTPAdapter

            docker.api.client.SSHHTTPAdapter = SSHHTTPAdapter
            docker.transport.SSHHTTPAdapter = SSHHTTPAdapter
    return docker


def status_code(err: BaseException) -> int | None:
    code = getattr(err, "status_code", None)
    return code if isinstance(code, int) else None


def is_api_error(err: BaseException) -> bool:
    return isinstance(err, sdk().errors.APIError)


def transient(err: BaseException) -> bool:
    """The engine could not be reached, or failed on its side (5xx)."""
    if isinstance(err, TransientError):
        return True
    if is_api_error(err):
        return (status_code(err) or 0) >= 500
    # requests' errors (connection refused, timeouts) are OSErrors; a bare DockerException
    # is what the client raises when it cannot learn the engine's API version.
    return isinstance(err, OSError) or type(err) is sdk().errors.DockerException


def not_found(err: BaseException) -> bool:
    return is_api_error(err) and status_code(err) == 404


def message(err: BaseException, url: str | None = None) -> str:
    """The error in plain words; an engine that cannot be reached is named with a hint
    (the SDK's own text is a nest of reprs: `('Connection aborted.', FileNotFoundError(..`)."""
    unreachable = _unreachable(err)
    if unreachable is not None and url is not None:
        text = next(t for kind, t in _UNREACHABLE.items() if isinstance(unreachable, kind))
        return text.format(url=url)
    explanation = getattr(err, "explanation", None)
    return str(explanation or err) or type(err).__name__


# The socket's errno -> what it means and what to check.
_UNREACHABLE: dict[type[OSError], str] = {
    FileNotFoundError: "cannot reach the Docker engine at {url}: no such socket"
    " — is dockerd running, and is the backend's url right?",
    PermissionError: "cannot reach the Docker engine at {url}: permission denied"
    " — add the service user to the docker group (or give it the socket)",
    ConnectionRefusedError: "cannot reach the Docker engine at {url}: connection refused"
    " — is dockerd running and listening there, and is the backend's url right?",
}


def _unreachable(err: BaseException) -> Any:
    """The socket error (no such socket, permission denied, refused) somewhere in what
    the SDK raised: in the cause chain or in the arguments of requests' wrappers."""
    seen: set[int] = set()
    todo: list[object] = [err]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, FileNotFoundError | PermissionError | ConnectionRefusedError):
            return item
        todo.extend([item.__cause__, item.__context__, *item.args])
    return None


class Progress:
    """Whether a step has issued a change yet: until then an engine error is transient."""

    changed = False


class Engine:
    """A Docker engine reached at `url`; the client connects on first use."""

    def __init__(
        self,
        url: str,
        timeout: float,
        tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.tls = tls
        self.clock = poll.SYSTEM  # the health and rollback waits' time and sleep
        self._client: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        docker = sdk(self.url)
        tls = docker.tls

        kwargs: dict[str, Any] = {
            "base_url": self.url,
            "timeout": max(1, round(self.timeout)),
            "version": "auto",
        }
        ca, cert, key = self.tls
        if ca is not None or cert is not None:
            kwargs["tls"] = tls.TLSConfig(
                client_cert=(str(cert), str(key)) if cert is not None else None,
                ca_cert=str(ca) if ca is not None else None,
                verify=True,
            )
        if self.url.startswith("ssh://"):
            kwargs["use_ssh_client"] = True  # the ssh command and its config; no paramiko
        return docker.DockerClient(**kwargs)

    @property
    def api(self) -> Any:
        """The low-level docker.APIClient (the high-level models inspect once more per item).

        Every call goes through here, so a leader that lost its lease in the middle of a
        step makes none of the step's calls it has left (patchd.acting)."""
        acting.check(f"docker {self.url}")
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._connect()
                except Exception as err:
                    text = message(err, self.url)
                    if _unreachable(err) is None:
                        text = f"docker {self.url}: {text}"
                    raise TransientError(text) from err
            return self._client.api

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def ping(self, what: str) -> None:
        """Ask the engine whether it answers (`GET /_ping`).

        A local socket is asked without the SDK: the daemon pings every backend at start
        and on reload, and the docker SDK with requests and urllib3 is about 6 MB resident
        that a daemon waiting for its window does not need (bench/idle.py; the budget is
        60 MB). It is imported on the first real call. Other URLs (tcp, TLS, ssh) and a
        connected client go through the SDK."""
        if not self.url.startswith("unix://") or self._client is not None:
            with self.step(what):
                self.api.ping()
            return
        conn = _UnixHTTP(self.url[len("unix://") :], self.timeout)
        try:
            conn.request("GET", "/_ping")
            answer = conn.getresponse()
            body = answer.read(200).decode("utf-8", "replace").strip()
        except OSError as err:  # no socket, permission denied, refused, timed out
            # Worded as when the SDK's first call fails (Engine.api).
            text = message(err, self.url)
            raise TransientError(text if _unreachable(err) else f"{what}: {text}") from err
        except http.client.HTTPException as err:
            raise TransientError(f"{what}: {self.url} does not speak HTTP: {err!r}") from err
        finally:
            conn.close()
        if answer.status != 200:
            raise TransientError(
                f"{what}: the Docker engine at {self.url} answered HTTP {answer.status}"
                f" to /_ping: {body or answer.reason}"
            )

    @contextmanager
    def step(self, what: str) -> Iterator[Progress]:
        """Map errors: TransientError while nothing changed and the engine is to blame,
        StepFailed otherwise. Set `changed` on the yielded Progress before a change."""
        progress = Progress()
        try:
            yield progress
        except BackendError:
            raise
        except Exception as err:
            if not progress.changed and transient(err):
                raise TransientError(f"{what}: {message(err, self.url)}") from err
            raise StepFailed(f"{what}: {message(err, self.url)}") from err

    def container(self, name_or_id: str) -> dict[str, Any] | None:
        """Inspect a container by exact name or id; None when there is none."""
        try:
            found: dict[str, Any] = self.api.inspect_container(name_or_id)
        except Exception as err:
            if not_found(err):
                return None
            raise
        # The engine also resolves an id prefix: a name must match exactly.
        if found["Name"].lstrip("/") != name_or_id and not found["Id"].startswith(name_or_id):
            return None
        return found

    def image(self, ref: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.api.inspect_image(ref)
        except Exception as err:
            if not_found(err):
                return None
            raise
        return found

    def pull(self, repository: str, digest: str) -> str:
        """Pull `repository@digest` and return its image id."""
        error = None
        # The engine reports a failed pull inside the progress stream, not as an HTTP error.
        for event in self.api.pull(repository, tag=digest, stream=True, decode=True):
            if isinstance(event, dict) and event.get("error"):
                error = event["error"]
        image = self.image(f"{repository}@{digest}")
        if image is None:
            raise StepFailed(f"pulling {repository}@{digest} failed: {error or 'not found'}")
        return str(image["Id"])

    def sharing_network(
        self, attrs: dict[str, Any], listed: list[dict[str, Any]] | None = None
    ) -> list[str]:
        """Containers that run in `attrs`' network namespace (`--network container:X`),
        from `listed` (the engine's container list) or a fresh list."""
        name = str(attrs["Name"]).lstrip("/")
        modes = {f"container:{attrs['Id']}", f"container:{name}"}
        found = []
        for item in self.api.containers(all=True) if listed is None else listed:
            mode = str((item.get("HostConfig") or {}).get("NetworkMode") or "")
            if item.get("Id") != attrs["Id"] and mode in modes:
                found.append(str((item.get("Names") or ["/?"])[0]).lstrip("/"))
        return sorted(found)

    def await_healthy(
        self,
        name: str,
        timeout: float,
        stable_for: float,
        failure: type[BackendError],
        restarts: int | None = None,
    ) -> None:
        """Return once `name` is healthy; raise `failure` as soon as it cannot become so.

        Healthy: its own HEALTHCHECK says so, or (without one) it has been running without
        a restart for `stable_for` seconds. Exited, restarting, restarted or unhealthy fail
        at once rather than at the deadline. `restarts`: the restart count it must keep
        (0 for a container just created); by default the count first seen.
        """
        started_at: str | None = None
        running_since: float | None = None

        def attempt() -> bool | None:
            nonlocal restarts, started_at, running_since
            now = self.clock.monotonic()
            attrs = self.container(name)
            if attrs is None:
                raise failure(f"{name}: the container is gone")
            state = attrs.get("State") or {}
            if state.get("Status") != "running" or state.get("Restarting"):
                status = "restarting" if state.get("Restarting") else state.get("Status")
                raise failure(f"{name} is {status} (exit code {state.get('ExitCode')})")
            count = int(state.get("RestartCount") or 0)
            restarts = count if restarts is None else restarts
            started_at = started_at or str(state.get("StartedAt"))
            if count != restarts or str(state.get("StartedAt")) != started_at:
                raise failure(f"{name} restarted (restart count {count})")
            check = (attrs.get("Config") or {}).get("Healthcheck") or {}
            health = state.get("Health")
            if health and check.get("Test") not in (None, [], ["NONE"]):
                if health.get("Status") == "healthy":
                    return True
                if health.get("Status") == "unhealthy":
                    last = (health.get("Log") or [{}])[-1]
                    output = str(last.get("Output", "")).strip()[-200:]
                    raise failure(f"{name} is unhealthy: {output or 'its healthcheck fails'}")
                return None
            # No healthcheck of its own: running without a restart for stable_for.
            running_since = now if running_since is None else running_since
            return True if now - running_since >= stable_for else None

        def expired() -> NoReturn:
            raise failure(f"{name} was not healthy within {timeout:g}s")

        poll.until(attempt, self.clock.deadline(timeout), expired, _POLL, self.clock)


class _UnixHTTP(http.client.HTTPConnection):
    """HTTP over the engine's unix socket (the stdlib has no such connection)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
