"""The apt driver (Debian, Ubuntu): pending updates from a simulated full upgrade, exact
installs, downgrades, /var/run/reboot-required.

Every apt-get runs non-interactively (DEBIAN_FRONTEND=noninteractive, -y, dpkg keeping
changed config files: --force-confdef --force-confold) in the C locale, so its messages
can be read. Conditions apt itself stops on become `PackageManagerError`s that say what to
do: the dpkg lock held longer than `lock_timeout` (waited for, then refused), held
packages (never installed), an interrupted dpkg (`dpkg --configure -a` needed; patchd does
not install over it, only a rollback repairs its own interrupted install), a version no
repository has any more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from patchd import poll
from patchd.guest.errors import CommandFailed, PackageManagerError
from patchd.guest.packages import Pending, Versions, describe, run_locked
from patchd.guest.ssh import Result, Session

_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C", "APT_LISTCHANGES_FRONTEND": "none"}
_INST = re.compile(r"^Inst (\S+)(?: \[([^\]]*)\])? \((\S+) (.*?) \[[^\]]*\]\)")
_LOCKED = ("Could not get lock", "Unable to acquire the dpkg frontend lock", "Unable to lock")
_INTERRUPTED = "dpkg was interrupted"
_HELD = "Held packages were changed"
_MISSING = re.compile(r"Version '([^']*)' for '([^']*)' was not found")
_DPKG_ERRORS = re.compile(r"^(dpkg: error processing .*|.*returned error exit status \d+)$", re.M)


def _held_by(result: Result) -> str | None:
    """Who holds apt's or dpkg's lock ("" when apt does not say), None if not locked."""
    text = result.stderr + result.stdout
    if not any(sign in text for sign in _LOCKED):
        return None
    return next((ln.strip() for ln in text.splitlines() if "held by" in ln), "")


def is_security(source: str) -> bool:
    """Whether a candidate's origin is a security suite: Debian's label
    "Debian-Security" or a suite such as "bookworm-security" / "jammy-security"."""
    for entry in source.split(", "):
        label, _, rest = entry.partition(":")
        suite = rest.rpartition("/")[2]
        if "security" in label.lower() or suite.lower().endswith("-security"):
            return True
    return False


def parse_simulation(output: str) -> list[Pending]:
    """The `Inst` lines of `apt-get -s dist-upgrade`, sorted by package."""
    found = []
    for line in output.splitlines():
        match = _INST.match(line)
        if match:
            package, installed, candidate, source = match.groups()
            found.append(
                Pending(package, installed or None, candidate, is_security(source), source)
            )
    return sorted(found, key=lambda p: p.package)


class AptDriver:
    """apt on one machine, through `session` (privileged commands via sudo when set)."""

    name = "apt"

    def __init__(
        self, session: Session, lock_timeout: float = 300.0, clock: poll.Clock = poll.SYSTEM
    ) -> None:
        self.session = session
        self.lock_timeout = lock_timeout
        self.clock = clock

    # --- running apt -------------------------------------------------------------------
    def _apt(self, argv: Sequence[str], what: str) -> Result:
        """Run an apt-get that takes a lock; wait for the lock up to lock_timeout."""
        words = [argv[0], "-q", "-o", f"DPkg::Lock::Timeout={int(self.lock_timeout)}", *argv[1:]]
        return run_locked(
            self.session, words, what, env=_ENV, lock_timeout=self.lock_timeout,
            clock=self.clock, held_by=_held_by, failure=self._failure,
            anyone="another apt or dpkg",
        )  # fmt: skip

    def _failure(self, what: str, result: Result) -> Exception:
        # dpkg runs under apt's pseudo-terminal: its lines end in \r\n.
        text = (result.stderr + "\n" + result.stdout).replace("\r\n", "\n")
        name = self.session.name
        if _INTERRUPTED in text:
            return PackageManagerError(
                f"{name}: {what}: dpkg was interrupted earlier (a package is half-installed"
                " or half-configured); run `dpkg --configure -a` on the machine and check"
                " what it says; patchd does not install over it"
            )
        if _HELD in text:
            return PackageManagerError(f"{name}: {what}: it would change held packages")
        missing = _MISSING.findall(text)
        if missing:
            versions = ", ".join(f"{pkg}={ver}" for ver, pkg in missing)
            return PackageManagerError(
                f"{name}: {what}: no repository offers {versions} (any more)"
            )
        errors = _DPKG_ERRORS.findall(text)
        if errors:
            return CommandFailed(f"{name}: {what}: " + "; ".join(e.strip() for e in errors[:6]))
        lines = [ln for ln in text.splitlines() if ln.startswith(("E:", "dpkg:"))]
        detail = "; ".join(lines[-4:]) or f"apt-get exited {result.status}"
        return CommandFailed(f"{name}: {what}: {detail}")

    # --- the driver ----------------------------------------------------------------------
    def refresh(self) -> None:
        self._apt(["apt-get", "update"], "refreshing the package lists (apt-get update)")

    def pending(self) -> list[Pending]:
        # Debug::NoLocking: a simulation reads only, so it may run beside another apt.
        result = self.session.run(
            ["apt-get", "-s", "-q", "-o", "Debug::NoLocking=1", "dist-upgrade"],
            env=_ENV,
            check=False,
        )
        if result.status != 0:
            raise self._failure("listing pending updates (apt-get -s dist-upgrade)", result)
        return parse_simulation(result.stdout)

    def held(self) -> set[str]:
        return set(self.session.run(["apt-mark", "showhold"], env=_ENV).stdout.split())

    def installed(self, packages: Iterable[str]) -> dict[str, str | None]:
        names = sorted(set(packages))
        found: dict[str, str | None] = dict.fromkeys(names)
        if not names:
            return found
        # Exit 1 names packages dpkg never heard of: those are not installed.
        result = self.session.run(
            ["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *names],
            env=_ENV,
            check=False,
        )
        if result.status not in (0, 1):
            raise self._failure("reading installed versions (dpkg-query)", result)
        for line in result.stdout.splitlines():
            package, _, rest = line.partition("\t")
            version, _, status = rest.partition("\t")
            # Second letter: i installed, F/H/U/W/t half-way; n not installed, c config only.
            if package in found and len(status) > 1 and status[1] not in "nc":
                found[package] = version
        return found

    def install(self, versions: Mapping[str, str]) -> None:
        held = sorted(self.held() & set(versions))
        if held:
            raise PackageManagerError(
                f"{self.session.name}: held packages (apt-mark hold) are part of the update:"
                f" {', '.join(held)}; patchd never installs a held package (unhold it, or"
                " leave it out of the baseline)"
            )
        args = [f"{name}={version}" for name, version in sorted(versions.items())]
        self._refuse_extras(versions, args)
        self._apt(
            ["apt-get", "install", "-y", "--no-remove", *_DPKG_OPTIONS, *args],
            f"installing {describe(versions)}",
        )

    def _refuse_extras(self, versions: Mapping[str, str], args: Sequence[str]) -> None:
        """Simulate the install first: apt would pull in, at their candidate versions,
        the dependencies the set needs. One outside the set (held back by the baseline,
        or not verified by staging) is refused, so an exclude is never installed."""
        result = self.session.run(
            ["apt-get", "-s", "-q", "-o", "Debug::NoLocking=1", "install", "--no-remove", *args],
            env=_ENV,
            check=False,
        )
        if result.status != 0:
            raise self._failure(f"simulating the install of {describe(versions)}", result)
        extra = {
            p.package: p.candidate
            for p in parse_simulation(result.stdout)
            if versions.get(p.package) != p.candidate
        }
        if extra:
            raise PackageManagerError(
                f"{self.session.name}: installing {describe(versions)} would also install"
                f" {describe(extra)}, which the set leaves out (held back by the baseline,"
                " or not verified by the earlier stage); nothing was changed"
            )

    def downgrade(self, versions: Versions) -> None:
        args = [
            f"{name}={version}" if version is not None else f"{name}-"
            for name, version in sorted(versions.items())
        ]
        what = f"downgrading to {describe(versions)}"
        argv = ["apt-get", "install", "-y", "--allow-downgrades", *_DPKG_OPTIONS, *args]
        try:
            self._apt(argv, what)
        except PackageManagerError as err:
            if "dpkg was interrupted" not in str(err):
                raise
            # Our own install stopped half-way: finish what dpkg can, then go back.
            self.session.run(["dpkg", "--configure", "-a"], sudo=True, env=_ENV, check=False)
            self._apt(argv, what)

    def reboot_required(self) -> str | None:
        flag = self.session.run(["test", "-e", "/var/run/reboot-required"], check=False)
        if flag.status != 0:
            return None
        pkgs = self.session.run(["cat", "/var/run/reboot-required.pkgs"], check=False)
        names = sorted(set(pkgs.stdout.split())) if pkgs.status == 0 else []
        return "/var/run/reboot-required" + (f" (by {', '.join(names)})" if names else "")


_DPKG_OPTIONS = ("-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")
