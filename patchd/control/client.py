"""The `patchd` command's side of the control socket: one request, one JSON reply."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from patchd.control.protocol import VERBS, encode

TIMEOUT = 30.0


class NoDaemon(Exception):
    """No daemon answers on the control socket (the message says why)."""


class ControlError(Exception):
    """The daemon answered with an error; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("patchd", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def request(path: Path, verb: str, body: dict[str, Any] | None = None,
            timeout: float = TIMEOUT) -> dict[str, Any]:  # fmt: skip
    """Send one verb's request; its reply, or NoDaemon / ControlError."""
    spec = VERBS[verb]
    conn = _UnixConnection(path, timeout)
    try:
        try:
            conn.connect()
        except FileNotFoundError:
            raise NoDaemon(f"no patchd daemon is running (no control socket at {path})") from None
        except ConnectionRefusedError:
            raise NoDaemon(
                f"no patchd daemon is running (nothing listens on {path}; a stale socket)"
            ) from None
        except PermissionError:
            raise ControlError(
                403,
                f"permission denied on {path}: only root and members of the socket's group"
                " (daemon.control_group) may steer patchd",
            ) from None
        except OSError as err:
            raise NoDaemon(f"cannot reach the patchd daemon at {path}: {err}") from None
        data = encode(body or {}) if spec.method == "POST" else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(spec.method, spec.path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as err:
        raise NoDaemon(f"the patchd daemon at {path} did not answer: {err}") from None
    finally:
        conn.close()
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ControlError(response.status, f"not a patchd reply: {raw[:200]!r}") from None
    if response.status != 200 or not reply.get("ok"):
        raise ControlError(response.status, str(reply.get("error", f"HTTP {response.status}")))
    return dict(reply)


def daemon_running(path: Path) -> bool:
    """Whether a daemon answers on the socket (a quick status request)."""
    try:
        request(path, "status", timeout=5.0)
    except NoDaemon:
        return False
    except ControlError:
        return True  # it answered, even if not to us
    return True
