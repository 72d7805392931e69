"""`patchd compliance`: per target of the groups that patch packages, what is pending
(security / other), what the group's baseline holds back and why, whether the machine
asks for a reboot, when patchd last patched it and when it was last checked.

A check asks every target's package manager (it changes nothing on a target), journals
when patchd first saw each candidate version (approve_after counts from then) and records
each target's result in the state store, where the daemon's metrics read it. The daemon
checks a group right after each of its runs, so the metrics follow the patches without
any polling; `patchd compliance` checks whenever it is asked.

Exit codes: 0 every target was checked and none has a security update pending that its
baseline lets in; 1 some target has one; 2 config error; 3 some target could not be
checked (this wins over 1).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from patchd.backends.base import Backend, Target
from patchd.config.baselines import installs_packages
from patchd.config.settings import Group, Settings
from patchd.engine import stage_gate
from patchd.engine.packages import StoreFirstSeen, assess, compliance, record_compliance
from patchd.guest.assessment import AssessesPackages, Assessment
from patchd.state import Store, StoreError
from patchd.states import TargetState

COMPLIANT, NONCOMPLIANT, UNCHECKED = 0, 1, 3
CSV_FIELDS = (
    "group", "target", "pending_security", "pending_other", "held", "held_reasons",
    "reboot_required", "last_patched", "last_checked", "error",
)  # fmt: skip
_RUN_LOOKBACK = 100  # runs of a group searched for a target's last patch


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def package_groups(settings: Settings, names: Sequence[str]) -> list[str]:
    """Those of `names` whose targets patchd patches package by package (what compliance
    is about: ssh machines, vSphere VMs with patch.method "apt" or "dnf"), told by the config, so
    that no other backend is connected to find out."""
    groups = [settings.groups[name] for name in names]
    return [
        group.name
        for group in groups
        if installs_packages(settings.backends[group.backend].type, group.patch.method)
    ]


def last_patched(store: Store, group: str) -> dict[str, datetime]:
    """When each target of the group was last committed by a run (newest runs first)."""
    found: dict[str, datetime] = {}
    for run in store.runs(group, limit=_RUN_LOOKBACK):
        for row in store.targets(run.id):
            if row.state == TargetState.COMMITTED and row.name not in found:
                found[row.name] = row.updated
    return found


def target_doc(
    group: Group, target: Target, found: Assessment, patched: datetime | None, now: datetime
) -> dict[str, Any]:
    """One target's compliance, JSON-able (also what the store keeps)."""
    held = {h.update.package: h for h in found.decision.held}
    updates = []
    for p in found.pending:
        entry: dict[str, Any] = {
            "package": p.package,
            "installed": p.installed,
            "candidate": p.candidate,
            "security": p.security,
            "source": p.source,
            "held": None,
        }
        if p.package in held:
            h = held[p.package].as_dict()
            entry.update(held=h["held"], reason=h["reason"], until=h["until"])
        updates.append(entry)
    summary = found.summary()
    eligible_security = sum(1 for p in found.decision.eligible if p.security)
    return {
        "group": group.name,
        "target": target.name,
        "baseline": group.baseline_name,
        "pending": {"security": summary["security"], "other": summary["other"]},
        "held": summary["held"],
        "allowed_security": eligible_security,
        "updates": updates,
        "reboot_required": found.reboot_required,
        "oldest_security_seen": _iso(found.decision.oldest_security()),
        "last_patched": _iso(patched),
        "last_checked": _iso(now),
        "error": None,
    }


def check(
    settings: Settings,
    store: Store,
    backend_of: Callable[[str], Backend],
    groups: Sequence[str],
    now: datetime,
    *,
    record: bool = True,
    concurrency: int = 6,
) -> list[dict[str, Any]]:
    """Check every target of `groups` (those of a package backend), `concurrency`
    machines at a time; with `record`, journal first sightings and the results. A target
    that cannot be checked gets `error`, and its last recorded check's time.
    `backend_of` gives a connected backend by name."""
    docs: list[dict[str, Any]] = []
    journal = StoreFirstSeen(store, record=record)
    for name in groups:
        group = settings.groups[name]
        backend = backend_of(group.backend)
        if isinstance(backend, AssessesPackages):
            docs.extend(_check_group(store, backend, group, journal, now, record, concurrency))
    return docs


