"""Backend plugins: connecting a validated `[backends.NAME]` table to its backend.

The registry itself (entry points, BackendSpec) is `patchd.plugins`, below config, so
that config can validate a backend's keys without importing the backends.
"""

from __future__ import annotations

from patchd.backends.base import Backend
from patchd.plugins import BackendPlugin, BackendSpec, installed_types, load_plugin

__all__ = ["BackendPlugin", "BackendSpec", "connect", "installed_types", "load_plugin"]


def connect(spec: BackendSpec) -> Backend:
    """Build the backend instance for a `[backends.NAME]` table (connections open lazily)."""
    instance = load_plugin(spec.type)(spec.name, spec.config)
    if not isinstance(instance, Backend):
        raise TypeError(f"backend type {spec.type!r} does not implement the Backend protocol")
    return instance
