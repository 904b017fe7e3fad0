"""Print the base job template of the stack's Docker work pool, as JSON, for `prefect work-pool create
--base-job-template`: prefect-docker's own template, with the stack's defaults filled in.

Every flow run then becomes a fresh container of the pipeline image, on the compose network, with no volumes of
state: it pulls from the DVC remote, runs its stages, pushes outputs and the run-cache, and logs to MLflow.
The defaults come from the worker's environment, so that compose.yaml is the one place they are written:

- SOFTMAX_MLOPS_FLOW_IMAGE: the image (default softmax-mlops-pipeline:latest). compose builds it locally and
  never pushes it, so the pull policy is Never (SOFTMAX_MLOPS_FLOW_PULL_POLICY): with a `latest` tag the worker
  would otherwise try a registry and crash the run.
- SOFTMAX_MLOPS_FLOW_NETWORK: the network, so that service names (mlflow, prefect-server, objectstore) resolve.
  A loopback API URL would be rewritten to host.docker.internal, which podman 4.3 does not provide.
- SOFTMAX_MLOPS_FLOW_ENV: the names of the worker's variables that each run gets, values copied; a name that
  ends in `?` may be unset, any other must be set. The worker's whole environment is not passed on: its
  PREFECT_HOME and the like belong to the worker.
- SOFTMAX_MLOPS_FLOW_VOLUMES: bind mounts, space-separated (only the read-only data mirror of
  compose.mirror.yaml; state never lives on a volume).

auto_remove stays false: with it, a container that died without reporting left its run PENDING (holding a
concurrency slot) and short runs lost their output. docker/reaper.py removes a run's container once Prefect
holds its final state.
"""

from __future__ import annotations

import json
import os
import sys

from prefect_docker.worker import DockerWorker


def template(environ: dict[str, str]) -> dict:
    """prefect-docker's base job template with the stack's defaults (see the module docstring)."""
    base = DockerWorker.get_default_base_job_template()
    listed = environ.get("SOFTMAX_MLOPS_FLOW_ENV", "").split()
    if missing := [name for name in listed if not name.endswith("?") and name not in environ]:
        raise SystemExit(f"docker_pool: SOFTMAX_MLOPS_FLOW_ENV names unset variables: {', '.join(missing)}")
    names = [name.removesuffix("?") for name in listed if name.removesuffix("?") in environ]
    defaults = {
        "image": environ.get("SOFTMAX_MLOPS_FLOW_IMAGE", "softmax-mlops-pipeline:latest"),
        "image_pull_policy": environ.get("SOFTMAX_MLOPS_FLOW_PULL_POLICY", "Never"),
        "networks": [environ.get("SOFTMAX_MLOPS_FLOW_NETWORK", "softmax-mlops")],
        "env": {name: environ[name] for name in names},
        "volumes": environ.get("SOFTMAX_MLOPS_FLOW_VOLUMES", "").split(),
        "auto_remove": False,
        "stream_output": True,
    }
    properties = base["variables"]["properties"]
    for key, value in defaults.items():
        properties[key]["default"] = value
    return base


def main() -> int:
    json.dump(template(dict(os.environ)), sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
