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

from ..atomic import write_npz
from ..errors import PipelineError, first_line

REFERENCE_FILE = "drift_reference.npz"


def intensity(images: np.ndarray) -> np.ndarray:
    """Each image's mean pixel value in [0, 1]; none for no images (a batch that won no reservoir slot)."""
    return images.mean(axis=tuple(range(1, images.ndim)), dtype=np.float64).astype(np.float32) / 255.0


def save_reference(path: Path, probabilities: np.ndarray, images: np.ndarray) -> None:
    write_npz(path, probabilities=probabilities.astype(np.float32), intensity=intensity(images))


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """The arrays save_reference wrote. Never unpickles: an archive holding object arrays, a truncated or
    foreign file, or arrays of the wrong shape are one error that names the file."""
    import zipfile
    import zlib

    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError(f"a single {loaded.dtype} array {list(loaded.shape)}, not an .npz archive")
        with loaded as npz:
            reference = {key: npz[key] for key in ("probabilities", "intensity")}
    except (OSError, ValueError, KeyError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        reason = first_line(exc)
        raise PipelineError(f"{path} is not a drift reference: {reason}") from None
    probabilities, intensities = reference["probabilities"], reference["intensity"]
    if (
        probabilities.ndim != 2
        or intensities.ndim != 1
        or not len(probabilities) == len(intensities) > 0
        or probabilities.dtype.kind != "f"
        or intensities.dtype.kind != "f"
    ):
        raise PipelineError(
            f"{path} is not a drift reference: expected float probabilities [N, classes] and intensity [N], got "
            f"{probabilities.dtype} {list(probabilities.shape)} and {intensities.dtype} {list(intensities.shape)}"
        )
    return reference


@dataclass
class Collector:
    """Gathers what the tests need while predict streams through the batches, in bounded memory and time.

    The class histogram counts every image. The KS tests see a uniform sample of at most ``capacity`` images,
    kept by reservoir sampling (Algorithm R) with a fixed seed, so the same input gives the same report: 11
    floats per sampled image (4.4 MB at 100,000), however long the input, and KS tests whose cost does not
    grow with it. Against a 10,000-image reference, 100,000 images already resolve far smaller shifts than
    the reference itself can."""

    capacity: int = 100_000
    seed: int = 0
    seen: int = 0
    counts: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    intensities: np.ndarray | None = None
    _rng: np.random.Generator | None = field(default=None, repr=False)

    def add(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        if self.probabilities is None:
            self._rng = np.random.default_rng(self.seed)
            self.counts = np.zeros(probabilities.shape[1], np.int64)
            self.probabilities = np.empty((self.capacity, probabilities.shape[1]), np.float32)
            self.intensities = np.empty(self.capacity, np.float32)
        assert self._rng is not None and self.counts is not None and self.intensities is not None
        self.counts += np.bincount(probabilities.argmax(axis=1), minlength=len(self.counts))
        index = np.arange(self.seen, self.seen + len(images))
        slots = index.copy()
        full = index >= self.capacity  # past the first `capacity` images: keep image i with chance capacity/(i+1)
        slots[full] = (self._rng.random(int(full.sum())) * (index[full] + 1)).astype(np.int64)
        keep = slots < self.capacity
        self.probabilities[slots[keep]] = probabilities[keep]
        self.intensities[slots[keep]] = intensity(images[keep])
        self.seen += len(images)

    def report(self, reference: dict[str, np.ndarray], alpha: float, min_images: int) -> dict:
        if self.probabilities is None or self.intensities is None:
            return check(reference, np.zeros((0, 10), np.float32), np.zeros(0, np.float32), alpha, min_images)
        sampled = min(self.seen, self.capacity)
        return check(
            reference,
            self.probabilities[:sampled],
            self.intensities[:sampled],
            alpha,
            min_images,
            batch_counts=self.counts,
            images=self.seen,
        )


def check(
    reference: dict[str, np.ndarray],
    probabilities: np.ndarray,
    intensities: np.ndarray,
    alpha: float,
    min_images: int,
    batch_counts: np.ndarray | None = None,
    images: int | None = None,
) -> dict:
    """The three tests; "drift" when any rejects at level ``alpha`` (the per-class KS tests after Bonferroni).
    ``probabilities`` and ``intensities`` may be a sample of a batch of ``images``, whose predicted classes
    were counted in ``batch_counts``; by default they are the whole batch."""
    from scipy import stats

    n = len(probabilities) if images is None else images
    report: dict = {
        "images": n,
        "tested_images": len(probabilities),
        "reference_images": int(len(reference["probabilities"])),
        "alpha": alpha,
    }
    if n < min_images:
        return report | {"result": "not tested", "reason": f"{n} images, fewer than drift.min_images={min_images}"}
    classes = probabilities.shape[1]
    ks = [stats.ks_2samp(reference["probabilities"][:, k], probabilities[:, k]) for k in range(classes)]
    p_values = [float(t.pvalue) for t in ks]
    bonferroni = min(1.0, min(p_values) * classes)
    reference_counts = np.bincount(reference["probabilities"].argmax(axis=1), minlength=classes)
    if batch_counts is None:
        batch_counts = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    table = np.stack([reference_counts, batch_counts])
    table = table[:, table.sum(axis=0) > 0]
    chi2 = stats.chi2_contingency(table) if table.shape[1] > 1 else None
    shift = stats.ks_2samp(reference["intensity"], intensities)
    tests = {
        "ks_softmax_per_class": {
            "statistics": [round(float(t.statistic), 6) for t in ks],
            "p_values": p_values,
            "p_bonferroni": bonferroni,
            "drift": bonferroni < alpha,
        },
        "chi2_predicted_class": {
            "reference_counts": reference_counts.tolist(),
            "batch_counts": batch_counts.tolist(),
            "statistic": float(chi2.statistic) if chi2 else 0.0,
            "p_value": float(chi2.pvalue) if chi2 else 1.0,
            "drift": bool(chi2 is not None and chi2.pvalue < alpha),
        },
        "ks_mean_intensity": {
            "reference_mean": float(reference["intensity"].mean()),
            "batch_mean": float(intensities.mean()),
            "statistic": float(shift.statistic),
            "p_value": float(shift.pvalue),
            "drift": bool(shift.pvalue < alpha),
        },
    }
    drifted = [name for name, t in tests.items() if t["drift"]]
    return report | {"result": "drift" if drifted else "no drift", "drifted_tests": drifted, "tests": tests}


def summary(report: dict) -> str:
    """One line for the terminal and the flow log."""
    if report["result"] == "not tested":
        return f"drift: not tested ({report['reason']})"
    t = report["tests"]
    return (
        f"drift: {report['result']} over {report['images']} images "
        f"(KS softmax p={t['ks_softmax_per_class']['p_bonferroni']:.3g} "
        f"Bonferroni, chi2 classes p={t['chi2_predicted_class']['p_value']:.3g}, "
        f"KS intensity p={t['ks_mean_intensity']['p_value']:.3g}; alpha {report['alpha']})"
    )


def markdown(report: dict) -> str:
    """The Prefect artifact: the result, then the numbers behind it."""
    if report["result"] == "not tested":
        return f"**Drift: not tested** ({report['reason']}).\n"
    t = report["tests"]
    rows = [
        (
            "KS per class on softmax outputs (Bonferroni)",
            t["ks_softmax_per_class"]["p_bonferroni"],
            t["ks_softmax_per_class"]["drift"],
        ),
        ("chi² on predicted-class histogram", t["chi2_predicted_class"]["p_value"], t["chi2_predicted_class"]["drift"]),
        (
            f"KS on mean intensity ({t['ks_mean_intensity']['reference_mean']:.3f} → "
            f"{t['ks_mean_intensity']['batch_mean']:.3f})",
            t["ks_mean_intensity"]["p_value"],
            t["ks_mean_intensity"]["drift"],
        ),
    ]
    lines = [
        f"**Drift: {report['result']}** over {report['images']} images, against {report['reference_images']} "
        f"reference images, alpha {report['alpha']}.",
        "",
        "| test | p-value | drift |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {p:.3g} | {'yes' if d else 'no'} |" for name, p, d in rows]
    return "\n".join(lines) + "\n"


def report_path(output: Path) -> Path:
    """predictions.csv -> predictions.drift.json, beside it."""
    return output.with_name(output.stem + ".drift.json")
