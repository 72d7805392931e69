"""One name for an image version in every output (issue 15): `repository@sha256:<full hex>`,
through patchd.versions, in plan, history, quarantine and approval texts, `patchd run`'s
progress lines, log fields and notifications. Before, each output cut the digest to 19
characters its own way, and no output could be pasted into `docker pull`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from patchd import log, reports, versions
from patchd.backends.base import Target, Update
from patchd.config import load_settings
from patchd.engine.controls import Approval, Quarantine
from patchd.engine.target import TargetOutcome
from patchd.notifications.events import _version
from patchd.observers import LogObserver
from patchd.state.sqlite import SqliteStore
from patchd.states import TargetResult, TargetState
from tests.conftest import write_config
from tests.unit.test_runner import config

OLD = "sha256:" + "a" * 64
NEW = "sha256:" + "b" * 64
REF = "127.0.0.1:5000/patchd-lab/app:1"
OLD_NAME = f"127.0.0.1:5000/patchd-lab/app@{OLD}"
NEW_NAME = f"127.0.0.1:5000/patchd-lab/app@{NEW}"
AT = datetime(2026, 11, 28, 2, 30, tzinfo=UTC)


def test_an_image_digest_is_named_by_repository_and_whole_digest() -> None:
    assert versions.name(REF, NEW) == NEW_NAME
    assert versions.name(f"127.0.0.1:5000/app@{OLD}", NEW) == f"127.0.0.1:5000/app@{NEW}"
    assert versions.name("nginx", NEW) == f"nginx@{NEW}"
    assert versions.change(REF, OLD, NEW) == f"{OLD_NAME} -> {NEW_NAME}"
    # Versions that are not image digests stay as the backend reported them.
    assert versions.name("guest", "pkgs-0123456789abcdef") == "pkgs-0123456789abcdef"
    assert versions.name("", NEW) == NEW
    assert versions.name(REF, None) == ""
    assert versions.of("app", "v2") == "app v2"
    assert versions.of(REF, NEW) == NEW_NAME


def test_plan_history_and_controls_name_versions_the_same_way(tmp_path: Path) -> None:
    doc = {
        "group": "web", "backend": "d", "window": "w", "max_concurrency": "1",
        "max_errors": "1", "window_allows_start_now": True, "next_opening": None,
        "stage_gate": {"open": True, "reason": "no earlier stage", "pins": {}},
        "targets": [{"name": "web1", "action": "patch", "batch": 1, "ref": REF,
                     "current": OLD, "available": NEW,
                     "change": versions.change(REF, OLD, NEW)}],
    }  # fmt: skip
    assert f"web1  {REF}  {OLD_NAME} -> {NEW_NAME}" in reports.render_plan(doc)

    store = SqliteStore(tmp_path / "patchd.db")
    try:
        store.start_run("r1", "web", "w", AT)
        store.record(
            "r1", "web1", "web1", TargetState.SNAPSHOTTING, AT, step="snapshot",
            phase="intent", version_from=OLD, version_to=NEW,
        )  # fmt: skip
        store.record(
            "r1", "web1", "web1", TargetState.SNAPSHOTTED, AT, step="snapshot", phase="done",
            snapshot={"container": "web1", "image": REF},
        )  # fmt: skip
        text = reports.render_history(reports.history(store, "web", 5))
    finally:
        store.close()
    assert f"web1: snapshotted {OLD_NAME} -> {NEW_NAME}" in text

    held = Quarantine("web", REF, NEW, AT, "web1", "unhealthy")
    assert held.describe().startswith(f"{NEW_NAME} quarantined since")
    approval = Approval("prod", AT, "ops", {REF: NEW})
    assert f"({NEW_NAME})" in approval.describe()


def test_notifications_and_log_fields_carry_the_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = TargetOutcome(
        Target("web1", "web1", "container"), TargetResult.SUCCESS, Update(REF, OLD, NEW)
    )
    assert _version(outcome) == {
        "target": "web1", "ref": REF, "from": OLD_NAME, "to": NEW_NAME, "result": "success",
    }  # fmt: skip
    log.setup("json", "info")
    settings = load_settings(write_config(tmp_path / "patchd.toml", config(tmp_path / "state")))
    LogObserver().outcome("r1", settings.groups["staging"], outcome)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["version_from"], line["version_to"]) == (OLD_NAME, NEW_NAME)
