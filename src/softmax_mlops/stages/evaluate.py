"""The evaluate stage: test accuracy, per-class metrics, the confusion matrix and the pictures.

It reads the saved weights (not the training process's memory), so what it reports is what was shipped.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic import write_json, write_text
from ..classes import CLASS_NAMES, NUM_CLASSES
from ..config import Config
from .data import load_split
from .models import SoftmaxRegression, load_weights


@dataclass(frozen=True)
class Evaluation:
    """What evaluate@{impl} measured on the test set, as metrics/{impl}/eval.json holds it."""

    test_accuracy: float
    macro_f1: float
    per_class: Mapping[str, Mapping[str, float]]  # class name -> precision, recall, f1 and one-vs-rest accuracy


def predict_classes(W: torch.Tensor, b: torch.Tensor, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return SoftmaxRegression(W, b)(torch.from_numpy(images)).argmax(dim=1).numpy()


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    return np.bincount(labels * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=float), where=den > 0)


def metrics_from_confusion(cm: np.ndarray) -> dict:
    """Per-class precision, recall (the share of that class's images classified right), F1 and one-vs-rest
    accuracy, plus overall accuracy and macro-F1."""
    tp = np.diag(cm).astype(float)
    total = cm.sum()
    precision = _ratio(tp, cm.sum(axis=0))
    recall = _ratio(tp, cm.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
    one_vs_rest = (total - cm.sum(axis=0) - cm.sum(axis=1) + 2 * tp) / total
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "accuracy": float(a)}
        for name, p, r, f, a in zip(CLASS_NAMES, precision, recall, f1, one_vs_rest, strict=True)
    }
    return {"test_accuracy": float(tp.sum() / total), "macro_f1": float(f1.mean()), "per_class": per_class}


def confusion_csv(labels: np.ndarray, predicted: np.ndarray) -> str:
    """One row per test image, in the form DVC's confusion-matrix plot template reads."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((CLASS_NAMES[a], CLASS_NAMES[p]) for a, p in zip(labels, predicted, strict=True))
    return out.getvalue()


def run(cfg: Config, impl: str) -> Evaluation:
    """The evaluate@{impl} stage: score the saved weights on the test set, write the metrics, the confusion
    matrix and the pictures, and log them to the implementation's MLflow run."""
    from .. import tracking
    from . import plots

    paths = cfg.paths
    with tracking.resume_run(cfg, impl, f"evaluate@{impl}"):
        W, b = load_weights(paths.weights(impl))
        images, labels = load_split(paths.test_data)
        predicted = predict_classes(W, b, images)
        cm = confusion_matrix(labels, predicted)
        metrics = metrics_from_confusion(cm)
        write_json(paths.eval_metrics(impl), metrics)
        write_text(paths.confusion(impl), confusion_csv(labels, predicted))

        report = paths.report_dir(impl)
        pictures = {
            report / "confusion.png": lambda p: plots.confusion_matrix(cm, f"{impl}: confusion matrix (test)", p),
            report / "curves.png": lambda p: plots.training_curves({impl: paths.history(impl)}, p),
            report / "predictions.png": lambda p: plots.prediction_grid(
                images[: cfg.evaluate.grid_images], labels, predicted, f"{impl}: true / predicted", p
            ),
        }
        for path, draw in pictures.items():
            draw(path)

        import mlflow

        mlflow.log_metrics({"test_accuracy": metrics["test_accuracy"], "macro_f1": metrics["macro_f1"]})
        mlflow.log_metrics(
            {
                f"recall_{name.replace(' ', '_').replace('-', '_')}": m["recall"]
                for name, m in metrics["per_class"].items()
            }
        )
        tracking.log_files(paths.eval_metrics(impl), paths.confusion(impl), *pictures)
    return Evaluation(**metrics)
