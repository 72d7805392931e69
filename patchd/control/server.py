"""The control socket: a Unix socket the daemon serves the control protocol on.

The socket file is mode 0660, owned by the daemon's user and `daemon.control_group`, so
only root and that group's members can connect at all. Each request's peer credentials
(SO_PEERCRED: uid, pid) are checked again: root, the daemon's own user and members of the
group are served, anyone else gets 403 and nothing changes. Every request, served or
refused, is logged and written to the journal's audit trail with who asked what.

One thread sleeps in select() until a client connects or the server shuts down (no
polling loop); each connection is served in a thread of its own.

One socket path, one daemon: the server holds an exclusive flock on `PATH.lock` for as
long as it serves. Two daemons started at the same instant both find no daemon answering
on the path; without the lock the second would unlink the first's socket and bind its
own, and the first would remove the second's file when it stops.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import Any

from patchd import log
from patchd.control.protocol import ProtocolError, Verb, encode, parse_body, route
from patchd.runner import hand_over
from patchd.serving import SelectServing

MAX_BODY = 64 * 1024


class SocketBusy(OSError):
    """Another live process serves (or is binding) this control socket path."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (SO_PEERCRED)."""

    uid: int
    pid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(uid, pid, gid)


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def may_steer(peer: Peer, group: str, own_uid: int) -> tuple[bool, str]:
    """Whether this peer may use the control socket, and why (or why not)."""
    if peer.uid == 0:
        return True, "root"
    if peer.uid == own_uid:
        return True, "patchd's own user"
    gid = group_id(group)
    if gid is None:
        return False, f"group {group!r} does not exist, so only root may steer patchd"
    member = peer.gid == gid
    if not member:
        try:
            entry = pwd.getpwuid(peer.uid)
            member = gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
        except KeyError:
            member = False
    if member:
        return True, f"member of group {group!r}"
    return False, f"{peer.user} is not root nor a member of group {group!r}"


# The daemon's side: verb, body, peer -> (HTTP status, reply); see control.actions.
Dispatch = Callable[[Verb, dict[str, Any], Peer], tuple[int, dict[str, Any]]]
# Told of every request: (peer, verb name or path, body, allowed, reason).
Audit = Callable[[Peer, str, dict[str, Any], bool, str], None]


class _Handler(BaseHTTPRequestHandler):
    server: ControlServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are logged by the audit, with who asked."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        srv = self.server
        peer = peer_of(self.request)
        body: dict[str, Any] = {}
        try:
            verb = route(method, self.path)
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_BODY:
                self.close_connection = True
                raise ProtocolError(400, f"the body is over {MAX_BODY} bytes")
            # Read before any answer, even a refusal: closing a socket with unread bytes
            # resets the connection, and the client then sees a broken pipe, not the 403.
            raw = self.rfile.read(size) if size else b""
            allowed, why = may_steer(peer, srv.group, srv.own_uid)
            if not allowed:  # the body is read but never parsed nor acted on
                srv.audit(peer, verb.name, {}, False, why)
                self.close_connection = True
                raise ProtocolError(403, f"refused: {why}")
            body = parse_body(verb, raw)
            srv.audit(peer, verb.name, body, True, why)
            status, reply = srv.dispatch(verb, body, peer)
        except ProtocolError as err:
            status, reply = err.status, {"ok": False, "error": str(err)}
        except Exception as err:  # a bug: answer, keep serving, log it
            srv.log.exception("control_request_failed", path=self.path, error=str(err))
            status, reply = 500, {"ok": False, "error": f"internal error: {err}"}
        data = encode(reply)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ControlServer(SelectServing, ThreadingMixIn, UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, group: str, dispatch: Dispatch, audit: Audit) -> None:
        self.log = log.get("patchd.control")
        self.path = path
        self.group = group
        self.own_uid = os.getuid()
        self.dispatch = dispatch
        self.audit = audit
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(path)
        try:
            if path.exists() or path.is_symlink():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise OSError(f"control socket {path}: a file that is not a socket is there")
                path.unlink()  # left by a patchd that did not stop cleanly (we hold the lock)
            super().__init__(str(path), _Handler)
            os.chmod(path, 0o660)
            self.regroup(group)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def regroup(self, group: str) -> None:
        """Give the socket file to `group` (at start, and when a reload changes it)."""
        self.group = group
        gid = group_id(group)
        if gid is None:
            self.log.warning(
                "control_group_missing",
                group=group,
                socket=str(self.path),
                problem=f"group {group!r} (daemon.control_group) does not exist: only root"
                " and patchd's own user can use the control socket; create the group"
                " (groupadd) or set daemon.control_group",
            )
        else:
            os.chown(self.path, -1, gid)

    def shutdown(self) -> None:
        """Stop serving, close the socket and remove its file."""
        super().shutdown()
        with suppress(OSError):
            self.path.unlink()
        with suppress(OSError):
            os.close(self._lock_fd)  # the lock file stays: removing it would race a new holder


def _lock(path: Path) -> int:
    """Hold `PATH.lock` exclusively (SocketBusy if another process does). The file stays;
    one root creates is given to the directory's owner, as the journal's are (a daemon
    run as root once must not leave a lock the service user cannot open)."""
    lock_path = path.with_name(path.name + ".lock")
    new = not lock_path.exists()
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if new:
        hand_over(lock_path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketBusy(f"control socket {path}: another process holds {lock_path}") from None
    return fd


def serve_control(path: Path, group: str, dispatch: Dispatch, audit: Audit) -> ControlServer:
    server = ControlServer(path, group, dispatch, audit)
    server.serve_in_thread("control")
    return server
