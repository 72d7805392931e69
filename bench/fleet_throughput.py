#!/usr/bin/env python3
"""Figure 1: fleet throughput on Docker, patchd against the straight-line floor.

For each CONCURRENCY:CONTAINERS pair of --fleet (default 8:40,4:40,1:40: N=40 at C=8,
the issue's figure, and the same fleet at C=4 and C=1; about 15 minutes on 2 CPUs, most
of it C=1; `--fleet 8:40` for the figure alone), in one run of this script:

1. Two identical fresh fleets of N containers are made on the test bed's private Docker
   engine, one for patchd and one for the floor, one after the other (only one exists at
   a time: 40 containers probing every second keep 2 CPUs ~90% busy). Each fleet has its own
   registry repository `REGISTRY/bench-TOKEN-{patchd|floor}C:stable` holding v1 and then
   v2, both made by `commit(conf=...)` of the lab's busybox image (as
   tests/integration/docker_fleet.py does) with a HEALTHCHECK probing every 1 s. The
   containers run v1 (init=True, network none) and are healthy; v2 is then pushed as
   `:stable` and removed from the engine again, so both sides pull it (its layers are
   those of v1: a pull fetches the manifest and config).
2. patchd: the real CLI, `.venv/bin/patchd run bench --now -c CONFIG` with a generated
   config (`max_concurrency = C`, `max_errors = N`, health.timeout 60 s), timed from
   the start of the process to its exit.
3. The floor: a minimal docker SDK script (this file with --floor-worker, in its own
   Python process, timed the same way): pull once; then with C threads, per container:
   stop, rename, create from the new image, start, wait healthy (inspect every
   --floor-poll s, default 0.1), remove the old one.
4. Both fleets are checked (every container runs v2 and is healthy, no old container is
   left) and removed.

The figure is patchd's wall time / the floor's, per C. The per-step lines come from
patchd's own journal (the state database's intent/done rows) and from the floor's
timings; they say where patchd's extra time per target goes.

    .venv/bin/python bench/fleet_throughput.py [--fleet 8:40,4:40,1:40]
        [--floor-poll 0.1] [--pyspy FILE.raw] [--keep-lab]

--pyspy RAW patches one more fleet (the first pair of --fleet) with patchd under
`py-spy record --idle` (then: .venv/bin/python bench/pyspy_top.py RAW --filter patchd/).

Prints, per C, the figure line (patchd/floor wall time), per-step means for both sides,
and patchd's run summary. Exit status 0 if the C=8 target (<= 1.15x) is met (or no C=8
run was asked for), 1 if not. Containers, images and the temporary directory are removed
at the end; the registry's repositories stay in the test bed (`lab.sh down` removes it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

# The tests' config builder (benchlib put the repository on sys.path).
from tests.conftest import write_config

SECOND = 10**9
LABEL = "patchd.bench"
LOCAL = "patchd-bench/img"
TARGET = 1.15


def app_conf(version: int, fleet: str) -> dict[str, Any]:
    """v1 / v2 of the benchmark app: healthy ~1 s after start (probe interval 1 s)."""
    return {
        "Env": [f"APP_VERSION={version}", f"BENCH_FLEET={fleet}"],
        "Labels": {"app.version": str(version)},
        "Cmd": ["sh", "-c", f"echo {version} > /tmp/version; touch /tmp/ok; exec sleep 86400"],
        "Healthcheck": {
            "Test": ["CMD-SHELL", "test -f /tmp/ok"],
            "Interval": SECOND,
            # Generous: 40 containers probing every second keep 2 CPUs ~90% busy, and a
            # probe that times out would fail a patch for the bench's sake.
            "Timeout": 10 * SECOND,
            "Retries": 3,
        },
    }


def parallel(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 8) -> list[Any]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def is_healthy(attrs: dict[str, Any]) -> bool:
    state = attrs.get("State") or {}
    return bool(state.get("Running")) and (state.get("Health") or {}).get("Status") == "healthy"


class Fleet:
    """N containers on v1 of their own repository; v2 published and absent locally."""

    def __init__(self, api: Any, registry: str, base: str, token: str, kind: str, size: int):
        self.api = api
        self.kind = kind
        self.id = f"{token}-{kind}"
        self.repo = f"{registry}/bench-{self.id}"
        self.ref = f"{self.repo}:stable"
        self.names = [f"bench-{self.id}-{i:02d}" for i in range(size)]
        self.base = base

    def _commit(self, version: int) -> str:
        seed = self.api.create_container(self.base, command=["true"])["Id"]
        try:
            conf = app_conf(version, self.id)
            tag = f"{self.id}-v{version}"
            return str(self.api.commit(seed, LOCAL, tag, conf=conf, pause=False)["Id"])
        finally:
            self.api.remove_container(seed, force=True)

    def _push(self) -> str:
        digest = None
        for event in self.api.push(self.repo, tag="stable", stream=True, decode=True):
            if "error" in event:
                raise RuntimeError(f"push of {self.ref}: {event['error']}")
            digest = (event.get("aux") or {}).get("Digest", digest)
        assert digest, f"push of {self.ref} reported no digest"
        return str(digest)

    def build(self) -> None:
        self.v1, self.v2 = self._commit(1), self._commit(2)
        self.api.tag(self.v1, self.repo, "stable")
        self.d1 = self._push()

    def create(self) -> None:
        def make(name: str) -> None:
            host = self.api.create_host_config(init=True, network_mode="none")
            cid = self.api.create_container(
                self.ref, name=name, labels={LABEL: self.id}, host_config=host
            )["Id"]
            self.api.start(cid)

        parallel(make, self.names)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for name in self.names:
            while not is_healthy(self.api.inspect_container(name)):
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {name} not healthy after {timeout:g} s")
                time.sleep(0.2)

    def publish_v2(self) -> None:
        """Push v2 as :stable as if from a CI, then drop it from the engine."""
        self.api.tag(self.v2, self.repo, "stable")
        self.d2 = self._push()
        self.api.tag(self.v1, self.repo, "stable")  # the engine's tag stays on v1
        self.api.remove_image(self.v2, force=True)  # its tag and digest reference go too
        assert not self.api.images(name=f"{self.repo}@{self.d2}", quiet=True)

    def check_patched(self) -> str:
        """Every container on v2 and healthy, no old one left; '' or what is wrong."""
        v2 = self.api.inspect_image(f"{self.repo}@{self.d2}")["Id"]
        problems = []
        for name in self.names:
            attrs = self.api.inspect_container(name)
            if attrs["Image"] != v2 or not is_healthy(attrs):
                problems.append(f"{name}: image {attrs['Image'][:19]}, healthy {is_healthy(attrs)}")
        listed = self.api.containers(all=True, filters={"label": f"{LABEL}={self.id}"})
        if len(listed) != len(self.names):
            problems.append(f"{len(listed)} containers with the label, expected {len(self.names)}")
        return "; ".join(problems[:3])

    def remove(self) -> None:
        listed = self.api.containers(all=True, filters={"label": f"{LABEL}={self.id}"})
        parallel(lambda c: self.api.remove_container(c["Id"], force=True, v=True), listed)
        images = [f"{LOCAL}:{self.id}-v1", f"{LOCAL}:{self.id}-v2", self.ref]
        for image in images + list(self.api.images(name=self.repo, quiet=True)):
            with contextlib.suppress(Exception):  # already gone with an earlier one
                self.api.remove_image(image, force=True)


# --- patchd ------------------------------------------------------------------------------


def patchd_config(path: Path, state: Path, docker_host: str, fleet: Fleet, c: int) -> None:
    write_config(
        path,
        {
            "daemon": {"state_dir": state, "log_format": "json", "log_level": "warning"},
            "windows": {"never-now": {"cron": "0 3 1 1 *", "duration": "1h"}},
            "backends": {"lab": {"type": "docker", "url": docker_host, "timeout": "60s"}},
            "groups": {
                "bench": {
                    "backend": "lab",
                    "window": "never-now",
                    "select": {"labels": {LABEL: fleet.id}},
                    "max_concurrency": c,
                    "max_errors": len(fleet.names),
                    "health": {"timeout": "60s", "stable_for": "1s"},
                }
            },
        },
    )


def run_patchd(
    workdir: Path, docker_host: str, fleet: Fleet, c: int, pyspy: str | None = None
) -> dict[str, Any]:
    config, state = workdir / f"patchd-c{c}.toml", workdir / f"state-c{c}"
    patchd_config(config, state, docker_host, fleet, c)
    argv = [str(benchlib.PATCHD), "run", "bench", "--now", "-c", str(config)]
    if pyspy:
        spy = Path(sys.executable).with_name("py-spy")
        argv = [str(spy), "record", "-r", "200", "--idle", "-f", "raw", "-o", pyspy, "--", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("[", "run "))]
    if proc.returncode != 0 or len(lines) != len(fleet.names) + 1:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"bench: patchd run exited {proc.returncode}")
    return {"wall": wall, "steps": journal_steps(state / "patchd.db"), "last": lines[-1]}


def journal_steps(db: Path) -> dict[str, list[float]]:
    """Per target: seconds from each step's intent row to its done row, and between."""
    con = sqlite3.connect(str(db))
    rows = con.execute("SELECT target, step, phase, at FROM journal ORDER BY seq").fetchall()
    con.close()
    by_target: dict[str, list[tuple[str, str, float]]] = {}
    for target, step, phase, at in rows:
        by_target.setdefault(target, []).append((step, phase, at))
    out: dict[str, list[float]] = {}
    for marks in by_target.values():
        at = {(s, p): t for s, p, t in marks}
        for step in ("snapshot", "apply", "verify", "commit"):
            out.setdefault(step, []).append(at[(step, "done")] - at[(step, "intent")])
        for a, b in (("snapshot", "apply"), ("apply", "verify"), ("verify", "commit")):
            out.setdefault(f"{a}>{b}", []).append(at[(b, "intent")] - at[(a, "done")])
        out.setdefault("journaled", []).append(at[("commit", "done")] - at[("snapshot", "intent")])
    return out


