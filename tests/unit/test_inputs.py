"""Batch-inference readers: every supported input, and a clear error naming the file for each bad one."""

import gzip

import numpy as np
import pytest
from PIL import Image

from helpers import idx_bytes
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving.inputs import open_source


def collect(source):
    ids, images = [], []
    for batch_ids, batch in source.batches:
        ids.extend(list(batch_ids))
        images.append(batch)
    return ids, np.concatenate(images)


@pytest.fixture
def pixels():
    return np.random.default_rng(0).integers(0, 256, size=(23, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("kind", ["idx", "idx.gz", "npy", "npy-flat"])
def test_arrays_round_trip_in_batches(tmp_path, pixels, kind):
    path = tmp_path / f"images.{kind.split('-')[0]}"
    if kind == "idx":
        path.write_bytes(idx_bytes(pixels))
    elif kind == "idx.gz":
        path.write_bytes(gzip.compress(idx_bytes(pixels)))
    else:
        np.save(path, pixels.reshape(23, 784) if kind == "npy-flat" else pixels)
    source = open_source(path, batch_size=5)
    ids, images = collect(source)
    assert source.count == 23 and [int(i) for i in ids] == list(range(23))
    np.testing.assert_array_equal(images, pixels)


def test_npy_and_raw_idx_stream_from_a_memory_map(tmp_path, pixels, monkeypatch):
    """Arrays go through the memory-mapped batch reader, never a whole-file load (its peak memory on a
    larger-than-batch file is measured in benchmarks/inference_speed.py)."""
    from softmax_mlops.serving import inputs

    calls = []
    real = inputs._mapped_batches
    monkeypatch.setattr(inputs, "_mapped_batches", lambda *a: calls.append(a[1:]) or real(*a))
    np.save(tmp_path / "a.npy", pixels)
    (tmp_path / "a.idx").write_bytes(idx_bytes(pixels))
    for name in ("a.npy", "a.idx"):
        _, images = collect(open_source(tmp_path / name, batch_size=5))
        np.testing.assert_array_equal(images, pixels)
    assert [(count, batch) for _, count, batch in calls] == [(23, 5), (23, 5)]


def test_image_folder_is_converted_to_28x28_grayscale(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 40), (255, 255, 255)).save(folder / "white.png")
    Image.new("L", (28, 28), 0).save(folder / "sub" / "black.jpg")
    (folder / "notes.txt").write_text("ignored")
    ids, images = collect(open_source(folder, batch_size=1))
    assert ids == ["sub/black.jpg", "white.png"] and images.shape == (2, 28, 28)
    assert images[0].max() < 5 and images[1].min() == 255


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: np.save(p / "x.npy", np.zeros((2, 28, 28), np.float32)), "expected uint8 pixels, got float32"),
        (lambda p: np.save(p / "x.npy", np.zeros((2, 27, 28), np.uint8)), "expected shape [N, 28, 28] or [N, 784]"),
        (lambda p: (p / "x.npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy array"),
        (lambda p: (p / "x.idx").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10]), "is truncated"),
        (
            lambda p: (p / "x.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10])),
            "is truncated",
        ),
        (lambda p: (p / "x.idx").write_bytes(idx_bytes(np.zeros(5, np.uint8))), "IDX label file, not images"),
        (lambda p: (p / "x.idx").write_bytes(b"PK\x03\x04 a zip"), "not an IDX file"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, make, message):
    make(tmp_path)
    (path,) = tmp_path.iterdir()
    with pytest.raises(PipelineError) as err:
        collect(open_source(path, batch_size=2))
    assert message in str(err.value) and path.name in str(err.value)


def test_bad_image_fails_or_is_skipped_as_asked(tmp_path, capsys):
    Image.new("L", (28, 28), 9).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(PipelineError, match="bad.png: not a readable PNG or JPEG image"):
        collect(open_source(tmp_path, batch_size=4))
    ids, _ = collect(open_source(tmp_path, batch_size=4, skip_bad=True))
    assert ids == ["good.png"] and "skipped" in capsys.readouterr().err


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(PipelineError, match="no PNG or JPEG images"):
        open_source(tmp_path, batch_size=4)
    with pytest.raises(PipelineError, match="does not exist"):
        open_source(tmp_path / "absent.npy", batch_size=4)
