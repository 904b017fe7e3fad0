"""Parquet for batch inference, through pyarrow: images in, and predictions out, with real types and the model
named in the file's key-value metadata, so that the next tool (pandas, DuckDB, Spark, a warehouse) reads them
without parsing text.

The columns are CSV's, typed:

| column | type | |
|---|---|---|
| `id` | int64 (arrays, Parquet without ids) or string (image files, string ids) | |
| `class_id` | int16 | the most probable class |
| `class_name` | dictionary<int16, string> | its name (a pandas category) |
| `probability` | float32 | its calibrated probability |
| `top_k` | list<struct<class_id: int16, class_name: string, probability: float32>> | most probable first |
| `probabilities` | fixed_size_list<float32>[classes] | every class, with `--all-probabilities` |

Rows are buffered into row groups of ROW_GROUP_ROWS, not one group per onnxruntime batch, so that readers get
few large groups and their statistics.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PipelineError, first_line
from .inputs import PIXELS, Source

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

ROW_GROUP_ROWS = 131_072
METADATA_PREFIX = "softmax_mlops."


def pyarrow_module():  # noqa: ANN201 - the pyarrow module
    """pyarrow, or one line saying how to get it: the serving image leaves it out (`pip install pyarrow`)."""
    try:
        import pyarrow
        import pyarrow.parquet  # loads the submodule, for callers
    except ImportError:
        raise PipelineError("Parquet needs pyarrow, which is not installed here: pip install pyarrow") from None
    return pyarrow


def schema(id_type: pa.DataType, classes: int, all_probabilities: bool, metadata: Mapping[str, str]) -> pa.Schema:
    pa = pyarrow_module()
    entry = pa.struct([("class_id", pa.int16()), ("class_name", pa.string()), ("probability", pa.float32())])
    fields = [
        pa.field("id", id_type, nullable=False),
        pa.field("class_id", pa.int16(), nullable=False),
        pa.field("class_name", pa.dictionary(pa.int16(), pa.string()), nullable=False),
        pa.field("probability", pa.float32(), nullable=False),
        pa.field("top_k", pa.list_(entry), nullable=False),
    ]
    if all_probabilities:
        fields.append(pa.field("probabilities", pa.list_(pa.float32(), classes), nullable=False))
    return pa.schema(fields, metadata={f"{METADATA_PREFIX}{key}": value for key, value in metadata.items()})


def file_metadata(path: Path) -> dict[str, str]:
    """What predict wrote into a Parquet file's key-value metadata, without the prefix."""
    pq_ = pyarrow_module().parquet
    stored = pq_.read_schema(path).metadata or {}
    return {
        key.decode()[len(METADATA_PREFIX) :]: value.decode()
        for key, value in stored.items()
        if key.decode().startswith(METADATA_PREFIX)
    }


class PredictionsWriter:
    """Writes prediction batches to one Parquet file. The id column's type is the first batch's (ints or
    strings); a file with no rows gets int64 ids."""

    def __init__(
        self, path: Path, class_names: Sequence[str], all_probabilities: bool, metadata: Mapping[str, str]
    ) -> None:
        self.pa = pyarrow_module()
        self.path = path
        self.names = self.pa.array(list(class_names), self.pa.string())
        self.all_probabilities = all_probabilities
        self.metadata = {**metadata, "class_names": json.dumps(list(class_names))}
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = 0

    def _schema(self, id_type: pa.DataType) -> pa.Schema:
        return schema(id_type, len(self.names), self.all_probabilities, self.metadata)

    def write(
        self,
        ids: Sequence[str] | np.ndarray,
        top_ids: np.ndarray,
        top_probs: np.ndarray,
        probabilities: np.ndarray,
    ) -> None:
        pa = self.pa
        n, k = top_ids.shape
        id_array = pa.array(ids, pa.int64()) if isinstance(ids, np.ndarray) else pa.array(list(ids), pa.string())
        classes = top_ids.astype(np.int16)
        flat = classes.ravel()
        entries = pa.StructArray.from_arrays(
            [pa.array(flat), self.names.take(pa.array(flat)), pa.array(top_probs.astype(np.float32).ravel())],
            names=["class_id", "class_name", "probability"],
        )
        columns = [
            id_array,
            pa.array(classes[:, 0]),
            pa.DictionaryArray.from_arrays(pa.array(classes[:, 0]), self.names),
            pa.array(top_probs[:, 0].astype(np.float32)),
            pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), entries),
        ]
        if self.all_probabilities:
            columns.append(
                pa.FixedSizeListArray.from_arrays(
                    pa.array(probabilities.astype(np.float32).ravel()), probabilities.shape[1]
                )
            )
        if self.writer is None:
            self.writer = pq_writer(self.path, self._schema(id_array.type))
        batch = pa.RecordBatch.from_arrays(columns, schema=self.writer.schema)
        self.pending.append(batch)
        self.pending_rows += n
        if self.pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending and self.writer is not None:
            self.writer.write_table(self.pa.Table.from_batches(self.pending), row_group_size=ROW_GROUP_ROWS)
        self.pending, self.pending_rows = [], 0

    def abort(self) -> None:
        """Close the file without writing what is pending, after an error: the caller throws the file away."""
        if self.writer is not None:
            with contextlib.suppress(Exception):  # a writer whose last write failed may refuse to close cleanly
                self.writer.close()

    def close(self) -> None:
        if self.writer is None:
            self.writer = pq_writer(self.path, self._schema(self.pa.int64()))
        self._flush()
        self.writer.close()


