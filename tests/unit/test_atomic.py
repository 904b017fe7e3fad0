"""Interrupted writes leave neither a partial target nor temporary files behind."""

import numpy as np
import pytest

from softmax_mlops.atomic import atomic_path, write_json


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "weights.npz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        np.savez(tmp, W=np.zeros(3))
        raise RuntimeError("interrupted")
    assert list((tmp_path / "out").iterdir()) == []


def test_success_replaces_target_and_keeps_suffix(tmp_path):
    target = tmp_path / "weights.npz"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz"
        np.savez(tmp, W=np.ones(2))
    assert np.load(target)["W"].tolist() == [1, 1] and [p.name for p in tmp_path.iterdir()] == ["weights.npz"]
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'


def test_npz_files_are_byte_identical_whatever_the_clock(tmp_path, monkeypatch):
    """np.savez stamps each zip member with the current time, so the same arrays gave a new md5 on every run."""
    import time

    import numpy as np

    from softmax_mlops.atomic import write_npz

    arrays = {"W": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, dtype=np.float32)}
    write_npz(tmp_path / "a.npz", **arrays)
    # the next day, by the clock zipfile reads (time.time, through time.localtime): no 2-second sleep to cross the
    # zip format's clock resolution
    tomorrow = time.time() + 86_400
    monkeypatch.setattr(time, "time", lambda: tomorrow)
    write_npz(tmp_path / "b.npz", **arrays)
    monkeypatch.undo()
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as loaded:
        assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in arrays.items())


def test_npz_bytes_do_not_depend_on_the_python_patch_release(tmp_path):
    """The same arrays, the same md5 under Debian's Python 3.11.2 (the images) and 3.11.7 (measured in both):
    members are written with their sizes known, no forced ZIP64, whose version fields changed between them."""
    import hashlib
    import zipfile

    import numpy as np

    from softmax_mlops.atomic import write_npz

    write_npz(tmp_path / "a.npz", W=np.arange(12, dtype=np.float32).reshape(3, 4), b=np.ones(4, dtype=np.float32))
    members = zipfile.ZipFile(tmp_path / "a.npz").infolist()
    assert [(m.create_version, m.extract_version, m.extra) for m in members] == [(20, 20, b"")] * 2
    assert hashlib.md5((tmp_path / "a.npz").read_bytes()).hexdigest() == "b87f290f0815a6da7a8518744c85f4fa"


def test_files_get_the_umask_permissions_not_0600(tmp_path):
    from softmax_mlops.atomic import FILE_MODE, write_text

    write_text(tmp_path / "x.txt", "x")
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == FILE_MODE
