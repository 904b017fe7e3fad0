"""Inference speed, side by side in one run, on the model the pipeline exported (models/{impl}/model.onnx).

1. onnxruntime against torch eager (the same exported module) on the 10,000 test images.
2. `softmax-mlops predict` end to end (process start, .npy memory map, inference, CSV written) on a .npy of
   --images images, with the child's peak RSS against the file size (memory must stay bounded).
3. HTTP: --requests single-image JSON requests at --concurrency against `softmax-mlops serve` on 127.0.0.1;
   throughput, p50/p99 latency and the error count. The load is bounded in count and stops by itself.

Usage: python benchmarks/inference_speed.py [--impl scratch] [--images 1000000] [--requests 2000] [--concurrency 8]
Goals: predict >= 100,000 images/s; HTTP p99 <= 20 ms with 0 errors.
Prints the figures and writes them to benchmarks/results/inference_speed.json (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import record

from softmax_mlops import config
from softmax_mlops.stages.data import load_split


def median_seconds(fn, repeats: int = 20) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ort_vs_torch(cfg: config.Config, impl: str, images: np.ndarray) -> tuple[float, float]:
    import torch

    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.stages.export import ExportedSoftmaxRegression
    from softmax_mlops.stages.models import load_weights

    module = ExportedSoftmaxRegression(*load_weights(cfg.paths.weights(impl))).eval()
    predictor = Predictor(cfg.paths.onnx(impl))
    tensor = torch.from_numpy(images)
    with torch.no_grad():
        torch_s = median_seconds(lambda: module(tensor))
    ort_s = median_seconds(lambda: predictor.run(images))
    print(
        f"10,000 test images : onnxruntime {ort_s * 1e3:6.2f} ms, torch eager {torch_s * 1e3:6.2f} ms "
        f"-> onnxruntime {torch_s / ort_s:.1f}x faster"
    )
    return ort_s, torch_s


def predict_throughput(cfg: config.Config, impl: str, images: np.ndarray, count: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "images.npy"
        big = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(count, 28, 28))
        for start in range(0, count, len(images)):
            big[start : start + len(images)] = images[: count - start]
        big.flush()
        del big
        start = time.perf_counter()
        child = subprocess.Popen(
            ["softmax-mlops", "predict", str(npy), "-o", str(Path(tmp) / "out.csv"), "-m", str(cfg.paths.onnx(impl))],
            cwd=cfg.root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak_mb = 0.0
        while child.poll() is None:
            peak_mb = max(peak_mb, _high_water_mb(child.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if child.returncode:
            raise SystemExit("predict failed")
        size_mb = npy.stat().st_size / 2**20
    print(
        f"predict from .npy  : {count:,} images in {seconds:.2f} s = {count / seconds:,.0f} images/s "
        f"(goal >= 100,000); peak RSS {peak_mb:.0f} MB for a {size_mb:.0f} MB input"
    )
    return {
        "images": count,
        "seconds": seconds,
        "images_per_second": count / seconds,
        "peak_rss_mb": peak_mb,
        "input_mb": size_mb,
    }


def _high_water_mb(pid: int) -> float:
    """The child's own peak RSS since exec (VmHWM). getrusage(RUSAGE_CHILDREN) is no good here: a child
    started by vfork inherits the parent's high-water mark at exec."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _load(url: str, body: bytes, requests: int, concurrency: int) -> tuple[list[float], int, float]:
    """aiohttp (already installed with DVC) as the load generator: it shares the 2 cores with the server, and
    a heavier client would inflate the latencies it reports."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for _ in queue:
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                    await response.read()
                    errors += response.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - start


def http_load(cfg: config.Config, impl: str, images: np.ndarray, requests: int, concurrency: int) -> dict:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["softmax-mlops", "serve", "-m", str(cfg.paths.onnx(impl)), "--port", str(port)],
        cwd=cfg.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        import json

        body = json.dumps({"instances": images[:1].tolist()}).encode()
        latencies, errors, seconds = asyncio.run(_load(f"{base}/predict", body, requests, concurrency))
    finally:
        server.terminate()
        server.wait()
    q = statistics.quantiles(latencies, n=100)
    print(
        f"HTTP /predict      : {requests} requests, concurrency {concurrency}: {requests / seconds:,.0f} req/s, "
        f"p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms (goal <= 20 ms), errors {errors}"
    )
    return {
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_second": requests / seconds,
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "errors": errors,
    }


def main() -> tuple[dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="scratch", choices=config.IMPLS)
    parser.add_argument("--images", type=int, default=1_000_000, help="images in the .npy for predict")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    cfg = config.load(Path(__file__).resolve().parents[1])
    if not cfg.paths.onnx(args.impl).is_file():
        raise SystemExit(f"{cfg.paths.onnx(args.impl)} is missing: run `dvc repro` first")
    images, _ = load_split(cfg.paths.test_data)
    ort_s, torch_s = ort_vs_torch(cfg, args.impl, images)
    figures = {
        "test_images_ms": {"onnxruntime": ort_s * 1e3, "torch eager": torch_s * 1e3},
        "predict": predict_throughput(cfg, args.impl, images, args.images),
        "http_predict": http_load(cfg, args.impl, images, args.requests, args.concurrency),
    }
    return figures, {"torch eager / onnxruntime": torch_s / ort_s}


if __name__ == "__main__":
    with record.Run(__file__, packages=("onnxruntime", "torch", "uvicorn", "fastapi")) as run:
        run.figures, run.ratios = main()
