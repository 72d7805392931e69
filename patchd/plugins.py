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
