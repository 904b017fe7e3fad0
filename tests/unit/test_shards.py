"""Sharded batch inference without an engine (softmax_mlops.serving.shards): the shards of every input kind
together are the input, shard by shard predictions and drift equal one process's, a rerun redoes only what did
not finish, and a folder of another run is refused. The Dask and Prefect half runs in
tests/integration/test_sharded.py."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import idx_bytes, model_copy
from softmax_mlops.config import DriftConfig
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import drift, predict, shards
from softmax_mlops.serving.inference import Predictor
from softmax_mlops.serving.inputs import array_count, open_range, open_source

RNG = np.random.default_rng(3)
IMAGES = RNG.integers(0, 256, (53, 28, 28), dtype=np.uint8)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _input(kind: str, folder):
    """The 53 images as an input of this kind."""
    if kind == "npy":
        np.save(folder / "x.npy", IMAGES)
        return folder / "x.npy"
    if kind == "idx":
        (folder / "x-idx3-ubyte").write_bytes(idx_bytes(IMAGES))
        return folder / "x-idx3-ubyte"
    if kind == "idx.gz":
        (folder / "x-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(IMAGES)))
        return folder / "x-idx3-ubyte.gz"
    if kind == "folder":
        (folder / "in" / "sub").mkdir(parents=True)
        for i, image in enumerate(IMAGES):
            (folder / "in" / ("sub" if i % 2 else "") / f"{i:03d}.png").write_bytes(_png(image))
        return folder / "in"
    (folder / "in").mkdir()  # a Parquet dataset: 3 files, row groups of 7 rows, raw pixels
    rows = [bytes(image.tobytes()) for image in IMAGES]
    for f, (lo, hi) in enumerate(((0, 20), (20, 21), (21, 53))):
        table = pa.table({"image": pa.array(rows[lo:hi], pa.binary())})
        pq.write_table(table, folder / "in" / f"part-{f}.parquet", row_group_size=7)
    return folder / "in"


KINDS = ["npy", "idx", "idx.gz", "folder", "parquet"]


def _read(source) -> tuple[list, np.ndarray]:
    ids, images = [], []
    for batch_ids, batch in source.batches:
        ids += list(batch_ids.tolist() if isinstance(batch_ids, np.ndarray) else batch_ids)
        images.append(batch)
    return ids, np.concatenate(images) if images else np.zeros((0, 28, 28), np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_the_shards_together_are_the_input(tmp_path, kind):
    path = _input(kind, tmp_path)
    plan = shards.plan(path, 10)
    assert len(plan) > 3
    assert [s.index for s in plan] == list(range(len(plan)))
    whole_ids, whole = _read(open_source(path, 8) if kind != "parquet" else predict._open_input(path, 8, False))
    ids, images = [], []
    for shard in plan:
        source = shards.open_shard(path, shard, 4, False)
        assert source.count == shard.count  # what the progress bar is told, before any image is read
        shard_ids, shard_images = _read(source)
        assert len(shard_ids) == shard.count
        ids += shard_ids
        images.append(shard_images)
    assert ids == whole_ids
    np.testing.assert_array_equal(np.concatenate(images), whole)
    assert sum(s.count for s in plan) == len(IMAGES)


def test_a_range_of_a_gzipped_file_cut_short_before_it_names_the_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    raw = idx_bytes(IMAGES)  # a whole gzip stream, whose header promises 53 images and holds 18
    path.write_bytes(gzip.compress(raw[: len(raw) - 35 * 28 * 28]))
    source = open_range(path, 20, 30, 8)  # skipping 8, 8, then 4 of which only 2 are there
    assert source.count == 10
    with pytest.raises(PipelineError, match=rf"^{path} is truncated: it ends before image 20 of 53$"):
        _read(source)


def test_a_gzipped_file_named_npy_is_read_as_npy_and_refused(tmp_path):
    path = tmp_path / "x.npy"
    path.write_bytes(gzip.compress(idx_bytes(IMAGES)))  # gzipped IDX bytes: not what a .npy holds
    with pytest.raises(PipelineError, match=rf"^{path} is not a readable \.npy array"):
        open_range(path, 0, 10, 8)
    with pytest.raises(PipelineError, match=rf"^{path} is not a readable \.npy array"):
        shards.plan(path, 10)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (gzip.compress(b"\0\0\x08\x01" + (3).to_bytes(4, "big") + b"abc"), "is an IDX label file, not images"),
        (b"\x1f\x8b" + b"garbage" * 10, "is not a readable gzip file: "),
    ],
    ids=["label-file", "not-gzip"],
)
def test_counting_a_bad_gzipped_file_is_one_error_naming_it(tmp_path, content, message):
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=rf"^{path} {message}"):
        array_count(path)


def test_a_parquet_row_group_is_never_split(tmp_path):
    plan = shards.plan(_input("parquet", tmp_path), 10)
    # files of 20, 1 and 32 rows in groups of 7: 7+... never more than 10 unless one group is alone
    assert all(s.count <= 10 or len(s.groups) == 1 for s in plan)
    assert [s.start for s in plan] == list(np.cumsum([0] + [s.count for s in plan])[:-1])


def test_an_unreadable_parquet_file_is_a_shard_of_its_own_that_fails_naming_it(tmp_path):
    path = _input("parquet", tmp_path)
    (path / "part-1.parquet").write_bytes(b"PAR1 not really")
    plan = shards.plan(path, 10)
    bad = [s for s in plan if s.count == 0]
    assert len(bad) == 1 and bad[0].groups[0][0].endswith("part-1.parquet")
    with pytest.raises(PipelineError, match=r"part-1\.parquet is not a readable Parquet file"):
        shards.open_shard(path, bad[0], 4, False)
    good = [s for s in plan if s.count]
    assert sum(s.count for s in good) == 52  # every other row


def _model_with_reference(onnx_model, folder):
    model = model_copy(onnx_model, folder)
    reference = RNG.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), Predictor(model).run(reference)[1], reference)
    return model


DRIFT = DriftConfig(alpha=0.05, min_images=10, max_images=17)


def _sharded(path, output, predictor, shard_size=10, **settings):
    job, reference = shards.new_job(path, output, predictor, str(predictor.path), 8, 3, drift_cfg=DRIFT, **settings)
    plan = shards.plan(path, shard_size)
    shards.start(job, plan)
    parts = [shards.predict_shard(job, shard, predictor) for shard in plan]
    return job, plan, parts, shards.finish(job, plan, reference, DRIFT)


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_sharded_predictions_and_drift_equal_one_process(tmp_path, onnx_model, kind):
    path = _input(kind, tmp_path)
    predictor = Predictor(_model_with_reference(onnx_model, tmp_path / "model"))
    single = predict.run(path, tmp_path / "one.parquet", predictor, 8, 3, progress=False, drift_cfg=DRIFT)
    _, plan, parts, manifest = _sharded(path, tmp_path / "many.parquet", predictor)
    merged = pq.read_table(tmp_path / "many.parquet").sort_by("id")
    assert merged.equals(pq.read_table(tmp_path / "one.parquet").sort_by("id"))
    # the sample (17 of 53) is the same one: merged collectors give the single process's report, exactly
    assert json.loads((tmp_path / "many.drift.json").read_text()) == single.drift
    assert manifest["images"] == len(IMAGES) == sum(p.rows for p in parts)
    assert [p["part"] for p in manifest["parts"]] == [f"part-{i:05d}.parquet" for i in range(len(plan))]
    assert manifest["model_md5"] == predictor.provenance()["model_md5"]


def test_a_rerun_predicts_only_the_shards_that_did_not_finish(tmp_path, onnx_model):
    path = _input("npy", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    job, plan, _, _ = _sharded(path, tmp_path / "out", predictor)
    (tmp_path / "out" / "_manifest.json").unlink()
    Path(job.folder[job.marker(plan[2])]).unlink()  # shard 2 "died" after writing its part
    finished_part = Path(job.folder[job.part(plan[0])])
    finished_part.write_bytes(b"left alone")  # a finished shard is never predicted again
    done = shards.start(job, plan)
    assert sorted(p.shard for p in done) == [i for i in range(len(plan)) if i != 2]
    part = shards.predict_shard(job, plan[0], predictor)
    assert finished_part.read_bytes() == b"left alone" and part.rows == plan[0].count
    assert shards.predict_shard(job, plan[2], predictor).rows == plan[2].count
    assert pq.read_table(Path(job.folder[job.part(plan[2])])).num_rows == plan[2].count


def test_finish_refuses_a_run_with_a_shard_missing(tmp_path, onnx_model):
    path = _input("npy", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    job, plan, _, _ = _sharded(path, tmp_path / "out", predictor)
    (tmp_path / "out" / "_manifest.json").unlink()
    Path(job.folder[job.marker(plan[1])]).unlink()
    with pytest.raises(PipelineError, match="shard 1 did not finish"):
        shards.finish(job, plan, None, None)
    assert not (tmp_path / "out" / "_manifest.json").exists()


def test_a_folder_of_another_run_or_of_something_else_is_refused(tmp_path, onnx_model):
    path = _input("npy", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    _sharded(path, tmp_path / "out", predictor)
    with pytest.raises(PipelineError, match="holds the parts of another run"):
        _sharded(path, tmp_path / "out", predictor, shard_size=11)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="is not empty and holds no sharded run"):
        _sharded(path, tmp_path / "other", predictor)
    (tmp_path / "file.parquet").write_text("x")
    with pytest.raises(PipelineError, match="is not a folder"):
        _sharded(path, tmp_path / "file.parquet", predictor)


@pytest.mark.parametrize(
    "damage", [b"{not json", b"\xff\xfe\x00binary", b'{"shard": 0}'], ids=["text", "binary", "fields"]
)
def test_a_damaged_run_file_or_part_marker_is_one_error_naming_it(tmp_path, onnx_model, damage):
    path = _input("npy", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    job, plan, _, _ = _sharded(path, tmp_path / "out", predictor)
    marker = Path(job.folder[job.marker(plan[1])])
    marker.write_bytes(damage)
    with pytest.raises(PipelineError, match=f"^{marker} is not a readable part marker: "):
        shards.start(job, plan)
    run_file = tmp_path / "out" / shards.RUN_FILE
    run_file.write_bytes(damage)
    expected = f"^{run_file} is not readable: " if damage != b'{"shard": 0}' else "holds the parts of another run"
    with pytest.raises(PipelineError, match=expected):
        shards.start(job, plan)


def test_an_output_inside_the_input_folder_is_refused(tmp_path, onnx_model):
    path = _input("folder", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    with pytest.raises(PipelineError, match="inside the input folder"):
        _sharded(path, path / "out", predictor)


def test_a_shard_refuses_another_model(tmp_path, onnx_model):
    path = _input("npy", tmp_path)
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model"))
    job, _ = shards.new_job(path, tmp_path / "out", predictor, "m", 8, 3)
    plan = shards.plan(path, 10)
    shards.start(job, plan)
    started_with = dataclasses.replace(job, model_md5="0" * 32)  # the run began with another model
    with pytest.raises(PipelineError, match=r"is not the model this run started with \(md5 0{32}\)"):
        shards.predict_shard(started_with, plan[0], predictor)
    assert not Path(job.folder[job.part(plan[0])]).exists()


def test_a_collector_saved_and_loaded_merges_as_the_original(tmp_path):
    probabilities = RNG.dirichlet(np.ones(10), 500).astype(np.float32)
    images = RNG.integers(0, 256, (500, 28, 28), dtype=np.uint8)
    whole = drift.Collector(40)
    whole.add(images, probabilities)
    merged = drift.Collector(40)
    for start in range(0, 500, 90):
        part = drift.Collector(40)
        part.add(images[start : start + 90], probabilities[start : start + 90], start=start)
        part.save(tmp_path / f"{start}.npz")
        merged.merge(drift.Collector.load(tmp_path / f"{start}.npz"))
    assert merged.seen == whole.seen == 500
    np.testing.assert_array_equal(merged.counts, whole.counts)
    for a, b in zip(merged.sample(), whole.sample(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_empty_collector_and_one_of_another_seed_survive_the_round_trip(tmp_path):
    probabilities = RNG.dirichlet(np.ones(10), 60).astype(np.float32)
    images = RNG.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    drift.Collector(20, seed=5).save(tmp_path / "empty.npz")  # a shard whose images were all skipped
    full = drift.Collector(20, seed=5)
    full.add(images, probabilities)
    full.save(tmp_path / "full.npz")
    empty, loaded = drift.Collector.load(tmp_path / "empty.npz"), drift.Collector.load(tmp_path / "full.npz")
    assert (empty.seed, empty.capacity, empty.seen, empty.counts) == (5, 20, 0, None)
    merged = drift.Collector(20, seed=5)
    merged.merge(empty)
    merged.merge(loaded)
    assert (loaded.seed, merged.seen) == (5, 60)
    np.testing.assert_array_equal(merged.counts, full.counts)
    for a, b in zip(merged.sample(), full.sample(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not-an-archive", "This file contains pickled (object) data."),  # np.load takes it for a pickle: refused
        ("lone-array", "'numpy.ndarray' object does not support the context manager protocol"),
        ("missing-key", "'counts is not a file in the archive'"),
        ("long-sample", "its sample's columns differ in length, or exceed its capacity"),
        ("float-keys", "Cannot cast array data from dtype('float64') to dtype('uint64')"),
    ],
    ids=["not-an-archive", "lone-array", "missing-key", "long-sample", "float-keys"],
)
def test_a_foreign_collector_file_is_one_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "c.npz"
    if content == "lone-array":
        np.save(tmp_path / "c.npy", np.zeros(3))
        path = tmp_path / "c.npy"
    elif content == "missing-key":
        np.savez(path, header=np.array([10, 0, 5]))
    elif content in ("long-sample", "float-keys"):
        np.savez(
            path,
            header=np.array([2 if content == "long-sample" else 10, 0, 5]),
            counts=np.ones(10, np.int64),
            keys=np.arange(3, dtype=np.uint64 if content == "long-sample" else np.float64),
            probabilities=np.zeros((3, 10), np.float32),
            intensities=np.zeros(3, np.float32),
        )
    else:
        path.write_bytes(b"not an archive")
    with pytest.raises(PipelineError, match=rf"^{path} is not a saved drift collector: ") as refused:
        drift.Collector.load(path)
    assert f"is not a saved drift collector: {reason}" in str(refused.value)
