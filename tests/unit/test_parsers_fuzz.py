"""Every protocol's parser, fuzzed field by field in the test process: a valid request with one field (or one
header) replaced by an arbitrary JSON value, and the parser may only accept it or raise the project's
ProtocolError. Anything else would reach the client as a 500. The HTTP fuzz tests (test_server_fuzz.py) send
near misses through a real server; these reach every field with every type of value, thousands of times a
second, with the enormous integers and strings a hostile client sends (past numpy's index range, past
Python's 4,300-digit limit for str <-> int)."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softmax_mlops.serving.protocols import ProtocolError
from softmax_mlops.serving.protocols.mlflow_scoring import parse_mlflow
from softmax_mlops.serving.protocols.native import parse_instances
from softmax_mlops.serving.protocols.v2 import parse_v2

MAX_INSTANCES = 8
IMAGE = (np.arange(784) % 256).reshape(28, 28).tolist()
# the number of examples is the hypothesis profile's (tests/conftest.py): make test's, or make test-fast's
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

huge = st.sampled_from([2**31, 2**63, 2**64, 10**40, 10**4299, -(10**4299)])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.integers()
    | huge
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["UINT8", "image", "logits", "probabilities", "9" * 5000])
)
any_json = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4),
    max_leaves=30,
)
any_shape = st.lists(st.integers(0, 3) | huge | st.just(28) | any_json, max_size=5)


def accepts_or_refuses(call, *args) -> None:
    try:
        call(*args)
    except ProtocolError as error:
        assert 400 <= error.status < 500 and error.message and "\n" not in error.message, error.message


def replace(document: dict, path: tuple, value) -> dict:
    """A copy of ``document`` with the field at ``path`` (keys and list indices) set to ``value``."""
    copy = json.loads(json.dumps(document))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


V2 = {
    "id": "r1",
    "parameters": {"binary_data_output": False},
    "inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": IMAGE, "parameters": {"x": 1}},
    ],
    "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
}
V2_FIELDS = [
    (),
    ("id",),
    ("parameters",),
    ("parameters", "binary_data_output"),
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "shape", 0),
    ("inputs", 0, "shape", 1),
    ("inputs", 0, "data"),
    ("inputs", 0, "parameters"),
    ("inputs", 0, "parameters", "binary_data_size"),
    ("outputs",),
    ("outputs", 0),
    ("outputs", 0, "name"),
    ("outputs", 0, "parameters"),
    ("outputs", 0, "parameters", "binary_data"),
    ("outputs", 0, "parameters", "classification"),
]


def test_the_unfuzzed_requests_are_accepted():
    """Each fuzz test starts from a request the parser takes, so a refusal there is the field's doing."""
    assert parse_v2(json.dumps(V2).encode(), None, MAX_INSTANCES).images.shape == (1, 28, 28)
    assert parse_mlflow(json.dumps({"inputs": [IMAGE]}).encode(), MAX_INSTANCES).shape == (1, 28, 28)
    assert parse_instances(json.dumps({"instances": [IMAGE]}).encode(), MAX_INSTANCES).shape == (1, 28, 28)


@FUZZ
@given(field=st.sampled_from(V2_FIELDS), value=any_json)
def test_v2_any_value_in_any_field(field, value):
    body = replace({"request": V2}, ("request", *field), value)["request"]
    accepts_or_refuses(parse_v2, json.dumps(body).encode(), None, MAX_INSTANCES)


@FUZZ
@given(shape=any_shape, datatype=st.sampled_from(["UINT8", "FP64", "INT16"]), size=st.integers(0, 64) | huge)
def test_v2_any_shape_with_json_or_binary_data(shape, datatype, size):
    """Shapes whose product is plausible (a zero among them) while one dimension is past any index."""
    tensor = {"name": "image", "datatype": datatype, "shape": shape}
    as_json = json.dumps({"inputs": [tensor | {"data": []}]}).encode()
    accepts_or_refuses(parse_v2, as_json, None, MAX_INSTANCES)
    header = json.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": size}}]}).encode()
    accepts_or_refuses(parse_v2, header + bytes(64), str(len(header)), MAX_INSTANCES)


@FUZZ
@given(length=st.text(max_size=8) | st.sampled_from(["9" * 5000, "0" * 5000 + "5", "١٢", "²", " 12", "+12", "-1"]))
def test_v2_any_header_length(length):
    accepts_or_refuses(parse_v2, json.dumps(V2).encode(), length, MAX_INSTANCES)


@FUZZ
@given(
    key=st.sampled_from(["inputs", "instances", "dataframe_split", "dataframe_records"]),
    inner=st.sampled_from(["direct", "named", "instances"]),
    value=any_json,
)
def test_mlflow_any_value_in_any_field(key, inner, value):
    wrapped = {"direct": value, "named": {"image": value}, "instances": [{"image": value}]}[inner]
    accepts_or_refuses(parse_mlflow, json.dumps({key: wrapped}).encode(), MAX_INSTANCES)


def one_pixel(value, row: int, column: int) -> list:
    """The valid image with one pixel replaced: the parser must find the one bad value among 783 good ones."""
    image = [list(pixels) for pixels in IMAGE]
    image[row][column] = value
    return image


@FUZZ
@given(
    value=any_json,
    where=st.sampled_from(["document", "instances", "instance", "row", "pixels", "pixel"]),
    row=st.integers(0, 27),
    column=st.integers(0, 27),
)
def test_predict_any_value_anywhere(value, where, row, column):
    # The body is written as text around the value's JSON, written once: json.dumps would turn each of the 784
    # copies of a 4,300-digit integer into text again, which made "pixels" most of this file's time.
    text = json.dumps(value)
    row_of_values = "[" + ", ".join([text] * 28) + "]"
    body = {
        "document": text,
        "instances": '{"instances": ' + text + "}",
        "instance": '{"instances": [' + text + "]}",
        "row": '{"instances": [[' + row_of_values + "]]}",
        "pixels": '{"instances": [[' + ", ".join([row_of_values] * 28) + "]]}",
        "pixel": json.dumps({"instances": [one_pixel(value, row, column)]}),
    }[where]
    accepts_or_refuses(parse_instances, body.encode(), MAX_INSTANCES)


@pytest.mark.parametrize(
    "field, value",
    [
        (("inputs", 0, "datatype"), ["UINT8"]),
        (("inputs", 0, "datatype"), {"a": 1}),
        (("inputs", 0, "shape"), [0, 2**64, 28]),
        (("inputs", 0, "shape"), [10**4299, 0]),
        (("outputs", 0, "name"), ["probabilities"]),
    ],
)
def test_the_values_that_once_gave_a_500_are_refused_with_a_400(field, value):
    """Found by hand before these fuzz tests existed: each raised TypeError, ValueError or OverflowError."""
    body = replace({"request": V2}, ("request", *field), value)["request"]
    with pytest.raises(ProtocolError) as refused:
        parse_v2(json.dumps(body).encode(), None, MAX_INSTANCES)
    assert refused.value.status == 400


def test_a_header_length_past_pythons_digit_limit_is_a_400():
    with pytest.raises(ProtocolError) as refused:
        parse_v2(json.dumps(V2).encode(), "9" * 5000, MAX_INSTANCES)
    assert refused.value.status == 400 and len(refused.value.message) < 300
