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
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd.state import SqliteStore
from tests.integration.daemon_helpers import GROUP, Daemon, scrape, write_config
from tests.integration.docker_fleet import Fleet, free_port

SIGNALS = 30
BURST = 300
KEEP_METRIC = 'patchd_group_snapshot_keep_seconds{backend="lab",group="web"}'
BROKEN = [
    lambda text: text + "\n[daemon\n",  # TOML syntax
    lambda text: text.replace('window = "soon"', 'window = "nightly"'),  # unknown window
    lambda text: text.replace('timeout = "20s"', 'timeout = "20 parsecs"'),  # bad duration
]


def until(daemon: Daemon, check: Callable[[], object], timeout: float, what: str) -> None:
    """wait_for without draining the notify socket (the Drainer does, in order), and
    failing at once if the daemon is gone."""
    deadline = time.monotonic() + timeout
    while not check():
        code = daemon.proc.poll()
        assert code is None, f"the daemon exited ({code}) while waiting for {what}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def sighup_at_ready(daemon: Daemon, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            message = daemon.sock.recv(4096).decode()
        except TimeoutError:
            continue
        daemon.messages.append(message)
        if message.startswith("READY=1"):
            daemon.proc.send_signal(signal.SIGHUP)
            return
    raise AssertionError(f"no READY=1 in {timeout}s")


class Drainer(threading.Thread):
    """Reads the notify socket all the time: it holds only 10 datagrams here
    (net.unix.max_dgram_qlen), and the daemon waits at most 1 s for room for READY and
    RELOADING, so a test that looked away for long would lose some."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.d = daemon
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.d.drain()

    def stop(self) -> None:
        self.done.set()
        self.join()


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
    open_now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    write_config(
        config, f, tmp_path / "state", port, open_now, GROUP.format(token=f.token, concurrency=2)
    )
    base = config.read_text()

    def put(text: str) -> None:
        new = config.with_suffix(".new")
        new.write_text(text)
        os.replace(new, config)  # as an editor that saves atomically

    def valid(i: int) -> str:
        # A new backend timeout makes a new backend object at each reload; the keep is
        # visible in the metrics.
        return base.replace('timeout = "30s"', f'timeout = "{30 + i}s"').replace(
            "max_errors = 2", f'max_errors = 2\nsnapshot = {{ keep = "{100 + i}s" }}'
        )

    def applied(i: int) -> bool:
        text = scrape(port)
        if i % 3 == 1:
            return "patchd_config_last_reload_successful 0.0" in text
        return f"{KEEP_METRIC} {100 + i}.0" in text and "reload_successful 1.0" in text

    daemon = Daemon(config, tmp_path)
    drainer = Drainer(daemon)
    try:
        sighup_at_ready(daemon, 15)
        drainer.start()
        until(
            daemon,
            lambda: any(e.get("state") == "applying" for e in daemon.events()),
            30,
            "a patch (after a SIGHUP right at READY=1)",
        )
        last_good = 0
        for i in range(SIGNALS):
            if i % 3 == 1:
                put(BROKEN[i // 3 % len(BROKEN)](base))
            else:
                put(valid(i))
                last_good = i
            daemon.proc.send_signal(signal.SIGHUP)
            if i % 10 == 4 or i == SIGNALS - 1:  # now and then, wait for that reload
                until(daemon, lambda i=i: applied(i), 15, f"reload {i} done")
            else:
                time.sleep(0.1 if i % 2 else 0.02)  # some back to back, coalesced
            assert daemon.proc.poll() is None, f"the daemon exited after SIGHUP {i}"
        # The storm ends on a broken config and a burst: the last good config stays.
        put(BROKEN[0](base))
        for _ in range(BURST):
            daemon.proc.send_signal(signal.SIGHUP)
            time.sleep(0.002)
        until(
            daemon,
            lambda: "patchd_config_last_reload_successful 0.0" in scrape(port),
            15,
            "the last, broken reload refused",
        )
        assert f"{KEEP_METRIC} {100 + last_good}.0" in scrape(port)
        until(
            daemon,
            lambda: any(e["event"] == "run_finished" for e in daemon.events()),
            90,
            "run end",
        )
        put(valid(SIGNALS))
        daemon.proc.send_signal(signal.SIGHUP)
        until(
            daemon,
            lambda: (
                f"{KEEP_METRIC} {100 + SIGNALS}.0" in scrape(port)
                and "patchd_config_last_reload_successful 1.0" in scrape(port)
            ),
            15,
            "the good config after the storm",
        )
        time.sleep(0.5)  # the READY=1 of that reload
        drainer.stop()
        assert daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0
        events = daemon.events()
    finally:
        drainer.done.set()
        daemon.close()

    log = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log
    assert not [e for e in events if e["event"] == "run_crashed"]
    failed = [e for e in events if e["event"] == "reload_failed"]
    reloaded = [e for e in events if e["event"] == "reloaded"]
    assert len(failed) >= 2 and len(reloaded) >= 2
    assert len(failed) + len(reloaded) <= 1 + SIGNALS + BURST + 1

    # Every reload is a RELOADING=1 ... READY=1 pair, after the first READY=1.
    marks = [m.split("\n")[0] for m in daemon.messages if m.startswith(("RELOADING=1", "READY=1"))]
    assert marks[0] == "READY=1"
    pairs = marks[1:]
    assert pairs == ["RELOADING=1", "READY=1"] * (len(failed) + len(reloaded)), marks

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
