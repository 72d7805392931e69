"""The engine under leadership (`may_act` set: several daemons share a PostgreSQL store):
nothing is done blind. A target whose journal write fails, or whose node loses the lease,
is left where its last row says for the next leader's reconciliation: never rolled back
or committed without a record, and no later step starts. The run then ends `stopped`.
`patchd.acting` fences each backend call inside a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchd import acting
from patchd.config.types import Limit
from patchd.guest.ssh import Session
from patchd.reconcile import reconcile
from tests.unit.test_engine import fleet, group, run
from tests.unit.test_guest import _ssh
from tests.unit.test_journal_failures import T0, BrokenStore, _settings, at


@pytest.mark.parametrize(
    "state,left,then",
    [
        ("snapshotted", "snapshotting", "rolled_back"),
        # A step's end and the next step's intent are one write: both fail together.
        ("applying", "snapshotting", "rolled_back"),
        ("applied", "applying", "rolled_back"),
        ("verifying", "applying", "rolled_back"),
        ("verified", "verifying", "rolled_back"),
        ("committing", "verified", "committed"),
    ],
)
def test_a_row_that_fails_leaves_the_target_for_reconciliation(
    tmp_path: Path, state: str, left: str, then: str
) -> None:
    store = BrokenStore(tmp_path / "s.db", at("c00", state))
    backend = fleet(3)
    result = run(
        backend, store, group(max_concurrency=Limit(count=1), max_errors=Limit(count=3)),
        may_act=lambda: True,
    )  # fmt: skip
    [c00, c01, c02] = result.outcomes
    assert (c00.result, c00.journal_failed) == ("pending", True)
    assert f"left in {left} for reconciliation" in (c00.error or "")
    assert (c01.result, c02.result) == ("pending", "pending")
    assert ("rollback", "c00") not in backend.calls  # not blind
    assert ("commit", "c00") not in backend.calls
    [row] = store.unfinished_targets()
    assert (row.name, row.state) == ("c00", left)
    store.refuse_writes(False)
    [done] = reconcile(_settings(tmp_path), store, {"fake": backend}, lambda: T0)
    assert (done.target, done.now) == ("c00", then)
    assert backend.targets["c00"].version == ("v2" if then == "committed" else "v1")


def test_losing_the_lease_mid_target_stops_the_run_and_starts_no_step(tmp_path: Path) -> None:
    store = BrokenStore(tmp_path / "s.db", lambda n, s: False)
    backend = fleet(3)
    # The lease is lost while c00 is being applied: the step under way ends, no other
    # step (verify, rollback) and no other target starts.
    result = run(
        backend, store, group(max_errors=Limit(count=3)),
        may_act=lambda: ("apply", "c00") not in backend.calls,
    )  # fmt: skip
    assert result.status == "stopped"
    assert [o.result for o in result.outcomes] == ["pending", "pending", "pending"]
    assert "no longer holds the leader lease" in (result.outcomes[1].error or "")
    assert [c for c in backend.calls if c[0] in ("verify", "rollback", "commit")] == []
    assert not any(name != "c00" for step, name, *_ in backend.calls if step == "snapshot")
    # The verify intent was written (this store has no fence; PostgreSQL's would refuse
    # it), the verify itself never started: the next leader rolls c00 back.
    [row] = store.unfinished_targets()
    assert (row.name, row.state) == ("c00", "verifying")


def test_a_standby_from_the_start_touches_nothing(tmp_path: Path) -> None:
    store = BrokenStore(tmp_path / "s.db", lambda n, s: False)
    backend = fleet(2)
    result = run(backend, store, group(max_errors=Limit(count=2)), may_act=lambda: False)
    assert result.status == "stopped"
    assert all(o.result == "pending" for o in result.outcomes)
    assert not [c for c in backend.calls if c[0] in ("snapshot", "apply", "rollback")]


def test_the_acting_guard_is_per_block_and_per_thread() -> None:
    acting.check()  # no guard: never refused (SQLite, no leadership)
    with acting.guard(lambda: False):
        with pytest.raises(acting.NotActing, match="no longer holds the leader lease"):
            acting.check("docker unix:///d.sock")
        with acting.guard(None):
            acting.check()
        with pytest.raises(acting.NotActing):
            acting.check()
    acting.check()
    with acting.guard(lambda: True):
        acting.check()


def test_an_ssh_command_is_not_run_by_a_leader_that_lost_its_lease(tmp_path: Path) -> None:
    session = Session("m1", "192.0.2.1", _ssh(tmp_path))  # TEST-NET: never connected
    with (
        acting.guard(lambda: False),
        pytest.raises(acting.NotActing, match="apt-get -y upgrade"),
    ):
        session.run(["apt-get", "-y", "upgrade"], sudo=True)
    assert session._client is None  # not even a connection
