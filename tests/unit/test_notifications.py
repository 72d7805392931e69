"""Notifications without a network: the config tables, the event model and its messages,
filtering per channel, webhook signing, backoff on a fake clock, the outbox surviving a
reopen of the journal, redaction, and a run through the runtime on FakeBackend.

The senders here are test doubles (a list that records, or fails on demand): real
receivers (an SMTP server, an HTTP endpoint) are in tests/integration/test_notifications.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from patchd import log
from patchd.backends.base import Target, Update
from patchd.config import ConfigError, load_settings
from patchd.config.notifications import EventKind, NotificationModel
from patchd.engine import RunResult
from patchd.engine.target import TargetOutcome
from patchd.notifications import events, signing
from patchd.notifications.channels import Channel, DeliveryFailed, backoff, build
from patchd.notifications.outbox import Outbox
from patchd.runtime import Runtime
from patchd.state import open_store
from patchd.states import RunStatus, TargetResult
from patchd.testing import FakeBackend
from tests.conftest import write_config

T0 = datetime(2026, 11, 28, 2, 30, tzinfo=UTC)  # a Saturday, inside settings_file's window


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Recorder:
    """A sender that records what it is given; fails while `failing` is above 0."""

    def __init__(self, failing: int = 0, permanent: bool = False) -> None:
        self.sent: list[tuple[Mapping[str, Any], int, datetime]] = []
        self.failing = failing
        self.permanent = permanent
        self.tries = 0

    def send(self, document: Mapping[str, Any], delivery: int, now: datetime) -> None:
        self.tries += 1
        if self.failing:
            self.failing -= 1
            raise DeliveryFailed("receiver down", self.permanent)
        self.sent.append((document, delivery, now))


def model(**keys: Any) -> NotificationModel:
    keys.setdefault("urls", ["json://127.0.0.1:9/"])
    return NotificationModel.model_validate(keys)


def outcome(name: str, result: TargetResult, error: str | None = None) -> TargetOutcome:
    return TargetOutcome(
        Target(id=name, name=name, kind="fake"),
        result,
        Update(ref="app", current="v1", available="v2"),
        error,
        12.0,
    )


def result(status: RunStatus = RunStatus.COMPLETED) -> RunResult:
    return RunResult(
        "20261128T023000Z-abc123",
        "web",
        status,
        (
            outcome("web-1", TargetResult.SUCCESS),
            outcome("web-2", TargetResult.ROLLED_BACK, "health check failed: HTTP 502"),
            TargetOutcome(Target(id="web-3", name="web-3", kind="fake"), TargetResult.PENDING),
        ),
    )


# --- config ---------------------------------------------------------------------------------


def settings_file(
    tmp_path: Path,
    notifications: dict[str, Any] | None = None,
    groups: dict[str, Any] | None = None,
) -> Path:
    """The group `web` (tier=web, in the Saturday window of T0), with `notifications` and
    more `groups`."""
    return write_config(
        tmp_path / "patchd.toml",
        {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"sat": {"days": ["sat"], "start": "02:00", "duration": "4h"}},
            "backends": {"f": {"type": "fake"}},
            "groups": {
                "web": {
                    "backend": "f",
                    "window": "sat",
                    "max_errors": 1,
                    "select": {"labels": {"tier": "web"}},
                },
                **(groups or {}),
            },
            "notifications": notifications,
        },
    )


def test_a_channel_hears_every_event_by_default_and_only_its_list_when_given(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    settings = load_settings(
        settings_file(
            tmp_path,
            {
                "mail": {"urls": ["mailto://ops:pw@127.0.0.1:2525?to=ops@example.com"]},
                "hook": {
                    "webhook": "http://127.0.0.1:8080/patchd",
                    "secret_file": secret,
                    "events": ["rollback_failed", "halted"],
                },
            },
        )
    )
    mail, hook = settings.notifications["mail"], settings.notifications["hook"]
    assert mail.events == list(EventKind)
    assert hook.events == [EventKind.ROLLBACK_FAILED, EventKind.HALTED]
    assert (mail.attempts, mail.backoff, mail.backoff_max) == (
        8, timedelta(seconds=10), timedelta(minutes=30)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"urls": ["x://a"], "webhook": "http://h/"}, "give exactly one of urls"),
        ({}, "give exactly one of urls"),
        ({"webhook": "http://h/"}, "give exactly one of secret_file or credential"),
        ({"urls": ["json://h/"], "credential": "c"}, "urls take none"),
        ({"urls": ["json://h/"], "events": ["rollbak"]}, "notifications.n.events.0"),
        ({"urls": ["not a url"]}, "URL 1 is not an apprise URL"),
        ({"urls": ["json://h/"], "backoff": "1m", "backoff_max": "10s"}, "backoff_max"),
        ({"urls": ["json://h/"], "colour": "red"}, "notifications.n.colour: unknown key"),
    ],
)
def test_a_bad_channel_table_is_refused_with_its_key_path(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(settings_file(tmp_path, {"n": table}))
    assert message in str(caught.value)


# --- the events and their messages ---------------------------------------------------------


def test_a_run_summary_names_group_window_counts_failures_versions_and_duration() -> None:
    event = events.run_finished(result(), "sat", T0, T0 + timedelta(minutes=2, seconds=5))
    assert event.kind is EventKind.RUN_FINISHED
    assert event.subject == "patchd: web completed: 1 patched, 1 rolled back, 1 pending"
    text = event.text
    assert "Group web, window sat: run 20261128T023000Z-abc123 completed in 2m5s." in text
    assert "Patched 1, rolled back 1, rollback failed 0, left out of service 0, failed 0" in text
    assert "  web-2: rolled_back: health check failed: HTTP 502" in text
    assert "  web-1: app v1 -> v2 (success)" in text
    document = event.document()
    assert json.loads(json.dumps(document)) == document  # JSON as it is
    assert document["event"] == "run_finished" and document["group"] == "web"
    data = document["data"]
    assert data["duration_seconds"] == 125.0 and data["window"] == "sat"
    assert data["counts"]["success"] == 1 and data["counts"]["pending"] == 1
    assert data["failed_targets"] == [
        {"target": "web-2", "result": "rolled_back", "error": "health check failed: HTTP 502"}
    ]


def test_a_summary_counts_every_result_a_target_can_end_with() -> None:
    run = RunResult(
        "r", "web", RunStatus.COMPLETED, tuple(outcome(f"t-{r.value}", r) for r in TargetResult)
    )
    event = events.run_finished(run, "sat", T0, T0)
    assert all(event.document()["data"]["counts"][r.value] == 1 for r in TargetResult)


def test_control_events_carry_who_and_why() -> None:
    pause = events.paused(["web"], "alice (uid 1000)", T0, "incident 42", T0 + timedelta(hours=2))
    assert pause.subject == "patchd: group web paused by alice (uid 1000)"
    assert "until 2026-11-28 04:30Z" in pause.text and "incident 42" in pause.text
    assert pause.document()["data"]["who"] == "alice (uid 1000)"
    everything = events.resumed(None, "root (uid 0)", T0)
    assert everything.subject == "patchd: all groups resumed by root (uid 0)"
    assert everything.group is None and everything.data["groups"] is None
    approval = events.approval_needed("prod", {"app": "v2"}, "staging verified v2", T0)
    assert "patchd approve prod" in approval.text and "  app: v2" in approval.text
    held = events.quarantined("web", "sha256:bad", "web-2", "health check failed", T0)
    assert held.kind is EventKind.QUARANTINED and "patchd quarantine clear web" in held.text


# --- filtering, backoff, dropping ----------------------------------------------------------


def outbox_with(tmp_path: Path, clock: Clock, **senders: tuple[NotificationModel, Recorder]) -> Any:
    store = open_store(tmp_path / "patchd.db")
    counted: list[tuple[str, str]] = []
    channels = {name: Channel(name, m, sender) for name, (m, sender) in senders.items()}
    outbox = Outbox(
        {name: m for name, (m, _) in senders.items()},
        store,
        clock,
        lambda channel, result: counted.append((channel, result)),
        channels,
    )
    return outbox, store, counted


def test_each_channel_gets_only_the_events_it_listed(tmp_path: Path) -> None:
    clock = Clock(T0)
    every, urgent = Recorder(), Recorder()
    outbox, store, counted = outbox_with(
        tmp_path,
        clock,
        every=(model(), every),
        urgent=(model(events=["rollback_failed"]), urgent),
    )
    assert (
        outbox.submit(events.rollback("r", "web", outcome("a", TargetResult.ROLLED_BACK), T0)) == 1
    )
    failed = outcome("b", TargetResult.ROLLBACK_FAILED, "snapshot gone")
    assert outbox.submit(events.rollback("r", "web", failed, T0)) == 2
    assert outbox.deliver_due() is None  # all sent: nothing left
    assert [d["event"] for d, _, _ in every.sent] == ["rollback", "rollback_failed"]
    assert [d["event"] for d, _, _ in urgent.sent] == ["rollback_failed"]
    assert "ROLLBACK FAILED on b (web)" in urgent.sent[0][0]["subject"]
    assert sorted(counted) == [("every", "sent"), ("every", "sent"), ("urgent", "sent")]
    store.close()


def test_backoff_doubles_up_to_its_cap_and_stops_at_the_limit() -> None:
    first, most = timedelta(seconds=10), timedelta(seconds=60)
    waits = [backoff(n, 6, first, most) for n in range(1, 8)]
    assert waits == [
        timedelta(seconds=10), timedelta(seconds=20), timedelta(seconds=40),
        timedelta(seconds=60), timedelta(seconds=60), None, None,
    ]  # fmt: skip


def test_a_failing_receiver_is_retried_with_backoff_then_dropped(tmp_path: Path) -> None:
    clock = Clock(T0)
    down = Recorder(failing=100)
    outbox, store, counted = outbox_with(
        tmp_path, clock, hook=(model(attempts=4, backoff="10s", backoff_max="25s"), down)
    )
    outbox.submit(events.resumed(["web"], "alice", T0))
    due = outbox.deliver_due()
    assert due == T0 + timedelta(seconds=10) and down.tries == 1
    clock.now = T0 + timedelta(seconds=9)
    assert outbox.deliver_due() == due and down.tries == 1  # not due yet: not tried
    clock.now = due
    assert outbox.deliver_due() == due + timedelta(seconds=20)
    [row] = store.due_notifications()
    assert (row.attempts, row.error) == (2, "receiver down")
    clock.now += timedelta(seconds=20)
    assert outbox.deliver_due() == clock.now + timedelta(seconds=25)  # capped
    clock.now += timedelta(seconds=25)
    assert outbox.deliver_due() is None  # the 4th attempt failed: dropped
    assert down.tries == 4 and store.due_notifications() == []
    assert counted == [("hook", "retried")] * 3 + [("hook", "dropped")]
    store.close()


def test_a_permanent_failure_or_a_channel_gone_drops_at_once(tmp_path: Path) -> None:
    clock = Clock(T0)
    refused = Recorder(failing=1, permanent=True)
    outbox, store, counted = outbox_with(tmp_path, clock, hook=(model(), refused))
    outbox.submit(events.resumed(["web"], "alice", T0))
    assert outbox.deliver_due() is None and refused.tries == 1
    outbox.submit(events.resumed(["web"], "alice", T0))
    outbox.configure({})  # a reload removed the channel
    assert outbox.deliver_due() is None
    assert counted == [("hook", "dropped"), ("hook", "dropped")]
    store.close()


def test_the_outbox_survives_a_reopen_of_the_journal(tmp_path: Path) -> None:
    clock = Clock(T0)
    down = Recorder(failing=2)
    outbox, store, _ = outbox_with(tmp_path, clock, hook=(model(), down))
    outbox.submit(events.paused(None, "alice", T0, "incident"))
    outbox.submit(events.resumed(None, "alice", T0))
    assert outbox.deliver_due() == T0 + timedelta(seconds=10)  # both failed
    store.close()  # the daemon stops

    clock.now = T0 + timedelta(minutes=1)
    back = Recorder()
    outbox, store, counted = outbox_with(tmp_path, clock, hook=(model(), back))
    assert [(r.event, r.attempts) for r in store.due_notifications()] == [
        ("paused", 1), ("resumed", 1)
    ]  # fmt: skip
    assert outbox.deliver_due() is None
    assert [d["event"] for d, _, _ in back.sent] == ["paused", "resumed"]
    assert counted == [("hook", "sent"), ("hook", "sent")]
    store.close()


def test_submit_never_raises_even_when_the_journal_cannot_be_written(tmp_path: Path) -> None:
    clock = Clock(T0)
    outbox, store, _ = outbox_with(tmp_path, clock, hook=(model(), Recorder()))
    store.close()
    assert outbox.submit(events.resumed(None, "alice", T0)) == 0


# --- signing and redaction -----------------------------------------------------------------


def test_a_webhook_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    body = b'{"event":"halted"}'
    # Computed independently: printf '1764567600.{"event":"halted"}' | openssl sha256 -hmac k
    expected = (
        "sha256="
        + __import__("hmac").new(b"k", b'1764567600.{"event":"halted"}', "sha256").hexdigest()
    )
    assert signing.signature("k", 1764567600, body) == expected
    sent = signing.headers("k", 1764567600, body, "halted", 7)
    assert sent["X-Patchd-Delivery"] == "7" and sent["X-Patchd-Event"] == "halted"
    assert signing.verify("k", sent, body, now=1764567610) is None
    assert "does not match" in str(signing.verify("k", sent, body + b" ", now=1764567610))
    assert "does not match" in str(signing.verify("other", sent, body, now=1764567610))
    assert "replay" in str(signing.verify("k", sent, body, now=1764567600 + 301))
    assert "malformed" in str(signing.verify("k", {}, body, now=0))


def test_a_webhook_token_and_the_secret_never_leave_in_clear(tmp_path: Path) -> None:
    token = "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
    channel = build("chat", model(urls=[f"slack://{token}/#ops"]))
    assert channel.model.urls is not None
    assert "XXXXXXXXXXXXXXXXXXXXXXXX" not in log.scrub(f"failed: slack://{token}/#ops")
    assert "B00000000" not in log.scrub("B00000000")
    # An error that quotes a secret is scrubbed in the journaled document too.
    log.redact("hunter2-password")
    clock = Clock(T0)
    rec = Recorder()
    outbox, store, _ = outbox_with(tmp_path, clock, hook=(model(), rec))
    leaked = outcome("a", TargetResult.ROLLED_BACK, "login with hunter2-password refused")
    outbox.submit(events.rollback("r", "web", leaked, T0))
    [row] = store.due_notifications()
    assert "hunter2-password" not in json.dumps(row.document)
    assert "login with *** refused" in row.document["text"]
    store.close()


# --- a run through the runtime on FakeBackend ---------------------------------------------


def test_a_run_queues_its_rollback_summary_and_halt_and_control_events(tmp_path: Path) -> None:
    path = settings_file(tmp_path, {"hook": {"urls": ["json://127.0.0.1:9/"]}})
    fake = FakeBackend("f")
    for name in ("web-1", "web-2", "web-3"):
        fake.add(name, labels={"tier": "web"})
    fake.publish("app", "v2")
    fake.unhealthy.add("v2")
    clock = Clock(T0)
    runtime = Runtime(load_settings(path), clock, connector=lambda spec: fake)
    try:
        run = runtime.run("web")
        assert isinstance(run, RunResult) and run.status == "halted"
        runtime.notify(events.paused(["web"], "alice (uid 1000)", T0, "incident"))
        queued = runtime.store.due_notifications()
        assert [r.event for r in queued] == [
            "rollback", "quarantined", "run_finished", "halted", "paused"
        ]  # fmt: skip
        summary = queued[2].document
        assert summary["data"]["counts"]["rolled_back"] == 1
        assert summary["data"]["failed_targets"][0]["error"].endswith("web-1 is unhealthy on v2")
        assert "halted" in summary["subject"] and summary["data"]["window"] == "sat"
        runtime.outbox.configure(runtime.settings.notifications, {"hook": Channel(
            "hook", runtime.settings.notifications["hook"], Recorder())})  # fmt: skip
    finally:
        runtime.close()  # `patchd run`: one delivery pass at close
    store = open_store(tmp_path / "state" / "patchd.db")
    assert store.due_notifications() == []
    store.close()


def test_a_read_only_runtime_delivers_nothing_the_daemon_queued(tmp_path: Path) -> None:
    # `patchd plan` beside a running daemon: a delivery from it could not be marked sent,
    # so the daemon would send the same message again (twice the approval mail).
    path = settings_file(tmp_path, {"hook": {"urls": ["json://127.0.0.1:9/"]}})
    writer = Runtime(load_settings(path), Clock(T0))
    writer.notify(events.resumed(["web"], "alice", T0))
    writer.store.close()
    plan = Runtime(load_settings(path), Clock(T0), readonly=True)
    heard = Recorder()
    plan.outbox.configure(plan.settings.notifications, {"hook": Channel(
        "hook", plan.settings.notifications["hook"], heard)})  # fmt: skip
    plan.close()
    assert heard.sent == []
    store = open_store(tmp_path / "state" / "patchd.db")
    assert [r.event for r in store.due_notifications()] == ["resumed"]
    store.close()


def test_a_starting_delivery_thread_tries_at_once_what_a_stopped_one_left(
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    outbox, store, _ = outbox_with(
        tmp_path, clock, hook=(model(backoff="1h", backoff_max="1h"), Recorder(1))
    )
    outbox.submit(events.resumed(None, "alice", T0))
    assert outbox.deliver_due() == T0 + timedelta(hours=1)
    store.close()
    back = Recorder()
    outbox, store, counted = outbox_with(tmp_path, clock, hook=(model(), back))
    outbox.start()  # a real thread; the fake clock stays at T0, an hour before it is due
    try:
        deadline = time.monotonic() + 10
        while not back.sent and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        outbox.stop()
    assert [d["event"] for d, _, _ in back.sent] == ["resumed"] and counted == [("hook", "sent")]
    store.close()


def test_the_readme_shows_what_each_event_sends() -> None:
    """Each sample message in README.md is what the builder makes of the same inputs."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()

    def done(name: str, result: TargetResult, error: str | None = None) -> TargetOutcome:
        update = Update(ref="nginx", current="1.25.3", available="1.25.4")
        return TargetOutcome(Target(id=name, name=name, kind="c"), result, update, error, 3.0)

    run = RunResult(
        "20261128T023000Z-abc123",
        "web",
        RunStatus.HALTED,
        (
            done("web-1", TargetResult.SUCCESS),
            done("web-2", TargetResult.ROLLED_BACK, "health check failed: HTTP 502"),
            TargetOutcome(Target(id="web-3", name="web-3", kind="c"), TargetResult.PENDING),
        ),
    )
    broken = done("db-1", TargetResult.ROLLBACK_FAILED, "snapshot patchd-20261128 not found")
    samples = [
        events.run_finished(run, "sat", T0, T0 + timedelta(minutes=2, seconds=5)),
        events.rollback(run.run_id, "web", run.outcomes[1], T0),
        events.rollback(run.run_id, "db", broken, T0),
        events.halted(run, "sat", T0),
        events.approval_needed("prod", {"nginx": "1.25.4"}, "staging verified these versions", T0),
        events.quarantined("web", "sha256:9f2c...", "web-2", "health check failed: HTTP 502", T0),
        events.paused(["web"], "alice (uid 1000)", T0, "incident 42", T0 + timedelta(hours=2)),
        events.resumed(["web"], "alice (uid 1000)", T0),
    ]
    assert {e.kind for e in samples} == set(EventKind)
    for event in samples:
        assert f"```\nSubject: {event.subject}\n\n{event.text}```" in readme, event.kind


