"""Two `patchd daemon` processes on one PostgreSQL store patching the lab's Docker fleet:
leadership as issue 14 asks it to be shown.

- kill -9 of the leader mid-rollout: the standby leads within `ha.takeover`, reconciles
  what the dead one left, and finishes the window; every container ends on the new
  version, none is patched twice (journal and engine events agree), none is left stopped
  or renamed;
- SIGSTOP of the leader past its lease: the standby takes over; SIGCONT: the old leader
  writes no journal row and makes no call to the engine (the journal and the engine's
  events say so), and steps down;
- PostgreSQL stopped with `pg_ctl -m immediate` and started again mid-run: nothing is
  lost, the run finishes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker

from patchd.state.postgres import PostgresStore
from tests.conftest import wait_until
from tests.integration.daemon_helpers import (
    Daemon,
    daemon_config,
    held_health,
    on_version,
    run_patchd,
    scrape,
    web_group,
)
from tests.integration.docker_fleet import Fleet, free_port
from tests.pglab import PgLab

TAKEOVER = 8.0  # seconds: ha.takeover of both daemons (the lease lasts 60 % of it)


def _fleet(f: Fleet, short: str, count: int) -> tuple[list[str], str, str]:
    """`count` containers on v1 of image `short`, v2 published: (names, v1, v2)."""
    names = [f.name(f"{short}{i}") for i in range(count)]
    f.publish("app-v1", short)
    for i in range(count):
        f.run(f"{short}{i}", short)
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    return names, v1, f.publish("app-v2", short)


PORTS: dict[Path, int] = {}  # config -> its daemon's metrics port


def _node(
    f: Fleet, tmp: Path, node: str, url: str, group: dict[str, dict[str, Any]], takeover: float
) -> Path:
    """Node `node`'s own directory and config: the same database and window as the other."""
    home = tmp / node
    home.mkdir()
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    more = {"state": {"url": url}, "ha": {"node": node, "takeover": f"{takeover:g}s"}}
    port = free_port()
    config = daemon_config(
        home / "patchd.toml", f, home / "state", port, open_now, group, more=more
    )
    PORTS[config] = port
    return config


def _start(config: Path) -> Daemon:
    return Daemon(config, config.parent)


def _no_traceback(*daemons: Daemon) -> None:
    for daemon in daemons:
        daemon.log.flush()
        text = Path(daemon.log.name).read_text()
        assert "Traceback" not in text, text[text.index("Traceback") :][:3000]


def _metric(config: Path, line: str) -> bool:
    """The daemon of `config` exports exactly this sample line."""
    return line in scrape(PORTS[config]).splitlines()


def _event_at(daemon: Daemon, name: str) -> float | None:
    """When the daemon logged `name` first (epoch seconds), if it did."""
    for event in daemon.events():
        if event.get("event") == name:
            return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def _committed(url: str) -> Counter[str]:
    """Target name -> in how many runs it ended committed (by its run, or by a later
    leader's reconciliation of a target verified before its leader died)."""
    store = PostgresStore(url, readonly=True)
    try:
        return Counter(
            row.name
            for run in store.runs(limit=1000)
            for row in store.targets(run.id)
            if row.state == "committed"
        )
    finally:
        store.close()


def _rows(url: str) -> dict[tuple[str, str], list[str]]:
    """Every journal row: (run, target name) -> its "step/phase" in order."""
    store = PostgresStore(url, readonly=True)
    try:
        found = {}
        for run in store.runs(limit=1000):
            for row in store.targets(run.id):
                found[(run.id, row.name)] = [
                    f"{step}/{phase}" for step, phase, _ in store.journal(run.id, row.target)
                ]
        return found
    finally:
        store.close()


