"""What a reload may change: the pure review of a new config against the one in force.

A reload (SIGHUP, `systemctl reload`) swaps in a new config only once it is valid, and
then only what a running daemon can change on the fly. This module decides, from the
two Settings alone:

- a new config without a single group, when the old one had some, is refused: that is
  an empty or half-saved file far more often than a wish to stop patching everything
  (to stop, pause the groups or stop the service); the old config stays in force;
- the groups added and removed, for the log;
- the keys that only a restart applies (where the journal lives, the metrics address,
  the shared store and its leadership; the control socket is not one of them: a reload
  moves it): their old values stay
  in force and the review names them, so the daemon can say "restart needed" instead of
  ignoring them in silence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from patchd.config.settings import Settings


@dataclass(frozen=True)
class Review:
    """The outcome of reviewing a new config: refused (with why), or the settings to put
    in force and what changed."""

    settings: Settings  # what to put in force (the old settings when refused)
    refused: str | None = None
    added: tuple[str, ...] = ()  # groups
    removed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()  # key paths whose new value waits for a restart

    @property
    def note(self) -> str | None:
        """A line for the status (`systemctl status`) while a restart is needed."""
        if not self.needs_restart:
            return None
        return f"restart needed to apply {', '.join(self.needs_restart)} (reloaded the rest)"


def review(old: Settings, new: Settings) -> Review:
    """Review `new` against `old`, the config in force."""
    if old.groups and not new.groups:
        files = ", ".join(str(path) for path in new.files) or "no config file"
        return Review(
            old,
            refused=(
                f"the new config ({files}) has no group, and the one in force has"
                f" {', '.join(sorted(old.groups))}: an empty or half-saved file? To stop"
                " patching, pause the groups or stop the service"
            ),
        )
    before, after = old.daemon, new.daemon
    changed = [
        key
        for key, differs in (
            ("daemon.state_dir", before.state_dir != after.state_dir),
            (
                "daemon.metrics_address",
                (before.metrics_host, before.metrics_port)
                != (after.metrics_host, after.metrics_port),
            ),
            ("state", old.state != new.state),
            ("ha", old.ha != new.ha),
        )
        if differs
    ]
    kept = replace(
        after,
        state_dir=before.state_dir,
        metrics_host=before.metrics_host,
        metrics_port=before.metrics_port,
    )
    return Review(
        replace(new, daemon=kept, state=old.state, ha=old.ha),
        added=tuple(sorted(set(new.groups) - set(old.groups))),
        removed=tuple(sorted(set(old.groups) - set(new.groups))),
        needs_restart=tuple(changed),
    )
