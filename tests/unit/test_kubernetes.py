"""deploy/kubernetes/, validated without a cluster: the Job that the Prefect Kubernetes work pool renders from
our base job template, the Secret it takes its settings from, and the KServe InferenceService, each against
the schema the API server would check it with (vendored in tests/schemas/, see its README). A misspelled field
must fail, at any depth.

The Job is rendered by prefect-kubernetes' own code (`from_template_and_values`, then `prepare_for_flow_run`),
as its worker does for every flow run. What no test here can show: that a cluster schedules the Job, pulls the
image, lets the worker create Jobs (RBAC), and that KServe and Knative serve the InferenceService
(docs/beyond.md, "Validated, not run")."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from functools import cache
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from helpers import REPO
from stack import free_port, prefect_api

DEPLOY = REPO / "deploy" / "kubernetes"
SCHEMAS = REPO / "tests" / "schemas"
TEMPLATE = DEPLOY / "prefect-base-job-template.json"
SECRET = DEPLOY / "secret.example.yaml"
ISVC = DEPLOY / "kserve" / "inferenceservice.yaml"
DASK = DEPLOY / "dask" / "daskcluster.yaml"


@cache
def kubernetes_validator(kind: str) -> Draft202012Validator:
    """A validator for one of Kubernetes' own types (``io.k8s.api.batch.v1.Job`` ...), closed as the API
    server's strict field validation is."""
    defs = json.loads((SCHEMAS / "kubernetes-v1.37.0-job-secret.json").read_text())["$defs"]
    return Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": defs})


def strict_crd_schema(node: Any) -> Any:
    """A CRD's structural schema as the API server applies it under strict field validation: an object that
    lists its properties takes no other field, unless it says otherwise (``additionalProperties``, or
    ``x-kubernetes-preserve-unknown-fields``)."""
    if isinstance(node, list):
        return [strict_crd_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {
        key: (
            {name: strict_crd_schema(sub) for name, sub in value.items()}
            if key == "properties"
            else strict_crd_schema(value)
        )
        for key, value in node.items()
    }
    opens = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and not opens:
        closed["additionalProperties"] = False
    return closed


@cache
def inference_service_validator() -> Draft202012Validator:
    schema = json.loads((SCHEMAS / "kserve-v0.20.0-inferenceservice-v1beta1.json").read_text())
    return Draft202012Validator(strict_crd_schema(schema))


def errors_of(validator: Draft202012Validator, document: Any) -> list[str]:
    """Every error, with the path of the field it is about."""
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def inference_service_errors(document: dict) -> list[str]:
    """The CRD's schema leaves ``metadata`` to the API server, which checks it as ObjectMeta."""
    return errors_of(inference_service_validator(), document) + errors_of(
        kubernetes_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), document["metadata"]
    )


@cache
def dask_cluster_validator() -> Draft202012Validator:
    """dask-kubernetes' schema lists only spec and status; apiVersion, kind and metadata are the fields that every
    custom resource has at its root, which a CRD may leave out (KServe's lists them)."""
    schema = json.loads((SCHEMAS / "dask-kubernetes-2025.4.3-daskcluster-v1.json").read_text())
    implicit = {"apiVersion": {"const": "kubernetes.dask.org/v1"}, "kind": {"const": "DaskCluster"}}
    schema["properties"] = {**implicit, "metadata": {"type": "object"}, **schema["properties"]}
    return Draft202012Validator(strict_crd_schema(schema))


def dask_cluster_errors(document: dict) -> list[str]:
    return errors_of(dask_cluster_validator(), document) + errors_of(
        kubernetes_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), document["metadata"]
    )