class EngineEvents:
    """The engine's container events about `names`, recorded live by a thread: the engine
    keeps only its last 256 events, fewer than a rollout's health checks make."""

    def __init__(self, client: docker.DockerClient, names: list[str]) -> None:
        self.names = names
        self.seen: list[tuple[float, str, str]] = []  # (time, action, name)
        self._stream = client.events(decode=True, filters={"type": "container"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with suppress(Exception):  # the stream ends when closed
            for event in self._stream:
                name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
                action = str(event.get("Action", ""))
                if any(name.startswith(n) for n in self.names):
                    self.seen.append((event.get("timeNano", 0) / 1e9, action, name))

    def close(self) -> None:
        self._stream.close()
        self._thread.join(10)

    def creates(self) -> Counter[str]:
        """Containers created under each name (one per patch)."""
        return Counter(name for _, action, name in self.seen if action == "create")

    def changes_since(self, since: float) -> list[str]:
        """Every change (not a health check's exec) to the containers since `since`."""
        return [
            f"{action} {name}"
            for at, action, name in self.seen
            if at >= since and not action.startswith(("exec_", "health_status"))
        ]


def _assert_fleet_done(f: Fleet, names: list[str], v2: str) -> None:
    for name in names:
        assert f.exists(name), f"{name} is missing"
        assert f.inspect(name)["State"]["Running"], f"{name} is not running"
        assert f.digest_of(name) == v2
    assert f.leftovers() == []  # nothing renamed aside or left stopped


def _wait_leader(daemon: Daemon, timeout: float = 120) -> None:
    wait_until(
        lambda: _event_at(daemon, "elected") is not None,
        timeout,
        "the daemon leads",
        give_up=daemon.exited,
    )


def test_kill_9_of_the_leader_mid_rollout(
    f: Fleet, tmp_path: Path, pg_url: str, docker_client: docker.DockerClient
) -> None:
    names, v1, v2 = _fleet(f, "ha", 5)
    engine = EngineEvents(docker_client, names)
    gate = tmp_path / "gate"
    group = web_group(f.token, 2, health=held_health(gate))
    first = _start(_node(f, tmp_path, "a", pg_url, group, TAKEOVER))
    second: Daemon | None = None
    try:
        _wait_leader(first)
        second = _start(_node(f, tmp_path, "b", pg_url, group, TAKEOVER))
        wait_until(lambda: second.saw("READY=1"), 120, "READY of b", give_up=second.exited)
        assert second.saw("STATUS=standby")
        # `patchd status` on b (through its daemon) names the leader from the lease row.
        shown = run_patchd("status", "--json", "-c", str(tmp_path / "b" / "patchd.toml"))
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["leader"]["node"] == "a"
        assert (doc["live"]["node"], doc["live"]["role"]) == ("b", "standby")  # who answered
        wait_until(
            lambda: len(list(gate.glob("*.probing"))) == 2,
            300,
            "two targets verifying on a",
            give_up=first.exited,
        )
        first.proc.kill()
        killed = time.time()
        first.proc.wait()
        (gate / "go").touch()  # the new leader's probes pass at once
        _wait_leader(second, TAKEOVER + 30)
        elected = _event_at(second, "elected")
        assert elected is not None
        assert elected - killed <= TAKEOVER, f"took over in {elected - killed:.1f}s"
        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2")
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in second.events()),
            120,
            "b's run ends",
        )
        taken = [e for e in second.events() if e["event"] == "took_over"]
        assert taken and taken[0]["during_run"] is True
        b = tmp_path / "b" / "patchd.toml"
        assert _metric(b, "patchd_ha_leader 1.0")
        assert _metric(b, 'patchd_ha_takeovers_total{during_run="true"} 1.0')
        assert any(
            x.startswith("patchd_ha_lease_age_seconds ") for x in scrape(PORTS[b]).splitlines()
        )
        reconciled = [e for e in second.events() if e["event"] == "reconciled"]
        assert sorted(e["now"] for e in reconciled) == ["rolled_back", "rolled_back"]
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(timeout=120) == 0
        _no_traceback(second)
    finally:
        first.close()
        if second is not None:
            second.close()
        engine.close()
    _assert_fleet_done(f, names, v2)
    rows = _rows(pg_url)
    committed = _committed(pg_url)
    applied = Counter(name for (_, name), states in rows.items() if "apply/intent" in states)
    assert committed == Counter(names), "each container committed exactly once"
    # The engine created one container per patch the journal recorded: the two the dead
    # leader had in flight twice (its attempt, rolled back by the new leader, and the new
    # leader's), every other one once. Nothing was patched behind the journal's back.
    assert engine.creates() == applied
    assert sorted(applied.values()) == [1, 1, 1, 2, 2]
    assert PostgresStore(pg_url, readonly=True).unfinished_targets() == []
    assert v1 != v2


