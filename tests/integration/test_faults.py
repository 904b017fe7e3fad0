"""Faults, with real processes on the real data: signals to `dvc repro` and `predict`, an MLflow server that is
absent or killed mid-run, and read-only or full filesystems (a tmpfs and a read-only bind mount; root only).

Each fault must end in one line that names the file or URI, a non-zero exit, no partial outputs, and no
MLflow run left RUNNING."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import cli, copy_project, run_tool
from stack import free_port, wait_http

pytestmark = [pytest.mark.realdata, pytest.mark.server]
TRAIN_OUTPUTS = (
    "models/scratch/weights.npz",
    "models/scratch/mlflow_run.json",
    "metrics/scratch/history.csv",
    "metrics/scratch/train.json",
)
LONG = ["-S", "train.epochs=400"]  # long enough to be interrupted mid-training


@pytest.fixture(scope="module")
def ingested(real_splits, tmp_path_factory):
    """A project copy with the data ingested (the stages below train from it)."""
    root = copy_project(tmp_path_factory.mktemp("faults") / "project")
    assert run_tool("dvc", "repro", "ingest", cwd=root).returncode == 0
    return root


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def runs(root: Path) -> list[tuple[str, str]]:
    """(run id, status) of every run in the project's SQLite store; none while MLflow is still creating it
    (the file exists before its tables do)."""
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db:
        try:
            return db.execute("select run_uuid, status from runs").fetchall()
        except sqlite3.OperationalError:
            return []


WAIT_S = 300  # the longest wait here is for a stage to start training: an MLflow run, torch's import, the data


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the process ended first ({proc.returncode}):\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")
        time.sleep(0.2)


def stage_children(root: Path) -> list[int]:
    """Stage processes started by DVC for this project (DVC_ROOT in their environment): dvc.yaml runs
    `python -m softmax_mlops.stages ...`; `softmax-mlops ...` by hand."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"DVC_ROOT={root}".encode() in environ and (
            b"softmax_mlops.stages" in cmdline or b"softmax-mlops" in cmdline
        ):
            found.append(int(proc.name))
    return found


def set_params(root: Path, *overrides: str) -> None:
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(root / "params.yaml"), list(overrides))


@pytest.fixture()
def fresh(ingested):
    """The ingested project with the train outputs and the MLflow store cleared after each test."""
    yield ingested
    run_tool("git", "checkout", "params.yaml", cwd=ingested)
    for rel in (*TRAIN_OUTPUTS, "mlflow.db"):
        (ingested / rel).unlink(missing_ok=True)


