"""Config problems as an operator reads them: `FILE: key.path: reason`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KeyPath = tuple[str, ...]


def dotted(path: KeyPath) -> str:
    return ".".join(path)


@dataclass(frozen=True)
class ConfigIssue:
    file: Path | None
    path: KeyPath
    reason: str

    def __str__(self) -> str:
        where = [str(self.file)] if self.file is not None else []
        if self.path:
            where.append(dotted(self.path))
        return ": ".join([*where, self.reason])


class ConfigError(Exception):
    """Every problem found in one load, reported together."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))
