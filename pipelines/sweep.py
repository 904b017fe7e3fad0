"""A parameter sweep fanned out by Prefect: each set of overrides is a flow run of its own, on the work pool.

The `sweep` deployment takes a list of override sets in DVC's `-S key=value` form. It starts one run of the
`training-pipeline/sweep-trial` deployment per set (`run_deployment`, as subflows, without waiting), so that on
the Docker pool every trial is a container of its own that pulls from and pushes to the DVC remote. How many
run at once is that deployment's concurrency limit, which the sweep sets first (params.yaml `sweep.concurrency`;
0 means the machine's cores): Prefect holds the others in AwaitingConcurrencySlot, and no container starts
for them. The champion gate holds under concurrency through its own lock (softmax_mlops.tracking.champion_lock).

The parent waits, bounded (`sweep.timeout_s`), then reads each trial's MLflow runs by their
`prefect_flow_run_id` tag, since a trial's return value stays in its container. It publishes a leaderboard as
a Prefect markdown artifact and on an MLflow parent run, with the trials' runs nested under it. A trial that
failed, crashed or did not finish in time has a row that says so; the others' rows are kept. The sweep
fails, after publishing, when any trial did not complete.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from prefect import flow, get_client
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from softmax_mlops import config
from softmax_mlops.cli import configure_process
from softmax_mlops.tracking import PREFECT_FLOW_RUN_TAG

TRIAL_DEPLOYMENT = "training-pipeline/sweep-trial"  # defined in prefect.yaml
POLL_S = 5.0


class SweepFailed(RuntimeError):
    """Some trials did not complete; the message names them. The leaderboard is published first."""


@dataclass
class Trial:
    """One set of overrides, its flow run, and what MLflow recorded for it (per implementation)."""

    overrides: list[str]
    flow_run_id: str = ""
    state: str = "not started"
    runs: dict[str, dict] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.state == "Completed"

    def best_accuracy(self) -> float:
        return max((r["test_accuracy"] for r in self.runs.values() if r.get("test_accuracy") is not None), default=-1)


def concurrency_of(cfg: config.Config, requested: int | None) -> int:
    return requested or cfg.sweep.concurrency or os.cpu_count() or 1


def limit_trials(concurrency: int) -> None:
    """Set the sweep-trial deployment's concurrency limit: Prefect, not this flow, decides what runs when."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TRIAL_DEPLOYMENT)
        client.update_deployment(deployment.id, DeploymentUpdate(concurrency_limit=concurrency))


def start(trials: list[Trial]) -> None:
    for trial in trials:
        child = cast(
            FlowRun,
            run_deployment(
                TRIAL_DEPLOYMENT, parameters={"overrides": trial.overrides}, timeout=0, as_subflow=True, tags=["sweep"]
            ),
        )
        trial.flow_run_id = str(child.id)
        trial.state = str(child.state.name) if child.state else "Scheduled"


def wait(trials: list[Trial], timeout_s: float) -> None:
    """Poll the trials' states until every one is final, or the time is up (those left say "timed out")."""
    deadline = time.monotonic() + timeout_s
    pending = [t for t in trials if t.flow_run_id]
    with get_client(sync_client=True) as client:
        while pending:
            for trial in list(pending):
                state = client.read_flow_run(uuid.UUID(trial.flow_run_id)).state
                if state is not None:
                    trial.state = str(state.name)
                    if state.is_final():
                        pending.remove(trial)
            if pending and time.monotonic() > deadline:
                for trial in pending:
                    trial.state = f"timed out ({trial.state})"
                return
            if pending:
                time.sleep(POLL_S)


