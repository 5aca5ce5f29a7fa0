"""The architecture as a test: one-way layers, no import cycles, modules and functions of a
readable size.

The import graph is read from the source with ``ast``, so it counts every import, also the
ones inside functions: a lazy import that only hides a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sl_pipeline", "privacy", "workers")
MAX_TOP_LEVEL_WORKERS = 8
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50
# Which project packages a package may import, and which outside modules it must not.
MAY_IMPORT = {"sl_pipeline": set(), "privacy": {"sl_pipeline"}, "workers": set(PACKAGES)}
TRANSPORT = ("zmq", "sl_pipeline.transport", "aiohttp")
MUST_NOT_IMPORT = {"sl_pipeline": (), "privacy": TRANSPORT, "workers": ()}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    return {
        module_name(path): path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
    }


def imported_names(name: str, path: Path, modules: Iterable[str]) -> Iterator[tuple[str, int]]:
    """Every project module ``name`` imports, and every outside one, with its line, wherever
    the import statement is. ``from pkg import module`` counts as importing the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            for target in submodules or [base]:
                yield target, node.lineno


def import_graph() -> dict[str, set[str]]:
    modules = sources()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in imported_names(name, path, modules):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    # Prepare
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    # Execute / Assert
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_one_way() -> None:
    wrong = []
    modules = sources()
    for name, path in modules.items():
        layer = name.split(".")[0]
        for target, line in imported_names(name, path, modules):
            top = target.split(".")[0]
            if top in PACKAGES and top != layer and top not in MAY_IMPORT[layer]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
            if any(target == t or target.startswith(t + ".") for t in MUST_NOT_IMPORT[layer]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the transport ({target})")
    assert not wrong, "layer violations:\n" + "\n".join(wrong)


def test_workers_top_level_is_small() -> None:
    """Modules and packages side by side at the top of ``workers/`` (not its own
    ``__init__``/``__main__``): a newcomer's first view of the workers."""
    here = ROOT / "workers"
    modules = [p.name for p in here.glob("*.py") if p.stem not in ("__init__", "__main__")]
    packages = [p.name for p in here.iterdir() if (p / "__init__.py").exists()]
    top = sorted(modules + packages)
    assert len(top) <= MAX_TOP_LEVEL_WORKERS, f"workers/ has {len(top)} top-level modules: {top}"


def test_no_module_over_the_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sources().values()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def long_functions() -> dict[str, int]:
    """``module.Class.function`` (or ``module.function``) -> its lines, over the limit."""
    found = {}
    for name, path in sources().items():
        tree = ast.parse(path.read_text(), str(path))
        for qualified, node in _functions(name, tree):
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                found[qualified] = lines
    return found


def _functions(prefix: str, node: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qualified = f"{prefix}.{child.name}"
            if not isinstance(child, ast.ClassDef):
                yield qualified, child
            yield from _functions(qualified, child)


def test_no_function_over_the_limit() -> None:
    long = long_functions()
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_architecture_page_names_only_modules_that_exist() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:sl_pipeline|privacy|workers)/[\w/]*\.py)", page))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert len(named) > 20 and not missing, f"docs/architecture.md names missing modules: {missing}"
