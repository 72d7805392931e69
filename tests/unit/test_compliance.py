"""`patchd compliance` without machines: an ssh backend answered from a list, a real
SQLite store. What it reports per target, how it renders (text, CSV), its exit codes,
and the metrics the daemon shows from what it recorded."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from patchd import compliance
from patchd.backends.ssh import SSHBackend
from patchd.config import Settings, load_settings
from patchd.metrics import JournalCollector, journal_view
from patchd.metrics.collectors import GroupCollector
from patchd.state import open_store
from tests.conftest import write_config
from tests.unit.test_baseline import PENDING, T0, _backend, _Machine


def _setup(tmp_path: Path, baseline: dict[str, object]) -> tuple[Settings, SSHBackend]:
    settings = load_settings(
        write_config(
            tmp_path / "patchd.toml",
            {
                "daemon": {"state_dir": tmp_path / "state"},
                "windows": {"w": {"days": ["sat"], "duration": "4h"}},
                "backends": {"m": {"type": "ssh", "ssh": {"identity_file": tmp_path / "id"}}},
                "baselines": {"b": baseline},
                "groups": {"db": {"backend": "m", "window": "w", "baseline": "b"}},
            },
        )
    )
    return settings, _backend(tmp_path, _Machine(PENDING, reboot="/var/run/reboot-required"))


def test_compliance_reports_pending_held_and_reboot_and_records_it(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("key")
    (tmp_path / "id").chmod(0o600)
    settings, backend = _setup(
        tmp_path, {"exclude": ["linux-*"], "approve_after": "2d", "security_max_age": "1d"}
    )
    store = open_store(tmp_path / "state.db")
    [doc] = compliance.check(settings, store, lambda name: backend, ["db"], T0)
    assert doc["pending"] == {"security": 2, "other": 2} and doc["held"] == 4
    assert doc["reboot_required"] == "/var/run/reboot-required"
    assert doc["last_patched"] is None and doc["last_checked"] == "2026-03-01T12:00:00Z"
    held = {u["package"]: (u["held"], u["until"]) for u in doc["updates"]}
    assert held["linux-image-amd64"] == ("excluded", None)
    assert held["openssl"] == ("approve_after", "2026-03-03T12:00:00Z")
    assert compliance.exit_code([doc]) == compliance.COMPLIANT  # held back: the baseline's call
    text = compliance.render_text([doc])
    assert "web1: 4 pending (2 security, 2 other), 4 held back; REBOOT REQUIRED" in text
    assert "openssl 3.0.11 -> 3.0.15 (security)  held: approve_after 2d: first seen" in text
    [row] = csv.DictReader(io.StringIO(compliance.render_csv([doc])))
    assert row["pending_security"] == "2" and row["held_reasons"] == "approve_after;excluded"

    # Two days later the security updates are in: non-compliant until a run installs them.
    [later] = compliance.check(
        settings,
        store,
        lambda name: backend,
        ["db"],
        T0 + timedelta(days=2),
    )
    assert later["allowed_security"] == 2 and later["held"] == 1
    assert compliance.exit_code([later]) == compliance.NONCOMPLIANT
    assert later["oldest_security_seen"] == "2026-03-01T12:00:00Z"  # journaled on day 0

    registry = CollectorRegistry()
    registry.register(JournalCollector(lambda: journal_view(settings, store)))
    registry.register(GroupCollector(lambda: settings))
    exposed = generate_latest(registry).decode()
    assert 'patchd_target_pending_updates{group="db",kind="security",target="web1"} 2.0' in exposed
    assert 'patchd_target_held_updates{group="db",target="web1"} 1.0' in exposed
    assert 'patchd_target_reboot_required{group="db",target="web1"} 1.0' in exposed
    [since] = [
        s.value
        for f in text_string_to_metric_families(exposed)
        for s in f.samples
        if s.name == "patchd_target_security_pending_since_timestamp_seconds"
    ]
    assert since == T0.timestamp()
    assert 'patchd_group_security_max_age_seconds{backend="m",group="db"} 86400.0' in exposed


def test_a_machine_that_cannot_be_checked_keeps_its_last_check_time(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("key")
    (tmp_path / "id").chmod(0o600)
    settings, backend = _setup(tmp_path, {})
    store = open_store(tmp_path / "state.db")
    compliance.check(settings, store, lambda name: backend, ["db"], T0)

    def unreachable() -> None:
        raise OSError("web1: connection refused")

    backend.packages.connect = lambda target: unreachable()  # type: ignore[assignment,return-value]
    [doc] = compliance.check(
        settings,
        store,
        lambda name: backend,
        ["db"],
        T0 + timedelta(hours=1),
    )
    assert doc["error"] == "web1: connection refused"
    assert doc["last_checked"] == "2026-03-01T12:00:00Z"
    assert compliance.exit_code([doc]) == compliance.UNCHECKED
    assert "web1: NOT CHECKED: web1: connection refused (last checked 2026-03-01T12:00:00Z)" in (
        compliance.render_text([doc])
    )


def test_a_store_that_cannot_be_written_leaves_the_answer_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("key")
    (tmp_path / "id").chmod(0o600)
    settings, backend = _setup(tmp_path, {"approve_after": "1d"})
    open_store(tmp_path / "state.db").close()
    readonly = open_store(tmp_path / "state.db", readonly=True)
    [doc] = compliance.check(settings, readonly, lambda name: backend, ["db"], T0)
    assert doc["error"] is None and doc["held"] == 4  # first seen now: held back a day
    assert "readonly database" in doc["not_recorded"]
    assert "(not recorded for the metrics: " in compliance.render_text([doc])
