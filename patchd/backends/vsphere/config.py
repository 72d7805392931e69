"""The `[backends.NAME]` keys of `type = "vsphere"` and a vSphere group's `select` table.

Owns validation only: nothing here reads a file's content or talks to vCenter, so
`patchd check-config` checks these tables anywhere.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, FilePath, field_validator, model_validator

from patchd.config.baselines import PACKAGE_METHODS
from patchd.config.secret_files import SecretFile
from patchd.config.types import STRICT, CredentialName, Duration
from patchd.guest.settings import GuestModel

_HEX = re.compile(r"[0-9a-f]+")
SELECTORS = ("datacenter", "cluster", "folder", "names", "custom_attribute", "tags")


def normalize_thumbprint(value: str) -> str:
    """`AA:BB:...` or `aabb...` -> lower-case hex; ValueError unless SHA-1 or SHA-256 sized."""
    digits = value.replace(":", "").strip().lower()
    if not _HEX.fullmatch(digits) or len(digits) not in (40, 64):
        raise ValueError(
            "expected the certificate's SHA-1 (40 hex digits) or SHA-256 (64 hex digits)"
            ' fingerprint, colons allowed, like "AB:CD:..."'
        )
    return digits


class VSphereConfig(BaseModel):
    """`[backends.NAME]` keys for `type = "vsphere"` (a vCenter, or an ESXi host directly)."""

    model_config = STRICT

    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    # "http" exists for API simulators only: it sends the password in clear text.
    protocol: Literal["https", "http"] = "https"
    username: Annotated[str, Field(min_length=1)]
    # The password: a file holding only it, or a systemd credential (LoadCredential=)
    # read from $CREDENTIALS_DIRECTORY/<credential>. Never written in the config itself.
    # A password_file every user can read is refused, one a shared group can read is
    # warned about (patchd.config.secret_files).
    password_file: SecretFile | None = None
    credential: CredentialName | None = None
    # TLS: verified against the system's CAs by default; or against `ca_file` only; or
    # pinned to one certificate by `thumbprint`; or not at all with `insecure = true`.
    ca_file: FilePath | None = None
    thumbprint: str | None = None
    insecure: bool = False
    # Socket timeout of each API request (SOAP and REST).
    timeout: Duration = timedelta(seconds=60)
    # Longest wait for a vCenter task: snapshot create/revert/remove, power operations.
    task_timeout: Duration = timedelta(minutes=30)
    # Longest wait for a host to enter maintenance mode (DRS evacuates it meanwhile).
    maintenance_timeout: Duration = timedelta(hours=1)
    # With patch.reboot: longest wait for a guest or host to go down and come back.
    reboot_timeout: Duration = timedelta(minutes=30)
    # After a revert: longest wait for VMware Tools to report the VM healthy again.
    rollback_timeout: Duration = timedelta(minutes=10)
    # Transient faults (connection lost, host busy) are retried this often, with
    # exponential backoff starting at retry_backoff.
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    retry_backoff: Duration = timedelta(seconds=1)
    # How patchd logs in to the VMs' operating systems (SSH) for groups with
    # patch.method = "apt" or "dnf"; not needed for "command".
    guest: GuestModel | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if "://" in value or "/" in value:
            raise ValueError(
                f"expected a host name or address without scheme or path, got {value!r}"
            )
        return value

    @field_validator("thumbprint")
    @classmethod
    def _thumbprint(cls, value: str | None) -> str | None:
        return None if value is None else normalize_thumbprint(value)

    @model_validator(mode="after")
    def _combinations(self) -> VSphereConfig:
        if (self.password_file is None) == (self.credential is None):
            raise ValueError(
                "give exactly one of password_file or credential (a systemd credential name);"
                " the password itself is never written in the config"
            )
        if self.ca_file is not None and self.thumbprint is not None:
            raise ValueError("give ca_file or thumbprint, not both")
        if self.insecure and (self.ca_file is not None or self.thumbprint is not None):
            raise ValueError(
                "insecure = true turns certificate checks off: drop ca_file/thumbprint"
            )
        if self.protocol == "http" and not self.insecure:
            raise ValueError(
                'protocol = "http" sends the password unencrypted (simulators only):'
                " it needs insecure = true"
            )
        if self.protocol == "http" and (self.ca_file is not None or self.thumbprint is not None):
            raise ValueError('ca_file and thumbprint need protocol = "https"')
        return self

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class VSphereSelect(BaseModel):
    """A vSphere group's `select`: every selector given must match.

    kind: "vm" (default) or "host" (ESXi hosts, patched rolling per cluster).
    datacenter, cluster: names. folder: an inventory path such as "/DC0/vm/prod" (the
    target is in it or below it). names: globs on the inventory name (any may match).
    custom_attribute: name = value pairs (all must match). tags: vSphere tags, each
    "category:tag" or "tag" (all must be attached). Templates are never selected.
    """

    model_config = STRICT

    kind: Literal["vm", "host"] = "vm"
    datacenter: Annotated[str, Field(min_length=1)] | None = None
    cluster: Annotated[str, Field(min_length=1)] | None = None
    folder: str | None = None
    names: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    custom_attribute: dict[str, str] = Field(default_factory=dict)
    tags: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    @field_validator("folder")
    @classmethod
    def _folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/") or value.strip("/") == "":
            raise ValueError(
                f'expected an inventory path from the root like "/DC0/vm/prod", got {value!r}'
            )
        return "/" + value.strip("/")

    @field_validator("tags")
    @classmethod
    def _tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            category, sep, name = tag.partition(":")
            if sep and (not category or not name):
                raise ValueError(f'expected "category:tag" or "tag", got {tag!r}')
        return value

    @model_validator(mode="after")
    def _something(self) -> VSphereSelect:
        if not any(getattr(self, key) for key in SELECTORS):
            raise ValueError(
                f"give at least one of {', '.join(SELECTORS)}: an empty select would patch"
                f" every {'VM' if self.kind == 'vm' else 'host'} of the vCenter"
            )
        return self


def check_group(
    backend: str, config: VSphereConfig, select: VSphereSelect, patch: Any
) -> list[tuple[tuple[str, ...], str]]:
    """A vSphere group's patch table against its backend (see patchd.plugins)."""
    if patch.method not in PACKAGE_METHODS:
        return []
    problems: list[tuple[tuple[str, ...], str]] = []
    if select.kind == "host":
        problems.append((("patch", "method"), 'ESXi hosts are patched with method "command" only'))
    elif config.guest is None:
        problems.append(
            (
                ("patch", "method"),
                f'"{patch.method}" logs in to the VMs over SSH: backend {backend!r} needs a'
                f" [backends.{backend}.guest] table with its ssh keys",
            )
        )
    if patch.command is not None:
        problems.append(
            (
                ("patch", "command"),
                f'not used with method = "{patch.method}": patchd installs the packages',
            )
        )
    return problems
