"""The `patch.command` executor: an argv template run on the patchd host, without a shell.

Owns placeholder filling and running. `{name}`, `{moid}`, `{uuid}`, `{ip}` and
`{hostname}` are replaced wherever they occur in an argument; any other braces are left
alone (so JSON such as Ansible's `--extra-vars '{"a": 1}'` passes through). A placeholder
the target has no value for (no guest IP yet) fails the step before anything runs.

The command also gets PATCHD_TARGET_ID/NAME/KIND, PATCHD_TARGET_<FACT> for every fact
`describe` reports, PATCHD_RUN_ID and PATCHD_PATCH_VERSION in its environment. It runs in
its own process group, which is killed as a whole at `patch.timeout` (`patchd.commands`,
the runner health probes use too). Its exit code decides; its output (stdout and stderr,
interleaved) is logged as `patch_command_output` and the tail of it goes into the error
on failure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from patchd import commands, log
from patchd.backends.base import StepFailed

PLACEHOLDERS = ("name", "moid", "uuid", "ip", "hostname")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")
_OUTPUT_LOGGED = 64_000


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
    return commands.with_facts(extra, facts)


def run(argv: list[str], env: Mapping[str, str], timeout: float, target: str) -> None:
    """Run the filled command; StepFailed when it cannot start, times out or exits non-zero."""
    finished = commands.run(argv, env, timeout)
    if finished.not_started is None:
        # The output (scrubbed by the runner) is logged whole; its tail goes into the
        # error, which the journal keeps and `patchd run` prints.
        log.get("patchd.vsphere").info(
            "patch_command_output",
            target=target,
            command=argv[0],
            exit_code=finished.exit_code,
            timed_out=finished.timed_out,
            seconds=finished.seconds,
            output=finished.output[-_OUTPUT_LOGGED:],
        )
    if finished.problem is not None:
        raise StepFailed(f"{target}: patch.command {argv[0]} {finished.problem}")
