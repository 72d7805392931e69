"""What every test shares: the one config builder and the one wait helper.

- ``write_config(path, values)`` writes a patchd TOML config from Python values (nested
  dicts; ``Path`` and ``timedelta`` values are written as patchd reads them, ``None``
  leaves a key out) and returns its path. Unit and integration tests alike build their
  configs with it, and so do the benchmarks (bench/). Tests that are about the TOML text
  itself (config errors, drop-in merging, the README's examples) keep their text inline.
- ``window_at(start)`` is the ``[windows.NAME]`` table of a window that opens at ``start``.
- ``wait_until(condition, timeout, what)`` polls a condition until it holds. The timeout
  is a limit on a loaded machine, not a pause: make it generous, a passing test never
  waits it out. It fails saying what it waited for and the last value it saw.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

T = TypeVar("T")

DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _toml_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _toml_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_value(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    return value


def write_config(path: Path, values: Mapping[str, Any]) -> Path:
    """Write `values` as a patchd TOML config to `path` (its directory is made) and return
    the path. Example::

        write_config(tmp_path / "patchd.toml", {
            "daemon": {"state_dir": tmp_path / "state"},
            "windows": {"now": window_at(start)},
            "backends": {"lab": {"type": "docker", "url": docker_host}},
            "groups": {"web": {"backend": "lab", "window": "now",
                               "health": {"timeout": "20s", "stable_for": "1s"}}},
        })
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    daemon = values.get("daemon")
    if isinstance(daemon, Mapping) and "control_socket" not in daemon:
        # Each test's daemon gets its own control socket: the default
        # /run/patchd/control.sock would be shared by every daemon and `patchd run` of the
        # machine (a test's daemon, or another checkout's, would refuse this test's runs).
        values = {**values, "daemon": {**daemon, "control_socket": path.parent / "control.sock"}}
    path.write_text(tomli_w.dumps(_toml_value(values)))
    return path


def window_at(start: datetime, duration: str = "1h", **more: Any) -> dict[str, Any]:
    """A weekly window opening at `start` (its weekday and time of day, in the config's
    timezone: UTC unless `daemon.timezone` says otherwise)."""
    return {
        "days": [DAYS[start.weekday()]],
        "start": f"{start:%H:%M:%S}",
        "duration": duration,
        **more,
    }


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    give_up: Callable[[], str | None] | None = None,
) -> T:
    """Poll `condition` until it returns a true value, and return that value.

    Fails after `timeout` seconds, or as soon as `give_up` returns a reason (a process
    that exited, say), with a message naming `what` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        reason = give_up() if give_up is not None else None
        if reason:
            raise AssertionError(f"{reason} while waiting for {what}; last seen: {value!r}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; last seen: {value!r}")
        time.sleep(interval)
