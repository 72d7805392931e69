"""The dnf driver (RHEL, Fedora, Rocky, Alma; dnf 4): pending updates from the transaction
`dnf --assumeno upgrade` would run (upgrades and the new packages they need, as apt's
simulated dist-upgrade) and `updateinfo`'s security advisories, exact installs checked
first with `--assumeno`, downgrades, `dnf needs-restarting -r`.

Versions are rpm's EVR as dnf prints them (`1.1-1`, `2:1.1-1` with an epoch); a package
is named to dnf as NAME-EVR. Every dnf runs non-interactively (-y or --assumeno) in the C
locale with `exit_on_lock=True`: dnf's own default is to wait forever for another dnf,
so patchd waits itself, up to `lock_timeout`, and then refuses. What dnf does not say
through its exit status is read from its output: a failing %pre/%post scriptlet leaves
dnf exiting 0 with the new version installed (`Error in POSTIN scriptlet`), which is an
install failure here (the rollback downgrades it); `needs-restarting -r` exits 1 for
"reboot required" and for any error alike. Versionlocked packages (dnf's hold) are never
installed; a package dnf's excludes filter out is refused with dnf's reason.
Checked against Debian's dnf 4.14 / rpm 4.18 (docs/dnf-on-debian.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from patchd import poll
from patchd.guest.errors import CommandFailed, PackageManagerError
from patchd.guest.packages import Pending, Versions, describe, run_locked
from patchd.guest.ssh import Result, Session

_ENV = {"LC_ALL": "C"}
_EXIT_ON_LOCK = "--setopt=exit_on_lock=True"
_LOCKED = re.compile(r"^(\S+ already locked by \d+)", re.M)  # "RPMDB already locked by 812"
_LOCKED_STATUS = 200
# Transaction table sections (dnf's --assumeno output): rows a transaction installs, and
# rows it removes (an obsoleted or conflicting package).
_INSTALLING = re.compile(r"^(Installing|Upgrading|Downgrading|Reinstalling)\b.*:$")
_REMOVING = re.compile(r"^(Removing|Obsoleting)\b.*:$")
_SCRIPTLET = re.compile(r"^(Error in \S+ scriptlet in rpm package \S+)$", re.M)
_SCRIPT_WARN = re.compile(r"^warning: (%\w+\(\S+\) scriptlet failed, exit status \d+)$", re.M)
_NO_MATCH = re.compile(r"^Error: Unable to find a match: (.+)$", re.M)
_FILTERED = re.compile(
    r"^All matches were filtered out by exclude filtering for argument: (.+)$", re.M
)
# `dnf versionlock list`: NAME-EPOCH:VERSION-RELEASE.* (a "!" in front: a version excluded)
_EPOCH = re.compile(r"^!?(.+)-\d+:[^-]+-[^-]+$")


def _held_by(result: Result) -> str | None:
    """Who holds the rpmdb lock (dnf with exit_on_lock exits 200 and says), None if the
    lock was not the problem."""
    locked = _LOCKED.search(result.stderr + result.stdout)
    return locked.group(1) if result.status == _LOCKED_STATUS and locked else None


def nevr(name: str, version: str) -> str:
    """How dnf names one exact version of a package: NAME-[EPOCH:]VERSION-RELEASE."""
    return f"{name}-{version}"


def split_nevra(text: str) -> tuple[str, str]:
    """`hello-lab-1:1.1-1.noarch` -> (`hello-lab`, `1:1.1-1`); the arch is dropped."""
    name, version, release = text.rsplit(".", 1)[0].rsplit("-", 2)
    return name, f"{version}-{release}"


def parse_advisories(output: str) -> dict[str, list[str]]:
    """`updateinfo list --updates --security` (`ID  Severity/Sec.  NEVRA`) -> package:
    the advisory ids that name it."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and "-" in words[2]:
            name, _ = split_nevra(words[2])
            found.setdefault(name, []).append(words[0])
    return found


def parse_transaction(output: str) -> dict[str, tuple[str, str] | None]:
    """What a transaction table (`dnf --assumeno install|upgrade ...`) would do: package
    -> (EVR, repository) it would install, upgrade or downgrade to, or None when it would
    remove it. Long names make dnf wrap a row: the name alone, the rest on the next line.
    One row per name: a package of several arches is one update here."""
    found: dict[str, tuple[str, str] | None] = {}
    section: bool | None = None  # True: installing rows, False: removing rows
    carried: list[str] = []
    for line in output.splitlines():
        if _INSTALLING.match(line) or _REMOVING.match(line):
            section, carried = bool(_INSTALLING.match(line)), []
            continue
        if not line.startswith(" "):
            section = None  # "Transaction Summary", "===...", messages
            continue
        if section is None:
            continue
        words = carried + line.split()
        if len(words) < 4:
            carried = words  # a wrapped row: its first part
            continue
        carried = []
        # name, arch, EVR, repository, size
        found.setdefault(words[0], (words[2], words[3]) if section else None)
    return found


