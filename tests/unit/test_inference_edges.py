"""inference.py in the test process: where a configured model path points and which file it names, the top-k
order when probabilities tie, and the exact JSON shape of a prediction that /predict and `predict --format jsonl`
send."""

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import ascii_locale, model_copy
from softmax_mlops.classes import CLASS_NAMES
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving.inference import Predictor, model_source, registered_version, resolve_model

PIXELS = np.random.default_rng(3).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("models/scratch", "/project/models/scratch"),  # params.yaml's relative paths: from the project root
        ("/srv/model.onnx", "/srv/model.onnx"),
        ("models:/softmax-scratch@champion", "models:/softmax-scratch@champion"),
        ("runs:/abc/model", "runs:/abc/model"),
    ],
)
def test_a_model_source_is_taken_from_the_project_root_only_when_it_is_a_relative_path(source, expected):
    assert model_source(source, Path("/project")) == expected


def test_a_folder_is_read_as_the_model_onnx_inside_it(onnx_model, tmp_path):
    """--model models/scratch, as params.yaml names a model, is the model.onnx that the export stage wrote there."""
    folder = model_copy(onnx_model, tmp_path / "scratch").parent
    assert resolve_model(str(folder)) == folder / "model.onnx"


def test_a_registered_model_that_is_not_there_names_the_tracking_store_it_came_from(tmp_path, new_mlflow_store):
    """Without --tracking-uri, MLflow's own (here set as a user sets MLFLOW_TRACKING_URI) is asked, and the one
    line says "from MLflow" with the first line of MLflow's own reason."""
    import mlflow

    mlflow.set_tracking_uri(new_mlflow_store(tmp_path / "mlflow.db"))
    with pytest.raises(PipelineError) as raised:
        resolve_model("models:/no-such-model@champion")
    prefix = "cannot load models:/no-such-model@champion from MLflow: "
    message = str(raised.value)
    assert message.startswith(prefix) and "\n" not in message, message
    assert "no-such-model" in message.removeprefix(prefix), message  # MLflow's reason names the model


def test_a_registered_version_is_read_from_the_uri_or_asked_of_the_registry_for_an_alias(tmp_path, new_mlflow_store):
    """What `predict` writes as the model's version: models:/name/N says N itself; models:/name@alias is asked of
    the registry (a real SQLite store, where @champion is version 1 of 2); anything else has none. An alias the
    registry lacks is one line naming the URI and the store, --tracking-uri's or MLflow's own."""
    import mlflow

    uri = new_mlflow_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("edge")
    for _ in range(2):
        client.create_model_version("edge", str(tmp_path))
    client.set_registered_model_alias("edge", "champion", "1")
    assert registered_version("models:/edge@champion", uri) == "1"
    assert registered_version("models:/edge/2", uri) == "2"
    for unversioned in ("models:/edge", "runs:/0123/model", str(tmp_path / "model.onnx")):
        assert registered_version(unversioned, uri) is None, unversioned
    mlflow.set_tracking_uri(uri)
    for tracking_uri, named in ((uri, uri), (None, "MLflow")):
        with pytest.raises(PipelineError) as raised:
            registered_version("models:/edge@nope", tracking_uri)
        message = str(raised.value)
        prefix = f"cannot resolve models:/edge@nope at {named}: "
        assert message.startswith(prefix) and "\n" not in message, message
        assert "nope" in message.removeprefix(prefix), message  # MLflow's reason names the alias


def test_a_model_without_a_card_has_the_fashion_mnist_names_as_its_card(onnx_model, tmp_path):
    """No model.json beside the model: the card is the Fashion-MNIST class names alone, which /metadata shows.
    (A corrupt card: test_guards_models.py.)"""
    bare = Predictor(model_copy(onnx_model, tmp_path / "bare"), threads=1)
    assert bare.metadata == {"class_names": list(CLASS_NAMES)}


