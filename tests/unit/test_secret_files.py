"""Who may read the vSphere `password_file`: refused for every user, warned for a shared group.

The files are real and get real modes and groups (the tests run as root, as on the test
machine); the groups are Debian's standard ones from base-passwd, checked first through
the user and group databases so a machine without them fails with the reason.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from patchd.cli import main
from patchd.config import ConfigError, load_settings
from tests.conftest import write_config


def readers(group: str) -> set[str]:
    entry = grp.getgrnam(group)
    return set(entry.gr_mem) | {u.pw_name for u in pwd.getpwall() if u.pw_gid == entry.gr_gid}


def config(tmp_path: Path, mode: int, gid: int = 0, **extra: str) -> tuple[Path, Path]:
    secret = tmp_path / "vcenter.password"
    secret.write_text("Hunter2-not-echoed\n")
    os.chown(secret, 0, gid)
    secret.chmod(mode)
    backend = {
        "type": "vsphere",
        "host": "vcenter.example.com",
        "username": "patchd@vsphere.local",
        "password_file": secret,
        **extra,
    }
    path = write_config(tmp_path / "patchd.toml", {"backends": {"vc": backend}})
    return path, secret


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def as_root() -> None:
    assert os.geteuid() == 0, "these tests chown files: run them as root (the test machine is)"


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o444, 0o666])
def test_a_password_file_every_user_can_read_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    path, secret = config(tmp_path, mode)
    code, out, err = check(path, capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"{path}: backends.vc.password_file: {secret} holds a secret and every user can read"
        f" it (mode {mode:04o}): give it mode 0600, or 0640 with a group only patchd is in",
        "config invalid: 1 problem",
    ]
    assert "Hunter2" not in out + err


@pytest.mark.parametrize(
    ("mode", "group"),
    [(0o600, "root"), (0o400, "root"), (0o640, "root"), (0o640, "daemon"), (0o660, "daemon")],
)
def test_owner_only_or_a_group_of_one_user_is_quiet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, group: str
) -> None:
    # root:daemon 0640 stands for the documented root:patchd 0640: one user in the group.
    assert readers(group) - {"root"} in (set(), {group}), readers(group)
    path, _ = config(tmp_path, mode, grp.getgrnam(group).gr_gid)
    summary = "config OK: 1 file, 0 windows, 0 freezes, 1 backend, 0 groups\n"
    assert check(path, capsys) == (0, summary, "")
    assert load_settings(path).warnings == ()


def test_a_group_of_several_users_is_a_warning_with_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = readers("nogroup")  # Debian: nobody, _apt and sync have it as primary group
    assert len(shared) > 1, shared
    path, secret = config(tmp_path, 0o640, grp.getgrnam("nogroup").gr_gid)
    code, out, err = check(path, capsys)
    assert code == 0 and out.startswith("config OK:")
    names = ", ".join(sorted(shared)[:5])
    assert err == (
        f"patchd: warning: {path}: backends.vc.password_file: {secret} holds a secret and"
        f" the {len(shared)} users of its group nogroup ({names}) can read it (mode 0640):"
        " give it mode 0600, or 0640 with a group only patchd is in\n"
    )
    [warning] = load_settings(path).warnings
    assert (warning.file, warning.path) == (path, ("backends", "vc", "password_file"))


def test_a_group_id_without_an_entry_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gid = next(g for g in range(4242, 5000) if g not in {e.gr_gid for e in grp.getgrall()})
    path, _ = config(tmp_path, 0o640, gid)
    code, _, err = check(path, capsys)
    assert code == 0
    assert f"its group (id {gid}, not in the group database) can read it (mode 0640)" in err


def test_the_mode_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    path, _ = config(tmp_path, 0o644, insecur="true")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert sorted(".".join(i.path) for i in info.value.issues) == [
        "backends.vc.insecur",
        "backends.vc.password_file",
    ]


def test_a_password_written_as_the_credential_name_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "patchd.toml"
    path.write_text(
        '[backends.vc]\ntype = "vsphere"\nhost = "vc"\nusername = "u"\n'
        'credential = "Tr0ub4dor&3 horse"\n'
    )
    code, _, err = check(path, capsys)
    assert code == 2
    assert f"{path}: backends.vc.credential: expected the name of a systemd credential" in err
    assert "Tr0ub4dor" not in err
