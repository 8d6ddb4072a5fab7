"""The package's import graph has no circle: every import of one of st_scale's own modules counts, at
the top of a file or inside a function (a function-level import hides a circle; it does not break it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "st_scale"


def own_imports(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, modules named like `st_scale.data.loaders`."""
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        here = module if files[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1]) if node.level else ""
        base = ".".join(filter(None, [base, node.module]))
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]

    graph = {}
    for module, path in files.items():
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[module] = {t for n in nodes for t in targets(module, n) if t in files and t != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                found.append(path[path.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_no_module_of_the_package_imports_itself_through_others():
    graph = own_imports(PACKAGE)
    assert {"st_scale.train_loop", "st_scale.assembly", "st_scale.data.loaders"} <= set(graph)
    assert "st_scale.assembly" in graph["st_scale.checkpoint_eval"]  # function-level imports are seen
    assert circles(graph) == [], "\n".join(" -> ".join(c) for c in circles(graph))


def test_a_circle_hidden_in_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n")
    (package / "b.py").write_text("def g():\n    from . import a\n")
    (package / "c.py").write_text("from pkg import a\n")
    assert circles(own_imports(package)) == [["pkg.a", "pkg.b", "pkg.a"]]
