"""The ONNX contract: uint8 image in, logits and probabilities out, dynamic batch, explicit opset, one file."""

import numpy as np
import onnx
import pytest

from softmax_mlops.stages.export import check_parity

BATCHES = ("batch_1", "batch_7", "batch_10000")


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
    from softmax_mlops.stages.export import STACK_TRACE_KEY

    path, _ = onnx_model
    model = onnx.load(str(path))
    assert not [p for n in model.graph.node for p in n.metadata_props if p.key == STACK_TRACE_KEY]
    assert b'File "/' not in path.read_bytes() and b"site-packages" not in path.read_bytes()


def test_parity_with_torch_at_batch_1_7_and_10000(onnx_model):
    path, module = onnx_model
    images = np.random.default_rng(0).integers(0, 256, size=(10000, 28, 28), dtype=np.uint8)
    report = check_parity(module, path, images)
    for batch in BATCHES:
        entry = report[batch]
        assert entry["max_abs_diff_logits"] <= 1e-5 and entry["max_abs_diff_probabilities"] <= 1e-5
        assert entry["argmax_match"] == 1.0
    assert report["images"] == 10000
    # the two figures the export stage's gate reads: the worst over every batch size
    worst = max(max(e["max_abs_diff_logits"], e["max_abs_diff_probabilities"]) for e in map(report.get, BATCHES))
    assert report["max_abs_diff"] == worst and report["argmax_match"] == 1.0


@pytest.mark.parametrize("n", [1, 2, 513])
def test_probabilities_are_a_softmax_of_the_logits(onnx_model, n):
    from softmax_mlops.serving.inference import Predictor

    images = np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    logits, probabilities = Predictor(onnx_model[0]).run(images)
    assert logits.shape == probabilities.shape == (n, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))


def test_one_fresh_export_keeps_every_promise(tmp_path):
    """The same contract on a model exported inside the test. mutmut maps a function to the tests that ran it,
    and the session's onnx_model fixture runs export_onnx under whichever test came first: without this test,
    a mutant of the export would be checked by that one test alone. Also: the temperature defaults to 1 (the
    graph's logits are the raw ones), and the batch axis is named `batch` in the input and both outputs."""
    import torch

    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.stages.calibrate import logits64
    from softmax_mlops.stages.export import STACK_TRACE_KEY, ExportedSoftmaxRegression, export_onnx

    generator = torch.Generator().manual_seed(5)
    W, b = torch.randn(784, 10, generator=generator) * 0.1, torch.randn(10, generator=generator)
    path = tmp_path / "model.onnx"
    export_onnx(ExportedSoftmaxRegression(W, b), path, opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no external data, no temporary
    model = onnx.load(str(path), load_external_data=False)
    assert [dims(v)[0] for v in (*model.graph.input, *model.graph.output)] == ["batch"] * 3
    assert not [p for n in model.graph.node for p in n.metadata_props if p.key == STACK_TRACE_KEY]
    assert b"site-packages" not in path.read_bytes()
    images = np.random.default_rng(5).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    np.testing.assert_allclose(Predictor(path).run(images)[0], logits64(W, b, images).numpy(), rtol=1e-5, atol=1e-5)


def test_an_export_whose_outputs_lose_the_batch_axis_is_refused_and_leaves_nothing(tmp_path):
    """A graph whose output has a fixed first axis would serve one row whatever the batch: the export names the
    file in one line and leaves neither it nor its temporary file."""
    import torch

    from softmax_mlops.errors import PipelineError
    from softmax_mlops.stages.export import export_onnx

    class OneRow(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            row = image.float().mean() * torch.ones(1, 10)
            return row, row

    path = tmp_path / "model.onnx"
    with pytest.raises(PipelineError) as raised:
        export_onnx(OneRow(), path, opset=18)
    assert str(raised.value) == f"ONNX export of {path} lost the dynamic batch axis"
    assert list(tmp_path.iterdir()) == []
