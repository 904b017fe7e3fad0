"""Batch inference's inputs and outputs on object storage: `s3://bucket/prefix` as well as local paths, for
`predict` and the batch-inference flow alike.

A flow run on the Docker work pool is a fresh container with no volume, so the stack keeps the inbox and the
predictions in its object store (SOFTMAX_MLOPS_BATCH_INPUT, SOFTMAX_MLOPS_BATCH_OUTPUT_DIR). The flow stages
them through a temporary folder: it downloads the inbox's top-level objects (a folder's semantics: what
`predict` reads from a local folder), predicts locally, and uploads the finished file, so the object appears
only once it is complete (a PUT is atomic). The endpoint comes from AWS_ENDPOINT_URL and the keys from the
environment, as for DVC's remote.

A sharded run (serving/shards.py) stages nothing: its client lists the input and each Dask worker reads its own
shard from the store and writes its own part there, through the readers and writers below.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .errors import PipelineError, first_line

if TYPE_CHECKING:
    import fsspec


class ObjectStoreError(PipelineError):
    """The store could not be read or written: one line naming the URL and the store's reason."""


@contextmanager
def reporting(verb: str, url: str) -> Iterator[None]:
    """An unreachable store, a missing bucket or refused keys end as one line naming the URL, not as botocore's
    traceback (after botocore's own retries)."""
    try:
        yield
    except PipelineError:  # already one line, naming what it is about
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, s3fs and OS errors alike
        raise ObjectStoreError(f"cannot {verb} {url}: {first_line(exc)}") from None


def is_url(path: str) -> bool:
    return "://" in path


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        import fsspec
    except ImportError:
        raise PipelineError(f"{url}: object storage needs fsspec and s3fs (the pipeline extra)") from None
    # a fresh client each time, without fsspec's listings cache: an inbox is listed once a night, and must never
    # be answered from a listing made before the images arrived
    options: dict = {"skip_instance_cache": True, "use_listings_cache": False}
    if url.startswith("s3://") and (endpoint := os.environ.get("AWS_ENDPOINT_URL")):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def open_file(url: str):  # noqa: ANN201 - an fsspec file, read-only and seekable
    """The object at ``url`` as a seekable binary file, read in ranged GETs as it is read."""
    with reporting("read", url):
        fs, path = _fs(url)
        return fs.open(path, "rb")


def read_bytes(url: str) -> bytes:
    """The object's bytes."""
    with reporting("read", url):
        fs, path = _fs(url)
        return fs.cat_file(path)


def read_if_exists(url: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    with reporting("read", url):
        fs, path = _fs(url)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def reader(prefix: str) -> Callable[[str], bytes]:
    """Read objects under ``prefix`` by their names relative to it, through one client: a shard of many small
    objects (PNGs) would otherwise make a client for each."""
    with reporting("read", prefix):
        fs, root = _fs(prefix)

    def read(name: str) -> bytes:
        with reporting("read", join(prefix, name)):
            return fs.cat_file(f"{root.rstrip('/')}/{name}")

    return read


def write_bytes(url: str, data: bytes) -> None:
    """One PUT: the object appears whole or not at all."""
    with reporting("write", url):
        fs, path = _fs(url)
        fs.pipe_file(path, data)


def kind(url: str) -> str | None:
    """ "file", "folder" (a prefix with objects under it), or None when nothing is there."""
    with reporting("read", url):
        fs, path = _fs(url)
        if fs.isfile(path):
            return "file"
        return "folder" if fs.isdir(path) else None


def files_under(url: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """The objects under the prefix ``url`` (at any depth) whose names end with one of ``suffixes`` (any case;
    all when none is given), as paths relative to the prefix, in a stable order."""
    with reporting("list", url):
        fs, path = _fs(url)
        root = path.rstrip("/") + "/"
        names = (name[len(root) :] for name in fs.find(root) if name.startswith(root))
        return sorted(n for n in names if not suffixes or n.lower().endswith(suffixes))


def stem(url: str) -> str:
    """The name an output is called after: `s3://batch/incoming/` -> `incoming`."""
    return PurePosixPath(url.rstrip("/")).stem


def download(url: str, dest: Path) -> Path | None:
    """Copy an object, or the top-level objects under a prefix, into ``dest``; None when nothing is there."""
    with reporting("read", url):
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
    with reporting("write", url):
        fs, path = _fs(url)
        fs.put_file(str(local), path)


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def sibling(ref: str, name: str) -> str:
    """The file called ``name`` beside ``ref``, a path or a URL (a drift report beside its predictions)."""
    if is_url(ref):
        return join(ref.rstrip("/").rsplit("/", 1)[0], name)
    return str(Path(ref).with_name(name))


def upload_folder(local: Path, url: str, last: str | None = None) -> None:
    """Put every file of a finished local folder under the prefix ``url``, the file named ``last`` after all the
    others: a reader who finds it finds every other one (a sharded run's manifest)."""
    for file in sorted((f for f in local.iterdir() if f.is_file()), key=lambda f: f.name == last):
        upload(file, join(url, file.name))


def refuse_overwriting_input(input_ref: str, output_ref: str) -> None:
    """An output URL never replaces its input URL, nor lands under an input prefix."""
    source, target = input_ref.rstrip("/"), output_ref.rstrip("/")
    if target == source or target.startswith(source + "/"):
        same = target == source
        raise PipelineError(
            f"refusing to write {output_ref}: it is {'the input' if same else 'under the input prefix'} {input_ref}; "
            "choose another --output"
        )


@contextmanager
def staged(input_ref: str, output_ref: str) -> Iterator[tuple[Path, Path]]:
    """Local paths for an input and an output that may be URLs: a URL input is downloaded to a temporary folder
    first, and a URL output is written there and uploaded once the block has finished it (with the files
    ``finished`` names beside it; see ``upload_outputs``). Local paths pass through."""
    if not (is_url(input_ref) or is_url(output_ref)):
        yield Path(input_ref), Path(output_ref)
        return
    if is_url(input_ref) and is_url(output_ref):
        refuse_overwriting_input(input_ref, output_ref)
    with tempfile.TemporaryDirectory(prefix="softmax-mlops-") as tmp:
        source = Path(input_ref)
        if is_url(input_ref):
            found = download(input_ref, Path(tmp) / "in")
            if found is None:
                raise PipelineError(f"{input_ref} does not exist")
            source = found
        output = (
            Path(tmp) / "out" / PurePosixPath(output_ref.rstrip("/")).name if is_url(output_ref) else Path(output_ref)
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        yield source, output


def upload_outputs(output: Path, output_ref: str, beside: tuple[Path, ...] = (), last: str | None = None) -> None:
    """Upload a finished output (a file, or a folder with ``last`` uploaded last) to ``output_ref``, and the files
    ``beside`` it (a drift report) first, next to it. Nothing for a local output."""
    if not is_url(output_ref):
        return
    for extra in beside:
        if extra.exists():
            upload(extra, sibling(output_ref, extra.name))
    if output.is_dir():
        upload_folder(output, output_ref, last)
    else:
        upload(output, output_ref)
