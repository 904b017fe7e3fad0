"""The HTTP service run in this process: `serve`'s own uvicorn settings (server.uvicorn_settings) in a
uvicorn.Server on a thread, on a real socket on 127.0.0.1, so that mutmut sees the routes, the error handlers
and the connection limits run. Every answer is checked whole: status, JSON and the headers a client relies on.

test_server.py, test_server_hostile.py and test_guards_serve_timeout.py run the console script as a user
does. Each test here starts its own server: mutmut credits a call made in a shared fixture only to the first
test that used it, so a shared server would hide the app's mutants from every other test."""

import contextlib
import gc
import io
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from importlib.metadata import version

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from helpers import model_copy
from softmax_mlops import __version__
from softmax_mlops.classes import CLASS_NAMES
from softmax_mlops.config import ServeConfig
from softmax_mlops.serving import server
from softmax_mlops.serving.inference import Predictor
from softmax_mlops.serving.protocols import mlflow_scoring, native, v2
from stack import free_port, raw_connection, read_all

pytestmark = pytest.mark.server

IMAGES = np.random.default_rng(5).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
START_S = 30  # a bound against a hang, not a timing assert
JSON, PNG = {"content-type": "application/json"}, {"content-type": "image/png"}
HALF_A_BODY = b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"


@contextlib.contextmanager
def running(predictor: Predictor, top_k: int = 3, token: str | None = None, **limits: float) -> Iterator[str]:
    """The service on a free port of 127.0.0.1 until the block ends; its URL."""
    settings = ServeConfig(port=free_port(), **limits)
    instance = uvicorn.Server(uvicorn.Config(**server.uvicorn_settings(predictor, settings, top_k, token)))
    thread = threading.Thread(target=instance.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        instance.should_exit = True
        thread.join(START_S)


@pytest.fixture(scope="module")
def predictor(onnx_model) -> Predictor:
    return Predictor(onnx_model[0])


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def probabilities_of(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    return predictor.run(images)[1]


def test_the_read_routes_answer_their_documented_json(predictor):
    with running(predictor) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        assert httpx.get(f"{url}/metadata").json() == json.loads(json.dumps(predictor.metadata))
        assert httpx.get(f"{url}/v2").json() == {
            "name": "softmax-mlops",
            "version": __version__,
            "extensions": ["binary_tensor_data"],
        }
        assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
        model = httpx.get(f"{url}/v2/models/softmax-mlops")
        assert model.status_code == 200 and model.json() == v2.v2_model_metadata("softmax-mlops")
        assert httpx.get(f"{url}/v2/models/softmax-mlops/ready").json() == {"name": "softmax-mlops", "ready": True}
        ping = httpx.get(f"{url}/ping")
        assert (ping.status_code, ping.text, ping.headers["content-type"]) == (200, "\n", "application/json")
        answer = httpx.get(f"{url}/version")
        assert answer.text == version("mlflow-skinny") and answer.headers["content-type"].startswith("text/plain")


def test_a_registered_model_is_served_under_its_registry_name(onnx_model, tmp_path):
    path = model_copy(onnx_model, tmp_path / "model")
    (tmp_path / "model" / "model.json").write_text(json.dumps({"registered_model": "softmax-mlops-concise"}))
    with running(Predictor(path)) as url:
        assert httpx.get(f"{url}/v2/models/softmax-mlops-concise/ready").json() == {
            "name": "softmax-mlops-concise",
            "ready": True,
        }
        for tail in ("", "/ready"):
            answer = httpx.get(f"{url}/v2/models/softmax-mlops{tail}")
            assert answer.status_code == 404
            assert answer.json() == {"error": "unknown model 'softmax-mlops': this server has 'softmax-mlops-concise'"}
        answer = httpx.post(f"{url}/v2/models/other/infer", json={})
        assert answer.json() == {"error": "unknown model 'other': this server has 'softmax-mlops-concise'"}


@pytest.mark.parametrize("top_k", [3, 2])
def test_predict_answers_each_image_with_its_top_k(predictor, top_k):
    expected = predictor.describe(*predictor.top_k_of(probabilities_of(predictor, IMAGES), top_k))
    with running(predictor, top_k=top_k) as url:
        answer = httpx.post(f"{url}/predict", json={"instances": IMAGES.tolist()})
    assert answer.status_code == 200 and answer.json() == {"predictions": json.loads(json.dumps(expected))}
    assert len(answer.json()["predictions"][0]["top_k"]) == top_k


def test_an_image_body_and_a_multipart_upload_are_one_image(predictor):
    expected = predictor.describe(*predictor.top_k_of(probabilities_of(predictor, IMAGES[:1]), 3))
    expected = {"predictions": json.loads(json.dumps(expected))}
    with running(predictor) as url:
        body = httpx.post(f"{url}/predict", content=png(IMAGES[0]), headers=PNG)
        upload = httpx.post(f"{url}/predict", files={"file": ("x.png", png(IMAGES[0]), "image/png")})
    assert body.json() == expected and upload.json() == expected


BAD_PREDICTS = [  # (body, content type, status, error)
    (
        b"{}",
        "text/plain",
        415,
        "unsupported content type 'text/plain': send application/json "
        '{"instances": [...]}, an image/png or image/jpeg body, or a multipart file upload',
    ),
    (
        b"{}",
        "",
        415,
        "unsupported content type '(none)': send application/json "
        '{"instances": [...]}, an image/png or image/jpeg body, or a multipart file upload',
    ),
    (b"garbage", "multipart/form-data; boundary=x", 400, "malformed multipart body"),
    (
        b'{"instances": [[1, 2], [3]]}',
        "application/json",
        422,
        "every instance (28x28 integers) must be a rectangular array of integers (rows of unequal length)",
    ),
    (
        b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
        "multipart/form-data; boundary=x",
        422,
        "the multipart body holds no file: upload the image as a file field",
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "error"), BAD_PREDICTS)
def test_a_bad_predict_gets_its_status_and_one_json_error(predictor, body, content_type, status, error):
    with running(predictor) as url:
        headers = {"content-type": content_type} if content_type else {}
        answer = httpx.post(f"{url}/predict", content=body, headers=headers)
        assert (answer.status_code, answer.json()) == (status, {"error": error})
        assert httpx.get(f"{url}/health").status_code == 200


def test_an_upload_that_is_no_image_gets_400(predictor):
    with running(predictor) as url:
        answer = httpx.post(f"{url}/predict", content=b"not a png", headers=PNG)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("the uploaded file: not a readable PNG or JPEG image")


def test_the_request_limits_are_the_configured_ones(predictor):
    with running(predictor, max_body_bytes=5000, max_instances=2, max_image_pixels=100) as url:
        big = httpx.post(f"{url}/predict", content=b"x" * 5001, headers=JSON)
        too_big = {"error": "request body of 5001 bytes is over the 5000-byte limit"}
        assert (big.status_code, big.json()) == (413, too_big)
        many = httpx.post(f"{url}/predict", json={"instances": [[0] * 784] * 3})
        assert many.status_code == 413
        name = predictor.metadata.get("registered_model") or "softmax-mlops"
        tensor = {"name": "image", "shape": [3, 28, 28], "datatype": "UINT8", "data": [0] * 3 * 784}
        many_v2 = httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": [tensor]})
        assert (many_v2.status_code, many_v2.json()) == (413, {"error": "3 images is over the limit of 2 per request"})
        many_mlflow = httpx.post(f"{url}/invocations", json={"instances": [[0] * 784] * 3})
        assert (many_mlflow.status_code, many_mlflow.json()["message"]) == (413, many_v2.json()["error"])
        wide = httpx.post(f"{url}/predict", content=png(np.zeros((10, 11), np.uint8)), headers=PNG)
        assert wide.status_code == 413 and wide.json()["error"].startswith("the uploaded file: ")
        upload = httpx.post(f"{url}/predict", files={"file": ("x.png", png(np.zeros((10, 11), np.uint8)), "image/png")})
        assert (upload.status_code, upload.json()) == (413, wide.json())
        assert httpx.post(f"{url}/predict", content=b"not a png", headers=PNG).status_code == 400  # no limit's
        metrics = scrape(url)
    refused = {labels: n for (name, labels), n in metrics.items() if name == "softmax_mlops_refused_total"}
    assert refused == {(("limit", "body_bytes"),): 1, (("limit", "instances"),): 3, (("limit", "image_pixels"),): 2}


def test_mlflow_invocations_answer_in_mlflows_shapes(predictor):
    expected = mlflow_scoring.encode_mlflow(
        dict(zip(("logits", "probabilities"), predictor.run(IMAGES[:2]), strict=True))
    )
    with running(predictor, max_body_bytes=50_000) as url:
        good = httpx.post(f"{url}/invocations", json={"instances": IMAGES[:2].tolist()})
        assert good.status_code == 200 and good.json() == json.loads(json.dumps(expected))
        bad = httpx.post(f"{url}/invocations", content=b"{", headers=JSON)
        assert bad.status_code == 400 and set(bad.json()) == {"error_code", "message"}
        assert bad.json()["error_code"] == "BAD_REQUEST" and "JSON" in bad.json()["message"]
        big = httpx.post(f"{url}/invocations", content=b"x" * 50_001, headers=JSON)
        assert big.status_code == 413 and big.json()["message"].endswith("over the 50000-byte limit")
        # what the shared checks refuse with 422 (an image that is not 28x28), MLflow's server answers with 400
        narrow = httpx.post(f"{url}/invocations", json={"instances": [[[0] * 27] * 28]})
        assert (narrow.status_code, narrow.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE"), narrow.json()
        # a charset parameter, or no content type at all, is still JSON to MLflow's server
        for headers in ({"content-type": "application/json; charset=utf-8"}, {}):
            answer = httpx.post(
                f"{url}/invocations", content=json.dumps({"inputs": IMAGES[:2].tolist()}), headers=headers
            )
            assert answer.status_code == 200 and answer.json() == good.json()
        text = httpx.post(f"{url}/invocations", content=b"1", headers={"content-type": "text/plain"})
        assert text.status_code == 415
        assert text.json()["message"] == "unsupported content type 'text/plain': send application/json"


def test_v2_infer_answers_what_the_protocol_encodes(predictor):
    tensor = {"name": "image", "shape": [2, 28, 28], "datatype": "UINT8", "data": IMAGES[:2].ravel().tolist()}
    request = {"inputs": [tensor]}
    body = json.dumps(request).encode()
    parsed = v2.parse_v2(body, None, 256)
    content, _ = v2.encode_v2(
        "softmax-mlops", parsed, dict(zip(("logits", "probabilities"), predictor.run(parsed.images), strict=True))
    )
    with running(predictor) as url:
        good = httpx.post(f"{url}/v2/models/softmax-mlops/infer", content=body, headers=JSON)
        assert good.status_code == 200 and good.json() == json.loads(content)
        text = httpx.post(f"{url}/v2/models/softmax-mlops/infer", content=body, headers={"content-type": "text/plain"})
        assert (text.status_code, text.json()) == (
            415,
            {"error": "unsupported content type 'text/plain': send application/json or application/octet-stream"},
        )


def test_routes_and_methods_that_do_not_exist_get_json_and_allow(predictor):
    with running(predictor) as url:
        missing = httpx.get(f"{url}/nowhere")
        assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
        wrong = httpx.get(f"{url}/predict")
        assert (wrong.status_code, wrong.json()) == (405, {"error": "Method Not Allowed"})
        assert wrong.headers["allow"] == "POST"


def test_the_openapi_document_describes_predicts_body_and_errors(predictor):
    with running(predictor, max_instances=7) as url:
        document = httpx.get(f"{url}/openapi.json").json()
    assert document["info"]["title"] == "softmax-mlops inference" and document["info"]["version"] == "1"
    assert document["info"]["description"] == (
        "Fashion-MNIST softmax regression, served by onnxruntime: its own /predict, the Open Inference Protocol "
        "(KServe v2) under /v2, and MLflow's scoring protocol (/invocations, /ping, /version)."
    )
    operation = document["paths"]["/predict"]["post"]
    # written out here from the documented body, not taken from native.predict_body: every key is checked
    pixel = {"type": "integer", "minimum": 0, "maximum": 255}
    row = {"type": "array", "minItems": 28, "maxItems": 28, "items": pixel}
    image = {"type": "array", "minItems": 28, "maxItems": 28, "items": row}
    flat = {"type": "array", "minItems": 784, "maxItems": 784, "items": pixel}
    instances = {"type": "array", "minItems": 1, "maxItems": 7, "items": {"oneOf": [image, flat]}}
    file = {"type": "string", "format": "binary"}
    assert operation["requestBody"] == {
        "required": True,  # OpenAPI's default is an optional body
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["instances"], "properties": {"instances": instances}}
            },
            "image/png": {"schema": file},
            "image/jpeg": {"schema": file},
            "multipart/form-data": {"schema": {"type": "object", "properties": {"file": file}, "required": ["file"]}},
        },
    }
    # the schema says what the route takes, with the limit the service was started with (serve.max_instances)
    from jsonschema import Draft202012Validator

    body = Draft202012Validator(operation["requestBody"]["content"]["application/json"]["schema"])
    image, flat = [[0] * 28] * 28, [255] * 784
    assert body.is_valid({"instances": [image] * 6 + [flat]})
    assert not body.is_valid({"instances": [image] * 8})  # one past the limit
    assert not body.is_valid({"instances": []}) and not body.is_valid({"images": [image]})
    assert not body.is_valid({"instances": [[0] * 785]}) and not body.is_valid({"instances": [[256] * 784]})
    assert not body.is_valid({"instances": [[[0] * 28] * 27]})
    for code, text in native.ERRORS.items():
        assert operation["responses"][str(code)] == {
            "description": text,
            "content": {"application/json": {"schema": native.ERROR_SCHEMA}},
        }


