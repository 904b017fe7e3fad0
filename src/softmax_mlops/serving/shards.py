"""Sharded batch inference, the engine-free half: cut an input into shards, predict one shard into its own part,
and finish the run with a manifest. The Prefect flow in pipelines/sharded.py runs ``predict_shard`` as one task
per shard on a Dask cluster; nothing here imports Prefect or Dask, so the serving image keeps neither.

The output is a folder:

    part-00000.parquet        one per shard, written atomically (or .csv, .jsonl)
    _part-00000.drift.npz     the shard's drift collector (drift.Collector.save), when the model has a reference
    _part-00000.json          written last for its shard: the shard is finished only when this exists
    _run.json                 what the run is (input, model, settings, shards); a rerun must match it
    _manifest.json            written last of all: shard -> part, rows, md5. The run is complete only then.

Readers of Parquet datasets (pyarrow, pandas, Spark) skip names that start with "_", so the folder reads as
one dataset: `pd.read_parquet("out.parquet")`, or DuckDB's `read_parquet('out.parquet/*.parquet')`.

The input and the output folder may be s3:// URLs. Then nothing is staged: the client lists the input (object
names, Parquet footers, an array's header) to plan the shards, and each worker reads its own shard from the store
(serving/stored.py) and writes its part, collector and marker there, each in one PUT, so that a worker on another
machine needs only the store.

A rerun after a failure or an interruption redoes only the shards without a finished part, and refuses an output
folder that holds another run's parts. The drift report covers the whole batch: the shards' collectors merge
exactly (drift.Collector.merge), into the report one process would have written when no image was skipped.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import object_store
from ..atomic import atomic_path, write_json
from ..config import DriftConfig
from ..errors import PipelineError
from . import drift, stored
from .inference import Predictor, sidecar
from .inputs import IMAGE_SUFFIXES, Source, array_count, image_files, load_image, open_files, open_range
from .predict import open_sink, output_format, predict_into, refuse_overwriting_input

RUN_FILE, MANIFEST_FILE = "_run.json", "_manifest.json"
PART_SUFFIXES = {"csv": ".csv", "jsonl": ".jsonl", "parquet": ".parquet"}


@dataclass(frozen=True)
class Shard:
    """A slice of the input, by its first image's position in the whole input and its image count:
    a range of an IDX or .npy file, files of a folder (relative to it), or row groups of a Parquet dataset
    (file, row group, first row)."""

    index: int
    kind: str  # "range", "files" or "row_groups"
    start: int
    count: int
    files: tuple[str, ...] = ()
    groups: tuple[tuple[str, int, int], ...] = ()

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


def _layout(input_ref: str) -> tuple[str, list]:
    """What the input is, read from its listing and headers only: ("row_groups", [(file, group, first row,
    rows)]), ("files", [names relative to the folder]) or ("range", [image count])."""
    from . import parquet

    if object_store.is_url(input_ref):
        kind = object_store.kind(input_ref)
        if kind is None:
            raise PipelineError(f"{input_ref} does not exist")
        lower = input_ref.lower().rstrip("/")
        if kind == "folder":
            names = stored.image_names(input_ref)
            if names and object_store.files_under(input_ref, (".parquet",)):
                raise PipelineError(
                    f"{input_ref} holds both Parquet files and PNG/JPEG images: give one kind per input"
                )
            if names:
                return "files", names
            if not object_store.files_under(input_ref, (".parquet",)):
                raise PipelineError(f"{input_ref}: no PNG or JPEG images found")
        if kind == "folder" or lower.endswith(".parquet"):
            return "row_groups", [(str(f), g, first, rows) for f, g, first, rows in parquet.row_groups(input_ref)]
        if lower.endswith(IMAGE_SUFFIXES):
            return "files", [input_ref.rsplit("/", 1)[1]]
        return "range", [stored.extent(input_ref)[0]]
    path = Path(input_ref)
    if not path.exists():
        raise PipelineError(f"{path} does not exist")
    if parquet.is_dataset(path):
        return "row_groups", [(str(f), g, first, rows) for f, g, first, rows in parquet.row_groups(path)]
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        files = [str(f.relative_to(path)) for f in image_files(path)] if path.is_dir() else [path.name]
        if not files:
            raise PipelineError(f"{path}: no PNG or JPEG images found")
        return "files", files
    return "range", [array_count(path)]


def plan(input_ref: str | Path, shard_size: int) -> list[Shard]:
    """The input's shards of about ``shard_size`` images, in input order (a Parquet row group is never split)."""
    kind, items = _layout(str(input_ref))
    if kind == "row_groups":
        shards: list[Shard] = []
        groups: list[tuple[str, int, int]] = []
        start = rows = 0
        for file, group, first_row, count in items:
            if group < 0:  # an unreadable file: a shard of its own, which fails with the file's error
                if rows:
                    shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
                shards.append(Shard(len(shards), "row_groups", first_row, 0, groups=((file, group, first_row),)))
                groups, start, rows = [], first_row, 0
                continue
            if rows and rows + count > shard_size:
                shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
                groups, start, rows = [], first_row, 0
            groups.append((file, group, first_row))
            rows += count
        if rows:
            shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
        return shards
    if kind == "files":
        chunks = [tuple(items[start : start + shard_size]) for start in range(0, len(items), shard_size)]
        return [Shard(i, "files", i * shard_size, len(chunk), files=chunk) for i, chunk in enumerate(chunks)]
    (count,) = items
    starts = range(0, count, shard_size)
    return [Shard(i, "range", start, min(shard_size, count - start)) for i, start in enumerate(starts)]


