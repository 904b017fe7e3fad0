"""The request parsers of every protocol, called directly: each refusal with its status, MLflow error code and
message, and each limit at its edge. The server tests send the same requests over HTTP; these run in the test
process, where mutation testing can see which parser line each one guards."""

import json
import sys

import numpy as np
import pytest

from softmax_mlops.serving.protocols import INVALID, ProtocolError, as_array, check_pixels, load_json
from softmax_mlops.serving.protocols import v2 as v2_protocol
from softmax_mlops.serving.protocols.mlflow_scoring import MLFLOW_FORMATS, encode_mlflow, parse_mlflow
from softmax_mlops.serving.protocols.native import parse_instances
from softmax_mlops.serving.protocols.v2 import parse_v2

IMAGE = np.arange(784, dtype=np.int64).reshape(28, 28) % 256


def refused(call, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    return caught.value


def v2(inputs=None, **request) -> bytes:
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": IMAGE.ravel().tolist()}
    return json.dumps({"inputs": [tensor | (inputs or {})], **request}).encode()


# --- JSON and pixels, shared by all three protocols --------------------------------------------------------------


def test_load_json_refuses_what_is_not_json():
    assert load_json(b'{"a": [1]}') == {"a": [1]}
    error = refused(load_json, b"{")
    assert (error.status, error.code) == (400, "BAD_REQUEST") and error.message.startswith("malformed JSON: ")
    assert refused(load_json, b"\xff\xfe").message.startswith("malformed JSON: ")
    deep = refused(load_json, b"[" * 100_000 + b"]" * 100_000)
    assert (deep.status, deep.message) == (400, "malformed JSON: nested too deeply")


@pytest.mark.parametrize(
    "values, message",
    [
        ([[1, 2], [3]], "x must be a rectangular array of integers (rows of unequal length)"),
        ([["a"]], "x: pixel values must be numbers (integers 0..255)"),
        ([[True]], "x: pixel values must be numbers (integers 0..255)"),
        ([[None]], "x: pixel values must be numbers (integers 0..255)"),
    ],
)
def test_as_array_refuses_ragged_and_non_numeric_values(values, message):
    error = refused(as_array, values, "x")
    assert (error.status, error.message) == (422, message)


@pytest.mark.parametrize("values", [[[1, 2]], [[1.5]], [[np.uint8(3)]]])
def test_as_array_takes_numbers(values):
    assert as_array(values, "x").dtype.kind in "iuf"


def test_check_pixels_at_its_edges():
    ok = check_pixels(np.stack([IMAGE * 0, IMAGE * 0 + 255]), max_instances=2)
    assert ok.dtype == np.uint8 and ok.shape == (2, 28, 28) and (ok[0].max(), ok[1].min()) == (0, 255)
    assert check_pixels(IMAGE.reshape(1, 784), 1).shape == (1, 28, 28)  # flat rows are taken by default
    assert check_pixels(IMAGE[None].astype(np.float64), 1).dtype == np.uint8  # integral floats are pixels

    over = refused(check_pixels, np.zeros((3, 28, 28)), 2)
    assert (over.status, over.message) == (413, "3 images is over the limit of 2 per request")
    flat = refused(check_pixels, IMAGE.reshape(1, 784), 1, False)
    assert (flat.status, flat.code) == (422, INVALID)
    assert flat.message == "images must have shape [N, 28, 28] with N >= 1; got [1, 784]"
    empty = refused(check_pixels, np.zeros((0, 28, 28)), 2)
    assert empty.message == "images must have shape [N, 28, 28] or [N, 784] with N >= 1; got [0, 28, 28]"
    assert refused(check_pixels, np.zeros((1, 28, 27)), 2).code == INVALID
    assert refused(check_pixels, np.zeros((28, 28)), 30).status == 422  # one image without its batch axis


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a - 1, "pixel values must be in 0..255; found -1..254"),
        (lambda a: a + 1, "pixel values must be in 0..255; found 1..256"),
        (lambda a: a + 0.5, "pixel values must be integers 0..255; found fractions"),
        (lambda a: np.where(a == 7, np.nan, a), "pixel values must be finite integers; found NaN or infinity"),
        (lambda a: np.where(a == 7, np.inf, a), "pixel values must be finite integers; found NaN or infinity"),
    ],
)
def test_check_pixels_refuses_values_out_of_range(change, message):
    image = np.tile(np.arange(256), 4)[:784].reshape(1, 28, 28)
    error = refused(check_pixels, change(image), 1)
    assert (error.status, error.code, error.message) == (422, "BAD_REQUEST", message)


