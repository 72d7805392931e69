"""The backend plugin registry: the `patchd.backends` entry-point group and BackendSpec.

It sits below both config and the backends, and imports neither: config looks a type's
models up here to validate `[backends.NAME]` tables (with their file and key path), and
`patchd.backends.connect` turns a validated BackendSpec into a backend. Config thus
never imports the backends, and a backend never reaches back into config's loader.
Plugins are imported lazily, the first time their type is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

GROUP = "patchd.backends"


class BackendPlugin(Protocol):
    """The class-level surface patchd reads from a registered backend.

    Calling the class with `(name, config)` gives a Backend (`patchd.backends.base`).
    """

    config_model: ClassVar[type[BaseModel]]
    select_model: ClassVar[type[BaseModel]]

    def __init__(self, name: str, config: Any) -> None: ...


# A problem a plugin finds in a group: the key path below `groups.NAME`, and why.
GroupProblem = tuple[tuple[str, ...], str]


class ChecksGroups(Protocol):
    """Optional class-level hook: which of a group's settings fit a backend table.

    `check_group(backend, config, select, patch)` gets the backend's name and validated
    config, the group's validated select and its patch table, and returns the problems
    (empty when it fits). A plugin without it accepts only `patch.method = "command"`.
    """

    @classmethod
    def check_group(
        cls, backend: str, config: Any, select: Any, patch: Any
    ) -> list[GroupProblem]: ...


@dataclass(frozen=True)
class BackendSpec:
    """One validated `[backends.NAME]` table: its type and its config model instance."""

    name: str
    type: str
    config: BaseModel


def implicit_health(plugin: type[Any]) -> str | None:
    """Optional: what a backend checks by itself on a patched target for
    `health.stable_for` (a class attribute `implicit_health`); None when it says nothing."""
    note = getattr(plugin, "implicit_health", None)
    return note if isinstance(note, str) else None


def installed_types() -> list[str]:
    """The backend type names that installed packages register."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


@cache
def load_plugin(type_name: str) -> type[BackendPlugin]:
    """Import the plugin class registered as `type_name`; KeyError when none is."""
    for ep in entry_points(group=GROUP, name=type_name):
        plugin: type[BackendPlugin] = ep.load()
        return plugin
    raise KeyError(type_name)


def check_group(spec: BackendSpec, select: Any, patch: Any) -> list[GroupProblem]:
    """The plugin's own check_group, or the default: method "command" only."""
    hook = getattr(load_plugin(spec.type), "check_group", None)
    if hook is not None:
        problems: list[GroupProblem] = hook(spec.name, spec.config, select, patch)
        return problems
    if patch.method != "command":
        return [
            (
                ("patch", "method"),
                f"backend {spec.name!r} (type {spec.type}) cannot patch with {patch.method!r}"
                ' (only "command", the default)',
            )
        ]
    return []