def test_the_webhook_secret_comes_from_a_file_or_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patchd.notifications.channels import read_secret

    (tmp_path / "patchd-hook").write_text("from-credential\n")
    hook = model(urls=None, webhook="http://127.0.0.1:9/h", credential="patchd-hook")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(DeliveryFailed, match=r"CREDENTIALS_DIRECTORY is not set"):
        read_secret(hook, "hook")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(hook, "hook") == "from-credential"
    assert log.scrub("key from-credential") == "key ***"
    (tmp_path / "patchd-hook").write_text("")
    with pytest.raises(DeliveryFailed, match="is empty"):
        read_secret(hook, "hook")


@pytest.mark.parametrize(("status", "permanent"), [(500, False), (429, False), (404, True)])
def test_a_webhook_answer_decides_between_retry_and_drop(
    tmp_path: Path, status: int, permanent: bool
) -> None:
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.handle_request, daemon=True).start()
    secret = tmp_path / "s"
    secret.write_text("a-long-webhook-key")  # (a one-letter key would be scrubbed everywhere)
    secret.chmod(0o600)
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    channel = build("hook", model(urls=None, webhook=url, secret_file=str(secret)))
    document = events.resumed(None, "alice", T0).document()
    try:
        with pytest.raises(DeliveryFailed) as caught:
            channel.sender.send(document, 1, T0)
    finally:
        server.server_close()
    assert caught.value.permanent is permanent
    assert str(caught.value) == f"the webhook answered HTTP {status}"


