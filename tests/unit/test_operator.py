"""What a new operator hit (issue 15), each as a test that failed before its fix:
read commands never create the journal, root hands a journal it creates to the service,
`patchd run` survives SIGHUP/SIGTERM like Ctrl-C, stdout is the JSON alone with --json,
and `plan` fails when no group could be discovered.

Processes are real (a pipe for stdout, real signals); the backend is the FakeBackend
(the `fake` type), made slow where a signal must land mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from patchd.cli import main
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]


def fake_config(tmp_path: Path, state: Path | None = None, **web: Any) -> Path:
    """The group `web` of the fake backend; `web` adds keys to its table."""
    return write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": state or tmp_path / "state"},
            "windows": {"w": {"days": ["sat"], "duration": "1h"}},
            "backends": {"d": {"type": "fake"}},
            "groups": {"web": {"backend": "d", "window": "w", **web}},
        },
    )


@pytest.mark.parametrize("command", [["status"], ["history"], ["plan"], ["status", "--json"]])
def test_read_commands_never_create_the_journal(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = fake_config(tmp_path)
    assert main([*command, "-c", str(config)]) == 0
    assert not (tmp_path / "state").exists()
    assert capsys.readouterr().out


def test_read_commands_leave_an_existing_journal_unchanged(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    assert main(["run", "web", "--now", "-c", str(config)]) == 0
    journal = tmp_path / "state" / "patchd.db"
    before = journal.read_bytes()
    for command in (["status"], ["history"], ["plan"]):
        assert main([*command, "-c", str(config)]) == 0
    assert journal.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create files for another user")
def test_root_hands_a_journal_it_creates_to_the_state_dirs_owner(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)  # the service user's directory (nobody here)
    config = fake_config(tmp_path, state)
    assert main(["status", "-c", str(config)]) == 0
    assert not (state / "patchd.db").exists()
    assert main(["run", "web", "--now", "-c", str(config)]) == 0
    for path in state.iterdir():
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path.name


# A `patchd run` whose fake backend takes 1 s per step: 3 targets, one at a time.
SLOW_RUN = """
import sys, time
from patchd import cli, runtime
from patchd.testing import FakeBackend

fake = FakeBackend("d")
for name in ("c1", "c2", "c3"):
    fake.add(name)
fake.publish("app", "v2")
fake.step_time = 1.0
fake.sleep = time.sleep
runtime.connect = lambda spec: fake
print("started", file=sys.stderr, flush=True)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_run_lets_the_target_in_flight_finish_on_a_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    config = fake_config(tmp_path, max_concurrency=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RUN, "run", "web", "--now", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # c1 done: c2 is in flight
    assert "c1: success" in first
    time.sleep(0.3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    out = first + out
    assert proc.returncode == 1, (out, err)
    assert "stopping: no new targets" in err
    assert "c2: success" in out  # finished, not killed half-way
    assert "1 pending" in out
    assert "c3: pending" in out  # never started


# A backend that logs while it connects and discovers (as vSphere does: vsphere_login).
CHATTY_PLAN = """
import sys
from patchd import cli, log, runtime
from patchd.testing import FakeBackend

class Chatty(FakeBackend):
    def discover(self, select):
        log.get("patchd.backends.chatty").warning("chatty_discover", hint="stderr only")
        if FAIL:
            raise ConnectionError("engine unreachable")
        return super().discover(select)

def connect(spec):
    log.get("patchd.backends.chatty").warning("chatty_login")
    backend = Chatty("d")
    backend.add("c1")
    backend.publish("app", "v2")
    return backend

MODE = sys.argv.pop(1)
FAIL = MODE == "fail"
if MODE == "noconnect":
    def connect(spec):
        raise ConnectionError("vcenter.example.net:443: connection refused")
runtime.connect = connect
sys.exit(cli.main(sys.argv[1:]))
"""


def test_plan_json_stdout_is_the_json_alone(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHATTY_PLAN, "ok", "plan", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # through a real pipe: no log line before the JSON
    assert [t["name"] for t in doc["groups"][0]["targets"]] == ["c1"]
    assert "chatty_login" in proc.stderr and "chatty_discover" in proc.stderr


def test_plan_fails_when_discovery_failed_for_every_group(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHATTY_PLAN, "fail", "plan", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["groups"][0]["error"] == "discovering targets: engine unreachable"


def test_plan_says_why_a_backend_cannot_be_connected(tmp_path: Path) -> None:
    config = fake_config(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", CHATTY_PLAN, "noconnect", "plan", "--json", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        "patchd: backend d: cannot connect: vcenter.example.net:443: connection refused"
    )
