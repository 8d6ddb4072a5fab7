"""The package's import graph: no circle, and no room importing upward. Every import of one of
st_scale's own modules counts, at the top of a file or inside a function (a function-level import hides
a circle; it does not break it); one inside a function says why it is there."""

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
    assert {"st_scale.train.loop", "st_scale.assembly", "st_scale.data.loaders"} <= set(graph)
    assert "st_scale.sweep.study" in graph["st_scale.cli"]  # function-level imports are seen
    assert circles(graph) == [], "\n".join(" -> ".join(c) for c in circles(graph))


def test_a_circle_hidden_in_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n")
    (package / "b.py").write_text("def g():\n    from . import a\n")
    (package / "c.py").write_text("from pkg import a\n")
    assert circles(own_imports(package)) == [["pkg.a", "pkg.b", "pkg.a"]]


# The rooms of the package from the bottom up: a room imports only rooms of lower layers (a room is a
# top-level module or a sub-package; inside a sub-package its modules import each other freely, without
# a circle). A new module takes its place here.
LAYERS = (
    ("st_scale", "recipes", "errors", "schema", "provenance", "sampling", "ema"),
    ("storage", "tracking", "models"),
    ("methods",),
    ("config",),
    ("data", "checkpoint"),
    ("assembly",),
    ("evaluate",),
    ("train",),
    ("sweep",),
    ("demo",),
    ("cli",),
    ("__main__",),
)
LAYER_OF = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_room_imports_only_rooms_below_it():
    graph = own_imports(PACKAGE)
    unplaced = sorted({room(m) for m in graph} - set(LAYER_OF))
    assert not unplaced, f"rooms without a layer in LAYERS: {unplaced}"
    upward = [
        f"{module} -> {imported}"
        for module, imported_modules in sorted(graph.items())
        for imported in sorted(imported_modules)
        if room(module) != room(imported) and LAYER_OF[room(imported)] >= LAYER_OF[room(module)]
    ]
    assert upward == [], "imports that do not go down:\n" + "\n".join(upward)


def function_level_imports(package: Path) -> list[tuple[Path, int, str]]:
    """(file, line, the line above it or above its group of imports) of every import of the package's
    own modules inside a function."""
    found = []
    for path in sorted(package.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                own = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("st_scale"))
                if own:
                    above = node.lineno - 2
                    while above > 0 and lines[above].strip().startswith(("from ", "import ", ")")):
                        above -= 1
                    found.append((path, node.lineno, lines[above].strip()))
    return found


def test_an_import_inside_a_function_says_why():
    """The package's own modules are imported at the top of a file, except where a heavy dependency
    (torch, Ray, DeepSpeed, FFCV, MLflow) must stay unloaded until a command needs it: the comment
    above such an import (or above its group) says so."""
    unexplained = []
    for path, line, before in function_level_imports(PACKAGE):
        if not before.startswith("#"):
            unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert unexplained == [], "imports inside a function without a comment above them:\n" + "\n".join(unexplained)


def test_mlflow_is_reached_through_tracking_alone():
    """One module speaks to MLflow: the others call `tracking`'s RunTracker and Store."""
    speaking = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "mlflow" or name.startswith("mlflow.") for name in names):
                speaking.append(str(path.relative_to(PACKAGE.parent)))
    assert sorted(set(speaking)) == ["st_scale/tracking.py"]
