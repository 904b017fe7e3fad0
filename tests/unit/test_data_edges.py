"""The data module in process, at its edges: mirror URLs, file:// downloads' lengths, the exact one-line
reasons a download fails with, the temporary download folder, the content hash, the summary's counts, and a
prepared split that holds pickles. Small generated IDX files served from a local mirror, as in test_data.py;
never the real data, never the network."""

import hashlib
import json
import re
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import Trap, paths_in
from softmax_mlops import config
from softmax_mlops.errors import PipelineError
from softmax_mlops.stages import data


def fetch_error(mirror: str, resources) -> str:
    with pytest.raises(PipelineError) as err:
        data.fetch(mirror, resources)
    return str(err.value)


# --- mirrors and file:// downloads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mirror, url",
    [
        ("https://example.org/fashion-mnist", "https://example.org/fashion-mnist/"),
        ("https://example.org/fashion-mnist/", "https://example.org/fashion-mnist/"),
        ("file:///srv/mirror/", "file:///srv/mirror/"),
    ],
)
def test_a_mirror_url_ends_in_exactly_one_slash(mirror, url):
    assert data.mirror_url(mirror) == url


def test_a_mirror_folder_becomes_a_file_url(tmp_path):
    assert data.mirror_url(str(tmp_path)) == tmp_path.resolve().as_uri() + "/"


def test_file_urls_report_their_length_to_torchvision(tmp_path):
    """torchvision's progress bar reads ``response.length``: the size for a file, None for an empty one."""
    full, empty = tmp_path / "a.gz", tmp_path / "empty.gz"
    full.write_bytes(b"x" * 1234)
    empty.write_bytes(b"")
    with data._file_urls_supported():
        with urllib.request.urlopen(full.as_uri()) as response:
            assert response.length == 1234 and response.read() == b"x" * 1234
        with urllib.request.urlopen(empty.as_uri()) as response:
            assert response.length is None


# --- why a download failed, in one line ---------------------------------------------------------------------------


def test_a_missing_file_quotes_the_last_line_of_torchvisions_error(idx_mirror):
    folder, _, resources = idx_mirror
    name, md5 = resources[1]
    (folder / name).unlink()
    assert fetch_error(str(folder), resources) == (
        f"could not download {name} from {folder.as_uri()}/ (expected md5 {md5}): "
        f"<urlopen error [Errno 2] No such file or directory: '{folder / name}'>"
    )


def test_the_reason_is_the_last_line_of_the_error_or_its_type(tmp_path):
    resources = [("train-images-idx3-ubyte.gz", "0" * 32)]
    multi = RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried file:///m/, got:\nboom\n")
    assert data._diagnose(tmp_path, resources, "file:///m/", multi) == (
        f"could not download train-images-idx3-ubyte.gz from file:///m/ (expected md5 {'0' * 32}): boom"
    )
    assert data._diagnose(tmp_path, resources, "file:///m/", ConnectionResetError()) == (
        f"could not download train-images-idx3-ubyte.gz from file:///m/ (expected md5 {'0' * 32}): ConnectionResetError"
    )


def test_files_that_all_check_out_blame_the_reading_in_one_line(tmp_path):
    (tmp_path / "a.gz").write_bytes(b"fine")
    resources = [("a.gz", hashlib.md5(b"fine").hexdigest())]
    error = ValueError("header\nis broken")
    assert data._diagnose(tmp_path, resources, "file:///m/", error) == (
        "Fashion-MNIST could not be read: header is broken"
    )


def test_a_file_with_the_right_md5_that_is_not_idx_is_one_line(idx_mirror):
    """Custom resources whose md5 matches a broken file: every download checks out, decoding fails."""
    import gzip

    folder, _, resources = idx_mirror
    broken = gzip.compress(b"\0\0\x08\x03\0\0\0\x05", mtime=0)  # an IDX header cut short
    (folder / resources[0][0]).write_bytes(broken)
    resources = [(resources[0][0], hashlib.md5(broken).hexdigest()), *resources[1:]]
    message = fetch_error(str(folder), resources)
    assert message.startswith("Fashion-MNIST could not be read: ") and "\n" not in message


def test_downloads_go_to_a_fresh_temporary_folder_that_is_removed():
    """With nothing to download (no resources, so no network even from the default mirror), reading fails
    naming the file it looked for: in a new ``fashion-mnist-*`` folder of the temporary directory, which is
    gone once fetch returns."""
    with pytest.raises(PipelineError) as err:
        data.fetch(resources=[])  # the default mirror: torchvision's own
    message = str(err.value)
    match = re.fullmatch(
        r"Fashion-MNIST could not be read: \[Errno 2\] No such file or directory: "
        r"'(.+)/FashionMNIST/raw/train-images-idx3-ubyte'",
        message,
    )
    assert match, message
    folder = Path(match[1])
    assert folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith("fashion-mnist-")
    assert not folder.exists()


