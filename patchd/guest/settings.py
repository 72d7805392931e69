"""The SSH keys of a config table (`[backends.NAME.ssh]` of the `ssh` backend, and
`[backends.NAME.guest]` of a vSphere backend for VMs patched with apt): validation
only, nothing is read or connected here, so `patchd check-config` checks them anywhere."""

from __future__ import annotations

import string
from datetime import timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from patchd.config.secret_files import SecretFile
from patchd.config.types import STRICT, CredentialName, Duration


class SshModel(BaseModel):
    """How patchd logs in to a machine. Key authentication only; the private key is a
    file only patchd may read (`identity_file`) or a systemd credential
    (`identity_credential`, read from $CREDENTIALS_DIRECTORY), never in the config."""

    model_config = STRICT

    user: Annotated[str, Field(min_length=1)] = "root"
    port: Annotated[int, Field(ge=1, le=65535)] = 22
    identity_file: SecretFile | None = None
    identity_credential: CredentialName | None = None
    # Run privileged commands through `sudo -n` (the user needs a NOPASSWD rule for
    # apt-get, dpkg, systemctl; a missing right is an error naming the command).
    sudo: bool = False
    # Host keys are checked against this file (OpenSSH format, hashed names allowed): an
    # unknown or changed key is refused with its fingerprint.
    known_hosts: Path = Path("/var/lib/patchd/known_hosts")
    # Accept and record the key of a machine not in known_hosts yet (a changed key is
    # still refused). Off by default: it trusts whatever answers first.
    trust_on_first_use: bool = False
    connect_timeout: Duration = timedelta(seconds=30)
    # The longest one command may run (an install of many packages included).
    command_timeout: Duration = timedelta(minutes=30)

    @model_validator(mode="after")
    def _one_identity(self) -> SshModel:
        if (self.identity_file is None) == (self.identity_credential is None):
            raise ValueError(
                "give exactly one of identity_file or identity_credential (a systemd"
                " credential name) for the private key"
            )
        return self


_ADDRESS_FIELDS = ("name", "hostname")


class GuestModel(BaseModel):
    """`[backends.NAME.guest]` of a vSphere backend: how patchd reaches a VM's operating
    system over SSH, for groups with `patch.method = "apt"`."""

    model_config = STRICT

    ssh: SshModel
    # The SSH address of a VM. Unset: the guest IP VMware Tools reports. Else a template:
    # "{name}" is the VM's inventory name, "{hostname}" the guest host name from Tools
    # (e.g. "{name}.servers.example.net").
    address: Annotated[str, Field(min_length=1)] | None = None
    # How long an install waits for another apt or dpkg to release the lock.
    lock_timeout: Duration = timedelta(minutes=5)
    # Longest wait for a guest to go down and come back with a new boot id.
    reboot_timeout: Duration = timedelta(minutes=15)
    # Where the package sets seen by a check are kept, so that staged promotion's pins
    # resolve after a restart (a JSON file; in memory only when unset).
    ledger: Path | None = None

    @model_validator(mode="after")
    def _template(self) -> GuestModel:
        if self.address is None:
            return self
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.address) if f is not None]
        except ValueError as err:
            raise ValueError(f"address: {err} in {self.address!r}") from None
        unknown = [f for f in fields if f not in _ADDRESS_FIELDS]
        if unknown:
            raise ValueError(
                f"address: unknown placeholder {{{unknown[0]}}} in {self.address!r}"
                " (use {name} or {hostname})"
            )
        return self

    def resolve(self, name: str, hostname: str, ip: str) -> str:
        """The SSH address of a VM from what vCenter says of it ('' when unknown)."""
        if self.address is None:
            return ip
        if "{hostname}" in self.address and not hostname:
            return ""
        return self.address.format(name=name, hostname=hostname)
