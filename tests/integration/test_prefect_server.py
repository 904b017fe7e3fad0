"""The real parts, as a user runs them on one machine: a Prefect server on 127.0.0.1, the process work pool,
`prefect deploy --all` from prefect.yaml, a worker, and a triggered training run. Stops all it started."""

import asyncio
import os
import signal
import socket
import subprocess
import time

import httpx
import mlflow
import pytest

from softmax_mlops import config
from helpers import copy_project

pytestmark = pytest.mark.realdata


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(real_splits, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("deployed"))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "SOFTMAX_MLOPS_PROJECT_DIR": str(root)}
    env.pop(config.TRACKING_URI_ENV, None)
    started = []

    def start(*cmd):
        proc = subprocess.Popen(list(cmd), cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        started.append(proc)
        return proc

    def run(*cmd):
        result = subprocess.run(list(cmd), cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    try:
        server = start("prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        run("prefect", "work-pool", "create", "softmax-mlops", "--type", "process")
        run("prefect", "--no-prompt", "deploy", "--all")
        start("prefect", "worker", "start", "--pool", "softmax-mlops")
        yield root, env
    finally:
        for proc in reversed(started):  # a Prefect worker ignores SIGTERM: SIGINT stops both cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prefect_client_call(env, fn):
    """Run ``fn(client)`` against the test server (the settings are read from the environment)."""
    import prefect.settings

    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_URL: env["PREFECT_API_URL"]}):
        from prefect import get_client

        async def main():
            async with get_client() as client:
                return await fn(client)

        return asyncio.run(main())


def test_triggered_training_run_completes_and_tags_mlflow(stack):
    root, env = stack

    async def trigger(client):
        deployment = await client.read_deployment_by_name("training-pipeline/weekly-retrain")
        return await client.create_flow_run_from_deployment(deployment.id)

    flow_run = prefect_client_call(env, trigger)

    async def state(client):
        return (await client.read_flow_run(flow_run.id)).state

    while not (current := prefect_client_call(env, state)).is_final():
        time.sleep(2)
    assert current.is_completed(), current.message

    mlflow.set_tracking_uri(config.load(root).mlflow.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["softmax-mlops"], output_format="list")
    assert {r.data.params["impl"] for r in runs} == {"scratch", "concise"}
    assert {r.data.tags["prefect_flow_run_id"] for r in runs} == {str(flow_run.id)}


def test_both_deployments_have_active_cron_schedules(stack):
    _, env = stack

    async def schedules(client):
        result = {}
        for name in ("training-pipeline/weekly-retrain", "batch-inference/nightly-batch-inference"):
            deployment = await client.read_deployment_by_name(name)
            result[name] = [(s.schedule.cron, s.active) for s in deployment.schedules]
        return result

    assert prefect_client_call(env, schedules) == {
        "training-pipeline/weekly-retrain": [("0 3 * * 1", True)],
        "batch-inference/nightly-batch-inference": [("30 2 * * *", True)],
    }


def test_serve_builds_the_same_deployments_from_prefect_yaml():
    from pipelines.serve import deployments_from_prefect_yaml

    deployments = {d.name: d for d in deployments_from_prefect_yaml()}
    assert set(deployments) == {"weekly-retrain", "nightly-batch-inference"}
    assert [s.schedule.cron for s in deployments["weekly-retrain"].schedules] == ["0 3 * * 1"]
    assert [s.schedule.cron for s in deployments["nightly-batch-inference"].schedules] == ["30 2 * * *"]
