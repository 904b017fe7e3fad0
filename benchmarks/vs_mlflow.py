"""This service and `predict` against MLflow's own serving, side by side in one run, on the same registered model.

HTTP: `softmax-mlops serve` and `mlflow models serve --env-manager local` on the registered ONNX model
(models:/softmax-mlops-{impl}@champion), both on 127.0.0.1, loaded by the same aiohttp client with the same
request bodies on MLflow's protocol (POST /invocations), bounded in count and in time:
  - single images at concurrency 8;
  - 64-image batches at concurrency 4.
This service also answers the same load on its own /predict and on the v2 protocol's binary tensors.

Batch, over the same --images images in a .npy:
  - onnxruntime alone on the array in memory, in predict.batch_size batches: the bound;
  - the same job through `mlflow.pyfunc.load_model(...)`, end to end in its own process as predict is: import
    mlflow, load, predict in batches, write the same CSV;
  - `softmax-mlops predict` end to end (process start included).

Needs a `dvc repro` first (the registered model). Usage:
  python benchmarks/vs_mlflow.py [--impl scratch] [--requests 3000] [--seconds 30] [--images 1000000]
Goals: at least 3x MLflow's throughput at no more than 1/3 of its p99, both HTTP cases; predict within 2x of
the bound, and faster than the pyfunc job.
Prints the figures and writes them to benchmarks/results/vs_mlflow.json (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import record

from softmax_mlops import config
from softmax_mlops.stages.data import load_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], cfg: config.Config, url: str) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, MLFLOW_TRACKING_URI=cfg.mlflow.tracking_uri)
    proc = subprocess.Popen(cmd, cwd=cfg.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited before answering: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{url} did not answer within 120 s")


async def load(
    url: str, body: bytes, headers: dict, requests: int, seconds: float, concurrency: int
) -> tuple[float, float, float, int]:
    """Throughput (req/s), p50 and p99 (s) and errors, over at most ``requests`` requests or ``seconds``."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))
    stop = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in queue:
            if time.perf_counter() > stop:
                return
            begin = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    errors += response.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - begin)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(20):  # warm-up, not counted
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
        begin = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - begin
    q = statistics.quantiles(latencies, n=100)
    return len(latencies) / elapsed, q[49], q[98], errors


