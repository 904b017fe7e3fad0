"""predict.run at its edges, in the test process: the options a caller passes (format, skip_bad, progress,
drift_cfg) and what each changes in the files written and on stderr, the drift reference's refusals with their
exact messages, class names that need CSV quoting or are not ASCII, and the CSV text's own guard."""

import csv
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import ascii_locale, model_copy
from softmax_mlops.config import DriftConfig
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import drift, predict
from softmax_mlops.serving.inference import Predictor

PIXELS = np.random.default_rng(7).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
DRIFT = DriftConfig(alpha=0.01, min_images=5, max_images=100)


@pytest.fixture
def npy(tmp_path) -> Path:
    np.save(tmp_path / "x.npy", PIXELS)
    return tmp_path / "x.npy"


@pytest.fixture
def plain_model(onnx_model, tmp_path) -> Predictor:
    return Predictor(model_copy(onnx_model, tmp_path / "model"), threads=1)


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def expected_csv_rows(predictor: Predictor, pixels: np.ndarray, k: int) -> list[list[str]]:
    """The rows as the csv module reads them back: id, class id and name, probability, the top-k list."""
    names = predictor.class_names
    top_ids, top_probs = predictor.top_k_of(predictor.run(pixels)[1], k)
    rows = []
    for i, (ids, ps) in enumerate(zip(top_ids.tolist(), top_probs.tolist(), strict=True)):
        top_k = ";".join(f"{names[c]}:{p:.6f}" for c, p in zip(ids, ps, strict=True))
        rows.append([str(i), str(ids[0]), names[ids[0]], f"{ps[0]:.6f}", top_k])
    return rows


# --- options -------------------------------------------------------------------------------------------------------


def test_the_requested_format_wins_over_the_suffix(npy, tmp_path, plain_model):
    as_csv = tmp_path / "preds.txt"
    predict.run(npy, as_csv, plain_model, batch_size=4, top_k=1, fmt="csv", progress=False)
    assert as_csv.read_text().splitlines()[0] == "id,class_id,class_name,probability,top_k"
    as_jsonl = tmp_path / "preds.csv"
    predict.run(npy, as_jsonl, plain_model, batch_size=4, top_k=1, fmt="jsonl", progress=False)
    assert [json.loads(line)["id"] for line in as_jsonl.read_text().splitlines()] == list(range(9))


@pytest.fixture
def folder_with_a_bad_image(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, pixels in (("a.png", PIXELS[0]), ("c.png", PIXELS[1])):
        Image.fromarray(pixels, "L").save(folder / name)
    (folder / "b.png").write_bytes(b"not an image at all")
    return folder


def test_a_bad_image_fails_the_run_by_default(folder_with_a_bad_image, tmp_path, plain_model):
    out = tmp_path / "out.csv"
    message = refusal(predict.run, folder_with_a_bad_image, out, plain_model, batch_size=8, top_k=1, progress=False)
    assert message.startswith(f"{folder_with_a_bad_image / 'b.png'}: not a readable PNG or JPEG image (")
    assert not out.exists()


def test_skip_bad_skips_a_bad_image_with_a_warning(folder_with_a_bad_image, tmp_path, plain_model, capsys):
    out = tmp_path / "out.csv"
    result = predict.run(
        folder_with_a_bad_image, out, plain_model, batch_size=8, top_k=1, skip_bad=True, progress=False
    )
    assert result == predict.Result(images=2, drift=None)
    assert [row["id"] for row in csv.DictReader(out.open(encoding="utf-8"))] == ["a.png", "c.png"]
    bad = folder_with_a_bad_image / "b.png"
    assert capsys.readouterr().err.startswith(f"softmax-mlops: warning: skipped {bad}: not a readable PNG or JPEG")


def test_a_progress_bar_counts_the_images_on_stderr_by_default(npy, tmp_path, plain_model, capsys):
    predict.run(npy, tmp_path / "out.csv", plain_model, batch_size=4, top_k=1)
    final = capsys.readouterr().err.split("\r")[-1]
    assert re.fullmatch(r"predict: 100%\|[^|]*\| 9\.00/9\.00 \[[^\]]*img/s\]\n", final), final


def test_no_progress_bar_when_turned_off(npy, tmp_path, plain_model, capsys):
    predict.run(npy, tmp_path / "out.csv", plain_model, batch_size=4, top_k=1, progress=False)
    assert capsys.readouterr().err == ""


# --- drift ---------------------------------------------------------------------------------------------------------


def test_drift_cfg_with_a_model_without_reference_writes_no_report(npy, tmp_path, plain_model):
    out = tmp_path / "out.csv"
    result = predict.run(npy, out, plain_model, batch_size=4, top_k=1, progress=False, drift_cfg=DRIFT)
    assert result == predict.Result(images=9, drift=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.csv", "x.npy"]


def test_a_broken_reference_is_only_read_with_drift_cfg(npy, onnx_model, tmp_path):
    model = model_copy(onnx_model, tmp_path / "model")
    reference = model.with_name(drift.REFERENCE_FILE)
    reference.write_bytes(b"not an npz archive")
    predictor = Predictor(model, threads=1)
    out = tmp_path / "out.csv"
    assert predict.run(npy, out, predictor, batch_size=4, top_k=1, progress=False) == predict.Result(9, None)
    message = refusal(predict.run, npy, tmp_path / "o2.csv", predictor, batch_size=4, top_k=1, drift_cfg=DRIFT)
    assert message.startswith(f"{reference} is not a drift reference: ")
    assert not (tmp_path / "o2.csv").exists()


def test_a_reference_with_another_number_of_classes_is_named(npy, onnx_model, tmp_path):
    model = model_copy(onnx_model, tmp_path / "model")
    predictor = Predictor(model, threads=1)
    reference = model.with_name(drift.REFERENCE_FILE)
    drift.save_reference(reference, predictor.run(PIXELS)[1][:, :5], PIXELS)
    out = tmp_path / "out.csv"
    message = refusal(predict.run, npy, out, predictor, batch_size=4, top_k=1, progress=False, drift_cfg=DRIFT)
    assert message == f"{reference} is not a drift reference for {model}: it has 5 classes, the model 10"
    assert not out.exists() and not drift.report_path(out).exists()


def test_scipy_is_preloaded_with_the_batch_size_only_for_a_drift_check(npy, onnx_model, tmp_path, monkeypatch):
    """predict.run asks drift.preload (which decides from the batch size) only when it will check drift: with
    drift_cfg and a model that has a reference."""
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(drift, "preload", lambda images, min_images: asked.append((images, min_images)))
    plain = Predictor(model_copy(onnx_model, tmp_path / "plain"), threads=1)
    predict.run(npy, tmp_path / "a.csv", plain, batch_size=4, top_k=1, progress=False, drift_cfg=DRIFT)
    assert asked == []
    model = model_copy(onnx_model, tmp_path / "model")
    predictor = Predictor(model, threads=1)
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), predictor.run(PIXELS)[1], PIXELS)
    predict.run(npy, tmp_path / "b.csv", predictor, batch_size=4, top_k=1, progress=False)
    assert asked == []
    predict.run(npy, tmp_path / "c.csv", predictor, batch_size=4, top_k=1, progress=False, drift_cfg=DRIFT)
    assert asked == [(9, DRIFT.min_images)]


