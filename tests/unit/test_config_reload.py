"""Reviewing a reload (patchd.config.reload): a config without groups is refused, groups
added and removed are named, and keys only a restart applies keep their old values and
are named instead of being ignored in silence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchd.config import Settings, load_settings
from patchd.config.reload import review
from tests.conftest import write_config


def values(tmp_path: Path, *groups: str, **daemon: Any) -> dict[str, Any]:
    return {
        "daemon": {"state_dir": tmp_path / "state", "metrics_address": "127.0.0.1:9120", **daemon},
        "windows": {"w": {"days": ["sat"], "duration": "1h"}},
        "backends": {"d": {"type": "docker"}},
        "groups": {name: {"backend": "d", "window": "w"} for name in groups},
    }


def load(path: Path, config: dict[str, Any]) -> Settings:
    return load_settings(write_config(path, config))


def test_a_config_without_groups_is_refused_and_the_old_one_kept(tmp_path: Path) -> None:
    old = load(tmp_path / "patchd.toml", values(tmp_path, "web", "db"))
    empty = tmp_path / "empty.toml"
    empty.write_text("")  # an empty or truncated file loads: every key has a default
    for new in (load_settings(empty), load(tmp_path / "half.toml", values(tmp_path))):
        change = review(old, new)
        assert change.settings is old
        assert change.refused is not None
        assert "has no group, and the one in force has db, web" in change.refused
        assert "empty or half-saved" in change.refused and str(new.files[0]) in change.refused
    # Without groups before, none after is no loss.
    bare = load(tmp_path / "bare.toml", values(tmp_path))
    assert review(bare, load_settings(empty)).refused is None


def test_groups_added_and_removed_are_named(tmp_path: Path) -> None:
    old = load(tmp_path / "a.toml", values(tmp_path, "web", "db"))
    new = load(tmp_path / "b.toml", values(tmp_path, "web", "cache", "queue"))
    change = review(old, new)
    assert change.refused is None and change.settings.groups.keys() == new.groups.keys()
    assert (change.added, change.removed) == (("cache", "queue"), ("db",))
    assert change.needs_restart == () and change.note is None


def test_keys_only_a_restart_applies_keep_their_old_values_and_are_named(
    tmp_path: Path,
) -> None:
    old = load(tmp_path / "a.toml", values(tmp_path, "web"))
    config = values(
        tmp_path,
        "web",
        state_dir=tmp_path / "elsewhere",
        metrics_address="127.0.0.1:9999",
        control_socket=tmp_path / "c.sock",
        control_group="wheel",
        log_level="debug",
    )
    new = load(tmp_path / "b.toml", {**config, "state": {"outage_wait": "5s"}, "ha": {"node": "b"}})
    change = review(old, new)
    assert change.needs_restart == (
        "daemon.state_dir",
        "daemon.metrics_address",
        "state",
        "ha",
    )
    kept = change.settings
    assert kept.daemon.state_dir == old.daemon.state_dir
    assert (kept.daemon.metrics_host, kept.daemon.metrics_port) == ("127.0.0.1", 9120)
    # a reload moves the control socket (and gives it to the new group): not restart-only
    assert kept.daemon.control_socket == tmp_path / "c.sock"
    assert kept.daemon.control_group == "wheel"
    assert (kept.state, kept.ha) == (old.state, old.ha)
    assert kept.daemon.log_level == "debug"  # what a reload can apply, it applies
    assert change.note is not None
    assert change.note.startswith("restart needed to apply daemon.state_dir, daemon.metrics")
