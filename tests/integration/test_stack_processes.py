"""The compose stack's wiring, as processes on 127.0.0.1 instead of containers: PostgreSQL (Debian's
packages), an MLflow server with PostgreSQL as its backend store and its basic-auth app (docker/mlflow-server.sh,
as compose runs it), a Prefect server on PostgreSQL with its auth string, a process worker, and the training
deployment triggered against them, every client logged in. Stops everything it started."""

import base64
import os

import httpx
import mlflow
import pytest

from helpers import REPO, copy_project
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


def test_training_deployment_runs_against_postgres_backed_mlflow_and_prefect(
    real_splits, postgres, tmp_path_factory, monkeypatch
):
    root = copy_project(tmp_path_factory.mktemp("stack"))
    mlflow_db = postgres.create_database("mlflow")
    prefect_db = postgres.create_database("prefect")
    env = prefect_env(root, tmp_path_factory.mktemp("prefect-home"), free_port())
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://{prefect_db}"
    mlflow_url = f"http://127.0.0.1:{free_port()}"
    env["MLFLOW_TRACKING_URI"] = mlflow_url
    # log-in on both servers, as docker/compose.yaml sets it; every client below (worker, flow run, this test)
    # sends it from the environment
    password, auth_string = "a%admin-password-1", "admin:prefect-auth-1"
    server_env = {
        **env,
        "MLFLOW_BACKEND_STORE_URI": f"postgresql://{mlflow_db}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "session-key",
    }
    env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
    env.update(PREFECT_SERVER_API_AUTH_STRING=auth_string, PREFECT_API_AUTH_STRING=auth_string)

    with Processes() as procs:
        server = procs.start(
            str(REPO / "docker" / "mlflow-server.sh"),
            "--host",
            "127.0.0.1",
            "--port",
            mlflow_url.rsplit(":", 1)[1],
            "--artifacts-destination",
            str(tmp_path_factory.mktemp("mlartifacts")),
            cwd=root,
            env=server_env,
        )
        wait_http(f"{mlflow_url}/health", server)
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search).status_code == 401
        assert httpx.get(search, auth=("admin", "wrong-password")).status_code == 401
        start_prefect(procs, root, env)
        prefect_flows = f"{env['PREFECT_API_URL']}/flows/filter"
        assert httpx.post(prefect_flows, json={}).status_code == 401
        wrong = {"authorization": "Basic " + base64.b64encode(b"admin:wrong").decode()}
        assert httpx.post(prefect_flows, json={}, headers=wrong).status_code == 401
        flow_run_id, state = run_deployment_and_wait(env, "training-pipeline/weekly-retrain")
        assert state.is_completed(), state.message

        mlflow.set_tracking_uri(mlflow_url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        runs = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")
        assert {r.data.params["impl"] for r in runs} == {"scratch", "concise"}
        assert {r.data.tags["prefect_flow_run_id"] for r in runs} == {str(flow_run_id)}
        assert all(r.info.status == "FINISHED" for r in runs)
        client = mlflow.MlflowClient()
        assert str(client.get_model_version_by_alias("softmax-mlops-scratch", "champion").version) == "1"

    # the runs are rows in PostgreSQL, and Prefect's flow run is too; MLflow's users live beside its runs
    assert postgres.psql("mlflow", "SELECT username FROM users") == "admin"
    assert postgres.psql("mlflow", "SELECT count(*) FROM runs WHERE status = 'FINISHED'") == "2"
    assert postgres.psql("prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == "COMPLETED"