def test_a_target_a_stopped_patchd_left_is_announced_when_the_restart_rolls_it_back(
    tmp_path: Path,
) -> None:
    path = settings_file(tmp_path, {"hook": {"urls": ["json://127.0.0.1:9/"]}})
    fake = FakeBackend("f")
    fake.add("web-1", labels={"tier": "web"})
    store = open_store(tmp_path / "state" / "patchd.db")
    store.start_run("r1", "web", "sat", T0)
    store.record("r1", "web-1", "web-1", "snapshotting", T0, step="snapshot", phase="intent",
                 snapshot={"name": "patchd-r1"})  # fmt: skip
    fake.targets["web-1"].snapshots["patchd-r1"] = "v1"
    store.record("r1", "web-1", "web-1", "snapshotted", T0, step="snapshot", phase="done")
    store.record("r1", "web-1", "web-1", "applying", T0, step="apply", phase="intent")
    fake.targets["web-1"].version = "v2"
    store.close()
    runtime = Runtime(load_settings(path), Clock(T0), connector=lambda spec: fake)
    try:
        [item] = runtime.reconcile()
        assert item.now == "rolled_back"
        [row] = runtime.store.due_notifications()
        assert row.event == "rollback" and row.document["group"] == "web"
        assert row.document["subject"] == "patchd: web-1 (web) rolled back at restart"
        assert "was left applying by a patchd that stopped (run r1)" in row.document["text"]
        runtime.outbox.configure({})  # deliver nothing at close: the channel is gone
    finally:
        runtime.close()


