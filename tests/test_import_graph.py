"""The modules of ``pipeline/`` and ``kernels/`` import one way: no cycles.

Every import counts, including those deferred into a function body (a deferred import is still
a dependency; deferring it only hides the cycle from the interpreter). Imports under
``if TYPE_CHECKING:`` are annotations only: they are skipped for the runtime graph, and counted
in a second graph that must be free of cycles too (a type-only circle is still a circle in the
design). ``kernels/`` is the lower layer: it imports nothing from ``pipeline/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "kernels")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, here: str, is_package: bool, type_checking: bool = False) -> set[str]:
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package counts as its ``__init__``);
    ``type_checking`` counts the imports under ``if TYPE_CHECKING:`` too."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = _imported(tree, name, path.name == "__init__.py", type_checking)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_deferred_and_relative_imports_count():
    tree = ast.parse("def f():\n    from . import bench\n    from .export.onnx import x\n")
    relative = {"pipeline.run.bench", "pipeline.run.export.onnx"}  # resolved against the package
    assert _imported(tree, "pipeline.run.pipeline", False) >= relative
    assert _imported(tree, "pipeline.run", True) >= relative
    guarded = ast.parse("if TYPE_CHECKING:\n    import pipeline.bench.sweep\n")
    assert "pipeline.bench.sweep" not in _imported(guarded, "pipeline.run.pipeline", False)


def test_project_imports_have_no_cycle():
    graph = import_graph()
    assert "pipeline.cli.main" in graph and "kernels.bounded_bn" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_type_checking_imports_have_no_cycle_either():
    guarded = ast.parse("if TYPE_CHECKING:\n    import pipeline.bench.sweep\n")
    assert "pipeline.bench.sweep" in _imported(guarded, "pipeline.run.pipeline", False, type_checking=True)
    graph = import_graph(type_checking=True)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle through TYPE_CHECKING: " + " -> ".join(cycle or [])


def test_kernels_import_nothing_from_pipeline():
    graph = import_graph(type_checking=True)
    upward = {
        (module, target)
        for module, targets in graph.items()
        if module.split(".")[0] == "kernels"
        for target in targets
        if target.split(".")[0] == "pipeline"
    }
    assert not upward, f"kernels/ -> pipeline/ imports: {sorted(upward)}"


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Stage folder of ``pipeline/`` (``train``, ``prune``, ...) -> the other folders it imports."""

    def folder(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "pipeline" and len(parts) > 2 else None

    stages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if (here := folder(module)) is not None:
            stages.setdefault(here, set()).update(
                t for t in map(folder, targets) if t is not None and t != here
            )
    return stages


def test_stage_folders_import_one_way():
    # A folder-level circle (train -> prune -> train) is a design circle even when every module
    # import is one way; none is allowed, type-only imports included
    assert find_cycle(stage_graph({"pipeline.a.x": {"pipeline.b.y"}, "pipeline.b.y": {"pipeline.a.z"}, "pipeline.a.z": set()})) == ["a", "b", "a"]  # fmt: skip
    stages = stage_graph(import_graph(type_checking=True))
    assert {"core", "train", "prune", "fold", "export", "bench", "run", "cli"} <= set(stages)
    cycle = find_cycle(stages)
    assert cycle is None, "stage folders import in a circle: " + " -> ".join(cycle or [])
    assert not stages["core"], f"core/ is shared by every stage and imports none: {stages['core']}"


def test_pipeline_shows_its_stages_as_folders():
    loose = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert loose == ["__init__.py", "config.py"], f"modules outside a stage folder: {loose}"
    tests = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    mirrored = {p.parent.name for p in (ROOT / "tests").glob("*/test_*.py")}
    stages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").exists()}
    assert mirrored <= stages | {"kernels"}, f"test folders without a stage: {mirrored - stages}"
    assert all(name in PROJECT_TESTS for name in tests), f"unsorted tests: {set(tests) - PROJECT_TESTS}"


PROJECT_TESTS = {
    "test_config.py",  # pipeline/config.py, the one module beside the stage folders
    "test_dense_coverage_bench.py",
    "test_gpu_check.py",
    "test_import_graph.py",
    "test_lean_import.py",
    "test_quality_bench.py",
    "test_readme_docs.py",
    "test_readme_example.py",
    "test_release_script.py",
}
"""Tests of the project as a whole (README, docs, benchmarks, imports) stay in ``tests/``."""
