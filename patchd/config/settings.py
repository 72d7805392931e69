"""Turning merged TOML into frozen, validated Settings holding domain objects.

Every table is checked on its own and every reference between tables is checked, and all
problems are collected so an operator sees them in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from croniter import croniter
from pydantic import BaseModel, ValidationError

from patchd.config.baselines import BaselineModel, baseline_problem
from patchd.config.errors import ConfigError, ConfigIssue, KeyPath
from patchd.config.files import Merged, config_files, load_merged
from patchd.config.messages import reason as error_reason
from patchd.config.messages import suggest, unknown
from patchd.config.notifications import NotificationModel
from patchd.config.schema import (
    SECTIONS,
    DaemonModel,
    FreezeModel,
    GroupModel,
    HaModel,
    HealthModel,
    PatchModel,
    SnapshotModel,
    StateModel,
    WindowModel,
    split_address,
)
from patchd.config.secret_files import WARNINGS
from patchd.config.types import Limit
from patchd.durations import format_duration
from patchd.plugins import (
    BackendSpec,
    check_group,
    implicit_health,
    installed_types,
    load_plugin,
)
from patchd.windows import (
    WEEKDAYS,
    Cron,
    Freeze,
    MonthlyOrdinal,
    Schedule,
    Weekly,
    Window,
    openings_from,
    resolve_wall_time,
)

M = TypeVar("M", bound=BaseModel)

_ORDINALS = {
    "1st": 1, "first": 1, "2nd": 2, "second": 2, "3rd": 3, "third": 3,
    "4th": 4, "fourth": 4, "5th": 5, "fifth": 5, "last": -1,
}  # fmt: skip
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# A fixed instant to ask "does this schedule ever open?" without reading the clock.
_PROBE_INSTANT = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    metrics_host: str
    metrics_port: int
    log_format: str
    log_level: str
    timezone: ZoneInfo
    control_socket: Path = Path("/run/patchd/control.sock")
    control_group: str = "patchd"


@dataclass(frozen=True)
class Group:
    name: str
    backend: str
    window: str
    select: BaseModel
    after: str | None
    soak: timedelta
    max_concurrency: Limit
    max_errors: Limit
    snapshot: SnapshotModel
    health: HealthModel
    patch: PatchModel = field(default_factory=PatchModel)
    approval: str = "auto"  # "manual": the stage gate waits for `patchd approve`
    baseline: BaselineModel | None = None  # the [baselines.NAME] the group names
    baseline_name: str | None = None


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings
    windows: Mapping[str, Window]
    freezes: tuple[Freeze, ...]
    backends: Mapping[str, BackendSpec]
    groups: Mapping[str, Group]
    files: tuple[Path, ...]
    # Problems that do not stop patchd (a secret file a shared group can read).
    warnings: tuple[ConfigIssue, ...] = ()
    # [state] (url None: SQLite in daemon.state_dir) and [ha] (used with a url only).
    state: StateModel = field(default_factory=StateModel)
    ha: HaModel = field(default_factory=HaModel)
    # [notifications.NAME]: channel name -> its validated table.
    notifications: Mapping[str, NotificationModel] = field(
        default_factory=lambda: MappingProxyType({})
    )
    baselines: Mapping[str, BaselineModel] = field(default_factory=lambda: MappingProxyType({}))

    def stages(self) -> list[list[str]]:
        """Chains of groups linked by `after`, each listed from first to last stage."""
        children: dict[str, list[str]] = {}
        for group in self.groups.values():
            if group.after is not None:
                children.setdefault(group.after, []).append(group.name)
        chains: list[list[str]] = []

        def walk(name: str, chain: list[str]) -> None:
            chain = [*chain, name]
            if name not in children:
                chains.append(chain)
            for child in children.get(name, []):
                walk(child, chain)

        for group in self.groups.values():
            if group.after is None:
                walk(group.name, [])
        return chains

    def summary(self) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"

        staged = [" -> ".join(chain) for chain in self.stages() if len(chain) > 1]
        parts = [
            count(len(self.files), "file"),
            count(len(self.windows), "window"),
            count(len(self.freezes), "freeze"),
            count(len(self.backends), "backend"),
            count(len(self.groups), "group"),
        ]
        text = "config OK: " + ", ".join(parts)
        if staged:
            text += "; stages: " + "; ".join(staged)
        return text


def load_settings(config: Path | None = None, config_dir: Path | None = None) -> Settings:
    """Find, read, merge and validate the config. Raises ConfigError with every problem."""
    return build_settings(load_merged(config_files(config, config_dir)))


class _Builder:
    def __init__(self, merged: Merged) -> None:
        self.merged = merged
        self.issues: list[ConfigIssue] = []
        self.warnings: list[ConfigIssue] = []

    def add(self, path: KeyPath, reason: str) -> None:
        self.issues.append(self.merged.issue(path, reason))

    def validate(self, model: type[M], data: object, path: KeyPath) -> M | None:
        warnings: list[tuple[str | None, str]] = []
        try:
            return model.model_validate(data, context={WARNINGS: warnings})
        except ValidationError as err:
            for error in err.errors():
                loc = tuple(str(part) for part in error["loc"])
                self.add((*path, *loc), error_reason(model, error))
            return None
        finally:
            for field_name, reason in warnings:
                where = (*path, field_name) if field_name else path
                self.warnings.append(self.merged.issue(where, reason))

    def tables(self, section: str) -> dict[str, dict[str, Any]]:
        raw = self.merged.data.get(section, {})
        if not isinstance(raw, dict):
            self.add((section,), "expected a table")
            return {}
        result: dict[str, dict[str, Any]] = {}
        for name, value in raw.items():
            if isinstance(value, dict):
                result[name] = value
            else:
                self.add((section, name), f"expected a table [{section}.{name}]")
        return result


def build_settings(merged: Merged) -> Settings:
    b = _Builder(merged)
    for key in merged.data:
        if key not in SECTIONS:
            b.add((key,), f"unknown section{suggest(key, SECTIONS)} (known: {', '.join(SECTIONS)})")

    daemon_raw = merged.data.get("daemon", {})
    daemon_model = b.validate(DaemonModel, daemon_raw, ("daemon",))
    daemon = _daemon(daemon_model or DaemonModel())
    state = b.validate(StateModel, merged.data.get("state", {}), ("state",)) or StateModel()
    ha = b.validate(HaModel, merged.data.get("ha", {}), ("ha",)) or HaModel()

    windows: dict[str, Window] = {}
    window_raw = b.tables("windows")  # once: each call reports a malformed table again
    for name, raw in window_raw.items():
        window = _window(b, name, raw, daemon.timezone)
        if window is not None:
            windows[name] = window

    freezes = tuple(
        freeze
        for name, raw in b.tables("freezes").items()
        if (freeze := _freeze(b, name, raw, daemon.timezone)) is not None
    )

    backends: dict[str, BackendSpec] = {}
    backend_raw = b.tables("backends")
    for name, raw in backend_raw.items():
        spec = _backend(b, name, raw)
        if spec is not None:
            backends[name] = spec

    # name -> its model, None when the table is invalid (reported once, here).
    checked = {
        name: b.validate(BaselineModel, raw, ("baselines", name))
        for name, raw in b.tables("baselines").items()
    }
    group_raw = b.tables("groups")
    window_names = list(window_raw)
    groups: dict[str, Group] = {}
    for name, raw in group_raw.items():
        group = _group(b, name, raw, window_names, backend_raw, backends, list(group_raw), checked)
        if group is not None:
            groups[name] = group
    _check_cycles(b, groups)

    notifications: dict[str, NotificationModel] = {}
    for name, raw in b.tables("notifications").items():
        channel = b.validate(NotificationModel, raw, ("notifications", name))
        if channel is not None:
            notifications[name] = channel

    if b.issues:
        raise ConfigError(b.issues)
    return Settings(
        daemon=daemon,
        windows=MappingProxyType(windows),
        freezes=tuple(sorted(freezes, key=lambda f: f.start)),
        backends=MappingProxyType(backends),
        groups=MappingProxyType(groups),
        files=tuple(merged.files),
        warnings=tuple(b.warnings),
        state=state,
        ha=ha,
        notifications=MappingProxyType(notifications),
        baselines=MappingProxyType({k: v for k, v in checked.items() if v is not None}),
    )


def _daemon(model: DaemonModel) -> DaemonSettings:
    host, port = split_address(model.metrics_address)
    return DaemonSettings(
        state_dir=model.state_dir,
        metrics_host=host,
        metrics_port=port,
        log_format=model.log_format,
        log_level=model.log_level,
        timezone=model.timezone,
        control_socket=model.control_socket,
        control_group=model.control_group,
    )


def _weekday(text: str) -> int | None:
    word = text.strip().lower()
    if word in WEEKDAYS:
        return WEEKDAYS.index(word)
    if word in _FULL_DAYS:
        return _FULL_DAYS.index(word)
    return None


def _window(b: _Builder, name: str, raw: dict[str, Any], default_tz: ZoneInfo) -> Window | None:
    path = ("windows", name)
    model = b.validate(WindowModel, raw, path)
    if model is None:
        return None
    before = len(b.issues)
    forms = [key for key in ("days", "monthly", "cron") if getattr(model, key) is not None]
    if len(forms) != 1:
        given = f" (given: {', '.join(forms)})" if forms else ""
        b.add(path, f"give exactly one of days, monthly or cron{given}")
        return None
    start = model.start or time(0, 0)
    schedule: Schedule | None = None
    if model.days is not None:
        days = set()
        for index, text in enumerate(model.days):
            day = _weekday(text)
            if day is None:
                b.add(
                    (*path, "days", str(index)), f"unknown day {text!r} (use {', '.join(WEEKDAYS)})"
                )
            else:
                days.add(day)
        if not model.days:
            b.add((*path, "days"), "name at least one day")
        schedule = Weekly(frozenset(days), start)
    elif model.monthly is not None:
        match = re.fullmatch(r"\s*(\S+)\s+(\S+)\s*", model.monthly.lower())
        ordinal = _ORDINALS.get(match.group(1)) if match else None
        weekday = _weekday(match.group(2)) if match else None
        if ordinal is None or weekday is None:
            b.add(
                (*path, "monthly"),
                f'expected an ordinal weekday like "2nd tue" or "last fri", got {model.monthly!r}',
            )
        else:
            schedule = MonthlyOrdinal(ordinal, weekday, start, model.offset_days or 0)
    else:
        assert model.cron is not None
        if model.start is not None:
            b.add((*path, "start"), "not used with cron: the expression holds the start times")
        if len(model.cron.split()) != 5 or not croniter.is_valid(model.cron):
            b.add((*path, "cron"), f"invalid 5-field cron expression {model.cron!r}")
        else:
            schedule = Cron(model.cron)
    if model.offset_days is not None and model.monthly is None:
        b.add((*path, "offset_days"), "only used with monthly")
    if model.duration <= timedelta(0):
        b.add((*path, "duration"), "must be longer than 0s")
    if model.cutoff >= model.duration:
        b.add(
            (*path, "cutoff"),
            f"must be shorter than duration ({format_duration(model.cutoff)} >= "
            f"{format_duration(model.duration)})",
        )
    if schedule is None or len(b.issues) > before:
        return None
    window = Window(name, schedule, model.duration, model.timezone or default_tz, model.cutoff)
    if next(openings_from(window, _PROBE_INSTANT), None) is None:
        b.add(path, "this schedule never opens")
        return None
    return window


def _instant(value: datetime | date, tz: ZoneInfo, end: bool) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.astimezone(UTC)
        return resolve_wall_time(value, tz)
    # A local date covers the whole day, so an end date is inclusive.
    day = value + timedelta(days=1) if end else value
    return resolve_wall_time(datetime.combine(day, time()), tz)


def _freeze(b: _Builder, name: str, raw: dict[str, Any], tz: ZoneInfo) -> Freeze | None:
    path = ("freezes", name)
    model = b.validate(FreezeModel, raw, path)
    if model is None:
        return None
    instants: list[datetime] = []
    for key, value in (("start", model.start), ("end", model.end)):
        try:
            instants.append(_instant(value, tz, end=key == "end"))
        except (OverflowError, ValueError, OSError):
            # Near year 1 or 9999 the conversion to UTC leaves the calendar.
            b.add((*path, key), f"{value.isoformat()} is out of range (years 1-9999 in UTC)")
    if len(instants) != 2:
        return None
    start, end = instants
    if end <= start:
        b.add((*path, "end"), f"must be after start ({start.isoformat()} >= {end.isoformat()})")
        return None
    return Freeze(name, start, end, model.reason)


def _backend(b: _Builder, name: str, raw: dict[str, Any]) -> BackendSpec | None:
    path = ("backends", name)
    type_name = raw.get("type")
    known = ", ".join(installed_types()) or "none"
    if not isinstance(type_name, str):
        b.add((*path, "type"), f"required: the backend type (installed: {known})")
        return None
    try:
        plugin = load_plugin(type_name)
    except KeyError:
        b.add((*path, "type"), f"unknown backend type {type_name!r} (installed: {known})")
        return None
    rest = {key: value for key, value in raw.items() if key != "type"}
    config = b.validate(plugin.config_model, rest, path)
    return None if config is None else BackendSpec(name, type_name, config)


def _group(
    b: _Builder,
    name: str,
    raw: dict[str, Any],
    window_names: list[str],
    backend_raw: Mapping[str, object],
    backends: Mapping[str, BackendSpec],
    group_names: list[str],
    baselines: Mapping[str, BaselineModel | None],
) -> Group | None:
    path = ("groups", name)
    model = b.validate(GroupModel, raw, path)
    if model is None:
        return None
    before = len(b.issues)
    if model.backend not in backend_raw:
        b.add((*path, "backend"), unknown("backend", model.backend, list(backend_raw)))
    if model.window not in window_names:
        b.add((*path, "window"), unknown("window", model.window, window_names))
    if model.after is not None:
        if model.after == name:
            b.add((*path, "after"), "a group cannot come after itself")
        elif model.after not in group_names:
            b.add((*path, "after"), unknown("group", model.after, group_names))
    else:
        if model.soak:
            b.add((*path, "soak"), "only used with after")
        if model.approval == "manual":
            b.add((*path, "approval"), "only used with after (a first stage needs no approval)")
    select: BaseModel | None = None
    spec = backends.get(model.backend)
    if spec is not None:
        plugin = load_plugin(spec.type)
        select = b.validate(plugin.select_model, model.select, (*path, "select"))
        note = implicit_health(plugin)
        health_raw = raw.get("health")
        if note and not (isinstance(health_raw, dict) and "stable_for" in health_raw):
            # The default once applied silently to every VM and host (issue 15).
            stable = format_duration(model.health.stable_for)
            b.warnings.append(
                b.merged.issue(
                    (*path, "health", "stable_for"),
                    f"not set, so the default {stable} applies to every target: {note}"
                    f" for {stable}; set how long a patched target must stay healthy",
                )
            )
        if select is not None:
            for where, problem in check_group(spec, select, model.patch):
                b.add((*path, *where), problem)
    baseline = None if model.baseline is None else baselines.get(model.baseline)
    if model.baseline is not None:
        kind = None if spec is None else spec.type  # an unknown backend is said above
        wrong = baseline_problem(model.baseline, list(baselines), model, kind)
        if wrong is not None:
            b.add((*path, "baseline"), wrong)
    if select is None or len(b.issues) > before:
        return None
    return Group(
        name=name,
        backend=model.backend,
        window=model.window,
        select=select,
        after=model.after,
        soak=model.soak,
        max_concurrency=model.max_concurrency,
        max_errors=model.max_errors,
        snapshot=model.snapshot,
        health=model.health,
        patch=model.patch,
        approval=model.approval,
        baseline=baseline,
        baseline_name=model.baseline,
    )


def _check_cycles(b: _Builder, groups: Mapping[str, Group]) -> None:
    reported: set[str] = set()
    for name in groups:
        seen: list[str] = []
        current: str | None = name
        while current is not None and current in groups and current not in seen:
            seen.append(current)
            current = groups[current].after
        if current is None or current not in seen or current in reported:
            continue
        cycle = seen[seen.index(current) :]
        reported.update(cycle)
        first = min(cycle)
        ordered = cycle[cycle.index(first) :] + cycle[: cycle.index(first)]
        b.add(
            ("groups", first, "after"),
            "cycle in after: " + " -> ".join([*ordered, first]),
        )