@pytest.mark.parametrize("target", ["dvc only", "whole process group"])
def test_sigterm_to_dvc_repro_stops_the_stage_cleanly(fresh, target):
    root = fresh
    set_params(root, "train.epochs=400")
    proc = subprocess.Popen(
        ["dvc", "repro", "train@scratch"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: (root / "mlflow.db").exists() and any(s == "RUNNING" for _, s in runs(root)),
            "the training run to start",
            proc,
        )
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # a failed wait must not leave DVC holding the project's lock
        raise
    if target == "dvc only":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    assert proc.returncode != 0
    wait_for(lambda: not stage_children(root), "the stage command to stop after DVC")
    assert [s for _, s in runs(root)] == ["FAILED"], (
        f"the run is ended, not left RUNNING:\n{proc.stderr.read()[-3000:]}"
    )
    assert not [rel for rel in TRAIN_OUTPUTS if (root / rel).exists()], "no partial outputs"


def test_ctrl_c_on_a_stage_prints_the_cli_line(fresh):
    root = fresh
    set_params(root, "train.epochs=400")
    proc = subprocess.Popen(
        ["softmax-mlops", "train", "scratch"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: (root / "mlflow.db").exists() and any(s == "RUNNING" for _, s in runs(root)),
            "the training run to start",
            proc,
        )
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert one_line(stderr) == "softmax-mlops: interrupted (SIGINT)"
    assert [s for _, s in runs(root)] == ["FAILED"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_to_predict_leave_no_temporary_file(ingested, real_splits, tmp_path, onnx_model, sig):
    images = np.tile(real_splits["test"][0], (40, 1, 1))
    np.save(tmp_path / "big.npy", images)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            "softmax-mlops",
            "predict",
            str(tmp_path / "big.npy"),
            "-o",
            str(out / "p.csv"),
            "-m",
            str(onnx_model[0]),
            "--batch-size",
            "256",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: out.exists() and any(out.iterdir()), "predict to start writing", proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate()
    assert proc.returncode == 130
    assert one_line(stderr) == f"softmax-mlops: interrupted ({sig.name})"
    assert "Exception ignored" not in stderr and "BufferError" not in stderr
    assert list(out.iterdir()) == []


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1, which a test may kill."""
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    cmd = [
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{store}/mlflow.db",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    procs = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return proc

    yield f"http://127.0.0.1:{port}", start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_an_absent_tracking_server_is_one_line_naming_it(fresh):
    uri = f"http://127.0.0.1:{free_port()}"
    result = cli("train", "scratch", cwd=fresh, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("softmax-mlops: error: MLflow at ") and uri in line
    assert not [rel for rel in TRAIN_OUTPUTS if (fresh / rel).exists()]


def test_a_tracking_server_killed_mid_run_fails_the_stage_and_the_next_run_ends_the_orphan(fresh, mlflow_server):
    import mlflow

    uri, start = mlflow_server
    server = start()
    set_params(fresh, "train.epochs=400")
    proc = subprocess.Popen(
        ["softmax-mlops", "train", "scratch"],
        cwd=fresh,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    client = mlflow.MlflowClient(uri)

    def running() -> bool:
        experiment = client.get_experiment_by_name("softmax-mlops")
        return bool(experiment and client.search_runs([experiment.experiment_id]))

    wait_for(running, "the run to start", proc)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    _, stderr = proc.communicate()
    assert proc.returncode == 1
    line = one_line(stderr)
    assert line.startswith("softmax-mlops: error: MLflow at ") and uri in line
    assert not [rel for rel in TRAIN_OUTPUTS if (fresh / rel).exists()], "no partial outputs"

    start()  # the server is back, with the same store: the killed run is still RUNNING there
    (orphan,) = client.search_runs([client.get_experiment_by_name("softmax-mlops").experiment_id])
    assert orphan.info.status == "RUNNING"
    set_params(fresh, "train.epochs=1")
    assert cli("train", "scratch", cwd=fresh, env={"MLFLOW_TRACKING_URI": uri}).returncode == 0
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"


@contextlib.contextmanager
def mounted(*args: str, target: Path):
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        message = f"cannot mount here (needs root): {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_models_folder_is_one_line_and_no_outputs(fresh):
    set_params(fresh, "train.epochs=1")
    (fresh / "models").mkdir(exist_ok=True)
    with mounted("--bind", str(fresh / "models"), target=fresh / "models"):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(fresh / "models")], check=True)
        result = cli("train", "scratch", cwd=fresh)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "models/scratch" in line and "Read-only file system" in line
    assert not [rel for rel in TRAIN_OUTPUTS if (fresh / rel).exists()]
    assert [s for _, s in runs(fresh)] == ["FAILED"]


def test_a_full_artifact_store_is_one_line_and_no_outputs(fresh):
    set_params(fresh, "train.epochs=1")
    with mounted("-t", "tmpfs", "-o", "size=16k", "tmpfs", target=fresh / "mlartifacts"):
        result = cli("train", "scratch", cwd=fresh)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "mlartifacts" in line and "No space left on device" in line
    assert not [rel for rel in TRAIN_OUTPUTS if (fresh / rel).exists()], "no partial outputs"
    assert [s for _, s in runs(fresh)] == ["FAILED"]


def test_a_disk_filling_up_under_the_parquet_writer_is_one_line_and_no_file(tmp_path, onnx_model, real_splits):
    """The disk fills up while a full row group is written mid-run: predict ends in one line naming the output,
    with nothing left behind (the writer is dropped, not flushed again: pyarrow's "Operation on closed file"
    traceback would replace the real reason)."""
    from softmax_mlops.serving.parquet import ROW_GROUP_ROWS

    images = real_splits["test"][0]
    np.save(tmp_path / "in.npy", np.tile(images, (-(-(ROW_GROUP_ROWS + 1) // len(images)), 1, 1)))
    with mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=tmp_path / "full"):
        out = tmp_path / "full" / "p.parquet"
        result = cli("predict", str(tmp_path / "in.npy"), "-o", str(out), "-m", str(onnx_model[0]), cwd=tmp_path)
        left = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"softmax-mlops: error: cannot write {out}: ") and "No space left on device" in line, line
    assert left == [], "no partial output"


def test_predict_into_a_read_only_folder_is_one_line(tmp_path, onnx_model, real_splits):
    np.save(tmp_path / "in.npy", real_splits["test"][0][:10])
    with mounted("-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", target=tmp_path / "ro"):
        result = cli(
            "predict",
            str(tmp_path / "in.npy"),
            "-o",
            str(tmp_path / "ro" / "p.csv"),
            "-m",
            str(onnx_model[0]),
            cwd=tmp_path,
        )
    assert result.returncode == 1
    assert one_line(result.stderr) == (
        f"softmax-mlops: error: cannot write {tmp_path / 'ro' / 'p.csv'}: Read-only file system"
    )
