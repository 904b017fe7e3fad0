"""The HTTP service against hostile clients, on a real server on 127.0.0.1: deeply nested JSON, slow headers
and bodies, too many connections, decompression bombs, formats that are not PNG/JPEG, disconnects."""

import contextlib
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from stack import raw_connection, read_all, serving

pytestmark = pytest.mark.server

READ_TIMEOUT, MAX_CONNECTIONS, MAX_PIXELS = 1.0, 8, 1_000_000


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(
        onnx_model[0],
        log,
        "--read-timeout",
        str(READ_TIMEOUT),
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-image-pixels",
        str(MAX_PIXELS),
    ) as (url, port):
        yield url, port, log


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_deeply_nested_json_is_a_400_not_a_500(server):
    url, _, _ = server
    body = b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]


def test_405_says_which_methods_are_allowed(server):
    url, _, _ = server
    response = httpx.get(f"{url}/predict")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert "error" in response.json()


def test_headers_that_trickle_in_get_408_and_the_connection_closes(server):
    _, port, _ = server
    with raw_connection(port) as sock:
        for byte in b"POST /predict HTTP/1.1\r\nHost: x\r\n":
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break  # the server has closed the connection
            time.sleep(READ_TIMEOUT / 4)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"headers not received" in reply


def test_an_idle_connection_is_closed(server):
    _, port, _ = server
    with raw_connection(port) as sock:
        assert read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_body_that_trickles_in_gets_408(server):
    _, port, _ = server
    with raw_connection(port) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        reply = read_all(sock)
    head = reply.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
    assert b" 408 " in head[0] and b"body not received" in reply
    assert b"connection: close" in head  # and the server closes it then, not serve.keep_alive_s later


def test_connections_past_the_cap_get_503_and_the_service_recovers(server):
    url, port, _ = server
    held = [raw_connection(port) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        for sock in held:
            sock.settimeout(0.5)
        refused = []
        for sock in held:
            with contextlib.suppress(TimeoutError):
                refused.append(sock.recv(4096))
        assert any(r.startswith(b"HTTP/1.1 503") and b"open connections" in r for r in refused)
    finally:
        for sock in held:
            sock.close()
    time.sleep(READ_TIMEOUT)
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_decompression_bomb_is_refused_from_its_header(server):
    url, _, _ = server
    bomb = png_bytes(Image.new("L", (13000, 13000)))  # ~20 KB on the wire, 169 megapixels decoded
    assert len(bomb) < 200_000
    response = httpx.post(f"{url}/predict", content=bomb, headers={"content-type": "image/png"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_only_png_and_jpeg_are_decoded(server, fmt):
    url, _, _ = server
    out = io.BytesIO()
    Image.new("L", (28, 28), 128).save(out, format=fmt)
    response = httpx.post(f"{url}/predict", content=out.getvalue(), headers={"content-type": "image/png"})
    assert response.status_code == 400 and "PNG or JPEG" in response.json()["error"]


def test_eps_is_never_handed_to_ghostscript(server):
    url, _, _ = server
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    response = httpx.post(f"{url}/predict", content=eps, headers={"content-type": "image/png"})
    assert response.status_code == 400


def test_a_client_that_disconnects_is_not_an_error_with_a_traceback(server):
    url, port, log = server
    with raw_connection(port) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100000\r\n\r\n{"instances": ['
        )
    time.sleep(READ_TIMEOUT / 2)
    assert httpx.get(f"{url}/health").status_code == 200
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-2000:]


def test_the_openapi_schema_describes_the_predict_body(server):
    url, _, _ = server
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "image/png", "image/jpeg", "multipart/form-data"}
    assert body["application/json"]["schema"]["required"] == ["instances"]


def test_json_still_served_after_all_of_it(server, onnx_model):
    url, _, _ = server
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    response = httpx.post(f"{url}/predict", json={"instances": images.tolist()})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2
    assert json.loads(response.text)["predictions"][0]["class_name"]
