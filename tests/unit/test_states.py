"""The state enums agree with the machine and the fault points that use them."""

from __future__ import annotations

from patchd import faults
from patchd.engine.target import TRANSITIONS
from patchd.states import JOURNALED, PROVEN, RESTING, RunStatus, TargetResult, TargetState


def test_the_machine_moves_into_every_journaled_state_and_no_other() -> None:
    assert set(TRANSITIONS) == set(JOURNALED)
    sources = {s for before in TRANSITIONS.values() for s in before}
    assert sources <= set(TargetState)
    assert TargetState.PENDING in sources  # where every target starts


def test_every_journaled_state_is_reachable_from_pending() -> None:
    reached = {TargetState.PENDING}
    while True:
        more = {s for s, before in TRANSITIONS.items() if before & reached} - reached
        if not more:
            break
        reached |= more
    assert reached == set(JOURNALED) | {TargetState.PENDING}


def test_resting_states_are_where_the_machine_ends() -> None:
    ends = {s for s in JOURNALED if not any(s in before for before in TRANSITIONS.values())}
    assert ends == RESTING & set(JOURNALED)
    assert not PROVEN & RESTING


def test_each_journaled_state_has_its_two_fault_points() -> None:
    journal = {p for p in faults.POINTS if p.startswith("journal.")}
    assert journal == {f"journal.{w}.{s.value}" for w in ("before", "after") for s in JOURNALED}


def test_members_are_their_strings() -> None:
    assert TargetState.COMMITTED == "committed"
    assert f"{TargetState.ROLLING_BACK}" == "rolling_back"
    assert RunStatus("window_closed") is RunStatus.WINDOW_CLOSED
    assert TargetResult.SUCCESS == "success"
