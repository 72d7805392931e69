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
        return one_line(": ".join([*where, self.reason]))


def one_line(text: str) -> str:
    """`text` with every unprintable character escaped (`\\n`, `\\x1b`, `\\u2028`).

    Key names and values come from the config and may hold any character: a newline
    would split one problem over two lines (the second not naming the file), and a
    terminal escape would reach the operator's terminal or the journal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class ConfigError(Exception):
    """Every problem found in one load, reported together."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))
