"""MLflow conventions: one experiment, one run per (pipeline execution, implementation).

train@{impl} opens the run and records its id in models/{impl}/mlflow_run.json; evaluate and export reopen
that run by id, so a single run holds the params, the per-epoch curves, the test metrics and the models.
A stage that raises leaves its run FAILED (mlflow's ActiveRun does that on exit with an exception). Runs are
opened with signals held (`_open`), so an interrupt never lands between the run being written RUNNING and the
ActiveRun that ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np

from ..atomic import write_json
from ..config import Config, TrainConfig
from ..errors import PipelineError
from ..lifecycle import deferred_interrupts

if TYPE_CHECKING:
    import torch

    from .registry import Score

PREFECT_FLOW_RUN_ENV = "PREFECT_FLOW_RUN_ID"
PREFECT_FLOW_RUN_TAG = "prefect_flow_run_id"  # on every stage run: which flow run it belonged to


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_md5(cfg: Config) -> str:
    try:
        return json.loads(cfg.paths.data_summary.read_text())["data_md5"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and return the experiment id, creating the experiment if needed.

    With the embedded SQLite default, artifacts go beside the database (see MlflowConfig.artifact_location)
    rather than wherever the process happens to run; a remote tracking server keeps its own artifact root.
    """
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if experiment is not None:
            return experiment.experiment_id
        return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location)
    except mlflow.exceptions.MlflowException as exc:
        raise PipelineError(f"MLflow at {cfg.mlflow.tracking_uri} is not usable: {exc.message}") from None


def _stage_tags(cfg: Config, stage: str) -> dict[str, str]:
    tags = {"dvc_stage": stage, "git_commit": _git_commit(cfg.root), "data_md5": data_md5(cfg)}
    if flow_run := os.environ.get(PREFECT_FLOW_RUN_ENV):
        tags[PREFECT_FLOW_RUN_TAG] = flow_run
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = exp
    return tags


def _owner() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def fail_orphaned_runs(experiment_id: str, impl: str) -> list[str]:
    """Mark FAILED the RUNNING runs of ``impl`` whose process, on this host, is gone.

    A run can only be ended while its tracking server answers: a stage that lost the server mid-run (or was
    killed with SIGKILL) leaves its run RUNNING. The next train@{impl} on the same host ends it.
    """
    client = mlflow.MlflowClient()
    orphans = []
    for run in client.search_runs([experiment_id], f"tags.impl = '{impl}' and attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("host") != socket.gethostname() or not tags.get("pid", "").isdigit():
            continue
        try:
            os.kill(int(tags["pid"]), 0)
            continue  # still running (or the pid was reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        client.set_terminated(run.info.run_id, "FAILED")
        client.set_tag(run.info.run_id, "ended_by", f"train@{impl} (its process {tags['pid']} was gone)")
        orphans.append(run.info.run_id)
    return orphans


@contextlib.contextmanager
def start_run(cfg: Config, impl: str) -> Iterator[mlflow.ActiveRun]:
    """Open the run for train@{impl}, after ending any run a dead process left RUNNING."""
    experiment_id = setup(cfg)
    fail_orphaned_runs(experiment_id, impl)
    tags = _stage_tags(cfg, f"train@{impl}") | {"impl": impl, "dvc_stages": f"train@{impl}"} | _owner()
    tags["mlflow.note.content"] = RUN_NOTE
    interval = cfg.mlflow.system_metrics_interval_s
    if interval:  # MLflow's own monitor: CPU, memory, disk and network, and GPU where there is one (pynvml)
        from mlflow import system_metrics

        system_metrics.set_system_metrics_sampling_interval(interval)
        system_metrics.set_system_metrics_samples_before_logging(1)
    with _open(
        experiment_id=experiment_id, run_name=run_name(impl, tags), tags=tags, log_system_metrics=bool(interval)
    ) as run:
        yield run


@contextlib.contextmanager
def _open(**start_run: object) -> Iterator[mlflow.ActiveRun]:
    """mlflow.start_run(**start_run) as a `with`, opened whole: a signal during the opening is raised once the
    ActiveRun's exit is in place, which ends the run FAILED."""
    with contextlib.ExitStack() as stack:
        with deferred_interrupts():
            run = stack.enter_context(mlflow.start_run(**start_run))  # type: ignore[arg-type]
        yield run


RUN_NOTE = """One run per implementation and pipeline execution: train@, evaluate@, calibrate@, export@ and compare
log into it. Training sees the training images minus a validation split, which only calibrate@ uses.

- `train_acc_running`, `train_acc` and `test_acc` are per-epoch curves (step = epoch): the running train
  accuracy averages over the epoch while the weights still change (the textbook's figure), `train_acc` and
  `test_acc` use the weights at the end of each epoch. `curves.png` overlays the three.
- `test_accuracy` is the final figure from the evaluate stage, on the saved weights: the same number as the
  last epoch's `test_acc`, computed from what was shipped.
- `temperature` was fitted on the validation split; `test_{ece,nll,brier}_{before,after}` score the test set
  with T = 1 and with it (`reliability.png`). The registered ONNX model divides its logits by it.
- `compare/` holds the scratch-vs-concise report."""


def run_name(impl: str, tags: dict[str, str]) -> str:
    """What ran: the implementation, then the DVC experiment's name, or else the short commit."""
    what = os.environ.get("DVC_EXP_NAME") or tags.get("git_commit", "unknown")[:7]
    return f"{impl}-{what}"


def _file_md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def save_run_info(path: Path, run: mlflow.ActiveRun, weights: Path) -> None:
    """Record the run for the later stages, and tag it with the md5 of the weights it produced.

    models/{impl}/mlflow_run.json is not a DVC output (a run id is new on every run, so dvc.lock could never
    match): when DVC restores train's outputs from its cache without the file, the tag finds the run."""
    mlflow.set_tag("weights_md5", _file_md5(weights))
    write_json(path, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})


