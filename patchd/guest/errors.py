"""The errors of guest patching, as the engine's backend errors (so any backend that
drives a guest can raise them as they are): TransientError when nothing was changed and a
retry may work, StepFailed otherwise. Each message names the machine and the cause."""

from __future__ import annotations

from patchd.backends.base import StepFailed, TransientError


class Unreachable(TransientError):
    """No SSH session could be opened (refused, timed out, network down)."""


class HostKeyRejected(StepFailed):
    """The machine's host key is unknown or differs from known_hosts (fingerprint given)."""


class AuthFailed(StepFailed):
    """The machine refused our key, or the key cannot be read."""


class CommandFailed(StepFailed):
    """A command on the machine exited non-zero or ran past its timeout."""


class SudoDenied(CommandFailed):
    """`sudo -n` refused: the user has no password-less right to run the command."""


class PackageManagerError(StepFailed):
    """The package manager cannot go on: lock held too long, held packages, dpkg
    interrupted, a version not in the repositories."""
