"""The `patchd` verbs that talk to the running daemon: pause, resume, approve, trigger,
quarantine (and `status`'s live part, which patchd.cli asks for here).

Exit codes: 0 done; 1 the daemon answered with an error; 2 a usage or config error (an
unknown group); 3 refused (the caller may not steer patchd, or the daemon cannot do it
now); 4 no daemon is running.

`quarantine list|clear` also works with no daemon running: it reads and writes the
journal directly (who may is then the journal file's permission), and a clear is
written to the audit trail with the caller's uid as the daemon would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from patchd.config import Settings, load_settings
from patchd.control.client import ControlError, NoDaemon, request
from patchd.control.server import Peer
from patchd.durations import parse_duration
from patchd.engine.controls import clear_quarantine, quarantine_listing
from patchd.runtime import open_store
from patchd.state import StoreError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_DAEMON = 4


def _duration(text: str) -> str:
    try:
        if parse_duration(text).total_seconds() <= 0:
            raise ValueError(f"duration {text!r} must be longer than 0s")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_commands(commands: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add the control verbs to `patchd`'s subcommands."""
    note = " Talks to the running daemon over its control socket (daemon.control_socket)."
    pause = commands.add_parser(
        "pause",
        parents=parents,
        help="hold new starts of groups (in-flight targets finish)",
        description="Pause groups: no new target starts (targets in flight finish), until "
        "`patchd resume` or the end of --for. Kept in the journal: a restart keeps it." + note,
    )
    pause.add_argument("groups", nargs="*", metavar="GROUP", help="groups to pause")
    pause.add_argument("--all", action="store_true", help="every configured group")
    pause.add_argument("--for", dest="for_", type=_duration, metavar="DURATION",
                       help='end the pause after this long ("2h", "3d")')  # fmt: skip
    pause.add_argument("--reason", default="", metavar="TEXT", help="why (journaled, shown)")
    pause.set_defaults(func=cmd_pause)

    resume = commands.add_parser(
        "resume",
        parents=parents,
        help="end a pause (runs go on inside open windows)",
        description="End the pause of groups; a group whose window is open starts again." + note,
    )
    resume.add_argument("groups", nargs="*", metavar="GROUP", help="groups to resume")
    resume.add_argument("--all", action="store_true", help="every configured group")
    resume.set_defaults(func=cmd_resume)

    approve = commands.add_parser(
        "approve",
        parents=parents,
        help='release a group with approval = "manual" to its earlier stage\'s versions',
        description='Approve the promotion of a group with approval = "manual": it is '
        "pinned to exactly the versions its earlier stage verified now (printed and "
        "journaled)." + note,
    )
    approve.add_argument("group", metavar="GROUP")
    approve.set_defaults(func=cmd_approve)

    trigger = commands.add_parser(
        "trigger",
        parents=parents,
        help="have the daemon run a group now",
        description="The daemon runs the group now, ignoring its window (freezes, pauses "
        "and the stage gate still apply; --force ignores freezes too). Follow it with "
        "`patchd status`." + note,
    )
    trigger.add_argument("group", metavar="GROUP")
    trigger.add_argument("--force", action="store_true", help="ignore freezes too")
    trigger.set_defaults(func=cmd_trigger)

    quarantine = commands.add_parser(
        "quarantine",
        parents=parents,
        help="list or clear versions that failed and are not installed again",
        description="A version that failed on a target is quarantined for its group (and "
        "later stages). `list` shows them; `clear GROUP [VERSION]` lets them be tried "
        "again (VERSION: the digest or version, or a prefix of 12+ characters)." + note,
    )
    quarantine.epilog = "With no daemon running, it reads and writes the journal directly."
    quarantine.add_argument("action", choices=["list", "clear"])
    quarantine.add_argument("group", nargs="?", metavar="GROUP")
    quarantine.add_argument("version", nargs="?", metavar="VERSION")
    quarantine.add_argument("--json", action="store_true", help="print JSON")
    quarantine.set_defaults(func=cmd_quarantine)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.config_dir)


