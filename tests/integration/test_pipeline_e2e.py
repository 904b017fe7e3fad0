"""The whole pipeline as a user runs it: `dvc repro` in a fresh copy, then what DVC and MLflow hold."""

import difflib
import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest

from helpers import cli, clone_state, copy_project, run_tool
from softmax_mlops import config

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def repo(real_splits, tmp_path_factory):
    """One full `dvc repro` in a fresh copy (embedded SQLite MLflow), shared by the tests below. Depending on
    real_splits makes it fail in CI (and skip elsewhere) when the genuine data cannot be had."""
    dest = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    result = run_tool("dvc", "repro", cwd=dest)
    assert result.returncode == 0, result.stdout + result.stderr
    _keep(dest, first_run(dest))
    return dest


TRACKED = ("dvc.lock", "data/prepared", "models", "metrics", "reports")


def first_run(repo: Path) -> Path:
    """What the first `dvc repro` wrote, kept aside: later tests here change params and break weights."""
    return repo.parent / "first-run"


def _keep(repo: Path, dest: Path) -> None:
    for rel in TRACKED:
        if (repo / rel).is_dir():
            shutil.copytree(repo / rel, dest / rel, ignore=shutil.ignore_patterns("mlflow_run.json", ".gitignore"))
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dest / rel)


def use_store(root: Path) -> None:
    """Point this process's MLflow client at ``root``'s store. set_tracking_uri also exports
    MLFLOW_TRACKING_URI, which every stage run as a subprocess would inherit (and config.load honours): a stage
    run in another copy of the project would then log to this store. Unexport it."""
    mlflow.set_tracking_uri(config.load(root).mlflow.tracking_uri)
    os.environ.pop(config.TRACKING_URI_ENV, None)


@pytest.fixture(scope="module")
def runs(repo):
    use_store(repo)
    found = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")
    return {run.data.params["impl"]: run for run in found}


@pytest.fixture(autouse=True)
def _tracking_uri_of_the_shared_project(repo):
    """Every test here reads the shared project's store, whichever test ran before it (a test that changes a
    copy points MLflow at the copy's store)."""
    use_store(repo)


@pytest.fixture
def changed(repo, tmp_path):
    """A copy of the shared project after its first run (code, outputs, DVC cache and MLflow store), for a test
    that changes params or breaks files: the tests that read the shared project never see its changes."""
    dest = clone_state(repo, tmp_path / "project")
    use_store(dest)
    return dest


def read_json(path):
    return json.loads(path.read_text())


def test_both_implementations_reach_0_81_and_agree(repo):
    compare = read_json(repo / "reports/compare.json")
    accuracies = {
        impl: read_json(repo / f"metrics/{impl}/eval.json")["test_accuracy"] for impl in ("scratch", "concise")
    }
    # a bound, not a pin: the textbook trains this model into the low 0.8s in its chapter (ours
    # measures 0.8266, read from eval.json wherever a test needs the exact figure)
    assert min(accuracies.values()) >= 0.81
    # a bound: same seed, init and batch order, so the two may differ by float rounding only (0.2 points is 20
    # of the 10,000 test images)
    assert abs(accuracies["scratch"] - accuracies["concise"]) * 100 <= 0.2
    assert compare["impls"]["scratch"]["test_accuracy"] == accuracies["scratch"]
    assert compare["difference"]["max_abs_weight_diff"] < 1e-3  # a bound: float32 rounding over 5 epochs (4.5e-7)
    assert "| test accuracy |" in (repo / "reports/compare.md").read_text()


def test_outputs_exist_and_dvc_is_up_to_date(repo):
    for rel in (
        "data/prepared/summary.json",
        "data/prepared/val.npz",
        "metrics/scratch/calibration.json",
        "reports/concise/reliability.png",
        "metrics/scratch/history.csv",
        "metrics/concise/confusion.csv",
        "reports/scratch/confusion.png",
        "reports/concise/curves.png",
        "reports/scratch/predictions.png",
        "reports/compare_curves.png",
        "reports/accuracy_curves.csv",
        "metrics/scratch/headline.json",
        "metrics/concise/headline.json",
    ):
        assert (repo / rel).stat().st_size > 0, rel
    status = run_tool("dvc", "status", "--json", cwd=repo)
    assert json.loads(status.stdout) == {}
    again = run_tool("dvc", "repro", cwd=repo)
    assert again.returncode == 0 and "Running stage" not in again.stdout


