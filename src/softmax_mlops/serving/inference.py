"""onnxruntime inference shared by the batch CLI and the HTTP service. No torch: the serving image has none.

A model is named by a path (a .onnx file or its folder) or by an MLflow URI (models:/name@alias), which is
downloaded once, into a temporary folder removed when the process exits. model.json, written beside the .onnx
by the export stage, supplies class names and metadata.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..classes import CLASS_NAMES
from ..errors import PipelineError, first_line

INPUT_NAME = "image"  # uint8 [N, 28, 28]
OUTPUT_NAMES = ("logits", "probabilities")  # float32 [N, 10] each, both after the temperature


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2/v1 CPU quota if one is set.
    os.cpu_count() reports the host's cores, which oversubscribes a container limited to fewer. ``cgroup`` is
    where the cgroup filesystem is mounted (a test gives a folder of its own quota files)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota_files = (
        (cgroup / "cpu.max", None),
        (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us"),
    )
    for quota_file, period_file in quota_files:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota != "max" and int(quota) > 0:  # v1 writes -1 for no quota
                cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError):
            continue
    return max(1, cpus)


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def model_source(source: str, base: Path) -> str:
    """A model named in params.yaml or a flow parameter: relative paths are taken from the project root."""
    return source if is_mlflow_uri(source) or Path(source).is_absolute() else str(base / source)


def resolve_model(source: str, tracking_uri: str | None = None) -> Path:
    """A local .onnx path for ``source``: a file, a folder holding model.onnx, or models:/name@alias."""
    if is_mlflow_uri(source):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        # MLflow's own default is a new temporary folder per call that nobody removes: one per export's champion
        # check and per predict, in the worker's /tmp. The Predictor reads the files beside model.onnx (its card,
        # its md5) for as long as it lives, so the folder goes when the process exits (SIGTERM included: the
        # commands exit through their handler).
        download = tempfile.mkdtemp(prefix="softmax-mlops-model-")
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=download))
        except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "cannot have that model"
            shutil.rmtree(download, ignore_errors=True)
            raise PipelineError(f"cannot load {source} from {tracking_uri or 'MLflow'}: {first_line(exc)}") from None
        atexit.register(shutil.rmtree, download, ignore_errors=True)
        path = folder / "model.onnx"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "model.onnx"
    if not path.is_file():
        raise PipelineError(f"no ONNX model at {source}: run `dvc repro` to export one, or pass another --model")
    return path


def registered_version(source: str, tracking_uri: str | None) -> str | None:
    """The version number behind models:/name/version or models:/name@alias; None for anything else. Asked
    once the model has loaded, so the registry has just answered."""
    if not source.startswith("models:/"):
        return None
    name, _, version = source.removeprefix("models:/").partition("/")
    if version:
        return version
    name, _, alias = name.partition("@")
    if not alias:
        return None
    from mlflow import MlflowClient

    try:
        return str(MlflowClient(tracking_uri).get_model_version_by_alias(name, alias).version)
    except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "cannot tell"
        raise PipelineError(f"cannot resolve {source} at {tracking_uri or 'MLflow'}: {first_line(exc)}") from None


def wait_for_model(source: str, tracking_uri: str | None, wait_s: float, say: Callable[[str], None] = print) -> Path:
    """resolve_model, retried with a capped exponential back-off for up to ``wait_s`` seconds.

    A service started beside a fresh registry (the compose stack) has nothing to serve until the first
    training run registers a champion. Waiting here, with one line per attempt, beats a container that
    restarts every second; the wait is bounded, so a wrong URI still ends in one clear error.
    """
    deadline = time.monotonic() + wait_s
    pauses = retry_pauses()
    while True:
        try:
            return resolve_model(source, tracking_uri)
        except PipelineError as exc:
            remaining = deadline - time.monotonic()
            if not is_mlflow_uri(source) or remaining <= 0:
                raise
            pause = min(next(pauses), remaining)
            say(f"softmax-mlops: {exc}; retrying in {pause:.0f} s (for up to {remaining:.0f} s more)")
            time.sleep(pause)


def retry_pauses(first: float = 2.0, cap: float = 60.0) -> Iterator[float]:
    """2, 4, 8, ... seconds, then a minute each time: quick while a registry is starting, and no more than one
    line a minute in the log of a service left waiting. A pure schedule, so that a test can read it whole."""
    pause = first
    while True:
        yield pause
        pause = min(pause * 2, cap)


def sidecar(onnx_path: Path, name: str) -> Path | None:
    """A file that travels with the model: beside model.onnx (DVC's models/{impl}/), or among the extra files
    of a model downloaded from the MLflow registry."""
    for candidate in (onnx_path.with_name(name), onnx_path.parent / "extra_files" / name):
        if candidate.is_file():
            return candidate
    return None


def _model_card(onnx_path: Path) -> dict:
    if not (card := sidecar(onnx_path, "model.json")):
        return {"class_names": list(CLASS_NAMES)}
    try:
        metadata = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        raise PipelineError(f"{card} is not a model card: {reason}") from None
    names = metadata.get("class_names", CLASS_NAMES) if isinstance(metadata, dict) else None
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise PipelineError(f"{card} is not a model card: expected a JSON object whose class_names are strings")
    return metadata


def _check_signature(session, path: str | Path, classes: int) -> None:  # noqa: ANN001 - ort.InferenceSession
    """The export's contract, checked when the model loads: uint8 images [N, 28, 28] named `image` in, float32
    logits and probabilities [N, classes] out, N dynamic. Any other ONNX file would load, and then fail on every
    batch and every request."""

    def fits(shape: list, sizes: tuple[int, ...]) -> bool:  # a dynamic batch axis, then these sizes
        return (
            len(shape) == 1 + len(sizes)
            and not isinstance(shape[0], int)
            and all(not isinstance(dim, int) or dim == size for dim, size in zip(shape[1:], sizes, strict=True))
        )

    def described(args: list) -> str:
        return ", ".join(f"{a.name} {a.type} {a.shape}" for a in args) or "none"

    inputs, outputs = session.get_inputs(), session.get_outputs()
    image = inputs[0] if len(inputs) == 1 else None
    if image is None or image.name != INPUT_NAME or image.type != "tensor(uint8)" or not fits(image.shape, (28, 28)):
        raise PipelineError(
            f"{path} is not a model of this project: expected one input {INPUT_NAME} tensor(uint8) "
            f"['N', 28, 28], got {described(inputs)}"
        )
    by_name = {output.name: output for output in outputs}
    for name in OUTPUT_NAMES:
        output = by_name.get(name)
        if output is None or output.type != "tensor(float)" or not fits(output.shape, (classes,)):
            raise PipelineError(
                f"{path} is not a model of this project: expected outputs {' and '.join(OUTPUT_NAMES)} "
                f"tensor(float) ['N', {classes}], got {described(outputs)}"
            )


class Predictor:
    """An onnxruntime session over the exported model: uint8 [N, 28, 28] in, logits and probabilities out."""

    def __init__(
        self, model_path: str | Path, threads: int | None = None, source: str | None = None, version: str | None = None
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types are not importable
            raise PipelineError(f"{model_path} is not a loadable ONNX model: {first_line(exc)}") from None
        self.path = Path(model_path)
        self.metadata = _model_card(self.path)
        self.class_names = list(self.metadata.get("class_names", CLASS_NAMES))
        _check_signature(self.session, model_path, len(self.class_names))
        self.source = source or str(model_path)  # what the user named: a path, or models:/name@alias
        self.version = version  # the registered version, when the model came from the registry

    def provenance(self) -> dict[str, str]:
        """What made a file of predictions, for its metadata: the model as named, its registered name and
        version, the md5 of the ONNX file, and the md5 of the data it was trained on (from its model card)."""
        import hashlib

        card = self.metadata
        return {
            "model": self.source,
            "model_name": str(card.get("registered_model", "")),
            "model_version": self.version or "",
            "model_md5": hashlib.md5(self.path.read_bytes()).hexdigest(),
            "data_md5": str(card.get("data_md5", "")),
        }

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probabilities = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return logits, probabilities

    def top_k(self, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most probable class ids per image and their probabilities, most probable first."""
        return self.top_k_of(self.run(images)[1], k)

    @staticmethod
    def top_k_of(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return ids, np.take_along_axis(probabilities, ids, axis=1)

    def describe(self, ids: np.ndarray, probabilities: np.ndarray) -> list[dict]:
        """JSON-ready predictions: the top class and the top-k list, with class names."""
        names = self.class_names
        return [
            {
                "class_id": int(row[0]),
                "class_name": names[row[0]],
                "probability": float(p[0]),
                "top_k": [
                    {"class_id": int(c), "class_name": names[c], "probability": float(q)}
                    for c, q in zip(row, p, strict=True)
                ],
            }
            for row, p in zip(ids, probabilities, strict=True)
        ]