def call(socket: Path, verb: str, body: dict[str, Any] | None = None) -> dict[str, Any] | int:
    """The daemon's reply, or the exit code after printing why there is none."""
    try:
        return request(socket, verb, body)
    except NoDaemon as err:
        print(f"patchd: {err}; start it (systemctl start patchd)", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ControlError as err:
        return _refused(verb, err)


def _groups(args: argparse.Namespace) -> dict[str, Any] | int:
    if bool(args.groups) == bool(args.all):
        print("patchd: name groups or give --all (not both)", file=sys.stderr)
        return EXIT_USAGE
    return {"all": True} if args.all else {"groups": list(args.groups)}


def cmd_pause(args: argparse.Namespace) -> int:
    body = _groups(args)
    if isinstance(body, int):
        return body
    body.update({"for": args.for_, "reason": args.reason})
    reply = call(_settings(args).daemon.control_socket, "pause", body)
    if isinstance(reply, int):
        return reply
    for group, text in reply["paused"].items():
        print(f"{group}: {text}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    body = _groups(args)
    if isinstance(body, int):
        return body
    reply = call(_settings(args).daemon.control_socket, "resume", body)
    if isinstance(reply, int):
        return reply
    names = args.groups or reply["resumed"]
    for group in names:
        state = "resumed" if group in reply["resumed"] else "was not paused"
        started = "; its run started" if group in reply["started"] else ""
        print(f"{group}: {state}{started}")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    reply = call(_settings(args).daemon.control_socket, "approve", {"group": args.group})
    if isinstance(reply, int):
        return reply
    print(f"{args.group}: {reply['approval']}")
    for ref, version in sorted(reply["pins"].items()):
        print(f"  {ref} = {version}")
    if reply["started"]:
        print(f"{args.group}: its window is open; the run started")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    body = {"group": args.group, "force": args.force}
    reply = call(_settings(args).daemon.control_socket, "trigger", body)
    if isinstance(reply, int):
        return reply
    print(f"{args.group}: run started by the daemon; follow it with `patchd status`")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.group is not None and args.group not in settings.groups:
        known = ", ".join(settings.groups) or "none"
        print(f"patchd: quarantine: unknown group {args.group} (known: {known})", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "clear":
        if args.group is None:
            print("patchd: quarantine clear needs a GROUP", file=sys.stderr)
            return EXIT_USAGE
        body = {"group": args.group, "version": args.version}
        reply: dict[str, Any] | int
        try:
            reply = request(settings.daemon.control_socket, "quarantine-clear", body)
        except NoDaemon:
            reply = _clear_in_journal(settings, args.group, args.version)
        except ControlError as err:
            return _refused("quarantine clear", err)
        if isinstance(reply, int):
            return reply
        print(f"{args.group}: {reply['cleared']} version(s) cleared from quarantine")
        return 0
    try:
        groups = request(settings.daemon.control_socket, "quarantine")["groups"]
    except NoDaemon:
        try:
            groups = quarantine_listing(open_store(settings, readonly=True), settings.groups)
        except StoreError as err:
            print(f"patchd: quarantine list: {err}", file=sys.stderr)
            return EXIT_ERROR
    except ControlError as err:
        return _refused("quarantine list", err)
    groups = {g: q for g, q in groups.items() if args.group in (None, g)}
    if args.json:
        print(json.dumps(groups, indent=2))
        return 0
    lines = [f"{g}: {q['describe']}" for g, held in groups.items() for q in held]
    print("\n".join(lines) if lines else "no version is quarantined")
    return 0


def _refused(what: str, err: ControlError) -> int:
    print(f"patchd: {what}: {err}", file=sys.stderr)
    return {400: EXIT_USAGE, 404: EXIT_USAGE, 403: EXIT_REFUSED, 409: EXIT_REFUSED}.get(
        err.status, EXIT_ERROR
    )


def _clear_in_journal(settings: Settings, group: str, version: str | None) -> dict[str, Any] | int:
    """No daemon runs: clear in the journal itself, audited with the caller's uid."""
    me = Peer(os.getuid(), os.getpid(), os.getgid())
    journal = settings.daemon.state_dir / "patchd.db"
    try:
        store = open_store(settings)
        try:
            count = clear_quarantine(store, group, version)
            if version is not None and not count:
                print(f"patchd: quarantine clear: {group} has no quarantined version"
                      f" {version!r} (see `patchd quarantine list`)", file=sys.stderr)  # fmt: skip
                return EXIT_USAGE
            why = "no daemon was running: cleared in the journal directly"
            detail = {"group": group, "version": version, "cleared": count, "because": why}
            store.audit(datetime.now(UTC), me.uid, me.pid, me.user, "quarantine-clear",
                        group, detail)  # fmt: skip
        finally:
            store.close()
    except StoreError as err:
        print(f"patchd: quarantine clear: journal {journal}: {err} (run it as the user"
              " patchd runs as, or start the daemon)", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    return {"cleared": count}
