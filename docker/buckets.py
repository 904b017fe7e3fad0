"""Create the stack's buckets on its object store, idempotently: a one-shot job that compose runs at every `up`.

Waits (bounded by SOFTMAX_MLOPS_WAIT_S) for the store at AWS_ENDPOINT_URL, then creates each bucket of
S3_BUCKETS (space-separated) that does not exist yet. Any S3-compatible store will do: SeaweedFS in
docker/compose.yaml, moto's server in the stack test's stand-in. Exits non-zero with one line naming the
endpoint when the store stays away or refuses.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    buckets = os.environ.get("S3_BUCKETS", "").split()
    budget = float(os.environ.get("SOFTMAX_MLOPS_WAIT_S", "120"))
    # one attempt per call, a short connect: the loop below is the retry, so that the wait stays inside its budget
    # (botocore's own retries and back-off took 8 s to give up on a refused port with a budget of 0 s)
    once = Config(retries={"total_max_attempts": 1}, connect_timeout=5)
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=once)
    deadline = time.monotonic() + budget
    while True:
        try:
            existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                sys.exit(f"buckets: the object store at {endpoint} did not answer within {budget:.0f} s: {exc}")
            print(f"buckets: waiting for the object store at {endpoint} ({exc})", flush=True)
            time.sleep(2)
    for bucket in buckets:
        if bucket in existing:
            print(f"buckets: s3://{bucket} exists", flush=True)
            continue
        try:
            s3.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                sys.exit(f"buckets: could not create s3://{bucket} at {endpoint}: {exc}")
        print(f"buckets: created s3://{bucket}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
