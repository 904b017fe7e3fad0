"""A model file that is not the export's model: truncated, random bytes, or a valid ONNX graph with another
signature. `predict` and `serve` (the real CLI) refuse it in one line naming the file; `serve` never starts."""

import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import REPO, cli, model_copy, one_error_line
from softmax_mlops.errors import PipelineError
from stack import free_port

SERVE_TIMEOUT_S = 60  # a server that (wrongly) starts is killed after this, and the test fails


def save_graph(
    path: Path,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    nodes: list[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> Path:
    """A valid ONNX model (onnx.checker passes), saved at ``path``."""
    graph = helper.make_graph(nodes, "foreign", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity_model(path: Path) -> Path:
    """A foreign model that onnxruntime loads fine: an Identity graph with a float input named x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 784])
    return save_graph(path, [x], [y], [helper.make_node("Identity", ["x"], ["y"])])


def image_model(path: Path, input_type: int, input_shape: list, classes: int, output_names=("logits", "probabilities")):
    """image -> Cast -> flatten -> MatMul -> logits, Softmax -> probabilities, with the given declared types."""
    batch = input_shape[0]
    image = helper.make_tensor_value_info("image", input_type, input_shape)
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, classes]) for name in output_names]
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels", "flat"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["raw"]),
        helper.make_node("Identity", ["raw"], [output_names[0]]),
    ]
    if len(output_names) > 1:
        nodes.append(helper.make_node("Softmax", ["raw"], [output_names[1]], axis=1))
    initializers = [
        numpy_helper.from_array(np.array([-1, 784], np.int64), "flat"),
        numpy_helper.from_array(np.zeros((784, classes), np.float32), "w"),
    ]
    return save_graph(path, [image], outputs, nodes, initializers)


@pytest.fixture
def pixels(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8))
    return path


@pytest.fixture(params=["truncated", "random bytes", "identity graph with a float input x"])
def broken_model(request, onnx_model, tmp_path) -> Path:
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    if request.param == "truncated":
        good = onnx_model[0].read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif request.param == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        identity_model(path)
    return path


@pytest.mark.parametrize("kind", ["truncated", "random bytes"])
def test_a_file_onnxruntime_cannot_read_is_refused_with_its_reason(onnx_model, tmp_path, kind):
    """In this process, where mutmut sees it: the line names the file and quotes onnxruntime's first line."""
    from softmax_mlops.serving.inference import Predictor

    good = onnx_model[0].read_bytes()
    path = tmp_path / "model.onnx"
    path.write_bytes(good[: len(good) // 2] if kind == "truncated" else np.random.default_rng(0).bytes(4096))
    with pytest.raises(PipelineError) as raised:
        Predictor(path, threads=1)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a loadable ONNX model: ") and "INVALID_PROTOBUF" in message, message


def test_predict_refuses_a_corrupt_or_foreign_model_in_one_line(broken_model, pixels, tmp_path):
    out = tmp_path / "out.csv"
    line = one_error_line(cli("predict", str(pixels), "-o", str(out), "-m", str(broken_model), cwd=REPO))
    assert str(broken_model) in line
    assert not out.exists()


@pytest.mark.server
def test_serve_refuses_to_start_on_a_corrupt_or_foreign_model(broken_model):
    """Run to completion with a time limit: a server that started anyway would still be running at the limit
    (subprocess.run then kills it and raises, failing the test)."""
    result = subprocess.run(
        ["softmax-mlops", "serve", "-m", str(broken_model), "--port", str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_S,
    )
    line = one_error_line(result)
    assert str(broken_model) in line
    assert "Uvicorn running" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("float input named image", "expected one input image tensor(uint8)"),
        ("fixed batch of one", "expected one input image tensor(uint8) ['N', 28, 28]"),
        ("three classes", "expected outputs logits and probabilities tensor(float) ['N', 10]"),
        ("logits only", "got logits tensor(float) ['N', 10]"),
        # the export's image first, then one more: every input is listed, in the graph's order
        ("a second input", "got image tensor(uint8) ['N', 28, 28], mask tensor(float) ['N', 1]"),
        ("no input", "expected one input image tensor(uint8) ['N', 28, 28], got none"),
    ],
)
def test_a_valid_onnx_file_with_another_signature_is_refused_at_load_time(tmp_path, kind, expected):
    from softmax_mlops.serving.inference import Predictor

    path = tmp_path / "model.onnx"
    if kind == "float input named image":
        image_model(path, TensorProto.FLOAT, ["N", 28, 28], 10)
    elif kind == "fixed batch of one":
        image_model(path, TensorProto.UINT8, [1, 28, 28], 10)
    elif kind == "three classes":
        image_model(path, TensorProto.UINT8, ["N", 28, 28], 3)
    elif kind == "logits only":
        image_model(path, TensorProto.UINT8, ["N", 28, 28], 10, output_names=("logits",))
    elif kind == "a second input":
        image_model(path, TensorProto.UINT8, ["N", 28, 28], 10)
        model = onnx.load(str(path))
        model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1]))
        onnx.save(model, str(path))
    else:  # no input: the outputs are constants
        zeros = numpy_helper.from_array(np.zeros((1, 10), np.float32))
        names = ("logits", "probabilities")
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 10]) for name in names]
        nodes = [helper.make_node("Constant", [], [name], value=zeros) for name in names]
        save_graph(path, [], outputs, nodes)
    with pytest.raises(PipelineError) as raised:
        Predictor(path)
    message = str(raised.value)
    assert message.startswith(f"{path} is not a model of this project: ") and expected in message
    assert "\n" not in message


