"""The champion/challenger rule at its edges, on a real MLflow registry (SQLite, artifacts in the test's folder)
with real exported ONNX models scored by onnxruntime: a score exactly at the gate, accuracy ties decided by
the NLL, and a champion whose artifact is gone or unreadable."""

from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import REPO
from softmax_mlops import config
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving.inference import Predictor
from softmax_mlops.stages.export import ExportedSoftmaxRegression, export_onnx
from softmax_mlops.tracking.registry import CANDIDATE, CHAMPION, Score, decide, promote_if_not_worse, score, score_of

GATE = 0.82


def test_the_gate_in_params_yaml_is_the_one_tested_here():
    assert config.load(REPO).export.champion_min_accuracy == GATE


def test_a_score_exactly_at_the_gate_is_promoted():
    """The gate is a minimum (docs/calibration.md, params.yaml): equal passes, with or without a champion before."""
    first = decide(Score(0.82, 0.7), gate=GATE, champion=None)
    assert first.promoted and first.reason == "promoted: 0.8200 ≥ gate 0.8200, no champion before"
    over_weaker = decide(Score(0.82, 0.7), gate=GATE, champion=("4", Score(0.81, 0.5)))
    assert over_weaker.promoted and over_weaker.reason == "promoted: 0.8200 ≥ champion v4 0.8100"
    just_under = decide(Score(np.nextafter(0.82, 0), 0.7), gate=GATE, champion=None)
    assert not just_under.promoted and just_under.reason.startswith("no champion: 0.8200 < gate 0.8200")


def test_an_accuracy_computed_at_exactly_the_gate_passes_it():
    """41 right out of 50 is 0.82 exactly as score_of computes it, so the gate sees equality, not 0.8199..."""
    probabilities = np.eye(10, dtype=np.float32)[np.arange(50) % 10]
    labels = np.arange(50) % 10
    labels[:9] = (labels[:9] + 1) % 10
    assert score_of(probabilities, labels).accuracy == GATE
    assert decide(score_of(probabilities, labels), GATE, None).promoted


@pytest.fixture(scope="module")
def models(onnx_model, tmp_path_factory):
    """The conftest model (T = 1) and the same weights at T = 3: the same argmax everywhere, so the same
    accuracy on any labels, but less confident, so a higher NLL where they are right."""
    sharp, module = onnx_model
    soft = tmp_path_factory.mktemp("soft") / "model.onnx"
    W, b = module.model.linear.weight.T.float(), module.model.linear.bias.float()
    export_onnx(ExportedSoftmaxRegression(W, b, temperature=3.0), soft, opset=18)
    images = np.random.default_rng(7).integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    labels = Predictor(sharp).run(images)[1].argmax(axis=1)
    scores = {path: score(Predictor(path), images, labels) for path in (sharp, soft)}
    assert scores[sharp].accuracy == scores[soft].accuracy == 1.0
    assert scores[sharp].nll < scores[soft].nll
    return sharp, soft, images, labels, scores


