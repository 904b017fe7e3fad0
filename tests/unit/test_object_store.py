"""All state in object storage: a DVC remote and MLflow's artifacts on a real S3 server (moto's, on 127.0.0.1).

The property that lets runs move between machines and containers: a stage that ran in one clone is a cache hit
in every later one, through the remote alone (run-cache or the lock's outputs), and MLflow clients need no S3
settings of their own, only the tracking server's address.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, run_tool
from pipelines.dvc_stages import Outcome, StageFailed, default_remote, experiment_workspace, push, reproduce
from stack import S3Server, free_port, wait_http, wait_until

pytestmark = pytest.mark.server

STAGE = """\
import os, pathlib
numbers = pathlib.Path("numbers.txt").read_text().split()
pathlib.Path("squares.txt").write_text("".join(f"{int(n) ** 2}\\n" for n in numbers))
with open(os.environ["RUN_LOG"], "a") as log:  # outside the project: counts the times the command ran
    log.write(os.getcwd() + "\\n")
"""


def git(*args: str, cwd: Path) -> None:
    result = run_tool("git", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def moto():
    with S3Server("dvc", "mlflow") as s3:
        yield s3


@pytest.fixture
def store(moto, monkeypatch):
    """The module's S3 server, emptied for each test: every test starts from an empty remote."""
    moto.reset()
    for key, value in S3Server.KEYS.items():
        monkeypatch.setenv(key, value)
    return moto


@pytest.fixture
def origin(tmp_path, monkeypatch) -> Path:
    """A bare git repository holding a one-stage DVC project, no dvc.lock yet (nothing has run)."""
    monkeypatch.setenv("RUN_LOG", str(tmp_path / "runs.log"))
    seed = tmp_path / "seed"
    seed.mkdir()
    git("init", "-q", "-b", "main", cwd=seed)
    (seed / "square.py").write_text(STAGE)
    (seed / "numbers.txt").write_text("1\n2\n3\n")
    (seed / "dvc.yaml").write_text(
        textwrap.dedent(f"""\
        stages:
          square:
            cmd: {sys.executable} square.py
            deps: [square.py, numbers.txt]
            outs: [squares.txt]
        """)
    )
    assert run_tool("dvc", "init", "-q", cwd=seed).returncode == 0
    assert run_tool("dvc", "config", "core.analytics", "false", cwd=seed).returncode == 0
    git("add", "-A", cwd=seed)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a stage", cwd=seed)
    git("clone", "-q", "--bare", str(seed), str(tmp_path / "origin.git"), cwd=tmp_path)
    return tmp_path / "origin.git"


def clone(origin: Path, name: str, endpoint: str) -> Path:
    """A fresh clone (no DVC cache, no outputs) with the store as its default remote, set --local as the stack
    sets it: the endpoint and the keys never reach a committed file."""
    dest = origin.parent / name
    git("clone", "-q", str(origin), str(dest), cwd=origin.parent)
    for cmd in (
        ("remote", "add", "--local", "-d", "store", "s3://dvc/cache"),
        ("remote", "modify", "--local", "store", "endpointurl", endpoint),
    ):
        result = run_tool("dvc", *cmd, cwd=dest)
        assert result.returncode == 0, result.stderr
    return dest


def runs(origin: Path) -> int:
    log = origin.parent / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_without_a_remote_nothing_is_pulled_or_pushed(origin, tmp_path):
    plain = tmp_path / "plain"
    git("clone", "-q", str(origin), str(plain), cwd=tmp_path)
    assert default_remote(plain) is None
    assert not any(line.startswith("url") for line in (plain / ".dvc" / "config").read_text().splitlines())


def test_a_stage_run_in_one_clone_is_a_cache_hit_in_every_later_one(store, origin):
    first = clone(origin, "first", store.url)
    assert default_remote(first) == "store"
    assert reproduce(first, "square", pull=True) is Outcome.RAN  # an empty remote: the command runs
    assert runs(origin) == 1
    assert push(first, ["square"]) >= 2  # the output and its run-cache entry
    assert any(k.startswith("cache/files/md5/") for k in store.keys("dvc"))
    assert any(k.startswith("cache/runs/") for k in store.keys("dvc"))
    assert "endpointurl" not in (first / ".dvc" / "config").read_text()  # only in config.local

    # a new clone of the same commit (its dvc.lock never saw the run): restored from the run-cache, not rerun
    second = clone(origin, "second", store.url)
    assert reproduce(second, "square", pull=True) is Outcome.RESTORED
    assert runs(origin) == 1
    assert (second / "squares.txt").read_text() == "1\n4\n9\n"

    # once the lock is committed, a clone pulls the locked outputs: nothing is reproduced at all
    git("add", "dvc.lock", cwd=first)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", cwd=first)
    git("push", "-q", "origin", "main", cwd=first)
    third = clone(origin, "third", store.url)
    assert reproduce(third, "square", pull=True) is Outcome.UP_TO_DATE
    assert runs(origin) == 1
    assert (third / "squares.txt").read_text() == "1\n4\n9\n"


