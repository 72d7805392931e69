"""systemd's sd_notify protocol: READY, STATUS, WATCHDOG and STOPPING messages.

Without NOTIFY_SOCKET (not run by systemd with Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        path = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if path:
            # A leading "@" names a socket in the abstract namespace.
            self.address = "\0" + path[1:] if path.startswith("@") else path

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; False (never an exception, never a wait) if it cannot go now.

        Non-blocking: a reader that does not keep up must not stall a patch run, and a
        dropped STATUS is replaced by the next one.
        """
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")


def watchdog_interval() -> timedelta | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return timedelta(microseconds=int(usec) / 2)
