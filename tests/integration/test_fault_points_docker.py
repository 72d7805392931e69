"""kill -9 at every fault point of a Docker patch, then restart: nothing is lost.

Each fault point (patchd/faults.py) gets its own container, config and state directory.
`patchd run --now` is started with that point armed to crash (`os._exit`, no cleanup: a
kill -9 at exactly that step); then `patchd run` without `--now` outside the window, which
only reconciles (and is refused the run, exit 3); the journal is compared with the real
engine; then `patchd run --now` again, which must finish the job. The processes of all
points run side by side, so the test takes about as long as a few patches.

Checked for every point, on the real engine:
- after the crash, nothing more is needed than a restart: exactly one container carries
  the target's name, it runs and is healthy, and no `*.patchd-*` snapshot is left;
- the journal agrees with reality: the target's row says committed and the container runs
  v2, or rolled_back and it runs v1 (or there is no row and nothing was touched), and no
  target of any run is left unfinished;
- the next run ends with the container on v2 (the healthy fleet) or on v1 (the fleet whose
  v2 fails its health check, which exercises the rollback's own fault points).

Not reached here: `journal.*.rollback_failed` (needs a rollback that fails, which the
engine's unit tests cover with FakeBackend) and the vSphere points (their own test).
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from patchd import faults
from patchd.state import Store
from tests.integration.docker_fleet import Fleet

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
PARALLEL = 4  # patchd processes at a time: 2 cores, and dockerd needs some too

# The success path in order, with what reconciliation must make of a crash there:
# before the new version was verified, roll back; after, check again and commit.
HEALTHY_POINTS = {
    "journal.before.snapshotting": None,  # nothing journaled for the target yet
    "journal.after.snapshotting": "rolled_back",
    "docker.after_stop": "rolled_back",
    "docker.after_rename": "rolled_back",
    "engine.after_snapshot": "rolled_back",
    "journal.before.snapshotted": "rolled_back",
    "journal.after.snapshotted": "rolled_back",
    "journal.before.applying": "rolled_back",
    "journal.after.applying": "rolled_back",
    "docker.after_create": "rolled_back",
    "docker.after_start": "rolled_back",
    "engine.after_apply": "rolled_back",
    "journal.before.applied": "rolled_back",
    "journal.after.applied": "rolled_back",
    "journal.before.verifying": "rolled_back",
    "journal.after.verifying": "rolled_back",
    "engine.during_verify": "rolled_back",
    "journal.before.verified": "rolled_back",
    "journal.after.verified": "committed",
    "journal.before.committing": "committed",
    "journal.after.committing": "committed",
    "docker.during_commit": "committed",
    "engine.after_commit": "committed",
    "journal.before.committed": "committed",
    "journal.after.committed": "committed",
}
# The rollback path (v2 never gets healthy).
BROKEN_POINTS = {
    "journal.before.rolling_back": "rolled_back",
    "journal.after.rolling_back": "rolled_back",
    "docker.during_rollback": "rolled_back",
    "engine.after_rollback": "rolled_back",
    "journal.before.rolled_back": "rolled_back",
    "journal.after.rolled_back": "rolled_back",
}


@dataclass
class Case:
    point: str
    expect: str | None
    name: str
    config: Path
    state: Path


def patchd(
    config: Path, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if crash_at is not None:
        env.update({faults.ENABLE: "1", faults.SPEC: f"{crash_at}=crash"})
    return subprocess.run(
        [sys.executable, "-m", "patchd.cli", "run", "web", "-c", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def cases_for(f: Fleet, tmp_path: Path, points: dict[str, str | None], repo: str) -> list[Case]:
    # A window two days away: `patchd run` without --now only reconciles.
    day = DAYS[(datetime.now(UTC).weekday() + 2) % 7]
    cases = []
    for i, (point, expect) in enumerate(points.items()):
        short = f"{repo}{i}"
        state = tmp_path / short
        config = tmp_path / f"{short}.toml"
        config.write_text(
            f"""
