"""The package's import graph: folders import only the folders below them, no cycle (deferred imports included), and the
pure layer (config/, estimate/) never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hybrid_ds"
# The pure layer: whole folders, and two modules; assets loads torch only inside the one-time asset export.
PURE_FOLDERS = ("config", "estimate")
PURE_MODULES = ("hybrid_ds.errors", "hybrid_ds.assets", "hybrid_ds.hub", "hybrid_ds.plot")
# Which folders each folder may import (imports point down): launch -> cli -> config -> plan -> models -> data ->
# runtime -> seam, with config/ and estimate/ pure, and seam/ knowing nothing of hybrid_ds but its errors.
MAY_IMPORT = {
    "config": {"config"},
    "estimate": {"config", "estimate"},
    "models": {"config", "estimate", "models"},
    "data": {"config", "data", "models"},
    "seam": {"seam"},
    "runtime": {"config", "estimate", "models", "data", "runtime", "seam"},
}
SHARED = {"hybrid_ds", "hybrid_ds.errors", "hybrid_ds.assets", "hybrid_ds.hub", "hybrid_ds.plot"}  # any folder may use these


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """hybrid_ds modules ``path`` imports anywhere in its code (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hybrid_ds"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hybrid_ds")}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_through_deferred_imports():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def folder(module: str) -> str:
    """The folder of ``hybrid_ds.FOLDER.module`` (or of the package ``hybrid_ds.FOLDER``); "" at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in MAY_IMPORT else ""


def pure_modules() -> set[str]:
    return {m for m in graph() if folder(m) in PURE_FOLDERS or m in PURE_MODULES}


def test_each_folder_imports_only_the_folders_below_it():
    for module, targets in graph().items():
        allowed = MAY_IMPORT.get(folder(module))
        if allowed is None:
            continue  # cli, errors, assets
        wrong = {t for t in targets - SHARED if folder(t) not in allowed}
        assert not wrong, f"{module} imports {sorted(wrong)}; {folder(module)}/ may import {sorted(allowed)}"


def test_the_layering_check_finds_an_upward_import(tmp_path, monkeypatch):
    edges = {"hybrid_ds.config.schema": {"hybrid_ds.runtime.engine"}}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: edges)
    try:
        test_each_folder_imports_only_the_folders_below_it()
    except AssertionError as err:
        assert "hybrid_ds.config.schema imports ['hybrid_ds.runtime.engine']" in str(err)
    else:
        raise AssertionError("an upward import passed")


def test_the_pure_layer_imports_only_the_pure_layer():
    edges, pure = graph(), pure_modules()
    assert {"hybrid_ds.config.schema", "hybrid_ds.estimate.step", "hybrid_ds.errors"} <= pure
    for module in pure:
        assert edges[module] <= pure | {"hybrid_ds"}, (module, edges[module] - pure)


def test_pure_modules_load_no_torch():
    modules = sorted(pure_modules() | {"hybrid_ds.compare", "hybrid_ds.plan_search"})  # torch only for other models
    code = (f"import sys; import {', '.join(modules)}; "
            "heavy = {'torch', 'deepspeed', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def oversized(limit_module: int = 400, limit_function: int = 60) -> list[str]:
    """Modules over ``limit_module`` lines and functions (methods included) over ``limit_function``, with sizes."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > limit_module:
            found.append(f"{path.relative_to(PACKAGE.parent)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit_function:
                    found.append(f"{path.relative_to(PACKAGE.parent)}: {node.name} {length} lines")
    return found


def test_no_module_over_400_lines_and_no_function_over_60():
    assert oversized() == []
    assert any("seam/engines.py" in item for item in oversized(limit_module=100))  # the check sees the package


def test_every_module_names_its_concern():
    """Each module opens with a docstring (its one concern)."""
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
