"""The `patch.command` executor: an argv template run on the patchd host, without a shell.

Owns placeholder filling and running. `{name}`, `{moid}`, `{uuid}`, `{ip}` and
`{hostname}` are replaced wherever they occur in an argument; any other braces are left
alone (so JSON such as Ansible's `--extra-vars '{"a": 1}'` passes through). A placeholder
the target has no value for (no guest IP yet) fails the step before anything runs.

The command also gets PATCHD_TARGET_ID/NAME/KIND, PATCHD_TARGET_<FACT> for every fact
`describe` reports, PATCHD_RUN_ID and PATCHD_PATCH_VERSION in its environment. It runs in
its own process group, which is killed as a whole at `patch.timeout`. Its exit code
decides; its output (stdout and stderr, interleaved) is logged as `patch_command_output`
and the tail of it goes into the error on failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from patchd import log
from patchd.backends.base import StepFailed
from patchd.health import child_environment

PLACEHOLDERS = ("name", "moid", "uuid", "ip", "hostname")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_OUTPUT_LOGGED = 64_000
_OUTPUT_IN_ERROR = 2_000


def fill(argv: Sequence[str], values: Mapping[str, str], target: str) -> list[str]:
    """`argv` with the placeholders replaced; StepFailed names a placeholder without value."""
    missing = sorted(
        {
            m.group(1)
            for arg in argv
            for m in _PLACEHOLDER.finditer(arg)
            if not values.get(m.group(1))
        }
    )
    if missing:
        raise StepFailed(
            f"{target}: patch.command uses {', '.join('{' + m + '}' for m in missing)} but the"
            " target reports no value for it (VMware Tools not running?)"
        )
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in argv]


def environment(facts: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(extra)
    for key, value in facts.items():
        env.setdefault("PATCHD_TARGET_" + re.sub(r"[^A-Z0-9]", "_", key.upper()), value)
    return env


def run(argv: list[str], env: Mapping[str, str], timeout: float, target: str) -> None:
    """Run the filled command; StepFailed when it cannot start, times out or exits non-zero."""
    logger = log.get("patchd.vsphere")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            env=child_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as err:
        raise StepFailed(
            f"{target}: patch.command {argv[0]} could not run: {err.strerror}"
        ) from None
    try:
        raw, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
    # A site tool may print the vCenter password it used: the output is logged, and its
    # tail goes into the error, which the journal keeps and `patchd run` prints.
    output = log.scrub(raw.decode("utf-8", errors="replace"))
    seconds = round(time.monotonic() - started, 3)
    logger.info(
        "patch_command_output",
        target=target,
        command=argv[0],
        exit_code=proc.returncode,
        timed_out=timed_out,
        seconds=seconds,
        output=output[-_OUTPUT_LOGGED:],
    )
    tail = output.strip()[-_OUTPUT_IN_ERROR:]
    if timed_out:
        raise StepFailed(f"{target}: patch.command {argv[0]} timed out after {timeout:g}s: {tail}")
    if proc.returncode != 0:
        raise StepFailed(f"{target}: patch.command {argv[0]} exited {proc.returncode}: {tail}")
