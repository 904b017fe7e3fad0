"""Drift checks on the real data: `softmax-mlops predict` with the exported model and the test set's reference.
Genuine images (the test set itself, and training images the model was never scored on) show no drift; images
that are visibly shifted do, each through the tests that should catch it."""

import json

import numpy as np
import pytest

from helpers import cli, copy_project, run_tool

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def project(real_splits, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("drift") / "project")
    result = run_tool("dvc", "repro", "export@scratch", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (root / "models/scratch/drift_reference.npz").is_file()
    return root


def drift_of(project, images: np.ndarray, name: str) -> dict:
    np.save(project / f"{name}.npy", images)
    result = cli("predict", f"{name}.npy", "-o", f"{name}.csv", "-m", "models/scratch", cwd=project)
    assert result.returncode == 0, result.stderr
    assert f"-> {name}.drift.json" in result.stdout  # one line with the result, naming the report
    return json.loads((project / f"{name}.drift.json").read_text())


def test_genuine_images_show_no_drift(project, real_splits):
    test_images = real_splits["test"][0]
    train_images = real_splits["train"][0]
    sample = train_images[np.random.default_rng(0).choice(len(train_images), 5000, replace=False)]
    for name, images in (("test", test_images), ("train-sample", sample)):
        report = drift_of(project, images, name)
        assert report["result"] == "no drift", (name, report)
        assert report["images"] == len(images) and report["reference_images"] == 10000


SHIFTS = {  # name -> (shift, the tests that must reject)
    "inverted": (lambda x, y: 255 - x, {"ks_softmax_per_class", "ks_mean_intensity"}),
    "brightened": (
        lambda x, y: np.clip(x.astype(np.int16) + 40, 0, 255).astype(np.uint8),
        {"ks_softmax_per_class", "ks_mean_intensity"},
    ),
    "rotated": (lambda x, y: np.rot90(x, 1, axes=(1, 2)).copy(), {"ks_softmax_per_class", "chi2_predicted_class"}),
    "one-class": (lambda x, y: x[y == 7], {"ks_softmax_per_class", "chi2_predicted_class"}),
}


@pytest.mark.parametrize("shift", SHIFTS)
def test_shifted_images_show_drift(project, real_splits, shift):
    images, labels = real_splits["test"]
    transform, expected = SHIFTS[shift]
    report = drift_of(project, transform(images[:3000], labels[:3000]), shift)
    assert report["result"] == "drift"
    assert expected <= set(report["drifted_tests"]), report["drifted_tests"]


def test_a_batch_too_small_is_not_tested(project, real_splits):
    report = drift_of(project, real_splits["test"][0][:20], "tiny")
    assert report["result"] == "not tested" and "drift.min_images=200" in report["reason"]