def _folder_of(input_ref: str) -> str:
    """The folder (or prefix) a "files" shard's names are relative to: the input, or the one image's folder."""
    if input_ref.lower().rstrip("/").endswith(IMAGE_SUFFIXES):
        return input_ref.rsplit("/", 1)[0] if object_store.is_url(input_ref) else str(Path(input_ref).parent)
    return input_ref


def open_shard(input_ref: str | Path, shard: Shard, batch_size: int, skip_bad: bool) -> Source:
    """The shard's images, each with the id the whole input would give it."""
    from . import parquet

    input_ref = str(input_ref)
    remote = object_store.is_url(input_ref)
    if shard.kind == "range":
        if remote:
            return stored.open_range(input_ref, shard.start, shard.start + shard.count, batch_size)
        return open_range(Path(input_ref), shard.start, shard.start + shard.count, batch_size)
    if shard.kind == "files":
        folder, args = _folder_of(input_ref), (batch_size, skip_bad)
        if remote:
            return open_files(list(shard.files), stored.loader(folder), *args)
        return open_files(list(shard.files), lambda name: load_image(Path(folder) / name), *args)
    if shard.kind == "row_groups":
        groups = [(f if remote else Path(f), g, first) for f, g, first in shard.groups]
        return parquet.open_row_groups(groups, batch_size, skip_bad)
    raise PipelineError(f"unknown shard kind {shard.kind!r}")


def _write_json(ref: str, data: dict) -> None:
    """write_json, on a path or a URL (one PUT: the object appears whole or not at all)."""
    if object_store.is_url(ref):
        object_store.write_bytes(ref, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
    else:
        write_json(Path(ref), data)


class Folder:
    """The run's output folder: a local folder, or a prefix on object storage that every worker writes to.
    Each file appears whole or not at all: renamed into place locally, or put in one PUT."""

    def __init__(self, ref: str) -> None:
        self.ref, self.remote = ref, object_store.is_url(ref)

    def __getitem__(self, name: str) -> str:
        return object_store.join(self.ref, name) if self.remote else str(Path(self.ref) / name)

    def kind(self) -> str | None:
        """ "file", "folder" (with something in it, on object storage) or None."""
        if self.remote:
            return object_store.kind(self.ref)
        path = Path(self.ref)
        return None if not path.exists() else "folder" if path.is_dir() else "file"

    def is_empty(self) -> bool:
        if self.remote:
            return self.kind() is None
        return not any(Path(self.ref).iterdir())

    def read_text(self, name: str) -> str | None:
        """The file's text, or None when there is no such file. Bytes that are not UTF-8 are replaced, so that a
        damaged file fails as JSON, in one line, where it is parsed."""
        if self.remote:
            data = object_store.read_if_exists(self[name])
        else:
            path = Path(self[name])
            data = path.read_bytes() if path.exists() else None
        return None if data is None else data.decode("utf-8", errors="replace")

    def write_json(self, name: str, data: dict) -> None:
        _write_json(self[name], data)

    @contextmanager
    def writing(self, name: str) -> Iterator[Path]:
        """A local path to write the file ``name`` at; it takes its place in the folder when the block ends
        without an error, and nothing does otherwise."""
        if not self.remote:
            with atomic_path(Path(self[name])) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="softmax-mlops-part-") as tmp_dir:
            tmp = Path(tmp_dir) / name
            yield tmp
            object_store.upload(tmp, self[name])

    @contextmanager
    def reading(self, name: str) -> Iterator[Path]:
        """A local path holding the file ``name``: itself, or a temporary copy; errors name the file's URL."""
        if not self.remote:
            yield Path(self[name])
            return
        with tempfile.TemporaryDirectory(prefix="softmax-mlops-part-") as tmp_dir:
            tmp = Path(tmp_dir) / name
            tmp.write_bytes(object_store.read_bytes(self[name]))
            try:
                yield tmp
            except PipelineError as exc:
                raise PipelineError(str(exc).replace(str(tmp), self[name])) from None


