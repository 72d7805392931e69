"""Notifications end to end with `patchd daemon` as a process on the Docker test bed: a
window opens, the group is patched, the run summary reaches a real SMTP server (apprise
mailto) and a signed-webhook receiver; a summary queued while the receiver is down
survives a daemon restart and is delivered by the next daemon; the metric counts it.
"""

from __future__ import annotations

import signal
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

from patchd.state import SqliteStore
from tests.conftest import wait_until, write_config
from tests.integration.daemon_helpers import Daemon, daemon_config, on_version, scrape, web_group
from tests.integration.docker_fleet import Fleet, free_port
from tests.integration.test_notifications import SECRET, Mailbox, Receiver, smtp

__all__ = ["smtp"]  # the fixture, shared with test_notifications


def test_the_daemon_mails_and_posts_the_summary_and_a_restart_loses_no_message(
    f: Fleet, tmp_path: Path, smtp: tuple[int, Mailbox]
) -> None:
    smtp_port, box = smtp
    names = [f.name(f"web{i}") for i in range(2)]
    f.publish("app-v1", "web")
    for i in range(2):
        f.run(f"web{i}", "web")
    f.wait_healthy(*names)
    v2 = f.publish("app-v2", "web")
    secret = tmp_path / "hook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    receiver = Receiver(free_port())
    port = free_port()
    config = tmp_path / "patchd.toml"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=6)
    daemon_config(config, f, tmp_path / "state", port, start, web_group(f.token, 2))
    settings = tomllib.loads(config.read_text())
    settings["notifications"] = {
        "mail": {
            "urls": [f"mailto://127.0.0.1:{smtp_port}?from=patchd@example.com&to=ops@example.com"],
            "events": ["run_finished"],
        },
        "hook": {
            "webhook": f"http://127.0.0.1:{receiver.port}/patchd",
            "secret_file": str(secret),
            "events": ["run_finished"],
            "backoff": "1h",
            "backoff_max": "1h",
        },
    }
    write_config(config, settings)

    daemon = Daemon(config, tmp_path)
    try:
        wait_until(lambda: daemon.saw("READY=1"), 120, "READY=1")
        wait_until(lambda: on_version(f, names, v2), 300, "every container on v2")
        wait_until(
            lambda: any(e["event"] == "run_finished" for e in daemon.events()), 300, "run end"
        )
        [finished] = [e for e in daemon.events() if e["event"] == "run_finished"]
        wait_until(lambda: box.messages, 120, "the summary mail")
        [mail] = box.messages
        assert mail["Subject"] == "patchd: web completed: 2 patched"
        assert f"run {finished['run_id']} completed in" in mail.get_content()
        # The webhook's receiver is down: its first attempt failed, the next is in 1h.
        wait_until(
            lambda: (
                'patchd_notifications_total{channel="hook",result="retried"} 1.0' in scrape(port)
            ),
            120,
            "a retried webhook",
        )
        assert 'patchd_notifications_total{channel="mail",result="sent"} 1.0' in scrape(port)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=30) == 0
    finally:
        daemon.close()

    store = SqliteStore(tmp_path / "state" / "patchd.db", readonly=True)
    [queued] = store.due_notifications()
    store.close()
    assert (queued.channel, queued.attempts) == ("hook", 1)
    assert "did not answer" in (queued.error or "")

    receiver.start()
    (tmp_path / "again").mkdir()
    again = Daemon(config, tmp_path / "again")
    try:
        # A starting daemon tries at once what a stopped one left queued (its backoff
        # of 1h belonged to the old process; the receiver may be back, as here).
        wait_until(
            lambda: any(d["data"]["run_id"] == finished["run_id"] for d, _ in receiver.received),
            120,
            "the queued summary after the restart",
        )
        assert receiver.refused == []
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=30) == 0
    finally:
        again.close()
        receiver.stop()
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
