"""The drift report's arithmetic on small generated arrays, checked against scipy called directly."""

import numpy as np
from scipy import stats

from softmax_mlops.serving import drift


def reference(rng, n=2000):
    logits = rng.normal(size=(n, 10))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return probabilities.astype(np.float32), images


def test_bonferroni_is_the_smallest_per_class_p_times_ten(tmp_path):
    rng = np.random.default_rng(0)
    probabilities, images = reference(rng)
    drift.save_reference(tmp_path / "ref.npz", probabilities, images)
    ref = drift.load_reference(tmp_path / "ref.npz")
    batch_p, batch_images = reference(np.random.default_rng(1), 500)
    collector = drift.Collector()
    collector.add(batch_images[:200], batch_p[:200])
    collector.add(batch_images[200:], batch_p[200:])
    report = collector.report(ref, alpha=0.05, min_images=100)
    expected = [stats.ks_2samp(probabilities[:, k], batch_p[:, k]).pvalue for k in range(10)]
    assert np.allclose(report["tests"]["ks_softmax_per_class"]["p_values"], expected)
    assert report["tests"]["ks_softmax_per_class"]["p_bonferroni"] == min(1.0, 10 * min(expected))
    assert report["result"] == "no drift" and report["images"] == 500


def test_a_label_shift_is_caught_by_the_class_histogram():
    rng = np.random.default_rng(2)
    probabilities, images = reference(rng)
    ref = {"probabilities": probabilities, "intensity": drift.intensity(images)}
    batch = probabilities[probabilities.argmax(axis=1) < 3][:400]  # only classes 0-2 predicted
    report = drift.check(ref, batch, drift.intensity(images[:400]), alpha=0.05, min_images=100)
    assert report["tests"]["chi2_predicted_class"]["drift"] and report["result"] == "drift"
    assert "chi2_predicted_class" in report["drifted_tests"]
    assert "Drift: drift" in drift.markdown(report) and drift.summary(report).startswith("drift: drift over 400")


def test_the_reference_is_byte_reproducible(tmp_path):
    probabilities, images = reference(np.random.default_rng(3), 100)
    drift.save_reference(tmp_path / "a.npz", probabilities, images)
    drift.save_reference(tmp_path / "b.npz", probabilities, images)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_a_long_batch_is_ks_tested_on_a_bounded_seeded_uniform_sample():
    """Past `capacity` images the collector keeps a uniform sample: memory stays fixed, the class histogram
    still counts every image, the same input gives the same report, and the sample is uniform over the batch
    (a shift in its second half shows up in about half of the sample)."""
    rng = np.random.default_rng(4)
    probabilities, images = reference(rng, 3000)
    ref = {"probabilities": probabilities, "intensity": drift.intensity(images)}
    batch_p, batch_images = reference(np.random.default_rng(5), 5000)
    batch_images[2500:] = 255  # the second half is white

    def collect() -> drift.Collector:
        collector = drift.Collector(capacity=1000, seed=0)
        for start in range(0, 5000, 700):
            collector.add(batch_images[start : start + 700], batch_p[start : start + 700])
        return collector

    collector = collect()
    assert collector.sample()[1].shape == (1000, 10) and collector.seen == 5000
    report = collector.report(ref, alpha=0.05, min_images=100)
    assert report["images"] == 5000 and report["tested_images"] == 1000
    assert sum(report["tests"]["chi2_predicted_class"]["batch_counts"]) == 5000
    assert report == collect().report(ref, alpha=0.05, min_images=100)
    white = (collector.sample()[2] == 1.0).mean()
    # a uniform sample of 1,000 from a batch that is half white holds Binomial(1000, 0.5) white images: a standard
    # deviation of 0.016 in the fraction, so 0.42-0.58 is five of them either side
    assert 0.42 < white < 0.58, white
    assert report["tests"]["ks_mean_intensity"]["drift"]
