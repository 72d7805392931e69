#!/usr/bin/env python3
"""Takeover time: two `patchd daemon` processes on one PostgreSQL store, the leader
killed with SIGKILL --kills times; how long until the other one leads.

Each round: wait a random part of a renewal period (so kills land anywhere between two
renewals), SIGKILL the leader, and read the standby's JSON log for its `elected` event;
the takeover time is that event's timestamp minus the instant of the kill. The killed
node is then started again (it becomes the standby of the next round). The daemons have
no backend and no group: only leadership is measured, not reconciliation.

Target: every takeover within `ha.takeover` (--takeover, default 15 s, the default of
the config). Prints the median and the maximum with every figure, and exits 1 when a
takeover took longer.

    .venv/bin/python bench/takeover.py [--kills 20] [--takeover 15]

Needs only the test bed's PostgreSQL (tests/lab/postgres.sh), started here if it is not
up (and stopped again at the end) in $PATCHD_BENCH_LAB_DIR, else $PATCHD_LAB_DIR, else
/tmp/patchd-lab-bench. Everything else (configs, logs, a database) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import free_port, lab_dir, note, ratio_line, say

# The tests' config builder (benchlib put the repository on sys.path).
from tests.conftest import write_config


class Node:
    def __init__(self, name: str, config: Path, log: Path) -> None:
        self.name, self.config, self.log = name, config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "patchd.cli", "daemon", "-c", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def events(self, name: str) -> list[float]:
        """Timestamps (epoch seconds) of every `name` event in this node's log."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                with_ts = json.loads(line)
                if with_ts.get("event") == name:
                    stamp = with_ts["timestamp"].replace("Z", "+00:00")
                    found.append(datetime.fromisoformat(stamp).timestamp())
        return found


def wait_for(node: Node, event: str, count: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = node.events(event)
        if len(seen) >= count:
            return seen[count - 1]
        if node.proc is not None and node.proc.poll() is not None:
            raise SystemExit(f"{node.name} exited ({node.proc.returncode}); see {node.log}")
        time.sleep(0.05)
    raise SystemExit(f"{node.name}: no {event} #{count} within {timeout:g}s; see {node.log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--takeover", type=float, default=15.0)
    args = parser.parse_args()
    os.environ.setdefault("PATCHD_LAB_DIR", str(lab_dir()))
    from tests.pglab import ensure_up, stop_if_started

    pg = ensure_up()
    url = pg.create_database("bench_takeover")
    tmp = Path(tempfile.mkdtemp(prefix="patchd-takeover-"))
    nodes = []
    for name in ("a", "b"):
        config = write_config(
            tmp / name / "patchd.toml",
            {
                "daemon": {
                    "state_dir": tmp / name / "state",
                    "metrics_address": f"127.0.0.1:{free_port()}",
                    "log_format": "json",
                },
                "state": {"url": url},
                "ha": {"node": name, "takeover": f"{args.takeover:g}s"},
            },
        )
        nodes.append(Node(name, config, tmp / name / "daemon.log"))
    renew = 0.6 * args.takeover / 3
    times: list[float] = []
    try:
        leader, standby = nodes
        leader.start()
        wait_for(leader, "elected", 1, 60)
        standby.start()
        wait_for(standby, "started", 1, 60)
        for round_ in range(args.kills):
            time.sleep(renew + random.uniform(0, renew))  # anywhere between two renewals
            before = len(standby.events("elected"))
            killed = time.time()
            leader.kill()
            elected = wait_for(standby, "elected", before + 1, 3 * args.takeover)
            times.append(elected - killed)
            note(f"kill {round_ + 1}/{args.kills}: {standby.name} led {times[-1]:.2f}s later")
            started = len(leader.events("started"))
            leader.start()  # back as the standby
            wait_for(leader, "started", started + 1, 60)
            leader, standby = standby, leader
    finally:
        for node in nodes:
            node.kill()
        pg.drop_database(url)
        stop_if_started(pg)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    median, worst = statistics.median(times), max(times)
    ok = worst <= args.takeover
    say(
        ratio_line(
            "takeover",
            worst / args.takeover,
            f"max <= ha.takeover = {args.takeover:g}s",
            ok,
            f"median {median:.2f}s, max {worst:.2f}s, min {min(times):.2f}s over"
            f" {len(times)} kills (SIGKILL of the leader -> `elected` on the standby)",
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
