"""`softmax-mlops predict -o X.parquet` as a user runs it: the columns and types docs/batch.md documents, the same
predictions as the CSV, read back by pyarrow, pandas and DuckDB, and the model named in the file's metadata
(also the registered version of a models:/name@alias, from a real MLflow store)."""

import csv
import json

import mlflow
import numpy as np
import pytest

from helpers import REPO, cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def images(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(300, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    return tmp_path / "x.npy", pixels


def predict(*args: str):
    result = cli("predict", *args, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result


def test_parquet_holds_the_csv_predictions_with_real_types(onnx_model, images, tmp_path):
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.serving.parquet import file_metadata

    path, pixels = images
    out, text = tmp_path / "out.parquet", tmp_path / "out.csv"
    common = ("-m", str(onnx_model[0]), "--batch-size", "64", "--top-k", "3")
    predict(str(path), "-o", str(out), *common, "--all-probabilities")
    predict(str(path), "-o", str(text), *common)
    table = pq.read_table(out)
    entry = pa.struct([("class_id", pa.int16()), ("class_name", pa.string()), ("probability", pa.float32())])
    assert [(f.name, f.type) for f in table.schema] == [
        ("id", pa.int64()),
        ("class_id", pa.int16()),
        ("class_name", pa.dictionary(pa.int16(), pa.string())),
        ("probability", pa.float32()),
        ("top_k", pa.list_(entry)),
        ("probabilities", pa.list_(pa.float32(), 10)),
    ]
    rows = list(csv.DictReader(text.open()))
    got = table.to_pylist()
    assert len(got) == len(rows) == 300
    for ours, theirs in zip(got, rows, strict=True):
        assert ours["id"] == int(theirs["id"]) and ours["class_id"] == int(theirs["class_id"])
        assert ours["class_name"] == theirs["class_name"]
        assert f"{ours['probability']:.6f}" == theirs["probability"]
        assert ";".join(f"{e['class_name']}:{e['probability']:.6f}" for e in ours["top_k"]) == theirs["top_k"]
    _, probabilities = Predictor(onnx_model[0]).run(pixels)
    assert np.array_equal(np.array(table.column("probabilities").to_pylist(), np.float32), probabilities)
    metadata = file_metadata(out)
    assert metadata["model"] == str(onnx_model[0]) and metadata["model_version"] == ""
    assert json.loads(metadata["class_names"])[0] == "t-shirt"
    import hashlib

    assert metadata["model_md5"] == hashlib.md5(onnx_model[0].read_bytes()).hexdigest()


def test_pandas_and_duckdb_read_it(onnx_model, images, tmp_path):
    import pandas as pd

    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "out.parquet"
    predict(str(images[0]), "-o", str(out), "-m", str(onnx_model[0]))
    frame = pd.read_parquet(out)
    assert len(frame) == 300 and str(frame["class_name"].dtype) == "category"
    assert str(frame["probability"].dtype) == "float32" and str(frame["class_id"].dtype) == "int16"
    counts = duckdb.sql(f"select class_name, count(*) from read_parquet('{out}') group by 1").fetchall()
    assert sum(n for _, n in counts) == 300
    expected = frame["class_name"].value_counts().astype(int)
    assert dict(counts) == expected[expected > 0].to_dict()  # a category counts its unused values too
    same = duckdb.sql(f"select bool_and(top_k[1].class_id = class_id) from read_parquet('{out}')").fetchall()
    assert same == [(True,)]


def test_row_groups_flushed_as_batches_arrive_keep_their_order(onnx_model, tmp_path, monkeypatch):
    """Each full row group is written as soon as enough batches have come in: many small ones, in order."""
    from softmax_mlops.serving import parquet
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.serving.predict import run

    monkeypatch.setattr(parquet, "ROW_GROUP_ROWS", 10)
    images = np.random.default_rng(4).integers(0, 256, (95, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "in.npy", images)
    out = tmp_path / "out.parquet"
    predictor = Predictor(onnx_model[0])
    run(tmp_path / "in.npy", out, predictor, batch_size=7, top_k=3, progress=False)
    metadata = pq.ParquetFile(out).metadata
    # flushed every 14 rows (two batches of 7), each cut at row_group_size 10
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [10, 4] * 6 + [10, 1]
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(95))
    expected = predictor.run(images)[1].argmax(axis=1)
    assert table.column("class_id").to_pylist() == expected.tolist()


def test_image_files_get_string_ids_and_row_groups_are_large(onnx_model, tmp_path):
    from PIL import Image

    from softmax_mlops.serving import parquet

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((28, 28), i * 40, np.uint8)).save(folder / f"img{i}.png")
    out = tmp_path / "out.parquet"
    predict(str(folder), "-o", str(out), "-m", str(onnx_model[0]), "--batch-size", "2")
    table = pq.read_table(out)
    assert table.schema.field("id").type == pa.string() and table.column("id").to_pylist()[0] == "img0.png"
    assert pq.ParquetFile(out).metadata.num_row_groups == 1  # three batches, one row group
    assert parquet.ROW_GROUP_ROWS >= 100_000


def test_an_empty_input_is_a_valid_file_with_no_rows(onnx_model, tmp_path):
    np.save(tmp_path / "none.npy", np.zeros((0, 28, 28), np.uint8))
    out = tmp_path / "out.parquet"
    predict(str(tmp_path / "none.npy"), "-o", str(out), "-m", str(onnx_model[0]))
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.schema.field("id").type == pa.int64()


def test_a_failed_run_leaves_no_parquet(onnx_model, tmp_path):
    source = tmp_path / "truncated.idx"
    source.write_bytes(b"\0\0\x08\x03" + (4).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(784 * 2))
    out = tmp_path / "out.parquet"
    result = cli("predict", str(source), "-o", str(out), "-m", str(onnx_model[0]), cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "truncated" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.idx"]


def test_all_probabilities_needs_parquet(onnx_model, images, tmp_path):
    result = cli(
        "predict", str(images[0]), "-o", str(tmp_path / "o.csv"), "-m", str(onnx_model[0]), "--all-probabilities",
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("--all-probabilities needs a .parquet output, not csv")
    assert not (tmp_path / "o.csv").exists()


def test_the_metadata_names_the_registered_version_behind_an_alias(onnx_model, images, tmp_path, new_mlflow_store):
    """A real SQLite MLflow store: version 2 of the model holds @champion, so the file says version 2."""
    from softmax_mlops.serving.parquet import file_metadata

    uri = new_mlflow_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("parquet")
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("pq-test")
    for _ in range(2):
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(onnx_model[0]), artifact_path="model")
            source = mlflow.get_artifact_uri("model")
        version = client.create_model_version("pq-test", source, run_id=run.info.run_id)
    client.set_registered_model_alias("pq-test", "champion", version.version)
    out = tmp_path / "out.parquet"
    env = {"MLFLOW_TRACKING_URI": uri}
    result = cli("predict", str(images[0]), "-o", str(out), "-m", "models:/pq-test@champion", cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    metadata = file_metadata(out)
    assert (metadata["model"], metadata["model_version"]) == ("models:/pq-test@champion", "2")


# --- Parquet in ---------------------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def write_images(path, pixels, kind="binary", ids=None) -> None:
    """A Parquet file of images: raw bytes in a binary, large_binary or fixed-size column, or PNGs."""
    if kind == "png":
        column = pa.array([png_bytes(p) for p in pixels], pa.binary())
    else:
        column_type = {"binary": pa.binary(), "large": pa.large_binary(), "fixed": pa.binary(784)}[kind]
        column = pa.array([p.tobytes() for p in pixels], column_type)
    columns = {"image": column} | ({"id": ids} if ids is not None else {})
    pq.write_table(pa.table(columns), path, row_group_size=40)


def rows_of(path):
    return [(r["id"], r["class_id"], r["top_k"]) for r in csv.DictReader(path.open())]


@pytest.mark.parametrize("kind", ["binary", "large", "fixed", "png"])
def test_a_parquet_dataset_predicts_as_the_same_images_in_npy(onnx_model, images, tmp_path, kind):
    """Raw bytes in any binary column, or lossless PNGs, over two files of several row groups: the same rows as
    the .npy, ids counting on across the files."""
    path, pixels = images
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    write_images(dataset / "part-0.parquet", pixels[:120], kind)
    write_images(dataset / "part-1.parquet", pixels[120:], kind)
    ours, theirs = tmp_path / "ours.csv", tmp_path / "theirs.csv"
    predict(str(dataset), "-o", str(ours), "-m", str(onnx_model[0]), "--batch-size", "32")
    predict(str(path), "-o", str(theirs), "-m", str(onnx_model[0]))
    assert rows_of(ours) == rows_of(theirs) and len(rows_of(ours)) == 300


@pytest.mark.parametrize("ids", [["a,1", "b", "c"], [10, 20, 30]], ids=["strings", "ints"])
def test_an_id_column_gives_the_ids(onnx_model, images, tmp_path, ids):
    source, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_images(source, images[1][:3], ids=pa.array(ids))
    predict(str(source), "-o", str(out), "-m", str(onnx_model[0]))
    assert pq.read_table(out).column("id").to_pylist() == ids


def refusal(*args: str) -> str:
    result = cli("predict", *args, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_a_bad_row_is_named_or_skipped(onnx_model, images, tmp_path):
    """A row of 783 bytes and a null: --fail-on-bad names the file and the row and writes nothing; --skip-bad
    warns for each and predicts the others."""
    pixels = images[1][:5]
    values = [p.tobytes() for p in pixels]
    values[1], values[3] = values[1][:783], None
    source, out = tmp_path / "in.parquet", tmp_path / "out.csv"
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), source)
    line = refusal(str(source), "-o", str(out), "-m", str(onnx_model[0]))
    assert line.startswith(f"softmax-mlops: error: {source}: row 1: not a readable PNG or JPEG image")
    assert not out.exists()
    result = cli("predict", str(source), "-o", str(out), "-m", str(onnx_model[0]), "--skip-bad", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"skipped {source}: row 1:" in result.stderr and f"skipped {source}: row 3: no image (null)" in result.stderr
    assert [r["id"] for r in csv.DictReader(out.open())] == ["0", "2", "4"]


def test_hostile_files_are_one_line_each(onnx_model, images, tmp_path):
    model = ("-m", str(onnx_model[0]))
    corrupt = tmp_path / "corrupt.parquet"
    write_images(corrupt, images[1][:3])
    corrupt.write_bytes(corrupt.read_bytes()[:-20])
    assert refusal(str(corrupt), "-o", str(tmp_path / "o.csv"), *model).startswith(
        f"softmax-mlops: error: {corrupt} is not a readable Parquet file:"
    )
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": pa.array([1, 2, 3], pa.int64())}), wrong)
    assert refusal(str(wrong), "-o", str(tmp_path / "o.csv"), *model) == (
        f"softmax-mlops: error: {wrong}: column 'image' is int64, expected binary: 784 bytes of a uint8 28x28 "
        "image, or an encoded PNG or JPEG"
    )
    none = tmp_path / "none.parquet"
    pq.write_table(pa.table({"pixels": pa.array([b"x"])}), none)
    assert refusal(str(none), "-o", str(tmp_path / "o.csv"), *model) == (
        f"softmax-mlops: error: {none} has no 'image' column (its columns: pixels)"
    )
    float_ids = tmp_path / "float_ids.parquet"
    write_images(float_ids, images[1][:2], ids=pa.array([0.5, 1.5]))
    assert refusal(str(float_ids), "-o", str(tmp_path / "o.csv"), *model) == (
        f"softmax-mlops: error: {float_ids}: column 'id' is double, expected integers or strings"
    )
    assert not (tmp_path / "o.csv").exists()


def test_a_folder_of_parquet_and_images_is_refused(onnx_model, images, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_images(folder / "a.parquet", images[1][:2])
    (folder / "b.png").write_bytes(png_bytes(images[1][0]))
    assert refusal(str(folder), "-o", str(tmp_path / "o.csv"), "-m", str(onnx_model[0])) == (
        f"softmax-mlops: error: {folder} holds both Parquet files and PNG/JPEG images: give one kind per input"
    )
