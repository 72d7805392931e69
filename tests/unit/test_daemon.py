"""The daemon in-process with FakeBackend: scheduling a window, reload, metrics, shutdown.

The daemon as a real process (signals, sd_notify, Docker) is tested in tests/integration.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.daemon import Daemon
from patchd.state import SqliteStore
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from patchd.windows import Cron, Weekly, Window, next_start
from tests.conftest import wait_until, window_at, write_config


def config(state: Path, start: datetime, broken: bool = False) -> dict[str, Any]:
    """The daemon's config: window `soon` opens at `start`; group `web` on backend `d`."""
    return {
        "daemon": {"state_dir": state, "metrics_address": "127.0.0.1:0", "log_format": "json"},
        "windows": {"soon": window_at(start)},
        "backends": {"d": {"type": "docker"}},
        "groups": {
            "web": {"backend": "d", "window": "nope" if broken else "soon", "max_concurrency": 2}
        },
    }


class Recorder(Notifier):
    """Keeps what the daemon tells systemd (no socket)."""

    def __init__(self) -> None:
        super().__init__("")
        self.sent: list[str] = []

    def send(self, *lines: str, wait: float = 0.0) -> bool:
        self.sent.append("\n".join(lines))
        return True


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> FakeBackend:
    """Three targets, v2 published; a test may make each step take `request.param`
    seconds (indirect parametrization)."""
    backend = FakeBackend("d")
    if getattr(request, "param", 0):
        backend.step_time = request.param
        backend.sleep = time.sleep
    for i in range(3):
        backend.add(f"c{i}")
    backend.publish("app", "v2")
    return backend


@pytest.fixture
def start(request: pytest.FixtureRequest) -> datetime:
    """When the `daemon` fixture's window opens: in 3 s, or `request.param` s from now."""
    return datetime.now(UTC).replace(microsecond=0) + timedelta(
        seconds=getattr(request, "param", 3)
    )


@pytest.fixture
def daemon(tmp_path: Path, fake: FakeBackend, start: datetime) -> Iterator[Daemon]:
    path = write_config(tmp_path / "patchd.toml", config(tmp_path / "state", start))
    d = Daemon(path, None, connector=lambda spec: fake, notifier=Recorder())
    d.start()
    yield d
    if not d.stop.is_set():
        d.shutdown()


def test_window_opening_after_start_patches_the_group(
    daemon: Daemon, fake: FakeBackend, start: datetime
) -> None:
    assert isinstance(daemon.notifier, Recorder)
    [ready] = [m for m in daemon.notifier.sent if m.startswith("READY=1")]
    assert "STATUS=idle; next window soon at" in ready
    wait_until(lambda: {t.version for t in fake.targets.values()} == {"v2"}, 120, "v2 everywhere")
    run = wait_until(
        lambda: (r := daemon.store.last_run("web")) is not None and r.status == "completed" and r,
        120,
        "a completed run",
    )
    # Nothing before the window: when the run started, not "nothing yet" at some instant
    # (a loaded machine may start the daemon after the window opened).
    assert run.started >= start
    port = daemon.metrics_server.server_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'patchd_patch_operations_total{backend="d",group="web",result="success"} 3.0' in text
    assert 'patchd_window_open{window="soon"} 1.0' in text
    assert "patchd_config_last_reload_successful 1.0" in text
    assert 'patchd_backend_up{backend="d"} 1.0' in text


def test_broken_reload_keeps_the_old_config(daemon: Daemon, tmp_path: Path) -> None:
    old = daemon.settings
    path = tmp_path / "patchd.toml"
    write_config(path, config(tmp_path / "state", datetime.now(UTC), broken=True))
    daemon.reload()
    assert daemon.settings is old
    assert daemon.metrics.config_reload_ok._value.get() == 0  # type: ignore[attr-defined]
    # `systemctl status` shows why, until a reload works (the old config runs meanwhile).
    status = daemon.status_line()
    assert status.startswith(f"reload failed, old config kept: {path}: groups.web.window"), status
    assert "nope" in status and "; idle; next window soon at " in status
    write_config(path, config(tmp_path / "state", datetime.now(UTC) + timedelta(hours=2)))
    daemon.reload()
    assert daemon.settings is not old
    assert daemon.metrics.config_reload_ok._value.get() == 1  # type: ignore[attr-defined]
    assert daemon.status_line().startswith("idle; next window soon at")


