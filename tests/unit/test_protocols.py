"""The Open Inference Protocol (KServe v2) and MLflow's scoring protocol, on a real server on 127.0.0.1:
tritonclient (a client nobody here wrote) in its binary and JSON modes, raw requests, and hostile input."""

import json

import httpx
import numpy as np
import pytest

from stack import serving

pytestmark = pytest.mark.server

MAX_BODY, MAX_INSTANCES = 400_000, 8
IMAGES = np.random.default_rng(5).integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
NAME = "softmax-mlops"  # the fixture model has no model card, so the server's default name


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("protocols") / "serve.log"
    options = ("--max-body-bytes", str(MAX_BODY), "--max-instances", str(MAX_INSTANCES))
    with serving(onnx_model[0], log, *options) as (url, _):
        yield url


@pytest.fixture(scope="module")
def expected(onnx_model):
    from softmax_mlops.serving.inference import Predictor

    return Predictor(onnx_model[0]).run(IMAGES)


@pytest.fixture
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.removeprefix("http://"))
    yield client
    client.close()


def test_triton_client_sees_a_live_ready_server_and_the_model_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(NAME)
    metadata = triton.get_model_metadata(NAME)
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert metadata["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert not triton.is_model_ready("another-model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_triton_client_infers_what_the_model_computes(triton, expected, binary):
    import tritonclient.http as httpclient

    image = httpclient.InferInput("image", list(IMAGES.shape), "UINT8")
    image.set_data_from_numpy(IMAGES, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "probabilities")]
    result = triton.infer(NAME, [image], outputs=outputs, request_id="r-1")
    np.testing.assert_array_equal(result.as_numpy("logits"), expected[0])
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected[1])
    assert result.get_response()["id"] == "r-1"


