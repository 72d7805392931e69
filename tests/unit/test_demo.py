"""The demo's isolation (issue 15): its config comes from the bed PATCHD_LAB_DIR names
(lab.env), never from the default bed; a failed run is reported with its reason."""

from __future__ import annotations

from pathlib import Path

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