def test_outputs_are_taken_by_name_whatever_their_order_in_the_graph(tmp_path):
    """A graph that lists probabilities before logits (the names and types the export's are, so it loads): the
    Predictor still gives logits first. Its weights are zero, so the logits are 0 and the probabilities 0.1."""
    from softmax_mlops.serving.inference import Predictor

    path = image_model(tmp_path / "model.onnx", TensorProto.UINT8, ["N", 28, 28], 10)
    model = onnx.load(str(path))
    model.graph.output.reverse()
    onnx.save(model, str(path))
    logits, probabilities = Predictor(path, threads=1).run(np.zeros((2, 28, 28), np.uint8))
    np.testing.assert_array_equal(logits, 0.0)
    np.testing.assert_allclose(probabilities, 0.1, rtol=1e-6)


def test_a_graph_like_the_exports_loads(tmp_path):
    """The control for the refusals above: the same builder with the export's signature is accepted and runs."""
    from softmax_mlops.serving.inference import Predictor

    predictor = Predictor(image_model(tmp_path / "model.onnx", TensorProto.UINT8, ["N", 28, 28], 10))
    logits, probabilities = predictor.run(np.zeros((4, 28, 28), np.uint8))
    assert logits.shape == probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities, 0.1, rtol=1e-6)


WHY_NOT_NAMES = "expected a JSON object whose class_names are strings"
CORRUPT_CARDS = {  # model.json's bytes -> the reason the refusal gives
    b"{not json": "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
    b"\xff\xfe": "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
    b'["a list"]': WHY_NOT_NAMES,
    b'{"class_names": "abc"}': WHY_NOT_NAMES,
    b'{"class_names": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}': WHY_NOT_NAMES,
}


@pytest.mark.parametrize("card", CORRUPT_CARDS)
def test_a_corrupt_model_card_beside_the_model_is_one_line(onnx_model, pixels, tmp_path, card):
    folder = model_copy(onnx_model, tmp_path / "model").parent
    (folder / "model.json").write_bytes(card)
    line = one_error_line(cli("predict", str(pixels), "-o", str(tmp_path / "o.csv"), "-m", str(folder), cwd=REPO))
    assert f"{folder / 'model.json'} is not a model card" in line


@pytest.mark.parametrize(("card", "reason"), CORRUPT_CARDS.items())
def test_a_corrupt_model_card_is_refused_at_load_time_with_its_reason(onnx_model, tmp_path, card, reason):
    """The same cards in this process, where mutmut sees them: the line names the card and says why."""
    from softmax_mlops.serving.inference import Predictor

    path = model_copy(onnx_model, tmp_path / "model")
    (path.parent / "model.json").write_bytes(card)
    with pytest.raises(PipelineError) as raised:
        Predictor(path, threads=1)
    assert str(raised.value) == f"{path.parent / 'model.json'} is not a model card: {reason}"
