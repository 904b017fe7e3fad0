"""The Prefect flows on the real data, in a Prefect test harness: stages as tasks, cache hits, experiments,
failures, the run summary and batch inference."""

import csv
import json

import mlflow
import pytest
from PIL import Image

from helpers import clone_state, copy_project, run_tool
from softmax_mlops import config

pytestmark = [pytest.mark.realdata, pytest.mark.server]


@pytest.fixture(scope="module")
def project(real_splits, prefect_harness, tmp_path_factory):
    """A fresh copy, with the training flow run once on it."""
    from pipelines.flows import training_pipeline

    root = copy_project(tmp_path_factory.mktemp("flows"))
    state = training_pipeline(project_dir=str(root), return_state=True)
    assert state.is_completed(), state.message
    return root, state


def test_every_stage_ran_as_a_task(project):
    from prefect import get_client

    root, state = project
    result = state.result()
    assert result["stages"] == [
        "ingest",
        "train@scratch",
        "evaluate@scratch",
        "calibrate@scratch",
        "export@scratch",
        "train@concise",
        "evaluate@concise",
        "calibrate@concise",
        "export@concise",
        "compare",
    ]
    assert result["reproduced"] == result["ran"] == result["stages"]  # a fresh copy: everything ran
    assert result["restored"] == []
    import asyncio

    async def task_names():
        """Prefect 3 records task runs from their events, after the flow returns: poll, bounded."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        names: list[str] = []
        async with get_client() as client:
            for _ in range(120):
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                names = sorted(r.name for r in runs)
                if len(names) >= len(result["stages"]):
                    break
                await asyncio.sleep(0.5)
        return names

    assert asyncio.run(task_names()) == sorted(result["stages"])


def test_mlflow_runs_carry_the_flow_run_id(project):
    """The two runs this flow run opened (other tests here run experiments into the same store)."""
    root, state = project
    client = mlflow.MlflowClient(config.load(root).mlflow.tracking_uri)
    runs = [client.get_run(m["mlflow_run_id"]) for m in state.result()["impls"].values()]
    assert sorted(r.data.params["impl"] for r in runs) == ["concise", "scratch"]
    assert {r.data.tags["prefect_flow_run_id"] for r in runs} == {str(state.state_details.flow_run_id)}


def test_markdown_summary_links_each_mlflow_run(project):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    root, state = project

    async def read():  # this flow run's summary: other tests here run the flow again
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["training-metrics"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                )
            )

    (artifact,) = asyncio.run(read())
    for impl, metrics in state.result()["impls"].items():
        assert f"| {impl} | {metrics['test_accuracy']:.4f}" in artifact.data
        assert metrics["mlflow_run_url"] in artifact.data


def test_second_run_is_all_cache_hits_and_agrees_with_dvc(project):
    from pipelines.flows import training_pipeline

    root, _ = project
    result = training_pipeline(project_dir=str(root))
    assert result["reproduced"] == []
    assert run_tool("dvc", "status", "--json", cwd=root).stdout.strip() == "{}"


def test_with_a_dvc_remote_a_fresh_clone_reproduces_nothing(project, tmp_path, monkeypatch):
    """All state in object storage: the flow pushes outputs and the run-cache to the default DVC remote (a real
    S3 server), and the same flow in a fresh clone, sharing only the remote and the MLflow store, pulls
    every stage instead of running it, as a new container of the stack would."""
    from pipelines.flows import training_pipeline
    from stack import S3Server

    root, _ = project
    ran = clone_state(root, tmp_path / "ran")
    with S3Server("dvc") as s3:
        for key, value in S3Server.KEYS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ran / 'mlflow.db'}")
        remote = [("remote", "add", "--local", "-d", "store", "s3://dvc/cache")]
        remote.append(("remote", "modify", "--local", "store", "endpointurl", s3.url))
        for args in remote:
            assert run_tool("dvc", *args, cwd=ran).returncode == 0
        assert training_pipeline(project_dir=str(ran))["reproduced"] == []  # up to date, and now pushed
        assert any(key.startswith("cache/runs/") for key in s3.keys("dvc"))

        fresh = tmp_path / "fresh"
        assert run_tool("git", "clone", "-q", str(ran), str(fresh), cwd=tmp_path).returncode == 0
        for args in remote:
            assert run_tool("dvc", *args, cwd=fresh).returncode == 0
        assert not (fresh / "models").exists() or not any((fresh / "models").rglob("*.onnx"))
        result = training_pipeline(project_dir=str(fresh))
        assert result["reproduced"] == []
        assert run_tool("dvc", "status", "--json", cwd=fresh).stdout.strip() == "{}"
        for impl in config.IMPLS:
            model = f"models/{impl}/model.onnx"
            assert (fresh / model).read_bytes() == (root / model).read_bytes()
            # the same MLflow run, found by the md5 of the pulled weights (mlflow_run.json is not a DVC output)
            run = json.loads((ran / f"models/{impl}/mlflow_run.json").read_text())["run_id"]
            assert result["impls"][impl]["mlflow_run_id"] == run


def test_overrides_run_as_a_dvc_experiment_and_leave_params_alone(project):
    from pipelines.flows import training_pipeline

    root, _ = project
    params_before = (root / "params.yaml").read_bytes()
    status_before = run_tool("git", "status", "--porcelain", cwd=root).stdout
    result = training_pipeline(
        impls=["scratch"], overrides=["train.epochs=1"], experiment_name="one-epoch", project_dir=str(root)
    )
    assert result["experiment"] == "one-epoch" and "compare" not in result["stages"]
    assert (root / "params.yaml").read_bytes() == params_before
    assert run_tool("git", "status", "--porcelain", cwd=root).stdout == status_before
    assert run_tool("git", "worktree", "list", cwd=root).stdout.count("\n") == 1
    shown = run_tool("dvc", "exp", "show", "--json", cwd=root).stdout
    assert "one-epoch" in shown
    # a bound: one epoch measures about 0.79 (the first row of metrics/scratch/history.csv), under the five-epoch
    # 0.8266, so a run that silently ignored the override would fail here
    assert result["impls"]["scratch"]["test_accuracy"] < 0.81


def test_failing_stage_fails_the_flow_with_its_name_and_reason(project):
    from pipelines.flows import training_pipeline

    root, _ = project
    state = training_pipeline(
        impls=["scratch"], overrides=["train.lr_schedule=step"], project_dir=str(root), return_state=True
    )
    assert state.is_failed()
    assert "train@scratch: " in state.message and "train.lr_schedule must be one of constant, cosine" in state.message
    assert run_tool("git", "worktree", "list", cwd=root).stdout.count("\n") == 1


def test_batch_inference_writes_predictions_for_a_folder(project, tmp_path, caplog):
    from pipelines.flows import batch_inference

    root, _ = project
    images, labels = real_test_images(root)
    folder = root / "data" / "incoming"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(images[i]).save(folder / f"{i:02d}.png")
    result = batch_inference(output_path="predictions/out.csv", model="models/scratch", project_dir=str(root))
    rows = list(csv.DictReader((root / "predictions/out.csv").open()))
    assert result["images"] == 12 and [r["id"] for r in rows] == [f"{i:02d}.png" for i in range(12)]
    assert sum(int(r["class_id"]) == labels[i] for i, r in enumerate(rows)) >= 8
    # the tasks take an onnxruntime session: no cache key is computed from it (it cannot be hashed)
    assert "HashError" not in caplog.text and "cannot pickle" not in caplog.text
    # 12 images are fewer than drift.min_images: the report says so rather than testing on too little
    assert result["drift"] == "not tested"
    assert json.loads((root / "predictions/out.drift.json").read_text())["result"] == "not tested"


def test_batch_inference_reports_drift_for_inverted_images(project):
    """The flow's drift check, with its markdown artifact: 300 inverted test images are not what the model saw."""
    import numpy as np

    from pipelines.flows import batch_inference

    root, _ = project
    images, _ = real_test_images(root)
    np.save(root / "inverted.npy", 255 - images[:300])
    result = batch_inference(
        input_path="inverted.npy", output_path="predictions/inverted.csv", model="models/scratch", project_dir=str(root)
    )
    assert result["images"] == 300 and result["drift"] == "drift"
    report = json.loads((root / "predictions/inverted.drift.json").read_text())
    assert report["tests"]["ks_mean_intensity"]["drift"] and report["tests"]["ks_softmax_per_class"]["drift"]


