"""What every backend plugin provides to patchd.

A backend registers a class in the `patchd.backends` entry-point group. The class carries
the pydantic models that validate its `[backends.NAME]` table and a group's `select`
table, so `patchd check-config` can check a backend's keys without connecting to anything.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from pydantic import BaseModel


class BackendPlugin(Protocol):
    """The class-level surface patchd reads from a registered backend."""

    config_model: ClassVar[type[BaseModel]]
    select_model: ClassVar[type[BaseModel]]