def pq_writer(path: Path, file_schema: pa.Schema) -> pq.ParquetWriter:
    return pyarrow_module().parquet.ParquetWriter(path, file_schema, compression="zstd")


# --- images in ----------------------------------------------------------------------------------------------------

IMAGE_COLUMN, ID_COLUMN = "image", "id"


def is_dataset(path: Path) -> bool:
    """A .parquet file, or a folder of them (searched recursively) holding no PNG or JPEG images."""
    from .inputs import image_files

    if path.is_file():
        return path.suffix.lower() == ".parquet"
    if not path.is_dir() or not any(path.rglob("*.parquet")):
        return False
    if image_files(path):
        raise PipelineError(f"{path} holds both Parquet files and PNG/JPEG images: give one kind per input")
    return True


def _open_file(path: Path | str):  # noqa: ANN202 - a pyarrow.parquet.ParquetFile
    """The file's footer and schema, read before any image is predicted: a corrupt file or a wrong column type
    fails the input at once, with one line naming the file. An s3:// object is read through an fsspec file, in
    ranged reads: the footer first, then only the row groups asked for."""
    from .. import object_store

    pa = pyarrow_module()
    source = object_store.open_file(str(path)) if object_store.is_url(str(path)) else path
    try:
        file = pa.parquet.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{path} is not a readable Parquet file: {first_line(exc)}") from None
    fields = {field.name: field.type for field in file.schema_arrow}
    image_type = fields.get(IMAGE_COLUMN)
    if image_type is None:
        raise PipelineError(f"{path} has no {IMAGE_COLUMN!r} column (its columns: {', '.join(fields) or 'none'})")
    binary = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if not (binary or pa.types.is_fixed_size_binary(image_type)):
        raise PipelineError(
            f"{path}: column {IMAGE_COLUMN!r} is {image_type}, expected binary: 784 bytes of a uint8 28x28 image, "
            "or an encoded PNG or JPEG"
        )
    id_type = fields.get(ID_COLUMN)
    if id_type is not None and not (pa.types.is_integer(id_type) or pa.types.is_string(id_type)):
        raise PipelineError(f"{path}: column {ID_COLUMN!r} is {id_type}, expected integers or strings")
    return file


def _raw_pixels(column) -> np.ndarray | None:  # noqa: ANN001 - a pyarrow binary array
    """The batch's images straight from Arrow's buffers, when every value is 784 bytes and none is null; else
    None (some row needs decoding, or is bad)."""
    pa = pyarrow_module()
    n = len(column)
    if column.null_count or n == 0:
        return None
    if pa.types.is_fixed_size_binary(column.type):
        if column.type.byte_width != PIXELS:
            return None
        start = column.offset * PIXELS
        return np.frombuffer(column.buffers()[1], np.uint8)[start : start + n * PIXELS].reshape(n, 28, 28)
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], width)[column.offset : column.offset + n + 1]
    if not (np.diff(offsets) == PIXELS).all():
        return None
    return np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(n, 28, 28)