@dataclass(frozen=True)
class Job:
    """What every shard of one run shares. Plain values only: it travels to Dask workers, as do the shards."""

    input: str  # a resolved local path, or a URL
    output: str  # the output folder: a resolved local path, or a URL
    model: str  # as each worker resolves it: a path, or models:/name/<version> (an alias pinned by the caller)
    model_md5: str
    fmt: str = "parquet"
    batch_size: int = 4096
    top_k: int = 3
    skip_bad: bool = False
    all_probabilities: bool = False
    drift_capacity: int | None = None  # None: no drift collector (the model has no reference, or drift is off)

    def describe(self, shards: list[Shard]) -> dict:
        """_run.json: the run's identity. A rerun into the same folder must describe the same run."""
        return {"job": asdict(self), "shards": [asdict(s) for s in shards]}

    @property
    def folder(self) -> Folder:
        return Folder(self.output)

    def part(self, shard: Shard) -> str:
        return shard.name + PART_SUFFIXES[self.fmt]

    def marker(self, shard: Shard) -> str:
        return f"_{shard.name}.json"

    def collector(self, shard: Shard) -> str:
        return f"_{shard.name}.drift.npz"

    def report(self) -> str:
        """Where the whole batch's drift report goes: beside the folder, as predict writes it beside a file."""
        name = drift.report_path(Path(self.output.rstrip("/"))).name
        return object_store.sibling(self.output.rstrip("/"), name)


@dataclass(frozen=True)
class Part:
    shard: int
    part: str  # the file name, in the output folder
    rows: int
    md5: str
    skipped: int = field(default=0)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def start(job: Job, shards: list[Shard]) -> list[Part]:
    """Make the output folder for ``job`` or take up a previous attempt at the same run: the parts already
    finished. Refuses a folder of another run, an output inside the input, and a file where the folder goes."""
    folder, described = job.folder, job.describe(shards)
    if object_store.is_url(job.input) or folder.remote:
        object_store.refuse_overwriting_input(job.input, job.output)
    else:
        refuse_overwriting_input(Path(job.input), Path(job.output))
    kind = folder.kind()
    if kind == "file":
        raise PipelineError(f"{job.output} exists and is not a folder: a sharded run writes a folder of parts")
    previous = folder.read_text(RUN_FILE) if kind else None
    if previous is not None:
        try:
            loaded = json.loads(previous)
        except ValueError as exc:
            raise PipelineError(f"{folder[RUN_FILE]} is not readable: {exc}") from None
        if loaded != json.loads(json.dumps(described)):
            raise PipelineError(
                f"{job.output} holds the parts of another run (other input, model or settings): remove it or choose "
                "another output"
            )
    elif kind and not folder.is_empty():
        raise PipelineError(f"{job.output} is not empty and holds no sharded run: choose another output")
    else:
        if not folder.remote:
            Path(job.output).mkdir(parents=True, exist_ok=True)
        folder.write_json(RUN_FILE, described)
    return [p for s in shards if (p := finished(job, s)) is not None]


def finished(job: Job, shard: Shard) -> Part | None:
    """The shard's part, if an earlier attempt finished it (its marker is written after the part and collector)."""
    text = job.folder.read_text(job.marker(shard))
    if text is None:
        return None
    try:
        return Part(**json.loads(text))
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{job.folder[job.marker(shard)]} is not a readable part marker: {exc}") from None


