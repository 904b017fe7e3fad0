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
    ingested = data.ingest(cfg.ingest, cfg.paths)
    counts = ingested.counts
    typer.echo(
        f"ingest: {counts['train']} train, {counts['val']} validation, {counts['test']} test images "
        f"(data md5 {ingested.data_md5})"
    )


def train(impl: ImplArg) -> None:
    """Train one implementation with the `train` params; opens its MLflow run."""
    cfg = _torch_config()
    from . import train as training

    trained = training.run(cfg, impl.value)
    typer.echo(
        f"train@{impl.value}: test accuracy {trained.test_acc:.4f} after {trained.epochs} epochs "
        f"({trained.seconds_per_epoch:.3f} s/epoch)"
    )


def evaluate(impl: ImplArg) -> None:
    """Score the saved weights on the test set: metrics, confusion matrix and PNGs, logged to the same run."""
    cfg = _torch_config()
    from . import evaluate as evaluation

    evaluated = evaluation.run(cfg, impl.value)
    typer.echo(f"evaluate@{impl.value}: test accuracy {evaluated.test_accuracy:.4f}, macro-F1 {evaluated.macro_f1:.4f}")


def calibrate(impl: ImplArg) -> None:
    """Fit a temperature on the validation split; ECE, NLL and Brier on the test set before and after it, and
    reliability diagrams. The export divides the logits by it."""
    cfg = _torch_config()
    from . import calibrate as calibration

    calibrated = calibration.run(cfg, impl.value)
    before, after = calibrated.before, calibrated.after
    typer.echo(
        f"calibrate@{impl.value}: T = {calibrated.temperature:.4f}; test ECE {before.ece:.4f} -> "
        f"{after.ece:.4f}, NLL {before.nll:.4f} -> {after.nll:.4f}, Brier {before.brier:.4f} -> {after.brier:.4f}"
    )


def compare() -> None:
    """Write reports/compare.{json,md}: scratch against concise, side by side."""
    cfg = _torch_config()
    from . import compare as comparison

    compared = comparison.run(cfg)
    diff = compared.difference_points
    typer.echo(
        f"compare: {cfg.paths.compare_md}"
        + (f" (test accuracy differs by {diff:.3f} points)" if diff is not None else "")
    )


def export(impl: ImplArg) -> None:
    """Export to ONNX (uint8 image -> logits, probabilities), check parity with torch on the test set, and log,
    register and alias the model in MLflow (@candidate always; @champion past the accuracy gate and only when at
    least as good as the current champion on the same test data)."""
    cfg = _torch_config()
    from . import export as exporting

    exported = exporting.run(cfg, impl.value)
    registered = exported.registered
    typer.echo(
        f"export@{impl.value}: max abs diff {exported.max_abs_diff:.1e}, argmax match "
        f"{exported.argmax_match:.2%}; registered {registered.registered_model} v{registered.version}"
        + f" as @candidate; @champion {registered.reason}"
    )


COMMANDS = (ingest, train, evaluate, calibrate, compare, export)
