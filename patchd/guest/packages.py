"""The package-manager driver interface, and the identity of a set of package versions.

A driver works on one machine through an open `Session`. Versions are the package
manager's own strings; `None` means "not installed". The identity of a set of versions
(`identity`) is what patchd journals and pins as a target's version: staging's verified
identity names exactly the set production may install.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

# A version map: package -> version, None for "not installed".
Versions = Mapping[str, str | None]


@dataclass(frozen=True)
class Pending:
    """One pending update as the package manager reports it."""

    package: str
    installed: str | None  # None: a new package the upgrade would install
    candidate: str
    security: bool
    source: str  # where the candidate comes from, e.g. "Debian-Security:12/bookworm-security"

    def __str__(self) -> str:
        kind = " (security)" if self.security else ""
        return f"{self.package} {self.installed or '(new)'} -> {self.candidate}{kind}"


def identity(versions: Versions) -> str:
    """A short, canonical name for an exact set of package versions: the same set gives
    the same name on every machine, in any order."""
    text = "\n".join(f"{name}={version or '-'}" for name, version in sorted(versions.items()))
    return "pkgs-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(versions: Versions) -> str:
    """`a=1.1, b=2.0` (sorted), for messages and logs."""
    return ", ".join(
        f"{name}={version or '(absent)'}" for name, version in sorted(versions.items())
    )


class PackageDriver(Protocol):
    """What patchd needs from a package manager on one machine."""

    name: str

    def refresh(self) -> None:
        """Fetch the repositories' metadata (apt-get update); installs nothing."""

    def pending(self) -> list[Pending]:
        """Every update the machine would install now, sorted by package. Simulated only."""

    def installed(self, packages: Iterable[str]) -> dict[str, str | None]:
        """The installed version of each named package (None when not installed)."""

    def install(self, versions: Mapping[str, str]) -> None:
        """Install exactly these versions (and nothing that is not among them)."""

    def downgrade(self, versions: Versions) -> None:
        """Put these packages back on these versions; None removes the package."""

    def reboot_required(self) -> str | None:
        """Why the machine needs a reboot (e.g. the packages that asked), or None."""
