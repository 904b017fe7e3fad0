"""Sharded batch inference on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
127.0.0.1, reporting to a real Prefect server, driven through `softmax-mlops predict --dask-address`.

100,000 genuine Fashion-MNIST images (the test set, ten times) go through the single-process path and the
sharded one, and must give the same rows and the same drift report. A worker is killed in the middle of a run,
and the run must still finish with every shard once. Hostile shards fail alone, in one line each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import model_copy
from softmax_mlops.serving import drift
from softmax_mlops.serving.inference import Predictor
from stack import Processes, free_port, prefect_env, wait_http, wait_until

IMAGES = 100_000
RUN_S = 600  # a bound against hangs, not a speed


def _dask_worker(scheduler: str, env: dict, cwd) -> subprocess.Popen:
    """One worker process (no nanny: killing it kills the worker, nothing restarts it), in a session of its own."""
    cmd = ["dask", "worker", scheduler, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"]
    log = open(cwd / f"worker-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Prefect server, a Dask scheduler and two workers on 127.0.0.1; the env for clients, and the workers."""
    root = tmp_path_factory.mktemp("dask")
    env = prefect_env(root, root / "prefect-home", free_port())
    env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    port = env["PREFECT_API_URL"].split(":")[-1].split("/")[0]
    with Processes() as procs:
        server = procs.start("prefect", "server", "start", "--host", "127.0.0.1", "--port", port, cwd=root, env=env)
        scheduler_port = free_port()
        address = f"tcp://127.0.0.1:{scheduler_port}"
        cmd = ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(scheduler_port), "--no-dashboard"]
        scheduler = procs.start(*cmd, cwd=root, env=env)
        wait_http(f"{env['PREFECT_API_URL']}/health", server)
        workers = [_dask_worker(address, env, root) for _ in range(2)]
        try:
            wait_until(lambda: _workers(address) == 2, "two Dask workers", 120, scheduler)
            yield {"root": root, "env": env, "address": address, "workers": workers, "scheduler": scheduler}
        finally:
            for worker in workers:
                if worker.poll() is None:
                    os.killpg(worker.pid, signal.SIGCONT)  # a test that failed may leave one frozen
                    os.killpg(worker.pid, signal.SIGTERM)
                    try:
                        worker.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        os.killpg(worker.pid, signal.SIGKILL)
                        worker.wait()


def _workers(address: str) -> int:
    from distributed import Client

    try:
        with Client(address, timeout=5) as client:
            return len(client.scheduler_info()["workers"])
    except OSError:
        return 0


def _address_of(address: str, pid: int) -> str:
    """The Dask address of the worker in process ``pid``."""
    from distributed import Client

    with Client(address, timeout=5) as client:
        return next(worker for worker, worker_pid in client.run(os.getpid).items() if worker_pid == pid)


def _held(address: str, worker: str) -> int:
    """The tasks the scheduler has given ``worker`` and not seen finish."""
    from distributed import Client

    with Client(address, timeout=5) as client:
        return len(client.processing([worker])[worker])


