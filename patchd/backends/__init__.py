"""Backend plugins, found through the `patchd.backends` entry-point group and loaded lazily."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from patchd.backends.base import BackendPlugin

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
