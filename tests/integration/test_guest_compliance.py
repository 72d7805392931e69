"""Baselines, `plan` and `patchd compliance` on the lab's Debian machines, through the
`patchd` command (a process, as an operator runs it): plan lists the exact pending
packages; approve_after holds a fresh version back and says until when; a security-only
baseline leaves a non-security update alone; compliance shows 0 pending security
updates after a run."""

from __future__ import annotations

import json
import subprocess
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from patchd.engine.packages import StoreFirstSeen
from patchd.state import SqliteStore
from tests.conftest import write_config
from tests.integration.daemon_helpers import run_patchd
from tests.integration.guest_bed import Bed, bed, machines
from tests.unit.test_readme import os_example

__all__ = ["bed", "machines"]  # fixtures


def config(
    tmp_path: Path,
    bed: Bed,
    names: list[str],
    baselines: dict[str, Any],
    package_manager: str = "apt",
    **group: Any,
) -> Path:
    return write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"w": {"days": ["sat"], "duration": "1h"}},
            "backends": {
                "machines": {
                    "type": "ssh",
                    "package_manager": package_manager,
                    "hosts": [{"name": n, "address": bed.addresses[n]} for n in names],
                    "ssh": {
                        "user": "root",
                        "identity_file": bed.key,
                        "known_hosts": bed.known_hosts,
                    },
                    "lock_timeout": "20s",
                    "reboot_timeout": "120s",
                    "rollback_timeout": "60s",
                    "ledger": tmp_path / "ledger.json",
                }
            },
            "baselines": baselines,
            "groups": {
                "os": {
                    "backend": "machines",
                    "window": "w",
                    "health": {"timeout": "40s", "stable_for": "1s"},
                    **group,
                }
            },
        },
    )