def _images_of(column, path: Path | str, first_row: int, skip_bad: bool) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """uint8 [n, 28, 28] of one batch's image column, and the positions of the rows kept. Raw 784-byte values
    are read straight from Arrow's buffer; any other value is decoded as PNG or JPEG (images.decode)."""
    from .images import ImageError, decode

    if (raw := _raw_pixels(column)) is not None:
        return raw, np.arange(len(raw))
    values = column.to_numpy(zero_copy_only=False)
    images, kept = [], []
    for row, value in enumerate(values):
        try:
            if value is None:
                raise ImageError("no image (null)")
            images.append(np.frombuffer(value, np.uint8).reshape(28, 28) if len(value) == PIXELS else decode(value))
            kept.append(row)
        except ImageError as exc:
            message = f"{path}: row {first_row + row}: {exc}"
            if not skip_bad:
                raise PipelineError(message) from None
            print(f"softmax-mlops: warning: skipped {message}", file=sys.stderr)
    stacked = np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)
    return stacked, np.array(kept, dtype=np.int64)


def dataset_files(path: Path) -> list[Path]:
    """The dataset's files in the order their rows are numbered: file-name order."""
    return sorted(path.rglob("*.parquet")) if path.is_dir() else [path]


def stored_files(url: str) -> list[str]:
    """dataset_files of an s3:// object or prefix."""
    from .. import object_store

    if object_store.kind(url) == "file":
        return [url]
    return [object_store.join(url, name) for name in object_store.files_under(url, (".parquet",))]


def row_groups(path: Path | str) -> list[tuple[Path | str, int, int, int]]:
    """Every row group of the dataset as (file, row group, its first row's position in the dataset, rows): what a
    sharded run cuts its shards from (serving/shards.py). A file whose footer or schema is bad is one entry of
    row group -1 and no rows: the shard that holds it fails with the file's own error, the others run."""
    from .. import object_store

    groups: list[tuple[Path | str, int, int, int]] = []
    position = 0
    files = stored_files(str(path)) if object_store.is_url(str(path)) else dataset_files(Path(path))
    for file in files:
        try:
            metadata = _open_file(file).metadata
        except PipelineError:
            groups.append((file, -1, position, 0))
            continue
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            groups.append((file, group, position, rows))
            position += rows
    return groups


def _stream(parts: Sequence[tuple[Path | str, Any, list[int] | None, int]], batch_size: int, skip_bad: bool):  # noqa: ANN202
    """(ids, images) batches of these (file, opened file, row groups or None for all, first row) parts."""
    for file, parquet, groups, position in parts:
        names = parquet.schema_arrow.names
        columns = [IMAGE_COLUMN] + ([ID_COLUMN] if ID_COLUMN in names else [])
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns, row_groups=groups):
            images, kept = _images_of(batch.column(IMAGE_COLUMN), file, position, skip_bad)
            if ID_COLUMN in columns:
                ids = batch.column(ID_COLUMN).take(kept).to_numpy(zero_copy_only=False)
                yield (ids.tolist() if ids.dtype == object else ids.astype(np.int64)), images
            else:
                yield position + kept, images
            position += batch.num_rows


def open_dataset(path: Path, batch_size: int, skip_bad: bool = False) -> Source:
    """Images from a Parquet file or a folder of them, in file-name order: the ``image`` column, and the ``id``
    column when there is one (else each row's position across the whole dataset). Bad rows follow
    ``skip_bad`` as bad files in a folder do."""
    parts, position = [], 0
    for file in dataset_files(path):
        parquet = _open_file(file)
        parts.append((file, parquet, None, position))
        position += parquet.metadata.num_rows
    return Source(position, _stream(parts, batch_size, skip_bad))


def open_row_groups(groups: Sequence[tuple[Path | str, int, int]], batch_size: int, skip_bad: bool = False) -> Source:
    """Images from these (file, row group, first row) groups of a dataset, with the dataset's ids: one shard."""
    parts, count = [], 0
    for file, group, first_row in groups:
        parquet = _open_file(file)
        parts.append((file, parquet, [group], first_row))
        count += parquet.metadata.row_group(group).num_rows
    return Source(count, _stream(parts, batch_size, skip_bad))