def _check_group(
    store: Store,
    backend: Backend,
    group: Group,
    journal: StoreFirstSeen,
    now: datetime,
    record: bool,
    concurrency: int,
) -> list[dict[str, Any]]:
    pins = stage_gate(group, store, now).pins
    patched = last_patched(store, group.name)
    before = {c.target: c.checked for c in compliance(store, group.name)}
    try:
        targets = list(backend.discover(group.select))
    except Exception as err:
        return [_failed(group, "(discovery)", f"discovering targets: {err}", None)]

    def one(target: Target) -> dict[str, Any]:
        try:
            found = assess(backend, target, pins, group, journal, now)
        except Exception as err:
            return _failed(group, target.name, str(err), before.get(target.name))
        if found is None:  # a target of this backend that is not patched by packages
            return _failed(group, target.name, "not patched package by package", None)
        doc = target_doc(group, target, found, patched.get(target.name), now)
        if record:
            try:
                record_compliance(store, group.name, target.name, doc, now)
            except StoreError as err:  # the answer stands; only the metrics miss it
                doc["not_recorded"] = str(err)
        return doc

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(targets)))) as pool:
        return list(pool.map(one, targets))


def _failed(group: Group, target: str, error: str, checked: datetime | None) -> dict[str, Any]:
    return {
        "group": group.name,
        "target": target,
        "baseline": group.baseline_name,
        "pending": None,
        "held": None,
        "allowed_security": None,
        "updates": [],
        "reboot_required": None,
        "oldest_security_seen": None,
        "last_patched": None,
        "last_checked": _iso(checked),
        "error": error,
    }


def exit_code(docs: Sequence[Mapping[str, Any]]) -> int:
    if any(d["error"] for d in docs):
        return UNCHECKED
    if any(d["allowed_security"] for d in docs):
        return NONCOMPLIANT
    return COMPLIANT


def render_csv(docs: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for d in docs:
        pending = d["pending"] or {}
        reasons = sorted({u["held"] for u in d["updates"] if u["held"]})
        writer.writerow(
            {
                "group": d["group"],
                "target": d["target"],
                "pending_security": pending.get("security", ""),
                "pending_other": pending.get("other", ""),
                "held": "" if d["held"] is None else d["held"],
                "held_reasons": ";".join(reasons),
                "reboot_required": d["reboot_required"] or "",
                "last_patched": d["last_patched"] or "",
                "last_checked": d["last_checked"] or "",
                "error": d["error"] or "",
            }
        )
    return out.getvalue()


def render_text(docs: Sequence[Mapping[str, Any]]) -> str:
    if not docs:
        return "no group patches packages (compliance is about groups of ssh backends)\n"
    lines: list[str] = []
    group = None
    for d in docs:
        if d["group"] != group:
            group = d["group"]
            baseline = f"baseline {d['baseline']}" if d["baseline"] else "no baseline"
            lines.append(f"group {group} ({baseline})")
        if d["error"]:
            checked = d["last_checked"] or "never"
            lines.append(f"  {d['target']}: NOT CHECKED: {d['error']} (last checked {checked})")
            continue
        pending = d["pending"]
        total = pending["security"] + pending["other"]
        head = (
            f"  {d['target']}: {total} pending ({pending['security']} security,"
            f" {pending['other']} other), {d['held']} held back"
        )
        if d["reboot_required"]:
            head += f"; REBOOT REQUIRED: {d['reboot_required']}"
        lines.append(head)
        lines.append(
            f"    last patched {d['last_patched'] or 'never'}; checked {d['last_checked']}"
        )
        if d.get("not_recorded"):
            lines.append(f"    (not recorded for the metrics: {d['not_recorded']})")
        for u in d["updates"]:
            kind = " (security)" if u["security"] else ""
            line = f"    {u['package']} {u['installed'] or '(new)'} -> {u['candidate']}{kind}"
            if u["held"]:
                line += f"  held: {u['reason']}"
            lines.append(line)
    return "\n".join(lines) + "\n"
