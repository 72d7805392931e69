"""The `patchd` command line: argument parsing and the output of each subcommand."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from patchd import __version__, compliance, faults, log, reports, versions
from patchd.config import DEFAULT_CONFIG, DEFAULT_DROPIN_DIR, ConfigError, Settings, load_settings
from patchd.config.settings import Group
from patchd.control.client import ControlError, NoDaemon, daemon_running, request
from patchd.control.commands import add_commands as add_control_commands
from patchd.control.live import render_live
from patchd.engine import GateResult
from patchd.engine.controls import pauses
from patchd.engine.target import TargetOutcome
from patchd.observers import BaseObserver
from patchd.reconcile import Reconciled
from patchd.runtime import Refusal, Runtime, open_store
from patchd.state import Store, StoreError
from patchd.states import RunStatus, TargetResult

EXIT_CONFIG = 2
EXIT_REFUSED = 3

_DESCRIPTION = """\
patchd patches fleets safely: Docker containers, vSphere VMs and ESXi hosts, and Linux
machines over SSH (apt, dnf), only inside the maintenance windows of its TOML config. Each
target is snapshotted, patched, checked and rolled back by itself when the check fails;
staging groups go before production with exactly the versions staging verified.
"""

_CONFIG_HELP = f"""\
Config is read from {DEFAULT_CONFIG} and then {DEFAULT_DROPIN_DIR}/*.toml in file-name
order (a later file wins per key; tables merge deeply). Errors are printed as
FILE: key.path: reason, with exit code 2.
"""


def _config_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration")
    group.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help=f"main config file (default {DEFAULT_CONFIG}); with -c alone no drop-ins are read",
    )
    group.add_argument(
        "--config-dir",
        type=Path,
        metavar="DIR",
        help=f"drop-in directory whose *.toml files are merged in name order "
        f"(default {DEFAULT_DROPIN_DIR} when -c is not given)",
    )
    return parent


def _instant(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO-8601 instant: {text!r} (e.g. 2026-03-29T00:30:00+01:00)"
        ) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchd",
        description=_DESCRIPTION,
        epilog=_CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"patchd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    config = _config_options()

    check = commands.add_parser(
        "check-config",
        parents=[config],
        help="validate the config and print a one-line summary",
        description="Read, merge and validate the config. Prints a one-line summary and "
        "exits 0, or prints every problem found as FILE: key.path: reason and exits 2.",
    )
    check.set_defaults(func=cmd_check_config)

    windows = commands.add_parser(
        "windows",
        parents=[config],
        help="show the next openings of each maintenance window",
        description="Show the next openings of each window, in the window's own zone and in "
        "UTC. An opening that is in progress at the query instant is listed first and marked "
        "'now'. Openings cut short by a freeze are marked 'clipped', those wholly inside "
        "one 'frozen'.",
    )
    windows.add_argument(
        "--next", type=_positive, default=3, metavar="N", help="openings per window (default 3)"
    )
    windows.add_argument(
        "--at",
        type=_instant,
        metavar="ISO-8601",
        help="reason about this instant instead of now; without an offset it is read in "
        "daemon.timezone",
    )
    windows.add_argument("--json", action="store_true", help="print JSON instead of a table")
    windows.set_defaults(func=cmd_windows)

    daemon = commands.add_parser(
        "daemon",
        parents=[config],
        help="run as the long-lived service (what systemd starts)",
        description="Run the daemon: patch each group when its window opens, serve "
        "metrics on daemon.metrics_address, and log one JSON event per step. SIGHUP reloads "
        "the config (a broken one is logged and the old one keeps running); SIGTERM lets "
        "in-flight targets finish or roll back, then exits 0. Speaks sd_notify (READY, "
        "STATUS, WATCHDOG, STOPPING) when NOTIFY_SOCKET is set.",
    )
    daemon.set_defaults(func=cmd_daemon)

    run = commands.add_parser(
        "run",
        parents=[config],
        help="run one group now, in the foreground, with progress",
        description="Patch one group in the foreground, printing a line per target. Without "
        "options it runs only if the group's window allows a start now. The stage gate "
        "(after/soak) always applies. SIGINT, SIGTERM and SIGHUP (a closed terminal) start no "
        "new target and let those in flight finish or roll back. "
        "Exit codes: 0 all patched or current, 1 a target "
        "failed or the run halted or left targets pending, 2 config error, 3 refused.",
    )
    run.add_argument("group", metavar="GROUP", help="the [groups.NAME] to run")
    run.add_argument("--now", action="store_true", help="ignore the window (freezes still apply)")
    run.add_argument(
        "--force", action="store_true", help="ignore the window and freezes (implies --now)"
    )
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser(
        "plan",
        parents=[config],
        help="show what the next run would do, changing nothing",
        description="For each group (or one): the targets, their current and available "
        "versions, the batch each would go in, and the stage gate. Reads only: it never "
        "pulls an image, changes a target or creates the journal. With --json stdout holds "
        "only the JSON document (log lines go to stderr). Exit codes: 0 the plan is shown, "
        "1 discovering targets failed for every group shown (each group says why), "
        "2 config error.",
    )
    plan.add_argument("group", metavar="GROUP", nargs="?", help="only this group")
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.set_defaults(func=cmd_plan)

    comply = commands.add_parser(
        "compliance",
        parents=[config],
        help="pending package updates per machine, held back by the baseline and why",
        description=compliance.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comply.add_argument("group", metavar="GROUP", nargs="?", help="only this group")
    form = comply.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON")
    form.add_argument("--csv", action="store_true", help="print CSV, one row per target")
    comply.set_defaults(func=cmd_compliance)

    status = commands.add_parser(
        "status",
        parents=[config],
        help="groups, last runs, pending targets, next windows",
        description="Read the state store: each group's last run, the targets it left "
        "pending, the next window, stage gates, unfinished targets and failed rollbacks.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    history = commands.add_parser(
        "history",
        parents=[config],
        help="past runs and what happened to each target",
        description="List past runs, newest first, with each target's end state.",
    )
    history.add_argument("--group", metavar="G", help="only runs of this group")
    history.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="at most N runs (default 20)"
    )
    history.add_argument("--json", action="store_true", help="print JSON")
    history.set_defaults(func=cmd_history)

    add_control_commands(commands, [config])

    version = commands.add_parser(
        "version", help="print the version", description="Print patchd's version."
    )
    version.set_defaults(func=cmd_version)
    return parser


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, args.config_dir)
    for issue in settings.warnings:
        print(f"patchd: warning: {issue}", file=sys.stderr)
    return settings


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(settings.summary())
    return 0


def cmd_windows(args: argparse.Namespace) -> int:
    settings = _load(args)
    at: datetime = args.at or datetime.now(UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=settings.daemon.timezone)
    at = at.astimezone(UTC)
    listing = reports.window_listing(settings, at, args.next)
    paused = _paused(settings, at)
    if args.json:
        doc = reports.windows_json(settings, listing, at) | {"paused": paused}
        print(json.dumps(doc, indent=2))
    else:
        print(reports.render_windows(settings, listing, at))
        for group, text in paused.items():
            print(f"\ngroup {group} (window {settings.groups[group].window}): {text}")
    return 0


def _paused(settings: Settings, at: datetime) -> dict[str, str]:
    """group -> its pause at `at`, from the journal (none when it cannot be read)."""
    try:
        store = open_store(settings, readonly=True)
    except StoreError:
        return {}
    try:
        held = pauses(store, at)
    except StoreError:
        return {}
    finally:
        store.close()
    return {g: p.describe() for g, p in held.items() if g in settings.groups}


def cmd_daemon(args: argparse.Namespace) -> int:
    from patchd.daemon import run_daemon

    return run_daemon(args.config, args.config_dir)


def _open_store(settings: Settings) -> Store:
    """The journal, opened only to read (report commands never create or change it)."""
    try:
        return open_store(settings, readonly=True)
    except StoreError as err:
        raise CommandError(str(err)) from None


def _runtime(
    settings: Settings, observers: Sequence[BaseObserver] = (), *, readonly: bool = False
) -> Runtime:
    try:
        return Runtime(settings, _utcnow, observers, readonly=readonly)
    except StoreError as err:
        raise CommandError(str(err)) from None


def _group_names(settings: Settings, wanted: str | None) -> list[str]:
    if wanted is None:
        return list(settings.groups)
    if wanted not in settings.groups:
        known = ", ".join(settings.groups) or "none"
        raise CommandError(f"unknown group {wanted!r} (known: {known})", EXIT_CONFIG)
    return [wanted]


class _RunPrinter(BaseObserver):
    """What `patchd run` prints besides each target's line: what it reconciled first,
    and the alert gate shutting (the run waits) and opening again."""

    def reconciled(self, item: Reconciled) -> None:
        print(
            f"reconciled {item.target} (run {item.run_id}): {item.was} -> {item.now}"
            + (f": {item.detail}" if item.detail else ""),
            file=sys.stderr,
        )

    def alert_gate(self, group: Group, check: str, answer: GateResult, changed: bool) -> None:
        if check != "before_start" or not changed:
            return  # a failed check after a patch shows in the target's line
        if not answer.open:
            print(f"alert gate shut: {answer.describe()}; waiting", file=sys.stderr, flush=True)
        else:
            print("alert gate open", file=sys.stderr, flush=True)


def _print_progress(outcome: TargetOutcome, done: int, total: int) -> None:
    change = ""
    if outcome.update is not None:
        update = outcome.update
        change = " " + versions.change(update.ref, update.current, update.available)
    error = f": {outcome.error}" if outcome.error else ""
    print(
        f"[{done}/{total}] {outcome.target.name}: {outcome.result}{change}"
        f" ({outcome.seconds:.1f}s){error}",
        flush=True,
    )


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    [group] = _group_names(settings, args.group)
    if daemon_running(settings.daemon.control_socket):
        raise CommandError(
            f"a patchd daemon is running: it runs {group} itself (two processes would race);"
            f" ask it to run now with `patchd trigger {group}` (--force to ignore freezes)",
            EXIT_REFUSED,
        )
    log.setup(settings.daemon.log_format, "warning")
    runtime = _runtime(settings, [_RunPrinter()])
    try:
        try:
            runtime.reconcile([group])
        except StoreError as err:
            raise CommandError(f"run of {group} not started: {err}") from None
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            print("stopping: no new targets; waiting for those in flight", file=sys.stderr)
            stop.set()

        # A closed terminal (SIGHUP) or `kill` (SIGTERM) must not leave a target
        # half-patched: each lets the targets in flight finish, as Ctrl-C does.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, on_signal)
        force = args.force
        try:
            result = runtime.run(
                group, now=args.now or force, force=force, stop=stop, on_progress=_print_progress
            )
        except StoreError as err:
            print(f"patchd: run of {group} not started: {err}", file=sys.stderr)
            return 1
    finally:
        runtime.close()
    if isinstance(result, Refusal):
        print(f"patchd: run of {group} refused: {result.reason}", file=sys.stderr)
        return EXIT_REFUSED
    print(
        f"run {result.run_id}: {result.status}; {result.count(TargetResult.SUCCESS)} patched, "
        f"{result.count(TargetResult.CURRENT)} current, {result.failed} failed, "
        f"{result.count(TargetResult.PENDING)} pending, "
        f"{result.count(TargetResult.SKIPPED)} skipped"
        + (f"; {result.error}" if result.error else "")
    )
    ok = (
        result.status == RunStatus.COMPLETED
        and not result.failed
        and not result.count(TargetResult.PENDING)
    )
    return 0 if ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    settings = _load(args)
    groups = _group_names(settings, args.group)
    runtime = _runtime(settings, readonly=True)
    now = _utcnow()
    try:
        for name in groups:
            backend = settings.groups[name].backend
            try:
                runtime.backend(backend)
            except Exception as err:
                raise CommandError(f"backend {backend}: cannot connect: {err}") from None
        docs = [reports.plan(settings, runtime.store, runtime.backends, g, now) for g in groups]
    finally:
        runtime.close()
    if args.json:
        print(json.dumps({"at": now.isoformat(), "groups": docs}, indent=2))
    else:
        print("\n\n".join(reports.render_plan(doc) for doc in docs))
    # Nothing could be planned: a script must not read an empty plan as "nothing to do".
    return 1 if docs and all("error" in doc for doc in docs) else 0


def cmd_compliance(args: argparse.Namespace) -> int:
    settings = _load(args)
    groups = compliance.package_groups(settings, _group_names(settings, args.group))
    if args.group is not None and not groups:
        raise CommandError(f"group {args.group!r} does not patch packages", EXIT_CONFIG)
    runtime = _runtime(settings)  # read-write: first sightings and results are recorded
    try:
        docs = compliance.check(settings, runtime.store, runtime.backend, groups, _utcnow())
    finally:
        runtime.close()
    if args.json:
        print(json.dumps({"targets": docs}, indent=2))
    else:
        print(compliance.render_csv(docs) if args.csv else compliance.render_text(docs), end="")
    return compliance.exit_code(docs)


def cmd_status(args: argparse.Namespace) -> int:
    settings = _load(args)
    try:  # the daemon's live state when one runs, else the journal alone
        reply = request(settings.daemon.control_socket, "status")
    except (NoDaemon, ControlError):
        reply = None
    if reply is not None:
        if args.json:
            print(json.dumps({"live": reply["live"], **reply["journal"]}, indent=2))
        else:
            print(render_live(reply["live"]) + "\n" + reports.render_status(reply["journal"]))
        return 0
    doc = reports.status(settings, _open_store(settings), _utcnow())
    print(json.dumps(doc, indent=2) if args.json else reports.render_status(doc))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.group is not None:
        _group_names(settings, args.group)
    runs = reports.history(_open_store(settings), args.group, args.limit)
    print(json.dumps(runs, indent=2) if args.json else reports.render_history(runs))
    return 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def cmd_version(args: argparse.Namespace) -> int:
    print(f"patchd {__version__}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Log lines go to stderr from the first one (a backend logs as it connects): stdout is
    # the command's output alone, e.g. the JSON of --json. The daemon sets its own level.
    log.setup("auto", "warning")
    try:
        faults.active()  # a test's bad PATCHD_FAULTS fails here, not mid-patch
    except faults.FaultSpecError as err:
        print(f"patchd: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        code: int = args.func(args)
    except ConfigError as err:
        for issue in err.issues:
            print(issue, file=sys.stderr)
        count = len(err.issues)
        print(f"config invalid: {count} problem{'' if count == 1 else 's'}", file=sys.stderr)
        return EXIT_CONFIG
    except CommandError as err:
        print(f"patchd: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`patchd windows | head`); say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
