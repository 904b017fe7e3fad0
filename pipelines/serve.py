"""The single-process alternative to a work pool: serve the deployments with their schedules from this
process (`python -m pipelines.serve`). Names, crons and parameters are read from prefect.yaml, so the two
ways of scheduling cannot drift apart.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from prefect import serve

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def deployments_from_prefect_yaml(path: Path = PREFECT_YAML) -> list:
    spec = yaml.safe_load(path.read_text())
    result = []
    for deployment in spec["deployments"]:
        source, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(source.removesuffix(".py").replace("/", ".")), name)
        crons = [s["cron"] for s in deployment.get("schedules", []) if s.get("active", True)]
        result.append(
            flow.to_deployment(
                name=deployment["name"],
                cron=crons[0] if crons else None,
                parameters=deployment.get("parameters") or {},
                description=deployment.get("description"),
            )
        )
    return result


if __name__ == "__main__":
    serve(*deployments_from_prefect_yaml())
