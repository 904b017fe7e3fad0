"""What the Prometheus metrics cost the inference service: `softmax-mlops serve` with `--metrics` (the default:
every request counted and timed, each image's class counted and added to the drift window) and with
`--no-metrics`, on the exported model (models/{impl}/model.onnx, so `dvc repro` first), loaded by the same aiohttp
client with the same bodies, taking turns three times; the median of each.

Two loads: single images as JSON on /predict, where the per-request work of the metrics weighs most, and
64-image batches, where the per-image work (the class counts, the drift window) does.

Usage: python benchmarks/metrics_overhead.py [--impl scratch] [--requests 3000] [--seconds 10]
Goal: throughput without metrics / with metrics <= 1.05 in both loads.
Prints the figures and writes them to benchmarks/results/metrics_overhead.json (benchmarks/record.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

import record
from vs_mlflow import free_port, load, start

from softmax_mlops import config
from softmax_mlops.stages.data import load_split

ROUNDS, CONCURRENCY = 3, 8


def main() -> tuple[dict, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="scratch", choices=config.IMPLS)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    cfg = config.load(Path(__file__).resolve().parents[1])
    model = cfg.paths.onnx(args.impl)
    if not model.is_file():
        raise SystemExit(f"{model} is missing: run `dvc repro` first")
    images, _ = load_split(cfg.paths.test_data)
    bodies = {
        "1 image": json.dumps({"instances": images[:1].tolist()}).encode(),
        "64 images": json.dumps({"instances": images[:64].tolist()}).encode(),
    }
    headers = {"content-type": "application/json"}
    runs: dict[str, dict[str, list[float]]] = {load_: {"metrics": [], "no metrics": []} for load_ in bodies}
    for _ in range(ROUNDS):
        for mode, flag in (("metrics", "--metrics"), ("no metrics", "--no-metrics")):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = ["softmax-mlops", "serve", "-m", str(model), "--port", str(port), flag]
            proc = start(cmd, cfg, url)
            try:
                for name, body in bodies.items():
                    rate, _, _, errors = asyncio.run(
                        load(f"{url}/predict", body, headers, args.requests, args.seconds, CONCURRENCY)
                    )
                    if errors:
                        raise SystemExit(f"{errors} failed requests to {url}/predict ({mode})")
                    runs[name][mode].append(rate)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(f"softmax-mlops serve, the {args.impl} model, {os.cpu_count()} logical cores, {CONCURRENCY} connections")
    figures, ratios = {}, {}
    for name, modes in runs.items():
        for mode, rates in modes.items():
            figures[f"{name}, {mode} (req/s)"] = statistics.median(rates)
            print(f"{name:10s} {mode:11s} {statistics.median(rates):8.1f} req/s   {[round(r, 1) for r in rates]}")
        ratios[f"{name}: no metrics / metrics (goal <= 1.05)"] = statistics.median(
            modes["no metrics"]
        ) / statistics.median(modes["metrics"])
    for name, value in ratios.items():
        print(f"{name:44s} {value:5.3f}")
    sys.stdout.flush()
    return figures, ratios


if __name__ == "__main__":
    with record.Run(__file__, packages=("onnxruntime", "uvicorn", "fastapi", "prometheus-client", "aiohttp")) as run:
        run.figures, run.ratios = main()