@pytest.mark.parametrize("inbox", ["missing", "empty"])
def test_batch_inference_with_nothing_to_predict_completes(project, inbox):
    from pipelines.flows import batch_inference

    root, _ = project
    folder = root / "data" / f"inbox-{inbox}"
    if inbox == "empty":
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("not an image")
    state = batch_inference(
        input_path=str(folder.relative_to(root)), model="models/scratch", project_dir=str(root), return_state=True
    )
    assert state.is_completed(), state.message
    assert state.result() == {"images": 0, "output": None, "model": None}
    assert not (root / "predictions" / f"inbox-{inbox}").exists()


def test_batch_inference_from_and_to_object_storage(project, monkeypatch):
    """The stack's nightly run on a Docker pool container: the inbox and the output are s3:// prefixes, set by
    the environment overrides, on a real S3 server (moto's). The predictions and the drift report appear as
    objects; an empty prefix is a normal night, named by its URL."""
    import io

    from pipelines.flows import batch_inference
    from stack import S3Server

    root, _ = project
    images, labels = real_test_images(root)
    with S3Server("batch") as s3:
        for key, value in {**S3Server.KEYS, "AWS_ENDPOINT_URL": s3.url}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv(config.BATCH_INPUT_ENV, "s3://batch/incoming/")
        monkeypatch.setenv(config.BATCH_OUTPUT_ENV, "s3://batch/predictions")
        empty = batch_inference(model="models/scratch", project_dir=str(root), return_state=True)
        assert empty.is_completed() and empty.result()["images"] == 0
        for i in range(12):
            png = io.BytesIO()
            Image.fromarray(images[i]).save(png, format="PNG")
            s3.client().put_object(Bucket="batch", Key=f"incoming/{i:02d}.png", Body=png.getvalue())
        s3.client().put_object(Bucket="batch", Key="incoming/notes.txt", Body=b"not an image")
        result = batch_inference(model="models/scratch", project_dir=str(root))
        (output,) = [k for k in s3.keys("batch", "predictions/") if k.endswith(".csv")]
        assert result["output"] == f"s3://batch/{output}" and output.startswith("predictions/incoming-")
        body = s3.client().get_object(Bucket="batch", Key=output)["Body"].read().decode()
        rows = list(csv.DictReader(io.StringIO(body)))
        assert [r["id"] for r in rows] == [f"{i:02d}.png" for i in range(12)]
        assert sum(int(r["class_id"]) == labels[i] for i, r in enumerate(rows)) >= 8
        assert output.replace(".csv", ".drift.json") in s3.keys("batch", "predictions/")
    assert not (root / "predictions" / "incoming").exists()


