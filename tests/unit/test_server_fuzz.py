"""Property-based fuzzing of the HTTP service on a real server: thousands of generated requests (JSON of any
shape, near-miss instances, random bytes under every content type, multipart bodies, odd methods and
paths), and not one may get a 5xx or a non-JSON error."""

import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack import serving

pytestmark = pytest.mark.server

MAX_BODY, MAX_INSTANCES = 100_000, 8


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with (
        serving(onnx_model[0], log, "--max-body-bytes", str(MAX_BODY), "--max-instances", str(MAX_INSTANCES)) as (
            url,
            _,
        ),
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield client
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str), response.text[:300]


# The number of examples per test is the hypothesis profile's (tests/conftest.py): make test's, or make
# test-fast's.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
scalars = (
    st.none() | st.booleans() | st.integers(-300, 300) | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5)
)
any_json = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=40,
)
pixel = st.integers(-2, 258) | st.floats(-1, 256) | st.sampled_from([True, None, "7", 1e308])


def near_miss(seed: int, shape: tuple[int, ...], ragged: list[tuple[int, int]], bad: list[tuple[int, object]]):
    """An image that is almost right: valid pixels from ``seed`` in ``shape`` (28x28 or 784, or one off),
    some rows one pixel short or long, and a few pixels replaced by hypothesis' near misses. Drawing only the
    misses keeps each example to a handful of draws (a whole image drawn pixel by pixel is thousands), and
    puts them anywhere in an otherwise valid image, past the first pixel a parser checks."""
    image = np.random.default_rng(seed).integers(0, 256, shape).tolist()
    if len(shape) == 2:
        for row, change in ragged:
            line = image[row % len(image)]
            if change > 0:
                line.append(7)
            elif change < 0:
                line.pop()
        for position, value in bad:
            line = image[position % len(image)]
            line[(position // len(image)) % len(line)] = value
    else:
        for position, value in bad:
            image[position % len(image)] = value
    return image


near_image = st.builds(
    near_miss,
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(28, 28), (27, 28), (29, 28), (28, 27), (28, 29), (784,), (783,), (785,)]),
    ragged=st.lists(st.tuples(st.integers(0, 28), st.integers(-1, 1)), max_size=2),
    bad=st.lists(st.tuples(st.integers(0, 10_000), pixel), max_size=3),
)
CONTENT_TYPES = [
    "application/json",
    "image/png",
    "image/jpeg",
    "multipart/form-data; boundary=b",
    "multipart/form-data",
    "text/plain",
    "",
    "application/json; charset=latin-1",
    "image/png; x=y",
]


@FUZZ
@given(body=any_json)
def test_any_json_document(server, body):
    check(server.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(instances=st.lists(near_image, min_size=0, max_size=3))
def test_near_miss_instances(server, instances):
    check(server.post("/predict", json={"instances": instances}))


@FUZZ
@given(body=st.binary(max_size=2000), content_type=st.sampled_from(CONTENT_TYPES))
def test_random_bytes_under_every_content_type(server, body, content_type):
    check(server.post("/predict", content=body, headers={"content-type": content_type}))


@FUZZ
@given(
    prefix=st.sampled_from(
        [
            b"\x89PNG\r\n\x1a\n",
            b"\xff\xd8\xff\xe0",
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n',
        ]
    ),
    tail=st.binary(max_size=3000),
)
def test_truncated_and_corrupt_images_and_uploads(server, prefix, tail):
    content_type = "multipart/form-data; boundary=b" if prefix.startswith(b"--") else "image/png"
    check(server.post("/predict", content=prefix + tail, headers={"content-type": content_type}))


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "POST"]),
    path=st.sampled_from(["/predict", "/health", "/metadata", "/nope", "/predict/", "/%00", "/docs"]),
    query=st.text(max_size=20),
)
def test_methods_and_paths(server, method, path, query):
    response = server.request(method, path, params={"q": query} if query else None)
    assert response.status_code < 500
    if response.status_code >= 400 and method != "HEAD":
        assert "error" in response.json()


# --- the two standard protocols: the same rules (no 5xx, a JSON error that says what was wrong) ---------------

V2_INFER = "/v2/models/softmax-mlops/infer"  # the fixture model has no card: the server's default name


def check_mlflow(response: httpx.Response) -> None:
    """MLflow's error shape on /invocations: error_code and message."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()
        assert isinstance(error.get("error_code"), str) and isinstance(error.get("message"), str), response.text[:300]


@FUZZ
@given(body=any_json, path=st.sampled_from([V2_INFER, "/invocations"]))
def test_any_json_document_on_both_protocols(server, body, path):
    response = server.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    (check_mlflow if path == "/invocations" else check)(response)


dims = st.integers(-2, 30) | st.integers() | st.sampled_from([784, 2**31, 2**62, 2**64])
v2_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["image", "images", ""]),
        "shape": st.lists(dims | any_json, max_size=4) | any_json,
        "datatype": st.sampled_from(["UINT8", "INT64", "FP32", "FP16", "BYTES", "BOOL", "uint8"]) | any_json,
    },
    optional={"data": near_image | st.lists(pixel, max_size=10) | any_json, "parameters": any_json},
)


@FUZZ
@given(
    inputs=st.lists(v2_tensor, max_size=2),
    outputs=st.none()
    | st.lists(st.fixed_dictionaries({"name": st.text(max_size=12) | any_json}, optional={"parameters": any_json}))
    | any_json,
)
def test_near_miss_v2_requests(server, inputs, outputs):
    body = {"inputs": inputs} | ({"outputs": outputs} if outputs is not None else {})
    check(server.post(V2_INFER, content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(
    header=any_json,
    # any value a header may legally carry (what is not, httptools refuses before the service sees it)
    length=st.integers(-5, 3000)
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=4)
    | st.just("9" * 5000),
    tail=st.binary(max_size=2000),
)
def test_binary_tensor_bodies(server, header, length, tail):
    content = json.dumps(header).encode() + tail
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(length)}
    check(server.post(V2_INFER, content=content, headers=headers))


@FUZZ
@given(
    key=st.sampled_from(["inputs", "instances", "dataframe_split", "dataframe_records"]),
    value=st.lists(near_image, max_size=3) | st.dictionaries(st.sampled_from(["image", "x"]), near_image) | any_json,
)
def test_near_miss_invocations(server, key, value):
    # json.dumps, not httpx's json=: the generated values include NaN and infinity, which a client may send
    body = json.dumps({key: value})
    check_mlflow(server.post("/invocations", content=body, headers={"content-type": "application/json"}))
