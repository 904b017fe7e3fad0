"""The compose stack's wiring, as processes on 127.0.0.1 instead of containers: PostgreSQL (Debian's
packages), an MLflow server with PostgreSQL as its backend store, a Prefect server on PostgreSQL, a process
worker, and the training deployment triggered against them. Stops everything it started."""

import os

import mlflow
import pytest

from helpers import copy_project
from stack import PostgreSQL, Processes, free_port, prefect_env, run_deployment_and_wait, start_prefect, wait_http

pytestmark = [pytest.mark.realdata, pytest.mark.server]


@pytest.fixture(scope="module")
def postgres():
    server = PostgreSQL()
    if not server.available:
        message = "PostgreSQL is not installed (apt-get install postgresql; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with server:
        yield server


def test_training_deployment_runs_against_postgres_backed_mlflow_and_prefect(real_splits, postgres, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("stack"))
    mlflow_db = postgres.create_database("mlflow")
    prefect_db = postgres.create_database("prefect")
    env = prefect_env(root, tmp_path_factory.mktemp("prefect-home"), free_port())
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://{prefect_db}"
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env["MLFLOW_TRACKING_URI"] = mlflow_url

    with Processes() as procs:
        server = procs.start(
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            mlflow_url.rsplit(":", 1)[1],
            "--backend-store-uri",
            f"postgresql://{mlflow_db}",
            "--artifacts-destination",
            str(tmp_path_factory.mktemp("mlartifacts")),
            cwd=root,
            env=env,
        )
        wait_http(f"{mlflow_url}/health", server)
        start_prefect(procs, root, env)
        flow_run_id, state = run_deployment_and_wait(env, "training-pipeline/weekly-retrain")
        assert state.is_completed(), state.message

        mlflow.set_tracking_uri(mlflow_url)
        runs = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")
        assert {r.data.params["impl"] for r in runs} == {"scratch", "concise"}
        assert {r.data.tags["prefect_flow_run_id"] for r in runs} == {str(flow_run_id)}
        assert all(r.info.status == "FINISHED" for r in runs)
        client = mlflow.MlflowClient()
        assert str(client.get_model_version_by_alias("softmax-mlops-scratch", "champion").version) == "1"

    # the runs are rows in PostgreSQL, and Prefect's flow run is too
    assert postgres.psql("mlflow", "SELECT count(*) FROM runs WHERE status = 'FINISHED'") == "2"
    assert postgres.psql("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == "COMPLETED"
