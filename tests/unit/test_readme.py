"""The README documents every config key (from the schemas and every installed backend's
models), every metric (from a real registry with the daemon's collectors) and every
registered backend; the LICENSE file is the license pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib
import types
import typing
from datetime import UTC, datetime
from pathlib import Path
from tomllib import loads

import pytest
from pydantic import BaseModel

from patchd.backends import installed_types, load_plugin
from patchd.cli import main
from patchd.config import load_settings
from patchd.config.baselines import BaselineModel
from patchd.config.notifications import NotificationModel
from patchd.config.schema import (
    DaemonModel,
    FreezeModel,
    GroupModel,
    HaModel,
    StateModel,
    WindowModel,
)
from patchd.metrics import HaMetrics, JournalView, Metrics, daemon_collectors
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCUMENTED = set(re.findall(r"`([^`\s]+)`", README))


def _nested(annotation: object) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    if isinstance(annotation, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    found = []
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation)
        if nested is not None and name != "select":
            found.extend(keys(nested, f"{prefix}{name}."))
        else:
            found.append(prefix + name)
    return found


def test_every_config_key_is_documented() -> None:
    wanted = keys(DaemonModel) + keys(WindowModel) + keys(FreezeModel) + keys(GroupModel)
    wanted += keys(StateModel) + keys(HaModel)
    wanted += keys(NotificationModel) + keys(BaselineModel)
    for type_name in installed_types():
        plugin = load_plugin(type_name)
        wanted += keys(plugin.config_model) + keys(plugin.select_model)
    missing = sorted({key for key in wanted if key not in DOCUMENTED})
    assert not missing, f"config keys missing from README.md: {missing}"


def test_every_metric_is_documented() -> None:
    metrics = Metrics()

    def no_settings() -> typing.Any:
        return types.SimpleNamespace(windows={}, freezes=(), groups={})

    registry = metrics.registry
    for collector in daemon_collectors(
        no_settings, lambda: datetime.now(UTC), dict, lambda: JournalView()
    ):
        registry.register(collector)
    HaMetrics(registry, lambda: 1.0)  # a daemon with leadership on
    names = set()
    for family in registry.collect():
        kind = family.type
        suffix = {"counter": "_total", "info": "_info"}.get(kind, "")
        names.add(family.name + suffix)
    assert "patchd_patch_operations_total" in names
    missing = sorted(n for n in names if n not in DOCUMENTED)
    assert not missing, f"metrics missing from README.md: {missing}"


def test_the_worked_example_is_what_patchd_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = README.index("<!-- worked-example")
    config, output = re.findall(r"```(?:toml)?\n(.*?)```", README[start:], re.S)[:2]
    shown = re.search(r"`patchd windows ([^`]*)`", README[start:])
    assert shown is not None
    path = tmp_path / "example.toml"
    path.write_text(config.replace("/var/lib/patchd", str(tmp_path / "state")))
    assert main(["check-config", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["windows", "-c", str(path), *shown.group(1).split()]) == 0
    assert capsys.readouterr().out == output


def os_example() -> str:
    """The config of the README's worked example of "Patching operating systems"."""
    start = README.index("<!-- os-example")
    [config] = re.findall(r"```toml\n(.*?)```", README[start:], re.S)[:1]
    return config


def test_the_os_patching_example_is_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "example.toml"
    path.write_text(os_example().replace("/var/lib/patchd", str(tmp_path / "state")))
    assert main(["check-config", "-c", str(path)]) == 0
    assert "stages: linux-staging -> linux-production" in capsys.readouterr().out
    settings = load_settings(path)
    production = settings.groups["linux-production"]
    assert production.baseline is not None
    assert production.baseline is settings.baselines["servers"]
    assert production.baseline.exclude == ["linux-image-*"]


def test_the_backend_list_names_every_registered_backend() -> None:
    """The `type` row of `[backends.NAME]` names every backend pyproject.toml registers in
    the `patchd.backends` entry points (it once named only `docker`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    registered = set(project["project"]["entry-points"]["patchd.backends"])
    row = next(line for line in README.splitlines() if line.startswith("| `type` | required |"))
    named = set(re.findall(r"`(\w+)`", row.split("|")[3]))
    assert registered <= named, f"backends missing from README's list: {registered - named}"
    assert registered == set(installed_types())  # the installed package is this checkout


# What the LICENSE file of each declared SPDX license says in its first lines.
LICENSE_HEADERS = {"Apache-2.0": ("Apache License", "Version 2.0, January 2004")}


def test_the_license_file_matches_the_declared_license() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["license"]
    spdx = declared if isinstance(declared, str) else declared["text"]
    text = (ROOT / "LICENSE").read_text()
    for phrase in LICENSE_HEADERS[spdx]:
        assert phrase in text[:400], f"LICENSE does not read as {spdx}: {phrase!r} missing"
    assert "TERMS AND CONDITIONS" in text and len(text) > 10_000  # the whole text, not a stub


def test_the_ha_example_is_a_valid_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = README.index("## High availability")
    [snippet] = re.findall(r"```toml\n(.*?)```", README[start:], re.S)[:1]
    assert "[state]" in snippet and "[ha]" in snippet
    path = write_config(tmp_path / "ha.toml", {"daemon": {"state_dir": tmp_path}, **loads(snippet)})
    assert main(["check-config", "-c", str(path)]) == 0, capsys.readouterr()
