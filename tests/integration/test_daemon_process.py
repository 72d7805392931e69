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

from patchd.state import SqliteStore
from tests.integration.daemon_helpers import (
    GROUP,
    Daemon,
    on_version,
    scrape,
    wait_for,
    write_config,
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
    group = GROUP.format(token=f.token, concurrency=2)
    write_config(config, f, tmp_path / "state", port, start, group)

    daemon = Daemon(config, tmp_path)
    try:
        wait_for(lambda: daemon.saw("READY=1"), 10, "READY=1")
        assert daemon.saw("STATUS=idle; next window soon at")
        assert all(f.digest_of(n) != v2 for n in names)  # not before the window

        wait_for(lambda: on_version(f, names, v2), 60, "every container on v2")
        wait_for(lambda: any(e["event"] == "run_finished" for e in daemon.events()), 30, "run end")
        [finished] = [e for e in daemon.events() if e["event"] == "run_finished"]
        assert finished["status"] == "completed"
        assert finished["succeeded"] == 3
        assert datetime.now(UTC) >= start
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
        good = config.read_text()
        config.write_text(good.replace('window = "soon"', 'window = "nightly"'))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(e["event"] == "reload_failed" for e in daemon.events()), 10, "reload_failed"
        )
        [failed] = [e for e in daemon.events() if e["event"] == "reload_failed"]
        assert any("groups.web.window: unknown window 'nightly'" in x for x in failed["errors"])
        assert daemon.proc.poll() is None
        assert "patchd_config_last_reload_successful 0.0" in scrape(port)
        config.write_text(good)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "patchd_config_last_reload_successful 1.0" in scrape(port), 10, "reload")

        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
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
    group = GROUP.format(token=f.token, concurrency=2)
    write_config(config, f, tmp_path / "state", free_port(), open_now, group)

    daemon = Daemon(config, tmp_path)
    try:
        # Started inside an open window: the run begins at once. Stop it mid-way.
        wait_for(lambda: any(e.get("state") == "applying" for e in daemon.events()), 30, "a patch")
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0
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
    assert states and all(s == "committed" for s in states)
    assert len(states) < 6, "the stop came too late to leave targets pending"


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
    write_config(
        config,
        f,
        tmp_path / "state",
        free_port(),
        open_now,
        GROUP.format(token=f.token, concurrency=2),
    )
    first = Daemon(config, tmp_path)
    try:
        wait_for(lambda: any(e.get("state") == "applying" for e in first.events()), 30, "apply")
        first.proc.kill()  # no chance to clean up
        first.proc.wait()
    finally:
        first.close()
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    assert store.unfinished_targets(), "the kill came after every target had finished"

    (tmp_path / "second").mkdir()
    second = Daemon(config, tmp_path / "second")
    try:
        wait_for(lambda: any(e["event"] == "reconciled" for e in second.events()), 30, "reconcile")
        reconciled = [e for e in second.events() if e["event"] == "reconciled"]
        assert all(e["now"] == "rolled_back" for e in reconciled)
        # The window is still open: the restarted daemon patches everything.
        wait_for(lambda: on_version(f, names, v2), 60, "every container on v2")
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=60) == 0
    finally:
        second.close()
    assert f.leftovers() == []
    assert SqliteStore(tmp_path / "state" / "patchd.db").unfinished_targets() == []
    runs = SqliteStore(tmp_path / "state" / "patchd.db").runs("web")
    assert [r.status for r in runs][-1] == "interrupted"
    assert v1 != v2
