"""Prefect flows: the training pipeline (one task per DVC stage) and batch inference.

Run once without a server (Prefect's ephemeral mode): `softmax-mlops pipeline` or `python -m pipelines.flows`.
Scheduled: `prefect deploy --all` (prefect.yaml) with a process worker, or `python -m pipelines.serve`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from softmax_mlops import config, object_store
from softmax_mlops.cli import configure_process
from softmax_mlops.tracking import PREFECT_FLOW_RUN_ENV

from .dvc_stages import (
    Outcome,
    default_remote,
    environment,
    experiment_workspace,
    has_git,
    override_in_place,
    push,
    reproduce,
    save_experiment,
)

if TYPE_CHECKING:
    from softmax_mlops.serving.inference import Predictor

STAGES_PER_IMPL = ("train", "evaluate", "calibrate", "export")


def stage_names(impls: list[str]) -> list[str]:
    """dvc.yaml's stages for these implementations, in an order that runs each after what it depends on
    (tests/unit/test_stage_list.py checks both against DVC's own graph of dvc.yaml)."""
    stages = ["ingest", *(f"{name}@{impl}" for impl in impls for name in STAGES_PER_IMPL)]
    if set(impls) == set(config.IMPLS):
        stages.append("compare")  # it compares the two: only with both
    return stages


@task(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    task_run_name="ingest",
)
def ingest(workspace: Path, pull: bool) -> Outcome:
    """The stage that downloads the data, so the one retried (a DVC remote is reached by every stage)."""
    return reproduce(workspace, "ingest", pull)


@task(task_run_name="{stage}")
def run_stage(workspace: Path, stage: str, pull: bool) -> Outcome:
    return reproduce(workspace, stage, pull)


@task(task_run_name="dvc-push", retries=2, retry_delay_seconds=10)
def push_outputs(workspace: Path, stages: list[str]) -> int:
    """Send the outputs and the run-cache to the remote, so that the next run, in any container, is a cache hit."""
    return push(workspace, stages)


def _summary(cfg: config.Config, workspace: Path, impls: list[str]) -> dict:
    from softmax_mlops.tracking import train_run

    ws_cfg = config.load(workspace)
    summary = {}
    for impl in impls:
        run = train_run(ws_cfg, impl).info
        evaluation = json.loads(ws_cfg.paths.eval_metrics(impl).read_text())
        summary[impl] = {
            "test_accuracy": evaluation["test_accuracy"],
            "macro_f1": evaluation["macro_f1"],
            "mlflow_run_id": run.run_id,
            "mlflow_run_url": cfg.mlflow.run_url(run.experiment_id, run.run_id),
        }
    return summary


def _markdown(summary: dict, overrides: list[str], experiment: str | None) -> str:
    lines = ["# Training pipeline", ""]
    if overrides:
        lines += [f"DVC experiment `{experiment}` with " + ", ".join(f"`{o}`" for o in overrides), ""]
    lines += ["| implementation | test accuracy | macro-F1 | MLflow run |", "|---|---:|---:|---|"]
    lines += [
        f"| {impl} | {m['test_accuracy']:.4f} | {m['macro_f1']:.4f} "
        f"| [{m['mlflow_run_id'][:8]}]({m['mlflow_run_url']}) |"
        for impl, m in summary.items()
    ]
    return "\n".join(lines) + "\n"


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    impls: list[str] | None = None,
    overrides: list[str] | None = None,
    experiment_name: str | None = None,
    project_dir: str | None = None,
) -> dict:
    """Run the DVC stages as tasks: ingest, train/evaluate/calibrate/export for each implementation, then compare.

    ``overrides`` take DVC's `-S` form (`train.lr=0.05`); with any, the run is a DVC experiment in a
    throwaway worktree and params.yaml is left as it is. In a copy without git (a Docker pool's flow-run
    container, itself throwaway) they are applied to its params.yaml instead, and no experiment is recorded.
    """
    root = Path(project_dir or os.getcwd()).resolve()
    cfg = configure_process(config.load(root))
    impls = list(impls or cfg.impls)
    if unknown := sorted(set(impls) - set(config.IMPLS)):
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(config.IMPLS)}")
    overrides = list(overrides or [])
    # Stages in a worktree must log to the project's MLflow store, and every run carries this flow run's id.
    env = {config.TRACKING_URI_ENV: cfg.mlflow.tracking_uri, PREFECT_FLOW_RUN_ENV: str(flow_run.id or "")}

    in_place = bool(overrides) and not has_git(root)  # a flow-run container's disposable copy
    if in_place:
        override_in_place(root, overrides)
        print(f"no git in {root} (a disposable copy): {', '.join(overrides)} applied to its params.yaml")
    in_worktree = bool(overrides) and not in_place
    with environment(**env), experiment_workspace(root, overrides) if in_worktree else nullcontext(root) as ws:
        stages = stage_names(impls)
        remote = default_remote(ws)  # with one, `dvc repro --pull` and `dvc push --run-cache` around the stages
        pull = remote is not None
        outcomes = {s: ingest(ws, pull) if s == "ingest" else run_stage(ws, s, pull) for s in stages}
        ran = [s for s, outcome in outcomes.items() if outcome is Outcome.RAN]
        restored = [s for s, outcome in outcomes.items() if outcome is Outcome.RESTORED]
        reproduced = [s for s in stages if s in ran or s in restored]
        print(f"{len(ran)} of {len(stages)} stages ran: {', '.join(ran) or 'none'}")
        print(f"{len(restored)} restored from the DVC run-cache: {', '.join(restored) or 'none'}")
        if remote is not None:
            print(f"pushed {push_outputs(ws, stages)} files (outputs and run-cache) to the DVC remote {remote!r}")
        summary = _summary(cfg, ws, impls)
        experiment = save_experiment(ws, stages, experiment_name) if in_worktree else None

    create_markdown_artifact(
        key="training-metrics",
        markdown=_markdown(summary, overrides, experiment),
        description="Test metrics per implementation, with links to the MLflow runs",
    )
    return {
        "impls": summary,
        "experiment": experiment,
        "stages": stages,
        "reproduced": reproduced,  # ran, or restored from the run-cache: DVC's own "reproduced"
        "ran": ran,
        "restored": restored,
    }