def test_apprise_failures_say_why_and_an_unknown_url_is_not_retried() -> None:
    from patchd.notifications.channels import AppriseSender

    document = events.resumed(None, "alice", T0).document()
    refused = AppriseSender(["json://127.0.0.1:9/nobody-listens"], timedelta(seconds=3))
    with pytest.raises(DeliveryFailed) as caught:
        refused.send(document, 1, T0)
    assert not caught.value.permanent
    assert str(caught.value).startswith("apprise could not deliver: ")
    assert "127.0.0.1" in str(caught.value)
    unknown = AppriseSender(["nosuchservice://x"], timedelta(seconds=3))
    with pytest.raises(DeliveryFailed, match="URL 1 is not one apprise knows") as caught:
        unknown.send(document, 1, T0)
    assert caught.value.permanent


def test_a_quarantine_and_one_approval_wait_are_announced(tmp_path: Path) -> None:
    from dataclasses import replace

    from patchd.notifications.observer import NotificationObserver
    from patchd.runner import Refusal

    clock = Clock(T0)
    outbox, store, _ = outbox_with(tmp_path, clock, ops=(model(urls=["json://x"]), Recorder()))
    observer = NotificationObserver(outbox, clock)
    settings = load_settings(
        settings_file(
            tmp_path,
            groups={
                "prod": {"backend": "f", "window": "sat", "after": "web", "approval": "manual"}
            },
        )
    )
    prod = settings.groups["prod"]
    failed = replace(outcome("web-2", TargetResult.ROLLED_BACK, "health: 502"), quarantine=True)
    observer.outcome("r1", settings.groups["web"], failed)
    waiting = Refusal("awaiting approval of stage 'web'", None)
    for _ in range(3):  # refused at every window check: announced once
        observer.run_refused(prod, waiting)
    kinds = [row.event for row in store.due_notifications()]
    assert kinds == ["rollback", "quarantined", "approval_needed"]
    observer.run_started(prod)  # approved and started: a later wait is news again
    observer.run_refused(prod, waiting)
    assert [row.event for row in store.due_notifications()][-1] == "approval_needed"
    assert len(store.due_notifications()) == 4
    store.close()
