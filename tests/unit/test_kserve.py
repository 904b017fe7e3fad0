"""The KServe InferenceService's structure, checked against what it runs: the serving image's Dockerfile, the
service's own routes and limits, and the compose stack's image. No cluster runs it here (docs/beyond.md says so)."""

import re

import pytest
import yaml

from helpers import REPO
from softmax_mlops import config

MANIFEST = REPO / "deploy" / "kubernetes" / "kserve" / "inferenceservice.yaml"


@pytest.fixture(scope="module")
def service():
    return yaml.safe_load(MANIFEST.read_text())


@pytest.fixture(scope="module")
def container(service):
    (only,) = service["spec"]["predictor"]["containers"]
    return only


def test_it_is_a_custom_predictor_inference_service(service, container):
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", service["metadata"]["name"])  # a DNS-1035 label
    assert container["name"] == "kserve-container"  # the name KServe expects of a custom predictor's container


def test_it_runs_the_serving_image_as_the_compose_stack_does(container):
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert container["image"] == compose["services"]["inference"]["image"]
    dockerfile = (REPO / "docker" / "Dockerfile.serve").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1)
    assert container["command"] == yaml.safe_load(cmd)
    assert f"EXPOSE {container['ports'][0]['containerPort']}" in dockerfile
    assert container["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SOFTMAX_MLOPS_MODEL"].startswith("models:/") and env["MLFLOW_TRACKING_URI"].startswith("http")
    assert float(env["SOFTMAX_MLOPS_MODEL_WAIT_S"]) > 0


def test_probes_point_at_v2_health_routes_the_server_has(container, onnx_model):
    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.serving.server import create_app

    routes = set(create_app(Predictor(onnx_model[0]), config.ServeConfig(), top_k=3).openapi()["paths"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"].startswith("/v2/health/") and get["path"] in routes, probe
        assert get["port"] == container["ports"][0]["containerPort"]
    startup = container["startupProbe"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # the start-up probe must outlast the wait for a champion, or the pod is killed while it waits
    assert startup["periodSeconds"] * startup["failureThreshold"] > float(env["SOFTMAX_MLOPS_MODEL_WAIT_S"])


def test_resources_and_concurrency_fit_the_service_limits(service, container):
    predictor = service["spec"]["predictor"]
    serve = config.load(REPO).serve
    assert predictor["containerConcurrency"] <= serve.max_connections
    assert predictor["timeout"] > serve.request_timeout_s
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_it_runs_as_the_images_non_root_user_on_a_read_only_root(service, container):
    dockerfile = (REPO / "docker" / "Dockerfile.serve").read_text()
    uid = int(re.search(r"^USER (\d+)$", dockerfile, re.M).group(1))
    pod, own = service["spec"]["predictor"]["securityContext"], container["securityContext"]
    assert pod["runAsNonRoot"] and own["runAsNonRoot"] and pod["runAsUser"] == own["runAsUser"] == uid != 0
    assert own["allowPrivilegeEscalation"] is False and own["capabilities"]["drop"] == ["ALL"]
    assert own["readOnlyRootFilesystem"] is True
    # a models:/ URI is downloaded into a temporary folder: /tmp must be writable
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in service["spec"]["predictor"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
