"""What running the pipeline through Prefect costs over plain `dvc repro`, measured side by side in one run.

Two clean clones of HEAD: one runs `dvc repro`, the other `softmax-mlops pipeline` (Prefect's ephemeral mode,
no server). Each is then run again with everything cached. To say where the overhead goes, it also times
importing Prefect and a flow that does nothing (the ephemeral API server's start and stop).
Usage: FASHION_MNIST_MIRROR=../shared/fashion-mnist python benchmarks/prefect_overhead.py
Prints the figures and writes them to benchmarks/results/prefect_overhead.json (benchmarks/record.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

from softmax_mlops.config import IMPLS

REPO = Path(__file__).resolve().parents[1]
EMPTY_FLOW = "from prefect import flow\n@flow\ndef nothing():\n    pass\nnothing()\n"


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect-home")
        clones = {}
        for name in ("dvc", "prefect"):
            clones[name] = Path(tmp) / name
            subprocess.run(["git", "clone", "-q", str(REPO), str(clones[name])], check=True)
        dvc_cmd, prefect_cmd = ["dvc", "repro"], ["softmax-mlops", "pipeline"]
        clean = {"dvc": timed(dvc_cmd, clones["dvc"], env), "prefect": timed(prefect_cmd, clones["prefect"], env)}
        cached = {"dvc": timed(dvc_cmd, clones["dvc"], env), "prefect": timed(prefect_cmd, clones["prefect"], env)}
        import_s = timed([sys.executable, "-c", "import prefect"], REPO, env)
        empty_flow_s = timed([sys.executable, "-c", EMPTY_FLOW], REPO, env)

    print(f"{'':24}{'dvc repro':>12}{'Prefect flow':>14}{'ratio':>8}{'overhead':>11}")
    for label, t in (("clean clone", clean), ("everything cached", cached)):
        print(
            f"{label:24}{t['dvc']:11.1f}s{t['prefect']:13.1f}s{t['prefect'] / t['dvc']:7.1f}x"
            f"{t['prefect'] - t['dvc']:10.1f}s"
        )
    from pipelines.flows import stage_names  # imports Prefect: only after the measurements

    stages = len(stage_names(list(IMPLS)))  # one task per DVC stage
    per_task = (cached["prefect"] - empty_flow_s - cached["dvc"]) / stages
    print(
        f"\nwhere the cached overhead goes: import prefect {import_s:.1f}s (within the next figure); an empty flow "
        f"in ephemeral mode (start/stop of the local API) {empty_flow_s:.1f}s; the rest, "
        f"{cached['prefect'] - empty_flow_s - cached['dvc']:.1f}s, is about {per_task:.2f}s per stage task "
        f"(task bookkeeping and opening the DVC repo per stage)"
    )
    figures = {
        "dvc_repro_seconds": {"clean clone": clean["dvc"], "everything cached": cached["dvc"]},
        "prefect_flow_seconds": {"clean clone": clean["prefect"], "everything cached": cached["prefect"]},
        "import_prefect_seconds": import_s,
        "empty_flow_seconds": empty_flow_s,
        "seconds_per_stage_task": per_task,
    }
    ratios = {
        "prefect / dvc, clean clone": clean["prefect"] / clean["dvc"],
        "prefect / dvc, everything cached": cached["prefect"] / cached["dvc"],
    }
    return figures, ratios


if __name__ == "__main__":
    with record.Run(__file__, env=("FASHION_MNIST_MIRROR",), packages=("dvc", "prefect", "mlflow")) as run:
        run.figures, run.ratios = main()