@task(retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def load_predictor(model: str, tracking_uri: str) -> Predictor:
    """Resolving models:/name@alias asks the MLflow server, which may be briefly unreachable. Never cached:
    the result is an onnxruntime session, which cannot be hashed or pickled."""
    from softmax_mlops.serving.inference import Predictor, resolve_model

    return Predictor(resolve_model(model, tracking_uri))


def _nothing_to_predict(source: Path | None, source_ref: str) -> str | None:
    """Why there is nothing to do, for an inbox that is missing or holds no images; None when there is work.
    ``source_ref`` is what the user configured (a local path, or the s3:// URL ``source`` was copied from)."""
    from softmax_mlops.serving.inputs import image_files

    shown = source_ref if object_store.is_url(source_ref) else str(source)
    if source is None or not source.exists():
        return f"{shown} does not exist"
    if source.is_dir() and not image_files(source) and not any(source.rglob("*.parquet")):
        return f"{shown} holds no PNG or JPEG images and no Parquet files"
    return None


def _nothing_stored(source_ref: str) -> str | None:
    """_nothing_to_predict for an inbox that a sharded run reads in place: the store is listed, not copied."""
    from softmax_mlops.serving.inputs import IMAGE_SUFFIXES

    kind = object_store.kind(source_ref)
    if kind is None:
        return f"{source_ref} does not exist"
    if kind == "folder" and not object_store.files_under(source_ref, (*IMAGE_SUFFIXES, ".parquet")):
        return f"{source_ref} holds no PNG or JPEG images and no Parquet files"
    return None


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    input_path: str | None = None,
    output_path: str | None = None,
    model: str | None = None,
    skip_bad: bool = False,
    project_dir: str | None = None,
) -> dict:
    """Predict every image of a folder, IDX, .npy or Parquet input with an exported model; the output is atomic.
    Defaults come from params.yaml (batch_inference, or its environment overrides). The inbox and the output
    may be s3:// URLs (softmax_mlops/object_store.py): a single process copies the inbox first; a sharded run
    (batch_inference.workers or dask_address) reads it in place, each worker its own shard. An empty or missing
    inbox is a normal night: the run completes with "nothing to predict" and writes nothing."""
    root = Path(project_dir or os.getcwd()).resolve()
    cfg = configure_process(config.load(root))
    source_ref = input_path or cfg.batch_inference.input
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    sharded = bool(cfg.batch_inference.workers or cfg.batch_inference.dask_address)
    suffix = ".parquet" if sharded else ".csv"  # sharded: a folder of Parquet parts with a manifest
    name = (
        f"{object_store.stem(source_ref) if object_store.is_url(source_ref) else Path(source_ref).stem}-{stamp}{suffix}"
    )
    output_ref = output_path or (
        object_store.join(cfg.batch_inference.output_dir, name)
        if object_store.is_url(cfg.batch_inference.output_dir)
        else str(Path(cfg.batch_inference.output_dir) / name)
    )
    if sharded:  # each worker reads its own shard from the inbox, and writes its part to the output, in place
        source = None if object_store.is_url(source_ref) else root / source_ref
        if reason := (_nothing_stored(source_ref) if source is None else _nothing_to_predict(source, source_ref)):
            return _nothing(reason)
        output = output_ref if object_store.is_url(output_ref) else str(root / output_ref)
        model = _model(cfg, root, model)
        return _predict_sharded(cfg, str(source or source_ref), source_ref, output, output_ref, model, skip_bad)
    with tempfile.TemporaryDirectory(prefix="batch-inference-") as tmp:
        if object_store.is_url(source_ref):
            source = object_store.download(source_ref, Path(tmp) / "in")
        else:
            source = root / source_ref
        if reason := _nothing_to_predict(source, source_ref):
            return _nothing(reason)
        assert source is not None
        local = Path(tmp) / "out" / name if object_store.is_url(output_ref) else root / output_ref
        local.parent.mkdir(parents=True, exist_ok=True)
        return _predict_batch(cfg, source, source_ref, local, output_ref, _model(cfg, root, model), skip_bad)