def predict_shard(job: Job, shard: Shard, predictor: Predictor) -> Part:
    """Predict one shard into its part, atomically: the part, then its drift collector, then its marker. A shard
    already finished is not predicted again, so a task retried after its worker died counts its rows once."""
    if (done := finished(job, shard)) is not None:
        return done
    if predictor.provenance()["model_md5"] != job.model_md5:
        raise PipelineError(f"{predictor.path} is not the model this run started with (md5 {job.model_md5})")
    source = open_shard(job.input, shard, job.batch_size, job.skip_bad)
    collector = drift.Collector(job.drift_capacity) if job.drift_capacity else None
    folder, name = job.folder, job.part(shard)
    with folder.writing(name) as tmp:
        with open_sink(job.fmt, tmp, predictor, job.all_probabilities) as write:
            rows = predict_into(source, predictor, job.top_k, write, collector, first=shard.start)
        md5 = _md5(tmp)
    if collector is not None:
        with folder.writing(job.collector(shard)) as tmp:
            collector.save(tmp)
    result = Part(shard.index, name, rows, md5, shard.count - rows)
    folder.write_json(job.marker(shard), asdict(result))
    return result


def parts_of(job: Job, shards: list[Shard]) -> Iterator[Part]:
    for shard in shards:
        part = finished(job, shard)
        if part is None:
            raise PipelineError(f"{job.folder[job.part(shard)]} is missing: shard {shard.index} did not finish")
        yield part


def finish(job: Job, shards: list[Shard], reference_path: Path | None, drift_cfg: DriftConfig | None) -> dict:
    """Merge the shards' drift collectors into one report for the whole batch (written beside the folder, as
    predict writes it beside a file), then write the manifest, last."""
    parts = list(parts_of(job, shards))
    report = None
    if job.drift_capacity and reference_path is not None and drift_cfg is not None:
        merged = drift.Collector(job.drift_capacity)
        for shard in shards:
            with job.folder.reading(job.collector(shard)) as path:
                merged.merge(drift.Collector.load(path))
        report = merged.report(drift.load_reference(reference_path), drift_cfg.alpha, drift_cfg.min_images)
        _write_json(job.report(), report)
    manifest = {
        "input": job.input,
        "model": job.model,
        "model_md5": job.model_md5,
        "images": sum(p.rows for p in parts),
        "skipped": sum(p.skipped for p in parts),
        "parts": [asdict(p) for p in parts],
        "drift": report["result"] if report else None,
    }
    job.folder.write_json(MANIFEST_FILE, manifest)
    return manifest


def _local_or_url(ref: str) -> str:
    """How a run names its input and output, the same however they were spelled (s3://b/x/ or s3://b/x)."""
    return ref.rstrip("/") if object_store.is_url(ref) else str(Path(ref).resolve())


def new_job(
    input_ref: str | Path,
    output_ref: str | Path,
    predictor: Predictor,
    model: str,
    batch_size: int,
    top_k: int,
    fmt: str | None = None,
    skip_bad: bool = False,
    all_probabilities: bool = False,
    drift_cfg: DriftConfig | None = None,
) -> tuple[Job, Path | None]:
    """The job for a sharded run of ``predictor`` (the caller's copy, which pins the model), and its drift
    reference when it has one. The format is named, or taken from the folder's suffix (out.parquet/), else Parquet."""
    input_ref, output_ref = str(input_ref), str(output_ref).rstrip("/")
    output = Path(output_ref)
    fmt = fmt or (output_format(output, None) if output.suffix else "parquet")
    if fmt not in PART_SUFFIXES:
        raise PipelineError(f"--format must be csv, jsonl or parquet, not {fmt!r}")
    if all_probabilities and fmt != "parquet":
        raise PipelineError(f"--all-probabilities needs a .parquet output, not {fmt}")
    reference_path = sidecar(predictor.path, drift.REFERENCE_FILE) if drift_cfg else None
    job = Job(
        input=_local_or_url(input_ref),
        output=_local_or_url(output_ref),
        model=model,
        model_md5=predictor.provenance()["model_md5"],
        fmt=fmt,
        batch_size=batch_size,
        top_k=top_k,
        skip_bad=skip_bad,
        all_probabilities=all_probabilities,
        drift_capacity=drift_cfg.max_images if reference_path is not None and drift_cfg else None,
    )
    return job, reference_path
