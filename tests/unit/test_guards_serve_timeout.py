"""The inference time limit (serve.request_timeout_s), on a real server with a genuinely slow real model.

The model has the export's signature (uint8 image [N, 28, 28] in, float32 logits and probabilities [N, 10]
out), but before its affine map it runs an ONNX Loop of N * N * WORK iterations: one image costs a few dozen
iterations (well under a millisecond), 256 images cost some three million (seconds). So one server, one model
and one limit give both a request over the limit and a request under it.
"""

import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stack import serving

pytestmark = pytest.mark.server

WORK = 16  # loop iterations per pair of images in a request: about 1.6 s for 256 images here
LIMIT_S = 0.25  # --request-timeout
SLOW_BATCH, FAST_BATCH = 256, 1  # 256 is serve.max_instances
OUTPUTS = ("logits", "probabilities")


def slow_model(path: Path) -> Path:
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 28, 28])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 10]) for name in OUTPUTS]
    scalar = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
    ]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "count",
        scalar,
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["pixels", "flat"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["affine"]),
        helper.make_node("Shape", ["image"], ["batch"], end=1),
        helper.make_node("Mul", ["batch", "batch"], ["pairs"]),
        helper.make_node("Mul", ["pairs", "work"], ["trips_1d"]),
        helper.make_node("Squeeze", ["trips_1d"], ["trips"]),
        helper.make_node("Loop", ["trips", "true", "zero"], ["count"], body=body),
        helper.make_node("Mul", ["count", "zero"], ["nothing"]),  # the loop's result feeds the outputs
        helper.make_node("Add", ["affine", "nothing"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1, 784], np.int64), "flat"),
        numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.01, (784, 10)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([WORK], np.int64), "work"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    graph = helper.make_graph(nodes, "slow", [image], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    return slow_model(tmp_path_factory.mktemp("slow") / "model.onnx")


def instances(n: int) -> dict:
    return {"instances": np.random.default_rng(n).integers(0, 256, size=(n, 28, 28)).tolist()}


def test_the_model_is_really_slow_for_a_full_batch_and_fast_for_one_image(slow):
    """What the server test relies on, measured in this process with onnxruntime directly."""
    from softmax_mlops.serving.inference import Predictor

    predictor = Predictor(slow, threads=1)
    start = time.perf_counter()
    predictor.run(np.zeros((FAST_BATCH, 28, 28), np.uint8))
    fast = time.perf_counter() - start
    start = time.perf_counter()
    _, probabilities = predictor.run(np.zeros((SLOW_BATCH, 28, 28), np.uint8))
    slow_s = time.perf_counter() - start
    assert fast < LIMIT_S / 10 and slow_s > 2 * LIMIT_S, (fast, slow_s)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)


def test_inference_over_the_limit_is_503_and_the_service_keeps_serving(slow, tmp_path):
    with (
        serving(slow, tmp_path / "server.log", "--request-timeout", str(LIMIT_S)) as (url, _),
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        start = time.monotonic()
        over = client.post("/predict", json=instances(SLOW_BATCH))
        waited = time.monotonic() - start
        assert over.status_code == 503, over.text
        assert over.headers["content-type"] == "application/json"
        assert over.json() == {"error": f"inference took longer than {LIMIT_S} s"}
        assert waited < 10 * LIMIT_S + 5, waited  # answered at the limit, not when the model finished

        under = client.post("/predict", json=instances(FAST_BATCH))
        assert under.status_code == 200, under.text
        (prediction,) = under.json()["predictions"]
        assert 0 <= prediction["class_id"] < 10 and len(prediction["top_k"]) == 3
        # the other protocols share the limit
        v2 = {"inputs": [{"name": "image", "shape": [SLOW_BATCH, 28, 28], "datatype": "UINT8", "data": [0] * 200704}]}
        assert client.post("/v2/models/softmax-mlops/infer", json=v2).status_code == 503
        assert client.get("/health").status_code == 200
        assert client.post("/predict", json=instances(FAST_BATCH)).status_code == 200
