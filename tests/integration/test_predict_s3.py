"""`softmax-mlops predict` with s3:// inputs and outputs, on a real S3 server (moto's, on 127.0.0.1): the same rows
as a local run, the drift report beside the output, the sharded path's folder with its manifest, and the refusals
(an output that is its own input, an input that is not there) in one line each."""

from __future__ import annotations

import io
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import model_copy
from softmax_mlops.serving import drift
from softmax_mlops.serving.inference import Predictor
from stack import S3Server

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

RNG = np.random.default_rng(11)
IMAGES = RNG.integers(0, 256, (300, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def store(onnx_model, tmp_path_factory):
    """moto's server with a bucket holding the images as .npy and as PNGs, a model with a drift reference, and
    the environment that points predict at the server."""
    folder = tmp_path_factory.mktemp("s3")
    model = model_copy(onnx_model, folder / "model")
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), Predictor(model).run(IMAGES)[1], IMAGES)
    with S3Server("batch") as s3:
        buffer = io.BytesIO()
        np.save(buffer, IMAGES)
        s3.client().put_object(Bucket="batch", Key="in/images.npy", Body=buffer.getvalue())
        for i in range(5):
            png = io.BytesIO()
            Image.fromarray(IMAGES[i]).save(png, format="PNG")
            s3.client().put_object(Bucket="batch", Key=f"pngs/{i}.png", Body=png.getvalue())
        np.save(folder / "images.npy", IMAGES)
        env = {**os.environ, **S3Server.KEYS, "AWS_ENDPOINT_URL": s3.url, "AWS_MAX_ATTEMPTS": "1"}
        env.pop("PREFECT_API_URL", None)
        env["PREFECT_HOME"] = str(folder / "prefect-home")
        # the sharded run's ephemeral Prefect server builds a new database first: Prefect's 20 s ran out on a loaded
        # 2-core machine (this bounds a hang, not a speed)
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
        local = _predict(folder / "images.npy", "-o", folder / "local.parquet", "-m", model, env=env, cwd=folder)
        assert local.returncode == 0, local.stderr  # what every s3:// run is compared with
        yield s3, model, folder, env


def _predict(*args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["softmax-mlops", "predict", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=500
    )


def _object(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket="batch", Key=key)["Body"].read()


def test_an_s3_input_and_output_give_the_local_rows_and_the_drift_report_beside(store):
    s3, model, folder, env = store
    done = _predict("s3://batch/in/images.npy", "-o", "s3://batch/out/images.parquet", "-m", model, env=env, cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "predict: 300 images -> s3://batch/out/images.parquet" in done.stdout
    assert "-> s3://batch/out/images.drift.json" in done.stdout
    assert sorted(s3.keys("batch", "out/")) == ["out/images.drift.json", "out/images.parquet"]
    remote = pq.read_table(io.BytesIO(_object(s3, "out/images.parquet")))
    assert remote.equals(pq.read_table(folder / "local.parquet"))
    assert _object(s3, "out/images.drift.json") == (folder / "local.drift.json").read_bytes()


def test_an_s3_prefix_of_images_is_read_as_a_folder(store):
    s3, model, folder, env = store
    done = _predict("s3://batch/pngs/", "-o", folder / "pngs.csv", "-m", model, env=env, cwd=folder)
    assert done.returncode == 0, done.stderr
    rows = (folder / "pngs.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [f"{i}.png" for i in range(5)]


def test_the_sharded_path_uploads_its_folder_with_the_manifest(store):
    s3, model, folder, env = store
    done = _predict(
        "s3://batch/in/images.npy", "-o", "s3://batch/sharded/images.parquet", "-m", model,
        "--workers", "2", "--shard-size", "100", env=env, cwd=folder,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    keys = s3.keys("batch", "sharded/")
    assert [k for k in keys if k.endswith(".parquet") and "/part-" in k] == [
        f"sharded/images.parquet/part-0000{i}.parquet" for i in range(3)
    ]
    assert "sharded/images.parquet/_manifest.json" in keys and "sharded/images.drift.json" in keys
    assert _object(s3, "sharded/images.drift.json") == (folder / "local.drift.json").read_bytes()


def test_an_output_url_that_is_its_input_is_refused_in_one_line(store):
    s3, model, folder, env = store
    before = _object(s3, "in/images.npy")
    for output in ("s3://batch/in/images.npy", "s3://batch/in/images.npy/x.csv"):
        done = _predict("s3://batch/in/images.npy", "-o", output, "-m", model, env=env, cwd=folder)
        assert done.returncode == 1
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"softmax-mlops: error: refusing to write {output}: it is ")
    assert _object(s3, "in/images.npy") == before


def test_a_missing_input_url_is_one_line_naming_it(store):
    _, model, folder, env = store
    done = _predict("s3://batch/in/nothing.npy", "-o", folder / "x.csv", "-m", model, env=env, cwd=folder)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["softmax-mlops: error: s3://batch/in/nothing.npy does not exist"]
