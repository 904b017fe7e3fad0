"""Champion / challenger: the rule with plain numbers, then every case on a real MLflow registry (SQLite) with
real ONNX models scored by onnxruntime."""

import mlflow
import numpy as np
import onnx
import pytest
import torch

from softmax_mlops.serving.inference import Predictor
from softmax_mlops.stages.export import ExportedSoftmaxRegression, export_onnx
from softmax_mlops.tracking.registry import Score, decide, promote_if_not_worse, score

NAME = "registry-test"


def test_an_empty_registry_promotes_the_first_version_past_the_gate():
    decision = decide(Score(0.8238, 0.49), gate=0.82, champion=None)
    assert decision.promoted and decision.reason == "promoted: 0.8238 ≥ gate 0.8200, no champion before"
    missed = decide(Score(0.81, 0.5), gate=0.82, champion=None)
    assert not missed.promoted and missed.reason == "no champion: 0.8100 < gate 0.8200"


def test_a_better_version_is_promoted_and_a_worse_one_kept():
    champion = ("3", Score(0.8238, 0.49))
    better = decide(Score(0.8466, 0.44), gate=0.82, champion=champion)
    assert better.promoted and better.reason == "promoted: 0.8466 ≥ champion v3 0.8238"
    worse = decide(Score(0.8230, 0.40), gate=0.82, champion=champion)
    assert not worse.promoted and worse.reason == "kept v3: 0.8230 < 0.8238"


def test_the_gate_holds_even_against_a_weaker_champion():
    decision = decide(Score(0.81, 0.5), gate=0.82, champion=("2", Score(0.80, 0.6)))
    assert not decision.promoted and decision.reason == "kept v2: 0.8100 < gate 0.8200"


def test_nll_breaks_an_accuracy_tie_and_an_exact_tie_promotes():
    champion = ("1", Score(0.8238, 0.49))
    assert decide(Score(0.8238, 0.48), 0.82, champion).promoted
    kept = decide(Score(0.8238, 0.50), 0.82, champion)
    assert not kept.promoted and kept.reason == "kept v1: 0.8238 = 0.8238 (tie; NLL 0.5000 > 0.4900)"
    assert decide(Score(0.8238, 0.49), 0.82, champion).promoted  # at least as good: never backwards, not stuck


@pytest.fixture(scope="module")
def data_and_models(tmp_path_factory):
    """Random images labelled by a 'good' model, so it scores 1.0; a 'bad' model with other weights scores less."""
    folder = tmp_path_factory.mktemp("registry-models")
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (500, 28, 28), dtype=torch.uint8, generator=generator).numpy()
    paths = {}
    for name in ("good", "bad"):
        module = ExportedSoftmaxRegression(
            torch.randn(784, 10, generator=generator), torch.randn(10, generator=generator)
        )
        paths[name] = folder / f"{name}.onnx"
        export_onnx(module, paths[name], opset=18)
    labels = Predictor(paths["good"]).run(images)[1].argmax(axis=1)
    return images, labels, paths


@pytest.fixture
def registry(tmp_path, new_mlflow_store):
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name="registry-test")
    return uri, mlflow.MlflowClient()


def register(path) -> str:
    with mlflow.start_run():
        info = mlflow.onnx.log_model(
            onnx.load(str(path)),
            name="model",
            registered_model_name=NAME,
            save_as_external_data=False,
            pip_requirements=["onnxruntime"],  # MLflow would otherwise spend seconds inferring them
        )
    return str(info.registered_model_version)


def test_all_three_cases_on_a_real_registry(registry, data_and_models):
    uri, client = registry
    images, labels, paths = data_and_models
    scores = {name: score(Predictor(path), images, labels) for name, path in paths.items()}
    assert scores["good"].accuracy == 1.0 > scores["bad"].accuracy

    first = register(paths["bad"])  # empty registry: the first version past the gate wins
    decision = promote_if_not_worse(client, NAME, first, scores["bad"], 0.0, uri, images, labels)
    assert decision.promoted and decision.champion_before is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == first

    better = register(paths["good"])
    decision = promote_if_not_worse(client, NAME, better, scores["good"], 0.0, uri, images, labels)
    assert decision.promoted and decision.champion_before == first
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better

    worse = register(paths["bad"])  # never backwards
    decision = promote_if_not_worse(client, NAME, worse, scores["bad"], 0.0, uri, images, labels)
    assert not decision.promoted
    assert decision.reason == f"kept v{better}: {scores['bad'].accuracy:.4f} < 1.0000"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better
    assert str(client.get_model_version_by_alias(NAME, "candidate").version) == worse
    tags = client.get_model_version(NAME, worse).tags
    assert tags["champion_decision"] == "kept" and tags["champion_reason"] == decision.reason
    assert float(tags["test_nll"]) == pytest.approx(scores["bad"].nll, abs=1e-6)


def test_the_champion_is_scored_again_on_todays_data(registry, data_and_models):
    """The comparison uses the data in hand, not the number recorded when the champion was promoted."""
    uri, client = registry
    images, labels, paths = data_and_models
    champion = register(paths["good"])
    client.set_registered_model_alias(NAME, "champion", champion)
    relabelled = Predictor(paths["bad"]).run(images)[1].argmax(axis=1)  # on this data, 'bad' is right
    challenger = register(paths["bad"])
    new = score(Predictor(paths["bad"]), images, relabelled)
    decision = promote_if_not_worse(client, NAME, challenger, new, 0.0, uri, images, relabelled)
    assert decision.promoted and np.isclose(new.accuracy, 1.0)
