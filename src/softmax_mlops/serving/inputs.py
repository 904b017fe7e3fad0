"""Readers for batch inference: IDX (gzipped or raw), .npy and folders of images, each yielding uint8
[n, 28, 28] batches with an id per image. Memory stays bounded: raw IDX and .npy are memory-mapped and
gzipped IDX is decompressed as a stream, so inputs larger than RAM work.
"""

from __future__ import annotations

import gzip
import mmap
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PipelineError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIXELS = 28 * 28


@dataclass
class Source:
    """``count`` is known up front for arrays (for the progress bar); ``batches`` yields (ids, images)."""

    count: int
    batches: Iterator[tuple[list[str] | np.ndarray, np.ndarray]]


def _as_images(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype != np.uint8:
        raise PipelineError(f"{path}: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2 and array.shape[1] == PIXELS:
        return array.reshape(-1, 28, 28)
    if array.ndim == 3 and array.shape[1:] == (28, 28):
        return array
    raise PipelineError(f"{path}: expected shape [N, 28, 28] or [N, 784], got {list(array.shape)}")


def _mapped_batches(path: Path, offset: int, count: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Memory-map ``count`` images at ``offset`` and hand out copies of one batch at a time.

    Pages already read are dropped from the mapping (MADV_DONTNEED), so the resident size stays around one
    batch instead of growing to the whole file as a plain memory map would.
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        images = np.frombuffer(mapped, dtype=np.uint8, count=count * PIXELS, offset=offset).reshape(count, 28, 28)
        try:
            released = 0
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                batch = images[start:stop].copy()
                done = (offset + stop * PIXELS) // mmap.PAGESIZE * mmap.PAGESIZE
                if done > released and hasattr(mapped, "madvise"):
                    mapped.madvise(mmap.MADV_DONTNEED, released, done - released)
                    released = done
                yield np.arange(start, stop), batch
        finally:
            # the mapping cannot close while a numpy view still exports its buffer: drop the view first, also
            # when the generator is closed early (Ctrl-C, SIGTERM, an error downstream)
            del images


def read_idx_header(fh, path: Path | str) -> tuple[tuple[int, ...], int]:  # noqa: ANN001
    head = fh.read(4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise PipelineError(f"{path} is not an IDX file (bad magic number)")
    if head[2] != 0x08:
        raise PipelineError(f"{path}: IDX data type 0x{head[2]:02x} is not unsigned bytes (0x08)")
    ndim = head[3]
    dims_raw = fh.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise PipelineError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    if ndim == 1:
        raise PipelineError(f"{path} is an IDX label file, not images")
    if dims[1:] not in ((28, 28), (PIXELS,)):
        raise PipelineError(f"{path}: expected IDX images [N, 28, 28], got {list(dims)}")
    return dims, 4 + 4 * ndim


def _read_gzip(gz: gzip.GzipFile, size: int, path: Path) -> bytes:
    try:
        return gz.read(size)
    except (OSError, EOFError, zlib.error) as exc:  # a bad CRC is an OSError (BadGzipFile), bad deflate data zlib's
        raise PipelineError(f"{path} is corrupted: {exc}") from None


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _raw_idx_extent(path: Path) -> tuple[int, int]:
    """The image count and the byte offset of the first image of a raw IDX file, whose size must match its header."""
    with open(path, "rb") as fh:
        dims, offset = read_idx_header(fh, path)
    expected = offset + int(np.prod(dims))
    if path.stat().st_size < expected:
        raise PipelineError(f"{path} is truncated: {path.stat().st_size} bytes, header promises {expected}")
    if path.stat().st_size > expected:
        raise PipelineError(f"{path} holds more than the {dims[0]} images its header promises")
    return dims[0], offset


def _gzip_stream(path: Path, batch_size: int, start: int = 0, stop: int | None = None) -> Source:
    """Images ``start`` to ``stop`` of a gzipped IDX file, decompressed as a stream (the ones before ``start``
    are decompressed and dropped: gzip has no random access). Read to the end, it checks the CRC and length."""
    # not a `with`: the stream below owns the handle and closes it when the batches are done
    gz = gzip.open(path, "rb")  # noqa: SIM115
    try:
        dims, _ = read_idx_header(gz, path)
    except (OSError, EOFError, zlib.error) as exc:
        gz.close()
        raise PipelineError(f"{path} is not a readable gzip file: {exc}") from None
    end = dims[0] if stop is None else min(stop, dims[0])

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with gz:
            for skipped in range(0, start, batch_size):
                n = min(batch_size, start - skipped)
                if len(_read_gzip(gz, n * PIXELS, path)) < n * PIXELS:
                    raise PipelineError(f"{path} is truncated: it ends before image {start} of {dims[0]}")
            for first in range(start, end, batch_size):
                n = min(batch_size, end - first)
                raw = _read_gzip(gz, n * PIXELS, path)
                if len(raw) < n * PIXELS:
                    raise PipelineError(
                        f"{path} is truncated: image {first + len(raw) // PIXELS} of {dims[0]} is incomplete"
                    )
                yield np.arange(first, first + n), np.frombuffer(raw, dtype=np.uint8).reshape(n, 28, 28)
            # reading on to the end is what makes gzip check its CRC and length trailer
            if end == dims[0] and _read_gzip(gz, 1, path):
                raise PipelineError(f"{path} holds more than the {dims[0]} images its header promises")

    return Source(end - start, stream())


def _open_idx(path: Path, batch_size: int) -> Source:
    if _is_gzip(path):
        return _gzip_stream(path, batch_size)
    count, offset = _raw_idx_extent(path)
    return Source(count, _mapped_batches(path, offset, count, batch_size))


def _npy_extent(path: Path) -> tuple[int, int]:
    """numpy reads and checks the header (no pickle): the image count and the byte offset of the first image."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # EOFError: an empty or cut-short file
        raise PipelineError(f"{path} is not a readable .npy array: {first_line(exc)}") from None
    images = _as_images(array, path)
    if not images.flags.c_contiguous:
        raise PipelineError(
            f"{path}: Fortran-ordered arrays are not supported; save it with np.save(np.ascontiguousarray(a))"
        )
    count, offset = len(images), array.offset
    del array, images
    return count, offset


def _open_npy(path: Path, batch_size: int) -> Source:
    """The pixels are streamed from a memory map."""
    count, offset = _npy_extent(path)
    return Source(count, _mapped_batches(path, offset, count, batch_size))


def array_count(path: Path) -> int:
    """How many images an IDX or .npy file holds, from its header (a gzipped IDX file is not read through)."""
    if path.suffix.lower() == ".npy":
        return _npy_extent(path)[0]
    if _is_gzip(path):
        return _gzip_count(path)
    return _raw_idx_extent(path)[0]


def _gzip_count(path: Path) -> int:
    with gzip.open(path, "rb") as gz:
        try:
            return read_idx_header(gz, path)[0][0]
        except (OSError, EOFError, zlib.error) as exc:
            raise PipelineError(f"{path} is not a readable gzip file: {exc}") from None


def open_range(path: Path, start: int, stop: int, batch_size: int) -> Source:
    """Images ``start`` to ``stop`` of an IDX or .npy file, each with its position in the whole file as its id:
    one shard of a sharded run (serving/shards.py)."""
    if path.suffix.lower() != ".npy" and _is_gzip(path):
        return _gzip_stream(path, batch_size, start, stop)
    count, offset = _npy_extent(path) if path.suffix.lower() == ".npy" else _raw_idx_extent(path)
    stop = min(stop, count)

    def shifted() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, images in _mapped_batches(path, offset + start * PIXELS, stop - start, batch_size):
            yield ids + start, images

    return Source(stop - start, shifted())


def load_image(path: Path) -> np.ndarray:
    """Any PNG/JPEG as the model sees images: 8-bit grayscale, 28x28 (see images.py)."""
    from .images import ImageError, decode

    try:
        return decode(path)
    except ImageError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files under ``folder`` (recursively), in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open_folder(folder: Path, batch_size: int, skip_bad: bool, files: list[Path] | None = None) -> Source:
    files = files or image_files(folder)
    if not files:
        raise PipelineError(f"{folder}: no PNG or JPEG images found")
    names = [str(path.relative_to(folder)) for path in files]
    return open_files(names, lambda name: load_image(folder / name), batch_size, skip_bad)


def open_files(names: list[str], load: Callable[[str], np.ndarray], batch_size: int, skip_bad: bool) -> Source:
    """The images ``load`` gives for ``names`` (paths in a folder, or under a prefix of object storage), each
    with its name as its id; an image that fails to load is skipped with a warning, or stops the input."""

    def stream() -> Iterator[tuple[list[str], np.ndarray]]:
        kept, pixels = [], []
        for name in names:
            try:
                pixels.append(load(name))
            except PipelineError as exc:
                if not skip_bad:
                    raise
                print(f"softmax-mlops: warning: skipped {exc}", file=sys.stderr)
                continue
            kept.append(name)
            if len(kept) == batch_size:
                yield kept, np.stack(pixels)
                kept, pixels = [], []
        if kept:
            yield kept, np.stack(pixels)

    return Source(len(names), stream())


def open_source(path: Path, batch_size: int, skip_bad: bool = False) -> Source:
    """Pick the reader from what ``path`` is: a folder, an image, a .npy, or anything else read as IDX."""
    if not path.exists():
        raise PipelineError(f"{path} does not exist")
    if path.is_dir():
        return _open_folder(path, batch_size, skip_bad)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _open_folder(path.parent, batch_size, skip_bad, files=[path])
    if path.suffix.lower() == ".npy":
        return _open_npy(path, batch_size)
    return _open_idx(path, batch_size)
