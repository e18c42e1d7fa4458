"""The layering of lit_ptq, read from the source with ``ast`` (nothing is imported).

No import cycle anywhere in the package, function-level imports included; the quantization
core (``lit_ptq/quant`` outside ``plugins/``, ``transforms/`` and ``__init__.py``) imports no
model, no export backend, no transform, no plugin and no Lightning. :func:`import_graph` and
:func:`imports_of` are for other layering checks to reuse.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_ptq"


def module_name(path: Path) -> str:
    """``lit_ptq/quant/walk.py`` -> ``lit_ptq.quant.walk``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` by its dotted name."""
    return {module_name(p): p for p in sorted(package.rglob("*.py"))}


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every name the code of ``module`` imports, anywhere (function bodies included), made
    absolute: ``import a.b`` gives ``a.b``; ``from .x import y`` gives ``<package>.x.y`` (``y``
    may be a module or a name in one)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                source_name = ".".join(parts + ([node.module] if node.module else []))
            else:
                source_name = node.module or ""
            found |= {source_name if alias.name == "*" else f"{source_name}.{alias.name}" for alias in node.names}
    return found


def imports_of(path: Path) -> set[str]:
    """:func:`imports_in` for the module at ``path``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports: ``pkg.name`` counts for the module
    ``pkg.name`` when there is one, else for ``pkg`` (``from pkg import name``)."""
    mods = modules(package)

    def target(imported: str) -> Optional[str]:
        if imported in mods:
            return imported
        parent = imported.rpartition(".")[0]
        return parent if parent in mods else None

    return {
        name: {t for t in map(target, imports_of(path)) if t is not None and t != name} for name, path in mods.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of ``graph`` (its modules, the first repeated at the end), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
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


def core_modules() -> dict[str, Path]:
    """The quantization core: ``lit_ptq/quant`` outside ``plugins/``, ``transforms/`` and ``__init__.py``."""
    return {
        name: path
        for name, path in modules(PACKAGE / "quant").items()
        if path.name != "__init__.py" and not name.startswith(("lit_ptq.quant.plugins", "lit_ptq.quant.transforms"))
    }


FORBIDDEN_IN_CORE = (
    "lit_ptq.models",
    "lit_ptq.export",
    "lit_ptq.quant.transforms",
    "lit_ptq.quant.plugins",
    "pytorch_lightning",
    "lightning",
)


def forbidden_imports(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """The imports of ``path`` that are, or lie inside, one of ``forbidden``."""
    return sorted(i for i in imports_of(path) if any(i == f or i.startswith(f + ".") for f in forbidden))


def test_the_package_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_core_imports_no_model_backend_transform_plugin_or_lightning() -> None:
    core = core_modules()
    assert {"lit_ptq.quant.calibration", "lit_ptq.quant.quantize", "lit_ptq.quant.walk"} <= set(core)
    assert {name: forbidden_imports(path, FORBIDDEN_IN_CORE) for name, path in core.items()} == {name: [] for name in core}


def test_the_core_never_imports_the_package_that_loads_the_plugins() -> None:
    graph = import_graph()
    assert {name: sorted(graph[name] & {"lit_ptq", "lit_ptq.quant"}) for name in core_modules()} == {
        name: [] for name in core_modules()
    }


def test_the_model_walk_helpers_are_a_leaf() -> None:
    assert import_graph()["lit_ptq.quant.walk"] == {"lit_ptq.quant.quantizer"}


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a2"}, "a2": set(), "b": {"b"}}, ["b", "b"]),
    ],
)
def test_find_cycle_finds_what_there_is(graph: dict[str, set[str]], cycle: Optional[list[str]]) -> None:
    assert find_cycle(graph) == cycle


def test_function_level_and_relative_imports_count() -> None:
    source = "import os\n\ndef f():\n    from .b import g\n    from .. import c\n    from ..d import *\n"
    assert imports_in(source, "lit_ptq.quant.probe") == {"os", "lit_ptq.quant.b.g", "lit_ptq.c", "lit_ptq.d"}
    assert imports_in("from . import walk", "lit_ptq.quant", is_package=True) == {"lit_ptq.quant.walk"}


def test_the_module_and_the_backend_interfaces_import_no_backend() -> None:
    """``PTQModule`` evaluates the backend it is given; the backends register themselves (issue 22)."""
    for name in ("module", "backends"):
        assert forbidden_imports(PACKAGE / f"{name}.py", ("lit_ptq.export",)) == [], name
    assert "lit_ptq.backends" in import_graph()["lit_ptq.module"]