def test_inference_over_the_time_limit_is_a_503_and_the_service_goes_on(predictor):
    """A limit of a microsecond: no onnxruntime call on 256 images returns within it."""
    with running(predictor, request_timeout_s=1e-6) as url:
        answer = httpx.post(f"{url}/predict", json={"instances": [[7] * 784] * 256})
        assert (answer.status_code, answer.json()) == (503, {"error": "inference took longer than 1e-06 s"})
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def raw(url: str) -> socket.socket:
    return raw_connection(int(url.rsplit(":", 1)[1]))


def read_response(sock: socket.socket) -> bytes:
    """One response, by its content-length, on a connection the server may keep open."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < length(reply):
        chunk = sock.recv(65536)
        assert chunk, reply
        reply += chunk
    return reply


def length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def status_and_json(reply: bytes) -> tuple[str, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_headers_that_trickle_in_get_408_and_the_connection_closes(predictor):
    with running(predictor, read_timeout_s=0.3) as url, raw(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert status_and_json(read_all(sock)) == (
            "HTTP/1.1 408 Request Timeout",
            {"error": "request headers not received within 0.3 s"},
        )


def test_a_connection_that_never_speaks_is_closed_with_408(predictor):
    with running(predictor, read_timeout_s=0.3) as url, raw(url) as sock:
        assert status_and_json(read_all(sock))[0] == "HTTP/1.1 408 Request Timeout"


def test_the_header_deadline_is_per_request_on_a_kept_alive_connection(predictor):
    """Disarmed once a request's headers are in (an idle kept-alive connection is uvicorn's timeout_keep_alive,
    5 s), and armed again when the next request begins."""
    with running(predictor, read_timeout_s=0.3) as url, raw(url) as sock:
        for _ in range(2):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = read_response(sock)
            assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b'{"status":"ok"}')
            time.sleep(0.5)  # idle past read_timeout_s between requests
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # a third request whose headers stop coming
        assert status_and_json(read_all(sock)) == (
            "HTTP/1.1 408 Request Timeout",
            {"error": "request headers not received within 0.3 s"},
        )


def closed_at_once(sock: socket.socket) -> bool:
    """The server closes the connection well before serve.keep_alive_s (60 s in these tests) would."""
    sock.settimeout(10)
    return sock.recv(1) == b""


def test_a_body_that_trickles_in_gets_408_and_the_connection_closes(predictor):
    """408, in each protocol's shape, counted as a refusal by the read_timeout limit; the rest of the body may
    still come, so the connection is closed (`connection: close`), not kept alive for another request."""
    limits = {"read_timeout_s": 0.3, "keep_alive_s": 60}
    with running(predictor, **limits) as url:
        with raw(url) as sock:
            sock.sendall(HALF_A_BODY)
            reply = read_response(sock)
            assert status_and_json(reply) == (
                "HTTP/1.1 408 Request Timeout",
                {"error": "request body not received within 0.3 s"},
            )
            assert b"connection: close" in reply.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")
            assert closed_at_once(sock)
        assert scrape(url)[("softmax_mlops_refused_total", (("limit", "read_timeout"),))] == 1
    with running(predictor, **limits) as url, raw(url) as sock:  # the protocols' routes: MLflow's shape
        sock.sendall(HALF_A_BODY.replace(b"/predict", b"/invocations"))
        assert status_and_json(read_response(sock)) == (
            "HTTP/1.1 408 Request Timeout",
            {"error_code": "BAD_REQUEST", "message": "request body not received within 0.3 s"},
        )
        assert closed_at_once(sock)


def test_connections_past_the_cap_get_503_and_are_closed(predictor):
    with running(predictor, max_connections=1) as url, raw(url) as first, raw(url) as second:
        assert status_and_json(read_all(second)) == (
            "HTTP/1.1 503 Service Unavailable",
            {"error": "more than 1 open connections: try again later"},
        )
        first.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(first).startswith(b"HTTP/1.1 200 OK")


def test_a_client_that_leaves_mid_body_is_logged_not_answered(predictor, caplog):
    with caplog.at_level("INFO", logger="softmax_mlops.serving.server"), running(predictor) as url:
        with raw(url) as sock:
            sock.sendall(HALF_A_BODY)
        deadline = time.monotonic() + START_S
        while "disconnected before sending its whole request" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").status_code == 200


def chunked(sock: socket.socket, path: str, chunks: list[bytes], content_type: str = "application/json") -> bytes:
    """A chunked request (no Content-Length), each chunk sent on its own after a pause, so that the server
    reads them as separate pieces of the body; the response."""
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\ncontent-type: {content_type}\r\n"
        "transfer-encoding: chunked\r\nconnection: close\r\n\r\n".encode()
    )
    for chunk in chunks:
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        time.sleep(0.1)
    sock.sendall(b"0\r\n\r\n")
    return read_all(sock)


def instances_body(size: int) -> bytes:
    """A valid /predict JSON body of exactly ``size`` bytes: one image, padded with spaces."""
    body = json.dumps({"instances": [IMAGES[0].tolist()]}).encode()
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_a_body_of_exactly_the_limit_is_read_whole_declared_or_chunked(predictor):
    """The limit is "at most max_body_bytes": a body of exactly that size is answered, declared by
    Content-Length or sent in pieces; the pieces are joined in order."""
    body = instances_body(6000)
    expected = predictor.describe(*predictor.top_k_of(probabilities_of(predictor, IMAGES[:1]), 3))
    expected = {"predictions": json.loads(json.dumps(expected))}
    with running(predictor, max_body_bytes=6000) as url:
        declared = httpx.post(f"{url}/predict", content=body, headers=JSON)
        assert (declared.status_code, declared.json()) == (200, expected)
        with raw(url) as sock:
            reply = chunked(sock, "/predict", [body[:2500], body[2500:5000], body[5000:]])
        assert status_and_json(reply) == ("HTTP/1.1 200 OK", expected)


def test_a_chunked_body_over_the_limit_gets_413_though_each_piece_is_under_it(predictor):
    """Chunked, the body is refused once it has grown past the limit; declared, before it is read. Both count as
    refusals by the body_bytes limit, and the server goes on answering."""
    body = instances_body(6001)
    with running(predictor, max_body_bytes=6000) as url:
        with raw(url) as sock:
            reply = chunked(sock, "/predict", [body[:3000], body[3000:]])
        assert status_and_json(reply) == (
            "HTTP/1.1 413 Request Entity Too Large",
            {"error": "request body is over the 6000-byte limit"},
        )
        declared = httpx.post(f"{url}/predict", content=body, headers=JSON)
        assert (declared.status_code, declared.json()) == (
            413,
            {"error": "request body of 6001 bytes is over the 6000-byte limit"},
        )
        assert httpx.get(f"{url}/health").status_code == 200
        metrics = scrape(url)
    assert metrics[("softmax_mlops_refused_total", (("limit", "body_bytes"),))] == 2


def multipart(files: int, fields: int) -> tuple[bytes, dict]:
    parts = [
        f'--x\r\nContent-Disposition: form-data; name="file{i}"; filename="{i}.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + png(IMAGES[i % 3])
        + b"\r\n"
        for i in range(files)
    ] + [f'--x\r\nContent-Disposition: form-data; name="field{i}"\r\n\r\n{i}\r\n'.encode() for i in range(fields)]
    return b"".join(parts) + b"--x--\r\n", {"content-type": "multipart/form-data; boundary=x"}


def test_a_multipart_upload_holds_one_file_and_at_most_ten_fields(predictor):
    """python-multipart's limits as /predict sets them: a second file, or an eleventh field, is refused before
    any image is decoded."""
    expected = predictor.describe(*predictor.top_k_of(probabilities_of(predictor, IMAGES[:1]), 3))
    with running(predictor) as url:
        answer = httpx.post(f"{url}/predict", content=(body := multipart(1, 10))[0], headers=body[1])
        assert (answer.status_code, answer.json()) == (200, {"predictions": json.loads(json.dumps(expected))})
        for files, fields in ((2, 0), (1, 11)):
            body, headers = multipart(files, fields)
            answer = httpx.post(f"{url}/predict", content=body, headers=headers)
            assert (answer.status_code, answer.json()) == (400, {"error": "malformed multipart body"})


def test_the_connection_settings_reach_uvicorn_and_an_idle_connection_is_closed(predictor):
    """serve.keep_alive_s and serve.shutdown_grace_s from params.yaml are uvicorn's own two timeouts; an idle
    kept-alive connection is closed after keep_alive_s, without a reply."""
    limits = ServeConfig(keep_alive_s=0.4, shutdown_grace_s=2.5)
    config = uvicorn.Config(**server.uvicorn_settings(predictor, limits, 3))
    assert (config.timeout_keep_alive, config.timeout_graceful_shutdown) == (0.4, 2.5)
    assert (config.host, config.port) == ("127.0.0.1", limits.port)
    with running(predictor, keep_alive_s=0.4) as url, raw(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = read_all(sock)  # returns when the server closes: the socket's own 30 s bound is against a hang
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b'{"status":"ok"}')


class SlowPredictor(Predictor):
    """The real model, one second slower: an answer still being computed when a deadline fires."""

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        time.sleep(1.0)
        return super().run(images)


def test_a_pipelined_request_waits_for_the_answer_before_it_and_its_headers_still_have_a_deadline(onnx_model):
    """Two requests sent at once on one connection, the second one's headers unfinished. The header deadline
    (0.3 s) fires while the first answer (1 s) is being computed: that answer is sent whole, and only then is
    the second request refused with 408. (Without a deadline of its own, the connection would be held for as
    long as the client kept trickling bytes: each byte cancels uvicorn's keep-alive timer.)"""
    slow = SlowPredictor(onnx_model[0])
    body = json.dumps({"instances": IMAGES[:1].tolist()}).encode()
    expected = slow.describe(*slow.top_k_of(probabilities_of(Predictor(onnx_model[0]), IMAGES[:1]), 3))
    with running(slow, read_timeout_s=0.3) as url, raw(url) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body) + b"GET /health HTTP/1.1\r\nHost: x\r\n"
        )
        replies = read_all(sock)  # until the server closes the connection
    head, _, tail = replies.partition(b"\r\n\r\n")
    first, rest = head + b"\r\n\r\n" + tail[: length(replies)], tail[length(replies) :]
    assert status_and_json(first) == ("HTTP/1.1 200 OK", {"predictions": json.loads(json.dumps(expected))})
    assert status_and_json(rest) == (
        "HTTP/1.1 408 Request Timeout",
        {"error": "request headers not received within 0.3 s"},
    )


