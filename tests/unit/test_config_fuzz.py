"""Fuzzing `patchd check-config`: whatever the file holds, an operator gets exit 0 or 2.

Inputs are random TOML documents built from patchd's own key names and value shapes,
the shipped configs and the broken ones under tests/configs/bad mutated as data (keys
renamed, values of another type, tables deleted, duplicated or emptied) and as text
(random bytes, truncation, duplicated or deleted lines, inserted unicode), and random bytes.

The property: `patchd check-config -c FILE` never raises and exits 0 or 2. On 0 it prints
the one-line summary (and on stderr only warnings naming FILE). On 2 it prints one line
per problem, each naming FILE, none twice, and a last line `config invalid: N problems`
with N the number of those lines; a problem other than a syntax or encoding error also
names a key path (checked on the ConfigIssue objects, since key names may hold any
character). Most examples run `patchd.cli.main` in-process for speed; a few run `patchd`
as a process and must print exactly what the in-process call printed.

Hypothesis runs derandomized with a fixed number of examples and no example database, so
CI sees the same inputs every time (set PATCHD_FUZZ_EXAMPLES to explore further).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from patchd.backends.docker import DockerConfig, DockerSelect
from patchd.backends.vsphere.config import VSphereConfig, VSphereSelect
from patchd.cli import main
from patchd.config import ConfigError, load_settings
from patchd.config.baselines import BaselineModel
from patchd.config.notifications import NotificationModel
from patchd.config.schema import (
    SECTIONS,
    DaemonModel,
    FreezeModel,
    GroupModel,
    HaModel,
    StateModel,
    WindowModel,
)

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted(
    [
        ROOT / "config" / "patchd.example.toml",
        ROOT / "config" / "lab.toml",
        *(ROOT / "tests" / "configs" / "bad").glob("*.toml"),
    ]
)
SEED_TEXT = {path.name: path.read_bytes() for path in SEEDS}
SEED_DATA: dict[str, dict[str, Any]] = {}
for _name, _raw in SEED_TEXT.items():
    with contextlib.suppress(tomllib.TOMLDecodeError, RecursionError):  # only mutated as text
        SEED_DATA[_name] = tomllib.loads(_raw.decode())

EXAMPLES = int(os.environ.get("PATCHD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SYNTAX = re.compile(r"(line \d+, column \d+: )?TOML syntax error: |not UTF-8 text: ")
SUMMARY = re.compile(r"config invalid: (\d+) problems?")


def _model_keys(model: type[BaseModel], seen: set[str]) -> None:
    for name, field in model.model_fields.items():
        seen.add(name)
        for candidate in [field.annotation, *getattr(field.annotation, "__args__", ())]:
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _model_keys(candidate, seen)


def _keys_of(*models: type[BaseModel]) -> set[str]:
    seen = {"type"}
    for model in models:
        _model_keys(model, seen)
    return seen


def known_keys() -> list[str]:
    seen = set(SECTIONS) | _keys_of(
        DaemonModel, WindowModel, FreezeModel, GroupModel, StateModel, HaModel,
        DockerConfig, DockerSelect, VSphereConfig, VSphereSelect, BaselineModel,
    )  # fmt: skip
    for data in SEED_DATA.values():
        for section in data.values():
            if isinstance(section, dict):
                seen.update(section)  # the seeds' window, backend and group names
    return sorted(seen)


KEYS = known_keys()
SECTION_KEYS = {
    section: sorted(_keys_of(*models))
    for section, models in {
        "daemon": [DaemonModel],
        "windows": [WindowModel],
        "freezes": [FreezeModel],
        "baselines": [BaselineModel],
        "backends": [DockerConfig, VSphereConfig],
        "groups": [GroupModel, DockerSelect, VSphereSelect],
        "state": [StateModel],
        "ha": [HaModel],
        "notifications": [NotificationModel],
    }.items()
}

# --- writing TOML ---------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if _BARE.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}" if items else "{}"
    raise TypeError(type(value))


def dump(doc: dict[str, Any]) -> str:
    """TOML for `doc`: nested non-empty tables as [headers], the rest inline."""
    lines: list[str] = []

    def table(path: tuple[str, ...], data: dict[str, Any]) -> None:
        if path:
            lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
        subtables = []
        for key, value in data.items():
            if isinstance(value, dict) and value:
                subtables.append((key, value))
            else:
                lines.append(f"{toml_key(key)} = {toml_value(value)}")
        for key, value in subtables:
            table((*path, key), value)

    table((), doc)
    return "\n".join(lines) + "\n"


# --- strategies -----------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draw from one of `choices` with the given odds (st.one_of picks evenly)."""
    total = sum(weight for weight, _ in choices)

    def pick(n: int) -> st.SearchStrategy[Any]:
        for weight, strategy in choices:
            if n < weight:
                return strategy
            n -= weight
        raise AssertionError(n)

    return st.integers(0, total - 1).flatmap(pick)


