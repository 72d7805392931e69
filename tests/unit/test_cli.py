"""The `patchd` command: help texts, `windows` output around DST, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from patchd import __version__
from patchd.cli import main
from tests.conftest import write_config

DST_CONFIG = {
    "daemon": {"timezone": "Europe/Berlin"},
    "windows": {
        "sunday": {"days": ["sun"], "start": "02:30", "duration": "2h"},
        "nightly": {"cron": "30 1 * * *", "duration": "1h", "timezone": "America/New_York"},
    },
    "freezes": {"f": {"start": date(2026, 4, 5), "end": date(2026, 4, 5), "reason": "release"}},
}


@pytest.fixture
def dst_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "patchd.toml", DST_CONFIG)


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["windows", "--json", *args]) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def openings(document: dict[str, object], name: str) -> list[dict[str, object]]:
    windows = document["windows"]
    assert isinstance(windows, list)
    [window] = [w for w in windows if w["name"] == name]
    result: list[dict[str, object]] = window["openings"]
    return result


def test_windows_json_across_spring_forward(
    dst_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(capsys, "-c", str(dst_config), "--next", "3", "--at", "2026-03-28T12:00:00Z")
    sunday = openings(doc, "sunday")
    assert [o["start_utc"] for o in sunday] == [
        "2026-03-29T01:00:00Z",  # 02:30 does not exist: opens at 03:00 CEST
        "2026-04-05T00:30:00Z",
        "2026-04-12T00:30:00Z",
    ]
    assert sunday[0]["start"] == "2026-03-29T03:00:00+02:00"
    assert sunday[0]["end"] == "2026-03-29T05:00:00+02:00"
    assert [o["status"] for o in sunday] == ["open", "frozen", "open"]
    assert sunday[1]["frozen_by"] == ["f"]


def test_windows_json_across_fall_back(
    dst_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = run_json(capsys, "-c", str(dst_config), "--next", "3", "--at", "2026-10-31T12:00:00Z")
    nightly = openings(doc, "nightly")
    assert [o["start_utc"] for o in nightly] == [
        "2026-11-01T05:30:00Z",  # 01:30 EDT, the first of the two 01:30s
        "2026-11-02T06:30:00Z",
        "2026-11-03T06:30:00Z",
    ]
    assert nightly[0]["start"] == "2026-11-01T01:30:00-04:00"
    assert nightly[0]["end"] == "2026-11-01T01:30:00-05:00"  # one real hour later


def test_windows_marks_the_current_opening(
    dst_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --at without an offset is read in daemon.timezone (Berlin): 03:30 CEST = 01:30Z.
    doc = run_json(capsys, "-c", str(dst_config), "--next", "1", "--at", "2026-03-29T03:30")
    assert doc["at"] == "2026-03-29T01:30:00Z"
    [current] = openings(doc, "sunday")
    assert current["current"] is True
    assert current["start_utc"] == "2026-03-29T01:00:00Z"


def test_windows_text_output(dst_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["windows", "-c", str(dst_config), "--at", "2026-04-04T00:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "sunday: weekly sun 02:30, 2h, Europe/Berlin" in out
    assert "Sun 2026-04-05 02:30 CEST (+0200)  = 2026-04-05 00:30Z .. 2026-04-05 02:30Z" in out
    assert "[frozen by f; release]" in out


def test_windows_rejects_a_bad_instant(
    dst_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["windows", "-c", str(dst_config), "--at", "tomorrow"])
    assert info.value.code == 2
    assert "not an ISO-8601 instant: 'tomorrow'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["check-config"], ["windows"], ["version"]])
def test_every_command_has_help(command: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "patchd.cli", *command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: patchd")
    assert len(proc.stdout.splitlines()) > 3


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"patchd {__version__}"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "patchd"
    proc = subprocess.run([str(script), "version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("patchd ")


def test_run_says_when_the_alert_gate_holds_and_releases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchd import runtime
    from patchd.testing import FakeBackend
    from tests.unit.fake_prometheus import FakePrometheus, serve, vector

    fake = FakeBackend("d")
    fake.add("c1")
    fake.publish("app", "v2")
    monkeypatch.setattr(runtime, "connect", lambda spec: fake)
    with serve() as url:
        # Shut, then open before the start, then empty after the patch.
        FakePrometheus.answers = [(200, vector({"alertname": "Down"}))] + [(200, vector())] * 2
        gate = {"url": url, "query": "ALERTS", "observe": "0s", "interval": "1s"}
        values = {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"w": {"days": ["sat"], "duration": "1h"}},
            "backends": {"d": {"type": "docker"}},
            "groups": {"web": {"backend": "d", "window": "w", "health": {"prometheus": gate}}},
        }
        path = write_config(tmp_path / "patchd.toml", values)
        assert main(["run", "web", "--now", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert 'alert gate shut: alerts_firing: 1 series: {alertname="Down"}; waiting' in err
    assert "alert gate open" in err
    assert "[1/1] c1: success v1 -> v2" in out
    assert FakePrometheus.queries == ["ALERTS"] * 3
