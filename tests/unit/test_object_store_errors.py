"""The batch inference's object store, failing: an unreachable store and a missing bucket each end in one line
that names the URL (src/softmax_mlops/object_store.py), never in botocore's traceback. Real failures: a port nothing
listens on, and a real S3 server (moto's, on 127.0.0.1) without the bucket."""

from __future__ import annotations

import pytest

from softmax_mlops import object_store
from stack import S3Server, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(180)]


def test_an_unreachable_store_is_one_line_naming_the_inbox(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only make the test slower
    for name, value in S3Server.KEYS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(object_store.ObjectStoreError) as failed:
        object_store.download("s3://batch/incoming/", tmp_path / "in")
    message = str(failed.value)
    assert message.startswith("cannot read s3://batch/incoming/: ") and endpoint in message, message
    assert "\n" not in message


def test_a_missing_bucket_is_one_line_naming_the_output(tmp_path, monkeypatch):
    local = tmp_path / "predictions.csv"
    local.write_text("id,class\n0,3\n")
    with S3Server("batch") as s3:
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
        for name, value in S3Server.KEYS.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(object_store.ObjectStoreError) as failed:
            object_store.upload(local, "s3://nobucket/predictions/out.csv")
        object_store.upload(local, "s3://batch/predictions/out.csv")  # the same file, where the bucket exists
        assert s3.keys("batch") == ["predictions/out.csv"]
    message = str(failed.value)
    assert message.startswith("cannot write s3://nobucket/predictions/out.csv: "), message
    assert "bucket does not exist" in message and "\n" not in message