# --- /predict's JSON ---------------------------------------------------------------------------------------------


def test_parse_instances_takes_images_up_to_the_limit():
    body = json.dumps({"instances": [IMAGE.tolist(), IMAGE.tolist()]}).encode()
    assert parse_instances(body, max_instances=2).shape == (2, 28, 28)
    assert parse_instances(json.dumps({"instances": [IMAGE.ravel().tolist()]}).encode(), 1).shape == (1, 28, 28)
    over = refused(parse_instances, body, 1)
    assert (over.status, over.message) == (413, "2 instances is over the limit of 1 per request")


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ([1], 422, 'expected a JSON object {"instances": [image, ...]}'),
        ({"images": []}, 422, 'expected a JSON object {"instances": [image, ...]}'),
        ({"instances": []}, 422, '"instances" must be a non-empty list of 28x28 images'),
        ({"instances": {"a": 1}}, 422, '"instances" must be a non-empty list of 28x28 images'),
        ({"instances": [[1, 2, 3]]}, 422, "each instance must be 28x28 (or 784 long); got shape [3]"),
        ({"instances": [[[1] * 28] * 27]}, 422, "each instance must be 28x28 (or 784 long); got shape [27, 28]"),
    ],
)
def test_parse_instances_refuses_other_shapes(payload, status, message):
    error = refused(parse_instances, json.dumps(payload).encode(), 4)
    assert (error.status, error.message) == (status, message)


# --- Open Inference Protocol v2 -----------------------------------------------------------------------------------


def test_v2_json_request_defaults():
    parsed = parse_v2(v2(), None, 1)
    assert parsed.images.shape == (1, 28, 28) and (parsed.images[0] == IMAGE).all()
    assert parsed.outputs == {"logits": False, "probabilities": False} and parsed.id is None
    both = parse_v2(v2(id="r1", parameters={"binary_data_output": True}), None, 1)
    assert both.outputs == {"logits": True, "probabilities": True} and both.id == "r1"


def test_v2_binary_tensor_and_its_header_length():
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}
            ]
        }
    ).encode()
    body = header + IMAGE.astype(np.uint8).tobytes()
    assert (parse_v2(body, str(len(header)), 1).images[0] == IMAGE).all()
    for length in (str(len(body) + 1), "-1", "²", "12a", " 5"):
        error = refused(parse_v2, body, length, 1)
        assert error.status == 400
        assert error.message == f"Inference-Header-Content-Length {length!r} does not fit a {len(body)}-byte body"
    assert parse_v2(v2(), str(len(v2())), 1).images.shape == (1, 28, 28)  # a header that is the whole body
    short = refused(parse_v2, body[:-1], str(len(header)), 1)
    assert (short.status, short.message) == (
        400,
        "binary input of 783 bytes (binary_data_size 784) does not hold UINT8 [1, 28, 28]",
    )
    stray = refused(parse_v2, v2() + b"\0", str(len(v2())), 1)
    assert stray.message == "binary data after the header, but no input declares binary_data_size"


def test_v2_binary_data_size_must_match_the_datatype():
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "UINT16", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}
            ]
        }
    ).encode()
    error = refused(parse_v2, header + bytes(784), str(len(header)), 1)
    assert error.message == "binary input of 784 bytes (binary_data_size 784) does not hold UINT16 [1, 28, 28]"


@pytest.mark.parametrize(
    "body, message",
    [
        (b"[]", 'expected a JSON object with "inputs": [{"name": "image", ...}]'),
        (b'{"inputs": {}}', 'expected a JSON object with "inputs": [{"name": "image", ...}]'),
        (b'{"inputs": []}', 'this model has one input, "image" (UINT8 [-1, 28, 28])'),
        (b'{"inputs": [1]}', 'this model has one input, "image" (UINT8 [-1, 28, 28])'),
        (b'{"inputs": [{"name": "x"}]}', 'this model has one input, "image" (UINT8 [-1, 28, 28])'),
        (
            b'{"inputs": [{"name": "image"}, {"name": "image"}]}',
            'this model has one input, "image" (UINT8 [-1, 28, 28])',
        ),
    ],
)
def test_v2_request_must_name_the_one_input(body, message):
    error = refused(parse_v2, body, None, 4)
    assert (error.status, error.message) == (400, message)


