"""Imports run one way: the orchestration layer (pipelines) uses the package (softmax_mlops), never the reverse.
The installed package must not depend on a top-level package that happens to sit beside it."""

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "src" / "softmax_mlops"


def imported_roots(path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_the_package_never_imports_the_orchestration_layer():
    offenders = {str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py") if "pipelines" in imported_roots(path)}
    assert offenders == set(), f"softmax_mlops imports pipelines in {sorted(offenders)}"


def test_loading_every_package_module_loads_nothing_from_pipelines():
    """The same at run time, for imports the source scan could miss (importlib, __import__)."""
    modules = [f"softmax_mlops.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    script = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pipelines'))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO / "src")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_console_script_still_has_the_pipeline_command():
    result = subprocess.run(["softmax-mlops", "pipeline", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Prefect flow" in result.stdout, result.stderr
