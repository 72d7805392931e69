"""How a webhook is signed, and how a receiver checks it.

The signature is HMAC-SHA256, keyed with the channel's secret, over the timestamp, a dot
and the raw body: `f"{timestamp}.".encode() + body`. Headers:

    X-Patchd-Timestamp: 1764567600            (Unix seconds of this attempt)
    X-Patchd-Signature: sha256=<hex digest>
    X-Patchd-Event: run_finished
    X-Patchd-Delivery: 42                     (the outbox id: the same on every retry)

A receiver recomputes the digest, compares it in constant time, and rejects a timestamp
older than a few minutes (a replayed request) and a delivery id it has already seen.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

SIGNATURE = "X-Patchd-Signature"
TIMESTAMP = "X-Patchd-Timestamp"
EVENT = "X-Patchd-Event"
DELIVERY = "X-Patchd-Delivery"
DEFAULT_TOLERANCE = 300  # seconds a receiver accepts between the timestamp and its clock


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Patchd-Signature value for this body sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def headers(secret: str, timestamp: int, body: bytes, event: str, delivery: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "patchd",
        TIMESTAMP: str(timestamp),
        SIGNATURE: signature(secret, timestamp, body),
        EVENT: event,
        DELIVERY: str(delivery),
    }


def verify(
    secret: str,
    received: Mapping[str, str],
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> str | None:
    """None if the request is genuine and fresh, else why not (for receivers and tests).
    `received` maps header names as sent (look-ups ignore case)."""
    lower = {k.lower(): v for k, v in received.items()}
    stamp = lower.get(TIMESTAMP.lower(), "")
    given = lower.get(SIGNATURE.lower(), "")
    if not stamp.isdigit():
        return f"missing or malformed {TIMESTAMP}"
    if abs(now - int(stamp)) > tolerance:
        return f"{TIMESTAMP} is {abs(now - int(stamp)):.0f}s away from now (replay?)"
    if not hmac.compare_digest(given, signature(secret, int(stamp), body)):
        return f"{SIGNATURE} does not match the body"
    return None