# --- the floor ---------------------------------------------------------------------------


def run_floor(docker_host: str, fleet: Fleet, c: int, poll: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--floor-worker", docker_host, fleet.repo, fleet.id]
    argv += ["--floor-concurrency", str(c), "--floor-poll", str(poll)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"bench: floor exited {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["wall"] = wall
    return result


def floor_worker(docker_host: str, repo: str, fleet_id: str, c: int, poll: float) -> int:
    """The straight-line floor; prints per-step seconds as JSON."""
    import docker

    t_start = time.perf_counter()
    api = docker.APIClient(base_url=docker_host, version="auto", timeout=60)
    ref = f"{repo}:stable"
    for event in api.pull(repo, tag="stable", stream=True, decode=True):
        if "error" in event:
            raise SystemExit(f"pull: {event['error']}")
    t_pulled = time.perf_counter()
    listed = api.containers(filters={"label": f"{LABEL}={fleet_id}"})
    steps: dict[str, list[float]] = {}
    lock = threading.Lock()

    def patch(item: dict[str, Any]) -> None:
        name = item["Names"][0].lstrip("/")
        marks = [time.perf_counter()]
        api.stop(item["Id"], timeout=10)
        api.rename(item["Id"], f"{name}.old")
        marks.append(time.perf_counter())
        host = api.create_host_config(init=True, network_mode="none")
        new = api.create_container(ref, name=name, labels={LABEL: fleet_id}, host_config=host)
        api.start(new["Id"])
        marks.append(time.perf_counter())
        deadline = time.monotonic() + 60
        while True:
            state = api.inspect_container(new["Id"])["State"]
            status = (state.get("Health") or {}).get("Status")
            if status == "healthy":
                break
            if status == "unhealthy" or not state.get("Running") or time.monotonic() > deadline:
                raise SystemExit(f"{name}: {status}")
            time.sleep(poll)
        marks.append(time.perf_counter())
        api.remove_container(item["Id"], force=True)
        marks.append(time.perf_counter())
        with lock:
            for key, a, b in zip(
                ("stop+rename", "create+start", "wait healthy", "remove old"),
                marks,
                marks[1:],
                strict=False,
            ):
                steps.setdefault(key, []).append(b - a)
            steps.setdefault("per container", []).append(marks[-1] - marks[0])

    with ThreadPoolExecutor(max_workers=c) as pool:
        list(pool.map(patch, listed))
    print(
        json.dumps(
            {
                "steps": steps,
                "pull": t_pulled - t_start,
                "count": len(listed),
                "inner": time.perf_counter() - t_start,
            }
        )
    )
    return 0


# --- main --------------------------------------------------------------------------------


def cpu_busy(seconds: float) -> float:
    """Share of all CPUs busy over `seconds` (from /proc/stat), in percent."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values) - values[3] - values[4], sum(values)

    a = sample()
    time.sleep(seconds)
    b = sample()
    return 100 * (b[0] - a[0]) / max(1, b[1] - a[1])


def mean_ms(values: list[float]) -> str:
    return f"{statistics.mean(values) * 1000:.0f}" if values else "-"


def report(c: int, n: int, patchd: dict[str, Any], floor: dict[str, Any], startup: float) -> bool:
    ratio = patchd["wall"] / floor["wall"]
    ok = ratio <= TARGET
    benchlib.say(
        benchlib.ratio_line(
            f"fleet_throughput[C={c}]: patchd/floor",
            ratio,
            f"<= {TARGET}x" if c == 8 else None,
            ok,
            f"patchd {patchd['wall']:.2f} s, floor {floor['wall']:.2f} s for {n} containers; "
            f"{n / patchd['wall'] * 60:.0f} vs {n / floor['wall'] * 60:.0f} containers/min",
        )
    )
    ps, fs = patchd["steps"], floor["steps"]
    gaps = zip(ps["snapshot>apply"], ps["apply>verify"], ps["verify>commit"], strict=True)
    benchlib.say(
        f"  per target, mean ms: patchd snapshot {mean_ms(ps['snapshot'])} | apply "
        f"{mean_ms(ps['apply'])} | verify {mean_ms(ps['verify'])} | commit "
        f"{mean_ms(ps['commit'])} | journal gaps {mean_ms([sum(g) for g in gaps])}"
        f" | intent..done {mean_ms(ps['journaled'])}"
    )
    benchlib.say(
        f"  per target, mean ms: floor  stop+rename {mean_ms(fs['stop+rename'])} | create+start "
        f"{mean_ms(fs['create+start'])} | wait healthy {mean_ms(fs['wait healthy'])} | remove "
        f"{mean_ms(fs['remove old'])} | whole {mean_ms(fs['per container'])}; pull once "
        f"{floor['pull'] * 1000:.0f} ms; process start+import+connect "
        f"{(floor['wall'] - floor['inner']) * 1000:.0f} ms"
    )
    benchlib.say(
        f"  patchd: {patchd['last']}; `patchd check-config` alone (start, imports, config) "
        f"takes {startup * 1000:.0f} ms; host CPU busy before each run (the idle fleet's "
        f"healthchecks): patchd {patchd['busy']:.0f}%, floor {floor['busy']:.0f}%"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--fleet",
        default="8:40,4:40,1:40",
        help="comma-separated CONCURRENCY:CONTAINERS runs; the C=8 one carries the target"
        " (default 8:40,4:40,1:40)",
    )
    parser.add_argument("--floor-poll", type=float, default=0.1)
    parser.add_argument("--pyspy", metavar="RAW", help="also profile one patchd run (C=first)")
    parser.add_argument("--keep-lab", action="store_true")
    parser.add_argument("--floor-worker", nargs=3, metavar=("HOST", "REPO", "FLEET"))
    parser.add_argument("--floor-concurrency", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_worker:
        return floor_worker(*args.floor_worker, args.floor_concurrency, args.floor_poll)
    plan = [tuple(int(x) for x in item.split(":")) for item in args.fleet.split(",")]

    import docker

    sys.path.insert(0, str(benchlib.REPO))
    from patchd.backends.docker_engine import _POLL as patchd_poll

    token = uuid.uuid4().hex[:6]
    met = True
    with benchlib.lab(keep=args.keep_lab) as env:
        host, registry = env["PATCHD_LAB_DOCKER_HOST"], env["PATCHD_LAB_REGISTRY"]
        api = docker.APIClient(base_url=host, version="auto", timeout=120)
        workdir = Path(tempfile.mkdtemp(prefix="patchd-bench-fleet-"))
        benchlib.say(
            f"fleet_throughput: (concurrency, containers) {plan}, "
            f"engine {host} (storage {api.info()['Driver']}), {os.cpu_count()} CPUs; "
            f"HEALTHCHECK every 1 s; floor polls every {args.floor_poll:g} s, "
            f"patchd every {patchd_poll:g} s (docker_engine._POLL)"
        )
        fleets: list[Fleet] = []
        try:
            startup_t0 = time.perf_counter()
            cfg = workdir / "startup.toml"
            dummy = Fleet(api, registry, env["PATCHD_LAB_BASE_IMAGE"], token, "x", 1)
            patchd_config(cfg, workdir / "state-x", host, dummy, 1)
            argv = [str(benchlib.PATCHD), "check-config", "-c", str(cfg)]
            subprocess.run(argv, check=True, capture_output=True)
            startup = time.perf_counter() - startup_t0
            for c, n in plan:
                results = {}
                for kind in ("patchd", "floor"):
                    f = Fleet(api, registry, env["PATCHD_LAB_BASE_IMAGE"], token, f"{kind}{c}", n)
                    fleets.append(f)
                    t0 = time.monotonic()
                    f.build()
                    f.create()
                    f.wait_healthy()
                    f.publish_v2()
                    busy = cpu_busy(3.0)
                    benchlib.note(
                        f"bench: C={c}: {kind} fleet of {n} ready in {time.monotonic() - t0:.1f} s;"
                        f" host CPU {busy:.0f}% busy with it idle"
                    )
                    if kind == "patchd":
                        results[kind] = run_patchd(workdir, host, f, c)
                    else:
                        results[kind] = run_floor(host, f, c, args.floor_poll)
                    results[kind]["busy"] = busy
                    problem = f.check_patched()
                    if problem:
                        raise SystemExit(f"bench: fleet {f.id} not patched: {problem}")
                    f.remove()
                    fleets.remove(f)
                ok = report(c, n, results["patchd"], results["floor"], startup)
                met = met and (ok or c != 8)
            if args.pyspy:
                c, n = plan[0]
                f = Fleet(api, registry, env["PATCHD_LAB_BASE_IMAGE"], token, f"spy{c}", n)
                fleets.append(f)
                f.build()
                f.create()
                f.wait_healthy()
                f.publish_v2()
                spied = run_patchd(workdir, host, f, c, pyspy=args.pyspy)
                benchlib.say(
                    f"  profiled patchd run (C={c}, under py-spy --idle): {spied['wall']:.2f} s;"
                    f" {args.pyspy}"
                )
        finally:
            for f in fleets:
                f.remove()
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
            api.close()
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
