"""`[baselines.NAME]`: which pending package updates a group may install, and when it
reboots. Validation only; the decision itself is patchd.guest.baseline's.

A group names one with `baseline = "NAME"`. Only backends that patch packages (type
"ssh") accept one: for an image or a site script there is no package list to filter.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from patchd.config.messages import unknown
from patchd.config.types import STRICT, Duration

# A glob of package names (fnmatch: * ? [..]); no spaces, no version.
Glob = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9.+*?\[\]!_:-]+$")]


class BaselineModel(BaseModel):
    """Rules applied to what the package manager reports pending, in this order: an
    excluded package is never installed (not even when an earlier stage verified it);
    with `include`, only matching packages are; with `security_only`, only updates from a
    security suite are; with `approve_after`, a candidate version only once that long has
    passed since patchd first saw it."""

    model_config = STRICT

    security_only: bool = False
    # Package-name globs never installed (e.g. "linux-image-*", "postgresql-*").
    exclude: list[Glob] = Field(default_factory=list)
    # When given, only packages matching one of these globs are installed.
    include: list[Glob] = Field(default_factory=list)
    # A candidate version becomes eligible this long after patchd first saw it pending
    # (first-seen instants are journaled in the state store). "0s": at once.
    approve_after: Duration = timedelta(0)
    # "if-required": when the machine asks (/var/run/reboot-required); "always": after
    # every install; "never": not even when it asks (compliance then shows it).
    reboot: Literal["if-required", "always", "never"] = "if-required"
    # A security update pending (eligible or held back) longer than this since patchd
    # first saw it fires the PatchdSecurityUpdatesOverdue alert
    # (patchd_group_security_max_age_seconds); "0s" turns the alert off for the group.
    security_max_age: Duration = timedelta(days=14)


# Backend types whose targets are patched package by package, so a baseline applies.
PACKAGE_BACKENDS = ("ssh",)


def baseline_problem(
    name: str, known: list[str], backend: str, backend_type: str | None
) -> str | None:
    """Why a group of `backend` (of `backend_type`, None when unknown) cannot name the
    baseline `name`, or None."""
    if name not in known:
        return unknown("baseline", name, known)
    if backend_type is not None and backend_type not in PACKAGE_BACKENDS:
        return (
            f"only used with a backend that installs packages (type"
            f" {' or '.join(PACKAGE_BACKENDS)}); backend {backend!r} is {backend_type!r}"
        )
    return None