def test_a_batch_too_small_for_the_drift_check_never_imports_scipy(npy, onnx_model, tmp_path):
    """In a process of its own, where nothing has imported scipy: 9 images under min_images=200 give a "not
    tested" report, and scipy (0.5 to 1.5 s of CPU to import) stays unloaded; 9 images at min_images=5 load it."""
    model = model_copy(onnx_model, tmp_path / "model")
    predictor = Predictor(model, threads=1)
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), predictor.run(PIXELS)[1], PIXELS)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from softmax_mlops.config import DriftConfig\n"
        "from softmax_mlops.serving import predict\n"
        "from softmax_mlops.serving.inference import Predictor\n"
        "cfg = DriftConfig(min_images=int(sys.argv[3]), max_images=1000)\n"
        "out = Path(sys.argv[2])\n"
        "r = predict.run(Path(sys.argv[1]), out, Predictor(out.with_name('model') / 'model.onnx', threads=1),"
        " batch_size=4, top_k=1, progress=False, drift_cfg=cfg)\n"
        "print(r.drift['result'], 'scipy.stats' in sys.modules)\n"
    )
    for min_images, expected in ((200, "not tested False"), (5, "True")):
        out = tmp_path / f"out-{min_images}.csv"
        done = subprocess.run(
            [sys.executable, "-c", script, str(npy), str(out), str(min_images)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith(expected), done.stdout


def test_a_drift_run_prints_nothing_on_stderr(npy, onnx_model, tmp_path, capsys, monkeypatch):
    """Nothing on stderr but what the caller asked for: no 'Exception in thread' from the work drift starts in
    the background. pytest collects thread exceptions itself; the default hook prints them as a user sees them."""
    model = model_copy(onnx_model, tmp_path / "model")
    predictor = Predictor(model, threads=1)
    reference = np.repeat(PIXELS, 20, axis=0)
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), predictor.run(reference)[1], reference)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    before = set(threading.enumerate())
    out = tmp_path / "out.csv"
    result = predict.run(npy, out, predictor, batch_size=4, top_k=1, progress=False, drift_cfg=DRIFT)
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=60)
    assert capsys.readouterr().err == ""
    assert result.drift is not None and result.drift["images"] == 9
    assert json.loads(drift.report_path(out).read_text()) == result.drift


# --- class names: CSV quoting and encodings -----------------------------------------------------------------------


def test_class_names_that_all_need_quoting_keep_the_top_k_in_one_field(npy, onnx_model, tmp_path):
    names = [f"size {i}, regular" for i in range(10)]  # every name holds a comma
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model", names), threads=1)
    out = tmp_path / "out.csv"
    predict.run(npy, out, predictor, batch_size=4, top_k=2, progress=False)
    rows = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert rows[0] == list(predict.CSV_HEADER)
    assert rows[1:] == expected_csv_rows(predictor, PIXELS, 2)


def test_predictions_are_written_as_utf8_whatever_the_locale(npy, onnx_model, tmp_path):
    """A non-UTF-8 locale (LC_CTYPE=C here: ASCII) must not change the bytes of the output."""
    names = [f"vêtement n°{i}" for i in range(10)]
    predictor = Predictor(model_copy(onnx_model, tmp_path / "model", names), threads=1)
    out = tmp_path / "out.csv"
    with ascii_locale():
        predict.run(npy, out, predictor, batch_size=4, top_k=3, progress=False)
    rows = list(csv.reader(io.StringIO(out.read_bytes().decode("utf-8"))))
    assert rows[1:] == expected_csv_rows(predictor, PIXELS, 3)


def test_csv_text_refuses_top_k_ids_and_probabilities_that_do_not_pair_up():
    """Three class ids but two probabilities per image: an error, not rows whose top-k lists are shifted."""
    top_ids = np.array([[0, 1, 2], [3, 4, 5]])
    top_probs = np.array([[0.5, 0.3], [0.6, 0.2]], dtype=np.float32)
    with pytest.raises(ValueError):
        predict.csv_text(np.arange(2), top_ids, top_probs, [str(i) for i in range(10)])
