"""Imports only point down (STYLE.md rule 11, DESIGN.md "Where things live").

Walks every ``import`` statement of every module under ``src/moewire`` (with ``ast``, so
imports inside functions count too) and checks two rules:

- a module imports only from its own unit or from a unit in a lower layer of ``LAYERS``;
- the modules' import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Lowest first. A unit is a subpackage or a top-level module of ``moewire``; units in one
#: layer are peers and import nothing of each other.
LAYERS: list[tuple[str, ...]] = [
    ("constants",),
    ("formats",),
    ("comm",),
    ("moe",),
    ("graphs",),  # CUDA-graph capture of the layer
    ("integrations", "moewire"),  # "moewire": the package's own __init__ (public front)
    ("eval",),
    ("testing",),  # data generators, SQNR, the process-spawn helper
    ("bench", "check"),  # "check" holds check.py and check_dist.py
    ("cli",),  # the ``moewire`` command (and __main__): runs bench, check, eval
]

#: Top-level modules that belong to another unit.
_UNIT_OF = {"check_dist": "check", "__main__": "cli"}

_RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "moewire").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "moewire"
    return _UNIT_OF.get(parts[1], parts[1])


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, str]]:
    """``(imported module, line, statement text)`` for every moewire import in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name not in known and "." in name:  # `from pkg import name`: name's module
                name = name.rsplit(".", 1)[0]
            if name in known and name != module:
                found.append((name, node.lineno, ast.unparse(node)))
    return found


def _graph() -> dict[str, list[tuple[str, int, str]]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    missing = sorted(units - set(_RANK))
    assert not missing, f"add these to LAYERS in tests/test_layering.py: {missing}"


def test_imports_point_down():
    bad = []
    for module, imports in _graph().items():
        src = _unit(module)
        for target, line, text in imports:
            dst = _unit(target)
            if dst != src and _RANK.get(dst, -1) >= _RANK.get(src, -1):
                where = "a peer" if _RANK.get(dst) == _RANK.get(src) else "a higher layer"
                bad.append(f"{module} (line {line}) imports {dst}, {where}: `{text}`")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in imports}) for m, imports in _graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                return [*path[path.index(t) :], t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))
