"""The shape of the code (docs/design.md §13): who may import whom, and a CLI that answers before torch loads."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the import name it installs as.
PACKAGES = {"puzzle": "puzzle", "blocks": "puzzle.blocks", "distill": "puzzle.distill", "search": "puzzle.search"}
LOWER = ("puzzle.blocks", "puzzle.distill", "puzzle.search")
LEAVES = {"puzzle", "puzzle.errors", "puzzle.io"}  # what every package may import from the root package


def _module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every puzzle module `path` imports, at the top or inside a function."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m == "puzzle" or m.startswith("puzzle.")}


def _graph() -> dict[str, set[str]]:
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    # `from puzzle.x import name` names a module only when puzzle.x.name is one.
    return {name: {m for m in _imports(path, name) if m in modules and m != name} for name, path in modules.items()}


GRAPH = _graph()


def test_the_graph_covers_every_package():
    assert {"puzzle.cli", "puzzle.pipeline", "puzzle.stages.library", "puzzle.blocks.specs", "puzzle.distill.bld",
            "puzzle.search.mip"} <= set(GRAPH)
    assert "puzzle.pipeline" in GRAPH["puzzle.stages.library"]  # edges are found


def test_no_import_circles():
    def cycle_from(start: str) -> list[str] | None:
        stack, path, on_path, done = [(start, iter(sorted(GRAPH[start])))], [start], {start}, set()
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in done:
                stack.append((nxt, iter(sorted(GRAPH[nxt]))))
                path.append(nxt)
                on_path.add(nxt)
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(GRAPH)) if c]
    assert cycles == []


def test_stage_modules_do_not_import_each_other():
    stages = {m for m in GRAPH if m.startswith("puzzle.stages.")}
    assert len(stages) == 10
    crossing = {m: sorted(GRAPH[m] & stages) for m in stages if GRAPH[m] & stages}
    assert crossing == {}


def test_lower_packages_never_import_the_orchestration():
    def allowed(module: str, target: str) -> bool:
        own = next(p for p in LOWER if module.startswith(p))
        if target in LEAVES or target.startswith(own):
            return True
        return target.startswith("puzzle.blocks") and own != "puzzle.blocks"

    wrong = {m: sorted(t for t in GRAPH[m] if not allowed(m, t)) for m in GRAPH if m.startswith(LOWER)}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_leaf_modules_import_nothing_of_puzzle():
    assert GRAPH["puzzle"] == GRAPH["puzzle.errors"] == set()
    assert GRAPH["puzzle.io"] <= {"puzzle.errors"}


def test_validate_answers_a_bad_yaml_without_importing_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parent: {path: [unclosed\n")
    probe = ("import sys, runpy; sys.argv = ['puzzle', 'validate', %r]\n"
             "try:\n    runpy.run_module('puzzle', run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n") % str(bad)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert "malformed YAML" in result.stderr
    assert result.stdout.split() == ["exit", "2", "False"]
    # The bound on this machine; the measure that cannot flake under load is the torch check above.
    print(f"puzzle validate on a bad YAML: {seconds:.2f} s")


@pytest.mark.parametrize("name", ["modeling_puzzle.py", "modeling_hybrid.py"])
def test_child_modeling_files_import_only_torch_transformers_and_the_standard_library(name):
    """They are saved beside a child's weights and run where puzzle is not installed."""
    tree = ast.parse((ROOT / "blocks" / name).read_text())
    roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert roots - {"torch", "transformers"} <= set(sys.stdlib_module_names) | {"__future__"}
    assert not any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(tree))
