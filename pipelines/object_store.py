"""The batch inference's inbox and output on object storage: `s3://bucket/prefix` as well as local paths.

A flow run on the Docker work pool is a fresh container with no volume, so the stack keeps the inbox and the
predictions in its object store (SOFTMAX_MLOPS_BATCH_INPUT, SOFTMAX_MLOPS_BATCH_OUTPUT_DIR). The flow stages
them through a temporary folder: it downloads the inbox's top-level objects (a folder's semantics: what
`predict` reads from a local folder), predicts locally, and uploads the finished file, so the object appears
only once it is complete (a PUT is atomic). The endpoint comes from AWS_ENDPOINT_URL and the keys from the
environment, as for DVC's remote. Reading Parquet or shards straight from the store is batch inference's own
work (fsspec there too).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import fsspec

from softmax_mlops.errors import PipelineError, first_line


class ObjectStoreError(PipelineError):
    """The store could not be read or written: one line naming the URL and the store's reason."""


@contextmanager
def _reporting(verb: str, url: str) -> Iterator[None]:
    """An unreachable store, a missing bucket or refused keys end as one line naming the URL, not as botocore's
    traceback (after botocore's own retries)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, s3fs and OS errors alike
        raise ObjectStoreError(f"cannot {verb} {url}: {first_line(exc)}") from None


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    # a fresh client each time, without fsspec's listings cache: an inbox is listed once a night, and must never
    # be answered from a listing made before the images arrived
    options: dict = {"skip_instance_cache": True, "use_listings_cache": False}
    if url.startswith("s3://") and (endpoint := os.environ.get("AWS_ENDPOINT_URL")):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def stem(url: str) -> str:
    """The name an output is called after: `s3://batch/incoming/` -> `incoming`."""
    return PurePosixPath(url.rstrip("/")).stem


def download(url: str, dest: Path) -> Path | None:
    """Copy an object, or the top-level objects under a prefix, into ``dest``; None when nothing is there."""
    with _reporting("read", url):
        fs, path = _fs(url)
        dest.mkdir(parents=True, exist_ok=True)
        if fs.isfile(path):
            target = dest / PurePosixPath(path).name
            fs.get(path, str(target))
            return target
        if not fs.isdir(path):
            return None
        folder = dest / stem(url)
        folder.mkdir()
        for entry in fs.ls(path, detail=True):
            if entry["type"] == "file":
                fs.get(entry["name"], str(folder / PurePosixPath(entry["name"]).name))
        return folder


def upload(local: Path, url: str) -> None:
    """Put a finished local file at ``url``."""
    with _reporting("write", url):
        fs, path = _fs(url)
        fs.put_file(str(local), path)


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name
