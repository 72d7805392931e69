#!/usr/bin/env python3
"""Figure 5: `patchd plan` over Debian machines (ssh backend) against a bare ssh loop.

Needs the test bed with at least --machines Debian machines (`PATCHD_LAB_MACHINES=12
tests/lab/lab.sh up`; a bed this script starts itself gets them). Every machine gets a
package of this run at 1.0, then 1.1 is published, so each has exactly one pending update.

- patchd: `.venv/bin/patchd plan GROUP --json` as a process (start, config, SSH logins
  and the checks included), for a group of the ssh backend over the machines with
  `max_concurrency` = --concurrency. Each machine's check is one SSH connection running
  `apt-get update` then `apt-get -s dist-upgrade`. The plan must list every machine with
  an update to patch.
- floor (the figure's denominator): a bare loop, --concurrency OpenSSH clients at once,
  each `ssh root@HOST 'apt-get update -q && apt-get -s dist-upgrade'`: the same work on
  the machines with nothing around it.
- literal: the loop of the issue's wording, `ssh root@HOST apt-get -s dist-upgrade`
  (no refresh of the package lists, so not the same work: printed for reference only).

The three are interleaved (order rotated each round) --rounds times; the figures are
medians of wall time. Target: patchd/floor <= 1.2x.

    .venv/bin/python bench/plan_ssh.py [--machines 12] [--concurrency 6] [--rounds 5]
        [--keep-lab]

Exit status 0 when the target is met and every plan was complete, 1 if not.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

from tests.conftest import write_config
from tests.lab.aptrepo import AptRepo

TARGET = 1.2


class Machines:
    def __init__(self, env: dict[str, str], count: int) -> None:
        names = env.get("PATCHD_LAB_MACHINE_NAMES", "").split()
        if len(names) < count:
            raise SystemExit(
                f"bench: the bed has {len(names)} machine(s), {count} needed: start it with"
                f" PATCHD_LAB_MACHINES={count} (tests/lab/lab.sh down, then up)"
            )
        addresses = env["PATCHD_LAB_MACHINE_ADDRESSES"].split()
        self.addresses = dict(list(zip(names, addresses, strict=True))[:count])
        self.key = env["PATCHD_LAB_MACHINE_KEY"]
        self.known_hosts = env["PATCHD_LAB_MACHINE_KNOWN_HOSTS"]
        self.repo = AptRepo(Path(env["PATCHD_LAB_APT_DIR"]), env["PATCHD_LAB_APT_URL"])

    def ssh(self, name: str, command: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "ssh", "-i", self.key, "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
            f"root@{self.addresses[name]}", command,
        ]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    def each(self, command: str, concurrency: int) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(lambda name: self.ssh(name, command), self.addresses))


def loop(machines: Machines, command: str, concurrency: int) -> float:
    started = time.monotonic()
    results = machines.each(command, concurrency)
    seconds = time.monotonic() - started
    failed = [r for r in results if r.returncode != 0 or "Inst " not in r.stdout]
    if failed:
        raise SystemExit(f"bench: the ssh loop failed: {failed[0].stderr[-500:]}")
    return seconds


def plan(config: Path, group: str, count: int) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        [str(benchlib.PATCHD), "plan", group, "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: patchd plan exited {proc.returncode}: {proc.stderr[-800:]}")
    [doc] = json.loads(proc.stdout)["groups"]
    actions = [t.get("action") for t in doc["targets"]]
    if actions != ["patch"] * count:
        errors = [t.get("error") for t in doc["targets"] if t.get("action") != "patch"]
        raise SystemExit(f"bench: the plan is not complete: {actions} {errors[:2]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--machines", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep-lab", action="store_true")
    args = parser.parse_args()

    with benchlib.lab(keep=args.keep_lab) as env:
        machines = Machines(env, args.machines)
        workdir = Path(tempfile.mkdtemp(prefix="patchd-bench-plan-"))
        pkg = f"lab-bench-{secrets.token_hex(3)}"
        try:
            benchlib.note(f"bench: {pkg} 1.0 on {args.machines} machines, then 1.1 published")
            machines.repo.good(pkg, "1.0")
            install = (
                "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive"
                f" apt-get install -y -q {shlex.quote(pkg + '=1.0')} >/dev/null"
            )
            bad = [r for r in machines.each(install, args.concurrency) if r.returncode]
            if bad:
                raise SystemExit(f"bench: installing 1.0 failed: {bad[0].stderr[-500:]}")
            machines.repo.good(pkg, "1.1")
            later = datetime.now(UTC) + timedelta(hours=6)
            config = write_config(
                workdir / "patchd.toml",
                {
                    "daemon": {"state_dir": workdir / "state", "log_format": "json"},
                    "windows": {
                        "later": {"cron": f"{later.minute} {later.hour} * * *", "duration": "1h"}
                    },
                    "backends": {
                        "machines": {
                            "type": "ssh",
                            "hosts": [
                                {"name": n, "address": a} for n, a in machines.addresses.items()
                            ],
                            "ssh": {
                                "identity_file": machines.key,
                                "known_hosts": machines.known_hosts,
                            },
                        }
                    },
                    "groups": {
                        "fleet": {
                            "backend": "machines",
                            "window": "later",
                            "max_concurrency": args.concurrency,
                        }
                    },
                },
            )
            same = "apt-get update -q && apt-get -s dist-upgrade"
            literal = "apt-get -s dist-upgrade"
            runs: dict[str, list[float]] = {"patchd": [], "floor": [], "literal": []}
            kinds = list(runs)
            for index in range(args.rounds):
                order = kinds[index % 3 :] + kinds[: index % 3]
                for kind in order:
                    if kind == "patchd":
                        seconds = plan(config, "fleet", args.machines)
                    else:
                        command = same if kind == "floor" else literal
                        seconds = loop(machines, command, args.concurrency)
                    runs[kind].append(seconds)
                    benchlib.note(f"bench: round {index + 1} {kind}: {seconds:.2f}s")
        finally:
            machines.repo.withdraw(pkg)
            purge = f"DEBIAN_FRONTEND=noninteractive apt-get purge -y -q {pkg} >/dev/null"
            machines.each(purge + " ; apt-get update -q >/dev/null", args.concurrency)
            subprocess.run(["rm", "-rf", str(workdir)], check=False)

    med = {kind: statistics.median(values) for kind, values in runs.items()}
    ratio = med["patchd"] / med["floor"]
    ok = ratio <= TARGET
    size = f"{args.machines} machines, concurrency {args.concurrency}, {args.rounds} rounds"
    benchlib.say(
        benchlib.ratio_line(
            "plan_ssh patchd/floor",
            ratio,
            f"<= {TARGET}x",
            ok,
            f"patchd plan {med['patchd']:.2f}s vs ssh loop (apt-get update + -s dist-upgrade)"
            f" {med['floor']:.2f}s, medians; {size}",
        )
    )
    benchlib.say(
        benchlib.ratio_line(
            "plan_ssh patchd/literal",
            med["patchd"] / med["literal"],
            None,
            True,
            f"against `ssh HOST apt-get -s dist-upgrade` alone {med['literal']:.2f}s"
            " (no apt-get update: less work than a plan does)",
        )
    )
    for kind, values in runs.items():
        benchlib.say(f"plan_ssh {kind} runs: " + " ".join(f"{v:.2f}s" for v in values))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
