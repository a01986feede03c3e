"""The layout's rules, read from the source: the three programs share only the contract.

* ``agent``, ``converter`` and ``fleet`` never import each other; ``edgefleet`` (the contract)
  imports none of them; so the device never depends on host code and the programs cannot drift.
* No import cycle between modules, counting imports inside functions (they hide cycles) but not
  ``if TYPE_CHECKING:`` blocks.
* Nothing outside ``tests/`` imports ``tests``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("agent", "converter", "fleet")
CONTRACT = "edgefleet"
PACKAGES = (CONTRACT, *PROGRAMS, "device_profiles")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*tops: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its file."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.add(candidate if candidate in known else base)
    return out


def _graph(*tops: str) -> dict[str, set[str]]:
    sources = _sources(*tops)
    known = set(sources)
    return {mod: _imports(path, mod, known) for mod, path in sources.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_programs_import_only_the_contract_never_each_other() -> None:
    bad = []
    for mod, imported in _graph(*PACKAGES, "scripts").items():
        top = _top(mod)
        for target in imported:
            other = _top(target)
            if top in PROGRAMS and other in PROGRAMS and other != top:
                bad.append(f"{mod} imports {target}")
            if top == CONTRACT and other in PROGRAMS:
                bad.append(f"{mod} (the contract) imports {target}")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle_between_modules() -> None:
    graph = _graph(*PACKAGES)
    edges = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("top", [*PACKAGES, "scripts"])
def test_nothing_outside_tests_imports_tests(top: str) -> None:
    bad = [f"{mod} imports {t}" for mod, ts in _graph(top).items() for t in ts if _top(t) == "tests"]
    assert not bad, "\n".join(bad)


def test_the_layout_rules_see_a_cross_import(tmp_path: Path) -> None:
    """The checker itself: an import of another program inside a function is found."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from converter.pipeline import convert\n")
    assert "converter.pipeline" in _imports(src, "agent.mod", {"converter.pipeline"})
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fleet import cli\n")
    assert not {t for t in _imports(src, "agent.mod", set()) if _top(t) == "fleet"}
