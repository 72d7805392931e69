"""Outages of what patchd depends on, in the middle of a run: nothing is lost.

The Docker engine, the registry and vCenter go away while `patchd run` is working and come
back. Afterwards, on the real engine or simulator, every target is untouched, committed on
the new version or rolled back, and `patchd history`, `patchd status` and the state DB say
which: no container is missing, none is duplicated, no `NAME.patchd-RUN` snapshot is left,
no `patchd-*` snapshot is left on a VM, no target is left unfinished once patchd has run
with its backend reachable again.

The engine and the registry are the lab's own, stopped and started with `tests/lab/lab.sh
stop|start docker|registry` (same socket and address afterwards). dockerd is stopped as
its service manager stops it: SIGTERM, and dockerd stops its containers itself (the lab
runs it without live-restore), so when it starts again the containers' restart policies
decide which run: `unless-stopped` and `always` do, `no` does not. vCenter is a vcsim of
the test's own, made to hang (see its test). What patchd guarantees about containers
that an engine restart stopped:

- a container patchd stopped as its snapshot is running again when it is rolled back;
- a replacement is committed only while it runs: one the engine restart stopped after it
  was verified is rolled back, the old container comes back;
- a container the restart left stopped that the run had not reached yet is neither
  patched nor started (the target fails, nothing is changed): starting it is not patchd's
  decision.

The images have no HEALTHCHECK (docker_fleet's `plain` variants: running without a
restart for `stable_for` is the backend's check): a healthcheck with a 2 s timeout fails
on a loaded machine, which is not what these tests are about.

Stopping the lab's dockerd affects every user of that lab at that moment: these tests
must not run in parallel with others on the same lab (pytest-xdist).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd import reports
from patchd.config import load_settings
from patchd.state import SqliteStore
from tests.conftest import wait_until, window_at, write_config
from tests.integration.conftest import LAB_SH, REPO_ROOT, Lab, VcsimProcess
from tests.integration.daemon_helpers import held_health, run_patchd
from tests.integration.docker_fleet import Fleet
from tests.integration.vsphere_lab import fleet as vm_fleet
from tests.integration.vsphere_lab import iter_lines, start, tool

# --- the lab's services --------------------------------------------------------------


class Outages:
    """Stops and starts the lab's services; whatever is still stopped at teardown is
    started again, so the lab is usable for the next test whatever happened."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.down: set[str] = set()

    def _lab_sh(self, action: str, service: str) -> None:
        done = subprocess.run(
            ["bash", str(LAB_SH), action, service],
            env={**os.environ, "PATCHD_LAB_DIR": str(self.lab.lab_dir)},
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert done.returncode == 0, f"lab.sh {action} {service}: {done.stderr}"

    def stop(self, service: str) -> None:
        self.down.add(service)
        self._lab_sh("stop", service)

    def start(self, service: str) -> None:
        self._lab_sh("start", service)
        self.down.discard(service)


@pytest.fixture
def outages(lab: Lab, f: Fleet) -> Iterator[Outages]:
    # Depends on `f` so that it is torn down first: the fleet's cleanup needs the engine.
    control = Outages(lab)
    yield control
    for service in sorted(control.down):
        control.start(service)


# --- patchd as a process -------------------------------------------------------------


def later_config(path: Path, backends: dict[str, Any], groups: dict[str, Any]) -> Path:
    """Groups in window `later`, two days away: `patchd run` without --now only reconciles
    (and exits 3)."""
    later = datetime.now(UTC) + timedelta(days=2)
    return write_config(
        path,
        {
            "daemon": {"state_dir": path.parent / "state"},
            "windows": {"later": window_at(later)},
            "backends": backends,
            "groups": groups,
        },
    )


def docker_config(tmp_path: Path, f: Fleet, groups: dict[str, Any]) -> Path:
    backend = {
        "type": "docker",
        "url": f.docker_host,
        "timeout": "10s",
        "rollback_timeout": "40s",
    }
    return later_config(tmp_path / "patchd.toml", {"lab": backend}, groups)


def web_group(f: Fleet, **settings: Any) -> dict[str, Any]:
    """The group `web`: this fleet's containers, in window `later`."""
    return {
        "web": {
            "backend": "lab",
            "window": "later",
            "select": {"labels": {"patchd.test": f.token}},
            **settings,
        }
    }


def patchd(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_patchd(*args, "-c", str(config), timeout=timeout)


def patchd_in_background(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "patchd.cli", *args, "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def exited(proc: subprocess.Popen[str]) -> Callable[[], str | None]:
    """For wait_until's give_up: patchd ended before what the test waits for."""

    def why() -> str | None:
        if proc.poll() is None:
            return None
        out, err = proc.communicate()
        return f"patchd exited {proc.returncode}:\n{out}\n{err}\n"

    return why


def journal_state(config: Path, name: str) -> str | None:
    """The target's state in the newest run, read without writing to the DB."""
    db = config.parent / "state" / "patchd.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                "SELECT state FROM targets WHERE name = ? ORDER BY updated DESC", (name,)
            ).fetchone()
    except sqlite3.OperationalError:  # patchd is still creating its tables
        return None
    return None if row is None else str(row[0])


def history(config: Path) -> list[dict[str, Any]]:
    """What `patchd history --json` prints (its report, without a process per call)."""
    store = SqliteStore(config.parent / "state" / "patchd.db")
    try:
        return reports.history(store, None, 20)
    finally:
        store.close()


def assert_journal_settled(config: Path) -> dict[str, Any]:
    """No unfinished target, no run left "running"; returns what `patchd status --json`
    prints."""
    store = SqliteStore(config.parent / "state" / "patchd.db")
    try:
        assert store.unfinished_targets() == []
        assert [r.id for r in store.runs() if r.status == "running"] == []
        status = reports.status(load_settings(config), store, datetime.now(UTC))
    finally:
        store.close()
    assert status["unfinished"] == []
    return dict(status)


def assert_containers(f: Fleet, want: dict[str, tuple[str, str]]) -> None:
    """Exactly the fleet's containers, by name (none missing, no duplicate, no
    `*.patchd-*` snapshot left), each on the wanted digest and in the wanted state; a
    running one is healthy."""
    ours = f.client.api.containers(all=True, filters={"label": f"patchd.test={f.token}"})
    assert sorted(c["Names"][0].lstrip("/") for c in ours) == sorted(want)
    for name, (digest, status) in want.items():
        assert (f.digest_of(name), f.inspect(name)["State"]["Status"]) == (digest, status), name
        if status == "running":
            f.wait_healthy(name)


# --- the Docker engine ---------------------------------------------------------------


def test_engine_restart_while_a_target_is_verified(
    f: Fleet, outages: Outages, tmp_path: Path
) -> None:
    """dockerd restarts while the first target's health probe runs; the same run goes on.

    The probe (`health.command`) waits for the test, so the engine stops and starts again
    exactly while the first target is verifying, after its new container passed the
    backend's own check. Containers: `a` and `c` with restart policy `no`, `b` with
    `unless-stopped`; patched one at a time in that order.
    """
    v1 = f.publish("plain-v1", "r")
    f.run("a", "r")
    f.run("b", "r", restart_policy={"Name": "unless-stopped"})
    f.run("c", "r")
    a, b, c = f.name("a"), f.name("b"), f.name("c")
    f.wait_healthy(a, b, c)
    v2 = f.publish("plain-v2", "r")
    gate = tmp_path / "gate"
    # The probe's limit (health.timeout) must outlast the engine's stop and start, however
    # long a loaded machine makes them: it is a limit, the test opens the gate itself.
    config = docker_config(tmp_path, f, web_group(f, max_errors=3, health=held_health(gate)))
    run = patchd_in_background(config, "run", "web", "--now")
    try:
        wait_until((gate / f"{a}.probing").exists, 300, f"{a} to be verifying", give_up=exited(run))
        outages.stop("docker")
        outages.start("docker")
        (gate / "go").touch()
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out + err
    assert "Traceback" not in err
    lines = {line.split(":")[0].split("] ")[-1]: line for line in out.splitlines()[:3]}
    # a: its replacement was verified, then stopped by the engine's restart: not committed.
    assert f"{a}: rolled_back" in lines[a]
    assert "not running" in lines[a]
    # b: the engine started it again (unless-stopped), so it was patched as usual.
    assert f"{b}: success" in lines[b]
    # c: the restart left it stopped; patchd did not start it, nor patch it: skipped as
    # not running, which spends no error budget (issue 16).
    assert f"{c}: skipped" in lines[c]
    assert "not running" in lines[c] and "exited" in lines[c]

    assert_containers(f, {a: (v1, "running"), b: (v2, "running"), c: (v1, "exited")})
    assert_journal_settled(config)
    [last] = history(config)
    assert {t["target"]: t["state"] for t in last["targets"]} == {
        a: "rolled_back",
        b: "committed",
    }
    assert (last["status"], last["succeeded"], last["failed"]) == ("completed", 1, 1)


# No HEALTHCHECK and `stable_for = 60s`: a target is verifying for a minute.
PLAIN = {"max_concurrency": 2, "health": {"timeout": "90s", "stable_for": "60s"}}


def test_engine_down_longer_than_the_step_retries(
    f: Fleet, outages: Outages, tmp_path: Path
) -> None:
    """dockerd is down for 6 s while a target is verifying: longer than a rollback tried
    an unreachable engine before (1 + 2 s; the engine stops the container first, so
    verify fails and the rollback starts as it goes down). The run rolls the target back
    once the engine is back.

    The target has no HEALTHCHECK and `stable_for = 60s`, so it is verifying for a minute;
    the journal tells the test when.
    """
    v1 = f.publish("plain-v1", "p")
    f.run("a", "p")
    a = f.name("a")
    f.wait_healthy(a)
    old_id = f.inspect(a)["Id"]
    f.publish("plain-v2", "p")
    config = docker_config(tmp_path, f, web_group(f, **PLAIN))
    run = patchd_in_background(config, "run", "web", "--now")
    try:
        wait_until(
            lambda: journal_state(config, a) == "verifying",
            300,
            f"{a} verifying",
            give_up=exited(run),
        )
        outages.stop("docker")
        time.sleep(6)  # the outage itself (the stimulus: longer than the step's retries)
        outages.start("docker")
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out + err
    assert f"{a}: rolled_back" in out, out + err
    assert "Traceback" not in err
    assert_containers(f, {a: (v1, "running")})
    assert f.inspect(a)["Id"] == old_id  # the very container it ran before
    assert_journal_settled(config)
    [last] = history(config)
    assert [(t["target"], t["state"]) for t in last["targets"]] == [(a, "rolled_back")]


def test_patchd_killed_while_the_engine_is_down_then_restarted(
    f: Fleet, outages: Outages, tmp_path: Path
) -> None:
    """dockerd stops while two targets are verifying, and patchd is killed (kill -9)
    before it returns. A restart of patchd while the engine is still down must not give
    up on them; the restart after the engine is back rolls both back.

    `a` has restart policy `no`: the engine restart leaves both its containers stopped.
    `b` has `always`: the engine starts both its old (renamed) and its new container.
    """
    v1 = f.publish("plain-v1", "k")
    f.run("a", "k")
    f.run("b", "k", restart_policy={"Name": "always"})
    a, b = f.name("a"), f.name("b")
    f.wait_healthy(a, b)
    f.publish("plain-v2", "k")
    config = docker_config(tmp_path, f, web_group(f, **PLAIN))
    run = patchd_in_background(config, "run", "web", "--now")
    try:
        wait_until(
            lambda: journal_state(config, a) == journal_state(config, b) == "verifying",
            300,
            "both targets verifying",
            give_up=exited(run),
        )
        outages.stop("docker")
    finally:
        run.kill()
        run.communicate()
    # Verifying, or rolling back if patchd saw a container stop as the engine went down.
    left = {n: journal_state(config, n) for n in (a, b)}
    assert set(left.values()) <= {"verifying", "rolling_back"}, left

    while_down = patchd(config, "run", "web")  # reconciles only: the window is not open
    assert while_down.returncode == 3, while_down.stderr
    assert "Traceback" not in while_down.stderr
    assert "cannot be reached" in while_down.stderr
    assert {n: journal_state(config, n) for n in (a, b)} == left  # not given up
    shown = patchd(config, "status")  # and a person can see them
    assert "unfinished targets" in shown.stdout
    assert f"  {a} in run" in shown.stdout and f"  {b} in run" in shown.stdout

    outages.start("docker")
    back = patchd(config, "run", "web")
    assert back.returncode == 3, back.stderr
    assert f"reconciled {a} " in back.stderr and f"reconciled {b} " in back.stderr
    assert_containers(f, {a: (v1, "running"), b: (v1, "running")})
    assert_journal_settled(config)
    [last] = history(config)
    assert last["status"] == "interrupted"
    assert {t["target"]: t["state"] for t in last["targets"]} == {
        a: "rolled_back",
        b: "rolled_back",
    }
    assert (last["succeeded"], last["failed"]) == (0, 2)


# --- the registry --------------------------------------------------------------------


def test_registry_down_before_the_check_and_during_the_pull(
    f: Fleet, outages: Outages, tmp_path: Path
) -> None:
    """The registry stops after staging verified v2. Two groups start while it is down:

    - `other` (no stage before it) must ask the registry which version is current: the
      check fails, the target fails before anything is changed;
    - `prod` (after staging) installs the digest staging verified, so it needs no check:
      its pull fails before its container is stopped (the pull comes first), and it is
      rolled back with nothing to undo.

    Both errors name the registry.
    """
    v1 = f.publish("plain-v1", "g")
    for short in ("s", "p", "o"):
        f.run(short, "g")
    s, p, o = f.name("s"), f.name("p"), f.name("o")
    f.wait_healthy(s, p, o)
    before = {n: f.inspect(n)["Id"] for n in (p, o)}
    started = {n: f.inspect(n)["State"]["StartedAt"] for n in (p, o)}
    v2 = f.publish("plain-v2", "g")
    groups = {
        group: {
            "backend": "lab",
            "window": "later",
            "after": after,
            "select": {"names": [name], "labels": {"patchd.test": f.token}},
            "health": {"timeout": "120s", "stable_for": "1s"},
        }
        for group, name, after in (("staging", s, None), ("prod", p, "staging"), ("other", o, None))
    }
    config = docker_config(tmp_path, f, groups)
    staged = patchd(config, "run", "staging", "--now")
    assert staged.returncode == 0, staged.stdout + staged.stderr
    # As if staging ran on another engine: v2 is not on this one by its digest (an
    # engine that has it needs no registry to install it).
    s_image = f.inspect(s)["Image"]
    f.client.api.remove_image(f"{f.repo('g')}@{v2}")

    outages.stop("registry")
    runs = [patchd_in_background(config, "run", g, "--now") for g in ("prod", "other")]
    (prod_out, prod_err), (other_out, other_err) = (r.communicate(timeout=600) for r in runs)
    outages.start("registry")

    assert runs[0].returncode == 1, prod_out + prod_err
    assert f"{p}: rolled_back" in prod_out and f.registry in prod_out, prod_out
    assert runs[1].returncode == 1, other_out + other_err
    assert f"{o}: failed" in other_out and f.registry in other_out, other_out
    assert "Traceback" not in prod_err + other_err
    f.client.api.pull(f.repo("g"), tag=v2)  # the digest reference back, for digest_of
    assert f.inspect(s)["Image"] == s_image
    assert_containers(f, {s: (v2, "running"), p: (v1, "running"), o: (v1, "running")})
    # Neither container was even stopped.
    assert {n: f.inspect(n)["Id"] for n in (p, o)} == before
    assert {n: f.inspect(n)["State"]["StartedAt"] for n in (p, o)} == started
    status = assert_journal_settled(config)
    assert status["rollback_failed"] == []
    runs_by_group = {r["group"]: r for r in history(config)}
    assert [(t["target"], t["state"]) for t in runs_by_group["prod"]["targets"]] == [
        (p, "rolled_back")
    ]
    assert runs_by_group["other"]["targets"] == []  # nothing was changed, so nothing journaled


# --- vCenter ---------------------------------------------------------------------------


def test_vcenter_hangs_while_vms_are_verified_and_rolled_back(
    vcsim_factory: Callable[..., VcsimProcess], tmp_path: Path
) -> None:
    """vCenter stops answering for 6 s in the middle of a run, then answers again.

    Simulated with SIGSTOP/SIGCONT of this test's own vcsim: its sockets stay open and
    requests hang, as with a vCenter that hangs or a network that drops packets (a
    stopped-and-restarted vcsim would come back with a new inventory: its state is in
    memory). The hang starts while two patch commands run (they do not talk to vCenter)
    and lasts past their end, so the next calls hang: the good VM's verify and the
    failed VM's rollback. One API call times out after 3 s and is retried once; then the
    engine retries the step. When vCenter answers again the good VM is committed and the
    failed one reverted; no patchd snapshot is left.
    """
    sim = start(vcsim_factory, tmp_path, vms=2)
    good, bad = list(sim.vms())[:2]
    vm_fleet(sim, [good, bad], "v1", wave="1")
    log = tmp_path / "patch.log"
    url = sim.process.url
    command = tool(
        "vm", url, "{moid}", "{name}", "--fail", bad, "--log", str(log), "--sleep", "1.5"
    )
    password = Path(sim.config(tmp_path)["password_file"])
    password.chmod(0o600)  # patchd refuses a secret every user can read
    backend = {
        "type": "vsphere",
        "host": sim.process.host,
        "port": sim.process.port,
        "protocol": "http",
        "insecure": True,
        "username": "user",
        "password_file": password,
        "timeout": "3s",
        "retries": 1,
        "retry_backoff": "0s",
        "rollback_timeout": "30s",
    }
    group = {
        "backend": "vc",
        "window": "later",
        "select": {"custom_attribute": {"wave": "1"}},
        "max_concurrency": 2,
        "max_errors": 2,
        "health": {"timeout": "120s", "stable_for": "1s"},
        "patch": {"command": command, "version": "v2"},
    }
    config = later_config(tmp_path / "patchd.toml", {"vc": backend}, {"vms": group})
    run = patchd_in_background(config, "run", "vms", "--now")
    pid = sim.process.proc.pid
    try:
        started = lambda: sum(1 for w in iter_lines(log) if w[0] == "start") == 2  # noqa: E731
        wait_until(started, 300, "both patch commands to start", give_up=exited(run))
        os.kill(pid, signal.SIGSTOP)
        time.sleep(6)  # the hang itself (the stimulus: 6 s, longer than a call's retries)
        resumed = datetime.now(UTC)
        os.kill(pid, signal.SIGCONT)
        out, err = run.communicate(timeout=600)
    finally:
        os.kill(pid, signal.SIGCONT)
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 1, out + err
    assert "Traceback" not in err
    assert f"{good}: success" in out and f"{bad}: rolled_back" in out, out + err

    assert sim.patchd_snapshots() == []
    assert sim.attr(sim.vm(good), "patchd.patch_version") == "v2"
    assert sim.attr(sim.vm(bad), "patchd.patch_version") == "v1"
    assert sim.healthy(good) and sim.healthy(bad)
    status = assert_journal_settled(config)
    assert status["rollback_failed"] == []
    [last] = history(config)
    assert {t["target"]: t["state"] for t in last["targets"]} == {
        good: "committed",
        bad: "rolled_back",
    }
    # The steps after the commands did wait for vCenter: they ended after it answered.
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    try:
        ends = [store.journal(last["id"], sim.vm(n)._moId)[-1][2] for n in (good, bad)]
    finally:
        store.close()
    assert all(end > resumed for end in ends), (ends, resumed)
    sim.close()
