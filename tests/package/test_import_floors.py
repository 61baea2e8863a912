"""The package's import graph: imports only go down the floors, and no module imports itself back in a circle.

Run alone as a check anyone can repeat: `python -m pytest tests/package/test_import_floors.py -q`, or
`python tests/package/test_import_floors.py` to print the graph's floors and edges.

Every `import`/`from ... import` in every module counts, including the lazy ones inside functions (they still make
the modules depend on each other); only imports under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import optimum_lrpq

PACKAGE = "optimum_lrpq"
ROOT = Path(optimum_lrpq.__file__).parent

# Top to bottom. A module may import modules of its own floor or of any floor below it, never above.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("entry points", ("optimum_lrpq", "optimum_lrpq.cli", "optimum_lrpq.demo")),
    ("integration", ("optimum_lrpq.integration", "optimum_lrpq.export")),
    ("pipeline", ("optimum_lrpq.pipeline", "optimum_lrpq.reporting", "optimum_lrpq.data", "optimum_lrpq.metrics")),
    ("algorithms", ("optimum_lrpq.relevance", "optimum_lrpq.allocation")),
    ("modules", ("optimum_lrpq.models", "optimum_lrpq.nn")),
    ("kernels and math", ("optimum_lrpq.kernels", "optimum_lrpq.quantization")),
    ("foundation", ("optimum_lrpq.configuration", "optimum_lrpq.options", "optimum_lrpq.version")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            matches = module == prefix or (module.startswith(prefix + ".") and prefix != PACKAGE)
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add its folder to FLOORS in {Path(__file__).name}.")
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that `path` imports (resolved to the most specific existing module)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.add(resolve(alias.name))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module or ""
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in child.names:  # `from . import x` may name a submodule
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else resolve(base))
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(None)
    found.discard(this)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{src} ({FLOORS[floor_of(src)][0]}) imports {dst} ({FLOORS[floor_of(dst)][0]})"
        for src, targets in graph.items() for dst in targets if floor_of(dst) < floor_of(src)
    )


def test_every_module_is_on_a_floor():
    for module in import_graph():
        floor_of(module)


def test_no_upward_import():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    cycle = _find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_checker_sees_lazy_and_relative_imports(tmp_path):
    """The walker must see imports inside functions and resolve `..` (else the two checks above prove nothing)."""
    graph = import_graph()
    assert "optimum_lrpq.integration.quantizer" in graph["optimum_lrpq"]
    assert "optimum_lrpq.kernels" in graph["optimum_lrpq.nn.registry"]  # imported inside a function
    assert any(dst.startswith("optimum_lrpq.quantization") for dst in graph["optimum_lrpq.nn.weights"])
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


if __name__ == "__main__":
    g = import_graph()
    for src in sorted(g):
        print(f"[{FLOORS[floor_of(src)][0]}] {src} -> {', '.join(sorted(g[src])) or '-'}")
    print("upward:", *upward_imports(g), sep="\n  ")
    print("cycle:", _find_cycle(g))
