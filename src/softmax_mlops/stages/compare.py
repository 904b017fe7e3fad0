"""The compare stage: scratch against concise, side by side, including how far apart their weights ended.

It also writes the accuracy curves in long form (one row per epoch, implementation and kind of accuracy), so that
DVC's plot can colour by kind of accuracy and dash by implementation. The report itself goes into both MLflow
runs.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

from ..atomic import write_json, write_text
from ..config import Config
from ..errors import PipelineError
from .models import load_weights

ROWS = (  # (label, source file, key)
    ("test accuracy", "eval", "test_accuracy"),
    ("macro-F1", "eval", "macro_f1"),
    ("train accuracy (end of last epoch)", "train", "train_acc"),
    ("train accuracy (running, last epoch)", "train", "train_acc_running"),
    ("train loss (last epoch)", "train", "loss"),
)  # no timings and no MLflow run ids: the report is a DVC output, a function of code, data and params
CURVES = {"train_acc_running": "train (running)", "train_acc": "train (end of epoch)", "test_acc": "test"}


@dataclass(frozen=True)
class Compared:
    """What compare found: each implementation's test accuracy, and how far apart they are."""

    test_accuracy: Mapping[str, float]  # per implementation
    difference_points: float | None  # |a - b| in percentage points; None unless there are two implementations


def _read(path) -> dict:  # noqa: ANN001
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise PipelineError(f"{path} is missing or unreadable: run the train and evaluate stages first") from None


def run(cfg: Config) -> Compared:
    """The compare stage: reports/compare.{json,md} and the curves, logged to every implementation's run."""
    paths = cfg.paths
    results = {}
    for impl in cfg.impls:
        results[impl] = {"train": _read(paths.train_metrics(impl)), "eval": _read(paths.eval_metrics(impl))}

    report: dict = {"impls": {impl: {key: r[src][key] for _, src, key in ROWS} for impl, r in results.items()}}
    if len(cfg.impls) == 2:
        (W1, b1), (W2, b2) = (load_weights(paths.weights(impl)) for impl in cfg.impls)
        a, b = (report["impls"][impl]["test_accuracy"] for impl in cfg.impls)
        report["difference"] = {
            "test_accuracy_points": 100 * abs(a - b),
            "max_abs_weight_diff": float((W1 - W2).abs().max()),
            "max_abs_bias_diff": float((b1 - b2).abs().max()),
        }
    write_json(paths.compare_json, report)
    write_text(paths.compare_md, _markdown(cfg, report))
    write_text(paths.accuracy_curves, accuracy_curves_csv({impl: paths.history(impl) for impl in cfg.impls}))

    from .. import tracking
    from . import plots

    plots.training_curves({impl: paths.history(impl) for impl in cfg.impls}, paths.compare_curves)
    for impl in cfg.impls:
        with tracking.resume_run(cfg, impl, "compare"):
            tracking.log_files(paths.compare_md, paths.compare_json, paths.compare_curves, artifact_path="compare")
    difference = report.get("difference")
    return Compared(
        test_accuracy={impl: report["impls"][impl]["test_accuracy"] for impl in cfg.impls},
        difference_points=difference["test_accuracy_points"] if difference else None,
    )


def accuracy_curves_csv(histories: dict) -> str:
    """Long form: epoch, impl, curve, accuracy."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", "impl", "curve", "accuracy"])
    for impl, path in histories.items():
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError:
            raise PipelineError(f"{path} is missing or unreadable: run the train stages first") from None
        for row in rows:
            writer.writerows((row["epoch"], impl, label, row[key]) for key, label in CURVES.items())
    return out.getvalue()


def _markdown(cfg: Config, report: dict) -> str:
    impls = list(report["impls"])
    lines = [
        "# scratch vs concise",
        "",
        "Same data, seed and hyperparameters: "
        + ", ".join(f"{k}={v}" for k, v in cfg.train.model_dump().items())
        + ".",
        "",
        "| metric | " + " | ".join(impls) + " |",
        "|---|" + "---:|" * len(impls),
    ]
    for label, _, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{report['impls'][i][key]:.4f}" for i in impls) + " |")
    if diff := report.get("difference"):
        lines += [
            "",
            f"Test accuracies differ by {diff['test_accuracy_points']:.3f} percentage points; "
            f"the weights by at most {diff['max_abs_weight_diff']:.2e} (W) and {diff['max_abs_bias_diff']:.2e} (b).",
        ]
    lines += ["", "![training curves](compare_curves.png)", ""]
    return "\n".join(lines)