@pytest.mark.parametrize(
    "change, status, message",
    [
        (
            {"datatype": "BYTES"},
            400,
            "input datatype 'BYTES' is not supported: send UINT8 (or another integer or FP type holding integers "
            "0..255)",
        ),
        ({"shape": [1, 28, -28]}, 400, "input shape must be a list of non-negative integers, got [1, 28, -28]"),
        ({"shape": [True, 28, 28]}, 400, "input shape must be a list of non-negative integers, got [True, 28, 28]"),
        ({"shape": [1.0, 28, 28]}, 400, "input shape must be a list of non-negative integers, got [1.0, 28, 28]"),
        ({"shape": "1,28,28"}, 400, "input shape must be a list of non-negative integers, got '1,28,28'"),
        ({"shape": [2, 28, 28]}, 400, "input data holds 784 values, shape [2, 28, 28] needs 1568"),
        ({"shape": [5, 28, 28]}, 413, "5 images is over the limit of 4 per request"),
        ({"data": None}, 422, 'input "image" data: pixel values must be numbers (integers 0..255)'),
    ],
)
def test_v2_tensor_fields_are_checked(change, status, message):
    error = refused(parse_v2, v2(change), None, 4)
    assert (error.status, error.message) == (status, message)


def test_v2_limits_at_their_edges():
    four = v2({"shape": [4, 28, 28], "data": np.tile(IMAGE.ravel(), 4).tolist()})
    assert parse_v2(four, None, 4).images.shape == (4, 28, 28)
    assert refused(parse_v2, four, None, 3).status == 413
    missing = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28]}
    error = refused(parse_v2, json.dumps({"inputs": [missing]}).encode(), None, 1)
    assert (error.status, error.message) == (400, 'input "image" has no "data"')
    assert parse_v2(v2({"datatype": "FP32"}), None, 1).images.dtype == np.uint8


@pytest.mark.parametrize("size", [-1, True, 1.5, "784"])
def test_v2_binary_data_size_must_be_a_count(size):
    error = refused(parse_v2, v2({"parameters": {"binary_data_size": size}}), None, 1)
    assert (error.status, error.message) == (400, f"binary_data_size must be a non-negative integer, got {size!r}")


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"id": 5}, '"id" must be a string'),
        ({"outputs": []}, '"outputs" must be a non-empty list of {"name": ...}'),
        ({"outputs": {}}, '"outputs" must be a non-empty list of {"name": ...}'),
        ({"outputs": ["logits"]}, '"outputs" must be a non-empty list of {"name": ...}'),
        ({"outputs": [{"name": "x"}]}, "unknown output 'x': this model has logits, probabilities"),
        (
            {"outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]},
            "the classification extension is not supported: ask for probabilities",
        ),
        (
            {"outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
            "parameter 'binary_data' must be true or false",
        ),
        ({"parameters": {"binary_data_output": "yes"}}, "parameter 'binary_data_output' must be true or false"),
    ],
)
def test_v2_request_fields_are_checked(request_fields, message):
    error = refused(parse_v2, v2(**request_fields), None, 1)
    assert (error.status, error.message) == (400, message)


def test_v2_outputs_choose_what_comes_back_and_how():
    chosen = parse_v2(
        v2(
            outputs=[{"name": "probabilities", "parameters": {"binary_data": True, "classification": 0}}],
            parameters={"binary_data_output": False},
        ),
        None,
        1,
    )
    assert chosen.outputs == {"probabilities": True}
    inherited = parse_v2(v2(outputs=[{"name": "logits"}], parameters={"binary_data_output": True}), None, 1)
    assert inherited.outputs == {"logits": True}


def test_v2_encoding_in_json_and_binary():
    results = {"logits": np.full((1, 10), 1.5, np.float32), "probabilities": np.full((1, 10), 0.1, np.float32)}
    request = v2_protocol.V2Request(IMAGE[None].astype(np.uint8), {"logits": False}, "r1")
    body, headers = v2_protocol.encode_v2("m", request, results)
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {
        "model_name": "m",
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [1.5] * 10}],
        "id": "r1",
    }
    binary = v2_protocol.V2Request(IMAGE[None].astype(np.uint8), {"probabilities": True, "logits": False})
    body, headers = v2_protocol.encode_v2("m", binary, results)
    length = int(headers["inference-header-content-length"])
    assert headers["content-type"] == "application/octet-stream"
    header = json.loads(body[:length])
    assert "id" not in header and header["outputs"][0]["parameters"] == {"binary_data_size": 40}
    assert np.frombuffer(body[length:], "<f4").tolist() == [np.float32(0.1)] * 10
    assert v2_protocol.v2_model_metadata("m")["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}
    ]


