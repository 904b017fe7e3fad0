"""predict.run, called in the test process: what it writes for each format, and each refusal at its edge.
tests/unit/test_predict_cli.py and test_guards_predict.py run the same paths through the console script."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from softmax_mlops.config import DriftConfig
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import drift, predict
from softmax_mlops.serving.inference import Predictor

PIXELS = np.random.default_rng(3).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)


@pytest.fixture
def npy(tmp_path) -> Path:
    np.save(tmp_path / "x.npy", PIXELS)
    return tmp_path / "x.npy"


@pytest.fixture(scope="module")
def predictor(onnx_model) -> Predictor:
    return Predictor(onnx_model[0], threads=1)


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


@pytest.mark.parametrize(
    "name, requested, fmt",
    [
        ("o.csv", None, "csv"),
        ("o.CSV", None, "csv"),
        ("o.jsonl", None, "jsonl"),
        ("o.json", None, "jsonl"),
        ("o.ndjson", None, "jsonl"),
        ("o.txt", "csv", "csv"),
        ("o.csv", "jsonl", "jsonl"),
        ("o.parquet", None, "parquet"),
        ("o.PARQUET", None, "parquet"),
        ("o.csv", "parquet", "parquet"),
    ],
)
def test_output_format_from_the_suffix_or_the_request(name, requested, fmt):
    assert predict.output_format(Path(name), requested) == fmt


def test_an_unknown_suffix_is_named():
    message = refusal(predict.output_format, Path("/x/out.avro"), None)
    assert message == "cannot tell the output format from 'out.avro': use .csv, .jsonl or .parquet, or pass --format"


def test_refusing_to_overwrite_the_input(npy, tmp_path):
    predict.refuse_overwriting_input(npy, tmp_path / "out.csv")  # another file: fine
    predict.refuse_overwriting_input(npy, tmp_path / "x.npy.csv")
    assert refusal(predict.refuse_overwriting_input, npy, npy) == (
        f"refusing to write {npy}: it is the input {npy}; choose another --output"
    )
    os.link(npy, tmp_path / "hard.csv")
    assert "it is the input" in refusal(predict.refuse_overwriting_input, npy, tmp_path / "hard.csv")
    folder = tmp_path / "images"
    folder.mkdir()
    inside = folder / "deeper" / "out.csv"
    assert refusal(predict.refuse_overwriting_input, folder, inside) == (
        f"refusing to write {inside}: it is inside the input folder {folder}; choose another --output"
    )
    predict.refuse_overwriting_input(folder, tmp_path / "images.csv")  # beside the folder, not in it
    predict.refuse_overwriting_input(npy, npy.parent / "y.npy")  # a file's folder is not an input folder


def test_csv_has_a_header_and_one_row_per_image(npy, tmp_path, predictor):
    out = tmp_path / "out.csv"
    result = predict.run(npy, out, predictor, batch_size=4, top_k=2, progress=False)
    assert result == predict.Result(images=9, drift=None)
    lines = out.read_text().splitlines()
    assert lines[0] == "id,class_id,class_name,probability,top_k" and len(lines) == 10
    top_ids, top_probs = predictor.top_k_of(predictor.run(PIXELS)[1], 2)
    assert out.read_text() == lines[0] + "\n" + predict.csv_text(
        np.arange(9), top_ids, top_probs, predictor.class_names
    )


def test_jsonl_has_one_object_per_image(npy, tmp_path, predictor):
    out = tmp_path / "out.jsonl"
    assert predict.run(npy, out, predictor, batch_size=5, top_k=3, progress=False).images == 9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    probabilities = predictor.run(PIXELS)[1]
    assert [r["id"] for r in rows] == list(range(9))
    assert [r["class_id"] for r in rows] == probabilities.argmax(1).tolist()
    assert all(len(r["top_k"]) == 3 for r in rows)
    assert rows[0]["probability"] == pytest.approx(float(probabilities[0].max()))


def test_string_ids_of_a_folder_stay_strings_in_jsonl(tmp_path, predictor):
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(PIXELS[i], "L").save(folder / f"{i}.png")
    out = tmp_path / "out.jsonl"
    predict.run(folder, out, predictor, batch_size=8, top_k=1, progress=False)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["0.png", "1.png"]


def test_parquet_has_the_predictions_and_the_models_provenance(npy, tmp_path, predictor):
    import pyarrow.parquet as pq

    from softmax_mlops.serving.parquet import file_metadata

    out = tmp_path / "out.parquet"
    result = predict.run(npy, out, predictor, batch_size=4, top_k=2, progress=False, all_probabilities=True)
    assert result == predict.Result(images=9, drift=None)
    rows = pq.read_table(out).to_pylist()
    probabilities = predictor.run(PIXELS)[1]
    top_ids, top_probs = predictor.top_k_of(probabilities, 2)
    assert [r["id"] for r in rows] == list(range(9))
    assert [r["class_id"] for r in rows] == top_ids[:, 0].tolist()
    assert [r["class_name"] for r in rows] == [predictor.class_names[c] for c in top_ids[:, 0]]
    assert np.array_equal(np.array([r["probability"] for r in rows], np.float32), top_probs[:, 0])
    assert [[e["class_id"] for e in r["top_k"]] for r in rows] == top_ids.tolist()
    assert [[e["class_name"] for e in r["top_k"]] for r in rows][0] == [predictor.class_names[c] for c in top_ids[0]]
    assert np.array_equal(np.array([[e["probability"] for e in r["top_k"]] for r in rows], np.float32), top_probs)
    assert np.array_equal(np.array([r["probabilities"] for r in rows], np.float32), probabilities)
    assert file_metadata(out) == predictor.provenance() | {"class_names": json.dumps(predictor.class_names)}
    assert predictor.provenance()["model_name"] == "" and len(predictor.provenance()["model_md5"]) == 32


def test_parquet_without_all_probabilities_has_five_columns(npy, tmp_path, predictor):
    import pyarrow.parquet as pq

    out = tmp_path / "out.parquet"
    predict.run(npy, out, predictor, batch_size=4, top_k=1, progress=False)
    assert pq.read_table(out).column_names == ["id", "class_id", "class_name", "probability", "top_k"]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_all_probabilities_is_refused_for_text(npy, tmp_path, predictor, suffix):
    out = tmp_path / f"out.{suffix}"
    message = refusal(predict.run, npy, out, predictor, batch_size=4, top_k=1, progress=False, all_probabilities=True)
    assert message == f"--all-probabilities needs a .parquet output, not {suffix}"
    assert not out.exists()


def test_a_parquet_input_is_read_as_images(tmp_path, predictor):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image": pa.array([p.tobytes() for p in PIXELS], pa.binary())}), source)
    out = tmp_path / "out.jsonl"
    assert predict.run(source, out, predictor, batch_size=4, top_k=1, progress=False).images == 9
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["class_id"] for r in rows] == predictor.run(PIXELS)[1].argmax(1).tolist()


def test_skip_bad_reaches_the_folder_and_the_parquet_readers(tmp_path, predictor):
    """A bad image in a folder and a bad row in a Parquet file: skipped with skip_bad, fatal without."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(PIXELS[0], "L").save(folder / "0.png")
    (folder / "1.png").write_bytes(b"not a png")
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"image": pa.array([PIXELS[0].tobytes(), b"short"], pa.binary())}), table)
    for source in (folder, table):
        out = tmp_path / f"{source.stem}-out.jsonl"
        assert predict.run(source, out, predictor, batch_size=4, top_k=1, progress=False, skip_bad=True).images == 1
        with pytest.raises(PipelineError):
            predict.run(source, out.with_suffix(".csv"), predictor, batch_size=4, top_k=1, progress=False)


