"""`softmax-mlops predict` with s3:// inputs and outputs, on a real S3 server (moto's, on 127.0.0.1): the same rows
as a local run, the drift report beside the output, the sharded path's folder with its manifest, and the refusals
(an output that is its own input, an input that is not there) in one line each.

The sharded path reads its input in place: the client lists it, and each worker reads its own shard from the store
(serving/stored.py) and writes its part there, so a rerun after a failure finds the finished parts on the store."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import model_copy
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import drift, shards
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
        # a Parquet dataset of 3 files with row groups of 50 rows, as the local folder "dataset" too
        (folder / "dataset").mkdir()
        for i in range(3):
            table = pa.table({"image": pa.array([im.tobytes() for im in IMAGES[i * 100 : (i + 1) * 100]], pa.binary())})
            pq.write_table(table, folder / "dataset" / f"{i}.parquet", row_group_size=50)
            s3.client().put_object(
                Bucket="batch", Key=f"ds/{i}.parquet", Body=(folder / "dataset" / f"{i}.parquet").read_bytes()
            )
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


@pytest.mark.heavy  # a Dask cluster of 2 processes behind an ephemeral Prefect server: some 20 s
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


@pytest.mark.heavy  # two sharded runs (a Dask cluster and an ephemeral Prefect server each): some 35 s
def test_a_sharded_run_reads_a_parquet_prefix_in_place_and_a_rerun_redoes_only_the_lost_shard(store):
    """Two workers read the dataset's row groups from the store and write their parts there: the rows are the
    single process's, the run names the URL it read (nothing was staged), and after one part and its marker are
    lost, the rerun predicts that shard alone into the same parts."""
    s3, model, folder, env = store
    local = _predict(folder / "dataset", "-o", folder / "dataset.parquet", "-m", model, env=env, cwd=folder)
    assert local.returncode == 0, local.stderr
    args = ("s3://batch/ds/", "-o", "s3://batch/dsout/p.parquet", "-m", model, "--workers", "2", "--shard-size", "100")
    done = _predict(*args, env=env, cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 shards to predict" in done.stdout
    assert "predict: 300 images in 3 parts -> s3://batch/dsout/p.parquet" in done.stdout
    run = json.loads(_object(s3, "dsout/p.parquet/_run.json"))
    assert run["job"]["input"] == "s3://batch/ds" and run["job"]["output"] == "s3://batch/dsout/p.parquet"
    assert [g for shard in run["shards"] for g in shard["groups"]] == [
        [f"s3://batch/ds/{i}.parquet", group, i * 100 + group * 50] for i in range(3) for group in range(2)
    ]

    def rows() -> pa.Table:
        parts = [f"dsout/p.parquet/part-0000{i}.parquet" for i in range(3)]
        return pa.concat_tables(pq.read_table(io.BytesIO(_object(s3, key))) for key in parts)

    expected = pq.read_table(folder / "dataset.parquet")
    assert rows().equals(expected)
    manifest = _object(s3, "dsout/p.parquet/_manifest.json")
    for lost in ("dsout/p.parquet/part-00001.parquet", "dsout/p.parquet/_part-00001.json"):
        s3.client().delete_object(Bucket="batch", Key=lost)
    again = _predict(*args, env=env, cwd=folder)
    assert again.returncode == 0, again.stderr
    assert "1 of 3 shards to predict" in again.stdout
    assert rows().equals(expected)
    assert _object(s3, "dsout/p.parquet/_manifest.json") == manifest


@pytest.fixture
def in_store(store, monkeypatch):
    """This process pointed at the store, for the readers called in-process."""
    s3, *_ = store
    for key, value in {**S3Server.KEYS, "AWS_ENDPOINT_URL": s3.url, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    return s3


def _put(s3, key: str, data: bytes) -> str:
    s3.client().put_object(Bucket="batch", Key=key, Body=data)
    return f"s3://batch/{key}"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _idx(images: np.ndarray) -> bytes:
    return b"\0\0\x08\x03" + np.array(images.shape, ">u4").tobytes() + images.tobytes()


@pytest.mark.parametrize("kind", ["npy", "npy784", "idx"])
def test_shards_of_an_array_object_are_read_in_ranges_with_the_whole_input_ids(in_store, kind):
    data = {"npy": _npy(IMAGES), "npy784": _npy(IMAGES.reshape(300, 784)), "idx": _idx(IMAGES)}[kind]
    url = _put(in_store, f"arrays/images.{'idx' if kind == 'idx' else 'npy'}", data)
    plan = shards.plan(url, 128)
    assert [(s.kind, s.start, s.count) for s in plan] == [("range", 0, 128), ("range", 128, 128), ("range", 256, 44)]
    ids, images = [], []
    for shard in plan:
        source = shards.open_shard(url, shard, 50, False)
        assert source.count == shard.count
        for batch_ids, batch in source.batches:
            ids.append(batch_ids)
            images.append(batch)
    assert np.array_equal(np.concatenate(ids), np.arange(300))
    assert np.array_equal(np.concatenate(images), IMAGES)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("gz.idx", gzip.compress(_idx(IMAGES)), "is gzipped: a sharded run reads ranges"),
        ("short.npy", _npy(IMAGES)[:-1], r"is truncated: \d+ bytes, header promises \d+"),
        ("short.idx", _idx(IMAGES)[:-1], r"is truncated: \d+ bytes, header promises \d+"),
        ("long.idx", _idx(IMAGES) + b"x", "holds more than the 300 images its header promises"),
        ("floats.npy", _npy(IMAGES.astype(np.float32)), "expected uint8 pixels, got float32"),
        (
            "shape.npy",
            _npy(IMAGES.reshape(300, 4, 196)),
            r"expected shape \[N, 28, 28\] or \[N, 784\], got \[300, 4, 196\]",
        ),
        ("fortran.npy", _npy(np.asfortranarray(IMAGES)), "Fortran-ordered arrays are not supported"),
        ("objects.npy", _npy(np.array([{"a": 1}] * 3, dtype=object)), "expected uint8 pixels, got object"),
        ("text.npy", b"not a numpy file at all", "is not a readable .npy array"),
        ("labels.idx", b"\0\0\x08\x01" + np.array([3], ">u4").tobytes() + b"abc", "is an IDX label file"),
    ],
    ids=["gzip", "short-npy", "short-idx", "long-idx", "floats", "shape", "fortran", "objects", "text", "labels"],
)
def test_a_bad_array_object_is_one_line_naming_its_url(in_store, name, data, reason):
    url = _put(in_store, f"bad/{name}", data)
    with pytest.raises(PipelineError, match=reason) as caught:
        shards.plan(url, 100)
    assert str(caught.value).startswith(url) and "\n" not in str(caught.value)


def test_a_prefix_of_images_is_sharded_by_name_and_a_bad_object_is_skipped_naming_its_url(in_store, capsys):
    for i in range(3):
        png = io.BytesIO()
        Image.fromarray(IMAGES[i]).save(png, format="PNG")
        _put(in_store, f"mixed/sub/{i}.png", png.getvalue())
    _put(in_store, "mixed/sub/bad.png", b"not a png")
    _put(in_store, "mixed/notes.txt", b"not an image, not listed")
    plan = shards.plan("s3://batch/mixed", 3)
    assert [s.files for s in plan] == [("sub/0.png", "sub/1.png", "sub/2.png"), ("sub/bad.png",)]
    ((ids, images),) = shards.open_shard("s3://batch/mixed", plan[0], 10, False).batches
    assert ids == ["sub/0.png", "sub/1.png", "sub/2.png"] and np.array_equal(images, IMAGES[:3])
    with pytest.raises(PipelineError, match=r"^s3://batch/mixed/sub/bad.png: "):
        list(shards.open_shard("s3://batch/mixed", plan[1], 10, False).batches)
    assert list(shards.open_shard("s3://batch/mixed", plan[1], 10, True).batches) == []
    assert "warning: skipped s3://batch/mixed/sub/bad.png: " in capsys.readouterr().err


def test_inputs_a_sharded_run_cannot_take_are_one_line_each(in_store):
    _put(in_store, "both/a.parquet", (b"x"))
    png = io.BytesIO()
    Image.fromarray(IMAGES[0]).save(png, format="PNG")
    _put(in_store, "both/a.png", png.getvalue())
    _put(in_store, "none/readme.txt", b"nothing to predict")
    cases = {
        "s3://batch/both": "holds both Parquet files and PNG/JPEG images",
        "s3://batch/none": "s3://batch/none: no PNG or JPEG images found",
        "s3://batch/missing/": "s3://batch/missing/ does not exist",
    }
    for url, reason in cases.items():
        with pytest.raises(PipelineError, match=reason):
            shards.plan(url, 100)


def test_a_corrupt_parquet_object_is_a_shard_of_its_own_that_fails_naming_it(in_store):
    _put(in_store, "dsbad/0.parquet", _object(in_store, "ds/0.parquet"))
    _put(in_store, "dsbad/1.parquet", b"PAR1 this is not a footer PAR1")
    plan = shards.plan("s3://batch/dsbad/", 1000)
    assert [(s.start, s.count) for s in plan] == [(0, 100), (100, 0)]
    assert sum(len(ids) for ids, _ in shards.open_shard("s3://batch/dsbad", plan[0], 64, False).batches) == 100
    with pytest.raises(PipelineError, match=r"^s3://batch/dsbad/1.parquet is not a readable Parquet file: "):
        shards.open_shard("s3://batch/dsbad", plan[1], 64, False)
