"""Opening the shared store and its leadership from the settings (patchd/state/shared.py),
on the lab's PostgreSQL."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from patchd import log
from patchd.config.schema import HaModel, StateModel
from patchd.state.base import StoreError
from patchd.state.leader import Change, NotLeader, Role
from patchd.state.shared import Ha, leader_of, open_shared, password_reader
from patchd.states import TargetState

AT = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def test_a_password_is_read_from_its_file_at_each_connection(tmp_path: Path) -> None:
    secret = tmp_path / "db.pass"
    secret.write_text("s3cret-one\n")
    secret.chmod(0o600)
    read = password_reader(StateModel(url="postgresql://p@h/d", password_file=secret))
    assert read is not None
    assert read() == "s3cret-one"
    assert "s3cret-one" not in log.scrub("login with s3cret-one")
    secret.write_text("s3cret-two")  # rotated
    assert read() == "s3cret-two"
    secret.write_text("\n")
    with pytest.raises(StoreError, match=r"db\.pass is empty"):
        read()


def test_a_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = StateModel(url="postgresql://p@h/d", credential="patchd-db")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(StoreError, match=r"\$CREDENTIALS_DIRECTORY is not set"):
        password_reader(state)
    (tmp_path / "patchd-db").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    read = password_reader(state)
    assert read is not None and read() == "from-systemd"
    assert password_reader(StateModel(url="postgresql://p@h/d")) is None


def test_a_wrong_database_fails_at_once_with_the_url_and_no_password(pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/no_such_db"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_shared(StateModel(url=url, outage_wait=timedelta(seconds=20)))
    assert time.monotonic() - t0 < 5  # a refusal by the server is not waited out
    assert "/no_such_db" in str(caught.value)
    assert 'database "no_such_db" does not exist' in str(caught.value)


def test_two_nodes_one_leads_the_other_waits_and_takes_over_on_stop(pg_url: str) -> None:
    state = StateModel(url=pg_url)
    stores = [open_shared(state), open_shared(state)]
    seen: list[list[Change]] = [[], []]
    ha = HaModel(takeover=timedelta(seconds=6))  # slack for a loaded machine
    nodes: list[Ha] = []
    try:
        nodes.append(Ha.start(stores[0], ha.model_copy(update={"node": "n0"}), seen[0].append))
        _wait(lambda: nodes[0].status().role is Role.LEADER)
        nodes.append(Ha.start(stores[1], ha.model_copy(update={"node": "n1"}), seen[1].append))
        _wait(lambda: nodes[1].status().reason.startswith("standby: n0/"))
        first, second = nodes[0].status(), nodes[1].status()
        assert (first.node, first.epoch, first.takeovers) == ("n0", 1, 1)
        assert first.lease_age is not None and first.lease_age < 3.6
        assert second.role is Role.STANDBY and second.leader == first.holder
        assert nodes[1].may_act() is False
        reader = open_shared(state, readonly=True)  # `patchd status` on any node
        try:
            seen_lease = leader_of(reader)
        finally:
            reader.close()
        assert (seen_lease.holder, seen_lease.epoch) == (first.holder, 1)
        assert 0 < seen_lease.remaining <= 3.6 and seen_lease.age < 3.6

        stores[0].start_run("r1", "web", None, AT)
        with pytest.raises(NotLeader):
            stores[1].start_run("r2", "web", None, AT)

        nodes[0].stop()  # steps down: n1 takes over without waiting for the lease to end
        t0 = time.monotonic()
        _wait(lambda: nodes[1].status().role is Role.LEADER)
        assert time.monotonic() - t0 < 3
        assert nodes[1].status().epoch == 2
        assert seen[1][-1].previous_holder == first.holder  # read from the lease row
        stores[1].record("r1", "t1", "t1", TargetState.APPLYING, AT, step="s", phase="p")
        with pytest.raises(NotLeader):
            stores[0].record("r1", "t2", "t2", TargetState.APPLYING, AT, step="s", phase="p")
    finally:
        for node in nodes:
            node.stop()
        for store in stores:
            store.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT target, epoch FROM journal").fetchall()
    assert rows == [("t1", 2)]


def _wait(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
