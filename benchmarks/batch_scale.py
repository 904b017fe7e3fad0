"""Batch inference at scale, side by side in one run, on a million images (the test set repeated) and the model
the pipeline exported (models/{impl}/model.onnx, so `dvc repro` first):

1. the bound: onnxruntime alone on the array in memory, in predict's batches;
2. `softmax-mlops predict` end to end from a .npy, to CSV and to Parquet, and from a Parquet dataset of 8 files
   to Parquet; `predict` of 10 images (its start-up: the interpreter, imports, the model); and predict.run to
   Parquet in this process (what the images cost, without the start-up), the median of three;
3. the sharded path (`predict --dask-address`, Prefect tasks on prefect-dask) on a Dask cluster that has already
   started, with 1 worker and then 2, .npy to a folder of Parquet parts, reporting to a Prefect server that has
   already started too.

Usage: python benchmarks/batch_scale.py [--impl scratch] [--images 1000000] [--shard-size 125000]
Goals: predict to Parquet within 2x of the bound; the sharded path on 2 workers faster than predict to Parquet.
Prints the figures and writes them to benchmarks/results/batch_scale.json (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import record

from softmax_mlops import config
from softmax_mlops.stages.data import load_split


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def inputs(images: np.ndarray, count: int, folder: Path) -> tuple[Path, Path]:
    """``count`` images as a .npy and as a Parquet dataset of 8 files (raw 784-byte values)."""
    npy = folder / "images.npy"
    big = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(count, 28, 28))
    for start in range(0, count, len(images)):
        big[start : start + len(images)] = images[: count - start]
    big.flush()
    dataset = folder / "images-parquet"
    dataset.mkdir()
    per_file = -(-count // 8)
    for f, start in enumerate(range(0, count, per_file)):
        chunk = np.ascontiguousarray(big[start : start + per_file]).reshape(-1, 784)
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(784), len(chunk), [None, pa.py_buffer(chunk)])
        pq.write_table(pa.table({"image": column.cast(pa.binary())}), dataset / f"part-{f}.parquet")
    del big
    return npy, dataset


def bound(model: Path, npy: Path, batch_size: int) -> float:
    """onnxruntime alone on the array in memory: the seconds for every batch, the median of three (one pass is
    about a second, which this machine's noise moves by a third)."""
    from softmax_mlops.serving.inference import Predictor

    predictor = Predictor(model)
    array = np.load(npy)
    predictor.run(array[:batch_size])  # warm-up
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for first in range(0, len(array), batch_size):
            predictor.run(array[first : first + batch_size])
        runs.append(time.perf_counter() - start)
    return sorted(runs)[1]


def in_process(model: Path, npy: Path, out: Path, cfg: config.Config) -> float:
    """predict.run to Parquet, with drift, in this process (no interpreter start, imports or model load): the
    median of three."""
    from softmax_mlops.serving import predict
    from softmax_mlops.serving.inference import Predictor

    predictor, runs = Predictor(model), []
    for _ in range(3):
        start = time.perf_counter()
        predict.run(npy, out, predictor, cfg.predict.batch_size, cfg.predict.top_k, progress=False, drift_cfg=cfg.drift)
        runs.append(time.perf_counter() - start)
    return sorted(runs)[1]


def timed(cmd: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return seconds


def prefect_server(home: Path) -> tuple[subprocess.Popen, dict]:
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    cmd = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                return server, env
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the Prefect server did not start")
        time.sleep(0.5)


def sharded(npy: Path, out: Path, model: Path, workers: int, shard_size: int, env: dict, cwd: Path) -> float:
    """The sharded path on a cluster of ``workers`` that has started before the clock starts."""
    from distributed import LocalCluster

    api = {"PREFECT_API_URL": env["PREFECT_API_URL"], "PREFECT_LOGGING_LEVEL": "WARNING"}
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", env=api
    ) as cluster:
        cmd = ["softmax-mlops", "predict", str(npy), "-o", str(out), "-m", str(model)]
        cmd += ["--dask-address", cluster.scheduler_address, "--shard-size", str(shard_size)]
        return timed(cmd, env, cwd)


def main() -> tuple[dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="scratch", choices=config.IMPLS)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=125_000)
    args = parser.parse_args()
    cfg = config.load(Path(__file__).resolve().parents[1])
    model = cfg.paths.onnx(args.impl)
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run `dvc repro` first")
    images, _ = load_split(cfg.paths.test_data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npy, dataset = inputs(images, args.images, folder)
        ten = folder / "ten.npy"
        np.save(ten, images[:10])
        server, env = prefect_server(folder / "prefect-home")
        try:
            predict = ["softmax-mlops", "predict", "-m", str(model)]
            seconds = {
                "onnxruntime alone (bound)": bound(model, npy, cfg.predict.batch_size),
                "predict .npy to CSV": timed([*predict, str(npy), "-o", str(folder / "out.csv")], env, cfg.root),
                "predict .npy to Parquet": timed([*predict, str(npy), "-o", str(folder / "a.parquet")], env, cfg.root),
                "predict Parquet dataset to Parquet": timed(
                    [*predict, str(dataset), "-o", str(folder / "b.parquet")], env, cfg.root
                ),
                "predict of 10 images to Parquet (start-up)": timed(
                    [*predict, str(ten), "-o", str(folder / "ten.parquet")], env, cfg.root
                ),
                "predict.run to Parquet in-process": in_process(model, npy, folder / "c.parquet", cfg),
                "sharded, 1 worker": sharded(npy, folder / "s1", model, 1, args.shard_size, env, cfg.root),
                "sharded, 2 workers": sharded(npy, folder / "s2", model, 2, args.shard_size, env, cfg.root),
            }
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(
        f"{args.images:,} images, the {args.impl} model, {os.cpu_count()} logical cores, shards of {args.shard_size:,}"
    )
    for name, value in seconds.items():
        rate = f"{args.images / value:12,.0f} images/s" if "start-up" not in name else ""
        print(f"{name:56s} {value:7.2f} s  {rate}")
    in_process_parquet = seconds["predict.run to Parquet in-process"]
    ratios = {
        "predict to Parquet / bound (goal <= 2)": seconds["predict .npy to Parquet"]
        / seconds["onnxruntime alone (bound)"],
        "predict.run to Parquet in-process / bound": in_process_parquet / seconds["onnxruntime alone (bound)"],
        "start-up / bound": seconds["predict of 10 images to Parquet (start-up)"]
        / seconds["onnxruntime alone (bound)"],
        "predict to CSV / predict to Parquet": seconds["predict .npy to CSV"] / seconds["predict .npy to Parquet"],
        "sharded 2 workers / predict to Parquet (goal < 1)": seconds["sharded, 2 workers"]
        / seconds["predict .npy to Parquet"],
        "sharded 1 worker / sharded 2 workers (scaling)": seconds["sharded, 1 worker"] / seconds["sharded, 2 workers"],
    }
    for name, value in ratios.items():
        print(f"{name:52s} {value:5.2f}")
    sys.stdout.flush()
    return {"images": args.images, "shard_size": args.shard_size, "seconds": seconds}, ratios


if __name__ == "__main__":
    with record.Run(__file__, packages=("onnxruntime", "pyarrow", "distributed", "prefect-dask")) as run:
        run.figures, run.ratios = main()