texts = st.text(max_size=12) | st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8
)
shaped_strings = st.sampled_from(
    [
        "1h", "0s", "90s", "1h30m", "-1s", "99999999999999999d", "999999999d", "1d25h",
        "25%", "0%", "100%", "101%", "1.5%", "02:00", "24:00", "23:59:59", "7:5",
        "UTC", "Europe/Berlin", "America/New_York", "Nope/Zone", "../../etc/passwd", "",
        "sat", "monday", "2nd tue", "last fri", "6th mon", "*/5 * * * *", "0 0 30 2 *",
        "0 0 * * * *", "docker", "vsphere", "w", "d", "g", "weekend", "web", "lab-docker",
        "unix:///var/run/docker.sock", "tcp://[::1", "http://x", "prometheus:9090",
        "/etc/passwd", "/nonexistent/file", "/tmp", "a\x00b", "127.0.0.1:9863", "[::1]:80",
        "[zz]:80", ":80", "host:99999", "2026-12-20", "2026-12-20T00:00:00+01:00", "vm", "host",
        "/DC0/vm", "/", "cat:tag", ":tag", "AB:CD", "x" * 300,
    ]
)  # fmt: skip
# Boundaries, as a fuzzing dictionary: the ends of the calendar and of timedelta.
_EAST, _WEST = timezone(timedelta(hours=14)), timezone(-timedelta(hours=12, minutes=30))
edges = st.sampled_from(
    [
        "99999999999999999d", "999999999d", "36500d", "36501d", "2562047788015215h",
        date.min, date.max, datetime.min, datetime.max, datetime(1, 1, 1, tzinfo=_EAST),
        datetime(9999, 12, 31, 23, 59, tzinfo=_WEST), 2**63 - 1, -(2**63), 0, -1,
    ]
)  # fmt: skip
scalars = st.one_of(
    edges,
    shaped_strings,
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-3, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    shaped_strings,
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.sampled_from([UTC, _EAST, _WEST])),
    st.times(),
)
keys = st.sampled_from(KEYS) | texts
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(["w", "d", "g", "web", "weekend", "staging"]) | texts
# What goes into a known key: often a shaped or boundary value, else anything.
leaves = weighted((3, edges), (3, shaped_strings), (2, scalars), (2, values))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Sections of named tables holding mostly that section's own keys, values of any shape."""
    doc: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(SECTIONS), unique=True, max_size=5)):
        own = st.sampled_from(SECTION_KEYS[section])
        table = st.dictionaries(weighted((4, own), (1, keys)), leaves)
        if section in ("daemon", "state", "ha"):  # flat tables
            doc[section] = draw(table)
        else:
            doc[section] = draw(st.dictionaries(names, table | values, max_size=3))
    if draw(st.booleans()) and draw(st.booleans()):
        doc[draw(keys)] = draw(values)
    return doc


