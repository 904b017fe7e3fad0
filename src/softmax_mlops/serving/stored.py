"""Shards read straight from object storage (s3://): what a sharded run's client lists, and what each Dask worker
reads of its own shard, with nothing downloaded whole and nothing staged on the client.

- A raw IDX or .npy object: the header is read to count the images, and each batch of a shard's range is one
  ranged read (an fsspec file, read ahead in blocks).
- A prefix of PNG/JPEG objects: each object of the shard is read and decoded (inputs.open_files).
- A Parquet object or prefix: pyarrow reads the footers, then each shard's row groups, through the same kind of
  file (parquet.py).

A gzipped IDX object is refused for sharding: gzip has no random access, so every shard would download and
decompress the object from its start. The single-process path (`predict` without --workers) reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .. import object_store
from ..errors import PipelineError, first_line
from .inputs import IMAGE_SUFFIXES, PIXELS, Source, read_idx_header

GZIP_MAGIC = b"\x1f\x8b"


def image_names(url: str) -> list[str]:
    """The PNG/JPEG objects under the prefix ``url``, relative to it, in a stable order."""
    return object_store.files_under(url, IMAGE_SUFFIXES)


def loader(prefix: str) -> Callable[[str], np.ndarray]:
    """Load PNG/JPEG objects under ``prefix`` by name, as the model sees them, through one client; a bad one is
    one line naming its URL."""
    from .images import ImageError, decode

    read = object_store.reader(prefix)

    def load(name: str) -> np.ndarray:
        try:
            return decode(read(name))
        except ImageError as exc:
            raise PipelineError(f"{object_store.join(prefix, name)}: {exc}") from None

    return load


def _npy_extent(url: str, fh) -> tuple[int, int]:  # noqa: ANN001 - an fsspec file
    """numpy's header reader (no pickle: an object dtype is only a name here, and is refused)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, OSError, EOFError) as exc:
        raise PipelineError(f"{url} is not a readable .npy array: {first_line(exc)}") from None
    if dtype != np.uint8:
        raise PipelineError(f"{url}: expected uint8 pixels, got {dtype}")
    if len(shape) not in (2, 3) or tuple(shape[1:]) not in ((PIXELS,), (28, 28)):
        raise PipelineError(f"{url}: expected shape [N, 28, 28] or [N, 784], got {list(shape)}")
    if fortran:
        raise PipelineError(
            f"{url}: Fortran-ordered arrays are not supported; save it with np.save(np.ascontiguousarray(a))"
        )
    return shape[0], fh.tell()


def _extent(url: str, fh) -> tuple[int, int]:  # noqa: ANN001 - an fsspec file
    """The image count and the first image's byte offset, from the header, checked against the object's size,
    which the open file already holds (its HEAD): no second client, no second request."""
    if url.lower().endswith(".npy"):
        count, offset = _npy_extent(url, fh)
    elif fh.read(2) == GZIP_MAGIC:
        raise PipelineError(
            f"{url} is gzipped: a sharded run reads ranges, and gzip has none (each shard would download the "
            "object from its start). Decompress it, or predict it without --workers"
        )
    else:
        fh.seek(0)
        dims, offset = read_idx_header(fh, url)
        count = dims[0]
    expected, size = offset + count * PIXELS, int(fh.size)
    if size < expected:
        raise PipelineError(f"{url} is truncated: {size} bytes, header promises {expected}")
    if size > expected and not url.lower().endswith(".npy"):
        raise PipelineError(f"{url} holds more than the {count} images its header promises")
    return count, offset


def extent(url: str) -> tuple[int, int]:
    """An IDX or .npy object's image count and the byte offset of its first image, from its header; its size
    must hold every image the header promises."""
    with object_store.reporting("read", url), object_store.open_file(url) as fh:
        return _extent(url, fh)


def open_range(url: str, start: int, stop: int, batch_size: int) -> Source:
    """Images ``start`` to ``stop`` of an IDX or .npy object, each with its position in the whole object as its
    id, read one batch at a time, through one file (one client) that reads the header and then the range."""
    fh = object_store.open_file(url)
    try:
        with object_store.reporting("read", url):
            count, offset = _extent(url, fh)
    except BaseException:
        fh.close()
        raise
    stop = min(stop, count)

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with object_store.reporting("read", url), fh:
            fh.seek(offset + start * PIXELS)
            for first in range(start, stop, batch_size):
                n = min(batch_size, stop - first)
                raw = fh.read(n * PIXELS)
                if len(raw) < n * PIXELS:  # the object changed since its header was read
                    raise PipelineError(f"{url} is truncated: image {first + len(raw) // PIXELS} is incomplete")
                yield np.arange(first, first + n), np.frombuffer(raw, np.uint8).reshape(n, 28, 28)

    return Source(stop - start, stream())
