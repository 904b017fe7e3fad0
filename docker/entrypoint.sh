#!/bin/sh
# Set DVC up for a container, then run the command. A mounted checkout keeps using git; an image copy of the
# project has no .git, so DVC runs with core.no_scm (no git: experiments are not available, repro is).
# With SOFTMAX_MLOPS_DVC_REMOTE (an s3:// URL) the project gets it as its default remote, --local so that
# nothing reaches a committed file; the endpoint comes from AWS_ENDPOINT_URL and the keys stay in the
# environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), where DVC's S3 client reads them.
set -eu
cd /app
if [ ! -e .git ] && [ -d .dvc ]; then
  dvc config --local core.no_scm true >/dev/null
fi
if [ -n "${SOFTMAX_MLOPS_DVC_REMOTE:-}" ] && [ -d .dvc ]; then
  dvc remote add --local --force --default store "$SOFTMAX_MLOPS_DVC_REMOTE" >/dev/null
  if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
    dvc remote modify --local store endpointurl "$AWS_ENDPOINT_URL" >/dev/null
  fi
fi
exec "$@"
