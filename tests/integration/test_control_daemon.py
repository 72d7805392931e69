"""Steering `patchd daemon` (a real process, real Docker and registry) over its control
socket with the real `patchd` command: pause and resume during a rollout, a pause that
survives a restart and ends on time, a user outside the socket's group refused (the client
run as `nobody`), manual approval announced by mail (a real SMTP server) and a signed
webhook then pinning staging's versions, and a broken image quarantined across a restart,
a reload, a trigger and the next window until a newer good one comes.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd.control.client import ControlError, request
from patchd.engine.controls import pause_of, quarantined
from patchd.state import SqliteStore
from tests.conftest import wait_until, window_at, write_config
from tests.integration.daemon_helpers import (
    Daemon,
    daemon_config,
    on_version,
    run_patchd,
    scrape,
    web_group,
)
from tests.integration.docker_fleet import Fleet, free_port
from tests.integration.test_notifications import SECRET, Mailbox, Receiver, receiver, smtp

__all__ = ["receiver", "smtp"]  # the fixtures, shared with test_notifications


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory `nobody` can traverse: the control socket and config live there."""
    path = Path(tempfile.mkdtemp(prefix="patchd-control-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def configure(
    f: Fleet,
    tmp: Path,
    public: Path,
    *,
    prod: bool = False,
    timeout: str = "120s",
    stable: str = "1s",
    notifications: dict[str, Any] | None = None,
) -> tuple[Path, int]:
    """A config whose window opened a minute ago (the daemon starts at once)."""
    config = public / "patchd.toml"
    port = free_port()
    groups = web_group(
        f.token,
        1,
        select={"labels": {"patchd.test": f.token, "tier": "web"}},
        health={"timeout": timeout, "stable_for": stable},
    )
    if prod:
        groups["prod"] = {
            "backend": "lab",
            "window": "soon",
            "after": "web",
            "approval": "manual",
            "select": {"labels": {"patchd.test": f.token, "tier": "prod"}},
            "health": {"timeout": "120s", "stable_for": "1s"},
        }
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    daemon_config(config, f, tmp / "state", port, start, groups)
    values = tomllib.loads(config.read_text())
    values["daemon"]["control_socket"] = str(public / "control.sock")
    # A group that exists here, and nobody is not in.
    values["daemon"]["control_group"] = "staff"
    if notifications is not None:
        values["notifications"] = notifications
    write_config(config, values)
    config.chmod(0o644)
    return config, port


def patchd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_patchd(*args, "-c", str(config))


def started_targets(daemon: Daemon) -> list[str]:
    return [
        e["target"]
        for e in daemon.events()
        if e.get("event") == "target_step" and e.get("state") == "snapshotting"
    ]


def fleet_of(
    f: Fleet, count: int, tier: str, repo: str | None = None, image: str = "app-v1"
) -> list[str]:
    """`count` containers of the tier, on `image` in `repo` (default: the tier's own)."""
    repo = repo or tier
    f.publish(image, repo)
    names = []
    for i in range(count):
        f.run(f"{tier}{i}", repo, labels={"tier": tier})
        names.append(f.name(f"{tier}{i}"))
    f.wait_healthy(*names)
    return names


def ready(daemon: Daemon, config: Path) -> None:
    wait_until(lambda: daemon.saw("READY=1"), 300, "READY=1")
    wait_until(lambda: patchd(config, "status").returncode == 0, 300, "status")


def test_pause_holds_a_running_rollout_and_resume_continues_it(
    f: Fleet, tmp_path: Path, public: Path
) -> None:
    # No HEALTHCHECK in these images: each target must keep running `stable_for` (6 s),
    # so the pause lands while the first one is in flight.
    fleet_of(f, 3, "web", image="plain-v1")
    names = [f.name(f"web{i}") for i in range(3)]
    v2 = f.publish("plain-v2", "web")
    config, port = configure(f, tmp_path, public, stable="6s")
    daemon = Daemon(config, tmp_path)
    try:
        ready(daemon, config)
        wait_until(lambda: started_targets(daemon), 300, "the first target to start")
        paused = patchd(config, "pause", "web", "--reason", "incident 4711")
        assert paused.returncode == 0, paused.stderr
        assert "paused by root" in paused.stdout and "incident 4711" in paused.stdout
        held = set(started_targets(daemon))
        assert len(held) < 3
        # The targets in flight finish; then nothing new starts while paused.
        wait_until(
            lambda: (
                {e["target"] for e in daemon.events() if e.get("event") == "target_done"} >= held
            ),
            300,
            "the targets in flight to finish",
        )
        status = patchd(config, "status")
        assert "live state" in status.stdout and "web waits: paused by root" in status.stdout
        assert 'patchd_group_paused{group="web"} 1.0' in scrape(port)
        windows = patchd(config, "windows")
        assert "group web (window soon): paused by root" in windows.stdout
        time.sleep(3)  # a target wrongly started while paused would show up by now
        assert set(started_targets(daemon)) == held
        resumed = patchd(config, "resume", "web")
        assert resumed.returncode == 0, resumed.stderr
        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2")
        finished = wait_until(
            lambda: [e for e in daemon.events() if e.get("event") == "run_finished"], 300, "run end"
        )
        assert [e["status"] for e in finished] == ["completed"]  # the same run went on
        assert finished[0]["succeeded"] == 3
        assert 'patchd_group_paused{group="web"} 0.0' in scrape(port)
        store = SqliteStore(tmp_path / "state" / "patchd.db")
        actions = [(a.user, a.action) for a in store.audit_trail()]
        assert ("root", "pause") in actions and ("root", "resume") in actions
    finally:
        daemon.close()


def test_a_pause_survives_a_restart_and_ends_on_time(
    f: Fleet, tmp_path: Path, public: Path
) -> None:
    names = fleet_of(f, 1, "web")
    config, _ = configure(f, tmp_path, public)
    first = Daemon(config, tmp_path)
    try:
        ready(first, config)
        assert patchd(config, "pause", "--all", "--for", "25s").returncode == 0
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(60) == 0
    finally:
        first.close()
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    pause = pause_of(store, "web", datetime.now(UTC))
    assert pause is not None and pause.until is not None
    v2 = f.publish("app-v2", "web")
    assert run_patchd("status", "-c", str(config)).returncode == 0  # no daemon: the journal
    second_dir = tmp_path / "two"
    second_dir.mkdir()
    second = Daemon(config, second_dir)
    try:
        ready(second, config)
        refused = wait_until(
            lambda: [e for e in second.events() if e.get("event") == "run_refused"],
            300,
            "the run refused by the pause",
        )
        assert "paused by root" in refused[0]["reason"]
        assert not on_version(f, names, v2)
        wait_until(lambda: on_version(f, names, v2), 300, "the patch once the pause ended")
        [step] = [
            e
            for e in second.events()
            if e.get("event") == "target_step" and e.get("state") == "snapshotting"
        ]
        assert datetime.fromisoformat(step["timestamp"]) >= pause.until
    finally:
        second.close()


def as_nobody(socket_path: Path, verb: str, body: dict[str, Any]) -> str:
    """The real client's answer to `verb`, asked by a process running as `nobody`.

    A forked child drops to nobody's uid and gids and asks with patchd.control.client (the
    venv's python lives under /root, which nobody cannot execute, so `runuser patchd ...`
    cannot run here); the answer comes back through a pipe."""
    nobody = pwd.getpwnam("nobody")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        answer = "crashed"
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                request(socket_path, verb, body)
                answer = "200: done"
            except ControlError as err:
                answer = f"{err.status}: {err}"
            except Exception as err:
                answer = f"error: {err!r}"
        finally:
            os.write(write, answer.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


def test_a_user_outside_the_sockets_group_is_refused_and_nothing_changes(
    f: Fleet, tmp_path: Path, public: Path
) -> None:
    fleet_of(f, 1, "web")
    config, _ = configure(f, tmp_path, public)
    daemon = Daemon(config, tmp_path)
    try:
        ready(daemon, config)
        socket_path = public / "control.sock"
        assert socket_path.stat().st_mode & 0o777 == 0o660
        assert socket_path.stat().st_gid == grp.getgrnam("staff").gr_gid
        denied = as_nobody(socket_path, "pause", {"all": True, "reason": "not allowed"})
        assert denied.startswith("403: permission denied"), denied
        # Even if the socket's mode let it connect, the daemon checks who is asking.
        socket_path.chmod(0o666)
        refused = as_nobody(socket_path, "pause", {"all": True, "reason": "not allowed"})
        assert refused.startswith(
            "403: refused: nobody is not root nor a member of group 'staff'"
        ), refused
        store = SqliteStore(tmp_path / "state" / "patchd.db")
        assert pause_of(store, "web", datetime.now(UTC)) is None
        [audit] = store.audit_trail()
        assert (audit.user, audit.action) == ("nobody", "refused pause")
        assert any(e.get("event") == "control_refused" for e in daemon.events())
        assert "PAUSED" not in patchd(config, "status").stdout
    finally:
        daemon.close()


def test_manual_approval_waits_then_releases_exactly_stagings_versions(
    f: Fleet, tmp_path: Path, public: Path, smtp: tuple[int, Mailbox], receiver: Receiver
) -> None:
    smtp_port, box = smtp
    receiver.start()
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    web = fleet_of(f, 1, "web")
    prod = fleet_of(f, 1, "prod", repo="web")  # production runs the image staging runs
    v2 = f.publish("app-v2", "web")
    channels = {
        "mail": {
            "urls": [f"mailto://127.0.0.1:{smtp_port}?from=patchd@example.com&to=ops@example.com"],
            "events": ["approval_needed", "run_finished"],
        },
        "hook": {
            "webhook": f"http://127.0.0.1:{receiver.port}/patchd",
            "secret_file": str(secret),
            "events": ["approval_needed"],
        },
    }
    config, _ = configure(f, tmp_path, public, prod=True, notifications=channels)
    daemon = Daemon(config, tmp_path)
    try:
        ready(daemon, config)
        wait_until(lambda: on_version(f, web, v2), 300, "staging on v2")
        wait_until(lambda: "awaiting approval" in patchd(config, "status").stdout, 300, "waiting")
        assert "prod waits: awaiting approval" in patchd(config, "status").stdout
        assert "stage gate: SHUT: awaiting approval" in patchd(config, "plan", "prod").stdout
        # The operator hears of it: a mail naming the versions approving would pin, and a
        # signed webhook (the receiver verifies each signature).

        def subjects() -> list[str]:
            return [str(m["Subject"]) for m in box.messages]

        wait_until(lambda: "patchd: prod awaits approval" in subjects(), 120, "the approval mail")
        [asking] = [m for m in box.messages if m["Subject"] == "patchd: prod awaits approval"]
        assert "Group prod waits for an approval: awaiting approval" in asking.get_content()
        assert v2 in asking.get_content() and "patchd approve prod" in asking.get_content()
        wait_until(lambda: receiver.received, 60, "the approval webhook")
        [(document, _)] = receiver.received
        assert (document["event"], document["group"]) == ("approval_needed", "prod")
        assert v2 in document["data"]["versions"].values()
        assert receiver.refused == []
        v3 = f.publish("app-v3", "web")  # newer than staging verified: not for prod
        assert v3 != v2
        approved = patchd(config, "approve", "prod")
        assert approved.returncode == 0, approved.stderr
        assert "approved by root" in approved.stdout and v2 in approved.stdout
        wait_until(lambda: on_version(f, prod, v2), 300, "prod on staging's version")
        wait_until(
            lambda: "patchd: prod completed: 1 patched" in subjects(), 120, "prod's summary mail"
        )
        assert on_version(f, prod, v2)  # exactly staging's version, not v3
        [summary] = [m for m in box.messages if m["Subject"] == "patchd: prod completed: 1 patched"]
        assert f"@{v2} (success)" in summary.get_content()  # named repository@digest
        assert subjects().count("patchd: prod awaits approval") == 1  # announced once
        store = SqliteStore(tmp_path / "state" / "patchd.db")
        assert any(a.action == "approve" for a in store.audit_trail())
    finally:
        daemon.close()


def applied(daemon: Daemon) -> list[dict[str, Any]]:
    return [
        e
        for e in daemon.events()
        if e.get("event") == "target_step" and e.get("state") == "applying"
    ]


def test_a_broken_image_is_quarantined_until_a_newer_good_one(
    f: Fleet, tmp_path: Path, public: Path
) -> None:
    names = fleet_of(f, 2, "web")
    broken = f.publish("app-v2-broken", "web")
    config, port = configure(f, tmp_path, public, timeout="6s")
    daemon = Daemon(config, tmp_path)
    try:
        ready(daemon, config)
        wait_until(
            lambda: [e for e in daemon.events() if e.get("event") == "run_finished"], 300, "run"
        )
        assert len(applied(daemon)) == 1  # failed once; the second target was not offered it
        listing = patchd(config, "quarantine", "list")
        assert "quarantined since" in listing.stdout and broken[:19] in listing.stdout
        assert "failed on" in listing.stdout
        assert 'patchd_quarantined_versions{group="web"} 1.0' in scrape(port)
        assert "quarantined since" in patchd(config, "plan", "web").stdout
        # A reload and a trigger run the group again: nothing is installed.
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reloaded" for e in daemon.events()), 300, "reload")
        wait_until(lambda: patchd(config, "trigger", "web").returncode == 0, 300, "trigger")
        wait_until(
            lambda: len([e for e in daemon.events() if e.get("event") == "run_finished"]) >= 3,
            300,
            "the reload's and the trigger's runs",
        )
        assert len(applied(daemon)) == 1
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(60) == 0
    finally:
        daemon.close()
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    again = Daemon(config, again_dir)  # a restart inside the open window
    try:
        ready(again, config)
        wait_until(
            lambda: [e for e in again.events() if e.get("event") == "run_finished"], 300, "run"
        )
        assert applied(again) == []
        assert not any(on_version(f, [n], broken) for n in names)
        # The next window: the window now opens in a few seconds (closed at the reload);
        # its timer fires and the group runs again, installing nothing.
        values = tomllib.loads(config.read_text())
        values["windows"]["soon"] = window_at(datetime.now(UTC) + timedelta(seconds=8))
        write_config(config, values)
        again.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: len([e for e in again.events() if e.get("event") == "run_finished"]) >= 2,
            300,
            "the next window's run",
            give_up=again.exited,
        )
        assert any(e.get("event") == "window_opened" for e in again.events())
        assert applied(again) == []
        v3 = f.publish("app-v3", "web")
        assert patchd(config, "trigger", "web").returncode == 0
        wait_until(lambda: on_version(f, names, v3), 300, "the newer good version everywhere")
        wait_until(  # the commit removes the old containers: let it end before the cleanup
            lambda: len([e for e in again.events() if e.get("event") == "run_finished"]) >= 3,
            300,
            "the trigger's run to end",
        )
        # The newer version passed: the quarantine is superseded (kept, no longer open).
        assert 'patchd_quarantined_versions{group="web"} 0.0' in scrape(port)
        assert "superseded by" in patchd(config, "quarantine", "list").stdout
        store = SqliteStore(tmp_path / "state" / "patchd.db")
        assert len(quarantined(store, ["web"])) == 1  # kept until cleared
        cleared = patchd(config, "quarantine", "clear", "web")
        assert cleared.returncode == 0 and "1 version(s) cleared" in cleared.stdout
    finally:
        again.close()


def test_patchd_run_while_a_daemon_runs_offers_trigger(
    f: Fleet, tmp_path: Path, public: Path
) -> None:
    fleet_of(f, 1, "web")
    config, _ = configure(f, tmp_path, public)
    daemon = Daemon(config, tmp_path)
    try:
        ready(daemon, config)
        run = patchd(config, "run", "web", "--now")
        assert run.returncode == 3
        assert "a patchd daemon is running" in run.stderr and "patchd trigger web" in run.stderr
    finally:
        daemon.close()
    gone = patchd(config, "pause", "web")
    assert gone.returncode == 4 and "no patchd daemon is running" in gone.stderr
