"""Each extra declares what its program imports, read from the source (no install needed).

A program's modules are its package plus every ``edgefleet`` module it reaches, counting imports
inside functions (the CLIs import lazily). An import inside ``try: ... except ImportError`` is an
optional fallback and need not be declared; one under ``if TYPE_CHECKING:`` never runs.
Without this test an extra works only while some other extra happens to pull the package in
(the converter used tqdm through ai-edge-litert).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("edgefleet", "agent", "converter", "fleet", "device_profiles")

# top-level import name -> the distributions that provide it (add a line with the extra's entry)
PROVIDERS: dict[str, set[str]] = {
    "numpy": {"numpy"},
    "yaml": {"pyyaml"},
    "pydantic": {"pydantic"},
    "cryptography": {"cryptography"},
    "paho": {"paho-mqtt"},
    "psutil": {"psutil"},
    "xxhash": {"xxhash"},
    "PIL": {"pillow"},
    "prometheus_client": {"prometheus-client"},
    "ai_edge_litert": {"ai-edge-litert"},
    "tflite_runtime": {"tflite-runtime"},
    "tensorflow": {"tensorflow", "tensorflow-cpu"},
    "keras": {"keras"},
    "h5py": {"h5py"},
    "tqdm": {"tqdm"},
    "psycopg": {"psycopg"},
    "rich": {"rich"},
}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dist(requirement: str) -> str:
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def _declared(extra: str | None) -> set[str]:
    project = _pyproject()["project"]
    reqs = project["dependencies"] + ([] if extra is None else project["optional-dependencies"][extra])
    return {_dist(r) for r in reqs}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in PROJECT for p in sorted((REPO / top).rglob("*.py"))}


def _skipped(tree: ast.AST) -> tuple[set[int], set[int]]:
    """Ids of import nodes under ``if TYPE_CHECKING`` (never run) and under ``except ImportError`` tries."""
    never: set[int] = set()
    optional: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            never.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        elif isinstance(node, ast.Try) and any(
                h.type is not None and re.search(r"\b(ImportError|ModuleNotFoundError)\b", ast.unparse(h.type))
                for h in node.handlers):
            optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return never, optional


def _imports(path: Path, module: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(project modules, required third-party top-level names) imported by one file."""
    tree = ast.parse(path.read_text(), str(path))
    never, optional = _skipped(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    project: set[str] = set()
    third: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in never:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top in PROJECT:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    project.add(name)
            elif top not in sys.stdlib_module_names and top != "__future__" and id(node) not in optional:
                third.add(top)
    return project, third


def _program_imports(program: str) -> dict[str, set[str]]:
    """Third-party name -> the modules of ``program`` (and the contract it reaches) that import it."""
    sources = _sources()
    known = set(sources)
    todo = [m for m in sources if m.split(".")[0] == program]
    seen: set[str] = set()
    found: dict[str, set[str]] = {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        project, third = _imports(sources[mod], mod, known)
        todo.extend(project - seen)
        for name in third:
            found.setdefault(name, set()).add(mod)
    return found


@pytest.mark.parametrize("program", ["agent", "converter", "fleet"])
def test_every_third_party_import_of_a_program_is_declared_by_its_extra(program: str) -> None:
    declared = _declared(program)
    missing = []
    for name, modules in sorted(_program_imports(program).items()):
        assert name in PROVIDERS, f"{name} (imported by {sorted(modules)}): add it to PROVIDERS and to the extra"
        if not PROVIDERS[name] & declared:
            missing.append(f"{name} (imported by {', '.join(sorted(modules))})")
    assert not missing, f"the {program!r} extra does not declare: " + "; ".join(missing)


def test_the_converter_extra_declares_tqdm_it_does_not_get_it_through_another_package() -> None:
    assert "tqdm" in _program_imports("converter")
    assert "tqdm" in _declared("converter")


def test_the_tflite_runtime_extra_is_the_agent_extra_with_the_legacy_runtime() -> None:
    agent = _declared("agent") - {"ai-edge-litert"}
    legacy = _declared("tflite-runtime")
    assert agent <= legacy, f"missing from [tflite-runtime]: {sorted(agent - legacy)}"
    assert "ai-edge-litert" in _declared("agent") and "tflite-runtime" in legacy


def test_the_agent_never_depends_on_tensorflow() -> None:
    assert not {"tensorflow", "tensorflow-cpu", "keras"} & _declared("agent")
    assert "tensorflow" not in _program_imports("agent")


def test_the_package_has_one_version_and_reads_it_from_the_installed_metadata() -> None:
    project = _pyproject()["project"]
    assert "version" in project and "version" not in project.get("dynamic", [])
    assert re.search(r'version\("edgefleet"\)', (REPO / "edgefleet" / "__init__.py").read_text())
    stray = [str(p.relative_to(REPO)) for top in PROJECT for p in (REPO / top).rglob("*.py")
             if re.search(rf"""['"]{re.escape(project["version"])}['"]""", p.read_text())]
    assert not stray, f"version {project['version']} written out in {stray}: use edgefleet.__version__"
