"""Ingest through torchvision's real download path, on small generated IDX files served from a mirror."""

import gzip

import numpy as np
import pytest

from helpers import REPO, cli, paths_in
from softmax_mlops import config
from softmax_mlops.errors import PipelineError
from softmax_mlops.stages import data


def settings(mirror: str, validation_size: int = 20, seed: int = 0) -> config.IngestConfig:
    return config.IngestConfig(mirror=mirror, validation_size=validation_size, validation_seed=seed)


@pytest.mark.parametrize("as_url", [False, True], ids=["folder", "file-url"])
def test_ingest_round_trips_arrays_from_a_mirror(idx_mirror, tmp_path, as_url):
    folder, splits, resources = idx_mirror
    mirror = folder.as_uri() if as_url else str(folder)
    paths = paths_in(tmp_path)
    ingested = data.ingest(settings(mirror), paths, resources)
    summary = ingested.summary
    val = np.array(summary["val"]["indices"])
    rest = np.setdiff1d(np.arange(60), val)
    expected = {
        "train": (splits["train"][0][rest], splits["train"][1][rest]),
        "val": (splits["train"][0][val], splits["train"][1][val]),
        "test": splits["test"],
    }
    for split, path in (("train", paths.train_data), ("val", paths.val_data), ("test", paths.test_data)):
        images, labels = data.load_split(path)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
    assert summary["train"]["count"] == 40 and summary["val"]["count"] == 20
    assert summary["test"]["per_class"]["t-shirt"] == 2
    assert summary["source_md5"] == dict(resources)
    assert summary["data_md5"] == data.arrays_md5(expected) == ingested.data_md5
    assert ingested.counts == {"train": 40, "val": 20, "test": 20}


def test_the_validation_split_is_stratified_disjoint_and_seeded(idx_mirror, tmp_path):
    """Each class keeps its share (60 images, 6 per class: 20 set aside = 2 per class); the same seed gives
    the same split, another seed another one."""
    folder, splits, resources = idx_mirror
    labels = splits["train"][1]
    summary = data.ingest(settings(str(folder)), paths_in(tmp_path / "a"), resources).summary
    val = summary["val"]["indices"]
    assert val == sorted(set(val)) and len(val) == 20
    assert np.bincount(labels[val], minlength=10).tolist() == [2] * 10
    assert summary["val"]["per_class"] == dict.fromkeys(data.CLASS_NAMES, 2)
    assert summary["train"]["per_class"] == dict.fromkeys(data.CLASS_NAMES, 4)
    again = data.ingest(settings(str(folder)), paths_in(tmp_path / "b"), resources)
    other_seed = data.ingest(settings(str(folder), seed=1), paths_in(tmp_path / "c"), resources)
    assert again.summary["val"]["indices"] == val and other_seed.summary["val"]["indices"] != val


def test_a_validation_split_larger_than_the_data_is_named_and_writes_nothing(idx_mirror, tmp_path):
    folder, _, resources = idx_mirror
    paths = paths_in(tmp_path)
    with pytest.raises(PipelineError, match="ingest.validation_size 60 does not fit 60 training images"):
        data.ingest(settings(str(folder), validation_size=60), paths, resources)
    assert not paths.prepared.exists()


def test_npz_files_hold_no_pickles(idx_mirror, tmp_path):
    folder, _, resources = idx_mirror
    paths = paths_in(tmp_path)
    data.ingest(settings(str(folder)), paths, resources)
    with np.load(paths.train_data, allow_pickle=False) as npz:  # would raise on object arrays
        assert set(npz.files) == {"images", "labels"}


def test_truncated_file_names_file_and_md5_and_writes_nothing(idx_mirror, tmp_path):
    folder, _, resources = idx_mirror
    name, md5 = resources[2]
    (folder / name).write_bytes((folder / name).read_bytes()[:100])
    paths = paths_in(tmp_path)
    with pytest.raises(PipelineError) as err:
        data.ingest(settings(str(folder)), paths, resources)
    message = str(err.value)
    assert name in message and md5 in message and "\n" not in message
    assert not paths.prepared.exists()


def test_without_a_list_of_its_own_ingest_fetches_and_records_torchvisions_upstream_files():
    from torchvision.datasets import FashionMNIST

    assert data.source_files() == list(FashionMNIST.resources) and len(FashionMNIST.resources) == 4
    assert ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d") in data.source_files()
    assert data.source_files((("a.gz", "0" * 32),)) == [("a.gz", "0" * 32)]


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_the_benchmarks_torchvision_dataset_reads_the_mirror(idx_mirror, tmp_path, train):
    """The textbook-style benchmark's dataset: the same download path, each split, with its transform."""
    folder, splits, resources = idx_mirror
    dataset = data.torchvision_dataset(str(folder), tmp_path / "root", train, np.asarray, resources)
    images, labels = splits["train" if train else "test"]
    assert len(dataset) == len(labels)
    image, label = dataset[3]
    assert isinstance(image, np.ndarray) and np.array_equal(image, images[3]) and label == labels[3]


def test_missing_file_is_named(idx_mirror, tmp_path):
    folder, _, resources = idx_mirror
    (folder / resources[1][0]).unlink()
    with pytest.raises(PipelineError, match=f"could not download {resources[1][0]}"):
        data.ingest(settings(str(folder)), paths_in(tmp_path), resources)


def test_missing_mirror_folder(tmp_path):
    with pytest.raises(PipelineError, match="mirror folder .* does not exist"):
        data.fetch(str(tmp_path / "nowhere"))


def test_load_split_rejects_wrong_shapes(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((3, 28, 27), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(PipelineError, match="expected uint8 images"):
        data.load_split(path)
    with pytest.raises(PipelineError, match="run `dvc repro ingest`"):
        data.load_split(tmp_path / "absent.npz")


def test_corrupted_genuine_file_fails_the_cli_in_one_line(tmp_path):
    """The CLI with the real md5 list: a corrupt copy of a genuine file gives one line, exit 1, no outputs."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, _ in (("train-images-idx3-ubyte.gz", 0),):
        (mirror / name).write_bytes(gzip.compress(b"not the real file"))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = cli("ingest", cwd=tmp_path, env={config.MIRROR_ENV: str(mirror)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("softmax-mlops: error:")]
    assert len(error_lines) == 1
    assert "train-images-idx3-ubyte.gz" in error_lines[0] and "8d4fb7e6c68d591d4c3dfef9ec88bf0d" in error_lines[0]
    assert not (tmp_path / "data").exists()
