"""`patchd plan`, `run`, `status` and `history` as processes against the real engine."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.conftest import window_at, write_config
from tests.integration.daemon_helpers import run_patchd
from tests.integration.docker_fleet import Fleet


def patchd(*args: str) -> subprocess.CompletedProcess[str]:
    return run_patchd(*args)


def test_plan_then_run_now_then_status_and_history(f: Fleet, tmp_path: Path) -> None:
    names = [f.name(f"w{i}") for i in range(3)]
    f.publish("app-v1", "w")
    for i in range(3):
        f.run(f"w{i}", "w")
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    v2 = f.publish("app-v2-broken", "w")
    config = tmp_path / "patchd.toml"
    later = datetime.now(UTC) + timedelta(days=2)
    write_config(
        config,
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"never-now": window_at(later)},
            "backends": {"lab": {"type": "docker", "url": f.docker_host}},
            "groups": {
                "web": {
                    "backend": "lab",
                    "window": "never-now",
                    "select": {"labels": {"patchd.test": f.token}},
                    "max_errors": 1,
                    "health": {"timeout": "120s", "stable_for": "1s"},
                }
            },
        },
    )
    c = str(config)
    plan = patchd("plan", "-c", c, "--json")
    assert plan.returncode == 0, plan.stderr
    [doc] = json.loads(plan.stdout)["groups"]
    assert [(t["name"], t["action"], t["available"]) for t in doc["targets"]] == [
        (n, "patch", v2) for n in names
    ]
    assert all(f.digest_of(n) == v1 for n in names)  # plan changed nothing
    text = patchd("plan", "-c", c).stdout
    assert f"{f.repo('w')}@{v2}" in text  # the whole digest, named

    refused = patchd("run", "web", "-c", c)  # the window is two days away
    assert refused.returncode == 3
    assert "does not allow a start now" in refused.stderr

    run = patchd("run", "web", "-c", c, "--now")
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"[1/3] {names[0]}: rolled_back")
    # A target left pending names the version waiting for it, as every output does.
    repository = f.repo("w")
    waiting = f"{repository}@{v1} -> {repository}@{v2}"
    assert lines[1].startswith(f"[2/3] {names[1]}: pending {waiting} (0.0s): "), lines[1]
    assert "halted" in lines[-1]
    assert all(f.digest_of(n) == v1 and f.is_healthy(n) for n in names)

    status = patchd("status", "-c", c, "--json")
    [group] = json.loads(status.stdout)["groups"]
    assert group["last_run"]["status"] == "halted"
    assert group["pending"] == names[1:]
    history = patchd("history", "-c", c)
    assert f"{names[0]}: rolled_back" in history.stdout
    assert patchd("run", "nope", "-c", c).returncode == 2
