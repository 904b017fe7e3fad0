"""Both standard protocols on the real registered model and real test images: MLflow's scoring protocol side by
side with the real `mlflow models serve --env-manager local`, and the Open Inference Protocol through
tritonclient against this server's own /predict."""

import json
import os

import httpx
import numpy as np
import pytest

from helpers import copy_project, run_tool
from softmax_mlops import config
from stack import Processes, free_port, wait_http

pytestmark = [pytest.mark.realdata, pytest.mark.server]
MODEL = "models:/softmax-mlops-scratch@champion"


@pytest.fixture(scope="module")
def servers(real_splits, tmp_path_factory):
    """A project whose export registered the scratch model; this service and MLflow's own server on it."""
    root = copy_project(tmp_path_factory.mktemp("protocols") / "project")
    result = run_tool("dvc", "repro", "export@scratch", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    env = dict(os.environ, MLFLOW_TRACKING_URI=config.load(root).mlflow.tracking_uri)
    ours, theirs = free_port(), free_port()
    with Processes() as procs:
        ours_proc = procs.start("softmax-mlops", "serve", "-m", MODEL, "--port", str(ours), cwd=root, env=env)
        theirs_proc = procs.start(
            "mlflow",
            "models",
            "serve",
            "-m",
            MODEL,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(theirs),
            cwd=root,
            env=env,
        )
        wait_http(f"http://127.0.0.1:{ours}/ping", ours_proc)
        wait_http(f"http://127.0.0.1:{theirs}/ping", theirs_proc)
        yield f"http://127.0.0.1:{ours}", f"http://127.0.0.1:{theirs}"


@pytest.fixture(scope="module")
def images(real_splits):
    return real_splits["test"][0][:64]


def bodies(images: np.ndarray) -> dict:
    return {
        "inputs": {"inputs": images.tolist()},
        "inputs-named": {"inputs": {"image": images.tolist()}},
        "instances": {"instances": images.tolist()},
        "instances-records": {"instances": [{"image": image.tolist()} for image in images]},
    }


@pytest.mark.parametrize("form", ["inputs", "inputs-named", "instances", "instances-records"])
def test_invocations_give_what_mlflow_models_serve_gives(servers, images, form):
    ours, theirs = (httpx.post(f"{url}/invocations", json=bodies(images)[form], timeout=60) for url in servers)
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text[:300])
    ours, theirs = ours.json()["predictions"], theirs.json()["predictions"]
    assert set(ours) == set(theirs) == {"logits", "probabilities"}
    for name in ours:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), rtol=0, atol=1e-6)
    assert np.argmax(ours["probabilities"], 1).tolist() == np.argmax(theirs["probabilities"], 1).tolist()


BAD_BODIES = {
    "not-json": b"garbage",
    "no-field": {"nothing": 1},
    "two-fields": {"inputs": [[[0] * 28] * 28], "instances": [[[0] * 28] * 28]},
    "dataframe": {"dataframe_split": {"columns": ["image"], "data": [[0]]}},
    "flat-784": {"inputs": [[0] * 784]},
    "27-rows": {"inputs": [[[0] * 28] * 27]},
    "empty": {"inputs": []},
    "over-255": {"inputs": [[[300] * 28] * 28]},
    "negative": {"inputs": [[[-1] * 28] * 28]},
    "ragged": {"inputs": [[[0] * 28] * 27 + [[0] * 3]]},
    "strings": {"inputs": [[["a"] * 28] * 28]},
    "wrong-name": {"inputs": {"pixels": [[[0] * 28] * 28]}},
    "record-wrong-name": {"instances": [{"pixels": [[0] * 28] * 28}]},
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_invocations_are_refused_the_way_mlflow_refuses_them(servers, case):
    """The same status and error code (BAD_REQUEST or INVALID_PARAMETER_VALUE) as MLflow's own server. Not
    here: fractions and booleans, which MLflow casts to uint8 silently (0.5 becomes 0) and this service refuses
    (tests/unit/test_protocols.py)."""
    body = BAD_BODIES[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    ours, theirs = (
        httpx.post(f"{url}/invocations", content=content, headers={"content-type": "application/json"}, timeout=60)
        for url in servers
    )
    assert ours.status_code == theirs.status_code == 400, (ours.text, theirs.text[:300])
    assert ours.json()["error_code"] == theirs.json()["error_code"], (ours.text, theirs.text[:300])


def test_ping_and_version_match(servers):
    ours, theirs = servers
    assert httpx.get(f"{ours}/ping").status_code == httpx.get(f"{theirs}/ping").status_code == 200
    assert httpx.get(f"{ours}/version").text == httpx.get(f"{theirs}/version").text


def test_triton_client_on_real_images_equals_predict(servers, real_splits):
    import tritonclient.http as httpclient

    ours = servers[0]
    images = real_splits["test"][0][:200]
    client = httpclient.InferenceServerClient(ours.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        name = "softmax-mlops-scratch"  # the registered model's name, from its model card
        assert client.is_model_ready(name)
        assert client.get_model_metadata(name)["inputs"][0] == {
            "name": "image",
            "datatype": "UINT8",
            "shape": [-1, 28, 28],
        }
        probabilities = []
        for start in range(0, len(images), 100):  # within serve.max_instances (256)
            batch = images[start : start + 100]
            tensor = httpclient.InferInput("image", [len(batch), 28, 28], "UINT8")
            tensor.set_data_from_numpy(batch)
            probabilities.append(client.infer(name, [tensor]).as_numpy("probabilities"))
    finally:
        client.close()
    probabilities = np.concatenate(probabilities)
    predicted = []
    for start in range(0, len(images), 100):
        response = httpx.post(f"{ours}/predict", json={"instances": images[start : start + 100].tolist()})
        predicted += response.json()["predictions"]
    assert probabilities.argmax(1).tolist() == [p["class_id"] for p in predicted]
    assert probabilities.max(1).tolist() == [p["probability"] for p in predicted]
    accuracy = (probabilities.argmax(1) == real_splits["test"][1][:200]).mean()
    assert accuracy > 0.75  # a bound: the trained model (0.8266) and not random weights (about 0.1) on 200 images
