"""The sweep's wall time at concurrency 1 and 2, for the same 4 parameter sets, measured side by side in one run.

Each concurrency gets a fresh clone of HEAD (its own DVC cache and MLflow store, so that no trial of the second
is a run-cache hit of the first), with ingest already run, and its own Prefect server, process work pool and
worker on 127.0.0.1, started as `make test`'s integration tests start them (tests/stack.py). The `sweep`
deployment then runs the 4 sets; the time is from triggering it to its final state. Each trial's own run time
(Prefect's start and end of its flow run) says where the time goes: how much two trials slow each other on
the machine's cores, and what the sweep costs around them (its start, the worker's polling, the collection).

Usage: FASHION_MNIST_MIRROR=../shared/fashion-mnist python benchmarks/sweep_concurrency.py
Prints the figures and writes them to benchmarks/results/sweep_concurrency.json (benchmarks/record.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the servers' start-up, shared with the integration tests

from stack import Processes, free_port, prefect_call, prefect_env, run_deployment_and_wait, start_prefect  # noqa: E402

SETS = [["train.lr=0.05"], ["train.lr=0.2"], ["train.lr=0.3"], ["train.lr=0.4"]]


def trial_times(env: dict) -> list[tuple[float, float]]:
    """(start, end) of each trial's flow run, as Prefect recorded them (this server ran one sweep)."""

    async def read(client):
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter

        deployment = await client.read_deployment_by_name("training-pipeline/sweep-trial")
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(),
        )
        return [(r.start_time.timestamp(), r.end_time.timestamp()) for r in runs if r.start_time and r.end_time]

    return prefect_call(env, read)


def sweep(concurrency: int, tmp: Path) -> dict:
    root = tmp / f"c{concurrency}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    env = prefect_env(root, tmp / f"prefect-home-{concurrency}", free_port())
    subprocess.run(["dvc", "repro", "-q", "ingest"], cwd=root, env=env, check=True)  # shared by every trial
    with Processes() as procs:
        start_prefect(procs, root, env)
        start = time.perf_counter()
        _, state = run_deployment_and_wait(env, "sweep/sweep", {"parameter_sets": SETS, "concurrency": concurrency})
        wall = time.perf_counter() - start
        if not state.is_completed():
            sys.exit(f"the sweep at concurrency {concurrency} ended {state.name}: {state.message}")
        times = trial_times(env)
    assert len(times) == len(SETS), times
    busy = sum(end - begin for begin, end in times)
    span = max(end for _, end in times) - min(begin for begin, _ in times)
    return {"wall": wall, "trials": busy, "each": busy / len(times), "overlap": busy / span, "span": span}


def main() -> tuple[dict, dict]:
    if not os.environ.get("FASHION_MNIST_MIRROR"):
        sys.exit("set FASHION_MNIST_MIRROR to a folder with the four Fashion-MNIST .gz files")
    os.environ["FASHION_MNIST_MIRROR"] = str(Path(os.environ["FASHION_MNIST_MIRROR"]).resolve())
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        results = {c: sweep(c, Path(tmp)) for c in (1, 2)}
    print(f"the sweep of {len(SETS)} sets ({', '.join(s[0] for s in SETS)}), process pool, {os.cpu_count()} cores")
    for c, r in results.items():
        print(
            f"  concurrency {c}: {r['wall']:.1f} s wall; trials {r['trials']:.1f} s in all, {r['each']:.1f} s each, "
            f"{r['overlap']:.2f} running at once on average"
        )
    one, two = results[1], results[2]
    print(f"  speed-up of concurrency 2: {one['wall'] / two['wall']:.2f}x (goal 1.5x)")
    print(f"  a trial takes {two['each'] / one['each']:.2f}x as long when two share the cores")
    outside = {c: r["wall"] - r["span"] for c, r in results.items()}
    print(f"  outside the trials (start, polling, collection): {outside[1]:.1f} s at 1, {outside[2]:.1f} s at 2")
    at = {c: f"concurrency {c}" for c in results}
    figures = {
        "wall_seconds": {at[c]: r["wall"] for c, r in results.items()},
        "trials_seconds": {at[c]: r["trials"] for c, r in results.items()},
        "seconds_per_trial": {at[c]: r["each"] for c, r in results.items()},
        "trials_running_at_once": {at[c]: r["overlap"] for c, r in results.items()},
        "outside_the_trials_seconds": {at[c]: outside[c] for c in results},
        "parameter_sets": len(SETS),
    }
    ratios = {
        "wall, concurrency 1 / concurrency 2": one["wall"] / two["wall"],
        "trial time, concurrency 2 / concurrency 1": two["each"] / one["each"],
    }
    return figures, ratios


if __name__ == "__main__":
    with record.Run(__file__, env=("FASHION_MNIST_MIRROR",), packages=("prefect", "dvc", "torch", "mlflow")) as run:
        run.figures, run.ratios = main()
