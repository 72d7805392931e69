"""The shipped systemd files, checked offline: systemd/patchd.service, patchd.sysusers and
patchd.tmpfiles.

- `systemd-analyze verify` on the unit. It checks that ExecStart's binary exists and is
  executable, and the shipped unit names /usr/local/bin/patchd (the documented install
  path), which a development machine need not have. So verify runs on a copy in a temporary
  directory, named patchd.service, in which only the ExecStart line points at this venv's
  `patchd` script; a test asserts that this is the only line that differs. The shipped file
  itself is never changed to suit the test.
  verify exits 0 on an unknown key or an unparsable value (it logs "Unknown key ...,
  ignoring" and carries on), so the test fails on any output at all, not only on the exit
  code.
- `systemd-analyze security --offline=true systemd/patchd.service` (the shipped file): the
  "Overall exposure level" figure is parsed, printed (visible with `pytest -s`) and must be
  at most 3.0.
- The directives the daemon relies on, read from the unit file: Type=notify,
  NotifyAccess=main, WatchdogSec, ExecReload, Restart=on-failure, StateDirectory,
  ConfigurationDirectory, LoadCredential (a name the vSphere config accepts), and
  TimeoutStopSec at least the daemon's drain grace plus a margin.
- `systemd-sysusers --dry-run --root=TMP` on the sysusers file (any output but the
  "Creating ..." lines fails), and, as root, `systemd-sysusers` then
  `systemd-tmpfiles --create` into a temporary root, checking the modes and owners made.
  systemd 252's systemd-tmpfiles has no --dry-run, and creating owned directories needs
  root.

Not tested here: starting `patchd daemon` under systemd (systemd-run, systemctl) needs
systemd as PID 1, which the CI machine and containers do not have; it is not tried. What
the sandbox does to a running daemon is not checked by this file.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from patchd.backends.vsphere.config import VSphereConfig
from patchd.cli import EXIT_CONFIG
from patchd.daemon import DEFAULT_GRACE

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNIT = SYSTEMD_DIR / "patchd.service"
SYSUSERS = SYSTEMD_DIR / "patchd.sysusers"
TMPFILES = SYSTEMD_DIR / "patchd.tmpfiles"

SHIPPED_EXEC_START = "/usr/local/bin/patchd daemon"
MAX_EXPOSURE = 3.0
# What TimeoutStopSec must leave after the drain grace: closing backends and the journal.
STOP_MARGIN = timedelta(seconds=30)

_SPAN_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "hr": 3600,
    "d": 86400,
}
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package systemd (252 or later)")
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value assigned, in order (no line continuations used)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def timespan(text: str) -> timedelta:
    """A systemd time span ("150s", "10min", "1min 30s", a bare number is seconds)."""
    seconds = 0.0
    rest = text.replace(" ", "")
    while rest:
        match = _SPAN_PART.match(rest)
        assert match and match.group(2) in ("", *_SPAN_UNITS), f"not a time span: {text!r}"
        seconds += float(match.group(1)) * _SPAN_UNITS.get(match.group(2) or "s", 1)
        rest = rest[match.end() :]
    return timedelta(seconds=seconds)


def service() -> dict[str, list[str]]:
    return parse_unit(UNIT)["Service"]


def one(key: str) -> str:
    values = service().get(key, [])
    assert len(values) == 1, f"{UNIT.name}: expected one {key}=, found {values}"
    return values[0]


def venv_patchd() -> Path:
    script = Path(sys.executable).parent / "patchd"
    if not script.exists():
        found = shutil.which("patchd")
        assert found, "the patchd console script is not installed (pip install -e .)"
        script = Path(found)
    return script


def verifiable_copy(directory: Path) -> Path:
    """The shipped unit with only ExecStart pointing at this venv's patchd."""
    text = UNIT.read_text()
    shipped = f"ExecStart={SHIPPED_EXEC_START}\n"
    assert text.count(shipped) == 1, f"{UNIT.name} must have the line {shipped!r}"
    copy = directory / "patchd.service"
    copy.write_text(text.replace(shipped, f"ExecStart={venv_patchd()} daemon\n"))
    return copy


# --- systemd-analyze -------------------------------------------------------------------


def test_verify_is_clean(tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    proc = run(tool("systemd-analyze"), "verify", str(copy))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, (
        f"systemd-analyze verify {UNIT} (exit {proc.returncode}):\n{output}"
    )


def test_the_verified_copy_differs_only_in_exec_start(tmp_path: Path) -> None:
    shipped = UNIT.read_text().splitlines()
    copied = verifiable_copy(tmp_path).read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, copied, strict=True) if a != b]
    assert changed == [(f"ExecStart={SHIPPED_EXEC_START}", f"ExecStart={venv_patchd()} daemon")]