def test_provenance_names_the_model_as_the_user_named_it(onnx_model, tmp_path):
    """What a file of predictions records: the path when the model was given as one, the models:/ URI and the
    registered version when it came from the registry (the path is then MLflow's download folder), and the
    registered name and data md5 of its card."""
    path = model_copy(onnx_model, tmp_path / "model")
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert Predictor(path, threads=1).provenance() == {
        "model": str(path),
        "model_name": "",
        "model_version": "",
        "model_md5": md5,
        "data_md5": "",
    }
    card = {"class_names": list(CLASS_NAMES), "registered_model": "softmax-scratch", "data_md5": "0f" * 16}
    (path.parent / "model.json").write_text(json.dumps(card), encoding="utf-8")
    registered = Predictor(path, threads=1, source="models:/softmax-scratch@champion", version="3").provenance()
    assert registered == {
        "model": "models:/softmax-scratch@champion",
        "model_name": "softmax-scratch",
        "model_version": "3",
        "model_md5": md5,
        "data_md5": "0f" * 16,
    }


def test_loading_the_export_prints_and_warns_nothing(onnx_model, capfd):
    """onnxruntime prints its own banners and warns about a provider it does not have: a service's log and a
    batch job's output start clean."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Predictor(onnx_model[0], threads=1)
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr() == ("", "")


def test_a_model_from_the_registry_reads_its_card_among_the_extra_files(onnx_model, tmp_path):
    """MLflow's download of a registered ONNX model puts the files logged with it under extra_files/: the card
    there is the model's card (names of its own here, so that the default names cannot pass for it)."""
    path = model_copy(onnx_model, tmp_path / "download")
    (path.parent / "extra_files").mkdir()
    names = [f"class {i}" for i in range(10)]
    (path.parent / "extra_files" / "model.json").write_text(json.dumps({"class_names": names}), encoding="utf-8")
    assert Predictor(path, threads=1).class_names == names


def test_ties_keep_the_lower_class_id_first():
    """The documented order is the most probable first, then the lower class id: numpy's default argsort is not
    stable (a SIMD quicksort on x86), so among equal probabilities it could put any class first, and the same
    images would get another top-1 from run to run."""
    rng = np.random.default_rng(0)
    probabilities = rng.integers(0, 3, size=(2000, 10)).astype(np.float32)  # many ties on every row
    ids, top = Predictor.top_k_of(probabilities, 10)
    expected = np.array([sorted(range(10), key=lambda c, row=row: (-row[c], c)) for row in probabilities])
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(top, np.take_along_axis(probabilities, expected, axis=1))


def test_top_k_is_top_k_of_the_models_probabilities(onnx_model):
    predictor = Predictor(onnx_model[0])
    ids, top = predictor.top_k(PIXELS, 3)
    expected_ids, expected_top = Predictor.top_k_of(predictor.run(PIXELS)[1], 3)
    assert ids.shape == (5, 3)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(top, expected_top)


def test_a_prediction_has_the_documented_keys_and_values(onnx_model):
    predictor = Predictor(onnx_model[0])
    ids = np.array([[3, 1], [0, 9]])
    probabilities = np.array([[0.5, 0.25], [0.75, 0.125]], dtype=np.float32)

    def expected(row: list[int], probs: list[float]) -> dict:  # written out from the documented shape
        pairs = zip(row, probs, strict=True)
        top_k = [{"class_id": c, "class_name": CLASS_NAMES[c], "probability": p} for c, p in pairs]
        return {**top_k[0], "top_k": top_k}

    assert predictor.describe(ids, probabilities) == [expected([3, 1], [0.5, 0.25]), expected([0, 9], [0.75, 0.125])]


def test_a_model_card_is_read_as_utf8_whatever_the_locale(onnx_model, tmp_path):
    """The export writes model.json as UTF-8; a service started under LC_CTYPE=C (ASCII) must read the same
    class names, not refuse the card."""
    names = [f"vêtement n°{i}" for i in range(10)]
    path = model_copy(onnx_model, tmp_path / "model", names)
    with ascii_locale():
        predictor = Predictor(path, threads=1)
    assert predictor.class_names == names