def test_sigstop_of_the_leader_then_sigcont_touches_nothing(
    f: Fleet, tmp_path: Path, pg_url: str, docker_client: docker.DockerClient
) -> None:
    names, _, v2 = _fleet(f, "st", 4)
    engine = EngineEvents(docker_client, names)
    gate = tmp_path / "gate"
    group = web_group(f.token, 2, health=held_health(gate))
    first = _start(_node(f, tmp_path, "a", pg_url, group, TAKEOVER))
    second: Daemon | None = None
    try:
        _wait_leader(first)
        second = _start(_node(f, tmp_path, "b", pg_url, group, TAKEOVER))
        wait_until(lambda: second.saw("READY=1"), 120, "READY of b", give_up=second.exited)
        wait_until(
            lambda: len(list(gate.glob("*.probing"))) == 2,
            300,
            "two targets verifying on a",
            give_up=first.exited,
        )
        first.proc.send_signal(signal.SIGSTOP)  # a pause: a's probes go on, a does not
        stopped = time.time()
        _wait_leader(second, TAKEOVER + 30)
        elected = _event_at(second, "elected")
        assert elected is not None
        assert elected - stopped <= TAKEOVER, f"took over in {elected - stopped:.1f}s"
        (gate / "go").touch()
        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2 (by b)")
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in second.events()),
            120,
            "b's run ends",
        )
        before = _rows(pg_url)
        woken = time.time()
        first.proc.send_signal(signal.SIGCONT)
        # a finds its lease gone: its in-flight targets are left (to b, which has long
        # reconciled them), its run ends, it steps down.
        wait_until(
            lambda: (
                _event_at(first, "stepped_down") is not None
                and any(e["event"] == "run_finished" for e in first.events())
            ),
            60,
            "a steps down and its run ends",
            give_up=first.exited,
        )
        wait_until(lambda: first.saw("STATUS=standby"), 30, "a says it is a standby")
        time.sleep(2)  # room for a write or a call that should not come
        assert _rows(pg_url) == before, "the old leader wrote to the journal"
        assert engine.changes_since(woken) == [], "the old leader touched a container"
        a = tmp_path / "a" / "patchd.toml"
        assert _metric(a, "patchd_ha_leader 0.0")
        ended = [e for e in first.events() if e["event"] == "run_finished"]
        assert ended[0]["status"] == "stopped"
        for proc in (first.proc, second.proc):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        _no_traceback(first, second)
    finally:
        first.proc.send_signal(signal.SIGCONT)
        first.close()
        if second is not None:
            second.close()
        engine.close()
    _assert_fleet_done(f, names, v2)
    rows = _rows(pg_url)
    committed = _committed(pg_url)
    assert committed == Counter(names)
    assert engine.creates() == Counter(
        name for (_, name), states in rows.items() if "apply/intent" in states
    )
    assert PostgresStore(pg_url, readonly=True).unfinished_targets() == []


def test_postgres_crash_and_restart_mid_run_loses_nothing(
    f: Fleet, tmp_path: Path, pg: PgLab, pg_url: str
) -> None:
    names, _, v2 = _fleet(f, "pg", 4)
    gate = tmp_path / "gate"
    group = web_group(f.token, 2, health=held_health(gate))
    # A lease (60 % of takeover) longer than the restart: on a loaded 2-CPU machine a
    # crashed server takes up to about 7 s to accept connections again (recovery after
    # `immediate`); the leader must keep its lease throughout, its writes waiting.
    daemon = _start(_node(f, tmp_path, "a", pg_url, group, 30))
    try:
        _wait_leader(daemon)
        wait_until(
            lambda: len(list(gate.glob("*.probing"))) == 2,
            300,
            "two targets verifying",
            give_up=daemon.exited,
        )
        crashed = time.time()
        pg.stop("immediate")  # pg_ctl -m immediate: a crash, recovery at the next start
        time.sleep(1)
        (gate / "go").touch()  # the two verified now write while the database is down
        time.sleep(1)
        pg.start()
        outage = time.time() - crashed
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in daemon.events()),
            300,
            "the run ends",
            give_up=daemon.exited,
        )
        [ended] = [e for e in daemon.events() if e["event"] == "run_finished"]
        assert ended["status"] == "completed", ended
        assert _event_at(daemon, "stepped_down") is None, f"a {outage:.1f}s outage"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=120) == 0
        _no_traceback(daemon)
    finally:
        daemon.close()
    _assert_fleet_done(f, names, v2)
    store = PostgresStore(pg_url, readonly=True)
    [run] = store.runs("web")
    assert run.status == "completed" and run.succeeded == 4
    assert store.unfinished_targets() == []
    rows = _rows(pg_url)
    assert all(states[-1] == "commit/done" for states in rows.values())
    assert Counter(name for (name,) in [(n,) for (_, n) in rows]) == Counter(names)


# Failovers in the soak below: a few by default (the machine is shared); the 50
# with PATCHD_HA_SOAK_FAILOVERS=50 (about 15 minutes).
SOAK_FAILOVERS = int(os.environ.get("PATCHD_HA_SOAK_FAILOVERS", "4"))


def _count(daemon: Daemon, event: str, **fields: Any) -> int:
    return sum(
        1
        for e in daemon.events()
        if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
    )


