"""config/patchd.example.toml says it shows every key: this derives the full key set
from the config models themselves (every section of patchd.config.schema.SECTIONS, and
the config and select models of every backend registered in the `patchd.backends` entry
points) and fails on any key missing from the example, so a new key cannot land without
its line there. A key may be shown commented out (`# key = ...`, for files that must
exist, or for one of two exclusive keys) inside its table."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from patchd.config.baselines import BaselineModel
from patchd.config.notifications import NotificationModel
from patchd.config.schema import (
    SECTIONS,
    DaemonModel,
    FreezeModel,
    GroupModel,
    HaModel,
    StateModel,
    WindowModel,
)
from patchd.plugins import load_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "patchd.example.toml"
# Each top-level section: its model, and whether it is a table of named tables.
# `backends` and `groups.*.select` depend on the backend type: see schema_keys.
SECTION_MODELS: dict[str, tuple[type[BaseModel] | None, bool]] = {
    "daemon": (DaemonModel, False),
    "state": (StateModel, False),
    "ha": (HaModel, False),
    "windows": (WindowModel, True),
    "freezes": (FreezeModel, True),
    "baselines": (BaselineModel, True),
    "groups": (GroupModel, True),
    "notifications": (NotificationModel, True),
    "backends": (None, True),
}
# Registered for tests only (an in-memory backend a site never configures).
TEST_BACKENDS = {"fake"}
# Keys the schema still parses only to refuse them with a hint.
REFUSED = {"backends.docker.rollback_retention"}  # -> groups.*.snapshot.keep
# Tables whose keys are free names (label names, attribute names), not settings.
FREE = ("labels", "custom_attribute")


def backend_types() -> list[str]:
    registered = {ep.name for ep in entry_points(group="patchd.backends")}
    return sorted(registered - TEST_BACKENDS)


def model_keys(model: type[BaseModel], prefix: str) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}"
        keys.add(key)
        nested = _model_of(field.annotation)
        if nested is not None:
            keys |= model_keys(nested, key)
    return keys


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def schema_keys() -> set[str]:
    keys: set[str] = set()
    for section, (model, named) in SECTION_MODELS.items():
        if model is not None:
            prefix = f"{section}.*" if named else section
            keys |= {k for k in model_keys(model, prefix) if k != "groups.*.select"}
    for kind in backend_types():
        plugin = load_plugin(kind)
        keys |= {"backends.*.type"} | model_keys(plugin.config_model, f"backends.{kind}")
        keys |= model_keys(plugin.select_model, f"groups.*.select.{kind}")
    return keys - REFUSED


def _walk(table: dict[str, Any], prefix: str) -> set[str]:
    keys = set()
    for key, value in table.items():
        path = f"{prefix}.{key}"
        keys.add(path)
        # Tables (and arrays of tables) of settings nest; FREE tables hold free names.
        if isinstance(value, dict) and key not in FREE:
            keys |= _walk(value, path)
        elif isinstance(value, list):  # an array of tables: ssh's [[backends.NAME.hosts]]
            for item in value:
                if isinstance(item, dict):
                    keys |= _walk(item, path)
    return keys


def example_keys() -> set[str]:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    keys: set[str] = set()
    for section in ("daemon", "state", "ha"):
        keys |= _walk(doc.get(section, {}), section)
    for section in ("windows", "freezes", "baselines", "notifications"):
        for table in doc.get(section, {}).values():
            keys |= _walk(table, f"{section}.*")
    types = {name: table["type"] for name, table in doc.get("backends", {}).items()}
    for table in doc.get("backends", {}).values():
        keys.add("backends.*.type")
        keys |= _walk({k: v for k, v in table.items() if k != "type"}, f"backends.{table['type']}")
    for table in doc.get("groups", {}).values():
        select = table.get("select", {})
        keys |= _walk({k: v for k, v in table.items() if k != "select"}, "groups.*")
        keys |= _walk(select, f"groups.*.select.{types[table['backend']]}")
    # Keys shown commented out (`# key = ...`), inside the table (or the array of
    # tables, `[[backends.NAME.hosts]]`) they belong to.
    prefix = None
    for line in text.splitlines():
        header = re.match(r"\[\[?([\w.-]+)\]\]?", line)
        if header:
            prefix = _schema_path(header.group(1).split("."), types)
            continue
        commented = re.match(r"# (\w+) = ", line)
        if prefix and commented:
            keys.add(f"{prefix}.{commented.group(1)}")
    return keys


def _schema_path(parts: list[str], types: dict[str, str]) -> str:
    """The schema path of a table header: `backends.vcenter` -> `backends.vsphere`,
    `groups.web.health` -> `groups.*.health`, `state` -> `state`."""
    section, rest = parts[0], parts[1:]
    if section == "backends" and rest:
        return ".".join(["backends", types[rest[0]], *rest[1:]])
    if SECTION_MODELS.get(section, (None, False))[1] and rest:
        return ".".join([section, "*", *rest[1:]])
    return ".".join(parts)


def test_every_section_has_its_model_here() -> None:
    """A new top-level section must be added to SECTION_MODELS, so its keys are checked."""
    assert sorted(SECTION_MODELS) == sorted(SECTIONS)


def test_the_example_config_shows_every_key() -> None:
    missing = sorted(schema_keys() - example_keys())
    assert missing == [], f"keys missing from {EXAMPLE.name}: {missing}"


def test_the_example_config_shows_no_unknown_key() -> None:
    unknown = sorted(example_keys() - schema_keys())
    assert unknown == []
