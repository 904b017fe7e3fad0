"""`softmax-mlops`: one command per DVC stage, plus the tools users run by hand.

dvc.yaml calls these commands, so running a stage by hand and through `dvc repro` is the same code. Expected
failures (PipelineError) print one line and exit 1; heavy imports wait until a command needs them, so
`--help` stays fast.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import PipelineError

app = typer.Typer(
    help="Softmax regression on Fashion-MNIST: the pipeline stages (normally run by `dvc repro`) and tools.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


class Impl(str, enum.Enum):
    scratch = "scratch"
    concise = "concise"


ImplArg = Annotated[Impl, typer.Argument(help="Which implementation: scratch (hand-written) or concise (torch.nn).")]
_project: Path | None = None


@app.callback()
def _options(
    project: Annotated[Path, typer.Option(help="Project root holding params.yaml.", file_okay=False)] = Path("."),
) -> None:
    global _project
    _project = project


def _config():
    from . import config

    return config.load(_project)


@app.command()
def ingest() -> None:
    """Fetch Fashion-MNIST (official mirror, or FASHION_MNIST_MIRROR / ingest.mirror), verify md5s, write
    data/prepared/{train,test}.npz and summary.json."""
    from . import data

    cfg = _config()
    summary = data.ingest(cfg.mirror, cfg.paths)
    typer.echo(f"ingest: {summary['train']['count']} train, {summary['test']['count']} test images "
               f"(data md5 {summary['data_md5']})")


@app.command()
def train(impl: ImplArg) -> None:
    """Train one implementation with the `train` params; opens its MLflow run."""
    from . import train as training

    summary = training.run(_config(), impl.value)
    typer.echo(f"train@{impl.value}: test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs "
               f"({summary['seconds_per_epoch']:.3f} s/epoch)")


@app.command()
def evaluate(impl: ImplArg) -> None:
    """Score the saved weights on the test set: metrics, confusion matrix and PNGs, logged to the same run."""
    from . import evaluate as evaluation

    metrics = evaluation.run(_config(), impl.value)
    typer.echo(f"evaluate@{impl.value}: test accuracy {metrics['test_accuracy']:.4f}, "
               f"macro-F1 {metrics['macro_f1']:.4f}")


@app.command()
def compare() -> None:
    """Write reports/compare.{json,md}: scratch against concise, side by side."""
    from . import compare as comparison

    cfg = _config()
    report = comparison.run(cfg)
    diff = report.get("difference")
    typer.echo(f"compare: {cfg.paths.compare_md}" + (
        f" (test accuracy differs by {diff['test_accuracy_points']:.3f} points)" if diff else ""))


def main() -> None:
    try:
        app()
    except PipelineError as exc:
        typer.echo(f"softmax-mlops: error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("softmax-mlops: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
