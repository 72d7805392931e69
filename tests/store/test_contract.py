"""The Store contract (patchd/state/base.py), run against every implementation.

Durability of a returned write (across a process that dies right after the call), group
commit (concurrent writers all land, a bad write fails alone, batching where the
implementation batches), unfinished-target lookup, runs and history ordering and
limits, retention, rollback failures. Each test opens a fresh, empty store.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from patchd.state import Keep, StoreError, StoreProtocol, Then
from patchd.states import RESTING, RunStatus, TargetState
from tests.store.conftest import Harness

T0 = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
S = TargetState


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def put(
    store: StoreProtocol, run: str, target: str, state: TargetState, when: float, **kw: object
) -> None:
    """Record `target` (named `name-TARGET`) in `state` at T0 + `when` seconds."""
    fields: dict[str, object] = {"step": "s", "phase": "p", **kw}
    store.record(run, target, f"name-{target}", state, at(when), **fields)  # type: ignore[arg-type]


def run_in_child(work: Callable[[], None]) -> int:
    """Run `work` in a forked child that ends with os._exit(0) the instant it returns (no
    close, no cleanup, no flush: what a kill -9 right after the call leaves)."""

    def child() -> None:
        work()
        os._exit(0)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode is not None, "the child did not end"
    return process.exitcode


# --- durability --------------------------------------------------------------------------


def test_a_returned_write_survives_the_death_of_its_process(harness: Harness) -> None:
    harness.open().close()  # the store exists (created and migrated) before the child

    def child() -> None:
        store = harness.open()
        store.start_run("r1", "web", "weekend", T0)
        put(store, "r1", "c1", S.SNAPSHOTTING, 1, version_from="1", version_to="2",
            snapshot={"old": "c1-old"})  # fmt: skip
        keep = Keep("lab", "old image", {"image": "a"}, at(3600))
        put(store, "r1", "c2", S.COMMITTED, 2, keep=keep)
        store.finish_run("r1", RunStatus.HALTED, at(3), 2, 1, 0, {"error": None})
        threads = [
            threading.Thread(target=put, args=(store, "r1", f"t{i}", S.APPLYING, 4))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # no close(): the process ends here

    assert run_in_child(child) == 0
    store = harness.open()
    try:
        [run] = store.runs()
        assert (run.id, run.status, run.total, run.succeeded) == ("r1", "halted", 2, 1)
        states = {row.target: row.state for row in store.targets("r1")}
        assert states == {"c1": "snapshotting", "c2": "committed"} | {
            f"t{i}": "applying" for i in range(8)
        }
        assert [r.description for r in store.retained()] == ["old image"]
        assert store.journal("r1", "c1") == [("s", "p", at(1))]
    finally:
        store.close()


def test_a_write_that_raised_wrote_nothing(store: StoreProtocol) -> None:
    # record() for a run never started is refused (targets belong to runs).
    with pytest.raises(StoreError):
        put(store, "nope", "c1", S.SNAPSHOTTING, 1, keep=Keep("lab", "x", {}, at(9)))
    assert store.journal("nope", "c1") == []
    assert store.unfinished_targets() == []
    assert store.retained() == []


def test_an_unknown_state_or_status_is_a_value_error(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    with pytest.raises(ValueError):
        store.record("r1", "c1", "n", "sleeping", T0, step="s", phase="p")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.finish_run("r1", "fine", T0, 0, 0, 0, {})  # type: ignore[arg-type]
    assert store.targets("r1") == []


def test_journal_and_targets_survive_reopen(harness: Harness) -> None:
    # Moved from tests/unit/test_state.py (was SQLite only).
    store = harness.open()
    store.start_run("r1", "web", "weekend", T0)
    store.record(
        "r1",
        "c1",
        "web-1",
        S.SNAPSHOTTING,
        T0,
        step="snapshot",
        phase="intent",
        version_from="sha256:a",
        version_to="sha256:b",
    )
    store.record(
        "r1",
        "c1",
        "web-1",
        S.SNAPSHOTTED,
        T0 + timedelta(seconds=1),
        step="snapshot",
        phase="done",
        snapshot={"old": "web-1.patchd-old"},
    )
    store.record("r1", "c2", "web-2", S.COMMITTED, T0, step="commit", phase="done")
    store.close()

    store = harness.open()
    try:
        [unfinished] = store.unfinished_targets()
        assert unfinished.target == "c1"
        assert unfinished.state == "snapshotted"
        assert unfinished.version_from == "sha256:a"  # kept from the earlier row
        assert unfinished.snapshot == {"old": "web-1.patchd-old"}
        assert [(s, p) for s, p, _ in store.journal("r1", "c1")] == [
            ("snapshot", "intent"),
            ("snapshot", "done"),
        ]
        store.finish_run(
            "r1", RunStatus.COMPLETED, T0 + timedelta(minutes=5), 2, 1, 1, {"halted": False}
        )
        run = store.last_run("web")
        assert run is not None
        assert (run.status, run.total, run.succeeded, run.failed) == ("completed", 2, 1, 1)
        assert run.finished == T0 + timedelta(minutes=5)
        assert store.last_run("db") is None
    finally:
        store.close()


# --- group commit ------------------------------------------------------------------------


def write_concurrently(
    store: StoreProtocol, writes: list[tuple[str, str]], errors: dict[str, BaseException]
) -> list[threading.Thread]:
    """Start one thread per (run, target) write; errors land in `errors` by target."""

    def write(run: str, target: str) -> None:
        try:
            put(store, run, target, S.SNAPSHOTTING, 1)
        except BaseException as err:
            errors[target] = err

    threads = [threading.Thread(target=write, args=w) for w in writes]
    for thread in threads:
        thread.start()
    return threads


def test_concurrent_writers_all_land_in_order(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    steps = 25

    def writer(i: int) -> None:
        for n in range(steps):
            store.record("r1", f"c{i}", f"web-{i}", S.APPLYING, at(n), step=f"{n}", phase="p")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.targets("r1")) == 8
    for i in range(8):
        assert [step for step, _, _ in store.journal("r1", f"c{i}")] == [
            f"{n}" for n in range(steps)
        ]


def test_writes_queued_together_share_transactions_and_all_land(
    harness: Harness, store: StoreProtocol
) -> None:
    store.start_run("r1", "web", None, T0)
    writers = 12
    errors: dict[str, BaseException] = {}
    transactions = harness.count_transactions(store)
    with harness.hold_commits(store) as waiting:
        threads = write_concurrently(store, [("r1", f"c{i}") for i in range(writers)], errors)
        deadline = time.monotonic() + 30
        while waiting() < writers:  # every writer has queued its write
            assert time.monotonic() < deadline, f"only {waiting()} of {writers} writes queued"
            time.sleep(0.005)
        assert store_is_unchanged(harness)  # none returned while commits are held
    for thread in threads:
        thread.join()
    assert errors == {}
    assert len(store.targets("r1")) == writers
    assert transactions() < writers


def store_is_unchanged(harness: Harness) -> bool:
    """A second handle sees none of the held writes."""
    other = harness.open()
    try:
        return other.targets("r1") == []
    finally:
        other.close()


def test_a_bad_write_in_a_shared_transaction_fails_alone(
    harness: Harness, store: StoreProtocol
) -> None:
    store.start_run("r1", "web", None, T0)
    writes = [("r1", f"c{i}") for i in range(6)]
    writes.insert(3, ("no-such-run", "bad"))
    errors: dict[str, BaseException] = {}
    with harness.hold_commits(store) as waiting:
        threads = write_concurrently(store, writes, errors)
        deadline = time.monotonic() + 30
        while waiting() < len(writes):
            assert time.monotonic() < deadline
            time.sleep(0.005)
    for thread in threads:
        thread.join()
    assert set(errors) == {"bad"}
    assert isinstance(errors["bad"], StoreError)
    assert sorted(r.target for r in store.targets("r1")) == [f"c{i}" for i in range(6)]
    assert store.journal("no-such-run", "bad") == []


# --- unfinished targets ------------------------------------------------------------------


def test_unfinished_targets_are_those_not_resting_oldest_first(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    store.start_run("r2", "db", None, at(100))
    put(store, "r1", "done", S.SNAPSHOTTING, 1)
    put(store, "r1", "done", S.COMMITTED, 2)  # its last state counts
    put(store, "r1", "late", S.VERIFIED, 50)
    put(store, "r2", "early", S.APPLIED, 10)  # a later run, updated earlier
    put(store, "r1", "back", S.ROLLED_BACK, 3)
    put(store, "r1", "person", S.ROLLBACK_FAILED, 4)
    put(store, "r2", "rolling", S.ROLLING_BACK, 60)
    found = store.unfinished_targets()
    assert [(r.run_id, r.target, r.state) for r in found] == [
        ("r2", "early", "applied"),
        ("r1", "late", "verified"),
        ("r2", "rolling", "rolling_back"),
    ]
    assert all(isinstance(r.state, TargetState) for r in found)


def test_every_state_but_the_resting_ones_is_unfinished(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    for n, state in enumerate(TargetState):
        put(store, "r1", state.value, state, n)
    assert {r.state for r in store.unfinished_targets()} == set(TargetState) - RESTING


def test_a_targets_fields_keep_their_value_until_given_again(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    put(store, "r1", "c1", S.SNAPSHOTTING, 1, version_from="1", version_to="2",
        snapshot={"old": "x"})  # fmt: skip
    put(store, "r1", "c1", S.SNAPSHOTTED, 2, snapshot={"old": "x", "id": 7})
    put(store, "r1", "c1", S.ROLLING_BACK, 3, error="verifying: bad")
    put(store, "r1", "c1", S.ROLLBACK_FAILED, 4, error="verifying: bad; rollback: gone")
    put(store, "r1", "c1", S.ROLLBACK_FAILED, 5)
    [row] = store.targets("r1")
    assert (row.name, row.version_from, row.version_to) == ("name-c1", "1", "2")
    assert row.snapshot == {"old": "x", "id": 7}
    assert row.error == "verifying: bad; rollback: gone"
    assert row.updated == at(5)
    assert [(s, p) for s, p, _ in store.journal("r1", "c1")] == [("s", "p")] * 5


# --- runs and history --------------------------------------------------------------------


def test_runs_come_newest_first_per_group_and_limited(store: StoreProtocol) -> None:
    for i, group in enumerate(["web", "db", "web", "web", "db"]):
        store.start_run(f"r{i}", group, "w" if i else None, at(i * 10))
    store.start_run("r5", "web", None, at(30))  # same start as r3: the later one first
    assert [r.id for r in store.runs()] == ["r4", "r5", "r3", "r2", "r1", "r0"]
    assert [r.id for r in store.runs("web")] == ["r5", "r3", "r2", "r0"]
    assert [r.id for r in store.runs("web", limit=2)] == ["r5", "r3"]
    assert [r.id for r in store.runs(limit=1)] == ["r4"]
    assert store.runs("nobody") == []
    last = store.last_run("web")
    assert last is not None and last.id == "r5"
    assert store.last_run("nobody") is None
    first = store.runs("web")[-1]
    assert (first.window, first.status, first.finished) == (None, RunStatus.RUNNING, None)
    assert first.started == T0
    assert (first.total, first.succeeded, first.failed, dict(first.detail)) == (0, 0, 0, {})


def test_a_finished_run_carries_its_counts_and_may_be_recounted(store: StoreProtocol) -> None:
    store.start_run("r1", "web", "weekend", T0)
    store.finish_run("r1", RunStatus.INTERRUPTED, at(60), 3, 1, 0, {"error": "stopped"})
    store.finish_run(
        "r1", RunStatus.INTERRUPTED, at(90), 3, 2, 1, {"verified": {"img": "2"}, "error": "x"}
    )
    run = store.last_run("web")
    assert run is not None
    assert (run.status, run.total, run.succeeded, run.failed) == ("interrupted", 3, 2, 1)
    assert isinstance(run.status, RunStatus)
    assert run.finished == at(90)
    assert run.detail == {"verified": {"img": "2"}, "error": "x"}
    assert run.window == "weekend"


def test_targets_and_journal_keep_the_order_written(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    for name in ["zeta", "alpha", "mid"]:
        put(store, "r1", name, S.SNAPSHOTTING, 1)
    put(store, "r1", "alpha", S.SNAPSHOTTED, 2)
    assert [r.target for r in store.targets("r1")] == ["zeta", "alpha", "mid"]
    store.record("r1", "alpha", "a", S.APPLYING, at(3), step="apply", phase="intent")
    store.record("r1", "alpha", "a", S.APPLIED, at(3), step="apply", phase="done")
    assert store.journal("r1", "alpha") == [
        ("s", "p", at(1)), ("s", "p", at(2)),
        ("apply", "intent", at(3)), ("apply", "done", at(3)),
    ]  # fmt: skip
    assert store.targets("other") == []
    assert store.journal("r1", "nobody") == []


def test_a_step_and_the_next_steps_intent_are_one_write(store: StoreProtocol) -> None:
    # As the engine writes them: the snapshot's end with the apply's intent, from many
    # threads at once (so that the group commit carries several such pairs in a batch).
    store.start_run("r1", "web", None, T0)
    names = [f"t{i:02d}" for i in range(16)]
    for name in names:
        store.record("r1", name, name, S.SNAPSHOTTING, at(1), step="snapshot",
                     phase="intent", version_from="1", version_to="2")  # fmt: skip

    def pair(name: str) -> None:
        store.record("r1", name, name, S.SNAPSHOTTED, at(2), step="snapshot", phase="done",
                     snapshot={"id": name}, then=Then(S.APPLYING, "apply"))  # fmt: skip

    threads = [threading.Thread(target=pair, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = {r.target: r for r in store.targets("r1")}
    assert [r.target for r in store.targets("r1")] == names  # first recorded first
    for name in names:
        row = rows[name]
        assert row.state == S.APPLYING
        assert (row.snapshot, row.version_from, row.version_to) == ({"id": name}, "1", "2")
        assert row.updated == at(2)
        assert store.journal("r1", name) == [
            ("snapshot", "intent", at(1)), ("snapshot", "done", at(2)),
            ("apply", "intent", at(2)),
        ]  # fmt: skip
    assert store.unfinished_targets()[0].state == S.APPLYING


def test_times_come_back_in_utc(store: StoreProtocol) -> None:
    elsewhere = datetime(2026, 11, 28, 4, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    store.start_run("r1", "web", None, elsewhere)
    [run] = store.runs()
    assert run.started == elsewhere and run.started.utcoffset() == timedelta(0)


# --- retention ---------------------------------------------------------------------------


def test_what_commits_kept_is_listed_by_expiry_and_released(store: StoreProtocol) -> None:
    store.start_run("r1", "web", None, T0)
    for name, days in (("c1", 7), ("c2", 1), ("c3", 3)):
        keep = Keep("lab", f"old image {name}", {"image": name}, at(days * 86400))
        put(store, "r1", name, S.COMMITTED, 1, keep=keep)
    put(store, "r1", "c4", S.COMMITTED, 1)  # kept nothing
    rows = store.retained()
    assert [r.target for r in rows] == ["name-c2", "name-c3", "name-c1"]
    first = rows[0]
    assert (first.backend, first.run_id, first.description) == ("lab", "r1", "old image c2")
    assert first.data == {"image": "c2"}
    assert first.expires == at(86400)
    # due_by includes its own instant
    assert [r.target for r in store.retained(due_by=at(3 * 86400))] == ["name-c2", "name-c3"]
    assert store.retained(due_by=at(0)) == []
    store.released(first.id)
    store.released(first.id)  # twice (or an unknown id) is no error
    assert [r.target for r in store.retained()] == ["name-c3", "name-c1"]


# --- rollback failures -------------------------------------------------------------------


def test_rollback_failures_name_each_group_with_its_newest(store: StoreProtocol) -> None:
    assert store.rollback_failures() == {}
    store.start_run("r1", "web", None, T0)
    store.start_run("r2", "web", None, at(100))
    store.start_run("r3", "db", None, at(200))
    store.start_run("r4", "cache", None, at(300))
    put(store, "r1", "c1", S.ROLLBACK_FAILED, 10)
    put(store, "r2", "c2", S.ROLLBACK_FAILED, 110)
    put(store, "r2", "c3", S.ROLLED_BACK, 120)
    put(store, "r3", "c4", S.ROLLBACK_FAILED, 210)
    put(store, "r4", "c5", S.COMMITTED, 310)
    assert store.rollback_failures() == {"web": at(110), "db": at(210)}


# --- operators' controls and the audit trail ---------------------------------------------


def test_controls_are_set_replaced_listed_and_dropped(harness: Harness) -> None:
    store = harness.open()
    store.put_control("pause", "web", "", {"by": "alice"}, at(1))
    store.put_control("pause", "web", "", {"by": "bob"}, at(2))  # replaces
    store.put_control("quarantine", "web", "app@v2", {"version": "v2"}, at(3))
    store.put_control("quarantine", "web", "app@v3", {"version": "v3"}, at(4))
    store.put_control("quarantine", "db", "db@v9", {"version": "v9"}, at(5))
    store.close()
    store = harness.open()  # durable
    [pause] = store.controls("pause")
    assert (pause.group, pause.key, pause.data, pause.at) == ("web", "", {"by": "bob"}, at(2))
    assert pause.at.tzinfo == UTC
    assert [c.key for c in store.controls("quarantine")] == ["app@v2", "app@v3", "db@v9"]
    assert [c.key for c in store.controls("quarantine", "db")] == ["db@v9"]
    assert store.controls("approval") == []
    assert store.drop_control("quarantine", "web", "app@v2") == 1
    assert store.drop_control("quarantine", "web", "nope") == 0
    assert store.drop_control("quarantine", "web") == 1
    assert store.drop_control("pause", "web") == 1
    assert [c.group for c in store.controls("quarantine")] == ["db"]
    assert store.controls("pause") == []


def test_the_audit_trail_lists_newest_first(store: StoreProtocol) -> None:
    store.audit(at(1), 1000, 41, "alice", "pause", "web", {"reason": "incident"})
    store.audit(at(2), 65534, 42, "nobody", "refused pause", None, {})
    store.audit(at(3), 0, 43, "root", "resume", "web", {})
    rows = store.audit_trail()
    assert [(r.user, r.action, r.group) for r in rows] == [
        ("root", "resume", "web"),
        ("nobody", "refused pause", None),
        ("alice", "pause", "web"),
    ]
    assert (rows[2].uid, rows[2].pid, rows[2].detail, rows[2].at) == (
        1000,
        41,
        {"reason": "incident"},
        at(1),
    )
    assert len(store.audit_trail(limit=2)) == 2


# --- the handle ----------------------------------------------------------------------------


def test_check_writable_passes_on_a_writable_store(store: StoreProtocol) -> None:
    store.check_writable()
    store.check_writable()


def test_a_closed_store_may_be_closed_again_and_reopened(harness: Harness) -> None:
    store = harness.open()
    store.start_run("r1", "web", None, T0)
    store.close()
    store.close()
    with pytest.raises(StoreError):
        store.runs()
    with pytest.raises(StoreError):
        store.start_run("r2", "web", None, T0)
    with pytest.raises(StoreError):
        put(store, "r1", "c1", S.APPLYING, 1)
    again = harness.open()
    try:
        assert [r.id for r in again.runs()] == ["r1"]
    finally:
        again.close()


def test_the_outbox_keeps_messages_in_due_order_until_done(
    store: StoreProtocol, harness: Harness
) -> None:
    store.enqueue_notifications([("mail", "halted", {"n": 1}), ("hook", "halted", {"n": 1})], T0)
    store.enqueue_notifications([("mail", "rollback", {"n": 2})], T0 + timedelta(seconds=1))
    assert [(r.channel, r.event, r.attempts) for r in store.due_notifications()] == [
        ("mail", "halted", 0), ("hook", "halted", 0), ("mail", "rollback", 0)
    ]  # fmt: skip
    first = store.due_notifications(by=T0)
    assert [r.document for r in first] == [{"n": 1}, {"n": 1}]
    assert first[0].created == first[0].due == T0
    store.notification_retry(first[0].id, 1, T0 + timedelta(seconds=10), "down")
    store.notification_done(first[1].id)
    store.notification_done(first[1].id)  # again: no error
    assert [r.event for r in store.due_notifications(by=T0 + timedelta(seconds=5))] == ["rollback"]
    [later, retried] = store.due_notifications(limit=5)
    assert (retried.attempts, retried.error, retried.due) == (
        1, "down", T0 + timedelta(seconds=10)
    )  # fmt: skip
    assert len(store.due_notifications(limit=1)) == 1
    store.close()
    reopened = harness.open()  # durable: a restart finds what is left
    try:
        assert [r.id for r in reopened.due_notifications()] == [later.id, retried.id]
    finally:
        reopened.close()
