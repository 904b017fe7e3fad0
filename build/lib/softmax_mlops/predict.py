"""Batch inference: stream an input through onnxruntime and write one row per image, atomically.

The output appears only when every image has been predicted, so a failed or interrupted run never leaves a
partial file where a complete one is expected.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tqdm import tqdm

from .atomic import atomic_path
from .errors import PipelineError
from .inference import Predictor
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


def run(input_path: Path, output: Path, predictor: Predictor, batch_size: int, top_k: int,
        fmt: str | None = None, skip_bad: bool = False, progress: bool = True) -> int:
    fmt = output_format(output, fmt)
    source = open_source(input_path, batch_size, skip_bad)
    names = predictor.class_names
    written = 0
    with atomic_path(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh, \
            tqdm(total=source.count, unit="img", unit_scale=True, desc="predict", disable=not progress) as bar:
        writer = csv.writer(fh, lineterminator="\n") if fmt == "csv" else None
        if writer:
            writer.writerow(["id", "class_id", "class_name", "probability", "top_k"])
        for ids, images in source.batches:
            top_ids, top_probs = predictor.top_k(images, top_k)
            if writer:
                writer.writerows(
                    (i, row[0], names[row[0]], f"{p[0]:.6f}", ";".join(f"{names[c]}:{q:.6f}" for c, q in zip(row, p)))
                    for i, row, p in zip(ids, top_ids.tolist(), top_probs.tolist()))
            else:
                for i, item in zip(ids, predictor.describe(top_ids, top_probs)):
                    fh.write(json.dumps({"id": i if isinstance(i, str) else int(i), **item}) + "\n")
            written += len(images)
            bar.update(len(images))
    return written
