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

A rerun after a failure or an interruption redoes only the shards without a finished part, and refuses an output
folder that holds another run's parts. The drift report covers the whole batch: the shards' collectors merge
exactly (drift.Collector.merge), into the report one process would have written when no image was skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path, write_json
from ..config import DriftConfig
from ..errors import PipelineError
from . import drift
from .inference import Predictor, sidecar
from .inputs import IMAGE_SUFFIXES, Source, array_count, image_files, open_range
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


def plan(input_path: Path, shard_size: int) -> list[Shard]:
    """The input's shards of about ``shard_size`` images, in input order (a Parquet row group is never split)."""
    from . import parquet

    if not input_path.exists():
        raise PipelineError(f"{input_path} does not exist")
    if parquet.is_dataset(input_path):
        shards: list[Shard] = []
        groups: list[tuple[str, int, int]] = []
        start = rows = 0
        for file, group, first_row, count in parquet.row_groups(input_path):
            if group < 0:  # an unreadable file: a shard of its own, which fails with the file's error
                if rows:
                    shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
                shards.append(Shard(len(shards), "row_groups", first_row, 0, groups=((str(file), group, first_row),)))
                groups, start, rows = [], first_row, 0
                continue
            if rows and rows + count > shard_size:
                shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
                groups, start, rows = [], first_row, 0
            groups.append((str(file), group, first_row))
            rows += count
        if rows:
            shards.append(Shard(len(shards), "row_groups", start, rows, groups=tuple(groups)))
        return shards
    if input_path.is_dir() or input_path.suffix.lower() in IMAGE_SUFFIXES:
        folder = input_path if input_path.is_dir() else input_path.parent
        files = [str(f.relative_to(folder)) for f in image_files(folder)] if input_path.is_dir() else [input_path.name]
        if not files:
            raise PipelineError(f"{input_path}: no PNG or JPEG images found")
        chunks = [tuple(files[start : start + shard_size]) for start in range(0, len(files), shard_size)]
        return [Shard(i, "files", i * shard_size, len(chunk), files=chunk) for i, chunk in enumerate(chunks)]
    count = array_count(input_path)
    starts = range(0, count, shard_size)
    return [Shard(i, "range", start, min(shard_size, count - start)) for i, start in enumerate(starts)]


def open_shard(input_path: Path, shard: Shard, batch_size: int, skip_bad: bool) -> Source:
    """The shard's images, each with the id the whole input would give it."""
    from . import parquet
    from .inputs import _open_folder

    if shard.kind == "range":
        return open_range(input_path, shard.start, shard.start + shard.count, batch_size)
    if shard.kind == "files":
        folder = input_path if input_path.is_dir() else input_path.parent
        return _open_folder(folder, batch_size, skip_bad, files=[folder / name for name in shard.files])
    if shard.kind == "row_groups":
        return parquet.open_row_groups([(Path(f), g, first) for f, g, first in shard.groups], batch_size, skip_bad)
    raise PipelineError(f"unknown shard kind {shard.kind!r}")


@dataclass(frozen=True)
class Job:
    """What every shard of one run shares. Plain values only: it travels to Dask workers, as do the shards."""

    input: str
    output: str  # the output folder
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

    def part(self, shard: Shard) -> Path:
        return Path(self.output) / (shard.name + PART_SUFFIXES[self.fmt])

    def marker(self, shard: Shard) -> Path:
        return Path(self.output) / f"_{shard.name}.json"

    def collector_path(self, shard: Shard) -> Path:
        return Path(self.output) / f"_{shard.name}.drift.npz"


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
    output, described = Path(job.output), job.describe(shards)
    refuse_overwriting_input(Path(job.input), output)
    if output.exists() and not output.is_dir():
        raise PipelineError(f"{output} exists and is not a folder: a sharded run writes a folder of parts")
    run_file = output / RUN_FILE
    if run_file.exists():
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{run_file} is not readable: {exc}") from None
        if previous != json.loads(json.dumps(described)):
            raise PipelineError(
                f"{output} holds the parts of another run (other input, model or settings): remove it or choose "
                "another output"
            )
    elif output.exists() and any(output.iterdir()):
        raise PipelineError(f"{output} is not empty and holds no sharded run: choose another output")
    else:
        output.mkdir(parents=True, exist_ok=True)
        write_json(run_file, described)
    return [p for s in shards if (p := finished(job, s)) is not None]