def _nothing(reason: str) -> dict:
    print(f"nothing to predict: {reason}")
    create_markdown_artifact(key="batch-inference", markdown=f"Nothing to predict: {reason}.\n")
    return {"images": 0, "output": None, "model": None}


def _model(cfg: config.Config, root: Path, model: str | None) -> str:
    from softmax_mlops.serving.inference import model_source

    return model_source(model or cfg.batch_inference.model, root)


def _predict_batch(
    cfg: config.Config,
    source: Path,
    source_ref: str,
    output: Path,
    output_ref: str,
    model: str,
    skip_bad: bool,
) -> dict:
    from softmax_mlops.serving import drift, predict

    predictor = load_predictor(model, cfg.mlflow.tracking_uri)
    result = task(name="predict", cache_policy=NO_CACHE)(predict.run)(
        input_path=source,
        output=output,
        predictor=predictor,
        batch_size=cfg.predict.batch_size,
        top_k=cfg.predict.top_k,
        skip_bad=skip_bad,
        progress=False,  # a flow run's log is no terminal
        drift_cfg=cfg.drift,
    )
    # the finished files, uploaded whole: the drift report, then the output
    object_store.upload_outputs(output, output_ref, (drift.report_path(output),))
    print(f"predicted {result.images} images from {source_ref} with {model} into {output_ref}")
    markdown = f"Predicted **{result.images}** images from `{source_ref}` with `{model}` into `{output_ref}`.\n"
    if result.drift is not None:
        print(drift.summary(result.drift))
        markdown += "\n" + drift.markdown(result.drift)
        create_markdown_artifact(key="drift", markdown=drift.markdown(result.drift))
    create_markdown_artifact(key="batch-inference", markdown=markdown)
    return {
        "images": result.images,
        "output": output_ref if object_store.is_url(output_ref) else str(output),
        "model": model,
        "drift": result.drift["result"] if result.drift else None,
    }


def _predict_sharded(
    cfg: config.Config, source: str, source_ref: str, output: str, output_ref: str, model: str, skip_bad: bool
) -> dict:
    """The input in shards on Dask (pipelines/sharded.py), into a folder of Parquet parts with its manifest
    written last, so that a reader who finds the manifest finds every part. On object storage, the workers read
    and write the store themselves."""
    from . import sharded

    manifest = sharded.run(
        cfg,
        source,
        output,
        model,
        batch_size=cfg.predict.batch_size,
        top_k=cfg.predict.top_k,
        skip_bad=skip_bad,
        workers=cfg.batch_inference.workers,
        address=cfg.batch_inference.dask_address,
    )
    print(
        f"predicted {manifest['images']} images in {len(manifest['parts'])} shards from {source_ref} into {output_ref}"
    )
    create_markdown_artifact(
        key="batch-inference",
        markdown=f"Predicted **{manifest['images']}** images in {len(manifest['parts'])} shards from `{source_ref}` "
        f"with `{manifest['model']}` into `{output_ref}`.\n",
    )
    return {
        "images": manifest["images"],
        "output": output,
        "model": manifest["model"],
        "drift": manifest["drift"],
    }


if __name__ == "__main__":
    training_pipeline()