[daemon]
state_dir = "{state}"
[windows.later]
days = ["{day}"]
start = "00:00"
duration = "1h"
[backends.lab]
type = "docker"
url = "{f.docker_host}"
rollback_timeout = "30s"
[groups.web]
backend = "lab"
window = "later"
select = {{ names = ["{f.name(short)}"], labels = {{ "patchd.test" = "{f.token}" }} }}
health = {{ timeout = "20s", stable_for = "1s" }}
"""
        )
        cases.append(Case(point, expect, f.name(short), config, state))
        f.run(short, repo)
    return cases


def in_parallel(cases: list[Case], call: object) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(call, cases))  # type: ignore[arg-type]


def check_crash_then_restart(f: Fleet, cases: list[Case], v1: str, v2: str, final: str) -> None:
    crashed = in_parallel(cases, lambda c: patchd(c.config, "--now", crash_at=c.point))
    for case, done in zip(cases, crashed, strict=True):
        assert done.returncode == faults.CRASH_EXIT, (case.point, done.stdout, done.stderr)
        assert f"fault point {case.point}: crashing" in done.stderr

    reconciled = in_parallel(cases, lambda c: patchd(c.config))
    problems = []
    for case, done in zip(cases, reconciled, strict=True):
        if done.returncode != 3 or "Traceback" in done.stderr:
            problems.append(f"{case.point}: reconcile run exited {done.returncode}: {done.stderr}")
            continue
        store = Store(case.state / "patchd.db")
        rows = [r for run in store.runs("web") for r in store.targets(run.id)]
        got = rows[0].state if rows else None
        reality = f.digest_of(case.name) if f.exists(case.name) else "missing"
        wanted_digest = v2 if got == "committed" else v1
        if got != case.expect:
            problems.append(f"{case.point}: journal says {got}, expected {case.expect}")
        if reality != wanted_digest:
            problems.append(f"{case.point}: journal says {got} but the container runs {reality}")
        if not f.is_healthy(case.name):
            problems.append(f"{case.point}: {case.name} is not running healthy")
        if store.unfinished_targets():
            problems.append(f"{case.point}: unfinished targets after reconcile")
        if [r.status for r in store.runs("web")] != ["interrupted"]:
            problems.append(f"{case.point}: the crashed run was not closed as interrupted")
    assert problems == [], "\n".join(problems)
    assert f.leftovers() == []

    finished = in_parallel(cases, lambda c: patchd(c.config, "--now"))
    for case, done in zip(cases, finished, strict=True):
        assert "Traceback" not in done.stderr, (case.point, done.stderr)
        if f.digest_of(case.name) != final and "rolled_back" in done.stdout:
            # A health check can time out on a loaded 2-core machine; the rollback that
            # follows is patchd doing its job, so the next window (run) tries again.
            done = patchd(case.config, "--now")
        assert f.digest_of(case.name) == final, (case.point, done.stdout, done.stderr)
        assert f.is_healthy(case.name), case.point
        assert Store(case.state / "patchd.db").unfinished_targets() == []
    assert f.leftovers() == []
    # One container per target: no duplicate under another name either.
    ours = f.client.api.containers(all=True, filters={"label": f"patchd.test={f.token}"})
    assert len(ours) == len(cases)


def test_kill_9_at_every_point_of_a_healthy_patch(f: Fleet, tmp_path: Path) -> None:
    v1 = f.publish("app-v1", "h")
    cases = cases_for(f, tmp_path, HEALTHY_POINTS, "h")
    f.wait_healthy(*(c.name for c in cases))
    v2 = f.publish("app-v2", "h")
    check_crash_then_restart(f, cases, v1, v2, final=v2)


def test_kill_9_at_every_point_of_a_rollback(f: Fleet, tmp_path: Path) -> None:
    v1 = f.publish("app-v1", "b")
    cases = cases_for(f, tmp_path, BROKEN_POINTS, "b")
    f.wait_healthy(*(c.name for c in cases))
    v2 = f.publish("app-v2-broken", "b")
    check_crash_then_restart(f, cases, v1, v2, final=v1)
    assert v1 != v2