def test_verify_reports_what_it_ignores(tmp_path: Path) -> None:
    """The check above means something: verify prints, with exit 0, about a bad key."""
    copy = verifiable_copy(tmp_path)
    copy.write_text(copy.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n", 1))
    proc = run(tool("systemd-analyze"), "verify", str(copy))
    assert "Unknown key" in proc.stdout + proc.stderr


def test_security_exposure_is_at_most_3() -> None:
    proc = run(tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(UNIT))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not proc.stderr.strip(), proc.stderr
    match = re.search(r"Overall exposure level for patchd\.service: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no overall exposure level in:\n{proc.stdout}"
    exposure = float(match.group(1))
    line = match.group(0)
    print(f"\nsystemd-analyze security --offline=true {UNIT.name}: {line}")
    assert exposure <= MAX_EXPOSURE, f"{line} (at most {MAX_EXPOSURE}):\n{proc.stdout}"


# --- the directives the daemon relies on -------------------------------------------------


def test_notify_watchdog_reload_restart() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert timespan(one("WatchdogSec")) > timedelta(0)
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert str(EXIT_CONFIG) in one("RestartPreventExitStatus").split()
    assert one("ExecStart") == SHIPPED_EXEC_START


def test_stop_timeout_covers_the_drain_grace() -> None:
    stop = timespan(one("TimeoutStopSec"))
    assert stop >= DEFAULT_GRACE + STOP_MARGIN, (
        f"TimeoutStopSec={stop.total_seconds():g}s: the daemon drains for"
        f" {DEFAULT_GRACE.total_seconds():g}s, then needs time to close backends and journal"
    )
    # systemd must send SIGTERM to the daemon only, not to the commands of in-flight targets.
    assert one("KillMode") == "mixed"


def test_directories_and_user() -> None:
    assert one("StateDirectory") == "patchd"
    assert one("ConfigurationDirectory") == "patchd"
    assert one("User") == "patchd"
    assert one("Group") == "patchd"


def test_the_credential_is_one_the_vsphere_config_accepts() -> None:
    loads = service().get("LoadCredential", [])
    assert loads == ["vsphere-password:/etc/patchd/vsphere.password"]
    name = loads[0].partition(":")[0]
    config = VSphereConfig.model_validate({"host": "vc", "username": "u", "credential": name})
    assert config.credential == name
    # A host without the password file (Docker only) still starts: the fallback.
    assert [v.partition(":")[0] for v in service().get("SetCredential", [])] == [name]


# --- sysusers.d and tmpfiles.d ----------------------------------------------------------


def test_sysusers_dry_run(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = run(tool("systemd-sysusers"), "--dry-run", f"--root={tmp_path}", str(SYSUSERS))
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    unexpected = [
        line
        for line in lines
        if not re.match(r"Creating (group|user) 'patchd'|Would write /etc/", line)
    ]
    assert proc.returncode == 0 and not unexpected, "\n".join(lines)
    assert any(line.startswith("Creating user 'patchd'") for line in lines), lines


def test_sysusers_home_is_the_state_directory() -> None:
    users = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(users) == 1 and users[0][:3] == ["u", "patchd", "-"], users
    assert users[0][-1] == f"/var/lib/{one('StateDirectory')}"


@pytest.mark.skipif(os.geteuid() != 0, reason="creating root:patchd directories needs root")
def test_sysusers_and_tmpfiles_create_the_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    proc = run(tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    entry = next(
        line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("patchd:")
    )
    uid, gid = int(entry[2]), int(entry[3])

    proc = run(tool("systemd-tmpfiles"), "--create", f"--root={root}", str(TMPFILES))
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output

    made = {}
    for path in ("etc/patchd", "etc/patchd/patchd.d", "var/lib/patchd"):
        st = (root / path).stat()
        made[path] = (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid)
    assert made == {
        "etc/patchd": ("0o750", 0, gid),
        "etc/patchd/patchd.d": ("0o750", 0, gid),
        "var/lib/patchd": ("0o700", uid, gid),
    }
    # The unit asks for the same modes, so systemd neither changes nor warns about them.
    assert one("ConfigurationDirectoryMode") == "0750"
    assert one("StateDirectoryMode") == "0700"
