"""config/patchd.example.toml says it shows every key: this checks it against the schemas
(patchd.config.schema and each installed backend's config and select models), so a new
key cannot land without its line in the example. A key may be shown commented out
(`# key = ...`, for files that must exist) inside its table."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from patchd.config.baselines import BaselineModel
from patchd.config.schema import DaemonModel, FreezeModel, GroupModel, WindowModel
from patchd.plugins import load_plugin

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "patchd.example.toml"
# Backends a site configures; `fake` is for tests and has no keys.
BACKEND_TYPES = ("docker", "vsphere", "ssh")
# Keys the schema still parses only to refuse them with a hint.
REFUSED = {"backends.docker.rollback_retention"}  # -> groups.*.snapshot.keep


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
    keys = model_keys(DaemonModel, "daemon")
    keys |= model_keys(WindowModel, "windows.*")
    keys |= model_keys(FreezeModel, "freezes.*")
    keys |= model_keys(BaselineModel, "baselines.*")
    keys |= {k for k in model_keys(GroupModel, "groups.*") if k != "groups.*.select"}
    for kind in BACKEND_TYPES:
        plugin = load_plugin(kind)
        keys |= {"backends.*.type"} | model_keys(plugin.config_model, f"backends.{kind}")
        keys |= model_keys(plugin.select_model, f"groups.*.select.{kind}")
    return keys - REFUSED


def _walk(table: dict[str, Any], prefix: str) -> set[str]:
    keys = set()
    for key, value in table.items():
        path = f"{prefix}.{key}"
        keys.add(path)
        # Tables of settings nest; a select's labels/custom_attribute hold free names.
        if isinstance(value, dict) and key not in ("labels", "custom_attribute"):
            keys |= _walk(value, path)
        elif isinstance(value, list):  # an array of tables: ssh's [[hosts]]
            for item in value:
                if isinstance(item, dict):
                    keys |= _walk(item, path)
    return keys


def example_keys() -> set[str]:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    keys = _walk(doc.get("daemon", {}), "daemon")
    for section in ("windows", "freezes", "baselines"):
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
    # Keys shown commented out, inside the [backends.NAME] table they belong to.
    # (A sub-table such as [backends.NAME.ssh] counts too.)
    kind = None
    for line in text.splitlines():
        header = re.match(r"\[backends\.([\w-]+)((?:\.[\w-]+)*)\]", line)
        if header:
            kind = types[header.group(1)] + header.group(2)
        elif line.startswith("["):
            kind = None
        commented = re.match(r"# (\w+) = ", line)
        if kind and commented:
            keys.add(f"backends.{kind}.{commented.group(1)}")
    return keys


def test_the_example_config_shows_every_key() -> None:
    missing = sorted(schema_keys() - example_keys())
    assert missing == [], f"keys missing from {EXAMPLE.name}: {missing}"


def test_the_example_config_shows_no_unknown_key() -> None:
    unknown = sorted(example_keys() - schema_keys())
    assert unknown == []
