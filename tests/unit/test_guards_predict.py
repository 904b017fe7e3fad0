"""`predict` never writes over its input, and a bad output name or --format is one line: the real CLI, real
files (an .npy of generated pixels, a folder of PNGs), checked byte for byte afterwards."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, cli, one_error_line


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (or ``root`` itself) and its bytes."""
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def npy_input(tmp_path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(12, 28, 28), dtype=np.uint8))
    return path


@pytest.fixture
def png_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i in range(3):
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), "L").save(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), "L").save(folder / "sub" / f"{i}.png")
    return folder


def predict(source: Path, output: Path, model: Path, *options: str) -> subprocess.CompletedProcess:
    return cli("predict", str(source), "-o", str(output), "-m", str(model), *options, cwd=REPO)


def test_the_guarded_cases_work_when_the_output_is_elsewhere(onnx_model, npy_input, png_folder, tmp_path):
    """The control for the refusals below: the same inputs and model predict fine to another path."""
    for source in (npy_input, png_folder):
        out = tmp_path / f"{source.stem}-out.csv"
        result = predict(source, out, onnx_model[0])
        assert result.returncode == 0, result.stderr
        assert len(out.read_text().splitlines()) == 1 + (12 if source == npy_input else 6)


@pytest.mark.parametrize("how", ["same path", "same path spelled differently", "hard link", "symbolic link"])
def test_predict_refuses_to_overwrite_its_input_file(onnx_model, npy_input, how):
    """--format csv is given so that only the overwrite guard can refuse (x.npy is no output suffix)."""
    before = npy_input.read_bytes()
    folder = npy_input.parent
    output = {
        "same path": npy_input,
        "same path spelled differently": folder / "." / ".." / folder.name / npy_input.name,
        "hard link": folder / "link.csv",
        "symbolic link": folder / "symlink.csv",
    }[how]
    if how == "hard link":
        os.link(npy_input, output)
    elif how == "symbolic link":
        output.symlink_to(npy_input)
    links = {p.name for p in folder.iterdir()}
    line = one_error_line(predict(npy_input, output, onnx_model[0], "--format", "csv"))
    assert f"refusing to write {output}: it is the input {npy_input}" in line
    assert npy_input.read_bytes() == before
    assert {p.name for p in folder.iterdir()} == links  # no output, no temporary file left
    if how == "hard link":
        assert output.read_bytes() == before and output.samefile(npy_input)
    if how == "symbolic link":
        assert output.is_symlink() and output.resolve() == npy_input.resolve()


@pytest.mark.parametrize("where", ["preds.csv", "sub/preds.jsonl", "new/deeper/preds.csv"])
def test_predict_refuses_to_write_inside_its_input_folder(onnx_model, png_folder, where):
    before = snapshot(png_folder)
    output = png_folder / where
    line = one_error_line(predict(png_folder, output, onnx_model[0]))
    assert f"refusing to write {output}: it is inside the input folder {png_folder}" in line
    assert snapshot(png_folder) == before
    assert not (png_folder / "new").exists()


def test_an_output_name_without_a_known_suffix_is_one_line(onnx_model, npy_input, tmp_path):
    out = tmp_path / "out.txt"
    line = one_error_line(predict(npy_input, out, onnx_model[0]))
    assert line.endswith("cannot tell the output format from 'out.txt': use .csv, .jsonl or .parquet, or pass --format")
    assert not out.exists()


@pytest.mark.parametrize("value", ["xml", "CSV", ""])
def test_a_bad_format_is_one_line(onnx_model, npy_input, tmp_path, value):
    out = tmp_path / "out.csv"
    line = one_error_line(predict(npy_input, out, onnx_model[0], "--format", value))
    assert line == f"softmax-mlops: error: --format must be csv, jsonl or parquet, not {value!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]
