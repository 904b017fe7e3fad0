"""The command line's shared frame: the Typer app with its --project option, the implementation choice, and the
failure handling every command runs under.

The commands themselves live with what they run: the pipeline stages in softmax_mlops.stages.commands (what
dvc.yaml calls, through `python -m softmax_mlops.stages`), predict and serve in softmax_mlops.serving.commands.
The console script, pipelines.cli, puts both on one app and adds `pipeline`, which runs the stages as a Prefect
flow: the package never imports the orchestration layer above it. So a stage's code dependencies in dvc.yaml
are this frame and the stage's own modules, and editing serve's help reproduces nothing. Expected failures
(PipelineError, and a tracking server or disk that fails) print one line and exit 1; Ctrl-C and SIGTERM print
"interrupted" and exit 130; either way a stage takes back the outputs it wrote. Heavy imports wait until a
command needs them, so `--help` stays fast.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .errors import ERROR_FILE_ENV, PipelineError

if TYPE_CHECKING:
    from .config import Config


class Impl(enum.StrEnum):  # config.IMPLS as choices typer can show; tests/unit/test_config.py checks they agree
    scratch = "scratch"
    concise = "concise"


ImplArg = Annotated[Impl, typer.Argument(help="Which implementation: scratch (hand-written) or concise (torch.nn).")]
_project: Path | None = None


def _options(
    project: Annotated[Path, typer.Option(help="Project root holding params.yaml.", file_okay=False)] = Path("."),
) -> None:
    global _project
    _project = project


def make_app(help_text: str, commands: Iterable[Callable[..., Any]] = ()) -> typer.Typer:
    """A Typer app with the shared --project option and ``commands`` on it (each named after its function)."""
    application = typer.Typer(
        help=help_text, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
    )
    application.callback()(_options)
    for command in commands:
        application.command()(command)
    return application


def project_dir() -> Path:
    """The project root given with --project (default: the working directory)."""
    return (_project or Path(".")).resolve()


def project_config(standalone: bool = False) -> Config:
    """params.yaml of the project. ``standalone`` (predict and serve with an explicit --model): outside a
    project, run on the built-in defaults instead of failing for want of a params.yaml."""
    from . import config

    return configure_process(config.load(_project, missing_ok=standalone))


def configure_process(cfg: Config) -> Config:
    """Set for this process what params.yaml configures but a library reads only from the environment:
    MLflow's HTTP budget (mlflow.http_*). Every command, and every flow (pipelines/), loads its configuration
    through here, so config.load() itself stays free of side effects."""
    os.environ.update(cfg.mlflow.http_environment())
    return cfg


def _fail(message: str) -> None:
    typer.echo(f"softmax-mlops: error: {message}", err=True)
    if error_file := os.environ.get(ERROR_FILE_ENV):  # lets an orchestrator report the one-line reason
        Path(error_file).write_text(message, encoding="utf-8")
    sys.exit(1)


def _outside_failure(exc: Exception) -> str | None:
    """One line for failures of what the pipeline depends on (the tracking server, the disk), which libraries
    raise as their own exception types; None for anything else, which is a bug and keeps its traceback."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    if mlflow_errors and isinstance(exc, mlflow_errors.MlflowException):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or sys.modules["mlflow"].get_tracking_uri()
        return f"MLflow at {uri} failed: {str(exc.message).splitlines()[0] if exc.message else type(exc).__name__}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def main(application: typer.Typer) -> None:
    """Run ``application`` (the stages' app, or the console script's whole one) with the failure handling
    above."""
    from .atomic import all_or_nothing
    from .lifecycle import Interrupted, follow_stage_runner, interrupt_on_signals

    interrupt_on_signals()
    follow_stage_runner()
    try:
        with all_or_nothing():  # a failed or interrupted command takes back the outputs it wrote
            application()
    except PipelineError as exc:
        _fail(str(exc))
    except (Interrupted, KeyboardInterrupt) as exc:
        typer.echo(f"softmax-mlops: interrupted ({exc or 'SIGINT'})", err=True)
        sys.exit(130)
    except Exception as exc:
        if (reason := _outside_failure(exc)) is None:
            raise
        _fail(reason)