@dataclass
class Soak:
    """The soak's two nodes and what it needs between rounds."""

    f: Fleet
    names: list[str]
    tmp: Path
    pg_url: str
    configs: dict[str, Path]
    daemons: dict[str, Daemon]
    rand: random.Random

    def round(self, number: int, leader: str, standby: str, version: str, trigger: bool) -> None:
        """One rollout to `version`: its leader is killed or paused at a random point of
        it, the standby takes over within TAKEOVER and finishes it."""
        old, new = self.daemons[leader], self.daemons[standby]
        where = f"round {number}"
        # The first rollout starts with the window, perhaps before this round began.
        applying = _count(old, "target_step", state="applying") if trigger else 0
        if trigger:
            config = str(self.configs[leader])
            wait_until(
                lambda: run_patchd("trigger", "web", "-c", config).returncode == 0,
                120,
                f"{where}: trigger on {leader}",
            )
        wait_until(
            lambda: _count(old, "target_step", state="applying") > applying,
            120,
            f"{where}: {leader} patches",
            give_up=old.exited,
        )
        time.sleep(self.rand.uniform(0, 3))  # anywhere in the rollout
        elected = _count(new, "elected")
        how = self.rand.choice(["kill", "pause"])
        gone = time.time()
        old.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        wait_until(
            lambda: _count(new, "elected") > elected,
            TAKEOVER + 30,
            f"{where}: {standby} takes over after the {how}",
            give_up=new.exited,
        )
        took = [e for e in new.events() if e["event"] == "elected"][-1]["timestamp"]
        took_s = datetime.fromisoformat(took.replace("Z", "+00:00")).timestamp() - gone
        assert took_s <= TAKEOVER, f"{where}: took over in {took_s:.1f}s after the {how}"
        if how == "kill":
            old.proc.wait()
            old.close()
            home = self.tmp / f"{leader}-{number}"
            home.mkdir()
            self.daemons[leader] = Daemon(self.configs[leader], home)
        else:
            stepped = _count(old, "stepped_down")
            old.proc.send_signal(signal.SIGCONT)
            wait_until(
                lambda: _count(old, "stepped_down") > stepped,
                60,
                f"{where}: the paused {leader} steps down",
            )
        wait_until(
            lambda: on_version(self.f, self.names, version),
            300,
            f"{where}: every container on the new version",
        )
        wait_until(
            lambda: PostgresStore(self.pg_url, readonly=True).unfinished_targets() == [],
            120,
            f"{where}: nothing unfinished",
        )


def test_failover_soak_loses_and_repeats_nothing(
    f: Fleet, tmp_path: Path, pg_url: str, docker_client: docker.DockerClient
) -> None:
    """Rollouts one after the other (the tag flips between v2 and v3), each with the
    leader killed (-9) or paused past its lease (then woken: it must step down) at a
    random point of it; the other node takes over and finishes."""
    names, _, v2 = _fleet(f, "sk", 6)
    v3 = f.publish("app-v3", "sk")
    f.publish("app-v2", "sk")  # the first rollout installs v2 (the window is open)
    engine = EngineEvents(docker_client, names)
    group = web_group(f.token, 2)
    soak = Soak(
        f,
        names,
        tmp_path,
        pg_url,
        {n: _node(f, tmp_path, n, pg_url, group, TAKEOVER) for n in ("a", "b")},
        {},
        random.Random(int(os.environ.get("PATCHD_HA_SOAK_SEED", "14"))),
    )
    soak.daemons["a"] = _start(soak.configs["a"])
    leader, standby, version = "a", "b", v2
    try:
        _wait_leader(soak.daemons["a"])
        soak.daemons["b"] = _start(soak.configs["b"])
        wait_until(lambda: soak.daemons["b"].saw("READY=1"), 120, "READY of b")
        for number in range(SOAK_FAILOVERS):
            if number > 0:
                version = v3 if version == v2 else v2
                f.publish("app-v3" if version == v3 else "app-v2", "sk")
            soak.round(number, leader, standby, version, trigger=number > 0)
            leader, standby = standby, leader
        for daemon in soak.daemons.values():
            daemon.proc.send_signal(signal.SIGTERM)
            assert daemon.proc.wait(timeout=120) == 0
        _no_traceback(*soak.daemons.values())
    finally:
        for daemon in soak.daemons.values():
            daemon.proc.send_signal(signal.SIGCONT)
            daemon.close()
        engine.close()
    _assert_fleet_done(f, names, version)
    rows = _rows(pg_url)
    committed = _committed(pg_url)
    applied = Counter(name for (_, name), states in rows.items() if "apply/intent" in states)
    # Each rollout committed each container once: SOAK_FAILOVERS rollouts, no repeat.
    assert committed == Counter({n: SOAK_FAILOVERS for n in names})
    assert engine.creates() == applied  # no patch the journal does not know of
