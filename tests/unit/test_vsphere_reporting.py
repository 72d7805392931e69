"""How a failed vSphere patch is reported (issue 15): a target that may not start now
(its cluster is halted by a host left in maintenance mode) is pending, not failed, and
spends no error budget; a command that printed nothing fails as "exited N", without an
empty ": " after it; a host left in maintenance mode is out_of_service, not rolled back;
the default health.stable_for is warned about, not applied silently. The engine runs on
FakeBackend; commands are real processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from patchd import commands
from patchd.backends.base import LeftOutOfService, NotNow, StepFailed
from patchd.cli import main
from patchd.config.types import Limit
from patchd.state import open_store
from patchd.testing import FakeBackend
from tests.conftest import write_config
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


@pytest.mark.parametrize("health", [{}, {"timeout": "10m"}, {"stable_for": "2m"}])
def test_the_default_stable_for_of_a_vsphere_group_is_not_silent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], health: dict[str, str]
) -> None:
    """A vSphere group without health.stable_for once got 30 s for every VM and host with
    no word about it: check-config (and the daemon, at start and reload) now warns."""
    values = {
        "windows": {"w": {"days": ["sat"], "start": "02:00", "duration": "4h"}},
        "backends": {"vc": {"type": "vsphere", "host": "vc.example.net", "username": "u",
                            "credential": "vcenter-password"},
                     "d": {"type": "docker"}},
        "groups": {"vms": {"backend": "vc", "window": "w", "health": health,
                           "select": {"names": ["app-*"]}},
                   "web": {"backend": "d", "window": "w"}},
    }  # fmt: skip
    path = write_config(tmp_path / "patchd.toml", values)
    assert main(["check-config", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    warned = f"patchd: warning: {path}: groups.vms.health.stable_for: not set, so the default 30s"
    assert (warned in err) == ("stable_for" not in health), err
    assert "VMware Tools" in err or "stable_for" in health
    assert "groups.web" not in err  # Docker says its own health in its verify
