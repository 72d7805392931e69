"""Backend plugins, found through the `patchd.backends` entry-point group and loaded lazily."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from patchd.backends.base import Backend, BackendPlugin

if TYPE_CHECKING:
    from patchd.config.settings import BackendSpec

GROUP = "patchd.backends"


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


def connect(spec: BackendSpec) -> Backend:
    """Build the backend instance for a `[backends.NAME]` table (connections open lazily)."""
    instance = load_plugin(spec.type)(spec.name, spec.config)
    if not isinstance(instance, Backend):
        raise TypeError(f"backend type {spec.type!r} does not implement the Backend protocol")
    return instance
