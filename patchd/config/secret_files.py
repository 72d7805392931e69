"""Files that hold a secret (the vSphere `password_file`): who else may read them.

`SecretFile` is a path type for such keys. A file every user can read is refused (a
config error on that key). A file its group can read is fine when at most one user other
than its owner is in that group (the documented `root:patchd` mode 0640: only patchd);
a group of several users, or a group id with no entry, gets a warning, which the config
loader reports with the file and key (see `WARNINGS`). Only the file's mode and owner and
the user and group databases are read, never its content.
"""

from __future__ import annotations

import grp
import pwd
import stat
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, FilePath, ValidationInfo

# The validation-context key under which the loader passes a list that collects
# (field name, reason) warnings; without it (a model validated on its own) they are dropped.
WARNINGS = "patchd_warnings"
_ADVICE = "give it mode 0600, or 0640 with a group only patchd is in"


def group_readers(gid: int) -> tuple[str | None, set[str]]:
    """The group's name (None without an entry) and every user in it, by membership
    or as their primary group."""
    try:
        entry = grp.getgrgid(gid)
    except KeyError:
        return None, set()
    readers = set(entry.gr_mem)
    readers.update(user.pw_name for user in pwd.getpwall() if user.pw_gid == gid)
    return entry.gr_name, readers


def _owner(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def check_secret_file(path: Path, info: ValidationInfo) -> Path:
    try:
        status = path.stat()
    except OSError:
        return path  # FilePath has just seen it; a file that vanished fails at login
    mode = stat.S_IMODE(status.st_mode)
    if mode & stat.S_IROTH:
        raise ValueError(
            f"{path} holds a secret and every user can read it (mode {mode:04o}): {_ADVICE}"
        )
    if not mode & stat.S_IRGRP:
        return path
    name, readers = group_readers(status.st_gid)
    others = sorted(readers - {_owner(status.st_uid)})
    if name is None:
        who = f"its group (id {status.st_gid}, not in the group database)"
    elif len(others) > 1:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        who = f"the {len(others)} users of its group {name} ({shown})"
    else:
        return path
    warnings = info.context.get(WARNINGS) if isinstance(info.context, dict) else None
    if isinstance(warnings, list):
        reason = f"{path} holds a secret and {who} can read it (mode {mode:04o}): {_ADVICE}"
        warnings.append((info.field_name, reason))
    return path


SecretFile = Annotated[FilePath, AfterValidator(check_secret_file)]
