"""patchd under a real Prometheus server (Debian's `prometheus` package, on 127.0.0.1).

Prometheus scrapes the real daemon every second and loads config/prometheus/patchd-rules.yml;
the daemon patches containers on the lab's Docker engine, and the test reads the series
back through Prometheus's HTTP API (/api/v1/query). A tiny exporter started by the test
serves `lab_alert` (0 or 1), so a test can make the alert gate's query
(`lab_alert == 1`) answer something or nothing on demand: the gate holds a run while it
answers, lets it go on when it stops, and rolls back a target after whose patch it
answers.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.integration.daemon_helpers import Daemon, daemon_config, on_version, web_group
from tests.integration.docker_fleet import Fleet, free_port

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus" / "patchd-rules.yml"


class Switch:
    """An exporter of one gauge, `lab_alert`; GET /on and /off set it."""

    def __init__(self) -> None:
        self.value = 0
        switch = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/on", "/off"):
                    switch.value = 1 if self.path == "/on" else 0
                    body = b"ok\n"
                elif self.path == "/metrics":
                    body = (
                        "# TYPE lab_alert gauge\n"
                        f'lab_alert{{alertname="LabAlert"}} {switch.value}\n'
                    ).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Prometheus:
    """A Prometheus server scraping patchd (job "patchd") and the switch every second."""

    def __init__(self, tmp: Path, patchd_port: int, switch_port: int) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus comes with Debian's prometheus package (lab.sh installs it)"
        work = tmp / "prometheus"
        work.mkdir()
        shutil.copy(RULES, work / "patchd-rules.yml")
        config = work / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": ["patchd-rules.yml"],
                    "scrape_configs": [
                        {
                            "job_name": "patchd",
                            "static_configs": [{"targets": [f"127.0.0.1:{patchd_port}"]}],
                        },
                        {
                            "job_name": "lab",
                            "static_configs": [{"targets": [f"127.0.0.1:{switch_port}"]}],
                        },
                    ],
                }
            )
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        def exited() -> str | None:
            code = self.proc.poll()
            return None if code is None else f"prometheus exited {code}:\n{self.log()}"

        wait_until(ready, 120, "prometheus to be ready", give_up=exited)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            doc = json.loads(response.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Labels (sorted, without job and instance) -> value, for an instant query."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {
            tuple(sorted((k, v) for k, v in s["metric"].items() if k not in ("job", "instance"))): (
                float(s["value"][1])
            )
            for s in data["result"]
        }

    def value(self, expr: str) -> float | None:
        """The value of a query that answers at most one series."""
        found = self.query(expr)
        assert len(found) <= 1, found
        return next(iter(found.values()), None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def switch() -> Iterator[Switch]:
    the_switch = Switch()
    yield the_switch
    the_switch.close()


@pytest.fixture
def setup(tmp_path: Path, switch: Switch) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus server already scraping the port the daemon will serve metrics on."""
    port = free_port()
    prometheus = Prometheus(tmp_path, port, switch.port)
    yield prometheus, port
    prometheus.close()


def start_daemon(
    f: Fleet,
    tmp_path: Path,
    prometheus: Prometheus,
    port: int,
    command: list[str] | None = None,
    observe: str = "3s",
) -> Daemon:
    """A daemon started inside an open window, with the alert gate on `lab_alert == 1`.
    `observe` is how long the query must stay empty after a patch."""
    config = tmp_path / "patchd.toml"
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    health = {
        "timeout": "300s",  # a limit: at least `observe`, and the healthcheck on a loaded host
        "stable_for": "1s",
        "command": command,
        "prometheus": {
            "url": prometheus.url,
            "query": "lab_alert == 1",
            "timeout": "5s",
            "observe": observe,
            "interval": "1s",
        },
    }
    group = web_group(f.token, 2, max_errors=1, health=health)
    daemon_config(config, f, tmp_path / "state", port, open_now, group)
    return Daemon(config, tmp_path)


def run_finished(daemon: Daemon) -> dict[str, Any] | None:
    return next((e for e in daemon.events() if e["event"] == "run_finished"), None)


