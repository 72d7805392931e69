"""The demo's isolation (issue 15): its config comes from the bed PATCHD_LAB_DIR names
(lab.env), never from the default bed, and its daemon has its own control socket; it stops
at the first failed run with its reason, and says when production waits for its soak."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from patchd.config import load_settings
from tests.lab import demo


def test_the_demo_config_is_the_beds_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHD_LAB_DIR", str(tmp_path))
    (tmp_path / "lab.env").write_text(
        f"export PATCHD_LAB_DIR='{tmp_path}'\n"
        f"export PATCHD_LAB_DOCKER_HOST='unix://{tmp_path}/run/docker.sock'\n"
    )
    path = demo.demo_config(demo.lab_env(), 40123)
    assert path == tmp_path / "demo.toml"
    text = path.read_text()
    assert "/tmp/patchd-lab" not in text
    settings = load_settings(path)
    assert settings.daemon.state_dir == tmp_path / "state"
    assert settings.daemon.metrics_port == 40123
    # Its own control socket in its bed, never the machine's /run/patchd/control.sock.
    assert settings.daemon.control_socket == tmp_path / "state" / "control.sock"
    backend = settings.backends["lab-docker"]
    assert backend.config.url == f"unix://{tmp_path}/run/docker.sock"  # type: ignore[attr-defined]


def test_a_failed_run_is_reported_with_its_reason() -> None:
    run = {
        "id": "r1",
        "group": "demo-staging",
        "status": "halted",
        "failed": 1,
        "error": None,
        "targets": [{"target": "demo-staging-1", "error": "verify: unhealthy"}],
    }
    assert demo.failure(run) == "run r1 of demo-staging halted: demo-staging-1: verify: unhealthy"
    assert demo.failure({**run, "status": "completed", "failed": 0, "targets": []}) is None


class Daemon:
    """What wait_for_production asks of the daemon's process: still running."""

    returncode = None

    def poll(self) -> None:
        return None


def test_the_demo_stops_at_the_first_failed_run_and_shows_the_soak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a failed staging run printed no reason and the demo waited its whole 180 s
    for production; and the soak between the stages passed in silence."""
    staging = {"id": "r1", "group": "demo-staging", "status": "completed", "failed": 0,
               "error": None, "finished": "2026-12-01T00:00:05Z", "targets": []}  # fmt: skip
    production = {**staging, "id": "r2", "group": "demo-production"}
    answers: dict[str, list[dict[str, Any] | None]] = {
        "demo-staging": [staging] * 4,
        "demo-production": [None, None, production, production],
    }
    monkeypatch.setattr(demo, "last_run", lambda group: answers[group].pop(0))
    demo.wait_for_production(Daemon())  # type: ignore[arg-type]
    assert "production waits for its soak" in capsys.readouterr().out

    unhealthy = [{"target": "demo-staging-1", "error": "verifying: unhealthy"}]
    failed = {**staging, "status": "halted", "failed": 1, "targets": unhealthy}
    monkeypatch.setattr(demo, "last_run", lambda group: failed if "staging" in group else None)
    started = time.monotonic()
    with pytest.raises(SystemExit, match="demo FAILED: run r1 of demo-staging halted: "
                       "demo-staging-1: verifying: unhealthy"):  # fmt: skip
        demo.wait_for_production(Daemon())  # type: ignore[arg-type]
    assert time.monotonic() - started < 5  # at once, not after demo.WAIT
