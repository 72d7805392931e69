"""The shape of patchd, read from its source with `ast`: the layers, no import cycle, no
module over 500 lines, one poll loop and one command runner.

Every import counts: at module level, inside functions, and under `if TYPE_CHECKING:` (a
type-only import is still a dependency of the code that names the type). Each module is a
node of its own; a package counts by its `__init__` module (importing
`patchd.backends.base` depends on that module, not on `patchd.backends`).

Known violations that another branch of this round removes are listed with that branch's
name; an entry that no longer holds fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "patchd"
MAX_LINES = 500

# The layers, lowest first. A module imports from its own layer and the layers below; an
# import of a higher layer "runs back up". Module names match exactly or as a package
# prefix (`patchd.backends` holds `patchd.backends.vsphere.vms`); the root package
# `patchd` (its version) matches only itself. Names not written yet are where the rooms
# of DESIGN.md go when they land.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "leaf",  # no knowledge of patchd's rooms: values, math, I/O helpers
        (
            "patchd",
            "patchd.durations",
            "patchd.windows",
            "patchd.faults",
            "patchd.states",
            "patchd.log",
            "patchd.notify",
            "patchd.systemd",
            "patchd.commands",
            "patchd.poll",
            "patchd.plugins",
            "patchd.serving",
            "patchd.versions",
            "patchd.acting",
        ),
    ),
    ("config", ("patchd.config",)),
    ("backends", ("patchd.backends", "patchd.guest", "patchd.testing")),
    ("state", ("patchd.state",)),
    ("engine", ("patchd.engine",)),
    ("health", ("patchd.health",)),
    (
        "runtime",
        (
            "patchd.runtime",
            "patchd.runner",
            "patchd.reconcile",
            "patchd.retries",
            "patchd.reports",
            "patchd.compliance",
            "patchd.metrics",
            "patchd.observers",
            "patchd.notifications",
        ),
    ),
    ("front doors", ("patchd.daemon", "patchd.ha", "patchd.cli", "patchd.control")),
]

# At most one import may run back up a layer for good, written here with its reason.
LASTING_UPWARD: dict[tuple[str, str], str] = {}

# (importer, imported) -> the branch whose merge removes that upward import.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Module file (relative to patchd/) -> the branch that brings it under MAX_LINES.
KNOWN_LONG: dict[str, str] = {}

# Files allowed a deadline loop of their own -> the branch that moves them onto poll.py.
KNOWN_POLL_LOOPS: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@cache
def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in _modules().items()}


def _imports(name: str, path: Path, tree: ast.Module, known: set[str]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "patchd":
                    yield Import(name, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "patchd":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from patchd import health` imports a module; `from patchd.x import Y` a name.
                yield Import(name, submodule if submodule in known else base, node.lineno)


@cache
def _graph() -> list[Import]:
    modules = _modules()
    trees = _trees()
    found = []
    for name, tree in trees.items():
        found.extend(i for i in _imports(name, modules[name], tree, set(modules)))
    return [i for i in found if i.imported != i.importer]


def _layer(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(LAYERS):
        for prefix in names:
            matches = module == prefix or (prefix != "patchd" and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[1]


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_no_import_cycle() -> None:
    edges: dict[str, set[str]] = {}
    for imp in _graph():
        edges.setdefault(imp.importer, set()).add(imp.imported)
    assert _cycles(edges) == []


def test_imports_run_down_the_layers() -> None:
    upward = {
        (i.importer, i.imported): i.line
        for i in _graph()
        if _layer(i.imported) > _layer(i.importer)
    }
    assert len(LASTING_UPWARD) <= 1, "at most one import may run back up a layer"
    unexpected = sorted(
        f"{a} (line {line}, {LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for (a, b), line in upward.items()
        if (a, b) not in KNOWN_UPWARD and (a, b) not in LASTING_UPWARD
    )
    assert unexpected == []
    fixed = sorted(
        f"{edge} ({branch})" for edge, branch in KNOWN_UPWARD.items() if edge not in upward
    )
    assert fixed == [], "fixed: remove these from KNOWN_UPWARD"


def test_no_module_over_500_lines() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in ROOT.rglob("*.py")
    }
    long = sorted(
        f"{f}: {n} lines" for f, n in lengths.items() if n > MAX_LINES and f not in KNOWN_LONG
    )
    assert long == []
    fixed = sorted(f for f in KNOWN_LONG if lengths.get(f, 0) <= MAX_LINES)
    assert fixed == [], "now short enough: remove these from KNOWN_LONG"


def _loops_until_a_deadline(tree: ast.Module) -> list[int]:
    """Lines of `while` loops that sleep and look at the clock (monotonic or a deadline)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.While):
            continue
        names = {
            n.attr if isinstance(n, ast.Attribute) else n.id
            for n in ast.walk(node)
            if isinstance(n, ast.Attribute | ast.Name)
        }
        if "sleep" in names and ({"monotonic", "deadline"} & names):
            lines.append(node.lineno)
    return lines


def test_one_poll_loop() -> None:
    loops = {
        str(path.relative_to(ROOT)): found
        for path in ROOT.rglob("*.py")
        if (found := _loops_until_a_deadline(ast.parse(path.read_text())))
    }
    assert set(loops) - set(KNOWN_POLL_LOOPS) == {"poll.py"}, "use patchd.poll.until or steady"
    fixed = sorted(f for f in KNOWN_POLL_LOOPS if f not in loops)
    assert fixed == [], "now on patchd.poll: remove these from KNOWN_POLL_LOOPS"


def test_one_command_runner() -> None:
    """Only patchd.commands starts processes (process group, timeout, scrubbed output)."""
    starting = sorted(
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if "subprocess"
        in {
            alias.name.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (
                node.names if isinstance(node, ast.Import) else [ast.alias(name=node.module or "")]
            )
        }
    )
    assert starting == ["commands.py"]


def test_the_checks_see_what_they_look_for() -> None:
    """The rules above would catch a violation (a test that cannot fail is a defect)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("patchd.config.settings") < _layer("patchd.backends.vsphere.vms")
    assert _layer("patchd") == 0 and _layer("patchd.states") == 0
    assert LAYERS[_layer("patchd.state.sqlite")][0] == "state"
    loop = "while True:\n    if time.monotonic() > deadline:\n        break\n    time.sleep(1)\n"
    assert _loops_until_a_deadline(ast.parse(loop)) == [1]
    tree = ast.parse("from patchd import health\nfrom patchd.config.settings import Group\n")
    known = {"patchd.health", "patchd.config.settings"}
    imported = [i.imported for i in _imports("patchd.x", ROOT / "x.py", tree, known)]
    assert imported == ["patchd.health", "patchd.config.settings"]