def _run_id(cfg: Config, impl: str) -> str:
    info_path = cfg.paths.run_info(impl)
    try:
        return json.loads(info_path.read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        pass
    weights = cfg.paths.weights(impl)
    if weights.is_file():
        experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        found = (
            mlflow.MlflowClient().search_runs(
                [experiment.experiment_id],
                f"tags.impl = '{impl}' and tags.weights_md5 = '{_file_md5(weights)}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if experiment
            else []
        )
        if found:
            return found[0].info.run_id
    raise PipelineError(
        f"{info_path} is missing and no MLflow run in {cfg.mlflow.tracking_uri} produced "
        f"{weights}: run the train@{impl} stage first"
    )


def train_run(cfg: Config, impl: str):  # noqa: ANN201 - mlflow.entities.Run
    """The MLflow run that train@{impl} opened for the current weights."""
    setup(cfg)
    return mlflow.get_run(_run_id(cfg, impl))


@contextlib.contextmanager
def resume_run(cfg: Config, impl: str, stage: str) -> Iterator[mlflow.ActiveRun]:
    """Reopen the run that train@{impl} started, and record that ``stage`` touched it."""
    setup(cfg)
    run_id = _run_id(cfg, impl)
    try:
        previous = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PipelineError(
            f"MLflow run {run_id} (from {cfg.paths.run_info(impl)}) is not in "
            f"{cfg.mlflow.tracking_uri}; rerun train with `dvc repro --force train@{impl}`"
        ) from None
    stages = previous.data.tags.get("dvc_stages", "")
    with _open(run_id=run_id) as run:
        tags = _stage_tags(cfg, stage) | _owner()
        tags["dvc_stages"] = ",".join(filter(None, [*stages.split(","), stage]))
        mlflow.set_tags(tags)
        yield run


# The writes below happen while a stage runs, so a signal can land in the middle of one. Raised inside
# SQLite's commit, it left the store locked to the write that ends the run FAILED: the run stayed RUNNING
# and the CLI reported "database is locked" instead of the interruption. Each write is finished first.


def log_params(impl: str, hp: TrainConfig) -> None:
    with deferred_interrupts():
        mlflow.log_params({"impl": impl, **hp.model_dump()})


def log_timing(**seconds: float) -> None:
    """Wall-clock figures: MLflow keeps them; DVC-tracked files never do (they would change every run)."""
    with deferred_interrupts():
        mlflow.log_metrics(seconds)


def log_epoch(metrics) -> None:  # noqa: ANN001 - train.EpochMetrics; not imported to keep this module light
    values = asdict(metrics)
    epoch = values.pop("epoch")
    values["epoch_seconds"] = values.pop("seconds")
    with deferred_interrupts():
        mlflow.log_metrics(values, step=epoch)


@contextlib.contextmanager
def artifact_store() -> Iterator[None]:
    """A read-only or full artifact store is one line naming where the artifacts go, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = mlflow.get_artifact_uri() if mlflow.active_run() else mlflow.get_tracking_uri()
        raise PipelineError(f"cannot store MLflow artifacts at {where}: {exc.strerror or exc}") from None


def log_files(*paths: Path, artifact_path: str | None = None) -> None:
    with artifact_store():
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def pip_requirements(*packages: str) -> list[str]:
    """Pinned from the running environment, so MLflow need not spend seconds inferring them."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in packages]


def log_torch_model(module: torch.nn.Module, example_images: np.ndarray) -> None:
    """Log the deployable torch module (uint8 images -> logits) with a signature and an input example.

    Saved as a torch.export program ('pt2') rather than a pickle, so loading it back runs no pickled code. The
    train stage builds the module: tracking sits below the stages and never imports them.
    """
    import torch
    from mlflow.models import infer_signature

    module = module.eval()
    with torch.no_grad():
        example_logits = module(torch.from_numpy(example_images)).numpy()
    with artifact_store():
        mlflow.pytorch.log_model(
            module,
            name="model",
            serialization_format="pt2",
            signature=infer_signature(example_images, example_logits),
            input_example=example_images,
            pip_requirements=pip_requirements("torch", "numpy"),
        )


def version_description(cfg: Config, impl: str, test_accuracy: float) -> str:
    """What a registered version is, readable in the registry UI: data, params, metrics, code and the run."""
    run = mlflow.active_run()
    if run is None:
        raise PipelineError("a model version is registered from inside the export stage's MLflow run")
    tags = mlflow.get_run(run.info.run_id).data.tags
    params = ", ".join(f"{k}={v}" for k, v in cfg.train.model_dump().items())
    lines = [
        f"softmax regression ({impl}), test accuracy {test_accuracy:.4f} on the Fashion-MNIST test set",
        f"- data md5: {data_md5(cfg)}",
        f"- params: {params}",
        f"- git commit: {tags.get('git_commit', 'unknown')}",
        f"- DVC experiment: {tags.get('dvc_exp_name', '(none: dvc repro)')}",
        f"- MLflow run: {cfg.mlflow.run_url(run.info.experiment_id, run.info.run_id)}",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Registered:
    """A model version the export registered, and what the champion gate decided for it."""

    registered_model: str
    version: str
    champion: bool  # whether @champion moved to this version
    gate: float  # export.champion_min_accuracy, as it was applied
    reason: str  # why @champion moved or stayed, in words


def log_and_register_onnx(
    cfg: Config,
    impl: str,
    onnx_path: Path,
    extra_files: list[Path],
    module: torch.nn.Module,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    new: Score,
) -> Registered:
    """Log the ONNX model (with its model card and drift reference) into the current run and register it;
    @candidate always moves to it, @champion only past the gate and when it is at least as good as the current
    champion on the same test data (registry.promote_if_not_worse). The version's description and tags say what
    it is and what was decided."""
    import onnx
    import torch
    from mlflow.models import infer_signature

    from .champion_lock import champion_lock
    from .registry import promote_if_not_worse

    example_images = test_images[:5]
    with torch.no_grad():
        logits, probabilities = (t.numpy() for t in module(torch.from_numpy(example_images)))
    name = cfg.mlflow.registered_model(impl)
    with artifact_store():
        # The input is named `image`, as in the graph, so `mlflow models serve` takes {"inputs": {"image": ...}}
        # as well as an unnamed array; CPU only, since onnxruntime would otherwise warn about CUDA on every load.
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="onnx_model",
            registered_model_name=name,
            save_as_external_data=False,
            signature=infer_signature({"image": example_images}, {"logits": logits, "probabilities": probabilities}),
            input_example={"image": example_images},
            extra_files=[str(f) for f in extra_files],
            onnx_execution_providers=["CPUExecutionProvider"],
            pip_requirements=pip_requirements("onnxruntime", "onnx", "numpy"),
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    client.set_registered_model_tag(name, "impl", impl)
    client.set_model_version_tag(name, version, "test_accuracy", f"{new.accuracy:.4f}")
    gate = cfg.export.champion_min_accuracy
    lock = champion_lock(cfg.export.champion_lock, cfg.export.champion_lock_timeout_s)
    decision = promote_if_not_worse(
        client, name, version, new, gate, cfg.mlflow.tracking_uri, test_images, test_labels, lock=lock
    )
    client.update_model_version(
        name, version, description=version_description(cfg, impl, new.accuracy) + f"\n- @champion: {decision.reason}"
    )
    mlflow.set_tags(
        {
            "registered_model": name,
            "registered_version": version,
            "champion": str(decision.promoted).lower(),
            "champion_reason": decision.reason,
        }
    )
    mlflow.log_metric("test_nll", new.nll)
    return Registered(
        registered_model=name, version=version, champion=decision.promoted, gate=gate, reason=decision.reason
    )
