"""calibrate@{impl} and export@{impl} as `dvc repro` runs them, in process, on a project trained on small generated
data: everything they write, to DVC's files, to the MLflow run and to the registry, recomputed or rebuilt here
from the weights, the prepared splits and the documented model card.

Not `heavy`: the project trains for two epochs on 50 images, so mutmut can rerun this module for each mutant of
the stage functions (test_calibrate.py and test_export.py check the functions they call against scipy,
torchmetrics and torch). Each test runs its stage itself and checks everything it wrote: mutmut credits a call
made in a fixture only to the first test that used it, so checks in other tests would never see its mutants.
test_guards_export.py covers the export's refusals."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import calibrated_project, clone_state
from softmax_mlops import config
from softmax_mlops.stages import calibrate, data
from softmax_mlops.stages.models import load_weights

IMPL = "concise"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, new_mlflow_store) -> config.Config:
    """A project copy through ingest, two epochs of training, evaluate and calibrate."""
    return calibrated_project(tmp_path_factory.mktemp("stage-runs"), IMPL, epochs=2, new_store=new_mlflow_store)


def logits(cfg: config.Config, split_path) -> tuple[torch.Tensor, np.ndarray]:
    W, b = load_weights(cfg.paths.weights(IMPL))
    images, labels = data.load_split(split_path)
    return calibrate.logits64(W, b, images), labels


def test_calibrate_writes_what_it_computed(calibrated, tmp_path):
    cfg = calibrated
    result = calibrate.run(cfg, IMPL)
    report = result.report()
    assert set(report) == {"temperature", "validation", "test"} and report["temperature"] == result.temperature
    check_the_temperature_is_fitted_on_the_validation_split(cfg, report)
    bins = check_the_test_split_is_scored_before_and_after(cfg, report)
    check_dvc_reads_the_same_report_and_picture(cfg, report, bins, tmp_path / "expected.png")
    check_the_training_run_gets_the_figures_the_files_and_the_stage(cfg, report)


def check_the_temperature_is_fitted_on_the_validation_split(cfg: config.Config, report: dict) -> None:
    val_logits, val_labels = logits(cfg, cfg.paths.val_data)
    settings = cfg.calibrate
    fitted = calibrate.fit_temperature(val_logits, val_labels, settings.initial_temperature, settings.max_iter)
    assert report["temperature"] == fitted and fitted != 1.0
    y = torch.from_numpy(val_labels)
    assert report["validation"] == {
        "images": 10,
        "nll_before": pytest.approx(F.cross_entropy(val_logits, y).item(), rel=1e-12),
        "nll_after": pytest.approx(F.cross_entropy(val_logits / fitted, y).item(), rel=1e-12),
    }
    assert report["validation"]["nll_after"] < report["validation"]["nll_before"]


def check_the_test_split_is_scored_before_and_after(cfg: config.Config, report: dict) -> tuple[list, list]:
    test_logits, test_labels = logits(cfg, cfg.paths.test_data)
    before, before_bins = calibrate.scores(test_logits, test_labels, 1.0, cfg.calibrate.bins)
    after, after_bins = calibrate.scores(test_logits, test_labels, report["temperature"], cfg.calibrate.bins)
    assert report["test"] == {"before": before, "after": after} and before != after
    return before_bins, after_bins


def check_dvc_reads_the_same_report_and_picture(cfg: config.Config, report: dict, bins: tuple, expected) -> None:
    """The metrics file is the report; the picture is byte for byte the one drawn here from the recomputed bins
    with the documented panel titles (matplotlib draws the same inputs to the same bytes: DVC relies on it)."""
    from softmax_mlops.stages import plots

    assert json.loads(cfg.paths.calibration(IMPL).read_text()) == report
    before, after = report["test"]["before"], report["test"]["after"]
    plots.reliability_diagrams(
        {
            "before (T = 1)": (bins[0], before["ece"]),
            f"after (T = {report['temperature']:.3f})": (bins[1], after["ece"]),
        },
        f"{IMPL}: reliability on the test set",
        expected,
    )
    assert cfg.paths.reliability(IMPL).read_bytes() == expected.read_bytes()


def check_the_training_run_gets_the_figures_the_files_and_the_stage(cfg: config.Config, report: dict) -> None:
    """Every scalar but accuracy (calibration does not change it), as test_{figure}_{before|after}."""
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run_id = json.loads(cfg.paths.run_info(IMPL).read_text())["run_id"]
    run = client.get_run(run_id)
    expected = {"temperature": report["temperature"]}
    for when in ("before", "after"):
        for key, value in report["test"][when].items():
            if key != "accuracy":
                expected[f"test_{key}_{when}"] = value
    assert {key: run.data.metrics[key] for key in expected} == expected
    assert not any(key.startswith("test_accuracy_") for key in run.data.metrics)
    assert run.data.tags["dvc_stages"].split(",")[-1] == f"calibrate@{IMPL}"
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {cfg.paths.calibration(IMPL).name, cfg.paths.reliability(IMPL).name} <= artifacts
    assert run.info.status == "FINISHED"


def test_export_writes_registers_and_reports_what_it_built(calibrated):
    from softmax_mlops.stages import export

    cfg = calibrated
    result = export.run(cfg, IMPL)
    images, labels = data.load_split(cfg.paths.test_data)
    test_accuracy = json.loads(cfg.paths.eval_metrics(IMPL).read_text())["test_accuracy"]
    parity = json.loads(cfg.paths.parity(IMPL).read_text())
    assert (result.max_abs_diff, result.argmax_match) == (parity["max_abs_diff"], parity["argmax_match"])
    assert result.test_accuracy == test_accuracy
    check_the_headline_is_the_shipped_models_figures(cfg)
    assert parity["max_abs_diff"] <= export.PARITY_MAX_ABS_DIFF and parity["argmax_match"] == 1.0
    card = check_the_model_card(cfg, test_accuracy)
    probabilities = check_the_graph_divides_by_the_fitted_temperature(cfg, card, images)
    check_the_drift_reference(cfg, probabilities, images)
    check_the_run_and_the_registered_version(cfg, result, parity, card, labels, probabilities)
    check_a_second_export_is_judged_against_the_first(cfg, result, labels, probabilities)


def check_the_headline_is_the_shipped_models_figures(cfg: config.Config) -> None:
    """metrics/{impl}/headline.json, the one metrics file per implementation: the same four keys for each, so
    that `dvc metrics show` is one row per implementation."""
    evaluation = json.loads(cfg.paths.eval_metrics(IMPL).read_text())
    calibration = json.loads(cfg.paths.calibration(IMPL).read_text())
    assert json.loads(cfg.paths.headline(IMPL).read_text()) == {
        "accuracy": evaluation["test_accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "ece": calibration["test"]["after"]["ece"],
        "temperature": calibration["temperature"],
    }
    assert calibration["test"]["after"]["ece"] != calibration["test"]["before"]["ece"]


def check_the_model_card(cfg: config.Config, test_accuracy: float) -> dict:
    """model.json, field by field as docs/serving.md documents it."""
    from softmax_mlops.stages.export import LOGITS_MEANING

    calibration = json.loads(cfg.paths.calibration(IMPL).read_text())
    summary = json.loads(cfg.paths.data_summary.read_text())
    card = json.loads(cfg.paths.model_card(IMPL).read_text())
    assert card == {
        "impl": IMPL,
        "class_names": list(data.CLASS_NAMES),
        "opset": cfg.export.opset,
        "input": {"name": "image", "dtype": "uint8", "shape": ["N", 28, 28]},
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["N", 10]},
            {"name": "probabilities", "dtype": "float32", "shape": ["N", 10]},
        ],
        "temperature": calibration["temperature"],
        "logits": LOGITS_MEANING,
        "test_accuracy": test_accuracy,
        "data_md5": summary["data_md5"],
        "registered_model": cfg.mlflow.registered_model(IMPL),
    }
    return card


def check_the_graph_divides_by_the_fitted_temperature(cfg: config.Config, card: dict, images) -> np.ndarray:
    """model.onnx, run by onnxruntime, against the weights in float64 and the temperature on the card."""
    import onnx

    from softmax_mlops.serving.inference import Predictor

    model = onnx.load(str(cfg.paths.onnx(IMPL)))
    assert model.opset_import[0].version == cfg.export.opset
    logits_out, probabilities = Predictor(cfg.paths.onnx(IMPL)).run(images)
    W, b = load_weights(cfg.paths.weights(IMPL))
    expected = calibrate.logits64(W, b, images) / card["temperature"]
    np.testing.assert_allclose(logits_out, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities, torch.softmax(expected, dim=1).numpy(), atol=1e-6)
    return probabilities


def check_the_drift_reference(cfg: config.Config, probabilities: np.ndarray, images) -> None:
    from softmax_mlops.serving import drift

    reference = drift.load_reference(cfg.paths.drift_reference(IMPL))
    np.testing.assert_array_equal(reference["probabilities"], probabilities)
    np.testing.assert_array_equal(reference["intensity"], drift.intensity(images))


def check_the_run_and_the_registered_version(cfg, result, parity, card, labels, probabilities) -> None:
    """The training run gets the parity figures and file; the registered version is this run's model, with the
    card (naming the run) and the drift reference among its files, and a decision on @champion."""
    from softmax_mlops.tracking.registry import score_of

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run_id = json.loads(cfg.paths.run_info(IMPL).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc_stages"].split(",")[-1] == f"export@{IMPL}"
    assert run.data.metrics["onnx_max_abs_diff"] == parity["max_abs_diff"]
    assert run.data.metrics["onnx_argmax_match"] == parity["argmax_match"]
    assert cfg.paths.parity(IMPL).name in {item.path for item in client.list_artifacts(run_id)}

    name = cfg.mlflow.registered_model(IMPL)
    version = client.get_model_version(name, result.registered.version)
    assert version.run_id == run_id and result.registered.registered_model == name
    assert result.registered.gate == cfg.export.champion_min_accuracy and isinstance(result.registered.champion, bool)
    new = score_of(probabilities, labels)
    assert version.tags["test_accuracy"] == f"{new.accuracy:.4f}" and run.data.metrics["test_nll"] == new.nll
    files = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{name}/{result.registered.version}", tracking_uri=cfg.mlflow.tracking_uri
        )
    )
    registered_card = (files / "extra_files" / "model.json").read_text()
    assert registered_card == json.dumps(card | {"mlflow_run_id": run_id}, indent=2) + "\n"  # as DVC's card reads
    reference = files / "extra_files" / cfg.paths.drift_reference(IMPL).name
    assert reference.read_bytes() == cfg.paths.drift_reference(IMPL).read_bytes()


def check_a_second_export_is_judged_against_the_first(cfg, first, labels, probabilities) -> None:
    """The same model again: the registry scores the champion (the first export) on the same test labels, and
    the tie on accuracy and NLL promotes the newer version, as documented."""
    from softmax_mlops.stages import export
    from softmax_mlops.tracking.registry import decide, score_of

    second = export.run(cfg, IMPL)
    same = score_of(probabilities, labels)
    expected = decide(same, cfg.export.champion_min_accuracy, (first.registered.version, same))
    assert int(second.registered.version) == int(first.registered.version) + 1
    assert (second.registered.champion, second.registered.reason) == (expected.promoted, expected.reason)
    assert "tie" in expected.reason and expected.promoted


def test_export_refuses_a_model_that_fails_parity_in_one_line(calibrated, tmp_path):
    """On a copy of the project (the other tests read the original), with the weights a million times larger:
    the float32 temperature in the graph then differs from torch's float64 division by more than the limit
    (test_guards_export.py explains the cause). Nothing is left where `serve` would take it."""
    from softmax_mlops.errors import PipelineError
    from softmax_mlops.stages import export
    from softmax_mlops.stages.models import save_weights

    cfg = config.load(clone_state(calibrated.paths.root, tmp_path / "copy"))
    W, b = load_weights(cfg.paths.weights(IMPL))
    save_weights(cfg.paths.weights(IMPL), W * 1e6, b)
    for output in (cfg.paths.onnx(IMPL), cfg.paths.model_card(IMPL)):
        output.unlink(missing_ok=True)
    with pytest.raises(PipelineError) as error:
        export.run(cfg, IMPL)
    parity = json.loads(cfg.paths.parity(IMPL).read_text())
    assert parity["max_abs_diff"] > export.PARITY_MAX_ABS_DIFF
    assert str(error.value) == (
        f"ONNX parity failed for {IMPL}: max abs diff {parity['max_abs_diff']:.2e} "
        f"(limit {export.PARITY_MAX_ABS_DIFF}), argmax match {parity['argmax_match']:.4%}; "
        f"{cfg.paths.onnx(IMPL)} not written"
    )
    assert not cfg.paths.onnx(IMPL).exists() and not cfg.paths.model_card(IMPL).exists()