def test_reload_refuses_a_config_without_groups_and_names_what_needs_a_restart(
    daemon: Daemon, tmp_path: Path, start: datetime, capsys: pytest.CaptureFixture[str]
) -> None:
    old = daemon.settings
    path = tmp_path / "patchd.toml"
    path.write_text("")  # an editor's half-saved file: it loads, with no group
    daemon.reload()
    assert daemon.settings is old
    assert daemon.metrics.config_reload_ok._value.get() == 0  # type: ignore[attr-defined]
    status = daemon.status_line()
    assert status.startswith("reload refused, old config kept: the new config"), status
    assert "has no group" in status and "; idle; next window soon at " in status

    values = config(tmp_path / "moved", start)
    values["daemon"]["metrics_address"] = "127.0.0.1:1"
    values["groups"]["db"] = {"backend": "d", "window": "soon"}
    write_config(path, values)
    daemon.reload()
    assert daemon.settings is not old and set(daemon.settings.groups) == {"web", "db"}
    assert daemon.settings.daemon.state_dir == old.daemon.state_dir  # until a restart
    assert daemon.metrics.config_reload_ok._value.get() == 1  # type: ignore[attr-defined]
    status = daemon.status_line()
    assert status.startswith(
        "restart needed to apply daemon.state_dir, daemon.metrics_address (reloaded the rest);"
    ), status
    logged = capsys.readouterr().err
    assert '"event": "reload_refused"' in logged and "has no group" in logged
    assert '"groups_added": ["db"]' in logged and '"groups_removed": []' in logged
    assert '"event": "reload_needs_restart"' in logged
    assert '"keys": ["daemon.state_dir", "daemon.metrics_address"]' in logged
    assert not (tmp_path / "moved").exists()  # nothing was written to the new state_dir


# The window is open at start, and the fake's steps take 1 s from the first one on.
@pytest.mark.parametrize("start", [-60], indirect=True)
@pytest.mark.parametrize("fake", [1], indirect=True)
def test_shutdown_waits_for_in_flight_targets(daemon: Daemon, fake: FakeBackend) -> None:
    assert daemon.start_run("web") or True
    # Both of the first batch (max_concurrency 2) have started: the stop leaves c2 alone.
    wait_until(lambda: fake.in_flight == 2, 120, "two targets in flight")
    assert daemon.shutdown() == 0
    store = SqliteStore(daemon.settings.daemon.state_dir / "patchd.db")
    run = store.last_run("web")
    assert run is not None and run.status == "stopped"
    assert [row.state for row in store.targets(run.id)] == ["committed", "committed"]
    assert run.detail["pending"] == ["c2"]
    assert store.unfinished_targets() == []
    assert all(t.version in ("v1", "v2") for t in fake.targets.values())


def test_next_start_skips_the_cutoff_and_respects_open_windows() -> None:
    w = Window("w", Cron("0 * * * *"), timedelta(minutes=30), UTC, timedelta(minutes=10))  # type: ignore[arg-type]
    at = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)
    assert next_start(w, (), at) == datetime(2026, 1, 1, 1, 0, tzinfo=UTC)
    weekly = Window("x", Weekly(frozenset({0}), datetime.min.time()), timedelta(hours=1), UTC)  # type: ignore[arg-type]
    assert next_start(weekly, (), at) == datetime(2026, 1, 5, 0, 0, tzinfo=UTC)


def test_oldest_kept_snapshot_age_is_exported(tmp_path: Path) -> None:
    from dataclasses import dataclass

    @dataclass
    class Kept:
        created: datetime | None

    class Keeper(FakeBackend):
        def __init__(self) -> None:
            super().__init__("d")
            self.kept = [Kept(datetime.now(UTC) - timedelta(hours=3)), Kept(None)]

        def patchd_snapshots(self) -> list[Kept]:
            return self.kept

    keeper = Keeper()
    path = write_config(
        tmp_path / "patchd.toml", config(tmp_path / "state", datetime.now(UTC) + timedelta(hours=2))
    )
    d = Daemon(path, None, connector=lambda spec: keeper, notifier=Notifier(""))
    d.start()
    try:
        port = d.metrics_server.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        [line] = [x for x in text.splitlines() if x.startswith("patchd_snapshot_oldest_age")]
        assert 3 * 3600 <= float(line.split()[-1]) < 3 * 3600 + 60
        keeper.kept = []
        d._refresh_snapshots()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'patchd_snapshot_oldest_age_seconds{backend="d"} 0.0' in text
    finally:
        d.shutdown()


