"""health.command and health.http probes, against real processes and a real HTTP server."""

from __future__ import annotations

import http.server
import re
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import ClassVar

import pytest

from patchd import log
from patchd.backends.base import StepFailed, Target
from patchd.config.schema import HealthModel, HttpCheckModel, PrometheusCheckModel
from patchd.engine import GateResult
from patchd.health import probe, query_prometheus, target_environment, watch_alerts
from tests.unit.fake_prometheus import FakePrometheus, serve, vector
from tests.unit.test_engine import group

TARGET = Target(id="abc", name="web-1; rm -rf / $(id)", kind="container")


def test_command_gets_target_details_and_odd_names_intact(tmp_path: object) -> None:
    script = (
        "import os, sys; "
        "sys.exit(0 if os.environ['PATCHD_TARGET_NAME'] == sys.argv[1] "
        "and os.environ['PATCHD_TARGET_IMAGE'] == 'app:2' else 3)"
    )
    grp = group(health=HealthModel(command=[sys.executable, "-c", script, TARGET.name]))
    probe(TARGET, {"image": "app:2"}, grp)


def test_failing_command_fails_with_its_output() -> None:
    grp = group(
        health=HealthModel(command=[sys.executable, "-c", "print('db not ready'); exit(4)"])
    )
    with pytest.raises(StepFailed, match="exited 4: db not ready"):
        probe(TARGET, {}, grp)


def test_a_registered_secret_in_a_failing_commands_output_is_scrubbed() -> None:
    # Unique, so registering it (for the rest of this process) hides nothing else.
    short = f"pw-{uuid.uuid4().hex}"
    long = short + "-and-more"
    log.redact(short)
    log.redact(long)
    script = f"print('tried {long} then {short}'); exit(2)"
    grp = group(health=HealthModel(command=[sys.executable, "-c", script]))
    with pytest.raises(StepFailed) as info:
        probe(TARGET, {}, grp)
    assert str(info.value).endswith("exited 2: tried *** then ***")  # the longer one whole


def test_missing_command_fails_closed() -> None:
    grp = group(health=HealthModel(command=["/nonexistent/check"]))
    with pytest.raises(StepFailed, match="could not run"):
        probe(TARGET, {}, grp)


def test_command_timeout() -> None:
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            command=[sys.executable, "-c", "import time; time.sleep(30)"],
        )
    )
    with pytest.raises(StepFailed, match="timed out"):
        probe(TARGET, {}, grp)


def test_environment_names() -> None:
    env = target_environment(TARGET, {"ip-address": "10.0.0.1"}, group())
    assert env["PATCHD_TARGET_IP_ADDRESS"] == "10.0.0.1"
    assert env["PATCHD_GROUP"] == "web"
    assert env["PATCHD_TARGET_ID"] == "abc"


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[list[int]] = []

    def do_GET(self) -> None:
        code = self.answers.pop(0) if self.answers else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/healthz"
    httpd.shutdown()


def test_http_probe_waits_for_the_expected_status(server: str) -> None:
    _Handler.answers = [503, 200]
    grp = group(health=HealthModel(http=HttpCheckModel(url=server)))  # type: ignore[arg-type]
    probe(TARGET, {}, grp)
    assert _Handler.answers == []


def test_http_probe_fails_after_the_timeout(server: str) -> None:
    _Handler.answers = [500] * 50
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            http=HttpCheckModel(url=server),  # type: ignore[arg-type]
        )
    )
    with pytest.raises(StepFailed, match="expected status 200, got status 500"):
        probe(TARGET, {}, grp)


def test_http_probe_unreachable_fails_closed() -> None:
    grp = group(
        health=HealthModel(
            timeout=timedelta(seconds=1),
            http=HttpCheckModel(url="http://127.0.0.1:9/x"),  # type: ignore[arg-type]
        )
    )
    with pytest.raises(StepFailed, match="http check"):
        probe(TARGET, {}, grp)


def test_tcp_probe_uses_the_target_ip_and_fails_closed() -> None:
    import socket

    from patchd.config.schema import TcpCheckModel

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe(TARGET, {"ip": "127.0.0.1"}, group(health=HealthModel(tcp=TcpCheckModel(port=port))))
    closed = group(health=HealthModel(timeout=timedelta(seconds=1), tcp=TcpCheckModel(port=port)))
    with pytest.raises(StepFailed, match=r"tcp check 127\.0\.0\.1"):
        probe(TARGET, {"ip": "127.0.0.1"}, closed)
    with pytest.raises(StepFailed, match="no ip"):
        probe(TARGET, {}, closed)


def test_commands_do_not_inherit_the_credentials_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/patchd.service")
    script = "import os, sys; sys.exit(3 if 'CREDENTIALS_DIRECTORY' in os.environ else 0)"
    probe(TARGET, {}, group(health=HealthModel(command=[sys.executable, "-c", script])))


# --- the alert gate: Prometheus's query API --------------------------------------------


@pytest.fixture
def prometheus() -> Iterator[str]:
    with serve() as url:
        yield url


def test_an_empty_vector_opens_the_gate(prometheus: str) -> None:
    FakePrometheus.answers = [(200, vector())]
    answer = query_prometheus(prometheus, 'ALERTS{alertstate="firing"}', 5)
    assert answer == GateResult(True, "ok", "")
    assert FakePrometheus.queries == ['ALERTS{alertstate="firing"}']


