"""Custom attributes: reading them (last value wins) and patchd's own on VMs and hosts.

patchd keeps its state on the target, where it survives patchd's host and database:
- `patchd.patch_version`: the patch level last committed (compared with `patch.version`);
- `patchd.kept_snapshots` (VMs): names of patchd snapshots a commit kept for
  `snapshot.keep`, so a kept snapshot is told apart from one an unfinished run left;
- `patchd.depends_on` (set by people): names of targets to patch before this one.

vcsim 0.24.2 APPENDS on every SetField instead of replacing the value, so values are read
last-wins (which is also right for a real vCenter, where there is one value per key).
Definitions are made per managed object type (vcsim cannot return a global one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from patchd.backends.vsphere.connection import vmomi

VERSION = "patchd.patch_version"
KEPT = "patchd.kept_snapshots"
DEPENDS_ON = "patchd.depends_on"


def field_names(definitions: Iterable[Any] | None) -> dict[int, str]:
    """Custom field key -> name."""
    return {int(d.key): str(d.name) for d in definitions or []}


def values(custom_value: Iterable[Any] | None, names: Mapping[int, str]) -> dict[str, str]:
    """An entity's custom attributes by name; a later value for a key wins."""
    found: dict[str, str] = {}
    for item in custom_value or []:
        name = names.get(int(item.key))
        if name is not None:
            found[name] = str(getattr(item, "value", "") or "")
    return found


def _applies(definition: Any, mo_type: Any) -> bool:
    kind = getattr(definition, "managedObjectType", None)
    return kind is None or kind is mo_type or kind == mo_type


def ensure_field(content: Any, name: str, mo_type: Any) -> int:
    """The key of the custom field `name` for `mo_type`, defining it if needed."""
    vim, _ = vmomi()

    manager = content.customFieldsManager
    for definition in manager.field or []:
        if definition.name == name and _applies(definition, mo_type):
            return int(definition.key)
    try:
        return int(manager.AddFieldDefinition(name=name, moType=mo_type).key)
    except vim.fault.DuplicateName:  # defined meanwhile by another thread or client
        for definition in manager.field or []:
            if definition.name == name and _applies(definition, mo_type):
                return int(definition.key)
        raise


def set_value(content: Any, entity: Any, name: str, value: str) -> None:
    """Set custom attribute `name` of `entity` (defining the field if needed)."""
    key = ensure_field(content, name, type(entity))
    content.customFieldsManager.SetField(entity=entity, key=key, value=value)


def split_names(text: str) -> list[str]:
    return [part.strip() for part in text.replace(",", " ").split() if part.strip()]
