"""Structured logging: structlog set up for JSON lines or a console, with secret redaction.

Every event is one line with its fields (run_id, group, target, step, ...) and the name
of the logger that wrote it (`logger`). When stderr is the systemd journal
(JOURNAL_STREAM names it), each line starts with its syslog priority (`<3>` error,
`<4>` warning, `<6>` info, `<7>` debug), so `journalctl -p err` finds failures. Strings
registered with `redact()` (passwords read from files or credentials) are replaced by
"***" in every field of every event before it is written.
`scrub()` does the same for text that leaves patchd another way.
"""

from __future__ import annotations

import logging
import os
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


# sd-daemon(3) priorities by structlog method name.
_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3}
_PRIORITIES["critical"] = _PRIORITIES["fatal"] = 2


def to_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal systemd connected (JOURNAL_STREAM is "DEV:INODE")."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def _with_priority(renderer: Any) -> Any:
    def render(logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        return f"<{_PRIORITIES.get(method, 6)}>{renderer(logger, method, event)}"

    return render


def setup(log_format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once per process (and again on reload)."""
    out = stream or sys.stderr
    console = log_format == "console" or (log_format == "auto" and out.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer()
    )
    if to_journal(out):
        renderer = _with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.ERROR)),
        logger_factory=lambda *args: _NamedPrintLogger(out, str(args[0]) if args else "patchd"),
        cache_logger_on_first_use=False,
    )


def get(name: str = "patchd") -> Any:
    """A logger whose events carry `logger=name` (lazy: it follows later `setup`s)."""
    return structlog.get_logger(name)


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows the name it was asked for by `get`."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _add_logger_name(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event.setdefault("logger", getattr(logger, "name", "patchd"))
    return event