def test_any_series_shuts_the_gate(prometheus: str) -> None:
    alerts = [{"__name__": "ALERTS", "alertname": f"A{i}", "severity": "page"} for i in range(5)]
    FakePrometheus.answers = [(200, vector(*alerts))]
    answer = query_prometheus(prometheus, "ALERTS", 5)
    assert not answer.open
    assert answer.reason == "alerts_firing"
    assert answer.detail.startswith('5 series: ALERTS{alertname="A0", severity="page"}')
    assert answer.detail.endswith("and 2 more")


@pytest.mark.parametrize(
    ("status", "body", "reason", "detail"),
    [
        (200, b"<html>", "bad_response", "not JSON"),
        (200, b"[]", "bad_response", "not a JSON object"),
        (200, b'{"status": "success"}', "bad_response", "success"),
        (
            200,
            b'{"status": "success", "data": {"resultType": "scalar", "result": [1, "1"]}}',
            "bad_response",
            "expected a vector, got scalar",
        ),
        (
            400,
            b'{"status": "error", "errorType": "bad_data", "error": "parse error"}',
            "query_error",
            "bad_data: parse error",
        ),
        (503, b"Service Unavailable", "unreachable", "HTTP 503"),
        (404, b"not found", "bad_response", "HTTP 404"),
    ],
)
def test_anything_but_a_clean_answer_shuts_the_gate(
    prometheus: str, status: int, body: bytes, reason: str, detail: str
) -> None:
    FakePrometheus.answers = [(status, body)]
    answer = query_prometheus(prometheus, "up == 0", 5)
    assert (answer.open, answer.reason) == (False, reason)
    assert detail in answer.detail


def test_an_unreachable_prometheus_shuts_the_gate() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens
    answer = query_prometheus(f"http://127.0.0.1:{port}", "up", 2)
    assert (answer.open, answer.reason) == (False, "unreachable")
    assert "refused" in answer.detail.lower()


def test_a_silent_prometheus_times_out_shut() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts, never answers
        port = listener.getsockname()[1]
        answer = query_prometheus(f"http://127.0.0.1:{port}", "up", 0.2)
    assert (answer.open, answer.reason) == (False, "unreachable")
    assert "timed out" in answer.detail


# --- the alert gate after a patch: observe the query ----------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _check(**changes: object) -> PrometheusCheckModel:
    fields: dict[str, object] = {"url": "http://prometheus:9090", "query": "ALERTS"}
    fields.update(changes)
    return PrometheusCheckModel.model_validate(fields)


def _asker(clock: FakeTime, shut_at: float | None = None) -> Callable[..., GateResult]:
    def ask(check: PrometheusCheckModel) -> GateResult:
        asked.append(clock.now)
        if shut_at is not None and clock.now >= shut_at:
            return GateResult(False, "alerts_firing", "1 series")
        return GateResult(True)

    asked: list[float] = []
    ask.asked = asked  # type: ignore[attr-defined]
    return ask


def test_a_patched_target_passes_when_the_query_stays_empty_for_observe() -> None:
    clock = FakeTime()
    ask = _asker(clock)
    seen: list[GateResult] = []
    check = _check(observe="1m", interval="15s")
    watch_alerts(check, 1300.0, seen.append, ask=ask, sleep=clock.sleep, monotonic=clock.monotonic)
    assert ask.asked == [1000, 1015, 1030, 1045, 1060]  # type: ignore[attr-defined]
    assert len(seen) == 5 and all(a.open for a in seen)


def test_a_series_during_observe_fails_the_target_at_once() -> None:
    clock = FakeTime()
    ask = _asker(clock, shut_at=1020)
    check = _check(observe="1m", interval="15s")
    with pytest.raises(StepFailed, match="alert gate 'ALERTS': alerts_firing: 1 series"):
        watch_alerts(check, 1300.0, ask=ask, sleep=clock.sleep, monotonic=clock.monotonic)
    assert ask.asked == [1000, 1015, 1030]  # type: ignore[attr-defined]


def test_observe_ends_with_health_timeout_and_zero_asks_once() -> None:
    clock = FakeTime()
    ask = _asker(clock)
    watch_alerts(
        _check(observe="10m", interval="15s"),
        1020.0,
        ask=ask,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )
    assert ask.asked == [1000, 1015, 1020]  # type: ignore[attr-defined]
    clock = FakeTime()
    ask = _asker(clock)
    watch_alerts(
        _check(observe="0s"), 2000.0, ask=ask, sleep=clock.sleep, monotonic=clock.monotonic
    )
    assert ask.asked == [1000]  # type: ignore[attr-defined]


def test_probe_runs_the_alert_gate_last(prometheus: str) -> None:
    FakePrometheus.answers = [(200, vector({"alertname": "Down"}))]
    seen: list[GateResult] = []
    health = HealthModel(
        command=[sys.executable, "-c", "pass"],
        prometheus=_check(url=prometheus, observe="0s"),
    )
    with pytest.raises(StepFailed, match=re.escape('alerts_firing: 1 series: {alertname="Down"}')):
        probe(TARGET, {}, group(health=health), seen.append)
    assert [a.reason for a in seen] == ["alerts_firing"]