TOKEN = "s3cret-token-for-tests"
# What `serve` tells the operator at start, so that a service left open by mistake shows in its log
TOLD = {TOKEN: "every route but the health routes needs the bearer token", None: "no bearer token is set"}


# uvloop runs Python's signal handlers inside its loop, which logs the exception pytest-timeout's handler raises
# and goes on serving: a `serve` that a mutant keeps from answering or stopping was never stopped by the signal
# method, and held its mutmut worker for minutes. The thread method ends the process instead.
@pytest.mark.timeout(2 * START_S, method="thread")
@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_serve_answers_until_sigterm_with_the_collector_frozen(predictor, token, caplog):
    """`serve` itself, in this process's main thread as the console script runs it: it answers with the top_k
    it was given, asks for the token it was given (and says so in its log), has moved what it loaded out of the
    garbage collector's reach, and stops on SIGTERM (which uvicorn, once it has shut down, raises again for the
    handler that was there before it)."""
    limits, seen, received = ServeConfig(port=free_port(), shutdown_grace_s=1.0), {}, []
    url, returned = f"http://127.0.0.1:{limits.port}", threading.Event()

    def client() -> None:
        """Ask once the port answers, without and with the token, then SIGTERM this process: only while `serve`
        runs (with the handler below in place), never after it has returned or failed."""
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and not returned.is_set():
            with contextlib.suppress(httpx.TransportError):
                seen["bare"] = httpx.post(f"{url}/predict", json={"instances": IMAGES.tolist()}).status_code
                headers = {"authorization": f"Bearer {token}"} if token else {}
                seen["answer"] = httpx.post(f"{url}/predict", json={"instances": IMAGES.tolist()}, headers=headers)
                seen["frozen"] = gc.get_freeze_count()
                break
            time.sleep(0.05)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    frozen_before = gc.get_freeze_count()  # mutmut freezes its own objects before it forks a mutant's run
    previous = signal.signal(signal.SIGTERM, lambda sig, _: received.append(sig))
    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        with caplog.at_level("INFO", logger="softmax_mlops.serving.server"):
            server.serve(predictor, limits, 2, token)
    finally:
        returned.set()
        thread.join(START_S)  # a SIGTERM the client sent meanwhile still meets the handler above
        signal.signal(signal.SIGTERM, previous)
        gc.unfreeze()
    expected = predictor.describe(*predictor.top_k_of(probabilities_of(predictor, IMAGES), 2))
    assert seen["answer"].json() == {"predictions": json.loads(json.dumps(expected))}
    assert seen["bare"] == (401 if token else 200)
    assert [r.getMessage() for r in caplog.records if r.name == server.__name__] == [TOLD[token]]
    assert seen["frozen"] > frozen_before and received == [signal.SIGTERM]


