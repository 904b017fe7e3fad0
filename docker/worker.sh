#!/bin/sh
# The Prefect worker service: wait (bounded) for the Prefect API, make sure the process pool and the deployments
# from prefect.yaml exist on the server (both idempotent), then poll the pool. --with-healthcheck serves
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
prefect work-pool inspect softmax-mlops >/dev/null 2>&1 || prefect work-pool create softmax-mlops --type process
prefect --no-prompt deploy --all
exec prefect worker start --pool softmax-mlops --with-healthcheck
