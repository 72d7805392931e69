#!/usr/bin/env python3
"""Figure: per-container downtime on Docker, patchd against the straight-line floor.

For each CONTAINERS x CONCURRENCY of --sizes x --concurrency (default 20,40 x 1,5,8),
and then for the broken version (--broken N:C, default 20:5; `--broken ""` for none),
patchd and the floor each patch a fresh fleet of their own, one right after the other
(the order alternates from one pair to the next), interleaved in one run of this script.
The fleets are those of fleet_throughput.py: N busybox containers with a HEALTHCHECK
probing every 1 s (init, network none), running v1 of their own registry repository,
v2 published as `:stable` and absent from the engine.

- patchd: `.venv/bin/patchd run bench --now` with `max_concurrency = C` (`max_errors = N`,
  or 1 for the broken version), timed from process start to exit.
- the floor: a minimal docker SDK script in its own process, timed the same way: pull
  once, then with C threads per container stop -> rename -> create -> start -> wait
  healthy (inspect every --floor-poll s) -> remove the old one. On the broken version,
  a container that turns unhealthy is put back (stop and remove the new one, rename the
  old one back, start it, wait until it is healthy) and no container starts after the
  first failure (max_errors 1), as patchd does.

Downtime of a container is read from the engine's own event stream, the same way for
both sides: from the `die` of the container it ran to the first `health_status:
healthy` of a container under its name after that (the new one, or on the broken
version the old one put back). Time-to-restore on the broken version is the wall time
of the process: it ends once the batch in flight is back on v1 and healthy.

    .venv/bin/python bench/downtime.py [--sizes 20,40] [--concurrency 1,5,8]
        [--broken 20:5] [--rounds 1] [--floor-poll 0.1] [--keep-lab]

Prints per pair `downtime[N=..,C=..]: patchd/floor wall = …x, downtime = …x` with the
raw figures, and for the broken version the time-to-restore ratio. Targets (issue 16):
at N=20, C=5 wall and mean downtime <= 1.10x; on the broken version time-to-restore
<= 1.2x; patchd polls a container's health no less often than the floor. Exit 1 when a
target is missed. Containers and images are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import fleet_throughput as ft

# The tests' config builder (benchlib put the repository on sys.path).
from tests.conftest import write_config

SECOND = 10**9
WALL_TARGET = 1.10
DOWNTIME_TARGET = 1.10
RESTORE_TARGET = 1.2


def broken_conf(version: int, fleet: str) -> dict[str, Any]:
    """A v2 that starts but never turns healthy (its healthcheck's file is never made)."""
    conf = ft.app_conf(version, fleet)
    conf["Cmd"] = ["sh", "-c", f"echo {version} > /tmp/version; exec sleep 86400"]
    return conf


class BenchFleet(ft.Fleet):
    """fleet_throughput's fleet; with `broken`, v2 fails its healthcheck."""

    broken = False

    def _commit(self, version: int) -> str:
        if not (self.broken and version == 2):
            return super()._commit(version)
        seed = self.api.create_container(self.base, command=["true"])["Id"]
        try:
            conf = broken_conf(version, self.id)
            tag = f"{self.id}-v{version}"
            return str(self.api.commit(seed, ft.LOCAL, tag, conf=conf, pause=False)["Id"])
        finally:
            self.api.remove_container(seed, force=True)

    def check_restored(self) -> str:
        """Every container on v1 and healthy, nothing else left; '' or what is wrong."""
        problems = []
        for name in self.names:
            attrs = self.api.inspect_container(name)
            if attrs["Image"] != self.v1 or not ft.is_healthy(attrs):
                problems.append(f"{name}: image {attrs['Image'][:19]}")
        listed = self.api.containers(all=True, filters={"label": f"{ft.LABEL}={self.id}"})
        if len(listed) != len(self.names):
            problems.append(f"{len(listed)} containers with the label, not {len(self.names)}")
        return "; ".join(problems[:3])


class Downtime:
    """Reads the engine's events for one fleet: die of the old -> healthy under the name."""

    def __init__(self, api: Any, fleet: BenchFleet) -> None:
        self.fleet = fleet
        self.original = {n: api.inspect_container(n)["Id"] for n in fleet.names}
        self.events: list[dict[str, Any]] = []
        self.stream = api.events(
            since=int(time.time()) - 1,
            filters={"type": "container", "label": f"{ft.LABEL}={fleet.id}"},
            decode=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.events.append(event)
        except Exception:
            pass  # closed

    def stop(self) -> dict[str, float]:
        time.sleep(0.5)  # let the last events arrive
        self.stream.close()
        self.thread.join(5)
        died: dict[str, float] = {}
        back: dict[str, float] = {}
        by_id = {cid: name for name, cid in self.original.items()}
        for event in self.events:
            at = event.get("timeNano", 0) / 1e9
            name = (event.get("Actor") or {}).get("Attributes", {}).get("name", "")
            status = str(event.get("status") or event.get("Action") or "")
            if status == "die" and event.get("id") in by_id:
                died.setdefault(by_id[event["id"]], at)
            elif status == "health_status: healthy" and name in died and name not in back:
                back[name] = at
        self.first_die = min(died.values(), default=float("nan"))
        self.last_back = max(back.values(), default=float("nan"))
        return {name: back[name] - died[name] for name in died if name in back}


def write_patchd_config(
    path: Path, state: Path, host: str, fleet: BenchFleet, c: int, max_errors: int
) -> Path:
    return write_config(
        path,
        {
            "daemon": {"state_dir": state, "log_format": "json", "log_level": "warning"},
            "windows": {"never-now": {"cron": "0 3 1 1 *", "duration": "1h"}},
            "backends": {"lab": {"type": "docker", "url": host, "timeout": "60s"}},
            "groups": {
                "bench": {
                    "backend": "lab",
                    "window": "never-now",
                    "select": {"labels": {ft.LABEL: fleet.id}},
                    "max_concurrency": c,
                    "max_errors": max_errors,
                    "health": {"timeout": "60s", "stable_for": "1s"},
                }
            },
        },
    )


def run_patchd(workdir: Path, host: str, fleet: BenchFleet, c: int) -> dict[str, Any]:
    config, state = workdir / f"{fleet.id}.toml", workdir / f"state-{fleet.id}"
    max_errors = 1 if fleet.broken else len(fleet.names)
    write_patchd_config(config, state, host, fleet, c, max_errors)
    argv = [str(benchlib.PATCHD), "run", "bench", "--now", "-c", str(config)]
    t0, began, cpu0 = time.perf_counter(), time.time(), children_cpu()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall, ended, cpu = time.perf_counter() - t0, time.time(), children_cpu() - cpu0
    expected = 1 if fleet.broken else 0
    if proc.returncode != expected:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"bench: patchd run exited {proc.returncode}, expected {expected}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("run ")]
    return {
        "wall": wall,
        "last": last[-1] if last else "",
        "began": began,
        "ended": ended,
        "cpu": cpu,
    }


def run_floor(host: str, fleet: BenchFleet, c: int, poll: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--floor-worker", host, fleet.repo, fleet.id]
    argv += ["--floor-concurrency", str(c), "--floor-poll", str(poll)]
    if fleet.broken:
        argv.append("--floor-broken")
    t0, began, cpu0 = time.perf_counter(), time.time(), children_cpu()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall, ended, cpu = time.perf_counter() - t0, time.time(), children_cpu() - cpu0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench: floor exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result.update(wall=wall, began=began, ended=ended, cpu=cpu)
    return result


def floor_worker(host: str, repo: str, fleet_id: str, c: int, poll: float, broken: bool) -> int:
    """The straight-line floor (see the module's doc); prints counts as JSON."""
    import docker

    api = docker.APIClient(base_url=host, version="auto", timeout=60)
    ref = f"{repo}:stable"
    for event in api.pull(repo, tag="stable", stream=True, decode=True):
        if "error" in event:
            raise SystemExit(f"pull: {event['error']}")
    listed = api.containers(filters={"label": f"{ft.LABEL}={fleet_id}"})
    failed = threading.Event()
    counts = {"patched": 0, "restored": 0, "not started": 0}
    lock = threading.Lock()

    def wait_healthy(cid: str) -> bool:
        deadline = time.monotonic() + 60
        while True:
            state = api.inspect_container(cid)["State"]
            status = (state.get("Health") or {}).get("Status")
            if status == "healthy":
                return True
            if status == "unhealthy" or not state.get("Running"):
                return False
            if time.monotonic() > deadline:
                raise SystemExit(f"{cid}: not healthy in 60 s")
            time.sleep(poll)

    def patch(item: dict[str, Any]) -> None:
        if failed.is_set():
            with lock:
                counts["not started"] += 1
            return
        name = item["Names"][0].lstrip("/")
        api.stop(item["Id"], timeout=10)
        api.rename(item["Id"], f"{name}.old")
        host_config = api.create_host_config(init=True, network_mode="none")
        new = api.create_container(
            ref, name=name, labels={ft.LABEL: fleet_id}, host_config=host_config
        )
        api.start(new["Id"])
        if wait_healthy(new["Id"]):
            api.remove_container(item["Id"], force=True)
            key = "patched"
        else:
            failed.set()
            api.stop(new["Id"], timeout=10)
            api.remove_container(new["Id"], force=True)
            api.rename(item["Id"], name)
            api.start(item["Id"])
            if not wait_healthy(item["Id"]):
                raise SystemExit(f"{name}: the old container is not healthy again")
            key = "restored"
        with lock:
            counts[key] += 1

    with ThreadPoolExecutor(max_workers=c) as pool:
        list(pool.map(patch, listed))
    print(json.dumps(counts))
    return 0


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="20,40")
    parser.add_argument("--concurrency", default="1,5,8")
    parser.add_argument("--broken", default="20:5", help="N:C for the broken version, or ''")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--floor-poll", type=float, default=0.1)
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument("--floor-worker", nargs=3, metavar=("HOST", "REPO", "FLEET"))
    parser.add_argument("--floor-concurrency", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--floor-broken", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_worker:
        return floor_worker(
            *args.floor_worker, args.floor_concurrency, args.floor_poll, args.floor_broken
        )
    plan = [
        (n, c, False)
        for n in (int(x) for x in args.sizes.split(",") if x)
        for c in (int(x) for x in args.concurrency.split(",") if x)
    ]
    if args.broken:
        n, c = (int(x) for x in args.broken.split(":"))
        plan.append((n, c, True))

    import docker

    sys.path.insert(0, str(benchlib.REPO))
    from patchd.backends.docker_engine import _POLL as patchd_poll

    token = uuid.uuid4().hex[:6]
    met = patchd_poll <= args.floor_poll
    benchlib.say(
        f"downtime: health polling: patchd every {patchd_poll:g} s, floor every "
        f"{args.floor_poll:g} s ({'met' if met else 'MISSED'}: patchd no slower)"
    )
    with benchlib.lab(keep=args.keep_lab) as env:
        host, registry = env["PATCHD_LAB_DOCKER_HOST"], env["PATCHD_LAB_REGISTRY"]
        base = env["PATCHD_LAB_BASE_IMAGE"]
        api = docker.APIClient(base_url=host, version="auto", timeout=120)
        workdir = Path(tempfile.mkdtemp(prefix="patchd-bench-downtime-"))
        benchlib.note(f"downtime: plan {plan} x {args.rounds} rounds; {os.cpu_count()} CPUs")
        live: list[BenchFleet] = []
        pair = 0
        try:
            for round_ in range(args.rounds):
                for n, c, broken in plan:
                    sides = ("patchd", "floor") if pair % 2 == 0 else ("floor", "patchd")
                    pair += 1
                    results: dict[str, dict[str, Any]] = {}
                    for kind in sides:
                        fid = f"{kind[0]}{'b' if broken else ''}{n}c{c}r{round_}"
                        f = BenchFleet(api, registry, base, token, fid, n)
                        f.broken = broken
                        live.append(f)
                        f.build()
                        f.create()
                        f.wait_healthy()
                        f.publish_v2()
                        busy = ft.cpu_busy(2.0)
                        benchlib.note(f"downtime: {f.id} ready, CPU {busy:.0f}% busy")
                        watch = Downtime(api, f)
                        if kind == "patchd":
                            results[kind] = run_patchd(workdir, host, f, c)
                        else:
                            results[kind] = run_floor(host, f, c, args.floor_poll)
                        results[kind]["down"] = watch.stop()
                        results[kind]["lead"] = watch.first_die - results[kind]["began"]
                        results[kind]["tail"] = results[kind]["ended"] - watch.last_back
                        results[kind]["busy"] = busy
                        problem = f.check_restored() if broken else f.check_patched()
                        if problem:
                            raise SystemExit(f"bench: fleet {f.id}: {problem}")
                        f.remove()
                        live.remove(f)
                    met = report(n, c, broken, sides, results) and met
        finally:
            for f in live:
                f.remove()
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
            api.close()
    return 0 if met else 1


def report(
    n: int, c: int, broken: bool, sides: tuple[str, ...], results: dict[str, dict[str, Any]]
) -> bool:
    p, f = results["patchd"], results["floor"]
    wall = p["wall"] / f["wall"]
    pd, fd = list(p["down"].values()), list(f["down"].values())
    down = mean(pd) / mean(fd)
    first = "patchd first" if sides[0] == "patchd" else "floor first"
    raw = (
        f"wall patchd {p['wall']:.2f} s, floor {f['wall']:.2f} s; downtime per container"
        f" mean/max patchd {mean(pd):.2f}/{max(pd, default=0):.2f} s ({len(pd)}), floor"
        f" {mean(fd):.2f}/{max(fd, default=0):.2f} s ({len(fd)}); CPU busy before"
        f" {p['busy']:.0f}%/{f['busy']:.0f}%; start -> first stop patchd {p['lead']:.2f} s,"
        f" floor {f['lead']:.2f} s; last healthy -> exit patchd {p['tail']:.2f} s, floor"
        f" {f['tail']:.2f} s; CPU of the process patchd {p['cpu']:.2f} s, floor {f['cpu']:.2f} s;"
        f" {first}"
    )
    if broken:
        counts = {k: f[k] for k in ("patched", "restored", "not started")}
        ok = wall <= RESTORE_TARGET
        benchlib.say(
            benchlib.ratio_line(
                f"downtime[broken N={n},C={c}]: time-to-restore patchd/floor",
                wall,
                f"<= {RESTORE_TARGET}x",
                ok,
                f"downtime on failure patchd/floor {down:.3f}x; {raw}; floor: {counts}",
            )
        )
        benchlib.say(f"  patchd: {p['last']}")
        return ok
    target = n == 20 and c == 5
    ok = not target or (wall <= WALL_TARGET and down <= DOWNTIME_TARGET)
    benchlib.say(
        benchlib.ratio_line(
            f"downtime[N={n},C={c}]: patchd/floor wall",
            wall,
            f"<= {WALL_TARGET}x" if target else None,
            ok,
            f"downtime patchd/floor = {down:.3f}x; {raw}",
        )
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