def test_triton_client_default_outputs_and_output_selection(triton, expected):
    import tritonclient.http as httpclient

    image = httpclient.InferInput("image", list(IMAGES.shape), "UINT8")
    image.set_data_from_numpy(IMAGES)
    everything = triton.infer(NAME, [image])  # no outputs named: all of them, as binary data
    np.testing.assert_array_equal(everything.as_numpy("probabilities"), expected[1])
    only = triton.infer(NAME, [image], outputs=[httpclient.InferRequestedOutput("probabilities")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]


def test_json_data_may_be_flat_or_nested(server, expected):
    for data in (IMAGES.ravel().tolist(), IMAGES.tolist()):
        body = {"inputs": [{"name": "image", "shape": [6, 28, 28], "datatype": "UINT8", "data": data}]}
        response = httpx.post(f"{server}/v2/models/{NAME}/infer", json=body)
        assert response.status_code == 200, response.text
        (logits, probabilities) = response.json()["outputs"]
        assert probabilities["shape"] == [6, 10] and probabilities["datatype"] == "FP32"
        np.testing.assert_array_equal(np.array(probabilities["data"], np.float32).reshape(6, 10), expected[1])


def test_v2_answers_the_same_as_predict(server, expected):
    body = {
        "inputs": [{"name": "image", "shape": [6, 784], "datatype": "INT64", "data": IMAGES.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    v2 = httpx.post(f"{server}/v2/models/{NAME}/infer", json=body).json()["outputs"][0]["data"]
    predict = httpx.post(f"{server}/predict", json={"instances": IMAGES.tolist()}).json()["predictions"]
    assert np.array(v2).reshape(6, 10).argmax(1).tolist() == [p["class_id"] for p in predict]
    assert [max(row) for row in np.array(v2).reshape(6, 10).tolist()] == [p["probability"] for p in predict]


def v2_body(**tensor) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784} | tensor]}


@pytest.mark.parametrize(
    "case, body, status, message",
    [
        ("not JSON", b"{nope", 400, "malformed JSON"),
        ("no inputs", {"outputs": []}, 400, '"inputs"'),
        ("wrong input name", v2_body(name="pixels"), 400, 'one input, "image"'),
        ("strings", v2_body(datatype="BYTES"), 400, "datatype 'BYTES' is not supported"),
        ("shape and data disagree", v2_body(shape=[2, 28, 28]), 400, "shape [2, 28, 28] needs 1568"),
        ("negative dimension", v2_body(shape=[-1, 28, 28]), 400, "non-negative integers"),
        # 2**62 * 4 overflows int64 to 0, the size of an empty "data": it must not reach numpy's reshape (the
        # typed request refuses any dimension past 2**31 - 1)
        ("overflowing shape", v2_body(shape=[1, 2**62, 4], data=[]), 400, "of at most 2147483647 each"),
        ("zero-sized but huge", v2_body(shape=[0, 2**40, 28], data=[]), 400, "of at most 2147483647 each"),
        ("wrong image shape", v2_body(shape=[1, 28, 27], data=[0] * 756), 422, "[N, 28, 28]"),
        ("over 255", v2_body(data=[256] * 784), 422, "in 0..255"),
        ("fractions", v2_body(datatype="FP32", data=[0.5] * 784), 422, "integers"),
        ("NaN", v2_body(datatype="FP32", data=[float("nan")] * 784), 422, "finite"),
        ("too many images", v2_body(shape=[9, 28, 28], data=[0] * 784 * 9), 413, "over the limit of 8"),
        ("unknown output", v2_body() | {"outputs": [{"name": "embedding"}]}, 400, "unknown output 'embedding'"),
        (
            "classification extension",
            v2_body() | {"outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]},
            400,
            "classification extension",
        ),
    ],
)
def test_bad_v2_requests_get_a_4xx_with_a_json_error(server, case, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    response = httpx.post(
        f"{server}/v2/models/{NAME}/infer", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, (case, response.text)
    assert message in response.json()["error"], response.json()


def test_bad_binary_tensors_get_a_400(server):
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "shape": [2, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": 1568}}
            ]
        }
    ).encode()
    for headers, content, message in [
        ({"inference-header-content-length": str(len(header))}, header + b"\0" * 100, "does not hold UINT8"),
        ({"inference-header-content-length": "99999"}, header, "does not fit"),
        ({"inference-header-content-length": "-3"}, header, "does not fit"),
        ({"inference-header-content-length": b"\xb2"}, header, "does not fit"),  # a digit to isdigit(), not to int()
    ]:
        response = httpx.post(
            f"{server}/v2/models/{NAME}/infer",
            content=content,
            headers=headers | {"content-type": "application/octet-stream"},
        )
        assert response.status_code == 400 and message in response.json()["error"], response.text


def test_unknown_models_and_paths_get_a_404(server):
    for response in (
        httpx.get(f"{server}/v2/models/other"),
        httpx.get(f"{server}/v2/models/other/ready"),
        httpx.post(f"{server}/v2/models/other/infer", json=v2_body()),
    ):
        assert response.status_code == 404 and "unknown model 'other'" in response.json()["error"]
    assert httpx.get(f"{server}/v2/models/{NAME}/versions/1").status_code == 404


def test_oversized_v2_body_is_refused_with_413(server):
    response = httpx.post(
        f"{server}/v2/models/{NAME}/infer", content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "limit" in response.json()["error"]


# --- MLflow's scoring protocol -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["inputs", "inputs-named", "instances", "instances-records"])
def test_invocations_take_what_mlflow_models_serve_takes(server, expected, form):
    body = {
        "inputs": {"inputs": IMAGES.tolist()},
        "inputs-named": {"inputs": {"image": IMAGES.tolist()}},
        "instances": {"instances": IMAGES.tolist()},
        "instances-records": {"instances": [{"image": image.tolist()} for image in IMAGES]},
    }[form]
    response = httpx.post(f"{server}/invocations", json=body)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    np.testing.assert_array_equal(np.array(predictions["logits"], np.float32), expected[0])
    np.testing.assert_array_equal(np.array(predictions["probabilities"], np.float32), expected[1])


def test_ping_and_version(server):
    from importlib.metadata import version

    assert httpx.get(f"{server}/ping").status_code == 200
    assert httpx.get(f"{server}/version").text == version("mlflow-skinny")


BAD, INVALID = "BAD_REQUEST", "INVALID_PARAMETER_VALUE"  # as MLflow 3.17 answers each case


@pytest.mark.parametrize(
    "body, status, code, message",
    [
        (b"garbage", 400, BAD, "malformed JSON"),
        ({"nothing": 1}, 400, BAD, "exactly one of the input fields"),
        ({"inputs": [[[0] * 28] * 28], "instances": [[[0] * 28] * 28]}, 400, BAD, "exactly one"),
        ({"dataframe_split": {"columns": ["image"], "data": [[0]]}}, 400, INVALID, "tensor input 'image'"),
        ({"inputs": [[0] * 784]}, 400, INVALID, "[N, 28, 28]"),
        ({"inputs": []}, 400, INVALID, "N >= 1"),
        ({"inputs": [[[300] * 28] * 28]}, 400, BAD, "in 0..255"),
        ({"inputs": [[[0] * 28] * 27 + [[0] * 3]]}, 400, BAD, "rectangular"),
        ({"inputs": {"pixels": [[[0] * 28] * 28]}}, 400, INVALID, "'image'"),
        ({"inputs": [[[0] * 28] * 28] * 9}, 413, BAD, "over the limit"),
    ],
)
def test_bad_invocations_get_mlflows_error_shape(server, body, status, code, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/invocations", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["error_code"] == code and message in error["message"], error


def test_invocations_refuse_other_content_types_with_415(server):
    response = httpx.post(f"{server}/invocations", content=b"a,b\n1,2\n", headers={"content-type": "text/csv"})
    assert response.status_code == 415


def test_the_server_still_serves_after_all_that(server, expected):
    response = httpx.post(f"{server}/invocations", json={"inputs": IMAGES[:1].tolist()})
    assert response.status_code == 200
