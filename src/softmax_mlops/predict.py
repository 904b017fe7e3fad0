"""Batch inference: stream an input through onnxruntime and write one row per image, atomically.

The output appears only when every image has been predicted, so a failed or interrupted run never leaves a
partial file where a complete one is expected.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tqdm import tqdm

from . import drift
from .atomic import atomic_path, write_json
from .config import DriftConfig
from .errors import PipelineError
from .inference import Predictor, sidecar
from .inputs import open_source

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def output_format(path: Path, requested: str | None) -> str:
    if requested:
        return requested
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise PipelineError(f"cannot tell the output format from {path.name!r}: use .csv or .jsonl, "
                            "or pass --format") from None


def refuse_overwriting_input(input_path: Path, output: Path) -> None:
    """An output never replaces an input: not the input file itself (by path or hard link), and nothing inside
    an input folder (the next run would read its own predictions as images, or the output could replace one)."""
    source, target = input_path.resolve(), output.resolve()
    same = target == source or (target.exists() and source.exists() and target.samefile(source))
    if same or (source.is_dir() and target.is_relative_to(source)):
        raise PipelineError(f"refusing to write {output}: it is {'the input' if same else 'inside the input folder'} "
                            f"{input_path}; choose another --output")


CSV_HEADER = ("id", "class_id", "class_name", "probability", "top_k")


def csv_rows(ids, top_ids: np.ndarray, top_probs: np.ndarray, names: list[str]) -> Iterator[tuple]:  # noqa: ANN001
    """One CSV row per image: id, top class id and name, its probability, and the top-k as name:probability."""
    for i, row, p in zip(ids, top_ids.tolist(), top_probs.tolist()):
        yield i, row[0], names[row[0]], f"{p[0]:.6f}", ";".join(f"{names[c]}:{q:.6f}" for c, q in zip(row, p))


@dataclass(frozen=True)
class Result:
    images: int
    drift: dict | None  # the drift report, written beside the output; None when the model has no reference


def run(input_path: Path, output: Path, predictor: Predictor, batch_size: int, top_k: int,
        fmt: str | None = None, skip_bad: bool = False, progress: bool = True,
        drift_cfg: DriftConfig | None = None) -> Result:
    """Predict every image of ``input_path`` into ``output``; with ``drift_cfg`` and a model that carries a drift
    reference, also test the batch for drift and write the report beside the output (drift.report_path)."""
    refuse_overwriting_input(input_path, output)
    fmt = output_format(output, fmt)
    reference_path = sidecar(predictor.path, drift.REFERENCE_FILE) if drift_cfg else None
    if reference_path:
        refuse_overwriting_input(input_path, drift.report_path(output))
    reference = drift.load_reference(reference_path) if reference_path else None
    collector = drift.Collector() if reference is not None else None
    source = open_source(input_path, batch_size, skip_bad)
    names = predictor.class_names
    written = 0
    with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh, \
            tqdm(total=source.count, unit="img", unit_scale=True, desc="predict", disable=not progress) as bar:
        writer = csv.writer(fh, lineterminator="\n") if fmt == "csv" else None
        if writer:
            writer.writerow(CSV_HEADER)
        for ids, images in source.batches:
            probabilities = predictor.run(images)[1]
            top_ids, top_probs = predictor.top_k_of(probabilities, top_k)
            if collector:
                collector.add(images, probabilities)
            if writer:
                writer.writerows(csv_rows(ids, top_ids, top_probs, names))
            else:
                for i, item in zip(ids, predictor.describe(top_ids, top_probs)):
                    fh.write(json.dumps({"id": i if isinstance(i, str) else int(i), **item}) + "\n")
            written += len(images)
            bar.update(len(images))
    report = None
    if collector and reference is not None and drift_cfg:
        report = collector.report(reference, drift_cfg.alpha, drift_cfg.min_images)
        write_json(drift.report_path(output), report)
    return Result(written, report)
