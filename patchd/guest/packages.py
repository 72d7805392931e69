"""The package-manager driver interface, and the identity of a set of package versions.

A driver works on one machine through an open `Session`. Versions are the package
manager's own strings; `None` means "not installed". The identity of a set of versions
(`identity`) is what patchd journals and pins as a target's version: staging's verified
identity names exactly the set production may install.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn, Protocol

from patchd import poll
from patchd.guest.errors import PackageManagerError

if TYPE_CHECKING:
    from patchd.guest.ssh import Result, Session

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


LOCK_RETRY = 2.0  # seconds between attempts while another process holds the lock


def run_locked(
    session: Session,
    words: Sequence[str],
    what: str,
    *,
    env: Mapping[str, str],
    lock_timeout: float,
    clock: poll.Clock,
    held_by: Callable[[Result], str | None],
    failure: Callable[[str, Result], Exception],
    anyone: str,
    ok: Iterable[int] = (0,),
) -> Result:
    """Run a package manager's command that takes the machine's package lock (with sudo
    when the session has it). While another process holds the lock (`held_by` names it,
    "" when the answer does not say who, None when the lock was not the problem), try
    again every LOCK_RETRY seconds up to `lock_timeout`, then refuse: nothing changed.
    Any other failure is `failure(what, result)` at once."""
    accepted = set(ok)
    holder = ""

    def attempt() -> Result | None:
        nonlocal holder
        result = session.run(words, sudo=True, env=env, check=False)
        if result.status in accepted:
            return result
        found = held_by(result)
        if found is None:
            raise failure(what, result)
        holder = found
        return None

    def expired() -> NoReturn:
        raise PackageManagerError(
            f"{session.name}: {what}: the package manager's lock is still held"
            f" after {lock_timeout:g}s ({holder or anyone}); nothing was changed"
        )

    return poll.until(attempt, clock.deadline(lock_timeout), expired, LOCK_RETRY, clock)


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
