"""Calibration figures against an independent implementation (torchmetrics) and hand-computed cases, and
temperature scaling against a known temperature."""

import json

import numpy as np
import pytest
import torch

from softmax_mlops import config
from softmax_mlops.errors import PipelineError
from softmax_mlops.stages import calibrate


def scaled_problem(true_temperature: float, n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Labels drawn from softmax(z), and the logits a model with temperature ``true_temperature`` would give:
    z * T0. Temperature scaling should then find T = T0."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(z, dim=1), 1, generator=generator).squeeze(1).numpy()
    return z * true_temperature, labels


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_ece_agrees_with_torchmetrics(scale):
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = scaled_problem(1.0, n=5000, seed=int(scale))
    logits = logits * scale
    probabilities = torch.softmax(logits, dim=1)
    ours = calibrate.expected_calibration_error(calibrate.reliability_bins(probabilities.numpy(), labels, 15))
    # torchmetrics puts a confidence that lies exactly on an edge into the other bin; with continuous
    # confidences no image does, so the two agree up to torchmetrics' float32
    theirs = multiclass_calibration_error(
        probabilities.float(), torch.from_numpy(labels), num_classes=10, n_bins=15, norm="l1"
    ).item()
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours > 0.01  # a real miscalibration, not two zeros agreeing


def test_hand_computed_ece_nll_and_brier():
    # confidences 0.9 (right), 0.9 (wrong), 0.65 (right), 0.65 (right):
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1 - 0.65| = 0.2 + 0.175
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 1])
    table = calibrate.reliability_bins(probabilities, labels, 15)
    assert calibrate.expected_calibration_error(table) == pytest.approx(0.375)
    assert [row["count"] for row in table if row["count"]] == [2, 2]
    assert sum(1 for row in table if row["accuracy"] is None) == 13

    figures, _ = calibrate.scores(torch.from_numpy(np.log(probabilities)), labels, 1.0, 15)
    assert figures["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1) + 2 * np.log(0.65)) / 4)
    assert figures["brier"] == pytest.approx((0.02 + 1.62 + 2 * 0.245) / 4)
    assert figures["ece"] == pytest.approx(0.375) and figures["accuracy"] == 0.75


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_temperature_scaling_finds_the_true_temperature(true_temperature):
    logits, labels = scaled_problem(true_temperature)
    fitted = calibrate.fit_temperature(logits, labels, initial=1.5, max_iter=100)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    y = torch.from_numpy(labels)
    best = calibrate.nll(logits, y, fitted)
    assert best < calibrate.nll(logits, y, fitted * 1.01) and best < calibrate.nll(logits, y, fitted / 1.01)
    before, _ = calibrate.scores(logits, labels, 1.0, 15)
    after, _ = calibrate.scores(logits, labels, fitted, 15)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]


def test_temperature_scaling_is_deterministic():
    logits, labels = scaled_problem(2.0, n=3000)
    assert calibrate.fit_temperature(logits, labels, 1.5, 100) == calibrate.fit_temperature(logits, labels, 1.5, 100)


def test_the_exported_graph_divides_by_the_temperature(tmp_path):
    """logits and probabilities are both after T; softmax(logits) = probabilities; argmax is unchanged."""
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.stages.export import ExportedSoftmaxRegression, export_onnx

    generator = torch.Generator().manual_seed(0)
    W, b = torch.randn(784, 10, generator=generator) * 0.1, torch.randn(10, generator=generator)
    images = torch.randint(0, 256, (64, 28, 28), generator=generator, dtype=torch.uint8).numpy()
    path = tmp_path / "model.onnx"
    export_onnx(ExportedSoftmaxRegression(W, b, temperature=2.5), path, opset=18)
    logits, probabilities = Predictor(path).run(images)
    raw = calibrate.logits64(W, b, images).numpy()
    np.testing.assert_allclose(logits, raw / 2.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(raw / 2.5), dim=1).numpy(), atol=1e-6)
    assert (logits.argmax(1) == raw.argmax(1)).all()


def test_a_missing_or_bad_calibration_file_is_named(tmp_path):
    (tmp_path / "params.yaml").write_text("paths: {prepared: p, models: m, metrics: metrics, reports: r}\n")
    cfg = config.load(tmp_path)
    with pytest.raises(PipelineError, match=r"calibration.json is missing or unreadable: run the calibrate stage"):
        calibrate.read_temperature(cfg, "scratch")
    cfg.paths.calibration("scratch").parent.mkdir(parents=True)
    cfg.paths.calibration("scratch").write_text(json.dumps({"temperature": -1.0}))
    with pytest.raises(PipelineError, match="temperature must be a positive number, got -1.0"):
        calibrate.read_temperature(cfg, "scratch")


