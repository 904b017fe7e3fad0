"""The real parts, as a user runs them on one machine: a Prefect server on 127.0.0.1, the process work pool,
`prefect deploy --all` from prefect.yaml, a worker, and a triggered training run. Stops all it started."""

import mlflow
import pytest

from helpers import copy_project
from softmax_mlops import config
from stack import Processes, free_port, prefect_call, prefect_env, run_deployment_and_wait, start_prefect

pytestmark = [pytest.mark.realdata, pytest.mark.server]


@pytest.fixture(scope="module")
def stack(real_splits, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("deployed"))
    env = prefect_env(root, tmp_path_factory.mktemp("prefect-home"), free_port())
    with Processes() as procs:
        start_prefect(procs, root, env)
        yield root, env


def test_triggered_training_run_completes_and_tags_mlflow(stack):
    root, env = stack
    flow_run_id, state = run_deployment_and_wait(env, "training-pipeline/weekly-retrain")
    assert state.is_completed(), state.message
    mlflow.set_tracking_uri(config.load(root).mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")  # any test's, any order
    ours = [r for r in runs if r.data.tags.get("prefect_flow_run_id") == str(flow_run_id)]
    assert sorted(r.data.params["impl"] for r in ours) == ["concise", "scratch"]


def test_both_deployments_have_active_cron_schedules(stack):
    _, env = stack

    async def schedules(client):
        result = {}
        for name in ("training-pipeline/weekly-retrain", "batch-inference/nightly-batch-inference"):
            deployment = await client.read_deployment_by_name(name)
            result[name] = [(s.schedule.cron, s.active) for s in deployment.schedules]
        return result

    assert prefect_call(env, schedules) == {
        "training-pipeline/weekly-retrain": [("0 3 * * 1", True)],
        "batch-inference/nightly-batch-inference": [("30 2 * * *", True)],
    }


def test_serve_builds_the_same_deployments_from_prefect_yaml():
    from pipelines.serve import deployments_from_prefect_yaml

    deployments = {d.name: d for d in deployments_from_prefect_yaml()}
    assert set(deployments) == {"weekly-retrain", "nightly-batch-inference", "sweep", "sweep-trial"}
    assert deployments["sweep"].entrypoint == "pipelines/sweep.py:sweep"
    assert not deployments["sweep-trial"].schedules
    assert [s.schedule.cron for s in deployments["weekly-retrain"].schedules] == ["0 3 * * 1"]
    assert [s.schedule.cron for s in deployments["nightly-batch-inference"].schedules] == ["30 2 * * *"]


def test_a_sweep_fans_out_keeps_every_row_and_leaves_champion_on_the_best(stack):
    """Three sets through the sweep deployment on the process pool: two good ones run side by side (the
    trial deployment's limit is 2), and one whose override the config refuses. The sweep fails, naming only that
    one, after publishing a leaderboard that keeps all three rows; the good trials' MLflow runs are nested
    under the sweep's parent run; @champion is on the best version ever registered."""
    from mlflow.tracking import MlflowClient

    root, env = stack
    sets = [["train.epochs=1"], ["train.epochs=2", "train.lr=0.2"], ["train.lr_schedule=bogus"]]
    flow_run_id, state = run_deployment_and_wait(env, "sweep/sweep", {"parameter_sets": sets, "concurrency": 2})
    assert state.is_failed()
    assert "1 of 3 trials did not complete: train.lr_schedule=bogus Failed" in state.message

    async def read(client):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["sweep-leaderboard"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
        trial = await client.read_deployment_by_name("training-pipeline/sweep-trial")
        return artifacts, trial.global_concurrency_limit.limit

    artifacts, limit = prefect_call(env, read)
    assert limit == 2
    board = str(artifacts[0].data)
    rows = [line for line in board.splitlines() if line.startswith("| `")]
    assert len([r for r in rows if "| Completed |" in r]) == 4  # two trials, two implementations each
    assert [r for r in rows if "bogus" in r] == ["| `train.lr_schedule=bogus` | Failed | - | - | - | - | - | - |"]

    client = MlflowClient(config.load(root).mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("softmax-mlops")
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{flow_run_id}'"
    )
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((r.data.params["impl"], r.data.params["epochs"]) for r in children) == [
        ("concise", "1"),
        ("concise", "2"),
        ("scratch", "1"),
        ("scratch", "2"),
    ]
    assert client.download_artifacts(parent.info.run_id, "leaderboard.md")
    champion = client.get_model_version_by_alias("softmax-mlops-scratch", "champion")
    versions = client.search_model_versions("name = 'softmax-mlops-scratch'")
    best = max(float(v.tags["test_accuracy"]) for v in versions)
    assert float(champion.tags["test_accuracy"]) == best