def collect(trials: list[Trial], tracking_uri: str, experiment: str) -> None:
    """Each trial's MLflow runs (one per implementation), found by the flow run's id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    for trial in trials:
        if not trial.flow_run_id:
            continue
        runs = client.search_runs(
            [found.experiment_id], filter_string=f"tags.{PREFECT_FLOW_RUN_TAG} = '{trial.flow_run_id}'"
        )
        for run in runs:
            metrics, tags = run.data.metrics, run.data.tags
            trial.runs[run.data.params.get("impl", run.info.run_name or "?")] = {
                "run_id": run.info.run_id,
                "test_accuracy": metrics.get("test_accuracy"),
                "test_ece": metrics.get("test_ece_after"),
                "version": tags.get("registered_version"),
                "champion": tags.get("champion_reason", "not decided"),
            }


def leaderboard(trials: list[Trial]) -> str:
    """A markdown table, best test accuracy first; trials without results keep a row with their state."""
    lines = [
        "# Sweep leaderboard",
        "",
        "| overrides | state | implementation | test accuracy | ECE | MLflow run | version | @champion |",
        "|---|---|---|---:|---:|---|---|---|",
    ]
    for trial in sorted(trials, key=Trial.best_accuracy, reverse=True):
        shown = ", ".join(f"`{o}`" for o in trial.overrides) or "(none)"
        if not trial.runs:
            lines.append(f"| {shown} | {trial.state} | - | - | - | - | - | - |")
        for impl, run in sorted(trial.runs.items()):
            accuracy = f"{run['test_accuracy']:.4f}" if run["test_accuracy"] is not None else "-"
            ece = f"{run['test_ece']:.4f}" if run["test_ece"] is not None else "-"
            lines.append(
                f"| {shown} | {trial.state} | {impl} | {accuracy} | {ece} | {run['run_id'][:8]} "
                f"| {run['version'] or '-'} | {run['champion']} |"
            )
    return "\n".join(lines) + "\n"


def publish(trials: list[Trial], markdown: str, tracking_uri: str, experiment: str) -> str:
    """The leaderboard on an MLflow parent run, with each trial's runs nested under it; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"sweep-{flow_run.name or 'local'}") as parent:
        mlflow.set_tags({PREFECT_FLOW_RUN_TAG: str(flow_run.id or ""), "sweep_trials": str(len(trials))})
        mlflow.log_text(markdown, "leaderboard.md")
        best = max((t.best_accuracy() for t in trials), default=-1)
        if best >= 0:
            mlflow.log_metric("best_test_accuracy", best)
        client = mlflow.tracking.MlflowClient(tracking_uri)
        for trial in trials:
            for run in trial.runs.values():
                client.set_tag(run["run_id"], "mlflow.parentRunId", parent.info.run_id)
        return parent.info.run_id


@flow(name="sweep", log_prints=True)
def sweep(
    parameter_sets: list[list[str]],
    concurrency: int | None = None,
    timeout_s: float | None = None,
    project_dir: str | None = None,
) -> dict:
    """Run each set of overrides (`["train.lr=0.05", "train.epochs=10"]`) as its own sweep-trial flow run, at
    most ``concurrency`` at once; publish the leaderboard. Defaults from params.yaml (sweep)."""
    root = Path(project_dir or os.getcwd()).resolve()
    cfg = configure_process(config.load(root))
    if not parameter_sets:
        raise ValueError("sweep: parameter_sets is empty; give at least one list of key=value overrides")
    trials = [Trial(list(overrides)) for overrides in parameter_sets]
    limit = concurrency_of(cfg, concurrency)
    limit_trials(limit)
    print(f"sweep: {len(trials)} trials on {TRIAL_DEPLOYMENT}, at most {limit} at once")
    start(trials)
    wait(trials, timeout_s or cfg.sweep.timeout_s)
    collect(trials, cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    markdown = leaderboard(trials)
    parent = publish(trials, markdown, cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    create_markdown_artifact(key="sweep-leaderboard", markdown=markdown, description="The sweep's trials, best first")
    print(markdown)
    if failed := [t for t in trials if not t.completed]:
        raise SweepFailed(
            f"sweep: {len(failed)} of {len(trials)} trials did not complete: "
            + "; ".join(f"{' '.join(t.overrides)} {t.state}" for t in failed)
        )
    return {
        "mlflow_parent_run_id": parent,
        "trials": [
            {"overrides": t.overrides, "flow_run_id": t.flow_run_id, "state": t.state, "runs": t.runs} for t in trials
        ],
    }
