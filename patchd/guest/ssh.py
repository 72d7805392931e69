"""One SSH session to one machine: host-key checks, key login, argv commands, timeouts.

Why paramiko and not asyncssh: patchd's engine is threaded and every backend call is a
blocking call made from a worker thread (one per target being patched); paramiko's API is
blocking and thread-safe per connection, so a step is a plain function call with a
timeout. asyncssh would need an event loop in a thread of its own and a bridge
(run_coroutine_threadsafe) for every command, to gain concurrency patchd already has.
paramiko is the older and more widely deployed of the two (Ansible's fallback transport,
Fabric), reads OpenSSH known_hosts files (hashed names, `[host]:port`) and lets a policy
object decide about unknown keys, which is all strict checking and trust-on-first-use
need. Both pull in `cryptography`; paramiko is imported here only when a session opens,
so a daemon that patches no machine never loads it (idle budget 60 MB RSS).

Rules kept here:
- Host keys: checked against `known_hosts`. An unknown key is refused, with its SHA256
  fingerprint, unless `trust_on_first_use` (then it is appended to the file); a changed key
  is always refused with both fingerprints.
- Commands are argv lists joined with shlex.join: no shell string is ever built from
  target data. `sudo -n --` is put in front when the session is privileged, so sudo never
  waits for a password; a refusal is `SudoDenied` naming the command.
- Output quoted in errors is scrubbed of registered secrets (patchd.log.scrub) and cut to
  its tail.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchd import acting
from patchd.guest.errors import AuthFailed, CommandFailed, HostKeyRejected, SudoDenied, Unreachable
from patchd.guest.settings import SshModel

_OUTPUT_TAIL = 800
_POLL = 0.05
_known_hosts_lock = threading.Lock()  # trust-on-first-use appends from several threads
_SUDO_REFUSALS = ("password is required", "not in the sudoers", "is not allowed to execute")
_import_lock = threading.Lock()


def _paramiko() -> Any:
    """paramiko, imported without `invoke`.

    paramiko's ssh_config module imports invoke (and with it unittest.mock, yaml and
    asyncio: about 85 ms, a tenth of `patchd plan` over 12 machines, bench/plan_ssh.py)
    only for `Match exec` lines; patchd reads no ssh_config, and paramiko takes a
    missing invoke as "no Match exec". Blocked for paramiko's first import only."""
    with _import_lock:
        if "paramiko" not in sys.modules and "invoke" not in sys.modules:
            sys.modules["invoke"] = None  # type: ignore[assignment]  # import -> ImportError
            try:
                import paramiko
            finally:
                if sys.modules.get("invoke", False) is None:
                    del sys.modules["invoke"]
        import paramiko
    return paramiko


@dataclass(frozen=True)
class Result:
    """What a command did: exit status and its output, decoded."""

    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str


