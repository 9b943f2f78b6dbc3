"""The package's import graph: no cycles, the schema at the bottom, no function-local imports.

Read from the source with `ast` (nothing is imported), so a cycle hidden behind TYPE_CHECKING or
inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "merge_distill"
# Function-local imports allowed: heavy optional dependencies, imported only when used.
LOCAL_IMPORTS_ALLOWED = {"deepspeed", "vllm"}
# The schema may import only these of the package (the registries of routers and losses, which
# import torch and pydantic alone) and itself.
SCHEMA_MAY_IMPORT = ("merge_distill.schema", "merge_distill.routing", "merge_distill.losses", "merge_distill.registry",
                     "merge_distill.errors", "merge_distill.signals")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(module: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The package's modules that one import statement reaches."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            parts = parts if known[module].name == "__init__.py" else parts[:-1]
            base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("merge_distill") and name != module:
            out.add(name)
    return out


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> modules it imports, 'module: what' for every function-local import)."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    local = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module] |= imported(module, node, known)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        top = (node.names[0].name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                        if getattr(node, "level", 0) or top not in LOCAL_IMPORTS_ALLOWED:
                            local.append(f"{module}: {ast.unparse(node)}")
    return edges, local


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()[0]) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_local_imports() -> None:
    assert graph()[1] == []


def test_the_schema_imports_nothing_from_the_runtime() -> None:
    edges = graph()[0]
    for module in (m for m in edges if m.startswith("merge_distill.schema")):
        runtime = sorted(m for m in edges[module] if not m.startswith(SCHEMA_MAY_IMPORT))
        assert runtime == [], f"{module} imports {runtime}"
    # and what it may import stays below it: routers and losses never reach back into the runtime
    below = [m for m in edges if m.startswith(SCHEMA_MAY_IMPORT[1:])]
    for module in below:
        assert all(m.startswith(SCHEMA_MAY_IMPORT) for m in edges[module]), (module, edges[module])
