"""The package's shape: an import graph with no cycle, features below the loop, only
`python -m` importing the CLI; and no function too long to read at once.

Every `import` of a `llama_tune` module counts, at module level or inside a function: a lazy
import still ties the importer to the imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llama_tune

PACKAGE = Path(llama_tune.__file__).parent
FEATURES = ("llama_tune.adversarial", "llama_tune.distillation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules a source file imports (`from pkg import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                if child in known:
                    found.add(child)
                elif node.module in known:
                    found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports (the package root left out: it
    holds only the version and warning filters)."""
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {"llama_tune", name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        trail.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        trail.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "llama_tune.objective" in graph["llama_tune.train"]
    assert "llama_tune.adversarial.augment" in graph["llama_tune.assembly"]


def test_no_import_cycle() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_features_never_import_the_loop_or_the_cli() -> None:
    graph = import_graph()
    for module, imported in graph.items():
        if module != "llama_tune.__main__":
            assert "llama_tune.cli" not in imported, f"{module} imports the CLI"
        if module.startswith(FEATURES):
            assert "llama_tune.train" not in imported, f"{module} imports the training loop"


SCORING_ONLY = {"evaluate"}
"""Libraries only scoring needs, imported inside the functions that score: at module level they
would add about a second to the start of every run, most of which score nothing."""


def test_scoring_libraries_are_imported_where_a_metric_is_computed() -> None:
    found = []
    for name, path in _modules().items():
        if name.startswith("llama_tune.metrics."):  # the metric scripts evaluate itself loads
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports nothing at run time
                continue
            imported = [alias.name for alias in getattr(node, "names", [])]
            if isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [f"{name}: {module}" for module in imported if module in SCORING_ONLY]
    assert not found


LONGEST_FUNCTION = 80


def test_no_function_is_longer_than_a_screen() -> None:
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long
