"""`[baselines.NAME]`: which pending package updates a group may install, and when it
reboots. Validation only; the decision itself is patchd.guest.baseline's.

A group names one with `baseline = "NAME"`. Only groups whose targets patchd patches
package by package accept one (`installs_packages`): a backend of type "ssh", or
`patch.method = "apt"` or `"dnf"` (vSphere VMs). For an image, an ESXi host or a site script
(`patch.method = "command"`) there is no package list to filter.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from patchd.config.messages import unknown
from patchd.config.schema import GroupModel
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


# Backend types whose targets are always patched package by package.
PACKAGE_BACKENDS = ("ssh",)
# Patch methods with which patchd installs packages itself (a backend's check_group
# allows them only where it can: the vSphere VM flow, not its ESXi hosts).
PACKAGE_METHODS = ("apt", "dnf")


def installs_packages(backend_type: str, method: str) -> bool:
    """Whether a group of a backend of `backend_type`, patching with `method`, has its
    targets patched package by package (so a baseline, compliance and package plans
    apply). Told from the config alone, so that no backend is connected to find out."""
    return backend_type in PACKAGE_BACKENDS or method in PACKAGE_METHODS


def baseline_problem(
    name: str, known: list[str], group: GroupModel, backend_type: str | None
) -> str | None:
    """Why `group` (of a backend of `backend_type`, None when unknown) cannot name the
    baseline `name`, or None."""
    backend, method = group.backend, group.patch.method
    if name not in known:
        return unknown("baseline", name, known)
    if backend_type is not None and not installs_packages(backend_type, method):
        if backend_type != "vsphere":
            fix = "remove the baseline"
        elif group.select.get("kind") == "host":  # vSphere's ESXi hosts: no fix but removal
            fix = "ESXi hosts (select.kind = 'host') have no package list: remove the baseline"
        else:
            fix = 'set patch.method = "apt" or "dnf" (VMs with a guest table) or remove it'
        return (
            "only used where patchd installs packages itself: a backend of type"
            f" {' or '.join(PACKAGE_BACKENDS)}, or patch.method ="
            f" {' or '.join(repr(m) for m in PACKAGE_METHODS)} (vSphere VMs); backend"
            f" {backend!r} is {backend_type!r} and this group patches with method"
            f" {method!r}, which installs nothing patchd could filter; {fix}"
        )
    return None
