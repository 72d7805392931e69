"""systemd's sd_notify protocol: READY, RELOADING, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC
and STOPPING messages.

Without NOTIFY_SOCKET (not run by systemd with Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        path = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        # How long READY, RELOADING and STOPPING wait for room in a full socket queue.
        self.announce_wait = 1.0
        if path:
            # A leading "@" names a socket in the abstract namespace.
            self.address = "\0" + path[1:] if path.startswith("@") else path

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str, wait: float = 0.0) -> bool:
        """Send one datagram; False (never an exception) if it cannot go within `wait`.

        By default it never waits: a reader that does not keep up must not stall a patch
        run, and a dropped STATUS or WATCHDOG is replaced by the next one. The state
        changes READY, RELOADING and STOPPING are replaced by nothing, so they wait up to
        `announce_wait` for room (a datagram socket queues only a few, 10 by default).
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(max(wait, 0.0))  # 0: non-blocking
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        lines = ("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        return self.send(*lines, wait=self.announce_wait)

    def reloading(self) -> bool:
        return self.send("RELOADING=1", wait=self.announce_wait)

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, by: timedelta) -> bool:
        """Ask systemd for `by` more time to start (or stop), counted from now."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(by.total_seconds() * 1_000_000)}")

    @contextmanager
    def extending(self, by: timedelta = timedelta(seconds=60)) -> Iterator[None]:
        """Keep extending the start timeout by `by` (every third of it) while the block
        runs: a long start-up reconcile is progress, not a hang, so the unit keeps a
        normal TimeoutStartSec and a hung start still fails."""
        if not self.enabled:
            yield
            return
        done = threading.Event()

        def extend() -> None:
            while True:
                self.extend_timeout(by)
                if done.wait(by.total_seconds() / 3):
                    return

        thread = threading.Thread(target=extend, name="extend-timeout", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}", wait=self.announce_wait)


def watchdog_interval() -> timedelta | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return timedelta(microseconds=int(usec) / 2)
