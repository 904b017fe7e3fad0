#!/bin/sh
# The Prefect worker service: wait (bounded) for the Prefect API, make sure the work pool and the deployments
# from prefect.yaml exist on the server (both idempotent), then poll the pool. SOFTMAX_MLOPS_WORK_POOL_TYPE
# picks the pool: docker (the stack: each flow run a fresh container, through the engine socket) or process
# (one machine without containers: runs are processes of this worker). --with-healthcheck serves
# /health on :8080 for HEALTHCHECK. If the API stays away longer than SOFTMAX_MLOPS_WAIT_S, exit non-zero and
# let the restart policy start over, rather than crash-looping on a connection error.
set -eu
python3 - <<'PY'
import os, sys, time, urllib.request
url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
budget = float(os.environ.get("SOFTMAX_MLOPS_WAIT_S", "120"))
deadline = time.monotonic() + budget
while True:
    try:
        urllib.request.urlopen(url, timeout=5).read()
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            sys.exit(f"worker: the Prefect API at {url} did not answer within {budget:.0f} s: {exc}")
        print(f"worker: waiting for the Prefect API at {url} ({exc})", flush=True)
        time.sleep(3)
PY
pool=softmax-mlops   # the pool that prefect.yaml's deployments name
case "${SOFTMAX_MLOPS_WORK_POOL_TYPE:-process}" in
  docker)
    # Every flow run in its own container (docker/docker_pool.py): the template is written again at each start,
    # so a changed image, network or environment reaches the next run. The reaper removes finished containers.
    python3 /app/docker/docker_pool.py > /tmp/docker-pool.json
    prefect work-pool create "$pool" --type docker --base-job-template /tmp/docker-pool.json --overwrite
    SOFTMAX_MLOPS_WORK_POOL="$pool" python3 /app/docker/reaper.py &
    ;;
  process)
    prefect work-pool inspect "$pool" >/dev/null 2>&1 || prefect work-pool create "$pool" --type process
    ;;
  *)
    echo "worker: SOFTMAX_MLOPS_WORK_POOL_TYPE must be docker or process, not ${SOFTMAX_MLOPS_WORK_POOL_TYPE}" >&2
    exit 2
    ;;
esac
prefect --no-prompt deploy --all
exec prefect worker start --pool "$pool" --with-healthcheck
