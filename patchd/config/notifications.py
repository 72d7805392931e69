"""The `[notifications.NAME]` tables: where patchd tells people what it did, and which
events each channel hears.

A channel is either a list of apprise URLs (`urls`: mailto, Slack, Teams, ntfy, json://
...) or a plain JSON webhook (`webhook`) signed with HMAC-SHA256 with a secret read from
`secret_file` or a systemd credential. The event names are defined here, as the words an
operator writes in `events`; patchd.notifications builds and delivers the events.
"""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, Field, HttpUrl, field_validator, model_validator

from patchd.config.secret_files import SecretFile
from patchd.config.types import STRICT, CredentialName, Duration

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.I)


class EventKind(StrEnum):
    """What a notification is about (the `events` filter names and the `event` field of
    the webhook's document)."""

    RUN_FINISHED = "run_finished"  # a run ended: its summary
    ROLLBACK = "rollback"  # a target was rolled back
    ROLLBACK_FAILED = "rollback_failed"  # a rollback failed: a person is needed
    HALTED = "halted"  # a run stopped: its error budget was spent
    APPROVAL_NEEDED = "approval_needed"  # a stage waits for `patchd approve`
    QUARANTINED = "quarantined"  # a version failed and is not installed again
    PAUSED = "paused"  # an operator paused groups (with who)
    RESUMED = "resumed"  # an operator resumed them (with who)


class NotificationModel(BaseModel):
    model_config = STRICT

    # Apprise URLs (https://github.com/caronc/apprise/wiki), e.g. "mailtos://user:pw@host",
    # "slack://T/B/C", "ntfy://host/topic": each receives a plain-text subject and body.
    urls: list[str] | None = None
    # Or a plain HTTP(S) endpoint that receives the event's JSON document, signed.
    webhook: HttpUrl | None = None
    # The webhook's HMAC secret: a file holding only it, or a systemd credential name.
    secret_file: SecretFile | None = None
    credential: CredentialName | None = None
    # The events this channel hears (default: all of them).
    events: list[EventKind] = Field(default_factory=lambda: list(EventKind))
    # Timeout of one delivery attempt.
    timeout: Duration = timedelta(seconds=10)
    # Attempts before a message is dropped (counted in patchd_notifications_total).
    attempts: Annotated[int, Field(ge=1, le=100)] = 8
    # Wait before the first retry; doubles at each attempt, up to backoff_max.
    backoff: Duration = timedelta(seconds=10)
    backoff_max: Duration = timedelta(minutes=30)

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("name at least one apprise URL")
        for index, url in enumerate(value):
            if not _SCHEME.match(url):
                # Not echoed: the URL may carry a token.
                raise ValueError(f"URL {index + 1} is not an apprise URL (expected SCHEME://...)")
        return value

    @field_validator("timeout", "backoff", "backoff_max")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> NotificationModel:
        if (self.urls is None) == (self.webhook is None):
            raise ValueError("give exactly one of urls (apprise) or webhook (signed JSON)")
        has_secret = self.secret_file is not None or self.credential is not None
        if self.webhook is not None:
            if (self.secret_file is None) == (self.credential is None):
                raise ValueError(
                    "a webhook is signed: give exactly one of secret_file or credential"
                )
        elif has_secret:
            raise ValueError("secret_file and credential sign a webhook; urls take none")
        if self.backoff_max < self.backoff:
            raise ValueError("backoff_max must not be shorter than backoff")
        return self
