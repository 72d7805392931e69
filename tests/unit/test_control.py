"""The control socket: the protocol's checks, who may steer patchd, and every verb against
an in-process daemon with FakeBackend, over a real Unix socket.

Refusing a real other user (SO_PEERCRED of another uid) is tested with the daemon as a
process in tests/integration/test_control_daemon.py; here `may_steer` is given peers.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd import log
from patchd.cli import main
from patchd.control.client import ControlError, NoDaemon, request
from patchd.control.protocol import VERBS, ProtocolError, parse_body, route
from patchd.control.server import Peer, SocketBusy, may_steer, serve_control
from patchd.daemon import Daemon
from patchd.engine.controls import Quarantine, pause_of, quarantine, quarantined
from patchd.observers import BaseObserver
from patchd.state import SqliteStore
from patchd.systemd import Notifier
from patchd.testing import FakeBackend
from tests.conftest import window_at, write_config


def wait_for(check: Callable[[], Any], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)
    return value


# --- the protocol -------------------------------------------------------------------------


def test_each_verb_has_one_route() -> None:
    assert route("GET", "/v1/status") is VERBS["status"]
    assert route("POST", "/v1/quarantine/clear/") is VERBS["quarantine-clear"]
    with pytest.raises(ProtocolError) as err:
        route("DELETE", "/v1/pause")
    assert err.value.status == 404 and "POST /v1/pause" in str(err.value)


@pytest.mark.parametrize(
    ("verb", "body", "wrong"),
    [
        ("pause", b"{", "not JSON"),
        ("pause", b"[]", "JSON object"),
        ("pause", b'{"groups": ["a"], "all": true}', "not both"),
        ("pause", b"{}", "neither"),
        ("pause", b'{"groups": ["a"], "for": "soon"}', "invalid duration"),
        ("pause", b'{"groups": ["a"], "for": "0s"}', "longer than 0s"),
        ("pause", b'{"groups": [1]}', "group names"),
        ("pause", b'{"groups": ["a"], "why": "x"}', "unknown field"),
        ("approve", b"{}", "'group' is required"),
        ("trigger", b'{"group": "a", "force": 1}', "wrong type"),
        ("trigger", b'{"group": true}', "wrong type"),
    ],
)
def test_bad_bodies_are_refused_in_plain_words(verb: str, body: bytes, wrong: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_body(VERBS[verb], body)
    assert err.value.status == 400 and wrong in str(err.value)


def test_good_bodies_pass() -> None:
    body = parse_body(VERBS["pause"], b'{"groups": ["web"], "for": "2h", "reason": "x"}')
    assert body == {"groups": ["web"], "for": "2h", "reason": "x"}
    assert parse_body(VERBS["status"], b"") == {}


# --- who may steer ------------------------------------------------------------------------


def test_root_the_daemons_user_and_group_members_may_steer() -> None:
    nobody = pwd.getpwnam("nobody")
    assert may_steer(Peer(0, 1, 0), "no-such-group-x", 1000) == (True, "root")
    assert may_steer(Peer(1000, 1, 1000), "no-such-group-x", 1000)[0]
    allowed, why = may_steer(Peer(nobody.pw_uid, 1, nobody.pw_gid), "no-such-group-x", 0)
    assert not allowed and "does not exist" in why
    own = grp.getgrgid(nobody.pw_gid).gr_name  # nobody's own group: a member
    assert may_steer(Peer(nobody.pw_uid, 1, nobody.pw_gid), own, 0)[0]
    allowed, why = may_steer(Peer(nobody.pw_uid, 1, nobody.pw_gid), "root", 0)
    assert not allowed and "not root nor a member of group 'root'" in why


def test_a_refused_peer_is_audited_and_nothing_is_dispatched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The peer's credentials are real (this process); the server is told it runs as
    # another user, for a group this process is not in: the refusal path.
    log.setup("json", "error", sys.__stderr__)  # not a stream an earlier test captured
    heard: list[tuple[str, bool, str]] = []
    dispatched: list[str] = []
    path = tmp_path / "c.sock"
    server = serve_control(
        path,
        "no-such-group-x",
        lambda verb, body, peer: (dispatched.append(verb.name), (200, {"ok": True}))[1],
        lambda peer, action, body, allowed, why: heard.append((action, allowed, why)),
    )
    try:
        assert os.stat(path).st_mode & 0o777 == 0o660
        monkeypatch.setattr("patchd.control.server.may_steer",
                            lambda peer, group, own: (False, "not in group x"))  # fmt: skip
        with pytest.raises(ControlError) as err:
            request(path, "pause", {"all": True})
        assert err.value.status == 403 and "not in group x" in str(err.value)
        assert dispatched == [] and heard == [("pause", False, "not in group x")]
    finally:
        server.shutdown()
    assert not path.exists()
    with pytest.raises(NoDaemon):
        request(path, "status")


def test_one_socket_path_serves_one_daemon_even_when_both_start_at_once(
    tmp_path: Path,
) -> None:
    # Two daemons started at the same instant both find nobody answering on the path
    # (the check open_control makes first); the second must not replace the first's socket.
    log.setup("json", "error", sys.__stderr__)
    path = tmp_path / "c.sock"

    def serve(name: str) -> Any:
        def dispatch(verb: Any, body: Any, peer: Peer) -> tuple[int, dict[str, Any]]:
            return 200, {"ok": True, "server": name}

        return serve_control(path, "root", dispatch, lambda *a: None)

    first = serve("first")
    try:
        with pytest.raises(SocketBusy, match="another process holds"):
            serve("second")
        assert request(path, "status")["server"] == "first"  # its socket is still there
    finally:
        first.shutdown()
    assert not path.exists()
    again = serve("again")  # the lock went with the first: a restart serves at once
    try:
        assert request(path, "status")["server"] == "again"
    finally:
        again.shutdown()


def test_a_lock_root_leaves_is_the_service_users_to_take() -> None:
    # A daemon run as root once (by hand, to try it) leaves the socket's lock file behind:
    # the service user must still be able to take it.
    if os.geteuid() != 0:
        pytest.skip("needs root, as the suite runs on the test bed")
    service = 65534  # nobody
    top = Path(tempfile.mkdtemp(prefix="patchd-lock-", dir="/tmp"))  # tmp_path: root's 0700
    top.chmod(0o755)
    run = top / "run"
    run.mkdir()
    os.chown(run, service, service)
    path = run / "c.sock"
    server = serve_control(path, "root", lambda *a: (200, {}), lambda *a: None)
    server.shutdown()
    lock = run / "c.sock.lock"
    assert (lock.stat().st_uid, lock.stat().st_gid) == (service, service)
    take = (
        "import fcntl, os, sys; os.setgid(65534); os.setuid(65534);"
        f" fd = os.open({str(lock)!r}, os.O_RDWR);"
        " fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('taken')"
    )
    try:
        done = subprocess.run([sys.executable, "-c", take], capture_output=True, text=True)
    finally:
        shutil.rmtree(top)
    assert done.stdout.strip() == "taken", done.stderr


# --- the verbs, against a daemon ------------------------------------------------------------


def write_patchd_config(path: Path, state: Path, start: datetime, manual: bool = False) -> Path:
    return write_config(
        path,
        {
            "daemon": {
                "state_dir": state,
                "metrics_address": "127.0.0.1:0",
                "log_format": "json",
                "control_socket": state / "control.sock",
            },
            "windows": {"now": window_at(start)},
            "backends": {"d": {"type": "docker"}},
            "groups": {
                "web": {
                    "backend": "d",
                    "window": "now",
                    "select": {"names": ["w*"]},
                    "max_concurrency": 1,
                    "max_errors": 5,
                },
                "prod": {
                    "backend": "d",
                    "window": "now",
                    "after": "web",
                    "select": {"names": ["p*"]},
                    "approval": "manual" if manual else "auto",
                },
            },
        },
    )


@pytest.fixture
def fake() -> FakeBackend:
    backend = FakeBackend("d")
    for i in range(3):
        backend.add(f"w{i}")
    backend.add("p0")
    backend.publish("app", "v2")
    return backend


def started(tmp_path: Path, fake: FakeBackend, *, manual: bool = False,
            paused: bool = False) -> Daemon:  # fmt: skip
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)  # open now
    path = write_patchd_config(tmp_path / "patchd.toml", tmp_path / "state", start, manual)
    d = Daemon(path, None, connector=lambda spec: fake, notifier=Notifier(""))
    if paused:  # paused before it starts: the open window starts nothing
        from patchd.engine.controls import PAUSE, Pause
        from patchd.state import SqliteStore

        now = datetime.now(UTC)
        store = SqliteStore(tmp_path / "state" / "patchd.db")
        for g in ("web", "prod"):
            store.put_control(PAUSE, g, "", Pause(g, now, None, "setup", "test").data(), now)
        store.close()
    d.start()
    return d


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., tuple[int, str]]:
    """`patchd ARGS -c patchd.toml` in-process: its exit code and output."""

    def run(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(out):
            code = main([*args, "-c", str(tmp_path / "patchd.toml")])
        return code, out.getvalue()

    return run


@pytest.fixture
def stop_daemons() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    log.setup("json", "error", sys.__stderr__)  # the test's captured stream is gone
    for d in daemons:
        if not d.stop.is_set():
            d.shutdown()


def test_without_a_daemon_the_verbs_say_so(tmp_path: Path, cli: Any) -> None:
    start = datetime.now(UTC)
    write_patchd_config(tmp_path / "patchd.toml", tmp_path / "state", start)
    code, out = cli("pause", "web")
    assert code == 4 and "no patchd daemon is running" in out
    code, out = cli("resume", "--all")
    assert code == 4 and "no patchd daemon is running" in out


def test_quarantine_list_and_clear_work_without_a_daemon_and_clear_is_audited(
    tmp_path: Path, cli: Any
) -> None:
    start = datetime.now(UTC)
    write_patchd_config(tmp_path / "patchd.toml", tmp_path / "state", start)
    code, out = cli("quarantine", "list")  # no journal yet: nothing, and none is created
    assert (code, out.strip()) == (0, "no version is quarantined")
    assert not (tmp_path / "state" / "patchd.db").exists()
    (tmp_path / "state").mkdir()
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    for version, target in (("v2", "w0"), ("v3", "w1")):
        quarantine(store, Quarantine("web", "app", version, start, target, "unhealthy"))
    store.close()
    code, out = cli("quarantine", "list", "web")
    assert code == 0 and "web: app v2 quarantined since" in out and "failed on w1" in out
    code, out = cli("quarantine", "clear", "web", "v9")
    assert code == 2 and "web has no quarantined version 'v9'" in out
    code, out = cli("quarantine", "clear", "nope")
    assert code == 2 and "unknown group nope (known: web, prod)" in out
    code, out = cli("quarantine", "clear", "web", "v2")
    assert (code, out.strip()) == (0, "web: 1 version(s) cleared from quarantine")
    code, out = cli("quarantine", "list")
    assert "app v2" not in out and "web: app v3 quarantined since" in out
    store = SqliteStore(tmp_path / "state" / "patchd.db")
    [audit] = store.audit_trail()
    assert (audit.uid, audit.user, audit.action, audit.group) == (
        os.getuid(),
        pwd.getpwuid(os.getuid()).pw_name,
        "quarantine-clear",
        "web",
    )
    assert audit.detail["cleared"] == 1 and "no daemon was running" in audit.detail["because"]
    assert [q.version for q in quarantined(store, ["web"]).values()] == ["v3"]


def reconfigure(tmp_path: Path, **daemon: Any) -> None:
    path = tmp_path / "patchd.toml"
    values = tomllib.loads(path.read_text())
    values["daemon"].update(daemon)
    write_config(path, values)


def test_a_reload_that_changes_the_control_socket_moves_it(
    tmp_path: Path, fake: FakeBackend, stop_daemons: list[Daemon]
) -> None:
    d = started(tmp_path, fake, paused=True)
    stop_daemons.append(d)
    old = tmp_path / "state" / "control.sock"
    assert request(old, "status")["ok"]
    new = tmp_path / "run" / "moved.sock"  # its directory is made too
    reconfigure(tmp_path, control_socket=str(new), control_group="staff")
    d.reload()
    assert request(new, "status")["ok"]
    assert new.stat().st_gid == grp.getgrnam("staff").gr_gid
    assert new.stat().st_mode & 0o777 == 0o660
    assert not old.exists()
    with pytest.raises(NoDaemon):
        request(old, "status")
    # The same path in another group: the socket stays, its owner changes.
    reconfigure(tmp_path, control_group="root")
    d.reload()
    assert new.stat().st_gid == 0 and request(new, "pause", {"groups": ["web"]})["ok"]
    # A path that cannot be served: the socket stays where it works, and says why.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    reconfigure(tmp_path, control_socket=str(blocker / "control.sock"))
    d.reload()
    assert request(new, "status")["ok"]
    assert d.control is not None and d.control.path == new


def test_pause_holds_resume_goes_on_and_both_are_audited(
    tmp_path: Path, fake: FakeBackend, cli: Any, stop_daemons: list[Daemon]
) -> None:
    fake.step_time = 0.3
    fake.sleep = time.sleep
    d = started(tmp_path, fake, paused=True)
    stop_daemons.append(d)
    heard: list[tuple[str, str, str]] = []

    class Ears(BaseObserver):  # what a notification channel would hear
        def operator(self, group: str, action: str, by: str, detail: str) -> None:
            heard.append((group, action, by))

    d.runtime.observer.observers.append(Ears())
    time.sleep(0.5)
    assert [c for c in fake.calls if c[0] == "apply"] == []  # paused before the window
    code, out = cli("resume", "web")
    assert code == 0 and "web: resumed; its run started" in out
    wait_for(lambda: any(c[0] == "apply" for c in fake.calls))
    code, out = cli("pause", "web", "--reason", "incident 4711")
    assert code == 0 and "paused by root" in out and "incident 4711" in out
    code, out = cli("status")
    assert code == 0 and "live state" in out and "PAUSED: paused by root" in out
    applies = len([c for c in fake.calls if c[0] == "apply"])
    time.sleep(1.5)  # the target in flight finishes; no new one starts
    assert len([c for c in fake.calls if c[0] == "apply"]) == applies
    assert applies < 3
    code, out = cli("resume", "web")
    assert code == 0
    wait_for(lambda: {fake.targets[f"w{i}"].version for i in range(3)} == {"v2"})
    assert heard == [
        ("web", "resumed", "root"),
        ("web", "paused", "root"),
        ("web", "resumed", "root"),
    ]
    actions = [(a.user, a.action, a.group) for a in d.store.audit_trail()]
    assert ("root", "pause", None) in actions or ("root", "pause", "web") in actions
    assert sum(1 for a in actions if a[1] == "resume") == 2


def test_a_pause_for_a_while_ends_by_itself(
    tmp_path: Path, fake: FakeBackend, cli: Any, stop_daemons: list[Daemon]
) -> None:
    d = started(tmp_path, fake, paused=True)
    stop_daemons.append(d)
    code, _ = cli("pause", "web", "--for", "2s")
    assert code == 0
    assert pause_of(d.store, "web", datetime.now(UTC)) is not None
    wait_for(lambda: {fake.targets[f"w{i}"].version for i in range(3)} == {"v2"}, timeout=20)


def test_manual_approval_waits_then_approve_releases_stagings_versions(
    tmp_path: Path, fake: FakeBackend, cli: Any, stop_daemons: list[Daemon]
) -> None:
    d = started(tmp_path, fake, manual=True)
    stop_daemons.append(d)
    wait_for(lambda: {fake.targets[f"w{i}"].version for i in range(3)} == {"v2"})
    fake.publish("app", "v3")  # newer than what staging verified: prod must not get it
    wait_for(lambda: "awaiting approval" in cli("status")[1])
    assert "awaiting approval" in cli("plan", "prod")[1]
    assert fake.targets["p0"].version == "v1"
    code, out = cli("approve", "prod")
    assert code == 0 and "approved by root" in out and "app = v2" in out
    wait_for(lambda: fake.targets["p0"].version == "v2")
    code, out = cli("approve", "web")
    assert code == 3 and "nothing to approve" in out


def test_trigger_runs_now_and_a_bad_version_is_quarantined(
    tmp_path: Path, fake: FakeBackend, cli: Any, stop_daemons: list[Daemon]
) -> None:
    fake.unhealthy.add("v2")
    d = started(tmp_path, fake)
    stop_daemons.append(d)
    wait_for(lambda: quarantined(d.store, ["web"]))
    wait_for(lambda: "web" not in d._runs)
    applies = len([c for c in fake.calls if c[0] == "apply"])
    assert applies == 1
    code, out = cli("trigger", "web")
    assert code == 0
    wait_for(lambda: "web" not in d._runs and len(d.store.runs("web")) >= 2)
    assert len([c for c in fake.calls if c[0] == "apply"]) == applies  # not again
    code, out = cli("quarantine", "list")
    assert code == 0 and "web: app v2 quarantined since" in out and "failed on w0" in out
    assert "quarantined: app v2" in cli("plan", "web")[1]
    code, out = cli("run", "web", "--now")
    assert code == 3 and "patchd trigger web" in out
    fake.unhealthy.clear()
    code, out = cli("quarantine", "clear", "web", "v2")
    assert code == 0 and "1 version(s) cleared" in out
    assert cli("trigger", "web")[0] == 0
    wait_for(lambda: {fake.targets[f"w{i}"].version for i in range(3)} == {"v2"})


def test_unknown_groups_and_runs_going_on(
    tmp_path: Path, fake: FakeBackend, cli: Any, stop_daemons: list[Daemon]
) -> None:
    d = started(tmp_path, fake, paused=True)
    stop_daemons.append(d)
    code, out = cli("pause", "nope")
    assert code == 2 and "unknown group nope" in out
    gate = threading.Event()
    fake.sleep = lambda s: gate.wait(10)
    fake.step_time = 1
    cli("resume", "web")
    wait_for(lambda: "web" in d._runs)
    code, out = cli("trigger", "web")
    assert code == 3 and "going on already" in out
    gate.set()


def test_the_live_status_names_the_node_and_its_role_with_leadership() -> None:
    from patchd.control.live import render_live

    doc: dict[str, Any] = {"pid": 7, "at": "T", "runs": [], "waiting": {}}
    assert render_live({**doc, "node": None, "role": None}).startswith("daemon pid 7: live")
    shown = render_live({**doc, "node": "b", "role": "standby"})
    assert shown.startswith("daemon pid 7 (node b, standby): live state at T")
