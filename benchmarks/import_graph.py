"""The project's import graph (module -> project modules it imports, functions included) and
the imports written inside functions, as tests/test_architecture.py reads them:

    python benchmarks/import_graph.py
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_architecture import imports_of, project_modules  # noqa: E402


def in_functions(path: Path) -> tuple[int, int]:
    """(imports inside functions, of them the project's own)."""
    tree = ast.parse(path.read_text())
    found = [s for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for s in ast.walk(f) if isinstance(s, (ast.Import, ast.ImportFrom))]
    found = list({id(s): s for s in found}.values())  # nested functions: once
    own = [s for s in found if isinstance(s, ast.ImportFrom) and
           (s.level or (s.module or "").startswith("graphsearch"))]
    return len(found), len(own)


def main() -> None:
    mods = project_modules()
    total = own_total = 0
    for name in sorted(mods):
        deps = sorted(d.removeprefix("graphsearch.") for d in imports_of(name, mods[name], mods))
        n, own = in_functions(mods[name])
        total, own_total = total + n, own_total + own
        print(f"{name.removeprefix('graphsearch.') or 'graphsearch'} [{n} in functions, "
              f"{own} of the project]: {', '.join(deps)}")
    print(f"imports inside functions: {total} (of the project's own modules: {own_total})")


if __name__ == "__main__":
    main()