def test_a_failure_leaves_no_output(tmp_path, predictor):
    np.save(tmp_path / "bad.npy", PIXELS.astype(np.float32))
    out = tmp_path / "out.csv"
    with pytest.raises(PipelineError):
        predict.run(tmp_path / "bad.npy", out, predictor, batch_size=4, top_k=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


@pytest.fixture
def model_with_reference(onnx_model, tmp_path) -> Predictor:
    """The fixture model in a folder of its own, with a drift reference made from its outputs on PIXELS."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(onnx_model[0].read_bytes())
    model = Predictor(folder / "model.onnx", threads=1)
    reference = np.repeat(PIXELS, 30, axis=0)
    drift.save_reference(folder / drift.REFERENCE_FILE, model.run(reference)[1], reference)
    return model


def test_drift_report_beside_the_output(npy, tmp_path, model_with_reference):
    out = tmp_path / "out.csv"
    config = DriftConfig(alpha=0.01, min_images=5, max_images=100)
    result = predict.run(npy, out, model_with_reference, batch_size=4, top_k=1, progress=False, drift_cfg=config)
    assert result.drift is not None and result.drift["images"] == 9
    assert json.loads(drift.report_path(out).read_text()) == result.drift
    # without a drift config, the reference is not read and no report is written
    other = tmp_path / "plain.csv"
    assert predict.run(npy, other, model_with_reference, batch_size=4, top_k=1, progress=False).drift is None
    assert not drift.report_path(other).exists()


def test_the_drift_report_may_not_overwrite_the_input(tmp_path, model_with_reference):
    """The report goes beside the output as out.drift.json: an input of that name must not be replaced."""
    source = tmp_path / "out.drift.json"
    np.save(tmp_path / "x.npy", PIXELS)
    (tmp_path / "x.npy").rename(source)
    config = DriftConfig(alpha=0.01, min_images=5, max_images=100)
    message = refusal(
        predict.run,
        source,
        tmp_path / "out.csv",
        model_with_reference,
        batch_size=4,
        top_k=1,
        progress=False,
        drift_cfg=config,
    )
    assert message.startswith(f"refusing to write {tmp_path / 'out.drift.json'}: it is the input")
