"""The pipeline stages' commands: what dvc.yaml runs (`python -m softmax_mlops.stages <stage>`), and what a user
runs by hand through `softmax-mlops <stage>`. Each one loads params.yaml, runs its stage and prints one line.

Nothing here imports the serving commands, so a stage's code dependencies in dvc.yaml stop at the CLI frame
(softmax_mlops.cli), this module and the stage's own modules.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import typer

from ..cli import ImplArg
from ..cli import project_config as _config

if TYPE_CHECKING:
    from ..config import Config


def _torch_config() -> Config:
    """params.yaml, with its CPU code paths (cpu_kernels) set for torch before the stage loads it: ATen and MKL
    read them once, when they start. Set over whatever the environment held, so that a stage's outputs do not
    depend on the CPU it ran on. A process that loaded torch before (a test calling the command in-process)
    keeps the paths torch started with."""
    cfg = _config()
    if "torch" not in sys.modules:
        os.environ.update(cfg.cpu_kernels.environment())
    return cfg


def ingest() -> None:
    """Fetch Fashion-MNIST (official mirror, or FASHION_MNIST_MIRROR / ingest.mirror), verify md5s, set a
    stratified validation split aside, write data/prepared/{train,val,test}.npz and summary.json."""
    from . import data

    cfg = _config()
    summary = data.ingest(cfg.ingest, cfg.paths)
    typer.echo(
        f"ingest: {summary['train']['count']} train, {summary['val']['count']} validation, "
        f"{summary['test']['count']} test images "
        f"(data md5 {summary['data_md5']})"
    )


def train(impl: ImplArg) -> None:
    """Train one implementation with the `train` params; opens its MLflow run."""
    cfg = _torch_config()
    from . import train as training

    summary = training.run(cfg, impl.value)
    typer.echo(
        f"train@{impl.value}: test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs "
        f"({summary['seconds_per_epoch']:.3f} s/epoch)"
    )


def evaluate(impl: ImplArg) -> None:
    """Score the saved weights on the test set: metrics, confusion matrix and PNGs, logged to the same run."""
    cfg = _torch_config()
    from . import evaluate as evaluation

    metrics = evaluation.run(cfg, impl.value)
    typer.echo(
        f"evaluate@{impl.value}: test accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    )


def calibrate(impl: ImplArg) -> None:
    """Fit a temperature on the validation split; ECE, NLL and Brier on the test set before and after it, and
    reliability diagrams. The export divides the logits by it."""
    cfg = _torch_config()
    from . import calibrate as calibration

    report = calibration.run(cfg, impl.value)
    before, after = report["test"]["before"], report["test"]["after"]
    typer.echo(
        f"calibrate@{impl.value}: T = {report['temperature']:.4f}; test ECE {before['ece']:.4f} -> "
        f"{after['ece']:.4f}, NLL {before['nll']:.4f} -> {after['nll']:.4f}, "
        f"Brier {before['brier']:.4f} -> {after['brier']:.4f}"
    )


def compare() -> None:
    """Write reports/compare.{json,md}: scratch against concise, side by side."""
    cfg = _torch_config()
    from . import compare as comparison

    report = comparison.run(cfg)
    diff = report.get("difference")
    typer.echo(
        f"compare: {cfg.paths.compare_md}"
        + (f" (test accuracy differs by {diff['test_accuracy_points']:.3f} points)" if diff else "")
    )


def export(impl: ImplArg) -> None:
    """Export to ONNX (uint8 image -> logits, probabilities), check parity with torch on the test set, and log,
    register and alias the model in MLflow (@candidate always; @champion past the accuracy gate and only when at
    least as good as the current champion on the same test data)."""
    cfg = _torch_config()
    from . import export as exporting

    result = exporting.run(cfg, impl.value)
    parity = result["parity"]
    typer.echo(
        f"export@{impl.value}: max abs diff {parity['max_abs_diff']:.1e}, argmax match "
        f"{parity['argmax_match']:.2%}; registered {result['registered_model']} v{result['version']}"
        + f" as @candidate; @champion {result['reason']}"
    )


COMMANDS = (ingest, train, evaluate, calibrate, compare, export)
