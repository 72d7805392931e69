"""Post-patch probes for any backend: `health.command`, `http`, `tcp` and `prometheus`.

The backend checks its own signals first (a container's HEALTHCHECK, VMware Tools); these
probes run after, on the patchd host. All fail closed: an error running the probe is a
failed check. A command gets the target's details in PATCHD_* environment variables and
is run without a shell, so target names reach it intact whatever characters they hold.

`health.prometheus` is the alert gate, asked through Prometheus's HTTP API
(`/api/v1/query`). Only a clean, empty instant vector opens it: any series in the answer
(`alerts_firing`), no answer (`unreachable`), an error Prometheus reports for the query
(`query_error`) or an answer patchd cannot read (`bad_response`) shuts it. The engine asks
it before targets start (`query_prometheus`); after a target is patched, `watch_alerts`
asks it every `interval` for `observe` (ending when `health.timeout` runs out at the
latest), and the first answer that is not empty fails the target, which is rolled back.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from patchd import commands, poll
from patchd.backends.base import StepFailed, Target
from patchd.config.schema import PrometheusCheckModel
from patchd.config.settings import Group
from patchd.engine.rollout import GateResult

# Receives every answer of the alert gate (metrics and logs count the shut ones).
GateObserver = Callable[[GateResult], None]


def target_environment(target: Target, facts: Mapping[str, str], group: Group) -> dict[str, str]:
    """PATCHD_GROUP, PATCHD_BACKEND, PATCHD_TARGET_{ID,NAME,KIND} and PATCHD_TARGET_<FACT>."""
    env = {
        "PATCHD_GROUP": group.name,
        "PATCHD_BACKEND": group.backend,
        "PATCHD_TARGET_ID": target.id,
        "PATCHD_TARGET_NAME": target.name,
        "PATCHD_TARGET_KIND": target.kind,
    }
    return commands.with_facts(env, facts)


def run_command(argv: list[str], env: Mapping[str, str], timeout: float) -> None:
    """Run `health.command`; StepFailed when it cannot start, times out or exits non-zero."""
    finished = commands.run(argv, env, timeout)
    if finished.problem is not None:
        raise StepFailed(f"command {argv[0]} {finished.problem}")


def http_status(url: str, timeout: float) -> int:
    request = urllib.request.Request(url, headers={"User-Agent": "patchd"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as err:
        return err.code


def wait_for_http(
    url: str, status: int, timeout: float, deadline: float, clock: poll.Clock = poll.SYSTEM
) -> None:
    """Poll until `url` answers `status`; StepFailed with the last answer at `deadline`."""
    last = "no answer"

    def answered() -> bool | None:
        nonlocal last
        try:
            got = http_status(url, timeout)
            if got == status:
                return True
            last = f"status {got}"
        except (OSError, ValueError) as err:
            last = str(getattr(err, "reason", err))
        return None

    def expired() -> NoReturn:
        raise StepFailed(f"http check {url}: expected status {status}, got {last}")

    poll.until(answered, deadline, expired, every=1.0, clock=clock)


def wait_for_tcp(
    host: str, port: int, timeout: float, deadline: float, clock: poll.Clock = poll.SYSTEM
) -> None:
    """Poll until a TCP connection to host:port succeeds; StepFailed at `deadline`."""
    last = "no answer"

    def connected() -> bool | None:
        nonlocal last
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError as err:
            last = err.strerror or str(err)
        return None

    def expired() -> NoReturn:
        raise StepFailed(f"tcp check {host}:{port}: {last}")

    poll.until(connected, deadline, expired, every=1.0, clock=clock)


def _series(labels: Any) -> str:
    if not isinstance(labels, dict):
        return "{}"
    name = labels.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{rest}}}"


def _read_answer(body: bytes) -> GateResult:
    try:
        doc = json.loads(body)
    except ValueError:
        return GateResult(False, "bad_response", "the answer is not JSON")
    if not isinstance(doc, dict):
        return GateResult(False, "bad_response", "the answer is not a JSON object")
    if doc.get("status") == "error":
        return GateResult(False, "query_error", f"{doc.get('errorType')}: {doc.get('error')}")
    data = doc.get("data")
    if doc.get("status") != "success" or not isinstance(data, dict):
        return GateResult(False, "bad_response", 'no status "success" with data')
    kind, result = data.get("resultType"), data.get("result")
    if kind not in ("vector", "matrix") or not isinstance(result, list):
        return GateResult(False, "bad_response", f"expected a vector, got {kind}")
    if not result:
        return GateResult(True)
    shown = ", ".join(_series(item.get("metric")) for item in result[:3] if isinstance(item, dict))
    more = f" and {len(result) - 3} more" if len(result) > 3 else ""
    return GateResult(False, "alerts_firing", f"{len(result)} series: {shown}{more}")


def query_prometheus(url: str, query: str, timeout: float) -> GateResult:
    """Ask Prometheus once (an instant query at its "now"); open only when the answer is
    an empty vector."""
    endpoint = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    request = urllib.request.Request(
        endpoint, headers={"User-Agent": "patchd", "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as err:
        try:
            answer = _read_answer(err.read())
        except (OSError, http.client.HTTPException):
            answer = GateResult(False, "bad_response")
        if answer.reason == "query_error":
            return answer
        if err.code >= 500:
            return GateResult(False, "unreachable", f"{url}: HTTP {err.code}")
        return GateResult(False, "bad_response", f"{url}: HTTP {err.code}")
    except (OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        return GateResult(False, "unreachable", f"{url}: {reason}")
    return _read_answer(body)


def ask_gate(check: PrometheusCheckModel) -> GateResult:
    return query_prometheus(str(check.url), check.query, check.timeout.total_seconds())


def watch_alerts(
    check: PrometheusCheckModel,
    deadline: float,
    on_answer: GateObserver | None = None,
    *,
    ask: Callable[[PrometheusCheckModel], GateResult] = ask_gate,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """After a patch: the gate must answer open at every ask, every `interval`, until
    `observe` has passed or `deadline` (monotonic) comes; StepFailed at the first answer
    that is not open. It is asked at least once."""
    clock = poll.Clock(monotonic, sleep)
    end = min(clock.deadline(check.observe.total_seconds()), deadline)

    def still_open() -> None:
        answer = ask(check)
        if on_answer is not None:
            on_answer(answer)
        if not answer.open:
            raise StepFailed(f"alert gate {check.query!r}: {answer.describe()}")

    # Observing has no success short of its end: `observe` passing open is the success.
    poll.until(still_open, end, lambda: True, every=check.interval.total_seconds(), clock=clock)


def probe(
    target: Target,
    facts: Mapping[str, str],
    group: Group,
    on_alert_gate: GateObserver | None = None,
) -> None:
    """Run the group's command, HTTP, TCP and alert-gate probes against a patched target."""
    health = group.health
    deadline = time.monotonic() + health.timeout.total_seconds()
    if health.command:
        env = target_environment(target, facts, group)
        run_command(health.command, env, max(1.0, deadline - time.monotonic()))
    if health.http is not None:
        wait_for_http(
            str(health.http.url),
            health.http.status,
            health.http.timeout.total_seconds(),
            deadline,
        )
    if health.tcp is not None:
        host = health.tcp.host or facts.get("ip", "")
        if not host:
            raise StepFailed("tcp check: no host given and the target reports no ip")
        wait_for_tcp(host, health.tcp.port, health.tcp.timeout.total_seconds(), deadline)
    if health.prometheus is not None:
        watch_alerts(health.prometheus, deadline, on_alert_gate)