def finished(job: Job, shard: Shard) -> Part | None:
    """The shard's part, if an earlier attempt finished it (its marker is written after the part and collector)."""
    marker = job.marker(shard)
    if not marker.exists():
        return None
    try:
        return Part(**json.loads(marker.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise PipelineError(f"{marker} is not a readable part marker: {exc}") from None


def predict_shard(job: Job, shard: Shard, predictor: Predictor) -> Part:
    """Predict one shard into its part, atomically: the part, then its drift collector, then its marker. A shard
    already finished is not predicted again, so a task retried after its worker died counts its rows once."""
    if (done := finished(job, shard)) is not None:
        return done
    if predictor.provenance()["model_md5"] != job.model_md5:
        raise PipelineError(f"{predictor.path} is not the model this run started with (md5 {job.model_md5})")
    source = open_shard(Path(job.input), shard, job.batch_size, job.skip_bad)
    collector = drift.Collector(job.drift_capacity) if job.drift_capacity else None
    part = job.part(shard)
    with atomic_path(part) as tmp, open_sink(job.fmt, tmp, predictor, job.all_probabilities) as write:
        rows = predict_into(source, predictor, job.top_k, write, collector, first=shard.start)
    if collector is not None:
        collector.save(job.collector_path(shard))
    result = Part(shard.index, part.name, rows, _md5(part), shard.count - rows)
    write_json(job.marker(shard), asdict(result))
    return result


def parts_of(job: Job, shards: list[Shard]) -> Iterator[Part]:
    for shard in shards:
        part = finished(job, shard)
        if part is None:
            raise PipelineError(f"{job.part(shard)} is missing: shard {shard.index} did not finish")
        yield part


def finish(job: Job, shards: list[Shard], reference_path: Path | None, drift_cfg: DriftConfig | None) -> dict:
    """Merge the shards' drift collectors into one report for the whole batch (written beside the folder, as
    predict writes it beside a file), then write the manifest, last."""
    parts = list(parts_of(job, shards))
    report = None
    if job.drift_capacity and reference_path is not None and drift_cfg is not None:
        merged = drift.Collector(job.drift_capacity)
        for shard in shards:
            merged.merge(drift.Collector.load(job.collector_path(shard)))
        report = merged.report(drift.load_reference(reference_path), drift_cfg.alpha, drift_cfg.min_images)
        write_json(drift.report_path(Path(job.output)), report)
    manifest = {
        "input": job.input,
        "model": job.model,
        "model_md5": job.model_md5,
        "images": sum(p.rows for p in parts),
        "skipped": sum(p.skipped for p in parts),
        "parts": [asdict(p) for p in parts],
        "drift": report["result"] if report else None,
    }
    write_json(Path(job.output) / MANIFEST_FILE, manifest)
    return manifest


def new_job(
    input_path: Path,
    output: Path,
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
    fmt = fmt or (output_format(output, None) if output.suffix else "parquet")
    if fmt not in PART_SUFFIXES:
        raise PipelineError(f"--format must be csv, jsonl or parquet, not {fmt!r}")
    if all_probabilities and fmt != "parquet":
        raise PipelineError(f"--all-probabilities needs a .parquet output, not {fmt}")
    reference_path = sidecar(predictor.path, drift.REFERENCE_FILE) if drift_cfg else None
    job = Job(
        input=str(input_path.resolve()),
        output=str(output.resolve()),
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
