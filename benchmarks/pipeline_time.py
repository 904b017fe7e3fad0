"""Wall time of `dvc repro` in a clean clone of the committed HEAD, where it goes per stage, and a no-op rerun.

The per-stage figures are the time between DVC's "Running stage" lines, so each includes the stage's process
start, its imports, its work, its MLflow logging and DVC's hashing and saving of its outputs. The fixed costs
every stage process pays (interpreter start and imports) are measured alone beside them.

Goals: full run <= 30 s, no-op <= 3 s. Uses the data mirror from FASHION_MNIST_MIRROR like the pipeline does.
Usage: FASHION_MNIST_MIRROR=../shared/fashion-mnist python benchmarks/pipeline_time.py
Prints the figures and writes them to benchmarks/results/pipeline_time.json (benchmarks/record.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def per_stage(cwd: Path) -> tuple[float, dict[str, float]]:
    """`dvc repro`, timing each stage from its "Running stage" line to the next one (or to the end)."""
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: dict[str, float] = {}
    current, since, lines = None, start, []
    for line in proc.stdout:
        lines.append(line)
        if match := re.match(r"Running stage '(.+)':", line):
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = match.group(1), now
    if proc.wait():
        sys.exit("dvc repro failed:\n" + "".join(lines[-30:]))
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    return end - start, stages


def fixed_costs() -> dict[str, float]:
    python = sys.executable
    return {
        "python start": timed([python, "-c", "pass"], REPO),
        "softmax-mlops --help": timed(["softmax-mlops", "--help"], REPO),
        "import torch": timed([python, "-c", "import torch"], REPO),
        "import mlflow": timed([python, "-c", "import mlflow"], REPO),
        "import torch, mlflow, matplotlib.pyplot": timed(
            [python, "-c", "import torch, mlflow, matplotlib.pyplot"], REPO
        ),
    }


def main() -> tuple[dict, dict]:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded SQLite default, fresh in the clone
    mirror = os.environ.get("FASHION_MNIST_MIRROR", "")
    if mirror and "://" not in mirror:  # relative to where you ran this, not to the clone the stages run in
        os.environ["FASHION_MNIST_MIRROR"] = str(Path(mirror).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        full, stages = per_stage(clone)
        noop = timed(["dvc", "repro"], clone)
    costs = fixed_costs()
    print(f"dvc repro, clean clone : {full:6.1f} s   (goal <= 30 s), {len(stages)} stages")
    for stage, seconds in stages.items():
        print(f"  {stage:22s} {seconds:6.1f} s")
    print(f"  {'before the first stage':22s} {full - sum(stages.values()):6.1f} s")
    print(f"dvc repro, no-op       : {noop:6.1f} s   (goal <= 3 s)")
    print("fixed costs of one process, measured alone:")
    for what, seconds in costs.items():
        print(f"  {what:40s} {seconds:5.2f} s")
    figures = {
        "clean_clone_seconds": full,
        "stages": len(stages),
        "stage_seconds": {**stages, "before the first stage": full - sum(stages.values())},
        "noop_seconds": noop,
        "fixed_cost_seconds": costs,
    }
    return figures, {}  # no ratio: each figure stands against its goal


if __name__ == "__main__":
    with record.Run(__file__, env=("FASHION_MNIST_MIRROR",), packages=("dvc", "torch", "mlflow")) as run:
        run.figures, run.ratios = main()
