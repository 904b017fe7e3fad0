"""Waiting for a model that a fresh registry does not hold yet (the compose stack's inference service starts
before the first training run registers a champion), on a real MLflow SQLite store."""

import atexit
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import mlflow
import pytest

from softmax_mlops.errors import PipelineError
from softmax_mlops.serving.inference import resolve_model, retry_pauses, wait_for_model

URI = "models:/waiting-test@champion"


@pytest.fixture()
def store(tmp_path, new_mlflow_store):
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("wait")
    return uri


def register_champion(uri, folder, delay):
    time.sleep(delay)
    mlflow.set_tracking_uri(uri)
    (folder / "model.onnx").write_bytes(b"not really onnx: resolve only needs the file")
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(folder / "model.onnx"), artifact_path="model")
        source = mlflow.get_artifact_uri("model")
    client.create_registered_model("waiting-test")
    version = client.create_model_version("waiting-test", source, run_id=run.info.run_id)
    client.set_registered_model_alias("waiting-test", "champion", version.version)


def test_without_a_wait_a_missing_model_fails_at_once_in_one_line(store):
    with pytest.raises(PipelineError) as error:
        wait_for_model(URI, store, 0, lambda line: None)
    assert URI in str(error.value) and "\n" not in str(error.value)


def test_the_wait_is_bounded_and_says_what_it_waits_for(store):
    said, start = [], time.monotonic()
    with pytest.raises(PipelineError):
        wait_for_model(URI, store, 3, said.append)
    # the whole budget is used before giving up: the last attempt comes after the deadline, never before it
    # (a lower bound the schedule guarantees, not a measure of speed)
    assert time.monotonic() - start >= 3
    assert said and all(URI in line and "retrying in" in line for line in said)
    assert "retrying in 2 s" in said[0]  # the first pause of the schedule, well inside the 3 s wait


def test_the_pauses_double_from_two_seconds_up_to_a_minute():
    assert list(itertools.islice(retry_pauses(), 8)) == [2, 4, 8, 16, 32, 60, 60, 60]


def test_a_champion_registered_during_the_wait_is_served(store, tmp_path):
    (tmp_path / "artifacts").mkdir()
    writer = threading.Thread(target=register_champion, args=(store, tmp_path / "artifacts", 0.5))
    writer.start()
    said = []
    try:
        path = wait_for_model(URI, store, 120, said.append)
    finally:
        writer.join()
    assert path.name == "model.onnx" and path.is_file()
    assert said, "the first attempts, before the champion existed, were reported"


def test_a_local_path_is_never_waited_for(tmp_path):
    with pytest.raises(PipelineError, match="no ONNX model"):
        wait_for_model(str(tmp_path / "missing.onnx"), None, 60, lambda line: pytest.fail(line))


def test_the_wait_asks_the_store_it_is_given_not_the_process_default(store, tmp_path):
    """serve passes its tracking URI; a process whose MLflow default points elsewhere must still find the
    champion in that store."""
    (tmp_path / "artifacts").mkdir()
    register_champion(store, tmp_path / "artifacts", 0)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'missing' / 'other.db'}")  # a store that cannot open
    assert wait_for_model(URI, store, 0, lambda line: pytest.fail(line)).name == "model.onnx"


def test_a_downloaded_model_is_removed_when_the_process_exits(store, tmp_path):
    """MLflow downloads into a new temporary folder per call and never removes it: one more in /tmp for every
    predict and every export's champion check. The folder lives while the process may read it, and goes at
    exit; a failed download leaves nothing either. A real process, with TMPDIR of its own."""
    (tmp_path / "artifacts").mkdir()
    register_champion(store, tmp_path / "artifacts", 0)
    temp = tmp_path / "tmp"
    temp.mkdir()
    script = (
        "import pathlib, sys\n"
        "from softmax_mlops.errors import PipelineError\n"
        "from softmax_mlops.serving.inference import resolve_model\n"
        "path = resolve_model(sys.argv[1], sys.argv[2])\n"
        "assert path.is_file() and str(path).startswith(sys.argv[3]), path\n"
        "try:\n"
        "    resolve_model('models:/no-such-model@champion', sys.argv[2])\n"
        "except PipelineError:\n"
        "    pass\n"
        "print(len(list(pathlib.Path(sys.argv[3]).iterdir())))\n"
    )
    env = os.environ | {"TMPDIR": str(temp)}
    result = subprocess.run(
        [sys.executable, "-c", script, URI, store, str(temp)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "1"  # while it ran: the one model, not the failed attempt
    assert list(temp.iterdir()) == []


def test_the_download_goes_to_a_folder_of_its_own_that_exit_removes(store, tmp_path, monkeypatch):
    """In process, what the test above sees from outside: the model lands in a new softmax-mlops-model-* folder
    under the temporary directory, a failed download leaves none, and the exit handler removes the folder, even
    one that something else removed first (no traceback at exit)."""
    (tmp_path / "artifacts").mkdir()
    register_champion(store, tmp_path / "artifacts", 0)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    at_exit = []
    monkeypatch.setattr(atexit, "register", lambda func, *args, **kwargs: at_exit.append((func, args, kwargs)))
    removals = lambda: [entry for entry in at_exit if entry[0] is shutil.rmtree]  # noqa: E731 - tqdm registers too
    with pytest.raises(PipelineError):
        resolve_model("models:/no-such-model@champion", store)
    assert list(temp.iterdir()) == [] and removals() == []
    path = resolve_model(URI, store)
    (folder,) = temp.iterdir()
    assert folder.name.startswith("softmax-mlops-model-") and path.parent.is_relative_to(folder) and path.is_file()
    ((func, args, kwargs),) = removals()
    func(*args, **kwargs)
    assert not folder.exists()
    func(*args, **kwargs)  # already gone: no error