def test_training_never_sees_the_validation_split(repo):

    from softmax_mlops.stages.data import load_split

    summary = read_json(repo / "data/prepared/summary.json")
    assert (summary["train"]["count"], summary["val"]["count"]) == (55000, 5000)
    assert summary["val"]["per_class"] == dict.fromkeys(summary["val"]["per_class"], 500)
    train, val = load_split(repo / "data/prepared/train.npz")[0], load_split(repo / "data/prepared/val.npz")[0]
    # no validation image among the training images (byte-identical duplicates aside, which Fashion-MNIST has
    # a few of: count them rather than assume none)
    seen = {image.tobytes() for image in train}
    assert sum(image.tobytes() in seen for image in val) < 10


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_calibration_is_fitted_on_validation_and_recorded_everywhere(repo, runs, impl):
    """T minimises the validation NLL; the test figures before and after are what the stage claims; DVC shows
    the temperature and the ECE after it among the headline metrics; MLflow has them in the same run; the exported
    model divides by the same T."""
    import numpy as np
    import torch

    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.stages import calibrate
    from softmax_mlops.stages.data import load_split
    from softmax_mlops.stages.models import load_weights

    report = read_json(repo / f"metrics/{impl}/calibration.json")
    T = report["temperature"]
    assert report["validation"]["images"] == 5000
    assert report["validation"]["nll_after"] <= report["validation"]["nll_before"]
    W, b = load_weights(repo / f"models/{impl}/weights.npz")
    val_images, val_labels = load_split(repo / "data/prepared/val.npz")
    val_logits = calibrate.logits64(W, b, val_images)
    y = torch.from_numpy(val_labels)
    assert all(calibrate.nll(val_logits, y, T) <= calibrate.nll(val_logits, y, T * f) for f in (0.98, 1.02))
    before, after = report["test"]["before"], report["test"]["after"]
    assert before["accuracy"] == after["accuracy"] == read_json(repo / f"metrics/{impl}/eval.json")["test_accuracy"]
    assert after["nll"] <= before["nll"]  # on this data T improves the held-out NLL as well

    shown = json.loads(run_tool("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    (files,) = [rev["data"] for rev in shown.values()]  # one revision, the workspace
    metrics = files[f"metrics/{impl}/headline.json"]["data"]
    assert metrics["temperature"] == T and metrics["ece"] == after["ece"]
    logged = runs[impl].data.metrics
    assert logged["temperature"] == T and logged["test_ece_after"] == after["ece"]
    assert logged["test_brier_before"] == before["brier"]

    card = read_json(repo / f"models/{impl}/model.json")
    assert card["temperature"] == T and card["logits"].startswith("after temperature")
    images = load_split(repo / "data/prepared/test.npz")[0][:500]
    logits, probabilities = Predictor(repo / f"models/{impl}/model.onnx").run(images)
    raw = calibrate.logits64(W, b, images).numpy()
    np.testing.assert_allclose(logits * T, raw, atol=1e-4)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(logits).double(), 1).numpy(), atol=1e-6)


def test_history_shows_train_accuracy_starting_below_test(repo):
    rows = (repo / "metrics/scratch/history.csv").read_text().splitlines()
    header, first = rows[0].split(","), dict(zip(rows[0].split(","), map(float, rows[1].split(",")), strict=True))
    assert len(rows) == 1 + 5 and header[:5] == ["epoch", "loss", "train_acc_running", "train_acc", "test_acc"]
    assert first["train_acc_running"] < first["test_acc"]


