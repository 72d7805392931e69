"""One vCenter session per backend: TLS, API version, login, re-login, retries, the password.

Owns:
- the TLS context: the system's CAs by default, only `ca_file`, one certificate pinned by
  `thumbprint` (checked on every new connection, SOAP and REST alike, by `PinnedContext`),
  or no check at all with `insecure = true`, which is logged as a warning on every login;
- the API version, negotiated from `/sdk/vimServiceVersions.xml` through that context
  (pyVim's SmartConnect probes without the pin and without a timeout, so it is not used);
- the password: read from `password_file` or `$CREDENTIALS_DIRECTORY/<credential>` at
  EVERY login (a rotated password is picked up), registered with `patchd.log.redact`, and
  never put into a message (`scrub` removes it from any text that leaves this package);
- `call`: runs one unit of API work, logs in first if needed, logs in again once on
  `NotAuthenticated` (an expired or terminated session), retries transient faults with
  exponential backoff, and raises TransientError once they persist;
- logout on `close`.

Errors: `LoginFailed` (TLS rejected, wrong credentials, unreadable password: retrying does
not help), `TransientError` (cannot reach vCenter, or it keeps failing on its side).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import importlib
import os
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from patchd import acting, log
from patchd.backends.base import BackendError, TransientError
from patchd.backends.vsphere.config import VSphereConfig

T = TypeVar("T")

FALLBACK_VERSION = "vim.version.version9"  # vSphere 5.5: what every vCenter still speaks


class LoginFailed(BackendError):
    """vCenter refused us (TLS or credentials) or the password cannot be read."""


class PinnedContext(ssl.SSLContext):
    """A TLS client context that accepts exactly one certificate, by fingerprint.

    The chain and the host name are not checked (a pinned self-signed certificate is the
    point); the fingerprint is compared on every handshake, so every pooled or new
    connection is checked, not only the first.
    """

    pin: str = ""

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )
        der = wrapped.getpeercert(binary_form=True) or b""
        algorithm = "sha1" if len(self.pin) == 40 else "sha256"
        seen = hashlib.new(algorithm, der).hexdigest()
        if not hmac.compare_digest(seen, self.pin):
            wrapped.close()
            raise ssl.SSLCertVerificationError(
                f"the server's certificate has {algorithm.upper()} fingerprint"
                f" {_colons(seen)}, not the configured thumbprint"
            )
        return wrapped


def _colons(digits: str) -> str:
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).upper()


def ssl_context(config: VSphereConfig) -> ssl.SSLContext | None:
    """The TLS context for `config` (None for plain http)."""
    if config.protocol == "http":
        return None
    if config.thumbprint is not None:
        pinned = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        pinned.pin = config.thumbprint
        return pinned
    if config.insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if config.ca_file is not None:
        return ssl.create_default_context(cafile=str(config.ca_file))
    return ssl.create_default_context()


def fault_text(err: BaseException) -> str:
    """A one-line description of a pyVmomi fault or any other error."""
    _, vmodl = vmomi()
    name = type(err).__name__
    if isinstance(err, vmodl.MethodFault):
        msg = getattr(err, "msg", None) or ""
        return f"{name}: {msg}" if msg else name
    text = str(err)
    return f"{name}: {text}" if text else name


def vmomi() -> tuple[Any, Any]:
    """pyVmomi's `vim` and `vmodl`, imported on first use (so `check-config` does not pay
    for it) and typed Any (pyVmomi's own hints cover little)."""
    module: Any = importlib.import_module("pyVmomi")
    return module.vim, module.vmodl


def is_not_authenticated(err: BaseException) -> bool:
    vim, _ = vmomi()
    return isinstance(err, vim.fault.NotAuthenticated)


def is_transient(err: BaseException, mutating: bool) -> bool:
    """Worth retrying: the server refused before doing anything, or (reads only) the
    connection failed. A mutating call whose connection failed may have been carried out."""
    vim, vmodl = vmomi()
    if isinstance(err, TransientError):
        return True
    rejected = (vmodl.fault.HostCommunication, vim.fault.TaskInProgress)
    if isinstance(err, rejected):
        return True
    if mutating:
        return isinstance(err, ConnectionRefusedError)
    if isinstance(err, ssl.SSLCertVerificationError):
        return False
    return isinstance(err, OSError | http.client.HTTPException)


class Session:
    """The backend's one vCenter session, shared by its threads."""

    def __init__(self, name: str, config: VSphereConfig) -> None:
        self.name = name
        self.config = config
        self.context = ssl_context(config)
        self.log = log.get("patchd.vsphere")
        self.sleep: Callable[[float], None] = time.sleep
        self._lock = threading.RLock()
        self._stub: Any = None
        self._content: Any = None  # the ServiceContent, bound to _stub
        self._logged_in = False
        self._generation = 0
        self._secrets: set[str] = set()
        self.logins = 0

    # --- the password -------------------------------------------------------------------

    def password(self) -> str:
        """Read the password now (at every login, so a rotated one is used)."""
        config = self.config
        if config.password_file is not None:
            path = Path(config.password_file)
        else:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise LoginFailed(
                    f"credential {config.credential!r}: $CREDENTIALS_DIRECTORY is not set"
                    " (run patchd under systemd with LoadCredential= or SetCredential=)"
                )
            path = Path(directory) / str(config.credential)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise LoginFailed(f"cannot read the vCenter password from {path}: {reason}") from None
        secret = text.rstrip("\r\n")
        if not secret:
            raise LoginFailed(f"the vCenter password file {path} is empty")
        log.redact(secret)
        self._secrets.add(secret)
        return secret

    def scrub(self, text: str) -> str:
        """`text` with any password this session has read replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # --- connecting ---------------------------------------------------------------------

    def _http(self) -> http.client.HTTPConnection:
        timeout = self.config.timeout.total_seconds()
        if self.context is None:
            return http.client.HTTPConnection(self.config.host, self.config.port, timeout=timeout)
        return http.client.HTTPSConnection(
            self.config.host, self.config.port, timeout=timeout, context=self.context
        )

    def request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        """One plain HTTP(S) request through this session's TLS rules (REST, version probe)."""
        conn = self._http()
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def tls_failure(self, err: ssl.SSLError) -> LoginFailed:
        where = f"vsphere {self.config.address}"
        if isinstance(err, ssl.SSLCertVerificationError):
            detail = getattr(err, "verify_message", None) or str(err)
            if self.config.thumbprint is not None:
                return LoginFailed(f"{where}: TLS: {detail}")
            hint = "set ca_file to its CA, or pin it with thumbprint"
            return LoginFailed(f"{where}: TLS: certificate not trusted ({detail}); {hint}")
        return LoginFailed(f"{where}: TLS handshake failed: {getattr(err, 'reason', None) or err}")

    def _api_version(self) -> str:
        support: Any = importlib.import_module("pyVmomi.VmomiSupport")

        status, body = self.request("GET", "/sdk/vimServiceVersions.xml", None, {})
        supported: set[str] = set()
        if status == 200:
            try:
                root = ET.fromstring(body)
            except ET.ParseError:
                root = None
            for namespace in [] if root is None else root.findall("namespace"):
                if namespace.findtext("name") == "urn:vim25":
                    supported.add(namespace.findtext("version") or "")
                    supported.update(
                        v.text or "" for v in namespace.findall("priorVersions/version")
                    )
        for version in support.GetServiceVersions("vim25"):
            if support.versionIdMap.get(version) in supported:
                return str(version)
        return FALLBACK_VERSION

    def _login(self) -> Any:
        """Log in (again): returns the ServiceContent. Holds the lock."""
        module: Any = importlib.import_module("pyVmomi")
        vim = module.vim

        config = self.config
        where = f"vsphere {config.address}"
        if self.context is None or config.insecure:
            self.log.warning(
                "vsphere_tls_unverified",
                backend=self.name,
                host=config.address,
                reason=(
                    "plain http: nothing is encrypted"
                    if self.context is None
                    else "insecure = true: the server's certificate is not checked"
                ),
            )
        password = self.password()
        try:
            if self._stub is None or self._content is None:
                self._reset()
                version = self._api_version()
                port = config.port if config.protocol == "https" else -config.port
                self._stub = module.SoapStubAdapter(
                    host=config.host,
                    port=port,
                    version=version,
                    sslContext=self.context,
                    httpConnectionTimeout=config.timeout.total_seconds(),
                    connectionPoolTimeout=60,
                )
                instance = vim.ServiceInstance("ServiceInstance", self._stub)
                self._content = instance.RetrieveContent()
            self._logged_in = False
            self._content.sessionManager.Login(config.username, password, None)
        except ssl.SSLError as err:
            self._reset()
            raise self.tls_failure(err) from None
        except vim.fault.InvalidLogin:
            raise LoginFailed(
                f"{where}: login as {config.username!r} refused (wrong user name or password)"
            ) from None
        except Exception as err:
            if isinstance(err, BackendError):
                raise
            self._reset()
            text = self.scrub(fault_text(err))
            if is_transient(err, mutating=False):
                raise TransientError(f"{where}: cannot reach vCenter: {text}") from None
            raise LoginFailed(f"{where}: login failed: {text}") from None
        self._logged_in = True
        self._generation += 1
        self.logins += 1
        self.log.info("vsphere_login", backend=self.name, host=config.address, user=config.username)
        return self._content

    def _reset(self) -> None:
        stub, self._stub, self._content = self._stub, None, None
        self._logged_in = False
        if stub is not None:
            stub.DropConnections()

    def _current(self) -> tuple[Any, int]:
        with self._lock:
            if not self._logged_in:
                self._login()
            return self._content, self._generation

    def _expired(self, generation: int) -> None:
        """The session of `generation` was rejected: the next call logs in again."""
        with self._lock:
            if self._generation == generation:
                self._login()

    @property
    def stub(self) -> Any:
        """The SOAP stub managed object references are bound to (logging in if needed)."""
        self._current()
        return self._stub

    def call(self, what: str, work: Callable[[Any], T], *, mutating: bool = False) -> T:
        """Run `work(content)`: re-login once on NotAuthenticated, retry transient faults.

        Raises TransientError when the faults persist; other errors pass through. A
        mutating call is not made by a leader that lost its lease (patchd.acting).
        """
        if mutating:
            acting.check(what)
        relogged = False
        attempt = 0
        while True:
            content, generation = self._current()
            try:
                return work(content)
            except Exception as err:
                if is_not_authenticated(err):
                    if relogged:
                        raise TransientError(
                            f"{what}: vCenter rejected a session it had just opened"
                        ) from None
                    relogged = True
                    self.log.info("vsphere_session_expired", backend=self.name, during=what)
                    self._expired(generation)
                    continue
                if not is_transient(err, mutating) or isinstance(err, BackendError):
                    raise
                if attempt >= self.config.retries:
                    text = self.scrub(fault_text(err))
                    raise TransientError(f"{what}: {text}") from None
                delay = self.config.retry_backoff.total_seconds() * 2**attempt
                attempt += 1
                self.log.info(
                    "vsphere_retry",
                    backend=self.name,
                    during=what,
                    attempt=attempt,
                    error=self.scrub(fault_text(err)),
                )
                self.sleep(delay)

    def close(self) -> None:
        """Log out (best effort) and drop the connections."""
        with self._lock:
            if self._logged_in:
                try:
                    self._content.sessionManager.Logout()
                except Exception as err:  # already expired, or vCenter is gone
                    self.log.info("vsphere_logout_failed", backend=self.name, error=fault_text(err))
            self._reset()
