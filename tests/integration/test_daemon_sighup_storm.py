"""SIGHUPs at `patchd daemon` during a real Docker patch run: one the instant READY=1
arrives (as `systemctl start patchd && systemctl reload patchd` would send it), 30 while
the config on disk is broken or has changed settings, then a burst of 300.

Checked: the daemon neither exits nor hangs nor logs a traceback; a broken config is
refused and the last good one keeps running (`patchd_config_last_reload_successful` goes
0, then 1 again, and `patchd_group_snapshot_keep_seconds` shows the last good
`snapshot.keep`); every reload is announced RELOADING=1 and closed by READY=1 on the
notify socket, in pairs; the run in flight ends with every container on the new version
(or rolled back), each one exactly once, no snapshot left, and a journal with nothing
unfinished.

What it caught: a SIGHUP right after READY=1 ended the process (handlers were installed
after READY); in a burst, a handler calling Event.set() while the main thread held that
Event's lock recursed and crashed the daemon, or hung it; reloads dropped RELOADING/READY
when the notify queue was full.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd.state import SqliteStore
from tests.conftest import wait_until
from tests.integration.daemon_helpers import Daemon, daemon_config, scrape, web_group
from tests.integration.docker_fleet import Fleet, free_port

SIGNALS = 30
BURST = 300
KEEP_METRIC = 'patchd_group_snapshot_keep_seconds{backend="lab",group="web"}'


def broken(kind: int, text: str) -> str:
    """A broken variant of the config `text` (broken as text: one is a TOML error)."""
    if kind == 0:
        bad = text + "\n[daemon\n"  # TOML syntax
    elif kind == 1:
        bad = text.replace('window = "soon"', 'window = "nightly"')  # unknown window
    else:
        bad = text.replace('timeout = "120s"', 'timeout = "120 parsecs"')  # bad duration
    assert bad != text
    return bad


def test_a_sighup_storm_during_a_run_keeps_the_daemon_and_the_fleet_whole(
    f: Fleet, tmp_path: Path
) -> None:
    names = [f.name(f"h{i}") for i in range(6)]
    f.publish("app-v1", "h")
    for i in range(6):
        f.run(f"h{i}", "h")
    f.wait_healthy(*names)
    v1 = f.digest_of(names[0])
    v2 = f.publish("app-v2", "h")
    port = free_port()
    config = tmp_path / "patchd.toml"
    new = config.with_suffix(".new")
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    daemon_config(config, f, tmp_path / "state", port, open_now, web_group(f.token, 2))
    base = config.read_text()

    def put_valid(i: int) -> None:
        # A new backend timeout makes a new backend object at each reload; the keep is
        # visible in the metrics.
        daemon_config(
            new,
            f,
            tmp_path / "state",
            port,
            open_now,
            web_group(f.token, 2, snapshot={"keep": f"{100 + i}s"}),
            backend_timeout=f"{30 + i}s",
        )
        os.replace(new, config)  # as an editor that saves atomically

    def put_broken(kind: int) -> None:
        new.write_text(broken(kind, base))
        os.replace(new, config)

    def applied(i: int) -> bool:
        text = scrape(port)
        if i % 3 == 1:
            return "patchd_config_last_reload_successful 0.0" in text
        return f"{KEEP_METRIC} {100 + i}.0" in text and "reload_successful 1.0" in text

    sighups: list[int] = []

    def sighup_at_ready(message: str) -> None:
        # As `systemctl start patchd && systemctl reload patchd` would: the instant the
        # first READY=1 arrives (this runs in the thread reading the socket).
        if message.startswith("READY=1") and not sighups:
            sighups.append(1)
            daemon.proc.send_signal(signal.SIGHUP)

    daemon = Daemon(config, tmp_path, on_notify=sighup_at_ready)
    try:
        wait_until(lambda: sighups, 120, "READY=1", give_up=daemon.exited)
        wait_until(
            lambda: any(e.get("state") == "applying" for e in daemon.events()),
            300,
            "a patch (after a SIGHUP right at READY=1)",
            give_up=daemon.exited,
        )
        last_good = 0
        for i in range(SIGNALS):
            if i % 3 == 1:
                put_broken(i // 3 % 3)
            else:
                put_valid(i)
                last_good = i
            daemon.proc.send_signal(signal.SIGHUP)
            if i % 10 == 4 or i == SIGNALS - 1:  # now and then, wait for that reload
                wait_until(lambda i=i: applied(i), 120, f"reload {i} done", give_up=daemon.exited)
            else:
                # The storm's rhythm (not a wait): some back to back, coalesced.
                time.sleep(0.1 if i % 2 else 0.02)
            assert daemon.proc.poll() is None, f"the daemon exited after SIGHUP {i}"
        # The storm ends on a broken config and a burst: the last good config stays.
        put_broken(0)
        for _ in range(BURST):
            daemon.proc.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        wait_until(
            lambda: "patchd_config_last_reload_successful 0.0" in scrape(port),
            120,
            "the last, broken reload refused",
            give_up=daemon.exited,
        )
        assert f"{KEEP_METRIC} {100 + last_good}.0" in scrape(port)
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in daemon.events()),
            300,
            "run end",
            give_up=daemon.exited,
        )
        put_valid(SIGNALS)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                f"{KEEP_METRIC} {100 + SIGNALS}.0" in scrape(port)
                and "patchd_config_last_reload_successful 1.0" in scrape(port)
            ),
            120,
            "the good config after the storm",
            give_up=daemon.exited,
        )
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=120) == 0
        # After the exit: every message the daemon sent is read or still queued (the
        # READY=1 of that last reload may come after the metric changed).
        messages = daemon.drain()
        events = daemon.events()
    finally:
        daemon.close()

    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log
    assert not [e for e in events if e["event"] == "run_crashed"]
    failed = [e for e in events if e["event"] == "reload_failed"]
    reloaded = [e for e in events if e["event"] == "reloaded"]
    assert len(failed) >= 2 and len(reloaded) >= 2
    assert len(failed) + len(reloaded) <= 1 + SIGNALS + BURST + 1

    # Every reload is a RELOADING=1 ... READY=1 pair, after the first READY=1.
    marks = [m.split("\n")[0] for m in messages if m.startswith(("RELOADING=1", "READY=1"))]
    assert marks[0] == "READY=1"
    pairs = marks[1:]
    assert pairs == ["RELOADING=1", "READY=1"] * (len(failed) + len(reloaded)), (
        len(failed) + len(reloaded),
        marks,
    )

    [first, *_] = [e for e in events if e["event"] == "run_finished"]
    assert first["status"] == "completed", first
    for name in names:
        assert f.exists(name), f"{name} is missing"
        assert f.inspect(name)["State"]["Running"], f"{name} is not running"
        assert f.digest_of(name) in (v1, v2)
    assert f.leftovers() == []
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    assert store.unfinished_targets() == []
    run = store.runs("web")[-1]
    ended = {row.name: row.state for row in store.targets(run.id)}
    assert set(ended) == set(names)
    for name, state in ended.items():
        assert (state, f.digest_of(name)) in (("committed", v2), ("rolled_back", v1)), name
