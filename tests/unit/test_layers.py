"""Imports run one way: the orchestration layer (pipelines) uses the package (softmax_mlops), never the reverse.
The installed package must not depend on a top-level package that happens to sit beside it. Inside the package,
the layers of docs/index.md: core <- serving <- tracking <- stages. serving/ is what the serving image ships,
without torch: it imports neither torch nor anything under stages/."""

import ast
import subprocess
import sys
from pathlib import Path

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
    modules = [module_name(p) for p in PACKAGE.rglob("*.py")]
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


# The package's layers, lowest first: a module may import its own layer and the ones below it, never above.
LAYERS = {"core": 0, "serving": 1, "tracking": 2, "stages": 3}


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def package_imports(path) -> set[str]:
    """Every softmax_mlops module ``path`` imports, at any depth (function-level imports included), with
    relative imports resolved, and every top-level package it imports."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module.split(".") if node.level == 0 else package[: len(package) - node.level + 1]
            if node.level and node.module:
                base = [*base, *node.module.split(".")]
            found.add(".".join(base))
            # `from . import data` imports the module softmax_mlops.<...>.data
            found |= {
                ".".join([*base, alias.name])
                for alias in node.names
                if (PACKAGE.parent / Path(*base, alias.name)).with_suffix(".py").exists()
                or (PACKAGE.parent / Path(*base, alias.name)).is_dir()
            }
    return found


def test_layer_rules_see_a_violation():
    """The scan is not blind: stages/train.py imports the layer below it and torch."""
    imported = package_imports(PACKAGE / "stages" / "train.py")
    assert "torch" in imported and "softmax_mlops.tracking" in imported and "softmax_mlops.stages.data" in imported


def test_imports_point_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        mine = LAYERS[layer_of(module_name(path))]
        for module in package_imports(path):
            if module.split(".")[0] == "softmax_mlops" and LAYERS[layer_of(module)] > mine:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert upward == [], upward


def test_serving_imports_neither_torch_nor_a_stage():
    offenders = [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in [*(PACKAGE / "serving").rglob("*.py"), *PACKAGE.glob("*.py")]
        for module in package_imports(path)
        if module.split(".")[0] == "torch" or module.startswith("softmax_mlops.stages")
    ]
    assert offenders == [], offenders


def test_serving_runs_with_torch_unimportable():
    """At run time too: with torch made unimportable (as in the serving image), every serving module and the
    core load, `serve --help` and `predict --help` work, and nothing under stages/ is loaded."""
    modules = [module_name(p) for p in [*(PACKAGE / "serving").rglob("*.py"), *PACKAGE.glob("*.py")]]
    script = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from typer.testing import CliRunner\n"
        "from softmax_mlops.cli import make_app\n"
        "from softmax_mlops.serving.commands import COMMANDS\n"
        "app = make_app('serving', COMMANDS)\n"
        "for command in ('serve', 'predict'):\n"
        "    result = CliRunner().invoke(app, [command, '--help'])\n"
        "    assert result.exit_code == 0, result.output\n"
        "print(sorted(m for m in sys.modules if m.startswith('softmax_mlops.stages') or m.split('.')[0] == 'torch'))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO / "src")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['torch']"  # only the blocked entry itself