# --- MLflow's scoring protocol -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {"inputs": [IMAGE.tolist()]},
        {"inputs": {"image": [IMAGE.tolist()]}},
        {"instances": [IMAGE.tolist()]},
        {"instances": [{"image": IMAGE.tolist()}]},
    ],
    ids=["inputs", "named inputs", "instances", "named instances"],
)
def test_mlflow_forms(payload):
    assert (parse_mlflow(json.dumps(payload).encode(), 1)[0] == IMAGE).all()


@pytest.mark.parametrize(
    "payload, code, message",
    [
        (
            [1],
            "BAD_REQUEST",
            "The input must be a JSON dictionary with exactly one of the input fields "
            f"{set(MLFLOW_FORMATS)}. Received: list.",
        ),
        (
            {"inputs": [], "instances": []},
            "BAD_REQUEST",
            "The input must be a JSON dictionary with exactly one of the input fields "
            f"{set(MLFLOW_FORMATS)}. Received: ['inputs', 'instances'].",
        ),
        (
            {"dataframe_split": {}},
            INVALID,
            "dataframe_split does not fit this model's tensor input 'image' (uint8 [-1, 28, 28]): "
            'send {"inputs": [[28 rows of 28 pixels], ...]}',
        ),
        ({"inputs": {"x": []}}, INVALID, "inputs must name the one input 'image', got ['x']"),
        ({"inputs": {"image": [], "x": []}}, INVALID, "inputs must name the one input 'image', got ['image', 'x']"),
        ({"instances": [{"x": 1}]}, INVALID, "each instance must hold the one input 'image'"),
        ({"instances": [{"image": 1, "x": 1}]}, INVALID, "each instance must hold the one input 'image'"),
        ({"inputs": [IMAGE.ravel().tolist()]}, INVALID, "images must have shape [N, 28, 28] with N >= 1; got [1, 784]"),
        ({"inputs": [["a"]]}, "BAD_REQUEST", "inputs: pixel values must be numbers (integers 0..255)"),
    ],
)
def test_mlflow_refusals_carry_mlflows_error_codes(payload, code, message):
    error = refused(parse_mlflow, json.dumps(payload).encode(), 4)
    # the status is ours (/invocations answers every one with 400, as MLflow does); the code and text are MLflow's
    assert (error.code, error.message) == (code, message) and error.status in (400, 422)


def test_mlflow_limit_and_encoding():
    two = json.dumps({"instances": [IMAGE.tolist()] * 2}).encode()
    assert parse_mlflow(two, 2).shape == (2, 28, 28) and refused(parse_mlflow, two, 1).status == 413
    results = {"logits": np.zeros((1, 10), np.float32), "probabilities": np.ones((1, 10), np.float32)}
    assert encode_mlflow(results) == {"predictions": {"logits": [[0.0] * 10], "probabilities": [[1.0] * 10]}}


# --- edges that mutation testing found unchecked -----------------------------------------------------------------


def test_edges_of_counts_shapes_and_sizes():
    assert refused(check_pixels, np.zeros(5), 2).status == 413  # a flat list of pixels is counted before its shape
    two_flat = check_pixels(np.stack([IMAGE.ravel(), IMAGE.ravel()]), 2)
    assert two_flat.shape == (2, 28, 28) and (two_flat[1] == IMAGE).all()
    none = refused(parse_v2, v2({"shape": [0, 28, 28], "data": []}), None, 4)  # zero images: a shape, but no batch
    assert (none.status, none.message) == (
        422,
        "images must have shape [N, 28, 28] or [N, 784] with N >= 1; got [0, 28, 28]",
    )
    empty_binary = v2({"shape": [0, 28, 28], "parameters": {"binary_data_size": 0}})
    assert refused(parse_v2, empty_binary, str(len(empty_binary)), 4).status == 422
    sized = refused(parse_v2, v2({"parameters": {"binary_data_size": 784}}), None, 1)  # no header: no binary part
    assert sized.message == "binary input of 0 bytes (binary_data_size 784) does not hold UINT8 [1, 28, 28]"
    error = ProtocolError(400, "why")
    assert str(error) == "why" and (error.status, error.code) == (400, "BAD_REQUEST")


def test_a_wider_binary_datatype_and_other_parameters():
    pixels = IMAGE.astype("<u2")
    header = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "UINT16", "shape": [1, 28, 28], "parameters": {"binary_data_size": 1568}}
            ]
        }
    ).encode()
    assert (parse_v2(header + pixels.tobytes(), str(len(header)), 1).images[0] == IMAGE).all()
    stray = refused(parse_v2, v2() + b"\0", str(len(v2())), 1)
    assert stray.status == 400
    other = parse_v2(v2(parameters={"priority": 1}, outputs=[{"name": "logits", "parameters": {"x": 1}}]), None, 1)
    assert other.outputs == {"logits": False}