@pytest.fixture(scope="module")
def store(tmp_path_factory, new_mlflow_store):
    """One SQLite store for the module; each test registers its own model."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = new_mlflow_store(folder / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("guards-registry", artifact_location=(folder / "artifacts").as_uri())
    return uri, experiment, folder / "artifacts"


@dataclass
class Registry:
    uri: str
    client: mlflow.MlflowClient
    experiment: str
    artifacts: Path
    name: str  # the registered model of this test

    def register(self, path: Path) -> str:
        with mlflow.start_run(experiment_id=self.experiment):
            info = mlflow.onnx.log_model(
                onnx.load(str(path)),
                name="model",
                registered_model_name=self.name,
                save_as_external_data=False,
                pip_requirements=["onnxruntime"],  # MLflow would otherwise spend seconds inferring them
            )
        return str(info.registered_model_version)

    def alias(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def stored_onnx(self, version: str) -> Path:
        """The model.onnx of a version in the artifact store itself (not a downloaded copy)."""
        registered = self.client.get_model_version(self.name, version)
        key = registered.model_id or registered.source.rstrip("/").split("/")[-1]  # MLflow 3: models:/m-<id>
        (path,) = [p for p in self.artifacts.rglob("model.onnx") if key in p.parts]
        return path

    def promote(self, version: str, new: Score, images: np.ndarray, labels: np.ndarray):
        return promote_if_not_worse(self.client, self.name, version, new, GATE, self.uri, images, labels)


@pytest.fixture
def registry(store, request) -> Registry:
    uri, experiment, artifacts = store
    mlflow.set_tracking_uri(uri)
    name = "guards-" + "".join(c if c.isalnum() else "-" for c in request.node.name)
    return Registry(uri, mlflow.MlflowClient(), experiment, artifacts, name)


def test_a_real_model_exactly_at_the_gate_becomes_champion(registry, models):
    sharp, _, images, labels, _ = models
    wrong = labels.copy()
    wrong[:36] = (wrong[:36] + 1) % 10  # 164 of 200 right: 0.82
    at_gate = score(Predictor(sharp), images, wrong)
    assert at_gate.accuracy == GATE
    version = registry.register(sharp)
    decision = registry.promote(version, at_gate, images, wrong)
    assert decision.promoted and decision.reason == "promoted: 0.8200 ≥ gate 0.8200, no champion before"
    assert registry.alias(CHAMPION) == version == registry.alias(CANDIDATE)


def test_an_accuracy_tie_goes_to_the_lower_nll_and_an_exact_tie_promotes(registry, models):
    sharp, soft, images, labels, scores = models
    low, high = f"{scores[sharp].nll:.4f}", f"{scores[soft].nll:.4f}"

    def challenge(path):
        version = registry.register(path)
        return version, registry.promote(version, scores[path], images, labels)

    v1, first = challenge(soft)
    assert first.promoted and registry.alias(CHAMPION) == v1

    v2, lower = challenge(sharp)  # same accuracy, lower NLL: promoted
    assert lower.promoted and lower.reason == f"promoted: 1.0000 ≥ champion v{v1} 1.0000 (tie; NLL {low} ≤ {high})"
    assert registry.alias(CHAMPION) == v2

    v3, higher = challenge(soft)  # same accuracy, higher NLL: kept
    assert not higher.promoted and higher.reason == f"kept v{v2}: 1.0000 = 1.0000 (tie; NLL {high} > {low})"
    assert registry.alias(CHAMPION) == v2 and registry.alias(CANDIDATE) == v3
    assert registry.client.get_model_version(registry.name, v3).tags["champion_decision"] == "kept"

    v4, equal = challenge(sharp)  # the champion's own model again: equal NLL, promoted (never stuck)
    assert equal.promoted and equal.reason == f"promoted: 1.0000 ≥ champion v{v2} 1.0000 (tie; NLL {low} ≤ {low})"
    assert registry.alias(CHAMPION) == v4


def foreign_graph() -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 784])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


@pytest.mark.parametrize("damage", ["deleted", "random bytes", "truncated", "foreign graph"])
def test_a_champion_whose_artifact_cannot_be_loaded_is_one_line_naming_its_uri(registry, models, damage):
    sharp, _, images, labels, scores = models
    champion = registry.register(sharp)
    registry.client.set_registered_model_alias(registry.name, CHAMPION, champion)
    stored = registry.stored_onnx(champion)
    good = stored.read_bytes()
    if damage == "deleted":
        stored.unlink()
    elif damage == "random bytes":
        stored.write_bytes(np.random.default_rng(0).bytes(len(good)))
    elif damage == "truncated":
        stored.write_bytes(good[: len(good) // 3])
    else:
        stored.write_bytes(foreign_graph())

    challenger = registry.register(sharp)
    with pytest.raises(PipelineError) as raised:
        registry.promote(challenger, scores[sharp], images, labels)
    message = str(raised.value)
    assert message.startswith(f"cannot score the current champion models:/{registry.name}/{champion}: "), message
    assert "\n" not in message
    reason = {"deleted": "no ONNX model at", "foreign graph": "is not a model of this project"}
    assert reason.get(damage, "is not a loadable ONNX model") in message  # the loader's own words, kept
    # nothing was decided: the aliases did not move and the challenger carries no decision
    assert registry.alias(CHAMPION) == champion and registry.alias(CANDIDATE) is None
    assert "champion_decision" not in registry.client.get_model_version(registry.name, challenger).tags


def test_every_kept_decision_is_false_and_names_the_champion_it_kept():
    """Decision.promoted is a real bool (it is written as a tag and read by the CLI) and champion_before names
    the version that held @champion, on both ways of being kept: under the gate, and worse than the champion."""
    under_gate = decide(Score(0.81, 0.5), gate=GATE, champion=("2", Score(0.80, 0.6)))
    worse = decide(Score(0.83, 0.5), gate=GATE, champion=("3", Score(0.84, 0.6)))
    assert under_gate.promoted is False and under_gate.champion_before == "2"
    assert worse.promoted is False and worse.champion_before == "3"


def test_the_nll_of_a_certain_or_impossible_true_class_is_bounded():
    """A true class given probability 0 costs -log(float64 tiny), about 708, not infinity (one such image would
    make every NLL tie-break compare inf with inf); float32 rounding can give a probability a hair above 1,
    which must cost 0, not a negative NLL that would beat every honest model."""
    probabilities = np.zeros((2, 10), dtype=np.float32)
    probabilities[0, 3] = 1.0  # image 0: all on class 3, which is wrong
    probabilities[1, 5] = np.nextafter(np.float32(1), np.float32(2))  # image 1: right, with p = 1 + 1 ulp
    nll = score_of(probabilities, np.array([4, 5])).nll
    assert nll == pytest.approx(-np.log(np.finfo(np.float64).tiny) / 2)
    assert score_of(probabilities[1:], np.array([5])).nll == 0.0


def test_the_champion_is_scored_from_the_store_the_stage_names_not_the_process_default(registry, models, tmp_path):
    """The export stage passes its tracking URI; a process whose MLflow default points elsewhere (a user's
    MLFLOW_TRACKING_URI, another test) must still score the champion from the stage's store."""
    sharp, _, images, labels, scores = models
    champion = registry.register(sharp)
    registry.client.set_registered_model_alias(registry.name, CHAMPION, champion)
    challenger = registry.register(sharp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'other.db'}")  # a store that cannot open
    decision = registry.promote(challenger, scores[sharp], images, labels)
    assert decision.promoted and decision.champion_before == champion
    tags = registry.client.get_model_version(registry.name, challenger).tags
    assert tags["champion_decision"] == "promoted" and tags["champion_reason"] == decision.reason