def _paths(data: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


def _parent(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node


@st.composite
def mutated_data(draw: st.DrawFn) -> dict[str, Any]:
    """A seed config parsed, then changed 1-4 times as data."""
    name = draw(st.sampled_from(sorted(SEED_DATA)))
    doc = tomllib.loads(SEED_TEXT[name].decode())
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        if not paths:
            doc[draw(keys)] = draw(values)
            continue
        path = draw(st.sampled_from(paths))
        parent, key = _parent(doc, path), path[-1]
        action = draw(
            weighted(
                (4, st.just("value")),
                *[(1, st.just(a)) for a in ("rename", "delete", "duplicate", "add", "empty")],
            )
        )
        if action == "value":  # a random value, often of another type, in a known key
            parent[key] = draw(leaves)
        elif action == "rename":
            parent[draw(keys)] = parent.pop(key)
        elif action == "delete":
            del parent[key]
        elif action == "duplicate":  # the same table again under another name
            parent[draw(keys)] = parent[key]
        elif action == "add":
            if isinstance(parent[key], dict):
                parent[key][draw(keys)] = draw(values)
            else:
                parent[draw(keys)] = draw(values)
        else:
            parent[key] = {} if isinstance(parent[key], dict) else []
    return doc


_SAME_KIND_EDGES: dict[type, list[Any]] = {
    str: ["", "99999999999999999d", "36501d", "0s", "x" * 5000, "\x00", "\u202e", "\n"],
    int: [0, -1, 2**63 - 1, -(2**63)],
    date: [date.min, date.max],
    datetime: [datetime(1, 1, 1, tzinfo=_EAST), datetime(9999, 12, 31, 23, 59, tzinfo=_WEST)],
}


def _leaf_paths(data: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, (*prefix, key))
        else:
            yield (*prefix, key)


@st.composite
def one_key_changed(draw: st.DrawFn) -> dict[str, Any]:
    """The valid example config with one value replaced: by a boundary of its own kind
    (a date by the first or last date) or by anything else."""
    doc = tomllib.loads(SEED_TEXT["patchd.example.toml"].decode())
    path = draw(st.sampled_from(list(_leaf_paths(doc))))
    parent = _parent(doc, path)
    same_kind = _SAME_KIND_EDGES.get(type(parent[path[-1]]), [])
    if same_kind and draw(st.booleans()):
        parent[path[-1]] = draw(st.sampled_from(same_kind))
    else:
        parent[path[-1]] = draw(leaves)
    return doc


@st.composite
def mutated_text(draw: st.DrawFn) -> bytes:
    """A seed config changed 1-3 times as bytes or lines."""
    data = SEED_TEXT[draw(st.sampled_from(sorted(SEED_TEXT)))]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        action = draw(
            st.sampled_from(["truncate", "bytes", "unicode", "dupline", "delline", "nest"])
        )
        if action == "nest":  # a key of arrays in arrays, deeper than any parser's stack
            depth = draw(st.sampled_from([10, 300, 5000]))
            line = b"x = " + b"[" * depth + b"]" * depth + b"\n"
            data = line + data if draw(st.booleans()) else data + b"\n" + line
        elif action == "truncate":
            data = data[:at]
        elif action == "bytes":
            end = draw(st.integers(at, min(len(data), at + 8)))
            data = data[:at] + draw(st.binary(max_size=8)) + data[end:]
        elif action == "unicode":
            data = data[:at] + draw(texts).encode() + data[at:]
        else:
            lines = data.splitlines(keepends=True)
            if not lines:
                continue
            first = draw(st.integers(0, len(lines) - 1))
            last = draw(st.integers(first, min(len(lines), first + 6)))
            chunk = lines[first:last]
            if action == "dupline":  # a duplicated [table] header or key: a TOML error
                lines[last:last] = chunk
            else:
                del lines[first:last]
            data = b"".join(lines)
    return data


# --- running check-config -------------------------------------------------------------


@contextmanager
def config_file(content: bytes) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="patchd-fuzz-") as tmp:
        path = Path(tmp) / "patchd.toml"
        path.write_bytes(content)
        yield path


def check_in_process(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check-config", "-c", str(path)])
    return code, out.getvalue(), err.getvalue()


def assert_contract(path: Path, code: int, out: str, err: str) -> None:
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 0:
        for line in err.splitlines():  # a secret file a shared group can read
            assert line.startswith(f"patchd: warning: {path}: "), line
        assert out.startswith("config OK: 1 file,") and out.count("\n") == 1, out
        return
    assert out == ""
    *problems, last = err.splitlines()
    summary = SUMMARY.fullmatch(last)
    assert summary is not None, err
    assert int(summary.group(1)) == len(problems) >= 1, err
    for line in problems:
        assert line.startswith(f"{path}: "), line
    # The same problems as objects: each names the file, and a key path unless the file
    # itself could not be parsed.
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(info.value.issues) == len(problems)
    assert len(set(info.value.issues)) == len(problems), "a problem reported twice"
    for issue in info.value.issues:
        assert issue.file == path
        assert issue.path or SYNTAX.match(issue.reason), issue


def check(content: bytes) -> None:
    with config_file(content) as path:
        assert_contract(path, *check_in_process(path))


# --- the tests ------------------------------------------------------------------------


def test_the_writer_round_trips_through_tomllib() -> None:
    doc = {
        "a": {"b c": [1, 2.5, "x\"\\\x00\x7fé\U0001f600", True], "d": {}},
        "e": {"f": {"g": date(2026, 1, 2), "h": datetime(2026, 1, 2, 3, 4, tzinfo=UTC)}},
        "i": [time(1, 2, 3, 4), {"j": float("inf")}],
    }  # fmt: skip
    assert tomllib.loads(dump(doc)) == doc


def test_every_seed_keeps_the_contract() -> None:
    for content in SEED_TEXT.values():
        check(content)
    assert len(SEED_TEXT) >= 20


@FUZZ
@given(documents())
def test_random_documents(doc: dict[str, Any]) -> None:
    check(dump(doc).encode())


@FUZZ
@given(mutated_data())
def test_seed_configs_mutated_as_data(doc: dict[str, Any]) -> None:
    check(dump(doc).encode())


@settings(FUZZ, max_examples=EXAMPLES or 120)  # the deepest checks: worth a few more
@given(one_key_changed())
def test_one_key_of_the_example_changed(doc: dict[str, Any]) -> None:
    check(dump(doc).encode())


@FUZZ
@given(mutated_text())
def test_seed_configs_mutated_as_text(content: bytes) -> None:
    check(content)


@settings(FUZZ, max_examples=EXAMPLES or 30)
@given(st.binary(max_size=200) | texts.map(str.encode))
def test_random_bytes(content: bytes) -> None:
    check(content)


@settings(FUZZ, max_examples=4)
@given(st.one_of(documents().map(lambda d: dump(d).encode()), mutated_text()))
def test_as_a_process_the_same_answer(content: bytes) -> None:
    with config_file(content) as path:
        proc = subprocess.run(
            [sys.executable, "-m", "patchd.cli", "check-config", "-c", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert_contract(path, proc.returncode, proc.stdout, proc.stderr)
        assert (proc.returncode, proc.stdout, proc.stderr) == check_in_process(path)
