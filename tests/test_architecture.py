"""The import graph is one-directional: no module imports one above it in
docs/ARCHITECTURE.md's import order, and no two modules import each other in a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"graphsearch": ROOT / "graphsearch", "graphsearch.passes": ROOT / "passes"}


def import_order() -> list[list[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"^## Import order\n.*?```text\n(.*?)```", text, re.S | re.M).group(1)
    return [line.split() for line in block.strip().splitlines()]


def project_modules() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([package, *parts])] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in mods and t != name}
    return found


def layer_of(name: str, order: list[list[str]]) -> int | None:
    short = name.removeprefix("graphsearch.")
    for i, line in enumerate(order):
        if any(short == m or short.startswith(m + ".") for m in line):
            return i
    return None


def test_every_module_is_in_the_import_order():
    order = import_order()
    missing = [m for m in project_modules() if m != "graphsearch" and layer_of(m, order) is None]
    assert missing == []


def test_no_module_imports_one_above_it():
    order, mods = import_order(), project_modules()
    upward = []
    for name, path in mods.items():
        if name == "graphsearch":
            continue  # the package's front door re-exports
        for dep in imports_of(name, path, mods):
            if dep != "graphsearch" and layer_of(dep, order) > layer_of(name, order):
                upward.append(f"{name} -> {dep}")
            elif dep == "graphsearch":
                upward.append(f"{name} -> graphsearch (import the module, not the package)")
    assert upward == []


def test_no_import_circle():
    mods = project_modules()
    g = nx.DiGraph((name, dep) for name, path in mods.items()
                   for dep in imports_of(name, path, mods))
    assert list(nx.simple_cycles(g)) == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an import in a function counts, and resolves relative names."""
    path = tmp_path / "graph.py"
    path.write_text("def f():\n    from .analysis import analyze\n")
    mods = {"graphsearch.graph": path, "graphsearch.analysis": path}
    assert imports_of("graphsearch.graph", path, mods) == {"graphsearch.analysis"}
    order = import_order()
    assert layer_of("graphsearch.analysis", order) > layer_of("graphsearch.graph", order)


def test_passes_submodules_are_not_shadowed_by_functions():
    import graphsearch.passes
    from graphsearch.passes.mask import mask
    from graphsearch.passes.slim import slim, unslim_state

    assert graphsearch.passes.slim.unslim_state is unslim_state
    assert graphsearch.passes.slim.slim is slim and graphsearch.passes.mask.mask is mask
    assert graphsearch.passes.latency.parse_latency("2ms") == 2.0


def test_passes_import_the_project_absolutely():
    """`from ..graph` reads wrong for a folder at the top of the repository."""
    relative = [f"{path.name}: from {'.' * node.level}{node.module or ''}"
                for path in (ROOT / "passes").glob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_every_file_the_tool_writes_goes_through_the_one_atomic_writer():
    """checkpoint.py's writer (a temporary file renamed into place): no other module writes
    a file itself. The ONNX exporter writes its own file (export.py checks it right after)."""
    direct = re.compile(r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wa]b?['\"]|"
                        r"json\.dump\(|torch\.save\((?!obj, (buf|f)\))|torch\.export\.save\("
                        r"(?!program, buf\))|savefig\((?!buf)")
    found = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
             for path in project_modules().values() if path.name != "checkpoint.py"
             for i, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert found == []
