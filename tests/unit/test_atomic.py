"""Interrupted writes leave neither a partial target nor temporary files behind."""

import numpy as np
import pytest

from softmax_mlops.atomic import atomic_path, write_json


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "weights.npz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
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