def test_a_changed_dependency_still_runs_with_a_remote(store, origin):
    first = clone(origin, "first", store.url)
    reproduce(first, "square", pull=True)
    push(first, ["square"])
    (first / "numbers.txt").write_text("4\n")
    assert reproduce(first, "square", pull=True) is Outcome.RAN
    assert runs(origin) == 2
    assert (first / "squares.txt").read_text() == "16\n"


def test_an_experiment_worktree_keeps_the_local_remote(store, origin):
    first = clone(origin, "first", store.url)
    with experiment_workspace(first, []) as ws:
        assert default_remote(ws) == "store"
        assert reproduce(ws, "square", pull=True) is Outcome.RAN
        assert push(ws, ["square"]) >= 2
    assert any(k.startswith("cache/runs/") for k in store.keys("dvc"))


def test_an_unreachable_store_fails_the_push_in_one_line_naming_it(origin, monkeypatch, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the message is ours; botocore's retries only delay it (15 s)
    first = clone(origin, "first", dead)
    reproduce(first, "square", pull=False)
    with pytest.raises(StageFailed) as failed:
        push(first, ["square"])
    message = str(failed.value)
    assert message.startswith("push: ") and "\n" not in message
    assert dead in message or "127.0.0.1" in message, message


@pytest.mark.heavy  # an MLflow server of its own, a model logged and loaded through it: some 15 s
@pytest.mark.timeout(300)
def test_mlflow_clients_log_and_load_models_through_a_server_that_keeps_artifacts_in_s3(
    store, onnx_model, tmp_path, monkeypatch
):
    """The server alone holds the S3 endpoint and keys (--artifacts-destination): the client logs an ONNX model
    and loads it back through the server's proxy, with no AWS setting in its environment."""
    import mlflow
    import onnx

    from softmax_mlops.serving.inference import Predictor, resolve_model

    port = free_port()
    server_env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": store.url, **S3Server.KEYS}
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", "s3://mlflow/a"]
    proc = subprocess.Popen(cmd, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc)
        for key in (*S3Server.KEYS, "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(key, raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("object-store")
        path, _ = onnx_model
        with mlflow.start_run():
            mlflow.onnx.log_model(onnx.load(path), name="model", registered_model_name="s3-model")
        assert any(key.endswith("model.onnx") for key in store.keys("mlflow", "a/"))
        local = resolve_model("models:/s3-model/1", uri)
        _, probabilities = Predictor(local).run(np.zeros((1, 28, 28), np.uint8))
        assert probabilities.shape == (1, 10)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_unreachable_store_fails_a_pulling_stage_in_one_line_naming_it(origin, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # as above
    first = clone(origin, "first", dead)
    with pytest.raises(StageFailed) as failed:
        reproduce(first, "square", pull=True)
    message = str(failed.value)
    assert message.startswith("square: ") and "\n" not in message
    assert dead in message, message
    assert runs(origin) == 0


def test_the_stand_in_keeps_its_objects_across_a_restart_and_the_buckets_job_is_idempotent(tmp_path):
    """docker/standins/objectstore.py (moto plus its request recorder) keeps the real store's contract of data
    that survives `down`/`up`; docker/buckets.py creates what is missing and leaves what exists."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    recording = tmp_path / "volume" / "recording.jsonl"
    recording.parent.mkdir()
    env = {
        **os.environ,
        **S3Server.KEYS,
        "MOTO_ENABLE_RECORDING": "1",
        "MOTO_RECORDER_FILEPATH": str(recording),
        "OBJECTSTORE_PORT": str(port),
        "OBJECTSTORE_HOST": "127.0.0.1",
        "AWS_ENDPOINT_URL": url,
        "S3_BUCKETS": "dvc mlflow",
        "SOFTMAX_MLOPS_WAIT_S": "60",
    }
    script = REPO / "docker" / "standins" / "objectstore.py"
    s3 = boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", **{k.lower(): v for k, v in S3Server.KEYS.items()}
    )

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
        wait_until(lambda: _answers_signed(s3), f"the stand-in at {url}", 60, proc)
        return proc

    def buckets() -> str:
        job = subprocess.run(
            [sys.executable, str(REPO / "docker" / "buckets.py")], env=env, capture_output=True, text=True
        )
        assert job.returncode == 0, job.stderr
        return job.stdout

    store = start()
    try:
        assert buckets().count("created") == 2
        s3.put_object(Bucket="dvc", Key="cache/files/md5/ab/cdef", Body=b"\x00\x01 a binary object \xff")
        s3.put_object(Bucket="mlflow", Key="a/model.onnx", Body=b"x" * 100_000)
        s3.delete_object(Bucket="mlflow", Key="a/model.onnx")
        # DVC and MLflow upload in parallel: moto's recorder writes an entry and its newline in two calls, so
        # concurrent requests could share a line, and the replay would then fail (seen in a stack run).
        bodies = {f"par/{i}": os.urandom(300_000) for i in range(64)}
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: s3.put_object(Bucket="dvc", Key=kv[0], Body=kv[1]), bodies.items()))
    finally:
        store.send_signal(signal.SIGTERM)
        assert store.wait(timeout=30) == 0
    store = start()
    try:
        assert buckets().count("exists") == 2
        assert s3.get_object(Bucket="dvc", Key="cache/files/md5/ab/cdef")["Body"].read() == (
            b"\x00\x01 a binary object \xff"
        )
        assert s3.list_objects_v2(Bucket="mlflow").get("KeyCount") == 0
        for key, body in bodies.items():
            assert s3.get_object(Bucket="dvc", Key=key)["Body"].read() == body, key
    finally:
        store.send_signal(signal.SIGTERM)
        store.wait(timeout=30)


def _answers_signed(s3) -> bool:
    import botocore.exceptions

    try:
        s3.list_buckets()
    except botocore.exceptions.EndpointConnectionError:
        return False
    return True


def test_the_stand_in_answers_only_requests_signed_with_its_keys(tmp_path):
    """Like the real store, the stand-in checks credentials (moto's SigV4 check against the keys in its
    environment): no signature, another access key or a wrong secret gets 403, and moto's control API, which
    could switch the check off, is closed on the store's port."""
    import boto3
    import botocore.exceptions
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **S3Server.KEYS,
        "MOTO_ENABLE_RECORDING": "1",
        "MOTO_RECORDER_FILEPATH": str(tmp_path / "recording.jsonl"),
        "OBJECTSTORE_PORT": str(port),
        "OBJECTSTORE_HOST": "127.0.0.1",
    }

    def client(key: str, secret: str):
        return boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
        )

    right = client(S3Server.KEYS["AWS_ACCESS_KEY_ID"], S3Server.KEYS["AWS_SECRET_ACCESS_KEY"])
    script = REPO / "docker" / "standins" / "objectstore.py"
    store = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _answers_signed(right), f"the stand-in at {url}", 60, store)
        right.create_bucket(Bucket="dvc")
        right.put_object(Bucket="dvc", Key="a", Body=b"kept")
        assert right.get_object(Bucket="dvc", Key="a")["Body"].read() == b"kept"
        refused = {}
        for name, other in (
            ("wrong secret", client(S3Server.KEYS["AWS_ACCESS_KEY_ID"], "not-the-secret")),
            ("other key", client("someone-else", S3Server.KEYS["AWS_SECRET_ACCESS_KEY"])),
        ):
            with pytest.raises(botocore.exceptions.ClientError) as denied:
                other.get_object(Bucket="dvc", Key="a")
            refused[name] = (denied.value.response["ResponseMetadata"]["HTTPStatusCode"],
                             denied.value.response["Error"]["Code"])  # fmt: skip
        assert refused == {"wrong secret": (403, "SignatureDoesNotMatch"), "other key": (403, "InvalidAccessKeyId")}
        for unsigned in (f"{url}/dvc/a", f"{url}/dvc?list-type=2", f"{url}/"):  # no signature at all
            refused_anonymous = httpx.get(unsigned)
            assert refused_anonymous.status_code == 403, unsigned
            assert b"<Code>AccessDenied</Code>" in refused_anonymous.content
        assert httpx.post(f"{url}/moto-api/reset-auth", content=b"inf").status_code == 403
        assert httpx.get(f"{url}/dvc/a").status_code == 403  # still closed
    finally:
        store.send_signal(signal.SIGTERM)
        assert store.wait(timeout=30) == 0


