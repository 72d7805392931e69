"""Structured logging: structlog set up for JSON lines or a console, with secret redaction.

Every event is one line with its fields (run_id, group, target, step, ...). Strings
registered with `redact()` (passwords read from files or credentials) are replaced by
"***" in every field of every event before it is written.
`scrub()` does the same for text that leaves patchd another way.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def redact(secret: str) -> None:
    """Never let `secret` reach a log line."""
    if secret:
        with _secrets_lock:
            _secrets.add(secret)


def scrub(text: str) -> str:
    """`text` with every registered secret replaced by "***": for text that leaves patchd
    other than as a log line, such as a command's output quoted in an error (which the
    journal keeps and `patchd run` prints)."""
    scrubbed: str = _scrub(text, _registered())
    return scrubbed


def _registered() -> list[str]:
    # A copy (another thread may register meanwhile), longest first so that a secret
    # holding a shorter one is replaced whole.
    with _secrets_lock:
        return sorted(_secrets, key=len, reverse=True)


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, secrets) for v in value]
    return value


def _redact_processor(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    secrets = _registered()
    if not secrets:
        return event
    return {key: _scrub(value, secrets) for key, value in event.items()}


def setup(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once per process (and again on reload)."""
    out = stream or sys.stderr
    console = log_format == "console" or (log_format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )


def get(name: str = "patchd") -> Any:
    return structlog.get_logger(name)
