"""The layering of docs/architecture.md, enforced: imports go only downward (imports inside functions count), there is
no import circle, internal imports sit at the top of modules, and `sovtune --help` loads none of the stages."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sovtune"
# The one place a module imports part of sovtune inside a function: the argument parser loads the command bodies
# only when a command runs, so `sovtune --help` never loads the stages (pydantic, numpy, torch, ...).
DEFERRED_IMPORTS = {("sovtune.cli", "bodies", "sovtune.cli.commands")}


def lint_imports(cwd: Path, source: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts from `cwd`/pyproject.toml, on the sovtune package found under `source`."""
    command = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run([str(command)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept() -> None:
    done = lint_imports(ROOT, ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_the_contract_catches_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    """import-linter (grimp) reads imports at any depth: an upward import hidden in a function body breaks the build."""
    shutil.copytree(PACKAGE, tmp_path / "src" / "sovtune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "src" / "sovtune" / "core" / "files.py", "a", encoding="utf-8") as handle:
        handle.write("\n\ndef sneaky() -> None:\n    from sovtune.cli import commands  # noqa: F401\n")
    done = lint_imports(tmp_path, tmp_path / "src")
    assert done.returncode != 0, done.stdout
    assert "sovtune.core.files -> sovtune.cli.commands" in done.stdout


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(tree: ast.AST, module: str) -> list[tuple[ast.stmt, str]]:
    """(statement, imported sovtune module) for every import statement in a module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names if alias.name.split(".")[0] == "sovtune"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import; sovtune imports by absolute name"
            base = node.module or ""
            if base.split(".")[0] == "sovtune":
                found += [(node, f"{base}.{alias.name}") for alias in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """sovtune module -> the sovtune modules it imports (anywhere in its code)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target in internal_imports(ast.parse(path.read_text(encoding="utf-8")), name):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, "sovtune"):
                graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_the_circle_finder_finds_circles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_internal_imports_are_at_the_top_of_modules() -> None:
    """A lazy internal import can hide a circle; only heavy third-party libraries are imported inside functions."""
    lazy = set()
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, tree.body))
        top |= {id(child) for node in tree.body if isinstance(node, ast.If) for child in node.body}  # TYPE_CHECKING
        functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for function in functions:
            for statement, target in internal_imports(function, module):
                if id(statement) not in top:
                    lazy.add((module, function.name, target))
    assert lazy == DEFERRED_IMPORTS


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_help_loads_no_stage(args: list[str]) -> None:
    probe = (
        "import sys; from typer.testing import CliRunner; from sovtune.cli import app; "
        f"assert CliRunner().invoke(app, {args!r}).exit_code == 0; "
        "print(sorted(m for m in sys.modules if m.startswith(('sovtune', 'numpy', 'torch'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout))
    assert loaded <= {
        "sovtune",
        "sovtune.cli",
        "sovtune.cli.terminal",
        "sovtune.core",
        "sovtune.core.secrets",
        "sovtune.errors",
    }
