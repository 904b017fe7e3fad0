"""Remove the Docker work pool's finished flow-run containers, but only once Prefect holds the run's final state.

prefect-docker's `auto_remove` raced its own log streaming under podman (PrefectHQ/prefect#8421): a container
that died without reporting left its run PENDING, and short runs lost their output. So the pool keeps
containers (auto_remove false, docker/docker_pool.py), and this loop, started beside the worker by
docker/worker.sh, removes each container labelled with the pool's name when it is no longer running and its
flow run is COMPLETED, FAILED, CRASHED or CANCELLED (or gone from the server). A container that failed to start
("created") is removed the same way once the worker has marked its run CRASHED.

This is housekeeping through the engine's own API (docker-py, as the worker uses), not a worker: it never starts
anything. One line per removal, naming the container and the run. Settings: SOFTMAX_MLOPS_REAP_EVERY_S
(default 20), the pool from SOFTMAX_MLOPS_WORK_POOL (default softmax-mlops).
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from docker.errors import DockerException, NotFound
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

import docker

RUN_LABEL = "io.prefect.flow-run-id"
POOL_LABEL = "io.prefect.work-pool-name"


def final_state(client, run_id: str) -> str | None:
    """The run's final state name, 'gone' if the server no longer knows it, else None (still going)."""
    try:
        run = client.read_flow_run(uuid.UUID(run_id))
    except (ObjectNotFound, ValueError):
        return "gone"
    return run.state.name if run.state is not None and run.state.is_final() else None


def reap_once(engine: docker.DockerClient, pool: str) -> int:
    """Remove the pool's stopped containers whose runs are final; returns how many were removed."""
    removed = 0
    with get_client(sync_client=True) as client:
        for container in engine.containers.list(all=True, filters={"label": f"{POOL_LABEL}={pool}"}):
            if container.status not in ("exited", "created", "dead"):
                continue
            run_id = container.labels.get(RUN_LABEL, "")
            if (state := final_state(client, run_id)) is None:
                continue
            try:
                container.remove(force=True)
            except NotFound:
                continue
            removed += 1
            print(f"reaper: removed container {container.name} of flow run {run_id} ({state})", flush=True)
    return removed


def main() -> int:
    pool = os.environ.get("SOFTMAX_MLOPS_WORK_POOL", "softmax-mlops")
    every = float(os.environ.get("SOFTMAX_MLOPS_REAP_EVERY_S", "20"))
    engine = docker.from_env()
    while True:
        try:
            reap_once(engine, pool)
        except (DockerException, OSError) as exc:  # the engine or the API away for a moment: try again later
            print(f"reaper: {exc}", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - httpx's errors from the Prefect client; never die
            print(f"reaper: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        time.sleep(every)


if __name__ == "__main__":
    sys.exit(main())