def test_one_mlflow_run_per_implementation_with_params_tags_and_epochs(repo, runs):
    assert set(runs) == {"scratch", "concise"}
    data_md5 = read_json(repo / "data/prepared/summary.json")["data_md5"]
    commit = run_tool("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    client = mlflow.MlflowClient()
    for impl, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["lr"] == "0.1" and run.data.params["batch_size"] == "256"
        tags = run.data.tags
        assert tags["git_commit"] == commit and tags["data_md5"] == data_md5
        assert tags["dvc_stages"] == f"train@{impl},evaluate@{impl},calibrate@{impl},export@{impl},compare"
        assert run.info.run_name == f"{impl}-{commit[:7]}"  # what ran: no DVC experiment, so the short commit
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert [m.step for m in history] == [1, 2, 3, 4, 5]
        for key in ("train_acc_running", "train_acc", "loss"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 5
        # MLflow's system metrics, sampled every mlflow.system_metrics_interval_s while the model trained
        system = {key for key in run.data.metrics if key.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
        assert len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) >= 1
        # evaluate logged into the very run that train opened
        assert run.data.metrics["test_accuracy"] == read_json(repo / f"metrics/{impl}/eval.json")["test_accuracy"]
        assert read_json(repo / f"models/{impl}/mlflow_run.json")["run_id"] == run.info.run_id
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "history.csv",
            "eval.json",
            "confusion.png",
            "predictions.png",
            "curves.png",
            "calibration.json",
            "reliability.png",
        } <= artifacts
        compared = {a.path for a in client.list_artifacts(run.info.run_id, "compare")}
        assert compared == {"compare/compare.md", "compare/compare.json", "compare/compare_curves.png"}


def test_logged_torch_model_has_signature_and_predicts_like_the_weights(repo, runs):
    import numpy as np

    from softmax_mlops.stages.data import load_split

    images, labels = load_split(repo / "data/prepared/test.npz")
    run = runs["scratch"]
    outputs = run.outputs.model_outputs
    assert len(outputs) == 2  # the torch module (train) and the ONNX model (export), both in this run
    models = {mlflow.get_logged_model(o.model_id).name: o.model_id for o in outputs}
    assert set(models) == {"model", "onnx_model"}
    uri = f"models:/{models['model']}"
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    model = mlflow.pyfunc.load_model(uri)
    predicted = np.asarray(model.predict(images)).argmax(axis=1)
    assert (predicted == labels).mean() == pytest.approx(read_json(repo / "metrics/scratch/eval.json")["test_accuracy"])


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_onnx_parity_and_model_card(repo, runs, impl):
    parity = read_json(repo / f"models/{impl}/parity.json")
    assert parity["images"] == 10000
    for batch in (1, 7, 10000):
        entry = parity[f"batch_{batch}"]
        assert entry["max_abs_diff_logits"] <= 1e-5 and entry["max_abs_diff_probabilities"] <= 1e-5
        assert entry["argmax_match"] == 1.0
    card = read_json(repo / f"models/{impl}/model.json")
    assert card["class_names"][0] == "t-shirt" and card["opset"] == 18
    assert "mlflow_run_id" not in card  # a DVC output: the run id (new every run) is only in MLflow's copy
    assert card["test_accuracy"] == read_json(repo / f"metrics/{impl}/eval.json")["test_accuracy"]
    assert card["data_md5"] == read_json(repo / "data/prepared/summary.json")["data_md5"]


def measured_accuracy(repo: Path, impl: str) -> float:
    """What evaluate measured: the figure every registry decision and description below must quote."""
    return read_json(repo / f"metrics/{impl}/eval.json")["test_accuracy"]


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_registered_with_candidate_and_champion_aliases(repo, runs, impl):
    client = mlflow.MlflowClient()
    name = f"softmax-mlops-{impl}"
    gate = config.load(repo).export.champion_min_accuracy
    accuracy = measured_accuracy(repo, impl)
    assert accuracy >= gate  # the default model passes the default gate, else nothing below would hold
    candidate = client.get_model_version_by_alias(name, "candidate")
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(candidate.version) == str(champion.version) == "1"
    assert candidate.run_id == runs[impl].info.run_id
    assert client.get_registered_model(name).tags["impl"] == impl
    assert (
        client.get_model_version(name, "1").tags["champion_reason"]
        == f"promoted: {accuracy:.4f} ≥ gate {gate:.4f}, no champion before"
    )


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_registered_version_says_what_it_is_and_loads_for_cpu_with_a_named_input(repo, runs, impl):
    import numpy as np
    import yaml

    from softmax_mlops.stages.data import load_split

    client = mlflow.MlflowClient()
    version = client.get_model_version(f"softmax-mlops-{impl}", "1")
    run = runs[impl]
    for fact in (
        read_json(repo / "data/prepared/summary.json")["data_md5"],
        run.data.tags["git_commit"],
        run.info.run_id,
        "lr=0.1",
        f"{measured_accuracy(repo, impl):.4f}",
    ):
        assert fact in version.description, fact
    local = Path(mlflow.artifacts.download_artifacts(f"models:/softmax-mlops-{impl}/1"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert json.loads(mlmodel["signature"]["inputs"])[0]["name"] == "image"
    images = load_split(repo / "data/prepared/test.npz")[0][:64]
    model = mlflow.pyfunc.load_model(str(local))
    named, unnamed = model.predict({"image": images}), model.predict(images)
    assert np.array_equal(named["probabilities"], unnamed["probabilities"])


def test_dvc_views_are_readable(repo):
    """`dvc metrics show` is one row per implementation, the headline figures, within 120 columns; the accuracy
    plot colours by kind of accuracy and has axis titles; the reliability diagrams are image plots."""
    shown = json.loads(run_tool("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    (files,) = [rev["data"] for rev in shown.values()]
    assert sorted(files) == ["metrics/concise/headline.json", "metrics/scratch/headline.json"]
    for figures in files.values():
        assert set(figures["data"]) == {"accuracy", "macro_f1", "ece", "temperature"}
    table = run_tool("dvc", "metrics", "show", cwd=repo).stdout.splitlines()
    assert len(table) == 3 and max(len(row) for row in table) <= 120, table

    plots = json.loads(run_tool("dvc", "plots", "show", "--json", cwd=repo).stdout)["data"]
    (accuracy,) = [v for k, v in plots.items() if k.startswith("accuracy per epoch")]
    spec = accuracy[0]["content"]
    assert spec["encoding"]["color"]["field"] == "curve" and spec["encoding"]["strokeDash"]["field"] == "impl"
    assert spec["encoding"]["y"]["title"] == "accuracy"
    curves = {(d["impl"], d["curve"]) for d in spec["data"]["values"]}
    assert len(curves) == 6
    assert {"reports/scratch/reliability.png", "reports/concise/reliability.png"} <= set(plots)


def test_plain_dvc_plots_show_renders_offline_in_a_browser(repo):
    """.dvc/config's plots.html_template names the page `make setup` builds (here built as make would), so
    plain `dvc plots show` writes a page with vega inlined: no script is fetched, and headless Chromium, with
    no network, draws every vega chart."""
    from helpers import render_offline

    configured = run_tool("dvc", "config", "plots.html_template", cwd=repo)
    assert configured.stdout.strip() == "plots/offline.html", configured.stderr
    made = run_tool("python", "tools/offline_plots.py", ".dvc/plots/offline.html", cwd=repo)
    assert made.returncode == 0, made.stderr
    shown = run_tool("dvc", "plots", "show", cwd=repo)
    assert shown.returncode == 0, shown.stderr
    page = repo / "dvc_plots" / "index.html"
    text = page.read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in text and "vegaEmbed" in text
    assert "<script src=" not in text and "cdn.jsdelivr" not in text
    dom = render_offline(page)
    charts = text.count("vegaEmbed(")
    assert charts >= 3 and dom.count('class="marks"') == charts, dom[-2000:]


def test_predict_from_the_registry_on_the_genuine_idx_file(repo, runs):
    import csv

    import numpy as np

    from softmax_mlops.stages.data import load_split

    mirror = Path(config.load(repo).mirror or "/nonexistent")
    source = mirror / "t10k-images-idx3-ubyte.gz"  # the genuine file, when the mirror is a local folder
    if not source.is_file():
        source = repo / "test_images.npy"
        np.save(source, load_split(repo / "data/prepared/test.npz")[0])
    out = repo / "predictions.csv"
    result = cli("predict", str(source), "-o", str(out), "-m", "models:/softmax-mlops-scratch@champion", cwd=repo)
    assert result.returncode == 0, result.stderr
    predicted = [int(row["class_id"]) for row in csv.DictReader(out.open())]
    labels = load_split(repo / "data/prepared/test.npz")[1]
    accuracy = (labels == predicted).mean()
    assert accuracy == pytest.approx(read_json(repo / "metrics/scratch/eval.json")["test_accuracy"])


def test_champion_stays_when_a_new_model_misses_the_gate(changed):
    params = (changed / "params.yaml").read_text()
    (changed / "params.yaml").write_text(params.replace("champion_min_accuracy: 0.82", "champion_min_accuracy: 0.99"))
    result = run_tool("dvc", "repro", "export@scratch", cwd=changed)
    assert result.returncode == 0, result.stdout + result.stderr
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("softmax-mlops-scratch", "candidate").version) == "2"
    assert str(client.get_model_version_by_alias("softmax-mlops-scratch", "champion").version) == "1"
    reason = f"kept v1: {measured_accuracy(changed, 'scratch'):.4f} < gate 0.9900"
    tags = client.get_model_version("softmax-mlops-scratch", "2").tags
    assert tags["champion_decision"] == "kept" and tags["champion_reason"] == reason
    assert f"- @champion: {reason}" in client.get_model_version("softmax-mlops-scratch", "2").description
    assert "kept v1" in result.stdout + result.stderr


def test_failing_stage_marks_its_run_failed(changed):
    run_id = read_json(changed / "models/concise/mlflow_run.json")["run_id"]
    (changed / "models/concise/weights.npz").write_bytes(b"garbage")
    result = cli("evaluate", "concise", cwd=changed)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "weights.npz is not a weights file" in result.stderr
    assert mlflow.get_run(run_id).info.status == "FAILED"


def test_a_fresh_clone_reproduces_the_committed_dvc_lock(repo):
    """The committed dvc.lock is what `dvc repro` writes in a fresh copy: every tracked output is a function of
    code, data and params (no timings, no run ids, no zip timestamps, no source paths), so git shows no change."""
    from helpers import REPO

    written = (first_run(repo) / "dvc.lock").read_text()
    assert written == (REPO / "dvc.lock").read_text(), "dvc.lock differs from what a fresh clone writes:\n" + "\n".join(
        line
        for line in difflib.unified_diff(
            (REPO / "dvc.lock").read_text().splitlines(),
            written.splitlines(),
            "committed",
            "fresh clone",
            lineterm="",
            n=6,
        )
    )


def test_a_second_clean_run_is_byte_identical(repo, tmp_path):
    """Same code, data, params and seed on the same machine, in another folder: byte-identical outputs and
    dvc.lock."""
    second = copy_project(tmp_path / "second")
    result = run_tool("dvc", "repro", cwd=second)
    assert result.returncode == 0, result.stdout + result.stderr
    first = first_run(repo)
    outputs = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(outputs) > 20
    assert [rel for rel in outputs if (second / rel).read_bytes() != (first / rel).read_bytes()] == []


def _imported(repo: Path, *command: str) -> set[str]:
    """The project modules a stage command really imports, from a run of it, as dvc.yaml runs it
    (`python -m softmax_mlops.stages ...`), under DVC's working directory."""
    assert command[:3] == ("python", "-m", "softmax_mlops.stages"), command
    script = (
        "import atexit, json, runpy, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('softmax_mlops', 'pipelines')))))\n"
        f"sys.argv = ['softmax_mlops.stages', *{list(command[3:])!r}]\n"
        "runpy.run_module('softmax_mlops.stages', run_name='__main__', alter_sys=True)\n"
    )
    result = run_tool("python", "-c", script, cwd=repo)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def rerun(repo, tmp_path_factory):
    """A copy of the shared project for the tests that run stage commands again: each run opens new MLflow runs
    and rewrites models/{impl}/mlflow_run.json, which the tests of the shared project read."""
    return clone_state(repo, tmp_path_factory.mktemp("rerun") / "project")


@pytest.mark.parametrize(
    "stage",
    ["ingest", "train@scratch", "train@concise", "evaluate@scratch", "calibrate@concise", "export@concise", "compare"],
)
def test_each_stage_depends_on_the_code_its_command_imports(rerun, stage):
    """A change to any module a stage runs must make DVC rerun it: every imported project module is a file
    (or inside a folder) the stage lists in its deps. And the other way: every code file it lists is one it
    imports, so a change elsewhere (serve's help, the console script) reruns nothing."""
    import importlib.util

    import yaml

    lock = yaml.safe_load((rerun / "dvc.lock").read_text())["stages"][stage]
    deps = [Path(d["path"]) for d in lock["deps"]]
    root = Path(importlib.util.find_spec("softmax_mlops").origin).resolve().parents[2]
    command = lock["cmd"].split()
    imported = set()  # `python -m X` runs X/__main__.py as __main__, not under its own name in sys.modules
    for module in [f"{command[2]}.__main__", *_imported(rerun, *command)]:
        imported.add(Path(importlib.util.find_spec(module).origin).resolve().relative_to(root))
    missing = sorted(str(rel) for rel in imported if not any(rel == dep or dep in rel.parents for dep in deps))
    assert missing == [], f"{stage} imports {missing} without depending on them"
    code = [dep for dep in deps if dep.parts[0] in ("src", "pipelines")]
    unused = [str(dep) for dep in code if not any(rel == dep or dep in rel.parents for rel in imported)]
    assert unused == [], f"{stage} depends on {unused}, which it never imports"
    assert not any(rel.parts[0] == "pipelines" for rel in imported), f"{stage} loads the orchestration layer"
