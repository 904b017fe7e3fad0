"""The HTTP service, started for real on 127.0.0.1: good requests, every kind of bad one, and it keeps serving."""

import io
import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import REPO
from stack import Processes, free_port, wait_http

pytestmark = pytest.mark.server

MAX_BODY, MAX_INSTANCES = 200_000, 4


@pytest.fixture(scope="module")
def server(onnx_model):
    port = free_port()
    with Processes() as procs:
        proc = procs.start(
            "softmax-mlops",
            "serve",
            "-m",
            str(onnx_model[0]),
            "--port",
            str(port),
            "--max-body-bytes",
            str(MAX_BODY),
            "--max-instances",
            str(MAX_INSTANCES),
            cwd=REPO,
            env=dict(os.environ),
        )
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc)
        yield url


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


IMAGES = np.random.default_rng(2).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)


def test_health_and_metadata(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/metadata").json()["class_names"][9] == "ankle boot"


def test_json_instances_match_the_model(server, onnx_model):
    from softmax_mlops.serving.inference import Predictor

    response = httpx.post(f"{server}/predict", json={"instances": IMAGES.tolist()})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    _, probabilities = Predictor(onnx_model[0]).run(IMAGES)
    assert [p["class_id"] for p in predictions] == probabilities.argmax(1).tolist()
    assert predictions[0]["probability"] == pytest.approx(float(probabilities[0].max()), rel=1e-6)
    assert len(predictions[0]["top_k"]) == 3


def test_flat_784_instances_are_accepted(server):
    response = httpx.post(f"{server}/predict", json={"instances": IMAGES.reshape(3, 784).tolist()})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 3


def test_png_body_and_multipart_upload_agree(server):
    body = png(IMAGES[0])
    raw = httpx.post(f"{server}/predict", content=body, headers={"content-type": "image/png"})
    upload = httpx.post(f"{server}/predict", files={"file": ("x.png", body, "image/png")})
    as_json = httpx.post(f"{server}/predict", json={"instances": IMAGES[:1].tolist()})
    assert raw.status_code == upload.status_code == 200
    assert raw.json() == upload.json() == as_json.json()


def instances(value):
    return json.dumps({"instances": value})


BAD = [
    ("malformed JSON", b"{not json", "application/json", 400, "malformed JSON"),
    ("no instances key", b'{"images": []}', "application/json", 422, "expected a JSON object"),
    ("not an object", b"[1, 2]", "application/json", 422, "expected a JSON object"),
    ("empty batch", instances([]), "application/json", 422, "non-empty list"),
    ("wrong shape", instances([[[0] * 28] * 27]), "application/json", 422, "must be 28x28"),
    ("ragged rows", instances([[[0] * 28] * 27 + [[0] * 3]]), "application/json", 422, "28x28"),
    ("over 255", instances([[[256] * 28] * 28]), "application/json", 422, "in 0..255"),
    ("negative", instances([[[-1] * 28] * 28]), "application/json", 422, "in 0..255"),
    ("strings", instances([[["a"] * 28] * 28]), "application/json", 422, "must be numbers"),
    ("booleans", instances([[[True] * 28] * 28]), "application/json", 422, "must be numbers"),
    (
        "NaN",
        '{"instances": [[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]}",
        "application/json",
        422,
        "NaN",
    ),
    ("fractions", instances([[[0.5] * 28] * 28]), "application/json", 422, "integers"),
    ("too many instances", instances([[[0] * 28] * 28] * (MAX_INSTANCES + 1)), "application/json", 413, "limit of 4"),
    ("oversized body", b" " * (MAX_BODY + 1), "application/json", 413, "byte limit"),
    ("undecodable image", b"\x89PNG but not really", "image/png", 400, "not a readable PNG or JPEG"),
    ("wrong content type", b"hello", "text/plain", 415, "unsupported content type"),
]


@pytest.mark.parametrize("body, content_type, status, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_json_error_and_service_survives(server, body, content_type, status, message):
    response = httpx.post(f"{server}/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_chunked_body_without_length_is_capped(server):
    def chunks():
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    response = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_multipart_without_a_file(server):
    body = b'--XyZ\r\nContent-Disposition: form-data; name="note"\r\n\r\nno file here\r\n--XyZ--\r\n'
    response = httpx.post(
        f"{server}/predict", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    assert response.status_code == 422 and "holds no file" in response.json()["error"]


def test_serve_with_a_token_from_the_environment_needs_it_and_an_empty_token_file_stops_it(onnx_model, tmp_path):
    """As a user runs it: SOFTMAX_MLOPS_SERVE_TOKEN closes every route but health; a token file that is empty
    (serve.token_file, in a project's params.yaml) stops serve in one line naming it, before it listens."""
    import subprocess

    import yaml

    port = free_port()
    with Processes() as procs:
        proc = procs.start(
            "softmax-mlops", "serve", "-m", str(onnx_model[0]), "--port", str(port),
            cwd=REPO, env={**os.environ, "SOFTMAX_MLOPS_SERVE_TOKEN": "t0ken"},
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc)
        assert httpx.get(f"{url}/metadata").status_code == 401
        assert httpx.get(f"{url}/metadata", headers={"authorization": "Bearer t0ken"}).status_code == 200
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "token").write_text("\n")
    params["serve"]["token_file"] = str(tmp_path / "token")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != "SOFTMAX_MLOPS_SERVE_TOKEN"}
    done = subprocess.run(
        ["softmax-mlops", "serve", "-m", str(onnx_model[0]), "--port", str(free_port())],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"softmax-mlops: error: {tmp_path / 'token'}: the serve token file is empty"
    )


def test_serve_takes_its_token_from_the_file_that_token_file_names(onnx_model, tmp_path):
    """As the stack runs it: `serve --token-file /run/secrets/serve_token` (a compose secret, a trailing newline
    and all) needs that token; a token file that does not exist stops serve in one line naming it."""
    import subprocess

    token = tmp_path / "serve_token"
    token.write_text("from-a-secret\n")
    env = {k: v for k, v in os.environ.items() if k != "SOFTMAX_MLOPS_SERVE_TOKEN"}
    port = free_port()
    with Processes() as procs:
        proc = procs.start(
            "softmax-mlops", "serve", "-m", str(onnx_model[0]), "--port", str(port), "--token-file", str(token),
            cwd=REPO, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc)
        assert httpx.get(f"{url}/metadata").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"authorization": "Bearer from-a-secret"}).status_code == 200
    missing = tmp_path / "absent"
    done = subprocess.run(
        ["softmax-mlops", "serve", "-m", str(onnx_model[0]), "--port", str(free_port()), "--token-file", str(missing)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"softmax-mlops: error: {missing}: cannot read the serve token: FileNotFoundError")