def test_confidences_on_a_bin_edge_go_to_the_bin_they_close():
    """Guo et al.'s bins are ((m-1)/M, m/M]: a confidence of exactly 0.2 with M = 5 is in the first bin, 1.0 in
    the last. A float32 softmax can give 1 + 1 ulp, which still belongs in the last bin, and a confidence of 0
    (a row of zeros) in the first: every image is in exactly one bin."""
    confidences = [0.0, 0.2, np.nextafter(0.2, 1), 0.6, 1.0, np.nextafter(1.0, 2)]
    probabilities = np.array([[c, 1 - c] if c >= 0.5 else [c, 0.0] for c in confidences])
    labels = np.zeros(len(confidences), dtype=int)  # class 0 everywhere: rows where 0 is the argmax are right
    table = calibrate.reliability_bins(probabilities, labels, 5)
    assert [row["count"] for row in table] == [2, 1, 1, 0, 2]
    assert [(row["lower"], row["upper"]) for row in table] == [(m / 5, (m + 1) / 5) for m in range(5)]
    assert table[3]["confidence"] is None and table[3]["accuracy"] is None
    assert table[4]["confidence"] == pytest.approx(1.0) and table[4]["accuracy"] == 1.0


def test_nll_without_a_temperature_is_the_plain_cross_entropy():
    """The 'before' figures (T = 1) call nll without a temperature."""
    logits, labels = scaled_problem(2.0, n=500)
    y = torch.from_numpy(labels)
    assert calibrate.nll(logits, y).item() == torch.nn.functional.cross_entropy(logits, y).item()


@pytest.mark.parametrize("true_temperature", [2.0, 8.0])
def test_the_fitted_temperature_is_the_minimum_to_float64_precision(true_temperature):
    """The docstring's promise, checked against an independent root of d NLL / d log T (scipy's brentq on
    autograd's derivative): the fit stops at the minimum, not where a loose tolerance stopped it. The
    tolerance_change of 1e-12 is what gets it there: torch's default 1e-9 stops 2e-5 short at T0 = 8."""
    from scipy.optimize import brentq

    logits, labels = scaled_problem(true_temperature, n=5000)
    y = torch.from_numpy(labels)

    def slope(log_t: float) -> float:
        t = torch.tensor(log_t, dtype=torch.float64, requires_grad=True)
        calibrate.nll(logits, y, t.exp()).backward()
        return float(t.grad)

    minimum = np.exp(brentq(slope, -5, 8, xtol=1e-14))
    assert calibrate.fit_temperature(logits, labels, initial=1.5, max_iter=100) == pytest.approx(minimum, rel=1e-6)


def test_logits_that_are_not_finite_stop_the_fit_in_one_line():
    logits, labels = scaled_problem(2.0, n=500)
    logits[0, 0] = float("nan")
    with pytest.raises(PipelineError, match=r"^temperature scaling diverged \(T = nan\): the validation logits are"):
        calibrate.fit_temperature(logits, labels, initial=1.5, max_iter=100)


@pytest.mark.parametrize(("stored", "accepted"), [(0.8, True), (1.7, True), (0.0, False), (2, False), ("2.0", False)])
def test_the_export_reads_back_only_a_positive_float_temperature(tmp_path, stored, accepted):
    """Any positive float is a temperature (below 1 sharpens, above 1 softens); 0 would divide by zero in the
    graph, and calibrate always writes a float, so anything else is a file someone else wrote."""
    (tmp_path / "params.yaml").write_text("paths: {prepared: p, models: m, metrics: metrics, reports: r}\n")
    cfg = config.load(tmp_path)
    cfg.paths.calibration("scratch").parent.mkdir(parents=True)
    cfg.paths.calibration("scratch").write_text(json.dumps({"temperature": stored}))
    if accepted:
        assert calibrate.read_temperature(cfg, "scratch") == stored
    else:
        with pytest.raises(PipelineError, match=f"temperature must be a positive number, got {stored!r}"):
            calibrate.read_temperature(cfg, "scratch")


def test_the_brier_score_counts_every_class_even_one_no_label_names():
    """One-hot over the model's classes, not over the labels seen: a test batch without the last class still
    scores all three columns (one_hot would otherwise guess two classes and fail to broadcast)."""
    probabilities = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    figures, _ = calibrate.scores(torch.from_numpy(np.log(probabilities)), np.array([0, 1]), 1.0, 15)
    assert figures["brier"] == pytest.approx(0.25 + 0.0625 + 0.0625)
