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
    runs = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")
    assert {r.data.params["impl"] for r in runs} == {"scratch", "concise"}
    assert {r.data.tags["prefect_flow_run_id"] for r in runs} == {str(flow_run_id)}


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
    assert set(deployments) == {"weekly-retrain", "nightly-batch-inference"}
    assert [s.schedule.cron for s in deployments["weekly-retrain"].schedules] == ["0 3 * * 1"]
    assert [s.schedule.cron for s in deployments["nightly-batch-inference"].schedules] == ["30 2 * * *"]
