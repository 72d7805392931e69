"""The test bed's private PostgreSQL (tests/lab/postgres.sh), for the tests that need it:
start it if it is not up (a server that cannot start FAILS the tests, never skips them),
a fresh database per test, and outages: stop (fast, or immediate as a crash) and start.

The server lives under $PATCHD_LAB_DIR/postgres (default /tmp/patchd-lab), as the rest of
the bed; `lab.sh up` starts it with the others.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
POSTGRES_SH = REPO_ROOT / "tests" / "lab" / "postgres.sh"
DEFAULT_LAB_DIR = "/tmp/patchd-lab"
TIMEOUT = 180  # a first `up` runs initdb


def lab_dir() -> Path:
    return Path(os.environ.get("PATCHD_LAB_DIR") or DEFAULT_LAB_DIR).absolute()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHD_LAB_DIR": str(lab_dir())}
    return subprocess.run(
        [str(POSTGRES_SH), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )


def _env_values(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


@dataclass(frozen=True)
class PgLab:
    """The running server: `url` is its database `patchd`, `admin_url` the maintenance
    database (to create and drop the tests' own)."""

    url: str
    admin_url: str
    pg_dir: Path
    started_here: bool  # it was not running before this test session

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast`, or `immediate` (a crash: no checkpoint, no goodbye to
        clients; recovery replays the WAL at the next start)."""
        done = _run("stop", mode)
        assert done.returncode == 0, f"postgres.sh stop {mode} failed:\n{done.stderr}"

    def start(self) -> None:
        done = _run("start")
        assert done.returncode == 0, f"postgres.sh start failed:\n{done.stderr}"


def ensure_up() -> PgLab:
    """Start the server unless it runs (idempotent); its addresses."""
    was_up = _run("status").returncode == 0
    done = _run("up")
    assert done.returncode == 0, f"tests/lab/postgres.sh up failed:\n{done.stderr}"
    values = _env_values(_run("env").stdout)
    return PgLab(
        url=values["PATCHD_LAB_PG_URL"],
        admin_url=values["PATCHD_LAB_PG_ADMIN_URL"],
        pg_dir=Path(values["PATCHD_LAB_PG_DIR"]),
        started_here=not was_up,
    )


def stop_if_started(lab: PgLab) -> None:
    """At the end of a session: stop the server if this session started it, unless
    PATCHD_LAB_KEEP=1 (as the integration tests' bed)."""
    if lab.started_here and not os.environ.get("PATCHD_LAB_KEEP"):
        _run("down")


# The fixtures of every test that needs the server (tests/postgres/, the HA daemons); a
# test module takes them with `from tests.pglab import pg, pg_url`.


@pytest.fixture(scope="session")
def pg() -> Iterator[PgLab]:
    """The bed's PostgreSQL, started for this session when it is not up."""
    lab = ensure_up()
    yield lab
    stop_if_started(lab)


@pytest.fixture
def pg_url(pg: PgLab) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = pg.create_database()
    yield url
    pg.drop_database(url)