def fingerprint(key: Any) -> str:
    """A public key's fingerprint as OpenSSH prints it: `SHA256:<base64, no padding>`."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _tail(text: str) -> str:
    from patchd import log

    text = log.scrub(text.strip())
    return text if len(text) <= _OUTPUT_TAIL else "..." + text[-_OUTPUT_TAIL:]


class Session:
    """A connection to `host` for the machine called `name` (used in every message)."""

    def __init__(self, name: str, host: str, settings: SshModel) -> None:
        self.name = name
        self.host = host
        self.settings = settings
        self._client: Any = None

    # --- connecting ------------------------------------------------------------------
    def key_path(self) -> Path:
        settings = self.settings
        if settings.identity_file is not None:
            return Path(settings.identity_file)
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise AuthFailed(
                f"{self.name}: credential {settings.identity_credential!r}:"
                " $CREDENTIALS_DIRECTORY is not set (run patchd under systemd with"
                " LoadCredential=)"
            )
        return Path(directory) / str(settings.identity_credential)

    def check_key(self) -> None:
        """The key file is readable and holds a private key. Read without paramiko, which
        costs about 30 MB: a daemon loads it at its first connection, not at start."""
        path = self.key_path()
        try:
            with path.open("rb") as key:
                first = key.readline(200)
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise AuthFailed(f"{self.name}: cannot read the SSH key {path}: {reason}") from None
        if not (first.startswith(b"-----BEGIN ") and b"PRIVATE KEY-----" in first):
            raise AuthFailed(
                f"{self.name}: the SSH key {path} is not a private key (its first line is"
                " not -----BEGIN ... PRIVATE KEY-----)"
            )

    def _private_key(self) -> Any:
        paramiko = _paramiko()

        path = self.key_path()
        try:
            return paramiko.PKey.from_path(path)
        except (OSError, paramiko.SSHException, ValueError) as err:
            # The exception text never holds key material, only what is wrong with it.
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise AuthFailed(f"{self.name}: cannot load the SSH key {path}: {reason}") from None

    def _policy(self) -> Any:
        paramiko = _paramiko()

        session = self

        class Policy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc,name-defined]
            def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
                session._unknown_key(hostname, key)

        return Policy()

    def _unknown_key(self, hostname: str, key: Any) -> None:
        known = self.settings.known_hosts
        where = f"{self.name} ({hostname})"
        if not self.settings.trust_on_first_use:
            raise HostKeyRejected(
                f"{where}: unknown host key {key.get_name()} {fingerprint(key)}, not in"
                f" {known}; check it and add it there (or set trust_on_first_use = true)"
            )
        with _known_hosts_lock:
            known.parent.mkdir(parents=True, exist_ok=True)
            with known.open("a", encoding="utf-8") as out:
                out.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        from patchd import log

        log.get().warning(
            "ssh host key trusted on first use",
            target=self.name,
            host=hostname,
            key=f"{key.get_name()} {fingerprint(key)}",
            known_hosts=str(known),
        )

    def open(self) -> Session:
        """Connect and log in; raises Unreachable, HostKeyRejected or AuthFailed."""
        if self.active():
            return self
        paramiko = _paramiko()

        settings = self.settings
        client = paramiko.SSHClient()
        if settings.known_hosts.exists():
            try:
                # "system" host keys: paramiko never rewrites this file itself.
                client.load_system_host_keys(str(settings.known_hosts))
            except (OSError, paramiko.SSHException) as err:
                raise HostKeyRejected(
                    f"{self.name}: cannot read known_hosts {settings.known_hosts}: {err}"
                ) from None
        client.set_missing_host_key_policy(self._policy())
        timeout = settings.connect_timeout.total_seconds()
        address = f"{self.host}:{settings.port}"
        try:
            client.connect(
                self.host,
                port=settings.port,
                username=settings.user,
                pkey=self._private_key(),
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except paramiko.BadHostKeyException as err:
            client.close()
            raise HostKeyRejected(
                f"{self.name} ({address}): host key CHANGED: it offers"
                f" {err.key.get_name()} {fingerprint(err.key)}, known_hosts"
                f" {settings.known_hosts} has {fingerprint(err.expected_key)}; refusing"
                " (if the machine was rebuilt, replace its line there)"
            ) from None
        except (HostKeyRejected, AuthFailed):
            client.close()
            raise
        except paramiko.AuthenticationException as err:
            client.close()
            raise AuthFailed(
                f"{self.name} ({address}): user {settings.user!r} was refused: {err}"
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as err:
            client.close()
            reason = str(err) or type(err).__name__
            raise Unreachable(f"{self.name} ({address}): cannot connect: {reason}") from None
        self._client = client
        return self

    def active(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return bool(transport is not None and transport.is_active())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands --------------------------------------------------------------------
    def command_line(
        self, argv: Sequence[str], *, sudo: bool = False, env: Mapping[str, str] | None = None
    ) -> str:
        """The exact line sent to the machine: argv quoted word by word."""
        words = [f"{k}={v}" for k, v in (env or {}).items()]
        words = ["env", *words, *argv] if words else list(argv)
        if sudo and self.settings.sudo:
            words = ["sudo", "-n", "--", *words]
        return shlex.join(words)

    def run(
        self,
        argv: Sequence[str],
        *,
        sudo: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> Result:
        """Run `argv`; `sudo=True` marks a privileged command (sudo -n when configured).

        Raises Unreachable when no session can be opened (nothing ran), CommandFailed when
        it ran past `timeout` or the connection dropped (outcome unknown), and with
        `check` when it exited non-zero.
        """
        acting.check(shlex.join(argv))  # not by a leader that lost its lease
        self.open()
        line = self.command_line(argv, sudo=sudo, env=env)
        limit = timeout if timeout is not None else self.settings.command_timeout.total_seconds()
        shown = shlex.join(argv)
        try:
            transport = self._client.get_transport()
            channel = transport.open_session(timeout=self.settings.connect_timeout.total_seconds())
        except Exception as err:  # paramiko raises SSHException, EOFError, socket errors
            self.close()
            raise Unreachable(f"{self.name}: cannot open a session: {err}") from None
        out, err_out = bytearray(), bytearray()
        deadline = time.monotonic() + limit
        try:
            channel.exec_command(line)
            channel.shutdown_write()
            while True:
                busy = False
                if channel.recv_ready():
                    out += channel.recv(65536)
                    busy = True
                if channel.recv_stderr_ready():
                    err_out += channel.recv_stderr(65536)
                    busy = True
                if busy:
                    continue
                if channel.exit_status_ready():
                    # Output that arrived between the checks above and the exit status
                    # is buffered already (the server sends it first): take it all.
                    while channel.recv_ready():
                        out += channel.recv(65536)
                    while channel.recv_stderr_ready():
                        err_out += channel.recv_stderr(65536)
                    break
                if not transport.is_active():
                    raise CommandFailed(f"{self.name}: connection lost while running `{shown}`")
                if time.monotonic() > deadline:
                    raise CommandFailed(f"{self.name}: `{shown}` still running after {limit:g}s")
                channel.status_event.wait(_POLL)
            status = channel.recv_exit_status()
        except (TimeoutError, OSError, EOFError) as err:
            raise CommandFailed(f"{self.name}: `{shown}`: connection lost: {err}") from None
        finally:
            channel.close()
        result = Result(
            tuple(argv),
            status,
            out.decode("utf-8", "replace"),
            err_out.decode("utf-8", "replace"),
        )
        refused = any(refusal in result.stderr for refusal in _SUDO_REFUSALS)
        if status != 0 and sudo and self.settings.sudo and refused:
            raise SudoDenied(
                f"{self.name}: user {self.settings.user!r} may not run `{shown}` with"
                f" `sudo -n` (sudo said: {_tail(result.stderr)}); give it a NOPASSWD"
                " rule for this command"
            )
        if check and status != 0:
            raise CommandFailed(
                f"{self.name}: `{shown}` exited {status}: "
                f"{_tail(result.stderr or result.stdout) or '(no output)'}"
            )
        return result
