"""The stack's Docker work pool template (docker/docker_pool.py), run as the worker runs it and rendered by
prefect-docker's own job configuration: what a flow-run container gets, and nothing of the worker's own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from stack import free_port

SCRIPT = REPO / "docker" / "docker_pool.py"


def template(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def rendered(base: dict) -> dict:
    """The job configuration prefect-docker builds from the template with no deployment overrides.

    The worker passes its API client, for the block and variable references a template may hold. This one
    holds none, so the client here points at a port where nothing listens: a reference that crept in fails the
    test, where the default client would start a temporary Prefect server (5 s) and resolve it quietly."""
    import asyncio

    from prefect.client.orchestration import PrefectClient
    from prefect_docker.worker import DockerWorkerJobConfiguration

    nowhere = PrefectClient(f"http://127.0.0.1:{free_port()}/api")  # nothing listens there
    configure = DockerWorkerJobConfiguration.from_template_and_values(base, values={}, client=nowhere)
    return asyncio.run(configure).model_dump()


def test_a_flow_run_gets_the_image_network_and_only_the_listed_environment():
    proc = template(
        PATH="/usr/bin:/bin",
        PREFECT_HOME="/app/.prefect",  # the worker's own: must not reach a run
        MLFLOW_TRACKING_URI="http://mlflow:5000",
        AWS_SECRET_ACCESS_KEY="s3cret",
        SOFTMAX_MLOPS_FLOW_ENV="MLFLOW_TRACKING_URI AWS_SECRET_ACCESS_KEY FASHION_MNIST_MIRROR?",
        SOFTMAX_MLOPS_FLOW_NETWORK="softmax-mlops",
        SOFTMAX_MLOPS_FLOW_VOLUMES="/data/fashion-mnist:/mirror:ro",
    )
    assert proc.returncode == 0, proc.stderr
    job = rendered(json.loads(proc.stdout))
    assert job["image"] == "softmax-mlops-pipeline:latest"
    assert job["image_pull_policy"] == "Never"  # built locally, never pushed: a pull would crash the run
    assert job["networks"] == ["softmax-mlops"]
    assert job["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "s3cret"}
    assert job["volumes"] == ["/data/fashion-mnist:/mirror:ro"]
    assert job["auto_remove"] is False  # the reaper removes containers after the final state
    assert job["stream_output"] is True


def test_an_optional_name_that_is_set_is_passed_on():
    proc = template(
        PATH="/usr/bin:/bin",
        FASHION_MNIST_MIRROR="/mirror",
        SOFTMAX_MLOPS_FLOW_ENV="FASHION_MNIST_MIRROR?",
    )
    assert proc.returncode == 0, proc.stderr
    assert rendered(json.loads(proc.stdout))["env"] == {"FASHION_MNIST_MIRROR": "/mirror"}


@pytest.mark.parametrize("listed", ["MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI AWS_ENDPOINT_URL?"])
def test_a_required_name_that_is_unset_is_refused_in_one_line(listed):
    proc = template(PATH="/usr/bin:/bin", SOFTMAX_MLOPS_FLOW_ENV=listed)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == "docker_pool: SOFTMAX_MLOPS_FLOW_ENV names unset variables: MLFLOW_TRACKING_URI"