@pytest.fixture(scope="module")
def batch(real_splits, onnx_model, tmp_path_factory):
    """100,000 genuine images as .npy, and a model with a drift reference made from the test set."""
    folder = tmp_path_factory.mktemp("batch")
    test_images = real_splits["test"][0]
    images = np.ascontiguousarray(np.tile(test_images, (IMAGES // len(test_images), 1, 1)))
    np.save(folder / "images.npy", images)
    model = model_copy(onnx_model, folder / "model")
    drift.save_reference(model.with_name(drift.REFERENCE_FILE), Predictor(model).run(test_images)[1], test_images)
    return folder / "images.npy", model


def _predict(*args, env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["softmax-mlops", "predict", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_S
    )


def _table(path):
    return pq.read_table(path).sort_by("id")


@pytest.fixture(scope="module")
def single(cluster, batch):
    """The single-process predictions, to compare the sharded ones with."""
    images, model = batch
    out = cluster["root"] / "single.parquet"
    done = _predict(images, "-o", out, "-m", model, env=cluster["env"], cwd=cluster["root"])
    assert done.returncode == 0, done.stderr
    return out


def test_the_sharded_flow_on_two_workers_predicts_what_one_process_does(cluster, batch, single):
    images, model = batch
    out = cluster["root"] / "sharded.parquet"
    done = _predict(
        images, "-o", out, "-m", model, "--dask-address", cluster["address"], "--shard-size", "15000",
        env=cluster["env"], cwd=cluster["root"],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"predict: {IMAGES} images in 7 parts -> {out}" in done.stdout
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [p["rows"] for p in manifest["parts"]] == [15000] * 6 + [10000]
    sharded = _table(out)  # pyarrow reads the folder as one dataset: the "_" files are not parts
    assert sharded.num_rows == IMAGES
    assert sharded.equals(_table(single))
    assert json.loads((cluster["root"] / "sharded.drift.json").read_text()) == json.loads(
        (cluster["root"] / "single.drift.json").read_text()
    )
    # rerun: complete already, nothing is predicted again
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _predict(
        images, "-o", out, "-m", model, "--dask-address", cluster["address"], "--shard-size", "15000",
        env=cluster["env"], cwd=cluster["root"],
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("_manifest")} == {
        name: mtime for name, mtime in before.items() if not name.startswith("_manifest")
    }


def test_a_worker_killed_mid_run_loses_no_shard_and_counts_none_twice(cluster, batch, single):
    """One worker is frozen (SIGSTOP) once the first shard is done, holding the shards Dask gave it, then killed
    (SIGKILL) after the other has gone on: Dask gives the dead worker's shards to the live one."""
    images, model = batch
    out = cluster["root"] / "killed.parquet"
    cmd = ["softmax-mlops", "predict", str(images), "-o", str(out), "-m", str(model)]
    cmd += ["--dask-address", cluster["address"], "--shard-size", "2000", "--batch-size", "256"]
    log = open(cluster["root"] / "killed.log", "w+")  # noqa: SIM115
    run = subprocess.Popen(cmd, cwd=cluster["root"], env=cluster["env"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(list(out.glob("_part-*.json"))) >= 1, "a first finished shard", RUN_S, run)
        victim = cluster["workers"][0]
        victim_address = _address_of(cluster["address"], victim.pid)
        os.killpg(victim.pid, signal.SIGSTOP)
        finished = len(list(out.glob("_part-*.json")))
        wait_until(lambda: len(list(out.glob("_part-*.json"))) >= finished + 3, "the other worker going on", RUN_S, run)
        assert _held(cluster["address"], victim_address) >= 1  # the frozen worker holds shards the run waits for
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert run.wait(timeout=RUN_S) == 0, log.seek(0) or log.read()
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["parts"]) == 50 and manifest["images"] == IMAGES
    killed = _table(out)
    ids = killed.column("id").to_numpy()
    assert len(ids) == IMAGES and len(np.unique(ids)) == IMAGES  # none lost, none twice
    assert killed.equals(_table(single))
    assert _workers(cluster["address"]) == 1


def test_hostile_shards_fail_alone_in_one_line_each_and_the_good_ones_are_kept(cluster, batch, real_splits):
    _, model = batch
    folder = cluster["root"] / "hostile"
    folder.mkdir()
    test_images = real_splits["test"][0]
    raw = [image.tobytes() for image in test_images[:300]]
    pq.write_table(pa.table({"image": pa.array(raw[:100], pa.binary())}), folder / "a-good.parquet")
    (folder / "b-corrupt.parquet").write_bytes(b"PAR1" + os.urandom(500) + b"PAR1")
    short = raw[100:200]
    short[5] = short[5][:783]  # one row of 783 bytes: skipped with --skip-bad, the other 99 kept
    pq.write_table(pa.table({"image": pa.array(short, pa.binary())}), folder / "c-short-row.parquet")
    pq.write_table(pa.table({"image": pa.array(list(range(100)), pa.int64())}), folder / "d-wrong-type.parquet")
    pq.write_table(pa.table({"image": pa.array(raw[200:], pa.binary())}), folder / "e-good.parquet")
    out = cluster["root"] / "hostile-out.parquet"
    done = _predict(
        folder, "-o", out, "-m", model, "--dask-address", cluster["address"], "--shard-size", "100", "--skip-bad",
        env=cluster["env"], cwd=cluster["root"],
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("softmax-mlops: error: 2 of 5 shards failed (shard 1: ") and "b-corrupt.parquet" in last
    assert "the 3 finished parts are kept" in last
    assert "; shard 3: " in last and "d-wrong-type.parquet: column 'image' is int64" in last
    assert not (out / "_manifest.json").exists()
    kept = {(m := json.loads(p.read_text()))["shard"]: (m["rows"], m["skipped"]) for p in out.glob("_part-*.json")}
    assert kept == {0: (100, 0), 2: (99, 1), 4: (100, 0)}  # the 783-byte row skipped, its 99 neighbours kept
    assert pq.read_table(out / "part-00002.parquet").column("id").to_pylist() == [*range(100, 105), *range(106, 200)]