def test_counters_start_at_zero_and_store_gauges_are_exported(
    daemon: Daemon, fake: FakeBackend
) -> None:
    port = daemon.metrics_server.server_port

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    text = scrape()
    # Before any run: every configured group's counters exist at 0, so increase() in an
    # alert rule sees their first increment.
    assert 'patchd_run_halted_total{group="web"} 0.0' in text
    assert 'patchd_runs_total{group="web",status="halted"} 0.0' in text
    assert (
        'patchd_patch_operations_total{backend="d",group="web",result="rollback_failed"} 0.0'
        in text
    )
    assert 'patchd_group_snapshot_keep_seconds{backend="d",group="web"} 0.0' in text
    assert 'patchd_group_pending_windows{group="web"} 0.0' in text  # never ran
    assert "patchd_alert_gate_blocked_total{" not in text  # the group has no alert gate
    wait_until(
        lambda: (
            daemon.store.last_run("web") is not None
            and daemon.store.last_run("web").status == "completed"  # type: ignore[union-attr]
        ),
        120,
        "a completed run",
    )
    wait_until(
        lambda: 'patchd_group_targets_pending{group="web"} 0.0' in scrape(), 120, "pending 0"
    )
    text = scrape()
    assert 'patchd_group_pending_windows{group="web"} 0.0' in text
    assert 'patchd_runs_total{group="web",status="completed"} 1.0' in text
    assert "patchd_group_last_rollback_failed_timestamp_seconds{" not in text
    assert "patchd_retained_items{" not in text


def test_alert_gate_answers_are_counted(daemon: Daemon) -> None:
    from patchd.engine import GateResult

    shut = GateResult(False, "unreachable", "connection refused")
    daemon._on_alert_gate("web", "before_start", shut)
    daemon._on_alert_gate("web", "before_start", shut)
    daemon._on_alert_gate("web", "before_start", GateResult(True))
    daemon._on_alert_gate("web", "after_patch", GateResult(False, "alerts_firing", "1 series"))
    counter = daemon.metrics.alert_gate_blocked
    assert counter.labels("web", "before_start", "unreachable")._value.get() == 2  # type: ignore[attr-defined]
    assert counter.labels("web", "after_patch", "alerts_firing")._value.get() == 1  # type: ignore[attr-defined]
    assert daemon._gate_shut == {}


def test_daemon_exports_pending_targets_and_pending_windows_after_a_restart(
    tmp_path: Path,
) -> None:
    path = write_config(
        tmp_path / "patchd.toml", config(tmp_path / "state", datetime.now(UTC) + timedelta(hours=2))
    )
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    at = datetime.now(UTC) - timedelta(days=3)
    store.start_run("r1", "web", None, at)
    store.finish_run("r1", "window_closed", at, 3, 1, 0, {"pending": ["c1", "c2"]})
    store.close()
    d = Daemon(path, None, connector=lambda spec: FakeBackend("d"), notifier=Notifier(""))
    d.start()
    try:
        port = d.metrics_server.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'patchd_group_targets_pending{group="web"} 2.0' in text
        assert 'patchd_group_pending_windows{group="web"} 1.0' in text
    finally:
        d.shutdown()


def test_a_reload_never_closes_a_backend_a_run_still_uses(tmp_path: Path) -> None:
    """Here a reload drops the group and its backend while a run patches with it (closing
    a vSphere backend logs it out, failing the run's steps and its rollbacks)."""
    fake = FakeBackend("d")
    for i in range(2):
        fake.add(f"c{i}")
    fake.publish("app", "v2")
    release = threading.Event()
    fake.step_time = 1
    fake.sleep = lambda seconds: release.wait(600)  # a limit: the test releases it
    values = config(tmp_path / "state", datetime.now(UTC) - timedelta(minutes=1))
    path = write_config(tmp_path / "patchd.toml", values)
    other = FakeBackend("e")
    connector = lambda spec: fake if spec.name == "d" else other  # noqa: E731
    d = Daemon(path, None, connector=connector, notifier=Notifier(""))
    d.start()  # inside the open window: the run starts at once
    try:
        wait_until(lambda: fake.in_flight > 0, 120, "a target in flight")
        # Neither the group nor its backend (a config without any group is refused):
        values["backends"] = {"e": {"type": "docker"}}
        values["groups"] = {"db": {"backend": "e", "window": values["groups"]["web"]["window"]}}
        write_config(path, values)
        d.reload()
        assert d.backends == {"e": other}
        assert ("close", "") not in fake.calls
        release.set()
        wait_until(lambda: not d._runs, 120, "the run to end")
        assert {t.version for t in fake.targets.values()} == {"v2"}
        assert ("close", "") in fake.calls  # once the run no longer needs it
    finally:
        release.set()
        d.shutdown()
