"""The test bed's start-up (tests/lab/bed.py) takes down only a bed it started whole.

A bed some of whose services already answer belongs to someone else (a make target,
another session on the machine): starting the rest is fine, stopping it all at the end
once cut the services from under a CI run. `lab.sh` is replaced by a recorder here; the
real one is walked by every integration run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import bed

UP = "dockerd   up    pid 1        unix:///x/d.sock\npostgres  down  -            127.0.0.1:1\n"
DOWN = "dockerd   down  -            unix:///x/d.sock\npostgres  down  -            127.0.0.1:1\n"


def _record(monkeypatch: pytest.MonkeyPatch, status: str, up_rc: int = 0) -> list[str]:
    calls: list[str] = []

    def lab_sh(*args: str, directory: Path, timeout: float) -> tuple[int, str]:
        calls.append(args[0])
        if args[0] == "status":
            return 1, status
        if args[0] == "up":
            (directory / "lab.env").write_text("LAB_DOCKER_HOST=unix:///x/d.sock\n")
            return up_rc, "lab: up"
        return 0, "lab: down"

    monkeypatch.setattr(bed, "lab_sh", lab_sh)
    return calls


@pytest.mark.parametrize("status", [DOWN, UP])
def test_a_bed_is_taken_down_only_when_none_of_it_answered_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: str
) -> None:
    (tmp_path / "lab.env").write_text("LAB_DOCKER_HOST=unix:///x/d.sock\n")
    calls = _record(monkeypatch, status)
    notes: list[str] = []
    with bed.running(tmp_path, note=notes.append) as values:
        assert values["LAB_DOCKER_HOST"] == "unix:///x/d.sock"
    if status == DOWN:
        assert calls == ["status", "up", "down"]
    else:
        assert calls == ["status", "up"]
        assert "test bed left running: dockerd answered before" in notes[-1]


def test_a_failed_start_does_not_stop_services_it_found_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lab.env").write_text("LAB_DOCKER_HOST=unix:///x/d.sock\n")
    calls = _record(monkeypatch, UP, up_rc=1)
    with pytest.raises(bed.BedError, match="could not start"), bed.running(tmp_path):
        pass
    assert calls == ["status", "up"]


def test_a_bed_without_lab_env_is_started_and_taken_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record(monkeypatch, DOWN)
    with bed.running(tmp_path):
        pass
    assert calls == ["up", "down"]