def test_batch_inference_names_an_empty_prefix_by_its_url(project, monkeypatch, tmp_path):
    """... and so does a sharded run, which lists the store instead of copying it; a folder or prefix of Parquet
    files is work, not an empty inbox."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.flows import _nothing_stored, _nothing_to_predict, batch_inference
    from softmax_mlops import object_store
    from stack import S3Server

    root, _ = project
    nothing = "holds no PNG or JPEG images and no Parquet files"
    (tmp_path / "tables").mkdir()
    pq.write_table(pa.table({"image": pa.array([bytes(784)], pa.binary())}), tmp_path / "tables" / "x.parquet")
    with S3Server("batch") as s3:
        for key, value in {**S3Server.KEYS, "AWS_ENDPOINT_URL": s3.url}.items():
            monkeypatch.setenv(key, value)
        result = batch_inference(input_path="s3://batch/nowhere/", model="models/scratch", project_dir=str(root))
        assert result == {"images": 0, "output": None, "model": None}
        s3.client().put_object(Bucket="batch", Key="notes/readme.txt", Body=b"not an image")
        s3.client().put_object(
            Bucket="batch", Key="tables/x.parquet", Body=(tmp_path / "tables/x.parquet").read_bytes()
        )
        copied = object_store.download("s3://batch/notes/", tmp_path / "in")
        assert _nothing_stored("s3://batch/nowhere/") == "s3://batch/nowhere/ does not exist"
        assert _nothing_stored("s3://batch/notes/") == f"s3://batch/notes/ {nothing}"
        assert _nothing_stored("s3://batch/tables/") is None
    assert _nothing_to_predict(None, "s3://batch/nowhere/") == "s3://batch/nowhere/ does not exist"
    assert _nothing_to_predict(copied, "s3://batch/notes/") == f"s3://batch/notes/ {nothing}"
    assert _nothing_to_predict(tmp_path / "tables", "tables") is None


def real_test_images(root):
    from softmax_mlops.stages.data import load_split

    return load_split(root / "data/prepared/test.npz")


def test_sharded_batch_inference_on_a_local_dask_cluster_to_object_storage(project, monkeypatch):
    """batch_inference.workers set: the nightly flow cuts its input into shards, predicted as tasks on a
    temporary local cluster of two Dask workers, and uploads the folder of parts with its manifest last."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from pipelines.flows import batch_inference
    from softmax_mlops.serving import predict
    from softmax_mlops.serving.inference import Predictor
    from stack import S3Server

    root, _ = project
    images, _ = real_test_images(root)
    np.save(root / "nightly.npy", images[:300])
    params = root / "params.yaml"
    original = params.read_text()
    settings = yaml.safe_load(original)
    settings["batch_inference"].update(workers=2, shard_size=100)
    params.write_text(yaml.safe_dump(settings))
    try:
        with S3Server("batch") as s3:
            for key, value in {**S3Server.KEYS, "AWS_ENDPOINT_URL": s3.url}.items():
                monkeypatch.setenv(key, value)
            monkeypatch.setenv(config.BATCH_OUTPUT_ENV, "s3://batch/predictions")
            result = batch_inference(input_path="nightly.npy", model="models/scratch", project_dir=str(root))
            keys = s3.keys("batch", "predictions/")
            (folder,) = {k.split("/")[1] for k in keys if k.endswith(".parquet/_manifest.json")}
            assert folder.startswith("nightly-") and result["output"] == f"s3://batch/predictions/{folder}"
            parts = sorted(k for k in keys if k.startswith(f"predictions/{folder}/part-"))
            assert parts == [f"predictions/{folder}/part-0000{i}.parquet" for i in range(3)]
            tables = [
                pq.read_table(io.BytesIO(s3.client().get_object(Bucket="batch", Key=k)["Body"].read())) for k in parts
            ]
            manifest = json.loads(
                s3.client().get_object(Bucket="batch", Key=f"predictions/{folder}/_manifest.json")["Body"].read()
            )
            assert f"predictions/{folder.removesuffix('.parquet')}.drift.json" in keys
    finally:
        params.write_text(original)
    assert result["images"] == manifest["images"] == 300 and [p["rows"] for p in manifest["parts"]] == [100] * 3
    single = root / "single-nightly.parquet"
    predict.run(root / "nightly.npy", single, Predictor(root / "models/scratch/model.onnx"), 64, 3, progress=False)
    assert pa.concat_tables(tables).sort_by("id").equals(pq.read_table(single).sort_by("id"))