def parse_installed(output: str) -> dict[str, str]:
    """`rpm -q --qf '%{NAME}\\t<evr>\\n'` lines -> name: EVR (the last line of a name wins:
    an install-only package such as a kernel has several)."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        name, tab, version = line.partition("\t")
        if tab and version:
            found[name] = version
    return found


# rpm's EVR in the form dnf prints it: the epoch only when there is one.
_RPM_QF = "%{NAME}\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n"


class DnfDriver:
    """dnf on one machine, through `session` (privileged commands via sudo when set)."""

    name = "dnf"

    def __init__(
        self, session: Session, lock_timeout: float = 300.0, clock: poll.Clock = poll.SYSTEM
    ) -> None:
        self.session = session
        self.lock_timeout = lock_timeout
        self.clock = clock

    # --- running dnf ---------------------------------------------------------------------
    def _dnf(
        self, args: Sequence[str], what: str, *, expect: Iterable[int] = (0,), quiet: bool = True
    ) -> Result:
        """Run a dnf command that takes a lock; wait for the lock up to lock_timeout.
        `quiet=False` keeps the transaction table (-q drops it)."""
        words = ["dnf", *(["-q"] if quiet else []), _EXIT_ON_LOCK, *args]
        return run_locked(
            self.session, words, what, env=_ENV, lock_timeout=self.lock_timeout,
            clock=self.clock, held_by=_held_by, failure=self._failure,
            anyone="another dnf", ok=expect,
        )  # fmt: skip

    def _failure(self, what: str, result: Result) -> Exception:
        text = result.stderr + "\n" + result.stdout
        name = self.session.name
        filtered = _FILTERED.findall(text)
        if filtered:
            return PackageManagerError(
                f"{name}: {what}: dnf's excludes or a versionlock filter out"
                f" {', '.join(sorted(set(filtered)))} (excludepkgs in dnf.conf or the .repo"
                " file, or `dnf versionlock list`); patchd never installs around them"
            )
        missing = _NO_MATCH.findall(text)
        if missing:
            return PackageManagerError(
                f"{name}: {what}: no repository offers {', '.join(missing)} (any more)"
            )
        lines = [
            ln.strip()
            for ln in text.splitlines()
            if ln.strip().startswith(("Error", "error:", "Problem", "- ", "package "))
        ]
        detail = "; ".join(lines[:8]) or f"dnf exited {result.status}"
        return CommandFailed(f"{name}: {what}: {detail}")

    # --- the driver ----------------------------------------------------------------------
    def refresh(self) -> None:
        self._dnf(["makecache", "--refresh"], "refreshing the repository metadata (dnf makecache)")

    def _transaction(self, args: Sequence[str], what: str) -> dict[str, tuple[str, str] | None]:
        """The transaction a dnf command would run, shown and aborted (--assumeno exits 1
        after the table; 0 with "Nothing to do")."""
        shown = self._dnf(["--assumeno", *args], what, expect=(0, 1), quiet=False)
        if shown.status == 1 and "Operation aborted" not in shown.stdout + shown.stderr:
            raise self._failure(what, shown)
        return parse_transaction(shown.stdout)

    def pending(self) -> list[Pending]:
        # --cacheonly: the metadata refresh() fetched, so listing never downloads again.
        # A removal the upgrade would make (an obsoleted package) is not an update: the
        # install of the set then refuses it (see _refuse_extras).
        upgrades = {
            name: row
            for name, row in self._transaction(
                ["--cacheonly", "upgrade"], "listing pending updates (dnf --assumeno upgrade)"
            ).items()
            if row is not None
        }
        if not upgrades:
            return []
        advisories = parse_advisories(
            self._dnf(
                ["--cacheonly", "updateinfo", "list", "--updates", "--security"],
                "listing security advisories (dnf updateinfo)",
            ).stdout
        )
        installed = self.installed(upgrades)
        found = []
        for package, (candidate, repo) in sorted(upgrades.items()):
            ids = advisories.get(package, [])
            source = f"{repo} ({', '.join(ids)})" if ids else repo
            found.append(Pending(package, installed[package], candidate, bool(ids), source))
        return found

    def installed(self, packages: Iterable[str]) -> dict[str, str | None]:
        names = sorted(set(packages))
        found: dict[str, str | None] = dict.fromkeys(names)
        if not names:
            return found
        # rpm exits with the number of packages it did not find: those are not installed.
        result = self.session.run(["rpm", "-q", "--qf", _RPM_QF, *names], env=_ENV, check=False)
        if result.status > len(names):
            raise self._failure("reading installed versions (rpm -q)", result)
        found.update((k, v) for k, v in parse_installed(result.stdout).items() if k in found)
        return found

    def locked(self) -> set[str]:
        """Packages under `dnf versionlock` (none when the plugin is not installed)."""
        result = self.session.run(
            ["dnf", "-q", "--disablerepo=*", "versionlock", "list"],
            sudo=True,
            env=_ENV,
            check=False,
        )
        if result.status != 0:
            return set()
        return {m.group(1) for ln in result.stdout.split() if (m := _EPOCH.match(ln))}

    def install(self, versions: Mapping[str, str]) -> None:
        locked = sorted(self.locked() & set(versions))
        if locked:
            raise PackageManagerError(
                f"{self.session.name}: versionlocked packages (dnf versionlock) are part of the"
                f" update: {', '.join(locked)}; patchd never installs a locked package"
                " (`dnf versionlock delete` it, or leave it out of the baseline)"
            )
        args = [nevr(name, version) for name, version in sorted(versions.items())]
        what = f"installing {describe(versions)}"
        self._refuse_extras(versions, args)
        self._check_scriptlets(what, self._dnf(["-y", "install", *args], what))

    def _refuse_extras(self, versions: Mapping[str, str], args: Sequence[str]) -> None:
        """Show the transaction first (--assumeno: dnf resolves, prints, aborts with exit
        1). A dependency outside the set (held back by the baseline, or not verified by
        staging) is refused, so an exclude is never installed."""
        transaction = self._transaction(
            ["install", *args], f"resolving the install of {describe(versions)}"
        )
        extra = {
            name: row[0] if row else None
            for name, row in transaction.items()
            if row is None or versions.get(name) != row[0]
        }
        if extra:
            raise PackageManagerError(
                f"{self.session.name}: installing {describe(versions)} would also install"
                f" or remove {describe(extra)}, which the set leaves out (held back by the"
                " baseline, or not verified by the earlier stage); nothing was changed"
            )

    def _check_scriptlets(self, what: str, result: Result) -> None:
        text = result.stderr + "\n" + result.stdout
        failed = _SCRIPT_WARN.findall(text) or _SCRIPTLET.findall(text)
        if failed:
            raise CommandFailed(f"{self.session.name}: {what}: " + "; ".join(failed[:6]))

    def downgrade(self, versions: Versions) -> None:
        """Back to the recorded versions: `dnf install NAME-EVR` goes down as well as up;
        then the packages that were not installed before are removed (after the
        downgrade, so what needed them no longer does). dnf removes the packages that
        depend on what it removes: a removal that would take one outside the set is
        refused instead."""
        gone = sorted(name for name, version in versions.items() if version is None)
        back = {name: v for name, v in sorted(versions.items()) if v is not None}
        what = f"downgrading to {describe(versions)}"
        if back:
            # A scriptlet of the old version failing is reported, not retried.
            result = self._dnf(["-y", "install", *(nevr(n, v) for n, v in back.items())], what)
            self._check_scriptlets(what, result)
        if gone:
            also = sorted(set(self._transaction(["remove", *gone], what)) - set(gone))
            if also:
                raise PackageManagerError(
                    f"{self.session.name}: {what}: removing {', '.join(gone)} would also"
                    f" remove {', '.join(also)}, which depend on them; not removed"
                )
            self._dnf(["-y", "remove", *gone], what)

    def reboot_required(self) -> str | None:
        result = self.session.run(
            # No repository is needed: the installed packages' times against the boot time.
            ["dnf", "-q", "--disablerepo=*", "needs-restarting", "-r"],
            sudo=True,
            env=_ENV,
            check=False,
        )
        if result.status == 0:
            return None
        if "Reboot is required" in result.stdout:
            names = [
                ln.strip()[2:] for ln in result.stdout.splitlines() if ln.strip().startswith("* ")
            ]
            return "dnf needs-restarting -r" + (f" (by {', '.join(names)})" if names else "")
        if "No such command" in result.stdout + result.stderr:
            raise PackageManagerError(
                f"{self.session.name}: `dnf needs-restarting` is missing: install"
                " dnf-plugins-core (dnf-utils) on the machine"
            )
        raise self._failure("asking whether a reboot is required (dnf needs-restarting -r)", result)
