"""A drift reference that is corrupt, foreign or booby-trapped, beside a good model: `predict` (the real CLI)
exits 1 with one line naming the file, writes no output, and never unpickles anything."""

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, Trap, cli, one_error_line
from softmax_mlops.serving import drift


def good_reference(path: Path, n: int = 300) -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=n).astype(np.float32)
    drift.save_reference(path, probabilities, rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))


def zlib_fails(packed: bytes, at: int) -> bool:
    """Whether flipping three bytes at ``at`` makes zlib itself fail while reading the archive's members."""
    damaged = packed[:at] + bytes(b ^ 0xFF for b in packed[at : at + 3]) + packed[at + 3 :]
    try:
        with zipfile.ZipFile(io.BytesIO(damaged)) as archive:
            for name in archive.namelist():
                archive.read(name)
    except zlib.error:
        return True
    except Exception:  # noqa: BLE001 - any other failure (a bad CRC, a broken header) is not the case wanted
        return False
    return False


def write_reference(path: Path, kind: str, marker: Path) -> None:
    good = path.with_name("good.npz")
    good_reference(good)
    data = good.read_bytes()
    good.unlink()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupted inside":  # stored members: the zip's CRC no longer matches
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :])
    elif kind == "corrupted compressed stream":  # np.savez_compressed: zlib fails before the CRC is checked
        rng = np.random.default_rng(0)
        np.savez_compressed(path, probabilities=rng.random((3000, 10)), intensity=rng.random(3000))
        packed = path.read_bytes()
        at = next(i for i in range(100, len(packed), 37) if zlib_fails(packed, i))
        path.write_bytes(packed[:at] + bytes(b ^ 0xFF for b in packed[at : at + 3]) + packed[at + 3 :])
    elif kind == "other keys":
        np.savez(path, weights=np.zeros((3, 3), np.float32), labels=np.arange(3))
    elif kind == "pickled object arrays":
        trap = np.array([Trap(marker)], dtype=object)
        np.savez(path, probabilities=trap, intensity=trap)
    elif kind == "a pickle":
        np.save(path.with_suffix(".npy"), np.array([Trap(marker)], dtype=object), allow_pickle=True)
        path.with_suffix(".npy").rename(path)
    elif kind == "a lone .npy array":
        np.save(path.with_suffix(".npy"), np.zeros((300, 10), np.float32))
        path.with_suffix(".npy").rename(path)
    elif kind == "text":
        path.write_text("probabilities,intensity\n0.1,0.5\n")
    elif kind == "wrong shapes":
        np.savez(path, probabilities=np.full(300, 0.1, np.float32), intensity=np.zeros((300, 2), np.float32))
    elif kind == "three classes":
        np.savez(path, probabilities=np.full((300, 3), 1 / 3, np.float32), intensity=np.zeros(300, np.float32))
    else:
        raise AssertionError(kind)


@pytest.fixture
def model_folder(onnx_model, tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_model[0].read_bytes())
    return folder


@pytest.fixture
def pixels(tmp_path) -> Path:
    """More images than drift.min_images, so that a reference that loaded would be tested against."""
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).integers(0, 256, size=(250, 28, 28), dtype=np.uint8))
    return path


def test_a_good_reference_gives_a_drift_report(model_folder, pixels, tmp_path):
    """The control for the refusals below: the same model folder with a genuine reference works."""
    good_reference(model_folder / drift.REFERENCE_FILE)
    out = tmp_path / "out.csv"
    result = cli("predict", str(pixels), "-o", str(out), "-m", str(model_folder), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert out.exists() and (tmp_path / "out.drift.json").exists() and "drift:" in result.stdout


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "empty",
        "corrupted inside",
        "corrupted compressed stream",
        "other keys",
        "pickled object arrays",
        "a pickle",
        "a lone .npy array",
        "text",
        "wrong shapes",
        "three classes",
    ],
)
def test_predict_refuses_a_bad_drift_reference_in_one_line(model_folder, pixels, tmp_path, kind):
    reference = model_folder / drift.REFERENCE_FILE
    marker = tmp_path / "unpickled"
    write_reference(reference, kind, marker)
    before = reference.read_bytes()
    out = tmp_path / "out.csv"
    line = one_error_line(cli("predict", str(pixels), "-o", str(out), "-m", str(model_folder), cwd=REPO))
    assert f"{reference} is not a drift reference" in line
    assert not marker.exists(), "the reference was unpickled"
    assert not out.exists() and not (tmp_path / "out.drift.json").exists()
    assert reference.read_bytes() == before


def test_the_trap_does_fire_when_unpickled(tmp_path):
    """The pickle cases above prove something only if unpickling their payload really leaves the marker."""
    path, marker = tmp_path / "trap.npz", tmp_path / "unpickled"
    write_reference(path, "pickled object arrays", marker)
    with np.load(path, allow_pickle=True) as npz:
        npz["probabilities"]
    assert marker.exists()
