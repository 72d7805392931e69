"""Running a site command on the patchd host: the one runner for health probes and patch
commands.

A leaf module (it imports only `patchd.log`) so that the backends (`patch.command`) and
the health probes (`health.command`) share it without a backend importing health.py.

The command runs without a shell (target names reach it intact), with patchd's
environment less what would hand it patchd's secrets, in its own process group: at the
timeout the WHOLE group is killed, so a script's children (an ssh it started, a sleep)
die with it instead of holding on to the target or the output pipe. stdout and stderr
are read interleaved, as a person would see them, and scrubbed of every registered
secret (a site tool may print the vCenter password it used) before anyone sees them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from patchd import log

# What an error message quotes of a command's output (its end: where the reason usually is).
TAIL = 2_000
# After the kill at the timeout: how long to read what the group wrote before it died. A
# descendant that left the group (setsid) may hold the pipe open; it is not waited for.
_DRAIN = 5.0


@dataclass(frozen=True)
class Finished:
    """How a command ended. `output` is scrubbed; `exit_code` is None when it did not run
    to its end (it could not start, or it was killed at the timeout)."""

    command: str
    exit_code: int | None
    output: str
    seconds: float
    timeout: float
    timed_out: bool = False
    not_started: str | None = None

    @property
    def tail(self) -> str:
        return self.output.strip()[-TAIL:]

    @property
    def problem(self) -> str | None:
        """Why the command failed, in words with the tail of its output; None on exit 0."""
        if self.not_started is not None:
            return f"could not run: {self.not_started}"
        if self.timed_out:
            reason = f"timed out after {self.timeout:g}s"
        elif self.exit_code != 0:
            reason = f"exited {self.exit_code}"
        else:
            return None
        return f"{reason}: {self.tail}" if self.tail else reason


def with_facts(env: Mapping[str, str], facts: Mapping[str, str]) -> dict[str, str]:
    """`env` plus PATCHD_TARGET_<FACT> for every fact a backend reports (`ip-address` ->
    PATCHD_TARGET_IP_ADDRESS); a variable `env` sets already is kept."""
    result = dict(env)
    for key, value in facts.items():
        result.setdefault("PATCHD_TARGET_" + re.sub(r"[^A-Z0-9]", "_", key.upper()), value)
    return result


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """patchd's environment for a site command, less what would hand it patchd's secrets
    (systemd credentials such as the vCenter password), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    env.update(extra)
    return env


def run(argv: Sequence[str], env: Mapping[str, str], timeout: float) -> Finished:
    """Run argv to its end or to `timeout` seconds; never raises for the command's sake."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            list(argv),
            env=child_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        return Finished(argv[0], None, "", 0.0, timeout, not_started=err.strerror or str(err))
    timed_out = False
    try:
        raw, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            raw, _ = proc.communicate(timeout=_DRAIN)
        except subprocess.TimeoutExpired:
            if proc.stdout is not None:
                proc.stdout.close()
            proc.wait()
            raw = b""
    output = log.scrub(raw.decode("utf-8", errors="replace"))
    return Finished(
        argv[0],
        None if timed_out else proc.returncode,
        output,
        round(time.monotonic() - started, 3),
        timeout,
        timed_out=timed_out,
    )