def test_the_stand_in_refuses_to_start_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in S3Server.KEYS}
    env.update(MOTO_RECORDER_FILEPATH=str(tmp_path / "r.jsonl"), OBJECTSTORE_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, str(REPO / "docker" / "standins" / "objectstore.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "objectstore: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set"


def test_the_buckets_job_gives_up_on_an_absent_store_in_one_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, **S3Server.KEYS, "AWS_ENDPOINT_URL": dead, "S3_BUCKETS": "dvc", "SOFTMAX_MLOPS_WAIT_S": "0"}
    job = subprocess.run([sys.executable, str(REPO / "docker" / "buckets.py")], env=env, capture_output=True, text=True)
    assert job.returncode == 1
    (line,) = job.stderr.strip().splitlines()
    assert line.startswith(f"buckets: the object store at {dead} did not answer within 0 s")


def test_a_locked_stage_whose_outputs_the_remote_lacks_runs(store, origin):
    """A fresh container: dvc.lock committed, outputs neither in the workspace nor on the (empty) remote. DVC's
    pull fails to check them out, and the stage runs instead of failing."""
    first = clone(origin, "first", store.url)
    reproduce(first, "square")  # no pull, no push: the remote stays empty
    git("add", "dvc.lock", cwd=first)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock", cwd=first)
    git("push", "-q", "origin", "main", cwd=first)
    second = clone(origin, "second", store.url)
    assert reproduce(second, "square", pull=True) is Outcome.RAN
    assert runs(origin) == 2
    assert (second / "squares.txt").read_text() == "1\n4\n9\n"