def patchd(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_patchd(*args, "-c", str(path))


def compliance(path: Path) -> tuple[int, dict[str, Any]]:
    proc = patchd(path, "compliance", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    [doc] = json.loads(proc.stdout)["targets"]
    return proc.returncode, doc


def test_plan_lists_the_exact_pending_packages(bed: Bed, tmp_path: Path) -> None:
    name = bed.names[0]
    t = bed.token()
    app, sec = f"lab-app-{t}", f"lab-sec-{t}"
    bed.repo.good(app, "1.0")
    bed.repo.security(sec, "1.0")
    bed.install([name], {app: "1.0", sec: "1.0"})
    bed.repo.good(app, "1.1")
    bed.repo.security(sec, "1.1")
    path = config(tmp_path, bed, [name], {})
    proc = patchd(path, "plan", "--json")
    assert proc.returncode == 0, proc.stderr
    [target] = json.loads(proc.stdout)["groups"][0]["targets"]
    assert target["action"] == "patch"
    assert target["packages"] == [
        {"package": app, "installed": "1.0", "version": "1.1", "security": False},
        {"package": sec, "installed": "1.0", "version": "1.1", "security": True},
    ]
    text = patchd(path, "plan").stdout
    assert f"      {app} 1.0 -> 1.1\n" in text
    assert f"      {sec} 1.0 -> 1.1 (security)\n" in text
    assert bed.installed(name, app) == "1.0"  # plan installs nothing


def test_approve_after_holds_a_fresh_version_back_and_says_until_when(
    bed: Bed, tmp_path: Path
) -> None:
    name = bed.names[1]
    pkg = f"lab-fresh-{bed.token()}"
    bed.repo.good(pkg, "1.0")
    bed.install([name], {pkg: "1.0"})
    bed.repo.good(pkg, "1.1")
    path = config(tmp_path, bed, [name], {"slow": {"approve_after": "7d"}}, baseline="slow")
    before = datetime.now(UTC)
    code, doc = compliance(path)  # the first sighting, journaled
    [update] = doc["updates"]
    assert (update["package"], update["held"]) == (pkg, "approve_after")
    until = datetime.fromisoformat(update["until"])
    assert before + timedelta(days=7) <= until <= datetime.now(UTC) + timedelta(days=7)
    assert update["reason"].startswith("approve_after 7d: first seen ")
    assert update["reason"].endswith(f"eligible at {update['until']}")
    assert code == 0  # held back by the baseline's own rule: not a compliance failure
    # The run leaves it alone and says why; the instant does not move (journaled).
    run = patchd(path, "run", "os", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{pkg} 1.1: approve_after 7d" in run.stdout
    assert bed.installed(name, pkg) == "1.0"
    plan = json.loads(patchd(path, "plan", "--json").stdout)["groups"][0]["targets"][0]
    assert plan["action"] == "hold"
    assert plan["held"][0]["until"] == update["until"]
    assert "Z, eligible at " in patchd(path, "compliance").stdout


def test_security_only_leaves_a_non_security_update_alone_and_compliance_ends_at_zero(
    bed: Bed, tmp_path: Path
) -> None:
    name = bed.names[2]
    t = bed.token()
    app, sec = f"lab-app-{t}", f"lab-sec-{t}"
    bed.repo.good(app, "1.0")
    bed.repo.security(sec, "1.0")
    bed.install([name], {app: "1.0", sec: "1.0"})
    bed.repo.good(app, "1.1")
    bed.repo.security(sec, "1.1")
    path = config(tmp_path, bed, [name], {"sec": {"security_only": True}}, baseline="sec")
    code, doc = compliance(path)
    assert code == 1  # a security update its baseline lets in is pending
    assert doc["pending"] == {"security": 1, "other": 1}
    assert doc["last_patched"] is None
    run = patchd(path, "run", "os", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    assert bed.installed(name, sec) == "1.1"
    assert bed.installed(name, app) == "1.0"  # not a security update: left alone
    code, doc = compliance(path)
    assert code == 0
    assert doc["pending"] == {"security": 0, "other": 1}
    [left] = doc["updates"]
    assert (left["package"], left["held"]) == (app, "not security")
    assert doc["last_patched"] is not None
    rows = patchd(path, "compliance", "--csv").stdout.splitlines()
    assert rows[0].startswith("group,target,pending_security,pending_other,held,")
    assert rows[1].startswith(f"os,{name},0,1,1,not security,")


def test_the_readme_example_runs_on_the_bed(bed: Bed, tmp_path: Path) -> None:
    """README's "Patching operating systems" example, on three of the lab's machines:
    its baseline, groups and stages as written; the hosts, the SSH login, the state
    directory and the soak are the lab's (a test cannot wait two days), and the first
    sighting of the new version is journaled four days back (past approve_after 3d)."""
    doc = tomllib.loads(os_example())
    staging, *production = bed.names[:3]
    tiers = {staging: "staging", **dict.fromkeys(production, "production")}
    linux = doc["backends"]["linux"]
    linux["hosts"] = [
        {"name": n, "address": bed.addresses[n], "labels": {"tier": tier}}
        for n, tier in tiers.items()
    ]
    linux["ssh"] = {"user": "root", "identity_file": bed.key, "known_hosts": bed.known_hosts}
    linux["ledger"] = tmp_path / "package-sets.json"
    doc["groups"]["linux-production"]["soak"] = "0s"
    for group in doc["groups"].values():
        group["health"] = {"timeout": "40s", "stable_for": "1s"}
    path = write_config(tmp_path / "patchd.toml", {"daemon": {"state_dir": tmp_path}, **doc})
    pkg = f"lab-ssl-{bed.token()}"
    bed.repo.security(pkg, "1.0")
    bed.install(list(tiers), {pkg: "1.0"})
    bed.repo.security(pkg, "1.1")

    fresh = json.loads(patchd(path, "plan", "linux-staging", "--json").stdout)
    [target] = fresh["groups"][0]["targets"]
    assert target["action"] == "hold" and "approve_after 3d" in target["reason"]
    store = SqliteStore(tmp_path / "patchd.db")
    StoreFirstSeen(store).first_seen([f"{pkg}=1.1"], datetime.now(UTC) - timedelta(days=4))
    run = patchd(path, "run", "linux-staging", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    assert bed.installed(staging, pkg) == "1.1"

    bed.repo.security(pkg, "1.2")  # the repository moves on after staging verified 1.1
    StoreFirstSeen(store).first_seen([f"{pkg}=1.2"], datetime.now(UTC) - timedelta(days=4))
    store.close()
    run = patchd(path, "run", "linux-production", "--now")
    assert run.returncode == 0, run.stdout + run.stderr
    assert [bed.installed(n, pkg) for n in production] == ["1.1", "1.1"]
    report = json.loads(patchd(path, "compliance", "linux-production", "--json").stdout)
    pending = {d["target"]: d["pending"] for d in report["targets"]}
    # 1.2 is pending: staging never verified it.
    assert pending == {n: {"security": 1, "other": 0} for n in production}


def test_an_excluded_dependency_is_not_pulled_in(bed: Bed, tmp_path: Path) -> None:
    name = bed.names[1]
    t = bed.token()
    app, lib = f"lab-app-{t}", f"lab-lib-{t}"
    bed.repo.good(lib, "1.0")
    bed.repo.publish(app, "1.0", depends=lib)
    bed.install([name], {lib: "1.0", app: "1.0"})
    bed.repo.good(lib, "1.1")
    bed.repo.publish(app, "1.1", depends=f"{lib} (>= 1.1)")
    path = config(tmp_path, bed, [name], {"b": {"exclude": [lib]}}, baseline="b")
    run = patchd(path, "run", "os", "--now")
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"would also install {lib}=1.1, which the set leaves out" in run.stdout + run.stderr
    assert (bed.installed(name, app), bed.installed(name, lib)) == ("1.0", "1.0")
