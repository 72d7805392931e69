"""How a failed vSphere patch is reported (issue 15): a target that may not start now
(its cluster is halted by a host left in maintenance mode) is pending, not failed, and
spends no error budget; a command that printed nothing fails as "exited N", without an
empty ": " after it. The engine runs on FakeBackend; commands are real processes."""

from __future__ import annotations

import sys
from pathlib import Path

from patchd import commands
from patchd.backends.base import LeftOutOfService, NotNow, StepFailed
from patchd.config.types import Limit
from patchd.state import open_store
from patchd.testing import FakeBackend
from tests.unit.test_engine import group, run


def test_a_target_that_may_not_start_now_is_pending_not_failed(tmp_path: Path) -> None:
    fake = FakeBackend("fake")
    for name in ("h0", "h1", "h2"):
        fake.add(name)
    fake.publish("app", "v2")
    fake.failures[("h1", "check_update")] = NotNow("h0 of its cluster is in maintenance mode")
    result = run(fake, open_store(tmp_path / "s.db"), group(max_errors=Limit(count=1)))
    outcomes = {o.target.name: o for o in result.outcomes}
    assert outcomes["h1"].result == "pending"
    assert outcomes["h1"].error == "h0 of its cluster is in maintenance mode"
    assert result.failed == 0 and result.status == "completed"
    assert outcomes["h0"].result == outcomes["h2"].result == "success"
    assert ("h1", "snapshot") not in fake.calls


def test_not_now_is_still_a_step_failure_after_the_update_check() -> None:
    assert issubclass(NotNow, StepFailed)


def test_a_silent_failed_command_says_exited_n_alone() -> None:
    finished = commands.run([sys.executable, "-c", "raise SystemExit(1)"], {}, 30)
    assert finished.problem == "exited 1"


def test_a_target_left_out_of_service_is_reported_so_not_rolled_back(tmp_path: Path) -> None:
    fake = FakeBackend("fake")
    fake.add("h0")
    fake.publish("app", "v2")
    fake.failures[("h0", "apply")] = StepFailed("patch.command exited 5")
    fake.failures[("h0", "rollback")] = LeftOutOfService("h0 is left in maintenance mode")
    store = open_store(tmp_path / "s.db")
    result = run(fake, store, group())
    [outcome] = result.outcomes
    assert outcome.result == "out_of_service"
    assert outcome.error is not None and "left in maintenance mode" in outcome.error
    assert result.failed == 1
    [row] = store.targets(result.run_id)
    assert row.state == "out_of_service"  # history and status say so too
