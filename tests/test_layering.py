"""The house: every module of `optima/` has a floor (CONTRIBUTING.md, "Floors")
and imports only from floors below its own, so there is no import cycle, and
nothing in `optima/` imports `optima.plugins` or `optima.cli`.

Imports are read with `ast`, every one of them: at the top of a module, inside
a function (a lazy import) or under `if TYPE_CHECKING`. A lazy import counts: it
only delays the cycle to the first call, the design still has it.
`importlib.import_module(name)` is not an import here: that is how the registry
loads plugins (the built-in one too), by name, as it loads entry points.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "optima"
ABOVE = ("optima.plugins", "optima.cli")  # what stands on `optima/`


def _modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_names(source: str) -> list[tuple[str, int]]:
    """Every dotted name `source` (a module of `optima/`) imports, with its
    line: `import a.b` gives `a.b`; `from a import b` gives `a` and `a.b`
    (b may be a module); relative imports are resolved."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:  # `optima/` is flat: `.x` is `optima.x`
                base = f"optima.{base}" if base else "optima"
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def imports_of(module: str, modules: list[str]) -> dict[str, int]:
    """`optima.<module>`'s imports among `modules` (name -> first line)."""
    found: dict[str, int] = {}
    for name, line in imported_names((PACKAGE / f"{module}.py").read_text(encoding="utf-8")):
        parts = name.split(".")
        if parts[0] == "optima" and len(parts) > 1 and parts[1] in modules and parts[1] != module:
            found.setdefault(parts[1], line)
    return found


def documented_floors() -> dict[str, int]:
    """module -> floor, from CONTRIBUTING.md's "Floors" table."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("### Floors", 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.M)[0]
    floors: dict[str, int] = {}
    for number, cell in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, flags=re.M):
        for module in re.findall(r"`([\w.]+)`", cell):
            assert module not in floors, f"CONTRIBUTING.md puts {module} on two floors"
            floors[module] = int(number)
    return floors


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_every_module_has_a_floor_and_imports_only_below_it():
    modules = _modules()
    floors = documented_floors()
    assert sorted(set(modules) - set(floors)) == [], "give these modules a floor in CONTRIBUTING.md"
    assert sorted(set(floors) - set(modules)) == [], "CONTRIBUTING.md's floors name modules that do not exist"
    wrong = [f"optima/{m}.py:{line} imports optima.{dep} (floor {floors[dep]}, not below its own {floors[m]})"
             for m in modules for dep, line in imports_of(m, modules).items() if floors[dep] >= floors[m]]
    assert wrong == []


def test_no_import_cycle_in_optima():
    modules = _modules()
    cycle = find_cycle({m: set(imports_of(m, modules)) for m in modules})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_optima_imports_nothing_above_it():
    upward = [f"optima/{m}.py:{line} imports {name}" for m in _modules()
              for name, line in imported_names((PACKAGE / f"{m}.py").read_text(encoding="utf-8"))
              if ".".join(name.split(".")[:2]) in ABOVE]
    assert upward == []


# The checks themselves, on made-up modules: a lazy import and a `from optima import x` count.
@pytest.mark.parametrize("source, expected", [
    ("def f():\n    from optima.experiment import declared\n", {"experiment"}),
    ("from optima import config as cfg\n", {"config"}),
    ("import optima.bandit  # noqa\n", {"bandit"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from optima.engine import Distiller\n", {"engine"}),
    ("from .export import read_run\n", {"export"}),
])
def test_the_import_reader_sees_every_kind_of_import(source, expected, tmp_path, monkeypatch):
    modules = ["bandit", "config", "engine", "experiment", "export", "probe"]
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    (tmp_path / "probe.py").write_text(source)
    assert set(imports_of("probe", modules)) == expected


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    assert find_cycle({"config": {"registry", "experiment"}, "experiment": {"config"}, "registry": set()}) == [
        "config", "experiment", "config"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
