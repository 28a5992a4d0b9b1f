"""The shape of the house: a library that never imports the recipe, no import cycle among trainer modules, and
callers outside the package that use public names only.

Import statements are read from the source (module level and inside functions alike: an import moved into a function
to dodge a cycle is still an edge here). Every module is also imported, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trainer"
RECIPE = "trainer.train"
MAY_IMPORT_THE_RECIPE = {"trainer.train", "trainer.cli"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The trainer modules a file's import statements name (`from trainer import x` names trainer.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself): Tarjan."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_trainer_module_imports_in_a_fresh_interpreter():
    names = sorted(_modules())
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 1)"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"imported {len(names)}" in result.stdout
    assert {"trainer.build", "trainer.engine", "trainer.learner", "trainer.train", "trainer.cli"} <= set(names)


def test_no_import_cycle_among_trainer_modules():
    modules = _modules()
    graph = {name: _imported(path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []
    # the check does see cycles: two modules importing each other
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    # and reads function-local imports: the engine is imported by build.py, the recipe by the command line
    assert "trainer.engine" in graph["trainer.build"] and RECIPE in graph["trainer.cli"]


def test_only_the_recipe_and_the_command_line_import_the_recipe():
    modules = _modules()
    importers = sorted(name for name, path in modules.items() if RECIPE in _imported(path, modules))
    assert set(importers) <= MAY_IMPORT_THE_RECIPE, importers
    assert "trainer.cli" in importers


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainer"):
            found += [f"{path.name}: from {node.module} import {alias.name}" for alias in node.names
                      if alias.name.startswith("_")]
    return found


def test_the_benchmark_and_the_tests_import_public_names_only():
    files = [PACKAGE / "bench.py", *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "tests" / "dist_scripts").glob("*.py"))]
    assert len(files) > 20
    assert [found for path in files for found in _private_imports(path)] == []