def render(template: dict, values: dict | None = None) -> dict:
    """The Job that prefect-kubernetes' worker would submit for a flow run, rendered by its own code. Nothing
    here calls the Prefect API; the process is pointed at a closed port, so that nothing could."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    with prefect_api(f"http://127.0.0.1:{free_port()}/api"):
        configuration = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(copy.deepcopy(template), values or {})
        )
        flow_run = FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="brave-otter")
        configuration.prepare_for_flow_run(flow_run)
    return configuration.job_manifest


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


@pytest.fixture(scope="module")
def job(template) -> dict:
    return render(template)


def test_the_rendered_job_is_a_valid_batch_v1_job(job):
    assert errors_of(kubernetes_validator("io.k8s.api.batch.v1.Job"), job) == []
    assert "{{" not in json.dumps(job)  # every placeholder was filled
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"


def test_the_job_runs_the_pipeline_image_non_root_with_resources_and_the_secret(job, template):
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "softmax-mlops-pipeline:latest"
    assert container["args"] == ["prefect", "flow-run", "execute"]  # the worker's command for a flow run
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    # the image's USER (docker/Dockerfile), refused by the kubelet if it were root
    assert f"--uid {pod['securityContext']['runAsUser']} " in (REPO / "docker" / "Dockerfile").read_text()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["envFrom"] == [{"secretRef": {"name": yaml.safe_load(SECRET.read_text())["metadata"]["name"]}}]
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 3600
    assert spec["backoffLimit"] == 0 and spec["completions"] == spec["parallelism"] == 1
    assert pod["restartPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "PREFECT__FLOW_RUN_ID" in env  # prepare_for_flow_run ran: the container knows its flow run


def test_a_deployments_job_variables_render_a_valid_job_too(template):
    job = render(
        template,
        {"image": "registry.example.org/softmax-mlops-pipeline:1.2", "secret_name": "team-a", "cpu_limit": "4"},
    )
    assert errors_of(kubernetes_validator("io.k8s.api.batch.v1.Job"), job) == []
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.org/softmax-mlops-pipeline:1.2"
    assert container["envFrom"] == [{"secretRef": {"name": "team-a"}}]
    assert container["resources"]["limits"]["cpu"] == "4"


def test_every_placeholder_of_the_template_is_a_declared_variable(template):
    from prefect.utilities.templating import find_placeholders

    names = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert names <= set(template["variables"]["properties"]), names - set(template["variables"]["properties"])
    assert {"secret_name", "active_deadline_seconds"} <= names


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("spec", "backoffLimit"), "backofLimit"),
        (("spec", "template", "spec", "restartPolicy"), "restartPolicyy"),
        (("spec", "template", "spec", "containers", 0, "envFrom"), "envFom"),
        (("spec", "template", "spec", "securityContext", "runAsNonRoot"), "runAsNonroot"),
    ],
)
def test_a_misspelled_field_in_the_template_fails_validation(template, path, wrong):
    broken = copy.deepcopy(template)
    parent = broken["job_configuration"]["job_manifest"]
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    errors = errors_of(kubernetes_validator("io.k8s.api.batch.v1.Job"), render(broken))
    assert any(f"'{wrong}' was unexpected" in error for error in errors), errors


def test_prefect_kubernetes_default_template_puts_job_fields_in_the_pod_spec():
    """Upstream's own default template (0.8.0) has completions and parallelism in the PodSpec, where they are
    no fields: strict validation refuses it (an API server with the default "Warn" drops them with a warning).
    Ours moves them to the JobSpec; this test shows the schema can tell the difference."""
    from prefect_kubernetes.worker import KubernetesWorker

    errors = errors_of(
        kubernetes_validator("io.k8s.api.batch.v1.Job"),
        render(KubernetesWorker.get_default_base_job_template(), {"image": "softmax-mlops-pipeline:latest"}),
    )
    assert sorted(errors) == [
        "spec.template.spec: Additional properties are not allowed ('completions', 'parallelism' were unexpected)"
    ]


def test_the_secret_is_valid_and_holds_what_each_docker_pool_run_gets():
    secret = yaml.safe_load(SECRET.read_text())
    assert errors_of(kubernetes_validator("io.k8s.api.core.v1.Secret"), secret) == []
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    names = compose["services"]["prefect-worker"]["environment"]["SOFTMAX_MLOPS_FLOW_ENV"].split()
    required = {name for name in names if not name.endswith("?")}  # a trailing ? marks an optional one
    assert set(secret["stringData"]) == required


def test_the_inference_service_is_valid_against_kserves_crd():
    assert inference_service_errors(yaml.safe_load(ISVC.read_text())) == []


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("spec", "predictor"), "predicter"),
        (("spec", "predictor", "minReplicas"), "minReplica"),
        (("spec", "predictor", "containers", 0, "image"), "imag"),
        (("spec", "predictor", "containers", 0, "readinessProbe", "httpGet", "path"), "paht"),
        (("metadata", "annotations"), "anotations"),
    ],
)
def test_a_misspelled_field_in_the_inference_service_fails_validation(path, wrong):
    service = yaml.safe_load(ISVC.read_text())
    parent = service
    for key in path[:-1]:
        parent = parent[key]
    parent[wrong] = parent.pop(path[-1])
    errors = inference_service_errors(service)
    assert any(f"'{wrong}' was unexpected" in error for error in errors), errors


def test_the_dask_cluster_is_valid_against_dask_kubernetes_crd():
    assert dask_cluster_errors(yaml.safe_load(DASK.read_text())) == []


@pytest.mark.parametrize(
    ("path", "wrong"),
    [
        (("spec", "worker", "replicas"), "replica"),
        (("spec", "worker", "spec", "containers", 0, "envFrom"), "envfrom"),
        (("spec", "scheduler", "service", "ports", 0, "targetPort"), "target_port"),
        (("spec", "scheduler", "spec", "containers", 0, "readinessProbe", "httpGet"), "httpget"),
        (("spec", "schedular"), None),
    ],
    ids=["replicas", "envFrom", "targetPort", "httpGet", "scheduler"],
)
def test_a_misspelled_field_in_the_dask_cluster_fails_validation(path, wrong):
    cluster = yaml.safe_load(DASK.read_text())
    parent = cluster
    for key in path[:-1]:
        parent = parent[key]
    if wrong is None:  # a field added that the CRD does not have
        parent[path[-1]], wrong = {}, path[-1]
    else:
        parent[wrong] = parent.pop(path[-1])
    errors = dask_cluster_errors(cluster)
    assert any(f"'{wrong}' was unexpected" in error for error in errors), errors


def test_the_dask_cluster_runs_the_pipeline_image_as_the_documented_scheduler_non_root():
    """What a sharded run needs of it: the address the docs give (the operator names the scheduler's Service
    <cluster>-scheduler), workers of one thread on the pipeline image with the flow runs' Secret and a Prefect API,
    and no container as root."""
    cluster = yaml.safe_load(DASK.read_text())
    name = cluster["metadata"]["name"]
    address = f"tcp://{name}-scheduler.<namespace>:8786"
    assert address in DASK.read_text() and address in (REPO / "docs" / "beyond.md").read_text()
    assert {p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]} >= {8786}
    assert cluster["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == name
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    (scheduler,) = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"] == ["dask", "scheduler"]
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    secret = yaml.safe_load(SECRET.read_text())["metadata"]["name"]
    assert worker["envFrom"] == [{"secretRef": {"name": secret}}]
    assert [e["name"] for e in worker["env"]] == ["PREFECT_API_URL"]
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    user = dockerfile.rsplit("USER ", 1)[1].split()[0]
    for role in ("worker", "scheduler"):
        pod = cluster["spec"][role]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == user
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_strict_crd_rule_closes_listed_objects_and_keeps_declared_open_ones():
    schema = {
        "type": "object",
        "properties": {
            "listed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "preserved": {"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "properties": {"type": "object", "properties": {"b": {"type": "string"}}},  # a field named so
        },
    }
    validator = Draft202012Validator(strict_crd_schema(schema))
    assert errors_of(validator, {"listed": {"a": "x"}, "preserved": {"z": 1}, "map": {"k": "v"}}) == []
    unexpected = "listed: Additional properties are not allowed ('b' was unexpected)"
    assert errors_of(validator, {"listed": {"b": "x"}}) == [unexpected]
    assert errors_of(validator, {"properties": {"c": "x"}}) != []
    assert errors_of(validator, {"other": 1}) != []