def v2_binary(images: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(images.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + images.tobytes(), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def http(cfg: config.Config, model: str, images: np.ndarray, requests: int, seconds: float) -> tuple[dict, dict]:
    ours_url, theirs_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    ours = start(["softmax-mlops", "serve", "-m", model, "--port", ours_url.rsplit(":", 1)[1]], cfg, ours_url)
    try:
        theirs = start(
            [
                "mlflow",
                "models",
                "serve",
                "-m",
                model,
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                theirs_url.rsplit(":", 1)[1],
            ],
            cfg,
            theirs_url,
        )
    except BaseException:
        ours.terminate()
        raise
    json_headers = {"content-type": "application/json"}
    name = model.removeprefix("models:/").split("@")[0]  # the v2 model name: the registered model's
    figures: dict = {}
    ratios: dict = {}
    try:
        for batch, concurrency in ((1, 8), (64, 4)):
            body = json.dumps({"inputs": images[:batch].tolist()}).encode()
            print(
                f"\n{batch} image(s) per request, concurrency {concurrency}, "
                f"up to {requests} requests or {seconds:.0f} s"
            )
            print(f"{'':42s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>6s}")
            runs = {
                "mlflow models serve /invocations": (f"{theirs_url}/invocations", body, json_headers),
                "softmax-mlops serve /invocations": (f"{ours_url}/invocations", body, json_headers),
                "softmax-mlops serve /predict": (
                    f"{ours_url}/predict",
                    json.dumps({"instances": images[:batch].tolist()}).encode(),
                    json_headers,
                ),
                "softmax-mlops serve /v2 binary tensors": (
                    f"{ours_url}/v2/models/{name}/infer",
                    *v2_binary(images[:batch]),
                ),
            }
            results = {}
            for label, (url, data, headers) in runs.items():
                results[label] = asyncio.run(load(url, data, headers, requests, seconds, concurrency))
                rate, p50, p99, errors = results[label]
                print(f"{label:42s} {rate:8,.0f} {p50 * 1e3:8.1f} {p99 * 1e3:8.1f} {errors:6d}")
            base = results["mlflow models serve /invocations"]
            for label, (rate, _, p99, _) in results.items():
                if not label.startswith("mlflow"):
                    print(
                        f"  {label}: {rate / base[0]:.2f}x MLflow's throughput, p99 {p99 / base[2]:.2f}x MLflow's "
                        f"(goal >= 3x and <= 0.33x)"
                    )
            case = f"{batch} image(s), concurrency {concurrency}"
            for i, measure in enumerate(("requests_per_second", "p50_ms", "p99_ms", "errors")):
                scale = 1e3 if measure.endswith("_ms") else 1
                figures[f"{measure}, {case}"] = {label: r[i] * scale for label, r in results.items()}
            ours_only = {label: r for label, r in results.items() if not label.startswith("mlflow")}
            ratios[f"throughput / MLflow's, {case}"] = {label: r[0] / base[0] for label, r in ours_only.items()}
            ratios[f"p99 / MLflow's, {case}"] = {label: r[2] / base[2] for label, r in ours_only.items()}
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait()
    return figures, ratios


def batch(cfg: config.Config, model: str, images: np.ndarray, count: int) -> tuple[dict, dict]:
    from softmax_mlops.serving.inference import Predictor, resolve_model

    batch_size = cfg.predict.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "images.npy"
        big = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(count, 28, 28))
        for begin in range(0, count, len(images)):
            big[begin : begin + len(images)] = images[: count - begin]
        big.flush()
        del big

        # the bound: onnxruntime alone, the array already in memory, the model already loaded
        array = np.load(npy)
        predictor = Predictor(resolve_model(model, cfg.mlflow.tracking_uri))
        begin = time.perf_counter()
        for i in range(0, count, batch_size):
            predictor.run(array[i : i + batch_size])
        bound = time.perf_counter() - begin

        # MLflow's own way, end to end in a process of its own as predict is: import mlflow, load the registered
        # model as a pyfunc, predict in batches, write the same CSV (with predict's own formatter)
        begin = time.perf_counter()
        job = subprocess.run(
            [sys.executable, __file__, "--pyfunc-job", str(npy), str(Path(tmp) / "pyfunc.csv"), model],
            cwd=cfg.root,
            capture_output=True,
            text=True,
            env=dict(os.environ, MLFLOW_TRACKING_URI=cfg.mlflow.tracking_uri),
        )
        pyfunc_s = time.perf_counter() - begin
        if job.returncode:
            raise SystemExit(f"the pyfunc job failed: {job.stderr.strip().splitlines()[-1]}")

        begin = time.perf_counter()
        result = subprocess.run(
            ["softmax-mlops", "predict", str(npy), "-o", str(Path(tmp) / "predict.csv"), "-m", model],
            cwd=cfg.root,
            capture_output=True,
            text=True,
            env=dict(os.environ, MLFLOW_TRACKING_URI=cfg.mlflow.tracking_uri),
        )
        predict_s = time.perf_counter() - begin
        if result.returncode:
            raise SystemExit(f"predict failed: {result.stderr.strip().splitlines()[-1]}")
        same = (Path(tmp) / "pyfunc.csv").read_bytes() == (Path(tmp) / "predict.csv").read_bytes()

    print(f"\n{count:,} images from .npy, batches of {batch_size}")
    print(f"onnxruntime alone, in memory (bound)   : {bound:6.2f} s  {count / bound:12,.0f} images/s")
    print(f"mlflow.pyfunc job (import, load, CSV)   : {pyfunc_s:6.2f} s  {count / pyfunc_s:12,.0f} images/s")
    print(f"softmax-mlops predict, end to end       : {predict_s:6.2f} s  {count / predict_s:12,.0f} images/s")
    print(
        f"predict / bound = {predict_s / bound:.2f} (goal <= 2); pyfunc / predict = {pyfunc_s / predict_s:.2f} "
        f"(goal > 1); the two CSVs are {'identical' if same else 'DIFFERENT'}"
    )
    figures = {
        "batch_images": count,
        "batch_seconds": {
            "onnxruntime alone (bound)": bound,
            "mlflow.pyfunc job": pyfunc_s,
            "softmax-mlops predict": predict_s,
        },
    }
    return figures, {"predict / bound": predict_s / bound, "pyfunc / predict": pyfunc_s / predict_s}


def pyfunc_job(npy: str, out: str, model: str, batch_size: int, top_k: int) -> None:
    """The batch job as an MLflow user writes it: mlflow.pyfunc.load_model, predict in batches, write a CSV."""
    import mlflow

    from softmax_mlops.classes import CLASS_NAMES
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.serving.predict import CSV_HEADER, csv_text

    pyfunc = mlflow.pyfunc.load_model(model)
    data = np.load(npy, mmap_mode="r")
    with open(out, "w", newline="", encoding="utf-8") as fh:
        fh.write(",".join(CSV_HEADER) + "\n")
        for i in range(0, len(data), batch_size):
            probabilities = pyfunc.predict(np.ascontiguousarray(data[i : i + batch_size]))["probabilities"]
            fh.write(
                csv_text(range(i, i + len(probabilities)), *Predictor.top_k_of(probabilities, top_k), list(CLASS_NAMES))
            )


def main() -> tuple[dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="scratch", choices=config.IMPLS)
    parser.add_argument("--requests", type=int, default=3000, help="at most this many requests per measurement")
    parser.add_argument("--seconds", type=float, default=30, help="and at most this long")
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("http", "batch"))
    args = parser.parse_args()
    cfg = config.load(Path(__file__).resolve().parents[1])
    model = f"models:/{cfg.mlflow.registered_model(args.impl)}@champion"
    images = load_split(cfg.paths.test_data)[0]
    figures: dict = {}
    ratios: dict = {}
    if args.only != "batch":
        for into, part in zip((figures, ratios), http(cfg, model, images, args.requests, args.seconds), strict=True):
            into.update(part)
    if args.only != "http":
        for into, part in zip((figures, ratios), batch(cfg, model, images, args.images), strict=True):
            into.update(part)
    return figures, ratios


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pyfunc-job"]:  # the batch job's own process, started by batch()
        cfg = config.load(Path(__file__).resolve().parents[1])
        pyfunc_job(*sys.argv[2:5], cfg.predict.batch_size, cfg.predict.top_k)
    else:
        packages = ("onnxruntime", "mlflow", "uvicorn", "fastapi", "aiohttp")
        with record.Run(__file__, env=("MLFLOW_TRACKING_URI",), packages=packages) as run:
            run.figures, run.ratios = main()
