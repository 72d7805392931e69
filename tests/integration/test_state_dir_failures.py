"""A state directory that cannot be written, on the real Docker engine: nothing is lost.

The state directory of each test is a small tmpfs the test mounts itself (it runs as
root), so "full" and "read-only" are the kernel's own ENOSPC and EROFS, not a mock:

- full before the run: `patchd run` exits 1 saying the journal cannot be written, and no
  container is touched (same container ids, still running, still v1);
- full during the run (a `health.command` fills the disk while the first target is being
  verified): that target is rolled back all the same, no other target starts, the run
  reports it; every container keeps its id and runs v1, no snapshot is left; once space
  is back, the next run reconciles the unfinished journal row and patches everything;
- read-only when the daemon starts: `patchd daemon` exits 1 with one clear line, no
  traceback, and never tells systemd READY.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from patchd.state import SqliteStore
from tests.conftest import window_at, write_config
from tests.integration.daemon_helpers import Daemon, daemon_config, run_patchd, web_group
from tests.integration.docker_fleet import Fleet, free_port


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"these tests mount a tmpfs and need root: {mounted.stderr}", pytrace=False)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    subprocess.run(["sh", "-c", f"cat /dev/zero > {path}/fill"], capture_output=True)


def config(f: Fleet, path: Path, state: Path, command: list[str] | None = None) -> Path:
    later = datetime.now(UTC) + timedelta(days=2)  # run with --now
    return write_config(
        path,
        {
            "daemon": {"state_dir": state},
            "windows": {"later": window_at(later)},
            "backends": {
                "lab": {"type": "docker", "url": f.docker_host, "rollback_timeout": "30s"}
            },
            "groups": {
                "web": {
                    "backend": "lab",
                    "window": "later",
                    "select": {"labels": {"patchd.test": f.token}},
                    "max_errors": 3,
                    "health": {"timeout": "120s", "stable_for": "1s", "command": command},
                }
            },
        },
    )


def patchd_run(config: Path) -> subprocess.CompletedProcess[str]:
    return run_patchd("run", "web", "--now", "-c", str(config))


def fleet_of(f: Fleet, count: int) -> tuple[list[str], dict[str, str], str, str]:
    """`count` healthy containers on v1, then v2 published: names, ids, v1, v2."""
    names = [f.name(f"s{i}") for i in range(count)]
    f.publish("app-v1", "s")
    ids = {name: f.run(f"s{i}", "s").id for i, name in enumerate(names)}
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    return names, ids, v1, f.publish("app-v2", "s")


def assert_untouched(f: Fleet, ids: dict[str, str], v1: str) -> None:
    """Every container is still the very same one, running v1; no snapshot is left."""
    for name, container_id in ids.items():
        attrs = f.inspect(name)
        assert attrs["Id"] == container_id, f"{name} was replaced"
        assert attrs["State"]["Running"], f"{name} is not running"
        assert f.digest_of(name) == v1, f"{name} is not on v1"
    assert f.leftovers() == []


def test_a_full_state_dir_before_the_run_touches_no_container(f: Fleet, tmp_path: Path) -> None:
    _, ids, v1, _ = fleet_of(f, 2)
    with tmpfs(tmp_path / "state", "1m") as state:
        cfg = config(f, tmp_path / "patchd.toml", state)
        SqliteStore(state / "patchd.db").close()  # a journal from earlier runs
        fill(state)
        # SQLite cannot even open the journal (it needs room for its -shm file).
        unopened = patchd_run(cfg)
        # With the journal open elsewhere (a daemon holds it), it opens, and the first
        # write fails.
        (state / "fill").unlink()
        holder = SqliteStore(state / "patchd.db")
        fill(state)
        try:
            done = patchd_run(cfg)
        finally:
            holder.close()
    assert unopened.returncode == 1, unopened.stdout + unopened.stderr
    assert "patchd: cannot open state store" in unopened.stderr
    assert f"(the file system of {state} is full)" in unopened.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed; 0 patched" in done.stdout
    assert "no target was started, the journal cannot be written" in done.stdout
    assert "database or disk is full" in done.stdout
    assert "Traceback" not in unopened.stderr + done.stderr
    assert_untouched(f, ids, v1)


def test_a_disk_that_fills_mid_patch_rolls_the_target_back_and_starts_no_other(
    f: Fleet, tmp_path: Path
) -> None:
    names, ids, v1, v2 = fleet_of(f, 3)
    with tmpfs(tmp_path / "state", "2m") as state:
        filler = ["sh", "-c", f"cat /dev/zero > {state}/fill; exit 0"]
        done = patchd_run(config(f, tmp_path / "filling.toml", state, filler))
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        *targets, summary = done.stdout.splitlines()
        [first] = [line for line in targets if line.startswith("[1/3] ")]
        assert ": rolled_back" in first and "database or disk is full" in first, done.stdout
        assert sum(": pending" in line for line in targets) == 2, done.stdout
        assert "; the journal cannot be written" in summary
        assert "the run's end was not journaled" in summary
        assert_untouched(f, ids, v1)
        rolled = first.split()[1].rstrip(":")

        # Space again: the next run finishes the journal's unfinished row, then patches.
        (state / "fill").unlink()
        again = patchd_run(config(f, tmp_path / "patchd.toml", state))
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"reconciled {rolled}" in again.stderr
    assert all(f.digest_of(name) == v2 for name in names)
    assert f.leftovers() == []


def test_a_daemon_with_a_read_only_state_dir_exits_with_a_clear_error(
    f: Fleet, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "state", "1m") as state:
        SqliteStore(state / "patchd.db").close()
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True)
        cfg = tmp_path / "patchd.toml"
        start = datetime.now(UTC) - timedelta(minutes=1)  # a window open now
        daemon_config(cfg, f, state, free_port(), start, web_group(f.token, 1))
        (tmp_path / "d").mkdir()
        daemon = Daemon(cfg, tmp_path / "d")
        try:
            assert daemon.proc.wait(timeout=120) == 1
            daemon.drain()
        finally:
            daemon.close()
    out = (tmp_path / "d" / "daemon.log").read_text()
    assert "patchd: cannot start: cannot open state store" in out
    assert f"({state} is not writable)" in out
    assert "Traceback" not in out
    assert not any("READY=1" in m for m in daemon.messages)
