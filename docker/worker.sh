#!/bin/sh
# The Prefect worker service: make sure the process pool and the deployments from prefect.yaml exist on the
# server (both idempotent), then poll the pool. --with-healthcheck serves /health on :8080 for HEALTHCHECK.
set -eu
prefect work-pool inspect softmax-mlops >/dev/null 2>&1 || prefect work-pool create softmax-mlops --type process
prefect --no-prompt deploy --all
exec prefect worker start --pool softmax-mlops --with-healthcheck
