"""The Docker backend's config models: `[backends.NAME]` keys for `type = "docker"` and a
group's `select` table for it (kept apart from the backend's steps in docker.py)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import BaseModel, Field, FilePath, field_validator, model_validator

from patchd.config.types import STRICT, Duration

_SCHEMES = ("unix://", "tcp://", "ssh://")


class DockerConfig(BaseModel):
    """`[backends.NAME]` keys for `type = "docker"`."""

    model_config = STRICT

    url: str = "unix:///var/run/docker.sock"
    timeout: Duration = timedelta(seconds=60)
    tls_ca: FilePath | None = None
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    # Replaced by the group's snapshot.keep; only parsed to be refused with that hint.
    rollback_retention: Duration | None = None
    # How long a rollback waits for the restored container to be healthy again, and
    # keeps trying an engine that cannot be reached.
    rollback_timeout: Duration = timedelta(minutes=5)

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(_SCHEMES) or value in _SCHEMES:
            raise ValueError(f"expected a unix://, tcp:// or ssh:// URL, got {value!r}")
        return value

    @field_validator("rollback_retention")
    @classmethod
    def _retention(cls, value: timedelta | None) -> timedelta | None:
        if value is not None:
            raise ValueError("replaced by groups.NAME.snapshot.keep (set per group)")
        return value

    @model_validator(mode="after")
    def _tls(self) -> DockerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        uses_tls = any(p is not None for p in (self.tls_ca, self.tls_cert))
        if uses_tls and not self.url.startswith("tcp://"):
            raise ValueError("TLS files apply only to a tcp:// url")
        return self

    @property
    def tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        return self.tls_ca, self.tls_cert, self.tls_key


class DockerSelect(BaseModel):
    """A group's `select` table for Docker: every label must match, and any name glob."""

    model_config = STRICT

    labels: dict[str, str] = Field(default_factory=dict)
    names: list[str] = Field(default_factory=list)
