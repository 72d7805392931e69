"""patchd.commands, the one runner of site commands (health.command and patch.command),
with real processes."""

from __future__ import annotations

import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from patchd import commands, log
from patchd.backends.base import StepFailed, Target
from patchd.config.schema import HealthModel
from patchd.health import probe
from tests.unit.test_engine import group


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_exit_code_output_interleaved_and_time() -> None:
    code = "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True)"
    finished = commands.run(_python(code + "; sys.exit(3)"), {}, 10)
    assert finished.exit_code == 3 and not finished.timed_out
    assert finished.output == "out\nerr\n"
    assert finished.problem == "exited 3: out\nerr"
    assert 0 < finished.seconds < 10
    assert commands.run(_python("pass"), {}, 10).problem is None


def test_output_is_scrubbed_and_secrets_do_not_reach_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    log.redact(secret)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/patchd.service")
    code = (
        "import os; print(os.environ.get('CREDENTIALS_DIRECTORY', 'none'),"
        f" os.environ['PATCHD_X'], {secret!r})"
    )
    finished = commands.run(_python(code), {"PATCHD_X": "1"}, 10)
    assert finished.output == "none 1 ***\n"


def test_a_command_that_cannot_start() -> None:
    finished = commands.run(["/nonexistent/tool"], {}, 10)
    assert finished.exit_code is None
    assert finished.problem == "could not run: No such file or directory"


def _survives(pid: int) -> bool:
    for _ in range(50):  # killed children are reaped by init
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def _spawner(pid_file: Path) -> str:
    return (
        "import subprocess, sys, time;"
        " p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f" open({str(pid_file)!r}, 'w').write(str(p.pid));"
        " print('started', flush=True); time.sleep(60)"
    )


def test_the_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    finished = commands.run(_python(_spawner(pid_file)), {}, 1)
    assert time.monotonic() - started < 10
    assert finished.timed_out and finished.exit_code is None
    assert finished.problem == "timed out after 1s: started"
    assert not _survives(int(pid_file.read_text()))


def test_a_health_command_that_times_out_takes_its_children_with_it(tmp_path: Path) -> None:
    """health.command uses the same runner as patch.command (it used to kill only the
    child, leaving a grandchild running and holding the output pipe)."""
    pid_file = tmp_path / "child.pid"
    grp = group(
        health=HealthModel(timeout=timedelta(seconds=1), command=_python(_spawner(pid_file)))
    )
    with pytest.raises(StepFailed, match=r"^command \S+ timed out after 1s: started$"):
        probe(Target(id="a", name="a", kind="fake"), {}, grp)
    assert not _survives(int(pid_file.read_text()))
