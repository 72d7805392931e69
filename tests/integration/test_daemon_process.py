"""`patchd daemon` as a real process on the real Docker engine and registry.

Covers: a window opening a few seconds after start patches the group; sd_notify READY,
STATUS, WATCHDOG and STOPPING on a test socket; SIGHUP with a broken config keeps the old
one; the metrics endpoint passes `promtool check metrics`; SIGTERM in the middle of a run
leaves every container present, running, on its old or new image, and nothing half-done.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from patchd.state import SqliteStore
from tests.conftest import wait_until
from tests.integration.daemon_helpers import (
    Daemon,
    daemon_config,
    held_health,
    on_version,
    scrape,
    web_group,
)
from tests.integration.docker_fleet import Fleet, free_port


def test_daemon_patches_when_the_window_opens_and_handles_signals(f: Fleet, tmp_path: Path) -> None:
    names = [f.name(f"web{i}") for i in range(3)]
    f.publish("app-v1", "web")
    for i in range(3):
        f.run(f"web{i}", "web")
    f.wait_healthy(*names)
    v2 = f.publish("app-v2", "web")
    port = free_port()
    config = tmp_path / "patchd.toml"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)

    def configure(**web: Any) -> None:
        daemon_config(config, f, tmp_path / "state", port, start, web_group(f.token, 2, **web))

    configure()

    daemon = Daemon(config, tmp_path)
    try:
        wait_until(lambda: daemon.saw("READY=1"), 120, "READY=1", give_up=daemon.exited)
        assert daemon.saw("STATUS=idle; next window soon at")

        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2")
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in daemon.events()), 300, "run end"
        )
        [finished] = [e for e in daemon.events() if e["event"] == "run_finished"]
        assert finished["status"] == "completed"
        assert finished["succeeded"] == 3
        # Not before the window: the first step's time, from the daemon's own log (a
        # daemon that a loaded machine made READY late starts in the open window at once).
        steps = [e["timestamp"] for e in daemon.events() if e["event"] == "target_step"]
        assert steps and datetime.fromisoformat(min(steps)) >= start, steps
        assert daemon.saw("WATCHDOG=1")
        assert daemon.saw("STATUS=patching: web")

        metrics = scrape(port)
        assert 'patchd_patch_operations_total{backend="lab",group="web",result="success"} 3.0' in (
            metrics
        )
        assert 'patchd_window_open{window="soon"} 1.0' in metrics
        assert 'patchd_backend_up{backend="lab"} 1.0' in metrics
        promtool = shutil.which("promtool")
        assert promtool, "promtool comes with Debian's prometheus package (lab.sh installs it)"
        check = subprocess.run(
            [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

        # A broken config on SIGHUP is logged; the old one keeps running.
        configure(window="nightly")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: any(e["event"] == "reload_failed" for e in daemon.events()),
            60,
            "reload_failed",
            give_up=daemon.exited,
        )
        [failed] = [e for e in daemon.events() if e["event"] == "reload_failed"]
        assert any("groups.web.window: unknown window 'nightly'" in x for x in failed["errors"])
        assert daemon.proc.poll() is None
        assert "patchd_config_last_reload_successful 0.0" in scrape(port)
        configure()
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "patchd_config_last_reload_successful 1.0" in scrape(port), 60, "reload")

        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=120) == 0
        assert daemon.saw("STOPPING=1")
    finally:
        daemon.close()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()


def test_sigterm_during_a_run_loses_no_container(f: Fleet, tmp_path: Path) -> None:
    names = [f.name(f"svc{i}") for i in range(6)]
    f.publish("app-v1", "svc")
    for i in range(6):
        f.run(f"svc{i}", "svc")
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    v2 = f.publish("app-v2", "svc")
    config = tmp_path / "patchd.toml"
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    gate = tmp_path / "gate"
    group = web_group(f.token, 2, health=held_health(gate))
    daemon_config(config, f, tmp_path / "state", free_port(), open_now, group)

    daemon = Daemon(config, tmp_path)
    try:
        # Started inside an open window: the run begins at once. Stop it mid-way: while
        # the first two targets are verifying (the probe waits for the gate).
        wait_until(
            lambda: len(list(gate.glob("*.probing"))) == 2,
            300,
            "two targets verifying",
            give_up=daemon.exited,
        )
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: daemon.saw("STOPPING=1"), 60, "STOPPING=1", give_up=daemon.exited)
        (gate / "go").touch()
        assert daemon.proc.wait(timeout=300) == 0
    finally:
        daemon.close()

    for name in names:
        assert f.exists(name), f"{name} is missing"
        assert f.inspect(name)["State"]["Running"], f"{name} is not running"
        assert f.digest_of(name) in (v1, v2)
    assert f.leftovers() == []
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    assert store.unfinished_targets() == []
    [run] = store.runs("web")
    assert run.status == "stopped"
    states = [t.state for t in store.targets(run.id)]
    assert states == ["committed", "committed"]  # the two in flight; no other started


def test_kill_9_mid_run_then_restart_reconciles(f: Fleet, tmp_path: Path) -> None:
    names = [f.name(f"k{i}") for i in range(4)]
    f.publish("app-v1", "k")
    for i in range(4):
        f.run(f"k{i}", "k")
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    v2 = f.publish("app-v2", "k")
    config = tmp_path / "patchd.toml"
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    gate = tmp_path / "gate"
    group = web_group(f.token, 2, health=held_health(gate))
    daemon_config(config, f, tmp_path / "state", free_port(), open_now, group)
    first = Daemon(config, tmp_path)
    try:
        wait_until(
            lambda: len(list(gate.glob("*.probing"))) == 2,
            300,
            "two targets verifying",
            give_up=first.exited,
        )
        first.proc.kill()  # no chance to clean up
        first.proc.wait()
    finally:
        first.close()
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    assert len(store.unfinished_targets()) == 2  # the two that were verifying
    (gate / "go").touch()  # the probes of the restarted daemon pass at once

    (tmp_path / "second").mkdir()
    second = Daemon(config, tmp_path / "second")
    try:
        wait_until(
            lambda: any(e["event"] == "reconciled" for e in second.events()),
            120,
            "reconcile",
            give_up=second.exited,
        )
        reconciled = [e for e in second.events() if e["event"] == "reconciled"]
        assert all(e["now"] == "rolled_back" for e in reconciled)
        # The window is still open: the restarted daemon patches everything.
        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2")
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=120) == 0
    finally:
        second.close()
    assert f.leftovers() == []
    assert SqliteStore(tmp_path / "state" / "patchd.db").unfinished_targets() == []
    runs = SqliteStore(tmp_path / "state" / "patchd.db").runs("web")
    assert [r.status for r in runs][-1] == "interrupted"
    assert v1 != v2