class Watched:
    """A real MlflowClient whose registry calls are noted with whether the lock was held at the time."""

    def __init__(self, client: mlflow.MlflowClient) -> None:
        self.client, self.held, self.calls = client, False, []

    def __getattr__(self, attr):
        method = getattr(self.client, attr)

        def call(*args, **kwargs):
            self.calls.append((attr, args[1:2], self.held))
            return method(*args, **kwargs)

        return call


def test_the_champion_is_read_and_both_aliases_moved_inside_the_lock(registry, models):
    """The lock of champion_lock.py must cover the whole decision: a read of @champion outside it, or an alias
    moved after it, would let two challengers both read the same champion (tests/unit/test_champion_lock.py)."""
    from contextlib import contextmanager

    sharp, soft, images, labels, scores = models
    watched = Watched(registry.client)

    @contextmanager
    def lock():
        watched.held = True
        try:
            yield
        finally:
            watched.held = False

    first = registry.register(soft)
    promote_if_not_worse(watched, registry.name, first, scores[soft], GATE, registry.uri, images, labels, lock())
    second = registry.register(sharp)
    decision = promote_if_not_worse(
        watched, registry.name, second, scores[sharp], GATE, registry.uri, images, labels, lock()
    )
    assert decision.promoted and decision.reason.startswith(f"promoted: 1.0000 ≥ champion v{first} ")
    registry_calls = [c for c in watched.calls if "alias" in c[0]]
    assert ("get_model_version_by_alias", (CHAMPION,), True) in registry_calls
    assert ("set_registered_model_alias", (CHAMPION,), True) in registry_calls
    assert ("set_registered_model_alias", (CANDIDATE,), True) in registry_calls
    assert all(held for _, _, held in registry_calls), registry_calls
    assert registry.alias(CHAMPION) == second