def test_with_a_token_every_route_but_health_needs_it(predictor):
    name = predictor.metadata.get("registered_model") or "softmax-mlops"
    body = {"instances": IMAGES[:1].tolist()}
    v2_body = {
        "inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": IMAGES[:1].ravel().tolist()}]
    }
    closed = [
        ("GET", "/", None),
        ("GET", "/metadata", None),
        ("GET", "/v2", None),
        ("GET", f"/v2/models/{name}", None),
        ("GET", f"/v2/models/{name}/ready", None),
        ("POST", "/predict", body),
        ("POST", f"/v2/models/{name}/infer", v2_body),
        ("POST", "/invocations", {"instances": IMAGES[:1].tolist()}),
        ("GET", "/version", None),
        ("GET", "/openapi.json", None),
        ("GET", "/metrics", None),
        ("GET", "/no-such-route", None),
    ]
    with running(predictor, token=TOKEN) as url, httpx.Client(base_url=url) as client:
        for path in ("/health", "/ping", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        for method, path, payload in closed:
            none = client.request(method, path, json=payload)
            assert none.status_code == 401, path
            assert none.json() == {"error": "this service needs a bearer token: send Authorization: Bearer <token>"}
            assert none.headers["www-authenticate"] == "Bearer"
            for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Basic {TOKEN}", TOKEN):
                refused = client.request(method, path, json=payload, headers={"authorization": wrong})
                assert refused.status_code == 401, (path, wrong)
                assert refused.json() == {"error": "the bearer token is not valid"}
                assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            for right in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
                answered = client.request(method, path, json=payload, headers={"authorization": right})
                assert answered.status_code == (404 if path == "/no-such-route" else 200), (path, answered.text)
        predicted = client.post("/predict", json=body, headers={"authorization": f"Bearer {TOKEN}"}).json()
        assert predicted["predictions"][0]["class_id"] == int(probabilities_of(predictor, IMAGES[:1]).argmax())


def test_a_refused_request_is_answered_before_its_body_is_read(predictor):
    """No token: 401 at once, even for a body over the size limit that the route would have refused with 413."""
    with running(predictor, token=TOKEN, max_body_bytes=100) as url:
        response = httpx.post(f"{url}/predict", content=b"x" * 1000, headers=JSON)
        assert response.status_code == 401
        allowed = httpx.post(
            f"{url}/predict", content=b"x" * 1000, headers={**JSON, "authorization": f"Bearer {TOKEN}"}
        )
        assert allowed.status_code == 413


def test_without_a_token_every_route_answers_as_before(predictor):
    with running(predictor) as url:
        assert httpx.get(f"{url}/metadata").status_code == 200
        assert httpx.post(f"{url}/predict", json={"instances": IMAGES[:1].tolist()}).status_code == 200


def test_the_token_comes_from_the_environment_else_the_token_file(tmp_path, monkeypatch):
    from softmax_mlops.config import SERVE_TOKEN_ENV
    from softmax_mlops.errors import PipelineError
    from softmax_mlops.serving import auth

    monkeypatch.delenv(SERVE_TOKEN_ENV, raising=False)
    assert auth.token(ServeConfig()) is None
    secret = tmp_path / "token"
    secret.write_text(" from-file \nsecond line is ignored\n")
    assert auth.token(ServeConfig(token_file=str(secret))) == "from-file"
    monkeypatch.setenv(SERVE_TOKEN_ENV, "from-env")
    assert auth.token(ServeConfig(token_file=str(secret))) == "from-env"
    monkeypatch.setenv(SERVE_TOKEN_ENV, "  ")  # blank: as if unset
    assert auth.token(ServeConfig(token_file=str(secret))) == "from-file"
    monkeypatch.delenv(SERVE_TOKEN_ENV)
    for content, reason in (("", "the serve token file is empty"), ("\n  \n", "the serve token file is empty")):
        secret.write_text(content)
        with pytest.raises(PipelineError, match=f"^{secret}: {reason}$"):
            auth.token(ServeConfig(token_file=str(secret)))
    with pytest.raises(PipelineError, match=f"^{tmp_path / 'missing'}: cannot read the serve token: FileNotFoundError"):
        auth.token(ServeConfig(token_file=str(tmp_path / "missing")))


def test_tritonclient_sends_the_token_as_the_docs_show(predictor):
    """docs/serving.md's client: tritonclient's probes need no token, its inference sends it in `headers`."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    name = predictor.metadata.get("registered_model") or "softmax-mlops"
    with running(predictor, token=TOKEN) as url:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            image = httpclient.InferInput("image", [2, 28, 28], "UINT8")
            image.set_data_from_numpy(IMAGES[:2])
            assert client.is_server_live() and client.is_server_ready()
            with pytest.raises(InferenceServerException, match="needs a bearer token"):
                client.infer(name, [image])
            result = client.infer(name, [image], headers={"Authorization": f"Bearer {TOKEN}"})
            assert np.allclose(result.as_numpy("probabilities"), probabilities_of(predictor, IMAGES[:2]), atol=1e-6)
        finally:
            client.close()


def scrape(url: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """/metrics, parsed by prometheus-client's own parser: (sample name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(f"{url}/metrics", headers=headers)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }


def test_metrics_count_requests_refusals_and_predicted_classes(predictor):
    images = np.random.default_rng(8).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    name = predictor.metadata.get("registered_model") or "softmax-mlops"
    tensor = {"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": images[6].ravel().tolist()}
    with running(predictor, max_instances=3) as url, httpx.Client(base_url=url) as client:
        for first in (0, 2, 4):
            assert client.post("/predict", json={"instances": images[first : first + 2].tolist()}).status_code == 200
        assert client.post(f"/v2/models/{name}/infer", json={"inputs": [tensor]}).status_code == 200
        assert client.post("/predict", content=b"{", headers=JSON).status_code == 400
        assert client.post("/predict", json={"instances": images[:4].tolist()}).status_code == 413
        assert client.get("/no/such/path/42").status_code == 404
        metrics = scrape(url)
    requests = "softmax_mlops_requests_total"
    assert metrics[(requests, (("protocol", "native"), ("route", "/predict"), ("status", "200")))] == 3
    assert metrics[(requests, (("protocol", "v2"), ("route", "/v2/models/{name}/infer"), ("status", "200")))] == 1
    assert metrics[(requests, (("protocol", "native"), ("route", "/predict"), ("status", "400")))] == 1
    assert metrics[(requests, (("protocol", "native"), ("route", "/predict"), ("status", "413")))] == 1
    assert metrics[(requests, (("protocol", "native"), ("route", "other"), ("status", "404")))] == 1
    assert metrics[("softmax_mlops_refused_total", (("limit", "instances"),))] == 1
    assert metrics[("softmax_mlops_requests_in_flight", ())] == 1  # the scrape itself
    # the classes of the 7 images predicted, as the model computes them
    counts = np.bincount(probabilities_of(predictor, images).argmax(axis=1), minlength=len(predictor.class_names))
    predicted = {labels[0][1]: v for (n, labels), v in metrics.items() if n == "softmax_mlops_predictions_total"}
    assert predicted == {predictor.class_names[k]: float(c) for k, c in enumerate(counts) if c}
    # each inference is timed in its three phases, per protocol; refused requests never reach inference
    for phase in ("preprocess", "predict", "postprocess"):
        assert metrics[(f"request_{phase}_seconds_count", (("protocol", "native"),))] == 3
        assert metrics[(f"request_{phase}_seconds_count", (("protocol", "v2"),))] == 1
        assert metrics[(f"request_{phase}_seconds_sum", (("protocol", "native"),))] > 0
    (info,) = [labels for (n, labels), v in metrics.items() if n == "softmax_mlops_model_info" and v == 1]
    assert dict(info)["name"] == name
    assert metrics[("softmax_mlops_drift_window_images", ())] == 7
    assert math.isnan(metrics[("softmax_mlops_drift_class_p_value", ())])  # this model carries no drift reference


@pytest.mark.parametrize("temperature", [1.25, None], ids=["calibrated", "uncalibrated"])
def test_the_model_info_metric_has_the_documented_labels(onnx_model, tmp_path, temperature):
    """softmax_mlops_model_info{name, version, data_md5, temperature}: the registered name and the model card's
    data md5 and temperature (empty for a card without one), with the version serve resolved from the registry."""
    path = model_copy(onnx_model, tmp_path / "model")
    card = {"class_names": list(CLASS_NAMES), "registered_model": "softmax-scratch", "data_md5": "0f" * 16}
    if temperature is not None:
        card["temperature"] = temperature
    (path.parent / "model.json").write_text(json.dumps(card), encoding="utf-8")
    predictor = Predictor(path, threads=1, source="models:/softmax-scratch@champion", version="4")
    with running(predictor) as url:
        metrics = scrape(url)
    (info,) = [labels for (n, labels), v in metrics.items() if n == "softmax_mlops_model_info" and v == 1]
    expected = {"name": "softmax-scratch", "version": "4", "data_md5": "0f" * 16, "temperature": "1.25"}
    assert dict(info) == {**expected, "temperature": "1.25" if temperature else ""}


def test_the_online_drift_window_is_the_batch_class_test_on_the_last_images(onnx_model, tmp_path):
    """A model with a drift reference: the p-value is scipy's chi-squared test of the window's classes against
    the reference's, over the last serve.drift_window images only."""
    from scipy import stats

    from softmax_mlops.serving import drift

    reference_images = np.random.default_rng(9).integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    model = model_copy(onnx_model, tmp_path / "model")
    predictor = Predictor(model)
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), predictor.run(reference_images)[1], reference_images)
    predictor = Predictor(model)
    dark = np.zeros((5, 28, 28), np.uint8)
    with running(predictor, drift_window=6) as url:
        for batch in (reference_images[:3], dark):
            assert httpx.post(f"{url}/predict", json={"instances": batch.tolist()}).status_code == 200
        metrics = scrape(url)
    window = np.concatenate([reference_images[2:3], dark])  # the last 6 of the 8 images
    classes = len(predictor.class_names)
    table = np.stack(
        [
            np.bincount(predictor.run(reference_images)[1].argmax(axis=1), minlength=classes),
            np.bincount(predictor.run(window)[1].argmax(axis=1), minlength=classes),
        ]
    )
    table = table[:, table.sum(axis=0) > 0]
    assert metrics[("softmax_mlops_drift_window_images", ())] == 6
    assert metrics[("softmax_mlops_drift_class_p_value", ())] == pytest.approx(stats.chi2_contingency(table).pvalue)


