"""The documentation names what the code has. README.md and docs/ together must name every module of
src/softmax_mlops/, every `softmax-mlops` command and every HTTP route of the service; every `make` target in the
README's Development block must exist, and every command CI runs must be in that block as CI runs it.
`make docs` (mkdocs --strict) checks the links and anchors; this checks that nothing is left out."""

import re

import pytest
import typer

from helpers import REPO

PACKAGE = REPO / "src" / "softmax_mlops"
FASTAPI_OWN_ROUTES = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def documentation() -> str:
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages)


def development_block() -> str:
    """The code blocks of README.md's "## Development" section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Development.*?(?=^## |\Z)", readme, re.M | re.S)
    assert section, "README.md has no '## Development' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", section.group(0), re.M | re.S)
    assert blocks, "README.md's Development section has no code block"
    return "\n".join(blocks)


def module_is_named(relative: str, text: str) -> bool:
    """A module is named by its file (`cli.py`, `models/scratch.py`, optionally under `src/softmax_mlops/`, but
    not `pipelines/cli.py`) or by its dotted name, whole (`softmax_mlops.stages.models`, not as the start of
    `softmax_mlops.stages.models.scratch`)."""
    dotted = "softmax_mlops." + relative.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    as_file = rf"(?<![\w./-])(?:src/)?(?:softmax_mlops/)?{re.escape(relative)}(?!\w)"
    as_dotted = rf"(?<![\w.]){re.escape(dotted)}(?!\.?\w)"
    return bool(re.search(as_file, text) or re.search(as_dotted, text))


def route_is_named(path: str, text: str) -> bool:
    """A route is named when its path is written out whole, with each parameter as `{name}` or `<name>`, and
    ends there: `/v2` is not named by `/v2/models/...`, nor `/health` by `/v2/health/live`."""
    parts = re.split(r"\{(\w+)\}", path)  # odd items are parameter names
    pattern = "".join(re.escape(part) if i % 2 == 0 else rf"(?:\{{{part}\}}|<{part}>)" for i, part in enumerate(parts))
    return bool(re.search(rf"(?<![\w/.-]){pattern}(?![\w/{{<-])", text))


def test_every_module_is_named():
    modules = sorted(
        path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"
    )
    assert "stages/models/scratch.py" in modules and "cli.py" in modules, modules
    text = documentation()
    missing = [module for module in modules if not module_is_named(module, text)]
    assert not missing, f"modules of src/softmax_mlops/ that README.md and docs/ never name: {missing}"


def test_every_cli_command_is_named():
    from pipelines.cli import app  # the console script's app: the stages, the serving commands and `pipeline`

    commands = sorted(typer.main.get_command(app).commands)
    assert {"ingest", "predict", "serve", "pipeline"} <= set(commands), commands
    text = documentation()
    missing = [command for command in commands if not re.search(rf"softmax-mlops {command}(?![\w-])", text)]
    assert not missing, f"`softmax-mlops <command>` never named in README.md and docs/ for: {missing}"


@pytest.fixture(scope="module")
def routes(onnx_model) -> list[str]:
    from softmax_mlops.config import ServeConfig
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.serving.server import create_app

    app = create_app(Predictor(onnx_model[0]), ServeConfig(), top_k=3)
    # every route of the protocols' routers (FastAPI includes routers lazily: app.routes lists the routers)
    return sorted(set(app.openapi()["paths"]) - FASTAPI_OWN_ROUTES)


def test_every_http_route_is_named(routes):
    assert {"/predict", "/v2/models/{name}/infer", "/invocations"} <= set(routes), routes
    text = documentation()
    missing = [route for route in routes if not route_is_named(route, text)]
    assert not missing, f"HTTP routes of the service that README.md and docs/ never name: {missing}"


def test_make_targets_of_the_development_block_exist():
    named = set(re.findall(r"(?<![\w-])make ([\w-]+)", development_block()))
    assert {"lint", "test"} <= named, named
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+)\s*:(?!=)", makefile, re.M))
    missing = sorted(named - targets)
    assert not missing, f"README.md's Development block runs make targets the Makefile lacks: {missing}"


def test_the_development_block_holds_every_command_ci_runs():
    """CI runs the README's commands exactly as the README writes them: each `make` line of .ci/run, and each
    list of Debian packages it installs, is in the block as written."""
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"^((?:\w+=\S+ )*make [\w-]+)$", script, re.M)
    packages = re.findall(r"^apt_install ([\w -]+)$", script, re.M)
    assert commands and packages, ".ci/run runs no make command or installs no package"
    block = development_block()
    missing = [line for line in commands + packages if line not in block]
    assert not missing, f"run by .ci/run but not written so in README.md's Development block: {missing}"
