"""The calibrate stage: do the softmax probabilities mean what they say? Temperature scaling, as in Guo et al.
2017, "On Calibration of Modern Neural Networks".

One temperature T is fitted on the validation split's NLL, never on the test set. The test set then shows
the expected calibration error (15 equal-width bins of top-label confidence), the NLL and the Brier score
before (T = 1) and after. Dividing logits by T never changes an argmax, so accuracy is untouched. The export
stage puts the division inside the ONNX graph, so served probabilities are the calibrated ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..atomic import write_json
from ..config import Config
from ..errors import PipelineError
from .data import load_split
from .models import SoftmaxRegression, load_weights


@dataclass(frozen=True)
class Scores:
    """The test set's ECE, NLL, Brier score and accuracy at one temperature."""

    ece: float
    nll: float
    brier: float
    accuracy: float


@dataclass(frozen=True)
class Calibrated:
    """What calibrate@{impl} fitted and measured, as metrics/{impl}/calibration.json holds it."""

    temperature: float
    validation_images: int
    validation_nll_before: float
    validation_nll_after: float
    before: Scores  # the test set at T = 1
    after: Scores  # the test set at the fitted T

    def report(self) -> dict:
        """calibration.json's content: only scalars (the bins are in the picture), so that `dvc metrics diff`
        can read it."""
        return {
            "temperature": self.temperature,
            "validation": {
                "images": self.validation_images,
                "nll_before": self.validation_nll_before,
                "nll_after": self.validation_nll_after,
            },
            "test": {"before": asdict(self.before), "after": asdict(self.after)},
        }


def logits64(W: torch.Tensor, b: torch.Tensor, images: np.ndarray) -> torch.Tensor:
    """The deployable module's float64 logits: the very numbers the ONNX graph divides by T."""
    with torch.no_grad():
        return SoftmaxRegression(W, b).logits64(torch.from_numpy(images))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits / temperature, labels)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray, initial: float, max_iter: int) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T), by LBFGS from ``initial`` (the reference
    implementation's 1.5). It optimises log T, so no step can make T negative, and uses a strong-Wolfe line
    search so the result is the minimum rather than wherever a fixed step count stopped."""
    y = torch.from_numpy(labels)
    log_t = torch.tensor(math.log(initial), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll(logits, y, log_t.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature) or temperature <= 0:
        raise PipelineError(f"temperature scaling diverged (T = {temperature}): the validation logits are not finite")
    return temperature


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> list[dict]:
    """Guo et al.'s bins: B_m holds the images whose top-label confidence lies in ((m-1)/M, m/M]; each with
    its count, mean confidence and accuracy (None when empty)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.searchsorted(np.linspace(0.0, 1.0, bins + 1), confidence, side="left") - 1, 0, bins - 1)
    table = []
    for m in range(bins):
        members = which == m
        count = int(members.sum())
        table.append(
            {
                "lower": m / bins,
                "upper": (m + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return table


def expected_calibration_error(table: list[dict]) -> float:
    """sum over bins of |B_m| / n * |accuracy(B_m) - confidence(B_m)|."""
    n = sum(row["count"] for row in table)
    return float(sum(row["count"] / n * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]))


def scores(logits: torch.Tensor, labels: np.ndarray, temperature: float, bins: int) -> tuple[dict, list[dict]]:
    """ECE, NLL and Brier score (sum over classes of the squared error, averaged over images) of
    softmax(logits / T), and the reliability table behind the ECE."""
    y = torch.from_numpy(labels)
    with torch.no_grad():
        probabilities = torch.softmax(logits / temperature, dim=1)
        brier = ((probabilities - torch.nn.functional.one_hot(y, probabilities.shape[1])) ** 2).sum(dim=1).mean()
        loss = nll(logits, y, temperature)
    table = reliability_bins(probabilities.numpy(), labels, bins)
    accuracy = float((probabilities.argmax(dim=1) == y).double().mean())
    return (
        {"ece": expected_calibration_error(table), "nll": float(loss), "brier": float(brier), "accuracy": accuracy},
        table,
    )


def read_temperature(cfg: Config, impl: str) -> float:
    """What calibrate@{impl} fitted, for the export."""
    import json

    path = cfg.paths.calibration(impl)
    try:
        temperature = json.loads(path.read_text())["temperature"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(
            f"{path} is missing or unreadable: run the calibrate stage first (`dvc repro calibrate@{impl}`)"
        ) from None
    if not isinstance(temperature, float) or not temperature > 0:
        raise PipelineError(f"{path}: temperature must be a positive number, got {temperature!r}")
    return temperature


def run(cfg: Config, impl: str) -> Calibrated:
    """The calibrate@{impl} stage: fit T on validation, score the test set before and after, draw both."""
    from .. import tracking
    from . import plots

    paths, settings = cfg.paths, cfg.calibrate
    with tracking.resume_run(cfg, impl, f"calibrate@{impl}"):
        W, b = load_weights(paths.weights(impl))
        val_images, val_labels = load_split(paths.val_data)
        test_images, test_labels = load_split(paths.test_data)
        val_logits, test_logits = logits64(W, b, val_images), logits64(W, b, test_images)
        y_val = torch.from_numpy(val_labels)
        temperature = fit_temperature(val_logits, val_labels, settings.initial_temperature, settings.max_iter)

        before, before_bins = scores(test_logits, test_labels, 1.0, settings.bins)
        after, after_bins = scores(test_logits, test_labels, temperature, settings.bins)
        result = Calibrated(
            temperature=temperature,
            validation_images=len(val_labels),
            validation_nll_before=float(nll(val_logits, y_val)),
            validation_nll_after=float(nll(val_logits, y_val, temperature)),
            before=Scores(**before),
            after=Scores(**after),
        )
        write_json(paths.calibration(impl), result.report())
        plots.reliability_diagrams(
            {
                "before (T = 1)": (before_bins, before["ece"]),
                f"after (T = {temperature:.3f})": (after_bins, after["ece"]),
            },
            f"{impl}: reliability on the test set",
            paths.reliability(impl),
        )

        import mlflow

        mlflow.log_metrics(
            {
                "temperature": temperature,
                **{
                    f"test_{key}_{when}": value
                    for when, figures in (("before", before), ("after", after))
                    for key, value in figures.items()
                    if key != "accuracy"
                },
            }
        )
        tracking.log_files(paths.calibration(impl), paths.reliability(impl))
    return result