def test_refusals_by_the_connection_cap_and_the_header_deadline_are_counted(predictor):
    with running(predictor, max_connections=1, read_timeout_s=0.5) as url:
        with raw(url) as first, raw(url) as second:
            assert read_all(second).startswith(b"HTTP/1.1 503")
            first.sendall(b"GET /health HTTP/1.1\r\n")  # headers that never end
            assert read_all(first).startswith(b"HTTP/1.1 408")
        metrics = scrape(url)
    assert metrics[("softmax_mlops_refused_total", (("limit", "connections"),))] == 1
    assert metrics[("softmax_mlops_refused_total", (("limit", "read_timeout"),))] == 1


def test_with_metrics_off_there_is_no_metrics_route_and_requests_are_answered_alike(predictor):
    with running(predictor, metrics=False) as url:
        assert httpx.get(f"{url}/metrics").status_code == 404
        answer = httpx.post(f"{url}/predict", json={"instances": IMAGES[:1].tolist()})
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["class_id"] == int(probabilities_of(predictor, IMAGES[:1]).argmax())


def test_the_page_at_the_root_is_one_self_contained_html_file(predictor):
    """GET / is the upload and sketch page: HTML that loads nothing from elsewhere (its content security policy
    allows only inline script and style, and requests to this service), and calls the routes it names."""
    from softmax_mlops.serving.server import PAGE

    with running(predictor) as url:
        page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == PAGE.read_bytes()
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert "<script src" not in html and "<link" not in html and "http" not in html.split("<script>")[1]
    assert 'fetch("predict"' in html and 'fetch("metadata")' in html
    assert '<canvas id="sketch" width="28" height="28">' in html and 'accept="image/png,image/jpeg"' in html
