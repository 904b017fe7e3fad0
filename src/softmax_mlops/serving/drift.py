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

import importlib
import threading
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


def sample_keys(indices: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random 64-bit key per image, a function of its position in the batch and the seed only
    (splitmix64's finalizer, a bijection, so distinct positions never share a key). The sample is the images with
    the smallest keys: a uniform sample without replacement that does not depend on how the batch was cut, so
    shards predicted apart merge into exactly the sample one process would have kept."""
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2**64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass
class Collector:
    """Gathers what the tests need while predict streams through the batches, in bounded memory and time.

    The class histogram counts every image. The KS tests see a uniform sample of at most ``capacity`` images:
    those whose keys (sample_keys, of the image's position in the whole batch) are smallest. The same input gives
    the same report, and collectors of a batch's shards merge (``merge``) into exactly the collector of the whole
    batch: counts add, and the merged sample is the smallest keys of both. About 11 floats per sampled image
    (4.4 MB at 100,000; twice that between compactions), however long the input, and KS tests whose cost does not
    grow with it. Against a 10,000-image reference, 100,000 images already resolve far smaller shifts than the
    reference itself can."""

    capacity: int = 100_000
    seed: int = 0
    seen: int = 0
    counts: np.ndarray | None = None
    _parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _held: int = 0  # images in _parts
    _compacted: bool = True  # _parts is one part, in key order
    _threshold: int | None = None  # once `capacity` keys are kept, no larger key can ever be sampled

    def add(self, images: np.ndarray, probabilities: np.ndarray, start: int | None = None) -> None:
        """One batch, whose first image is image ``start`` of the whole batch (by default, the one after the
        last image added)."""
        start = self.seen if start is None else start
        seen = len(images)
        counts = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1]).astype(np.int64)
        keys = sample_keys(np.arange(start, start + seen), self.seed)
        if self._threshold is not None:  # most images of a long batch: they could never be sampled
            wanted = keys < self._threshold
            keys, images, probabilities = keys[wanted], images[wanted], probabilities[wanted]
        self._take(counts, (keys, probabilities.astype(np.float32), intensity(images)), seen)

    def _take(self, counts: np.ndarray, part: tuple[np.ndarray, np.ndarray, np.ndarray], seen: int) -> None:
        self.seen += seen
        self.counts = counts.copy() if self.counts is None else self.counts + counts
        self._parts.append(part)
        self._held += len(part[0])
        self._compacted = False
        if self._held > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        """Keep only the ``capacity`` smallest keys, in key order (so that sums over the sample are the same
        however it was gathered)."""
        if self._compacted:
            return
        keys, probabilities, intensities = (np.concatenate(column) for column in zip(*self._parts, strict=True))
        if len(keys) > self.capacity:
            smallest = np.argpartition(keys, self.capacity - 1)[: self.capacity]
            keys, probabilities, intensities = keys[smallest], probabilities[smallest], intensities[smallest]
        order = np.argsort(keys)
        self._parts = [(keys[order], probabilities[order], intensities[order])]
        self._held, self._compacted = len(keys), True
        if self._held == self.capacity:
            self._threshold = int(keys[order[-1]])

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sampled images' keys, softmax outputs and intensities, in key order."""
        self._compact()
        if not self._parts:  # nothing added yet (every add appends a part, even an empty one): no classes known
            return np.zeros(0, np.uint64), np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
        return self._parts[0]

    def merge(self, other: Collector) -> None:
        """Take in the collector of another part of the same batch: other images, sampled with the same seed."""
        if (other.seed, other.capacity) != (self.seed, self.capacity):
            raise ValueError(
                f"cannot merge a collector of seed {other.seed}, capacity {other.capacity} into one of seed "
                f"{self.seed}, capacity {self.capacity}"
            )
        if other.counts is not None:
            self._take(other.counts, other.sample(), seen=other.seen)

    def save(self, path: Path) -> None:
        """The collector as an .npz archive (atomically), for a shard predicted in another process: ``load``
        gives back a collector that merges exactly as this one would."""
        keys, probabilities, intensities = self.sample()
        counts = np.zeros(0, np.int64) if self.counts is None else self.counts
        write_npz(
            path,
            header=np.array([self.capacity, self.seed, self.seen], np.int64),
            counts=counts,
            keys=keys,
            probabilities=probabilities,
            intensities=intensities,
        )

    @classmethod
    def load(cls, path: Path) -> Collector:
        """What ``save`` wrote. Never unpickles; a foreign or damaged archive is one error that names the file."""
        import zipfile
        import zlib

        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in ("header", "counts", "keys", "probabilities", "intensities")}
            capacity, seed, seen = (int(v) for v in arrays["header"])
            keys = arrays["keys"].astype(np.uint64, casting="equiv")
            if not len(keys) == len(arrays["probabilities"]) == len(arrays["intensities"]) <= capacity:
                raise ValueError("its sample's columns differ in length, or exceed its capacity")
        except (
            OSError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            EOFError,
            zipfile.BadZipFile,
            zlib.error,
        ) as exc:
            raise PipelineError(f"{path} is not a saved drift collector: {first_line(exc)}") from None
        collector = cls(capacity, seed)
        if len(arrays["counts"]):
            collector._take(arrays["counts"], (keys, arrays["probabilities"], arrays["intensities"]), seen)
        return collector

    def report(self, reference: dict[str, np.ndarray], alpha: float, min_images: int) -> dict:
        _, probabilities, intensities = self.sample()  # empty when nothing was added: 0 images, "not tested"
        return check(
            reference, probabilities, intensities, alpha, min_images, batch_counts=self.counts, images=self.seen
        )


def preload(images: int, min_images: int) -> threading.Thread | None:
    """Start importing scipy.stats in the background when a batch of ``images`` (at most) will be tested: the
    import costs some 0.5 to 1.5 s of CPU, which a large batch hides behind its inference, and which a batch
    under ``min_images`` never needs (its report is "not tested"). The thread, for whoever wants to wait."""
    if images < min_images:
        return None
    thread = threading.Thread(target=importlib.import_module, args=("scipy.stats",), daemon=True)
    thread.start()
    return thread


def _class_test(reference_counts: np.ndarray, counts: np.ndarray):  # noqa: ANN202 - scipy's result, or None
    """The chi-squared test of two histograms of predicted classes, over the classes either has; None when
    fewer than two classes occur (nothing to test)."""
    from scipy import stats

    table = np.stack([reference_counts, counts])
    table = table[:, table.sum(axis=0) > 0]
    return stats.chi2_contingency(table) if table.shape[1] > 1 else None


def class_p_value(reference_counts: np.ndarray, counts: np.ndarray) -> float:
    """The batch check's class test on any histogram (the service's online window): its p-value, 1 when there
    is nothing to test."""
    test = _class_test(reference_counts, counts)
    return float(test.pvalue) if test is not None else 1.0


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
    n = len(probabilities) if images is None else images
    report: dict = {
        "images": n,
        "tested_images": len(probabilities),
        "reference_images": int(len(reference["probabilities"])),
        "alpha": alpha,
    }
    if n < min_images:
        return report | {"result": "not tested", "reason": f"{n} images, fewer than drift.min_images={min_images}"}
    from scipy import stats  # only here: a batch too small to test never pays for its import (preload)

    classes = probabilities.shape[1]
    ks = [stats.ks_2samp(reference["probabilities"][:, k], probabilities[:, k]) for k in range(classes)]
    p_values = [float(t.pvalue) for t in ks]
    bonferroni = min(1.0, min(p_values) * classes)
    reference_counts = np.bincount(reference["probabilities"].argmax(axis=1), minlength=classes)
    if batch_counts is None:
        batch_counts = np.bincount(probabilities.argmax(axis=1), minlength=classes)
    chi2 = _class_test(reference_counts, batch_counts)
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
