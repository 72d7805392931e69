"""Finding the config files, parsing their TOML and merging them with provenance.

The main file comes first, then the drop-ins in file-name order. A later file wins per key
and tables merge deeply; for every key we remember which file set it last, so an error can
name the file the operator has to edit.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchd.config.errors import ConfigError, ConfigIssue, KeyPath

DEFAULT_CONFIG = Path("/etc/patchd/patchd.toml")
DEFAULT_DROPIN_DIR = Path("/etc/patchd/patchd.d")
_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


@dataclass
class Merged:
    data: dict[str, Any] = field(default_factory=dict)
    origin: dict[KeyPath, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def file_for(self, path: KeyPath) -> Path | None:
        """The file that last set `path` or the nearest table holding it."""
        for length in range(len(path), 0, -1):
            found = self.origin.get(path[:length])
            if found is not None:
                return found
        return self.files[-1] if self.files else None

    def issue(self, path: KeyPath, reason: str) -> ConfigIssue:
        return ConfigIssue(self.file_for(path), path, reason)


def config_files(config: Path | None, config_dir: Path | None) -> list[Path]:
    """The files to load, in merge order.

    Without options: /etc/patchd/patchd.toml then /etc/patchd/patchd.d/*.toml.
    `-c FILE` replaces the main file and drops the default drop-in directory;
    `--config-dir DIR` replaces the drop-in directory.
    """
    issues: list[ConfigIssue] = []
    files: list[Path] = []
    main = config if config is not None else DEFAULT_CONFIG
    dropins = config_dir if config_dir is not None else (None if config else DEFAULT_DROPIN_DIR)
    if main.is_file():
        files.append(main)
    elif config is not None:
        issues.append(ConfigIssue(main, (), "no such file"))
    if dropins is not None:
        if dropins.is_dir():
            files.extend(sorted(p for p in dropins.glob("*.toml") if p.is_file()))
        elif config_dir is not None:
            issues.append(ConfigIssue(dropins, (), "no such directory"))
    if not files and not issues:
        issues.append(
            ConfigIssue(main, (), "no configuration found (use -c FILE or --config-dir DIR)")
        )
    if issues:
        raise ConfigError(issues)
    return files


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one file; syntax errors become a ConfigIssue with line and column."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = _AT_LINE.search(message)
        if match:
            line, column = match.groups()
            reason = f"line {line}, column {column}: TOML syntax error: {message[: match.start()]}"
        else:
            reason = f"TOML syntax error: {message}"
        raise ConfigError([ConfigIssue(path, (), reason)]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([ConfigIssue(path, (), f"not UTF-8 text: {err.reason}")]) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively, without a limit.
        reason = "TOML syntax error: arrays or tables nested too deeply"
        raise ConfigError([ConfigIssue(path, (), reason)]) from None
    except OSError as err:
        raise ConfigError([ConfigIssue(path, (), f"cannot read: {err.strerror}")]) from None


def _merge_into(
    target: dict[str, Any], source: dict[str, Any], path: KeyPath, file: Path, merged: Merged
) -> None:
    for key, value in source.items():
        key_path = (*path, key)
        merged.origin[key_path] = file
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge_into(target[key], value, key_path, file, merged)
        else:
            for stale in [
                p for p in merged.origin if p[: len(key_path)] == key_path and p != key_path
            ]:
                del merged.origin[stale]
            target[key] = _copy(value, key_path, file, merged)


def _copy(value: Any, path: KeyPath, file: Path, merged: Merged) -> Any:
    if isinstance(value, dict):
        result: dict[str, Any] = {}
        for key, item in value.items():
            merged.origin[(*path, key)] = file
            result[key] = _copy(item, (*path, key), file, merged)
        return result
    return value


def load_merged(files: list[Path]) -> Merged:
    """Read and merge the files; all syntax errors are reported together."""
    merged = Merged(files=list(files))
    issues: list[ConfigIssue] = []
    for path in files:
        try:
            data = read_toml(path)
        except ConfigError as err:
            issues.extend(err.issues)
            continue
        _merge_into(merged.data, data, (), path, merged)
    if issues:
        raise ConfigError(issues)
    return merged
