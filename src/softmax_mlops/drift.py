"""Drift checks for batch inference, after Rabanser et al., "Failing Loudly" (NeurIPS 2019).

Their strongest detector on image data needs no extra model: compare the classifier's softmax outputs on the new
batch with those on held-out data it was validated on, one two-sample Kolmogorov-Smirnov test per class with a
Bonferroni correction. Two cheaper views come with it: a chi-squared test on the histogram of predicted classes
(label shift), and a KS test on each image's mean intensity (a change of exposure, inversion or background).

The reference is the test set's softmax outputs and intensities, saved at export time beside model.onnx and
registered with it in MLflow, so it travels with the model. Each test has the same level `drift.alpha`
(params.yaml); the batch is "drift" when any test rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_npz
from .errors import PipelineError

REFERENCE_FILE = "drift_reference.npz"


def intensity(images: np.ndarray) -> np.ndarray:
    """Each image's mean pixel value in [0, 1]."""
    return images.reshape(len(images), -1).mean(axis=1, dtype=np.float64).astype(np.float32) / 255.0


def save_reference(path: Path, probabilities: np.ndarray, images: np.ndarray) -> None:
    write_npz(path, probabilities=probabilities.astype(np.float32), intensity=intensity(images))


def load_reference(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            reference = {key: npz[key] for key in ("probabilities", "intensity")}
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{path} is not a drift reference: {exc}") from None
    return reference


@dataclass
class Collector:
    """Gathers what the tests need while predict streams through the batches (10 floats and 1 per image)."""

    probabilities: list[np.ndarray] = field(default_factory=list)
    intensities: list[np.ndarray] = field(default_factory=list)

    def add(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        self.probabilities.append(probabilities.astype(np.float32, copy=False))
        self.intensities.append(intensity(images))

    def report(self, reference: dict[str, np.ndarray], alpha: float, min_images: int) -> dict:
        probabilities = np.concatenate(self.probabilities) if self.probabilities else np.zeros((0, 10), np.float32)
        return check(reference, probabilities,
                     np.concatenate(self.intensities) if self.intensities else np.zeros(0, np.float32),
                     alpha, min_images)


def check(reference: dict[str, np.ndarray], probabilities: np.ndarray, intensities: np.ndarray, alpha: float,
          min_images: int) -> dict:
    """The three tests; "drift" when any rejects at level ``alpha`` (the per-class KS tests after Bonferroni)."""
    from scipy import stats

    n = len(probabilities)
    report: dict = {"images": n, "reference_images": int(len(reference["probabilities"])), "alpha": alpha}
    if n < min_images:
        return report | {"result": "not tested", "reason": f"{n} images, fewer than drift.min_images={min_images}"}
    classes = probabilities.shape[1]
    ks = [stats.ks_2samp(reference["probabilities"][:, k], probabilities[:, k]) for k in range(classes)]
    p_values = [float(t.pvalue) for t in ks]
    bonferroni = min(1.0, min(p_values) * classes)
    reference_counts = np.bincount(reference["probabilities"].argmax(axis=1), minlength=classes)
    batch_counts = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    table = np.stack([reference_counts, batch_counts])
    table = table[:, table.sum(axis=0) > 0]
    chi2 = stats.chi2_contingency(table) if table.shape[1] > 1 else None
    shift = stats.ks_2samp(reference["intensity"], intensities)
    tests = {
        "ks_softmax_per_class": {
            "statistics": [round(float(t.statistic), 6) for t in ks], "p_values": p_values,
            "p_bonferroni": bonferroni, "drift": bonferroni < alpha},
        "chi2_predicted_class": {
            "reference_counts": reference_counts.tolist(), "batch_counts": batch_counts.tolist(),
            "statistic": float(chi2.statistic) if chi2 else 0.0, "p_value": float(chi2.pvalue) if chi2 else 1.0,
            "drift": bool(chi2 is not None and chi2.pvalue < alpha)},
        "ks_mean_intensity": {
            "reference_mean": float(reference["intensity"].mean()), "batch_mean": float(intensities.mean()),
            "statistic": float(shift.statistic), "p_value": float(shift.pvalue), "drift": bool(shift.pvalue < alpha)},
    }
    drifted = [name for name, t in tests.items() if t["drift"]]
    return report | {"result": "drift" if drifted else "no drift", "drifted_tests": drifted, "tests": tests}


def summary(report: dict) -> str:
    """One line for the terminal and the flow log."""
    if report["result"] == "not tested":
        return f"drift: not tested ({report['reason']})"
    t = report["tests"]
    return (f"drift: {report['result']} over {report['images']} images (KS softmax p={t['ks_softmax_per_class']['p_bonferroni']:.3g} "
            f"Bonferroni, chi2 classes p={t['chi2_predicted_class']['p_value']:.3g}, "
            f"KS intensity p={t['ks_mean_intensity']['p_value']:.3g}; alpha {report['alpha']})")


def markdown(report: dict) -> str:
    """The Prefect artifact: the result, then the numbers behind it."""
    if report["result"] == "not tested":
        return f"**Drift: not tested** ({report['reason']}).\n"
    t = report["tests"]
    rows = [("KS per class on softmax outputs (Bonferroni)", t["ks_softmax_per_class"]["p_bonferroni"],
             t["ks_softmax_per_class"]["drift"]),
            ("chi² on predicted-class histogram", t["chi2_predicted_class"]["p_value"], t["chi2_predicted_class"]["drift"]),
            (f"KS on mean intensity ({t['ks_mean_intensity']['reference_mean']:.3f} → "
             f"{t['ks_mean_intensity']['batch_mean']:.3f})", t["ks_mean_intensity"]["p_value"], t["ks_mean_intensity"]["drift"])]
    lines = [f"**Drift: {report['result']}** over {report['images']} images, against {report['reference_images']} "
             f"reference images, alpha {report['alpha']}.", "", "| test | p-value | drift |", "|---|---:|---|"]
    lines += [f"| {name} | {p:.3g} | {'yes' if d else 'no'} |" for name, p, d in rows]
    return "\n".join(lines) + "\n"


def report_path(output: Path) -> Path:
    """predictions.csv -> predictions.drift.json, beside it."""
    return output.with_name(output.stem + ".drift.json")