def test_prometheus_reads_a_patch_cycle_from_the_daemon(
    f: Fleet, tmp_path: Path, setup: tuple[Prometheus, int]
) -> None:
    prometheus, port = setup
    names = [f.name(f"web{i}") for i in range(2)]
    f.publish("app-v1", "web")
    for i in range(2):
        f.run(f"web{i}", "web")
    f.wait_healthy(*names)
    v2 = f.publish("app-v2", "web")

    daemon = start_daemon(f, tmp_path, prometheus, port)
    try:
        # Started inside an open window, with the alert gate's query answering nothing.
        finished = wait_until(lambda: run_finished(daemon), 160, "the run to finish")
        assert finished["status"] == "completed", daemon.events()
        assert finished["succeeded"] == 2
        assert on_version(f, names, v2)
        wait_until(
            lambda: prometheus.value('patchd_runs_total{group="web",status="completed"}') == 1,
            120,
            "Prometheus to scrape the finished run",
        )
        ops = prometheus.query('patchd_patch_operations_total{group="web"}')
        assert ops == {
            (("__name__", "patchd_patch_operations_total"), ("backend", "lab"), ("group", "web"),
             ("result", result)): (2.0 if result == "success" else 0.0)
            for result in (
                "success", "rolled_back", "rollback_failed", "out_of_service", "failed", "skipped"
            )
        }  # fmt: skip
        assert prometheus.value('patchd_patch_duration_seconds_count{backend="lab"}') == 2
        assert prometheus.value('patchd_run_halted_total{group="web"}') == 0
        assert prometheus.value('patchd_backend_up{backend="lab"}') == 1
        assert prometheus.value('patchd_window_open{window="soon"}') == 1
        assert prometheus.value('patchd_group_pending_windows{group="web"}') == 0
        assert prometheus.value('patchd_group_targets_pending{group="web"}') == 0
        assert prometheus.value('sum(patchd_alert_gate_blocked_total{group="web"})') == 0
        assert prometheus.value("patchd_config_last_reload_successful") == 1
        assert prometheus.value('up{job="patchd"}') == 1
        [labels] = prometheus.query("patchd_build_info")
        assert "version" in dict(labels)
        nxt = prometheus.value('patchd_window_next_open_timestamp_seconds{window="soon"}')
        assert nxt is not None and nxt > time.time()
        # The rules load and evaluate in a real Prometheus; nothing fires after a clean run.
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 10
        wait_until(
            lambda: all(
                r["health"] == "ok" for g in prometheus.api("rules")["groups"] for r in g["rules"]
            ),
            120,
            "every rule to evaluate",
        )
        assert prometheus.query('ALERTS{alertname=~"Patchd.*"}') == {}
    finally:
        daemon.close()


def test_alert_gate_holds_the_run_then_rolls_back_a_target_that_raises_an_alert(
    f: Fleet, tmp_path: Path, setup: tuple[Prometheus, int], switch: Switch
) -> None:
    prometheus, port = setup
    name = f.name("web0")
    f.publish("app-v1", "web")
    f.run("web0", "web")
    f.wait_healthy(name)
    v1 = f.digest_of(name)
    v2 = f.publish("app-v2", "web")
    switch.value = 1  # an alert fires before the window's run begins
    wait_until(lambda: prometheus.query("lab_alert == 1"), 120, "Prometheus to see lab_alert")
    # The patch's health command raises the alert again, after the patch.
    raise_alert = [
        sys.executable, "-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1])",
        f"{switch.url}/on",
    ]  # fmt: skip
    # Observed for up to 120 s: the alert the command raises is seen once Prometheus
    # has scraped the switch (every 1 s) and evaluated it, however loaded the machine.
    daemon = start_daemon(f, tmp_path, prometheus, port, command=raise_alert, observe="120s")
    try:
        blocked = (
            'patchd_alert_gate_blocked_total{group="web",check="before_start",'
            'reason="alerts_firing"}'
        )
        wait_until(lambda: (prometheus.value(blocked) or 0) >= 2, 120, "the gate to hold the run")
        assert any(e["event"] == "alert_gate_shut" for e in daemon.events())
        assert daemon.saw("STATUS=patching: web starting (held by the alert gate: alerts_firing)")
        assert f.digest_of(name) == v1  # held: nothing was touched
        assert run_finished(daemon) is None  # the run waits, it does not end

        switch.value = 0  # the alert resolves: the run goes on
        wait_until(
            lambda: any(e.get("state") == "applying" for e in daemon.events()), 120, "the patch"
        )
        assert any(e["event"] == "alert_gate_open" for e in daemon.events())
        finished = wait_until(lambda: run_finished(daemon), 160, "the run to finish")
        assert finished["status"] == "halted", finished
        [failed] = [e for e in daemon.events() if e["event"] == "target_failed"]
        assert failed["result"] == "rolled_back"
        assert "alert gate 'lab_alert == 1': alerts_firing: 1 series" in failed["error"]
        assert f.digest_of(name) == v1, "the target was not rolled back"
        assert f.inspect(name)["State"]["Running"]
        assert f.leftovers() == []
        assert v1 != v2

        wait_until(
            lambda: prometheus.value('patchd_runs_total{group="web",status="halted"}') == 1,
            120,
            "Prometheus to scrape the halted run",
        )
        assert (
            prometheus.value('patchd_patch_operations_total{group="web",result="rolled_back"}') == 1
        )
        assert (
            prometheus.value(
                'patchd_alert_gate_blocked_total{group="web",check="after_patch",reason="alerts_firing"}'
            )
            == 1
        )
        assert prometheus.value('patchd_group_pending_windows{group="web"}') == 1
        # patchd's own rules see it too: a rollback, and a rollout halted by its budget.
        wait_until(
            lambda: (
                {
                    dict(labels)["alertname"]
                    for labels in prometheus.query('ALERTS{alertstate="firing"}')
                }
                >= {"PatchdRollback", "PatchdRolloutHalted"}
            ),
            120,
            "PatchdRollback and PatchdRolloutHalted to fire",
        )
    finally:
        daemon.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
