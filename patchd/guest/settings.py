"""The SSH keys of a config table (`[backends.NAME.ssh]` of the `ssh` backend): validation
only, nothing is read or connected here, so `patchd check-config` checks them anywhere."""

from __future__ import annotations

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
