"""The compare stage: scratch against concise, side by side, including how far apart their weights ended."""

from __future__ import annotations

import json
from dataclasses import asdict

from .atomic import write_json, write_text
from .config import Config
from .errors import PipelineError
from .models import load_weights

ROWS = (  # (label, source file, key)
    ("test accuracy", "eval", "test_accuracy"),
    ("macro-F1", "eval", "macro_f1"),
    ("train accuracy (end of last epoch)", "train", "train_acc"),
    ("train accuracy (running, last epoch)", "train", "train_acc_running"),
    ("train loss (last epoch)", "train", "loss"),
)  # no timings and no MLflow run ids: the report is a DVC output, a function of code, data and params


def _read(path) -> dict:  # noqa: ANN001
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise PipelineError(f"{path} is missing or unreadable: run the train and evaluate stages first") from None


def run(cfg: Config) -> dict:
    paths = cfg.paths
    results = {}
    for impl in cfg.impls:
        results[impl] = {"train": _read(paths.train_metrics(impl)), "eval": _read(paths.eval_metrics(impl))}

    report: dict = {"impls": {impl: {key: r[src][key] for _, src, key in ROWS} for impl, r in results.items()}}
    if len(cfg.impls) == 2:
        (W1, b1), (W2, b2) = (load_weights(paths.weights(impl)) for impl in cfg.impls)
        a, b = (report["impls"][impl]["test_accuracy"] for impl in cfg.impls)
        report["difference"] = {"test_accuracy_points": 100 * abs(a - b),
                                "max_abs_weight_diff": float((W1 - W2).abs().max()),
                                "max_abs_bias_diff": float((b1 - b2).abs().max())}
    write_json(paths.compare_json, report)
    write_text(paths.compare_md, _markdown(cfg, report))

    from . import plots

    plots.training_curves({impl: paths.history(impl) for impl in cfg.impls}, paths.reports / "compare_curves.png")
    return report


def _markdown(cfg: Config, report: dict) -> str:
    impls = list(report["impls"])
    lines = ["# scratch vs concise", "",
             "Same data, seed and hyperparameters: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg.train).items()) + ".", "",
             "| metric | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for label, _, key in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{report['impls'][i][key]:.4f}" for i in impls) + " |")
    if diff := report.get("difference"):
        lines += ["", f"Test accuracies differ by {diff['test_accuracy_points']:.3f} percentage points; "
                      f"the weights by at most {diff['max_abs_weight_diff']:.2e} (W) and {diff['max_abs_bias_diff']:.2e} (b)."]
    lines += ["", "![training curves](compare_curves.png)", ""]
    return "\n".join(lines)