# --- what ingest records ------------------------------------------------------------------------------------------


def test_arrays_md5_hashes_each_splits_bytes_in_name_order():
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8), np.arange(4, dtype=np.int64)),
        "test": (rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.arange(2, dtype=np.int64)),
    }
    expected = hashlib.md5()
    for split in ("test", "train"):
        for array in splits[split]:
            expected.update(array.tobytes())
    assert data.arrays_md5(splits) == expected.hexdigest()
    changed = {**splits, "test": (splits["test"][0], np.array([0, 2], np.int64))}
    assert data.arrays_md5(changed) != expected.hexdigest()


def summary_splits(test_labels: np.ndarray) -> dict:
    images = np.zeros((len(test_labels), 28, 28), np.uint8)
    labels = np.arange(20, dtype=np.int64) % 10
    return {
        "train": (np.zeros((20, 28, 28), np.uint8), labels),
        "val": (np.zeros((20, 28, 28), np.uint8), labels),
        "test": (images, test_labels),
    }


def test_a_class_missing_from_a_split_counts_zero():
    summary = data.summarize(summary_splits(np.array([0, 1, 1, 2])), [("f.gz", "0" * 32)], np.arange(3), seed=4)
    assert summary["test"] == {
        "count": 4,
        "per_class": {**dict.fromkeys(data.CLASS_NAMES, 0), "t-shirt": 1, "trouser": 2, "pullover": 1},
    }
    assert summary["val"]["seed"] == 4 and summary["val"]["indices"] == [0, 1, 2]
    assert summary["source_md5"] == {"f.gz": "0" * 32}


def test_a_label_outside_the_ten_classes_is_not_dropped_from_the_counts():
    with pytest.raises(ValueError, match=r"zip\(\) argument 2 is longer than argument 1"):
        data.summarize(summary_splits(np.array([0, 10])), [], np.arange(3), seed=0)


def test_ingest_writes_the_summary_it_returns(idx_mirror, tmp_path):
    folder, _, resources = idx_mirror
    paths = paths_in(tmp_path)
    settings = config.IngestConfig(mirror=str(folder), validation_size=20, validation_seed=3)
    summary = data.ingest(settings, paths, resources).summary
    assert json.loads(paths.data_summary.read_text()) == summary
    assert summary["val"]["seed"] == 3 and len(summary["val"]["indices"]) == 20


# --- a prepared split ---------------------------------------------------------------------------------------------


def test_a_split_holding_pickles_is_refused_without_unpickling(tmp_path):
    path, marker = tmp_path / "train.npz", tmp_path / "unpickled"
    trap = np.array([Trap(marker)], dtype=object)
    np.savez(path, images=trap, labels=trap)
    with pytest.raises(PipelineError) as err:
        data.load_split(path)
    assert str(err.value) == (
        f"{path} is not a prepared split (images, labels): Object arrays cannot be loaded when allow_pickle=False"
    )
    assert not marker.exists(), "the split was unpickled"


def newer_zip_version(raw: bytes) -> bytes:
    """The archive with its last member's "version needed to extract" set to 25.5, which zipfile cannot read."""
    directory = raw.rfind(b"PK\x01\x02")
    return raw[: directory + 6] + bytes([255, 0]) + raw[directory + 8 :]


@pytest.mark.parametrize(
    "damage",
    ["empty", "cut in half", "central directory garbled", "needs a newer zip version"],
)
def test_a_damaged_prepared_split_is_one_line(tmp_path, damage):
    """What a full disk or an interrupted copy leaves of a prepared split: each one line naming the file,
    never zipfile's or numpy's traceback."""
    path = tmp_path / "train.npz"
    np.savez(path, images=np.zeros((3, 28, 28), np.uint8), labels=np.arange(3))
    raw = path.read_bytes()
    if damage == "empty":
        raw = b""
    elif damage == "cut in half":
        raw = raw[: len(raw) // 2]
    elif damage == "needs a newer zip version":  # zipfile raises NotImplementedError for it
        raw = newer_zip_version(raw)
    else:
        directory = raw.rfind(b"PK\x01\x02")
        raw = raw[:directory] + bytes(b ^ 0xA5 for b in raw[directory : directory + 46]) + raw[directory + 46 :]
    path.write_bytes(raw)
    with pytest.raises(PipelineError) as caught:
        data.load_split(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a prepared split (images, labels): ") and "\n" not in message
