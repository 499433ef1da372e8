"""The package's layout is the pipeline: every module imports alone, there are no import
cycles, and no lower part imports a higher one."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nodeproc import REPO

PACKAGE = REPO / "node"

#: What each part may import besides itself and ``node.__version__`` (lowest parts first).
ALLOWED = {
    "errors": set(),
    "stage": {"errors"},
    "metrics": set(),
    "config": {"errors"},
    "synthetic": set(),
    "storage": {"config", "errors", "stage", "metrics"},
    "inference": {"config", "errors", "stage", "metrics"},
    "results": {"inference", "errors"},
    "dicom": {"config", "storage", "errors", "stage", "metrics"},
    "routing": {"config", "storage", "errors", "stage", "metrics"},
}
#: What ties the parts together: the worker, the HTTP face over it, the command line and demo.
TOP = {"worker", "web", "cli", "demo"}


def modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(module: str, top_level_only: bool) -> set[str]:
    """The ``node`` modules that ``module`` imports (all, or only those run at import time)."""
    path = REPO / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "node" or node.module.startswith("node."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("node."))
    return {m for m in found if m != "node"}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "node"


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    def load(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        return module, done.returncode, done.stderr[-2000:]

    with ThreadPoolExecutor(2) as pool:
        libraries = [m for m in modules() if not m.endswith(".__main__")]   # __main__ runs the command
        failed = [(m, err) for m, rc, err in pool.map(load, libraries) if rc != 0]
    assert not failed, failed


def test_no_import_cycles() -> None:
    graph = {m: imports_of(m, top_level_only=True) for m in modules()}
    state: dict[str, int] = {}          # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [m, dep]))
            if dep in graph and not state.get(dep):
                visit(dep, path + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])


@pytest.mark.parametrize("module", [m for m in modules() if part(m) in ALLOWED])
def test_lower_parts_never_import_higher_ones(module: str) -> None:
    mine = part(module)
    wrong = sorted(dep for dep in imports_of(module, top_level_only=False)
                   if part(dep) != mine and part(dep) not in ALLOWED[mine])
    assert not wrong, f"{module} ({mine}) imports {wrong}; {mine} may import only {sorted(ALLOWED[mine])}"


def test_every_part_is_known_and_the_top_is_small() -> None:
    parts = {part(m) for m in modules()} - {"node"}
    assert parts <= set(ALLOWED) | TOP, parts - set(ALLOWED) - TOP
    top_files = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert set(top_files) <= TOP | {"errors", "stage", "metrics"}, top_files
