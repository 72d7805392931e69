"""Channels: where a notification goes, and how one delivery attempt is made.

`AppriseSender` hands the plain-text subject and body to apprise (imported on first use:
an idle daemon does not pay for it). `WebhookSender` POSTs the event's JSON document,
signed (patchd.notifications.signing). A failed attempt raises `DeliveryFailed` with a
reason fit for a log line: secrets (a URL's password or token, the webhook's secret) are
registered with patchd.log.redact when the channel is built and scrubbed from reasons.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from patchd import log
from patchd.config.notifications import EventKind, NotificationModel
from patchd.notifications import signing

# Path segments and query values of this length with a digit, or twice as long, are
# treated as tokens (Slack's /services/T0/B0/XXXX, a Teams or Discord key, ?token=...).
_TOKEN_LENGTH = 8


class DeliveryFailed(Exception):
    """One attempt failed; `permanent` when retrying cannot help (a URL apprise does not
    know, a secret that cannot be read is not permanent: it may be fixed meanwhile)."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(log.scrub(reason))
        self.permanent = permanent


class Sender(Protocol):
    def send(self, document: Mapping[str, Any], delivery: int, now: datetime) -> None:
        """Deliver one message; DeliveryFailed if it did not arrive."""


def redact_url(url: str) -> None:
    """Register the secret parts of a URL (password, long path segments and query values
    and the URL itself) so that no log line or error shows them."""
    log.redact(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if parts.password:
        log.redact(parts.password)
    if parts.username and "@" in parts.netloc and parts.scheme not in ("mailto", "mailtos"):
        log.redact(parts.username)
    host = parts.netloc.rpartition("@")[2]
    for segment in [host, *parts.path.split("/"), *(v for _, v in parse_qsl(parts.query))]:
        if _looks_like_token(segment):
            log.redact(segment)


def _looks_like_token(text: str) -> bool:
    # Long, or longish with a digit; never a host name (dots, a port) or a plain word.
    if "." in text or ":" in text:
        return False
    return len(text) >= 16 or (len(text) >= _TOKEN_LENGTH and any(c.isdigit() for c in text))


def read_secret(model: NotificationModel, channel: str) -> str:
    """The webhook secret, read now (a rotated one is used at the next attempt)."""
    if model.secret_file is not None:
        path = Path(model.secret_file)
    else:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise DeliveryFailed(
                f"notifications.{channel}.credential {model.credential!r}:"
                " $CREDENTIALS_DIRECTORY is not set (run patchd under systemd with"
                " LoadCredential= or SetCredential=)"
            )
        path = Path(directory) / str(model.credential)
    try:
        secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise DeliveryFailed(f"cannot read the webhook secret from {path}: {reason}") from None
    if not secret:
        raise DeliveryFailed(f"the webhook secret file {path} is empty")
    log.redact(secret)
    return secret


class AppriseSender:
    def __init__(self, urls: list[str], timeout: timedelta) -> None:
        self.urls = urls
        self.timeout = timeout
        self._apprise: Any = None

    def _client(self) -> Any:
        if self._apprise is None:
            import apprise  # lazily: it is large, and an idle daemon sends nothing

            client = apprise.Apprise()
            for index, url in enumerate(self.urls):
                if not client.add(url):
                    raise DeliveryFailed(
                        f"URL {index + 1} is not one apprise knows (scheme"
                        f" {url.partition('://')[0]!r})",
                        permanent=True,
                    )
            self._apprise = client
        return self._apprise

    def send(self, document: Mapping[str, Any], delivery: int, now: datetime) -> None:
        import apprise

        client = self._client()
        capture: Any = apprise.LogCapture
        with capture(level=apprise.logging.WARNING, fmt="%(message)s") as captured:
            ok = client.notify(
                title=document["subject"],
                body=document["text"],
                body_format=apprise.NotifyFormat.TEXT,  # kept as written: lines, indents
            )
        if not ok:
            detail = " ".join(str(captured.getvalue()).split())[-300:]
            raise DeliveryFailed(f"apprise could not deliver: {detail or 'no detail'}")


class WebhookSender:
    def __init__(self, url: str, secret: Any, timeout: timedelta) -> None:
        self.url = url
        self.secret = secret  # () -> str, read at each attempt
        self.timeout = timeout

    def send(self, document: Mapping[str, Any], delivery: int, now: datetime) -> None:
        body = json.dumps(document, sort_keys=True).encode()
        stamp = int(now.timestamp())
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers=signing.headers(self.secret(), stamp, body, document["event"], delivery),
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout.total_seconds()) as answer:
                answer.read(1024)
        except urllib.error.HTTPError as err:
            # 4xx (but 408 and 429) will not change by retrying the same request.
            permanent = 400 <= err.code < 500 and err.code not in (408, 429)
            raise DeliveryFailed(f"the webhook answered HTTP {err.code}", permanent) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise DeliveryFailed(f"the webhook did not answer: {reason}") from None


@dataclass(frozen=True)
class Channel:
    name: str
    model: NotificationModel
    sender: Sender

    def hears(self, kind: EventKind) -> bool:
        return kind in self.model.events

    def retry_after(self, attempts: int) -> timedelta | None:
        """The wait before the next attempt after `attempts` failed ones; None: drop it."""
        return backoff(attempts, self.model.attempts, self.model.backoff, self.model.backoff_max)


def backoff(attempts: int, limit: int, first: timedelta, most: timedelta) -> timedelta | None:
    """Exponential backoff: `first`, twice that, four times... capped at `most`; None
    once `limit` attempts have been made."""
    if attempts >= limit:
        return None
    wait: timedelta = first * (2 ** max(0, attempts - 1))
    return min(most, wait)


def build(name: str, model: NotificationModel) -> Channel:
    """A channel from its config table; its URLs' secrets are registered for redaction."""
    if model.urls is not None:
        for url in model.urls:
            redact_url(url)
        return Channel(name, model, AppriseSender(list(model.urls), model.timeout))
    url = str(model.webhook)
    redact_url(url)
    return Channel(name, model, WebhookSender(url, lambda: read_secret(model, name), model.timeout))
