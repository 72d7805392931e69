"""Staged promotion on the real engine: staging, soak, then production gets staging's digest.

The runner is driven with a clock the test moves, so the soak needs no sleeping; the
containers, images and registry are real.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.config import load_settings
from patchd.engine import NullObserver
from patchd.runner import Runner, RunRefused
from patchd.state import SqliteStore
from tests.conftest import write_config
from tests.integration.docker_fleet import Fleet


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_production_gets_the_digest_staging_verified_after_its_soak(
    f: Fleet, tmp_path: Path
) -> None:
    f.publish("app-v1", "web")
    for name, tier in (("s1", "staging"), ("p1", "production"), ("p2", "production")):
        f.run(name, "web", labels={"tier": tier})
    f.wait_healthy(f.name("s1"), f.name("p1"), f.name("p2"))
    v1 = f.digest_of(f.name("p1"))
    v2 = f.publish("app-v2", "web")
    config = tmp_path / "patchd.toml"

    def tier(name: str) -> dict[str, Any]:
        return {"labels": {"patchd.test": f.token, "tier": name}}

    health = {"timeout": "120s", "stable_for": "1s"}
    write_config(
        config,
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"any": {"cron": "*/5 * * * *", "duration": "5m"}},
            "backends": {"lab": {"type": "docker", "url": f.docker_host}},
            "groups": {
                "staging": {
                    "backend": "lab",
                    "window": "any",
                    "select": tier("staging"),
                    "health": health,
                },
                "production": {
                    "backend": "lab",
                    "window": "any",
                    "after": "staging",
                    "soak": "2h",
                    "max_concurrency": 2,
                    "select": tier("production"),
                    "health": health,
                },
            },
        },
    )
    settings = load_settings(config)
    clock = Clock()
    backend = f.backend()
    runner = Runner(
        settings,
        SqliteStore(tmp_path / "state" / "patchd.db"),
        {"lab": backend},
        NullObserver(),
        clock,
    )
    try:
        with pytest.raises(RunRefused, match="has not run yet"):
            runner.run("production", now=True)
        staged = runner.run("staging", now=True)
        assert [o.result for o in staged.outcomes] == ["success"]
        assert f.digest_of(f.name("s1")) == v2

        v3 = f.publish("app-v3", "web")  # the tag moves on after staging verified v2
        with pytest.raises(RunRefused, match="soaking until"):
            runner.run("production", now=True)
        assert f.digest_of(f.name("p1")) == v1

        clock.now += timedelta(hours=2, seconds=1)
        promoted = runner.run("production", now=True)
        assert [o.result for o in promoted.outcomes] == ["success", "success"]
        assert f.digest_of(f.name("p1")) == v2 != v3
        assert f.digest_of(f.name("p2")) == v2
        assert f.is_healthy(f.name("p1")) and f.is_healthy(f.name("p2"))
    finally:
        backend.close()
