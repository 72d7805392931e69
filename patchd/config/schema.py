"""The shape of each config section as pydantic models: types, defaults, unknown keys.

These models check one table at a time. Rules that span tables (references between
sections, cycles in `after`) live in `patchd.config.settings`.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator

from patchd.config.secret_files import SecretFile
from patchd.config.types import (
    STRICT,
    CredentialName,
    Duration,
    Limit,
    LimitValue,
    Moment,
    TimeOfDay,
    Zone,
)

DEFAULT_METRICS_PORT = 9863


class DaemonModel(BaseModel):
    model_config = STRICT

    state_dir: Path = Path("/var/lib/patchd")
    metrics_address: str = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    timezone: Zone = ZoneInfo("UTC")
    # The operators' Unix socket (patchd pause/resume/approve/trigger/status/quarantine).
    control_socket: Path = Path("/run/patchd/control.sock")
    control_group: str = "patchd"

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        split_address(value)
        return value


def split_address(value: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT"; ValueError says what is wrong."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f'expected "HOST:PORT" like "127.0.0.1:9863", got {value!r}')
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, port


class StateModel(BaseModel):
    """`[state]`: where the journal lives. Without `url`, SQLite in daemon.state_dir; with
    it, a PostgreSQL database several daemons share (see `[ha]`)."""

    model_config = STRICT

    # postgresql://USER@HOST[:PORT]/DB[?sslmode=verify-full&sslrootcert=...]: libpq's
    # options (TLS included) pass through. Never a password: password_file or credential.
    url: str | None = None
    password_file: SecretFile | None = None
    credential: CredentialName | None = None  # a systemd credential (LoadCredential=) name
    # How long a write or read waits for a database that does not answer before failing.
    outage_wait: Duration = timedelta(seconds=30)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("postgresql", "postgres"):
            raise ValueError('expected a URL like "postgresql://patchd@db.example/patchd"')
        userinfo = rest.split("/", 1)[0].rpartition("@")[0]
        if ":" in userinfo or "password=" in rest:
            # Not echoed: it holds a password.
            raise ValueError(
                "the URL holds a password: put it in password_file or a systemd credential"
            )
        return value

    @model_validator(mode="after")
    def _combinations(self) -> StateModel:
        if self.password_file is not None and self.credential is not None:
            raise ValueError("give password_file or credential, not both")
        if self.url is None and (self.password_file is not None or self.credential is not None):
            raise ValueError("password_file and credential are for a PostgreSQL url")
        return self


class HaModel(BaseModel):
    """`[ha]`: leadership among daemons sharing a PostgreSQL `[state] url`."""

    model_config = STRICT

    # On by default with a PostgreSQL url: one leader acts, the others stand by.
    enabled: bool = True
    # This daemon's name in the lease and in `patchd status` (default: the host name).
    node: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    # A dead or paused leader is replaced within this long (the lease lasts 60 % of it).
    takeover: Duration = timedelta(seconds=15)

    @field_validator("takeover")
    @classmethod
    def _takeover(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=3):
            raise ValueError("must be at least 3s")
        return value


class WindowModel(BaseModel):
    """One of three forms: `days` (weekly), `monthly` (ordinal weekday) or `cron`."""

    model_config = STRICT

    days: list[str] | None = None
    monthly: str | None = None
    cron: str | None = None
    start: TimeOfDay | None = None
    offset_days: Annotated[int, Field(ge=-31, le=31)] | None = None
    duration: Duration
    timezone: Zone | None = None
    cutoff: Duration = timedelta(0)


class FreezeModel(BaseModel):
    model_config = STRICT

    start: Moment
    end: Moment
    reason: str = ""


class SnapshotModel(BaseModel):
    model_config = STRICT

    keep: Duration = timedelta(0)
    memory: bool = False
    quiesce: bool = False


class HttpCheckModel(BaseModel):
    model_config = STRICT

    url: HttpUrl
    status: Annotated[int, Field(ge=100, le=599)] = 200
    timeout: Duration = timedelta(seconds=10)


class TcpCheckModel(BaseModel):
    model_config = STRICT

    port: Annotated[int, Field(ge=1, le=65535)]
    # Default: the target's address as the backend reports it (a VM's guest IP).
    host: str | None = None
    timeout: Duration = timedelta(seconds=5)


class PrometheusCheckModel(BaseModel):
    """The alert gate: a PromQL query whose non-empty answer means "do not patch now"."""

    model_config = STRICT

    # Prometheus's base URL; patchd asks {url}/api/v1/query.
    url: HttpUrl
    # An instant query; any series in its answer shuts the gate (e.g. ALERTS{alertstate="firing"}).
    query: Annotated[str, Field(min_length=1)]
    # Timeout of one query.
    timeout: Duration = timedelta(seconds=10)
    # After a target is patched, the query must stay empty this long (at most until
    # health.timeout runs out); "0s" asks once.
    observe: Duration = timedelta(minutes=1)
    # Time between queries while observing, and between re-checks of a shut gate.
    interval: Duration = timedelta(seconds=15)

    @field_validator("interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value


class HealthModel(BaseModel):
    model_config = STRICT

    timeout: Duration = timedelta(minutes=5)
    stable_for: Duration = timedelta(seconds=30)
    command: Annotated[list[str], Field(min_length=1)] | None = None
    http: HttpCheckModel | None = None
    tcp: TcpCheckModel | None = None
    prometheus: PrometheusCheckModel | None = None


PATCH_METHODS = ("apt", "dnf", "command")


class PatchModel(BaseModel):
    """How a backend without images (vSphere, ssh) patches a target."""

    model_config = STRICT

    # "command": run patch.command (the site's script); "apt": patchd installs the
    # pending package set itself over SSH (vSphere VMs with a [backends.NAME.guest]
    # table; the ssh backend always does); "dnf": the same with dnf, ssh backends only.
    # Which backend allows which method is checked with the group (patchd.config.settings).
    method: Literal["apt", "dnf", "command"] = "command"
    # argv run on the patchd host, no shell; placeholders {name} {moid} {uuid} {ip}
    # {hostname} are filled per target.
    command: Annotated[list[str], Field(min_length=1)] | None = None
    timeout: Duration = timedelta(hours=1)
    reboot: bool = False
    # The patch level this group installs; a target that has recorded another level
    # (or none) has an update available.
    version: str | None = None

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: object) -> object:
        if value == "yum":
            raise ValueError("'yum' is not a method: use \"dnf\" (dnf 4 replaced yum)")
        if isinstance(value, str) and value not in PATCH_METHODS:
            raise ValueError(f"unknown method {value!r} (use {' or '.join(PATCH_METHODS)})")
        return value


class GroupModel(BaseModel):
    model_config = STRICT

    backend: str
    window: str
    select: dict[str, object] = Field(default_factory=dict)
    after: str | None = None
    soak: Duration = timedelta(0)
    max_concurrency: LimitValue = Limit(count=1)
    max_errors: LimitValue = Limit(count=1)
    snapshot: SnapshotModel = SnapshotModel()
    health: HealthModel = HealthModel()
    patch: PatchModel = PatchModel()
    # "manual": the stage gate also waits for `patchd approve GROUP` (only with after).
    approval: Literal["auto", "manual"] = "auto"
    # A [baselines.NAME] table: which pending packages the group installs (ssh backends,
    # vSphere VMs with patch.method "apt").
    baseline: str | None = None


SECTIONS = (
    "daemon", "windows", "freezes", "backends", "baselines", "groups", "state", "ha",
    "notifications",
)  # fmt: skip