def test_v2_binary_outputs_are_little_endian_float32_back_to_back():
    results = {"logits": np.full((1, 10), 1.5), "probabilities": np.full((1, 10), 0.25)}  # float64 from elsewhere
    request = v2_protocol.V2Request(IMAGE[None].astype(np.uint8), {"logits": True, "probabilities": True})
    body, headers = v2_protocol.encode_v2("m", request, results)
    length = int(headers["inference-header-content-length"])
    assert [o["parameters"]["binary_data_size"] for o in json.loads(body[:length])["outputs"]] == [40, 40]
    assert np.frombuffer(body[length:], "<f4").tolist() == [1.5] * 10 + [0.25] * 10


def test_v2_model_metadata_is_the_exports_signature():
    assert v2_protocol.v2_model_metadata("m") == {
        "name": "m",
        "versions": [],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        ],
    }


@pytest.mark.parametrize(
    "request_fields, tensor_fields, message",
    [
        ({}, {"datatype": ["UINT8"]}, "input datatype ['UINT8'] is not supported: send UINT8 (or another"),
        ({}, {"datatype": None}, "input datatype None is not supported: send UINT8 (or another integer"),
        ({}, {"shape": [1, 2**31, 28]}, "input shape [1, 2147483648, 28] is past 8 dimensions of at most 2147483647"),
        ({}, {"shape": [1, 2**31 - 1, 0]}, "input data holds 784 values, shape [1, 2147483647, 0] needs 0"),
        ({}, {"shape": [1] * 9}, "input shape [1, 1, 1, 1, 1, 1, 1, 1, 1] is past 8 dimensions of at most"),
        ({}, {"shape": [1, "28", 28]}, "input shape must be a list of non-negative integers, got [1, '28', 28]"),
        ({}, {"name": ["image"]}, 'this model has one input, "image" (UINT8 [-1, 28, 28])'),
        ({}, {"parameters": [1]}, '"parameters" must be a JSON object, got [1]'),
        ({}, {"parameters": {"binary_data_size": [3]}}, "binary_data_size must be a non-negative integer, got [3]"),
        ({"parameters": "x"}, {}, "\"parameters\" must be a JSON object, got 'x'"),
        ({"outputs": [{"name": "logits", "parameters": 7}]}, {}, '"parameters" must be a JSON object, got 7'),
        ({"outputs": [{"name": ["logits"]}]}, {}, "unknown output ['logits']: this model has logits, probabilities"),
        ({"outputs": [{}]}, {}, "unknown output None: this model has logits, probabilities"),
        ({"id": ["a"]}, {}, '"id" must be a string'),
    ],
)
def test_v2_every_typed_field_is_refused_in_its_own_words(request_fields, tensor_fields, message):
    """The typed request (v2_protocol.V2InferenceRequest) refuses a value of the wrong type or past its bounds in
    each field, with the line for that field: a wrong type there once reached code that raised a 500."""
    error = refused(parse_v2, v2(tensor_fields, **request_fields), None, 4)
    assert error.status == 400 and error.message.startswith(message), error.message


def test_a_value_in_a_message_is_cut_short():
    """A hostile value may be megabytes, or an integer that Python refuses to print."""
    show = v2_protocol._show
    assert show("a" * 58) == "'" + "a" * 58 + "'"  # 60 characters: shown whole
    assert show("a" * 59) == "'" + "a" * 56 + "..."  # 61: cut to 60
    assert show(10**5000) == f"<an integer of more than {sys.get_int_max_str_digits()} digits>"
    long_name = refused(parse_v2, v2({"datatype": "X" * 10_000}), None, 1).message
    assert long_name.startswith("input datatype 'XXXXX") and len(long_name) < 200


def test_the_header_length_takes_up_to_18_digits():
    header = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": []}]})
    header = header.encode().ljust(100)
    error = refused(parse_v2, header + bytes(10), "0" * 15 + "100", 1)  # 18 digits: read, up to the binary data
    assert error.message == "binary data after the header, but no input declares binary_data_size"
    error = refused(parse_v2, header + bytes(10), "0" * 16 + "100", 1)  # 19 digits: refused unread
    assert error.message == f"Inference-Header-Content-Length {'0' * 16 + '100'!r} does not fit a 110-byte body"
