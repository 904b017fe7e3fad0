"""The ONNX contract: uint8 image in, logits and probabilities out, dynamic batch, explicit opset, one file."""

import numpy as np
import onnx
import pytest

from softmax_mlops.export import check_parity


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_signature_follows_the_contract(onnx_model):
    path, _ = onnx_model
    model = onnx.load(str(path))
    (image,) = model.graph.input
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(image)[1:] == [28, 28] and isinstance(dims(image)[0], str), "batch axis must be symbolic"
    outputs = {o.name: o for o in model.graph.output}
    assert list(outputs) == ["logits", "probabilities"]
    for out in outputs.values():
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and dims(out)[1] == 10
        assert dims(out)[0] == dims(image)[0]
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


def test_preprocessing_lives_in_the_graph(onnx_model):
    ops = [node.op_type for node in onnx.load(str(onnx_model[0])).graph.node]
    assert ops[0] == "Cast" and "Div" in ops and ("Reshape" in ops or "Flatten" in ops)


def test_single_file_without_external_data(onnx_model):
    path, _ = onnx_model
    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]


def test_the_file_holds_no_source_paths(onnx_model):
    """model.onnx is a DVC output: it must not depend on where the code or the venv happens to live (the
    exporter's per-node stack traces name both), or a fresh clone elsewhere could never match dvc.lock."""
    from softmax_mlops.export import STACK_TRACE_KEY

    path, _ = onnx_model
    model = onnx.load(str(path))
    assert not [p for n in model.graph.node for p in n.metadata_props if p.key == STACK_TRACE_KEY]
    assert b'File "/' not in path.read_bytes() and b"site-packages" not in path.read_bytes()


def test_parity_with_torch_at_batch_1_7_and_10000(onnx_model):
    path, module = onnx_model
    images = np.random.default_rng(0).integers(0, 256, size=(10000, 28, 28), dtype=np.uint8)
    report = check_parity(module, path, images)
    for batch in (1, 7, 10000):
        entry = report[f"batch_{batch}"]
        assert entry["max_abs_diff_logits"] <= 1e-5 and entry["max_abs_diff_probabilities"] <= 1e-5
        assert entry["argmax_match"] == 1.0
    assert report["images"] == 10000


@pytest.mark.parametrize("n", [1, 2, 513])
def test_probabilities_are_a_softmax_of_the_logits(onnx_model, n):
    from softmax_mlops.inference import Predictor

    images = np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    logits, probabilities = Predictor(onnx_model[0]).run(images)
    assert logits.shape == probabilities.shape == (n, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))
