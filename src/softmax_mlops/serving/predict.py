"""Batch inference: stream an input through onnxruntime and write one row per image, atomically.

The output appears only when every image has been predicted, so a failed or interrupted run never leaves a
partial file where a complete one is expected.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path, write_json
from ..config import DriftConfig
from ..errors import PipelineError
from . import drift
from .inference import Predictor, sidecar
from .inputs import Source, open_source

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def output_format(path: Path, requested: str | None) -> str:
    if requested:
        return requested
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise PipelineError(
            f"cannot tell the output format from {path.name!r}: use .csv, .jsonl or .parquet, or pass --format"
        ) from None


def refuse_overwriting_input(input_path: Path, output: Path) -> None:
    """An output never replaces an input: not the input file itself (by path or hard link), and nothing inside
    an input folder (the next run would read its own predictions as images, or the output could replace one)."""
    source, target = input_path.resolve(), output.resolve()
    same = target == source or (target.exists() and source.exists() and target.samefile(source))
    if same or (source.is_dir() and target.is_relative_to(source)):
        raise PipelineError(
            f"refusing to write {output}: it is {'the input' if same else 'inside the input folder'} "
            f"{input_path}; choose another --output"
        )


CSV_HEADER = ("id", "class_id", "class_name", "probability", "top_k")
CSV_SPECIAL = (",", '"', "\n")  # what Python 3.11's csv module quotes for, with lineterminator "\n"


def _field(value: str) -> str:
    """A CSV field as the csv module writes it (minimal quoting)."""
    return f'"{value.replace(chr(34), 2 * chr(34))}"' if any(c in value for c in CSV_SPECIAL) else value


def csv_text(ids, top_ids: np.ndarray, top_probs: np.ndarray, names: list[str]) -> str:  # noqa: ANN001
    """One CSV row per image: id, top class id and name, its probability, and the top-k as name:probability.

    Formatted a batch at a time with each probability formatted once, not through csv.writer row by row: this
    is most of predict's time over a million images (4.7 s against 1.2 s of inference). The text is the csv
    module's, quoting included (tests/unit/test_predict_cli.py compares the two)."""
    k = top_ids.shape[1]
    probabilities = [f"{p:.6f}" for p in top_probs.ravel().tolist()]
    classes = top_ids.ravel().tolist()
    labels = [f"{names[c]}:{p}" for c, p in zip(classes, probabilities, strict=True)]
    quoted_names = [_field(name) for name in names]
    # a top-k field holds names, digits, ':' and ';': it needs quoting only if a class name does
    top_k_field = _field if any(q != name for q, name in zip(quoted_names, names, strict=True)) else str
    lines = []
    for row, image_id in enumerate(ids.tolist() if isinstance(ids, np.ndarray) else ids):
        first = row * k
        image = _field(image_id) if isinstance(image_id, str) else str(image_id)
        lines.append(
            f"{image},{classes[first]},{quoted_names[classes[first]]},{probabilities[first]},"
            f"{top_k_field(';'.join(labels[first : first + k]))}\n"
        )
    return "".join(lines)


Sink = Callable[[list[str] | np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]
"""Writes one batch: ids, top-k class ids, their probabilities, and every class's probability."""


@contextmanager
def open_sink(fmt: str, path: Path, predictor: Predictor, all_probabilities: bool = False) -> Iterator[Sink]:
    """The writer of one output format, on ``path`` (the atomic temporary file)."""
    names = predictor.class_names
    if fmt == "parquet":
        from .parquet import PredictionsWriter

        writer = PredictionsWriter(path, names, all_probabilities, predictor.provenance())
        try:
            yield writer.write
        except BaseException:
            writer.abort()  # the file is dropped: flushing again would only hide the first error (a full disk)
            raise
        writer.close()
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if fmt == "csv":
            fh.write(",".join(CSV_HEADER) + "\n")

            def csv(ids: list[str] | np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray, _: np.ndarray) -> None:
                fh.write(csv_text(ids, top_ids, top_probs, names))

            yield csv
            return

        def jsonl(ids: list[str] | np.ndarray, top_ids: np.ndarray, top_probs: np.ndarray, _: np.ndarray) -> None:
            for i, item in zip(ids, predictor.describe(top_ids, top_probs), strict=True):
                fh.write(json.dumps({"id": i if isinstance(i, str) else int(i), **item}) + "\n")

        yield jsonl


def _open_input(path: Path, batch_size: int, skip_bad: bool) -> Source:
    """A Parquet file or dataset (parquet.py), else what inputs.py reads."""
    from . import parquet

    if path.exists() and parquet.is_dataset(path):
        return parquet.open_dataset(path, batch_size, skip_bad)
    return open_source(path, batch_size, skip_bad)


def predict_into(
    source: Source,
    predictor: Predictor,
    top_k: int,
    write: Sink,
    collector: drift.Collector | None = None,
    first: int = 0,
    progress: Callable[[int], object] | None = None,
) -> int:
    """Predict every batch of ``source`` into ``write``, and into ``collector`` as images ``first`` onwards of the
    whole batch; the number of images predicted. The loop of predict and of each shard of a sharded run."""
    written = 0
    for ids, images in source.batches:
        probabilities = predictor.run(images)[1]
        top_ids, top_probs = predictor.top_k_of(probabilities, top_k)
        if collector:
            collector.add(images, probabilities, start=first + written)
        write(ids, top_ids, top_probs, probabilities)
        written += len(images)
        if progress:
            progress(len(images))
    return written


@dataclass(frozen=True)
class Result:
    images: int
    drift: dict | None  # the drift report, written beside the output; None when the model has no reference


def run(
    input_path: Path,
    output: Path,
    predictor: Predictor,
    batch_size: int,
    top_k: int,
    fmt: str | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    drift_cfg: DriftConfig | None = None,
    all_probabilities: bool = False,
) -> Result:
    """Predict every image of ``input_path`` into ``output``; with ``drift_cfg`` and a model that carries a drift
    reference, also test the batch for drift and write the report beside the output (drift.report_path)."""
    refuse_overwriting_input(input_path, output)
    fmt = output_format(output, fmt)
    if all_probabilities and fmt != "parquet":
        raise PipelineError(f"--all-probabilities needs a .parquet output, not {fmt}")
    reference_path = sidecar(predictor.path, drift.REFERENCE_FILE) if drift_cfg else None
    if reference_path:
        refuse_overwriting_input(input_path, drift.report_path(output))
    reference = drift.load_reference(reference_path) if reference_path else None
    if reference is not None and reference["probabilities"].shape[1] != len(predictor.class_names):
        raise PipelineError(
            f"{reference_path} is not a drift reference for {predictor.path}: it has "
            f"{reference['probabilities'].shape[1]} classes, the model {len(predictor.class_names)}"
        )
    collector = drift.Collector(drift_cfg.max_images) if reference is not None and drift_cfg else None
    source = _open_input(input_path, batch_size, skip_bad)
    if collector and drift_cfg:
        drift.preload(source.count, drift_cfg.min_images)
    with (
        atomic_path(output) as tmp,
        open_sink(fmt, tmp, predictor, all_probabilities) as write,
        tqdm(total=source.count, unit="img", unit_scale=True, desc="predict", disable=not progress) as bar,
    ):
        written = predict_into(source, predictor, top_k, write, collector, progress=bar.update)
    report = None
    if collector and reference is not None and drift_cfg:
        report = collector.report(reference, drift_cfg.alpha, drift_cfg.min_images)
        write_json(drift.report_path(output), report)
    return Result(written, report)
