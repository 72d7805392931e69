"""kill -9 at every fault point of a Docker patch, then restart: nothing is lost.

Each fault point (patchd/faults.py) gets its own container, repository, config and state
directory. `patchd run --now` is started with that point armed to crash (`os._exit`, no
cleanup: a kill -9 at exactly that step); then `patchd run --now` again, as a restart:
it reconciles what the crash left, then patches. The processes of all points run side by
side, so the test takes about as long as a few rounds of patches.

Checked for every point, on the real engine and in the journal:
- the crashed run's journal, after reconciliation, says what the point calls for: rolled
  back before the new version was verified, committed after (or no row when the crash
  came before the first write), and the run is closed as interrupted;
- the journal agrees with reality: the next run found the target on v1 (it patched from
  v1) after a rollback, and had nothing to do after a commit;
- at the end exactly one container carries each target's name, on the final version,
  running and healthy; no `*.patchd-*` renamed container is left; nothing is unfinished.
  The healthy fleet ends on v2; the fleet whose v2 fails its health check (which reaches
  the rollback's own fault points) ends on v1.

Not reached here: `journal.*.rollback_failed` (needs a rollback that fails, which the
engine's unit tests cover with FakeBackend) and the vSphere points (their own test).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd import faults
from patchd.state import SqliteStore
from tests.conftest import window_at, write_config
from tests.integration.daemon_helpers import run_patchd
from tests.integration.docker_fleet import Fleet

PARALLEL = 6  # patchd processes at a time: 2 cores, and dockerd needs some too

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
    repo: str
    config: Path
    state: Path


def patchd(
    config: Path, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    fault = None if crash_at is None else f"{crash_at}=crash"
    return run_patchd("run", "web", "-c", str(config), *args, fault=fault)


def cases_for(
    f: Fleet, tmp_path: Path, points: dict[str, str | None], prefix: str, image: str
) -> tuple[list[Case], str]:
    """A container per point, each from its own repository: separate patchd processes
    patching one image reference at once would race on its local tag (one process
    serialises its own targets' tag-create-retag; two processes cannot)."""
    # The window is two days away: only `--now` runs.
    later = datetime.now(UTC) + timedelta(days=2)
    cases = []
    shorts = [f"{prefix}{i}" for i in range(len(points))]
    with ThreadPoolExecutor(8) as pool:  # pushes of one image to many repositories
        [digest] = set(pool.map(lambda short: f.publish(image, short), shorts))
    for short, (point, expect) in zip(shorts, points.items(), strict=True):
        state = tmp_path / short
        config = tmp_path / f"{short}.toml"
        write_config(
            config,
            {
                "daemon": {"state_dir": state},
                "windows": {"later": window_at(later)},
                "backends": {
                    "lab": {"type": "docker", "url": f.docker_host, "rollback_timeout": "30s"}
                },
                "groups": {
                    "web": {
                        "backend": "lab",
                        "window": "later",
                        "select": {"names": [f.name(short)], "labels": {"patchd.test": f.token}},
                        "health": {"timeout": "120s", "stable_for": "1s"},
                    }
                },
            },
        )
        cases.append(Case(point, expect, f.name(short), short, config, state))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda short: f.run(short, short), shorts))
    return cases, digest


def publish(f: Fleet, cases: list[Case], image: str) -> str:
    with ThreadPoolExecutor(8) as pool:
        [digest] = set(pool.map(lambda case: f.publish(image, case.repo), cases))
    return digest


def in_parallel(cases: list[Case], call: object) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(call, cases))  # type: ignore[arg-type]


def check_crash_then_restart(f: Fleet, cases: list[Case], v1: str, v2: str, final: str) -> None:
    crashed = in_parallel(cases, lambda c: patchd(c.config, "--now", crash_at=c.point))
    for case, done in zip(cases, crashed, strict=True):
        assert done.returncode == faults.CRASH_EXIT, (case.point, done.stdout, done.stderr)
        assert f"fault point {case.point}: crashing" in done.stderr

    # The restart: reconciliation first, then the run goes on.
    restarted = in_parallel(cases, lambda c: patchd(c.config, "--now"))
    problems = []
    for case, done in zip(cases, restarted, strict=True):
        if "Traceback" in done.stderr:
            problems.append(f"{case.point}: {done.stderr}")
            continue
        if f.exists(case.name) and f.digest_of(case.name) != final and "rolled_back" in done.stdout:
            # A health check can time out on a loaded 2-core machine; the rollback that
            # follows is patchd doing its job, so the next window (run) tries again.
            patchd(case.config, "--now")
        store = SqliteStore(case.state / "patchd.db")
        first, *later = sorted(store.runs("web"), key=lambda r: r.started)
        rows = store.targets(first.id)
        got = rows[0].state if rows else None
        # What the crashed run's journal says after reconciliation...
        if got != case.expect:
            problems.append(f"{case.point}: journal says {got}, expected {case.expect}")
        if first.status != "interrupted":
            problems.append(f"{case.point}: the crashed run is {first.status}, not interrupted")
        # ... agrees with what the next run found: the version it patched from (v1 after a
        # rollback), or nothing to do (already on v2 after a commit).
        found = [r.version_from for run in later[:1] for r in store.targets(run.id)]
        if found != ([] if got == "committed" else [v1]):
            problems.append(f"{case.point}: journal says {got}, the next run found {found}")
        if f.digest_of(case.name) != final or not f.is_healthy(case.name):
            problems.append(f"{case.point}: {case.name} is not healthy on {final}")
        if store.unfinished_targets():
            problems.append(f"{case.point}: unfinished targets")
    assert problems == [], "\n".join(problems)
    assert f.leftovers() == []
    # One container per target: no duplicate under another name either.
    ours = f.client.api.containers(all=True, filters={"label": f"patchd.test={f.token}"})
    assert len(ours) == len(cases)
    assert v1 != v2


def test_kill_9_at_every_point_of_a_healthy_patch(f: Fleet, tmp_path: Path) -> None:
    cases, v1 = cases_for(f, tmp_path, HEALTHY_POINTS, "h", "app-v1")
    f.wait_healthy(*(c.name for c in cases))
    v2 = publish(f, cases, "app-v2")
    check_crash_then_restart(f, cases, v1, v2, final=v2)


def test_kill_9_at_every_point_of_a_rollback(f: Fleet, tmp_path: Path) -> None:
    cases, v1 = cases_for(f, tmp_path, BROKEN_POINTS, "b", "app-v1")
    f.wait_healthy(*(c.name for c in cases))
    v2 = publish(f, cases, "app-v2-broken")
    check_crash_then_restart(f, cases, v1, v2, final=v1)
    assert v1 != v2
