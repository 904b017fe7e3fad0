"""The serving side's commands: `predict` (batch inference) and `serve` (the HTTP service), both on onnxruntime.
They need neither torch nor a stage, which is what lets the serving image leave both out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..cli import project_config as _config
from ..errors import PipelineError, first_line

if TYPE_CHECKING:
    from ..config import Config
    from .inference import Predictor


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="SOFTMAX_MLOPS_MODEL",
        help="A .onnx file, its folder, or an MLflow URI such as models:/softmax-mlops-scratch@champion. "
        "Default: serve.model in params.yaml.",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="onnxruntime intra-op threads. Default: the CPUs this process may use (affinity and cgroup quota)."
    ),
]


def _predictor(model: str | None, threads: int | None, wait_s: float = 0.0) -> tuple[Config, Predictor]:
    from .inference import Predictor, is_mlflow_uri, model_source, registered_version, wait_for_model

    cfg = _config(standalone=model is not None)
    source = model or model_source(cfg.serve.model, cfg.root)  # --model is relative to where you are
    if is_mlflow_uri(source):  # the registry may be slow to answer (or retrying): say what we wait for
        typer.echo(f"softmax-mlops: loading {source} from {cfg.mlflow.tracking_uri}", err=True)
    path = wait_for_model(source, cfg.mlflow.tracking_uri, wait_s, lambda line: typer.echo(line, err=True))
    version = registered_version(source, cfg.mlflow.tracking_uri)
    return cfg, Predictor(path, threads, source=source, version=version)


def predict(
    input: Annotated[
        str,
        typer.Argument(
            help="IDX file (.gz or raw), .npy (uint8 [N,28,28] or [N,784]), a PNG/JPEG, a folder of PNG/JPEG "
            "images (searched recursively), or a Parquet file or folder; a path, or an s3:// URL."
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="Where to write predictions: .csv, .jsonl or .parquet; a path, or an s3:// URL."
        ),
    ],
    model: ModelOpt = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv, jsonl or parquet (default: from --output's suffix).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per onnxruntime call. Default: predict.batch_size.")
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(min=1, max=10, help="Classes listed per image. Default: predict.top_k.")
    ] = None,
    threads: ThreadsOpt = None,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad/--fail-on-bad",
            help="For folders: skip unreadable images with a warning, or stop at the first one (default).",
        ),
    ] = False,
    all_probabilities: Annotated[
        bool, typer.Option(help="Parquet only: also a `probabilities` column with every class's probability.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Predict in shards (batch_inference.shard_size images), as Prefect tasks on a temporary local Dask "
            "cluster of N worker processes. The output is then a folder of parts with a _manifest.json; a rerun "
            "finishes only the shards that did not. Needs the pipeline extra.",
        ),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="The same sharded path on an existing Dask scheduler (tcp://host:8786) instead."),
    ] = None,
    shard_size: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --workers or --dask-address: images per shard. Default: batch_inference.shard_size."
        ),
    ] = None,
) -> None:
    """Batch inference with onnxruntime: one output row per image (id, class, probability, top-k), streamed in
    batches with bounded memory and written atomically. Parquet output has typed columns and names the model in
    its metadata. With a model that carries a drift reference, the batch is also tested for drift against the
    test set, and the report is written beside the output."""
    from . import predict as batch

    if output_format not in (None, *sorted(set(batch.FORMATS.values()))):
        raise PipelineError(f"--format must be csv, jsonl or parquet, not {output_format!r}")
    from .. import object_store
    from .drift import report_path

    if workers or dask_address:  # each worker reads its shard and writes its part itself: nothing is staged
        manifest = _predict_sharded(
            input,
            output,
            model,
            output_format,
            batch_size,
            top_k,
            skip_bad,
            all_probabilities,
            workers,
            dask_address,
            shard_size,
        )
        skipped = f", {manifest['skipped']} unreadable skipped" if manifest["skipped"] else ""
        typer.echo(f"predict: {manifest['images']} images in {len(manifest['parts'])} parts{skipped} -> {output}")
        if manifest["drift"] is not None:
            beside = report_path(Path(output.rstrip("/"))).name
            typer.echo(f"drift: {manifest['drift']} -> {object_store.sibling(output.rstrip('/'), beside)}")
        return
    with object_store.staged(input, output) as (local_input, local_output):
        cfg, predictor = _predictor(model, threads)
        result = batch.run(
            input_path=local_input,
            output=local_output,
            predictor=predictor,
            batch_size=batch_size or cfg.predict.batch_size,
            top_k=top_k or cfg.predict.top_k,
            fmt=output_format,
            skip_bad=skip_bad,
            progress=sys.stderr.isatty(),
            drift_cfg=cfg.drift,
            all_probabilities=all_probabilities,
        )
        report = report_path(local_output)
        object_store.upload_outputs(local_output, output, (report,))
    typer.echo(f"predict: {result.images} images -> {output}")
    if result.drift is not None:
        from .drift import summary

        typer.echo(f"{summary(result.drift)} -> {object_store.sibling(output, report.name)}")


SHARDED_ENTRY_POINTS = "softmax_mlops.sharded"  # pyproject.toml: the orchestration layer's sharded runner


def sharded_runner() -> Callable[..., dict]:
    """The sharded path (pipelines/sharded.py: Prefect and Dask), found through its entry point, so that this
    package never imports the orchestration layer; one clear line where it is not installed (the serving image)."""
    from importlib.metadata import entry_points

    try:
        return next(iter(entry_points(group=SHARDED_ENTRY_POINTS, name="dask"))).load()
    except (StopIteration, ImportError) as exc:
        raise PipelineError(
            "--workers and --dask-address need the pipeline extra (Prefect, prefect-dask): "
            f"{first_line(exc) or 'not installed'}"
        ) from None


def _predict_sharded(
    input: str,
    output: str,
    model: str | None,
    fmt: str | None,
    batch_size: int | None,
    top_k: int | None,
    skip_bad: bool,
    all_probabilities: bool,
    workers: int | None,
    address: str | None,
    shard_size: int | None,
) -> dict:
    from .inference import model_source

    run = sharded_runner()
    cfg = _config(standalone=model is not None)
    return run(
        cfg,
        input,
        output,
        model or model_source(cfg.serve.model, cfg.root),
        batch_size=batch_size or cfg.predict.batch_size,
        top_k=top_k or cfg.predict.top_k,
        fmt=fmt,
        skip_bad=skip_bad,
        all_probabilities=all_probabilities,
        workers=workers or 0,
        address=address,
        shard_size=shard_size,
    )


def serve(
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind. Default: serve.host (127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Default: serve.port.")] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(min=1, help="Larger requests get 413. Default: serve.max_body_bytes.")
    ] = None,
    max_instances: Annotated[
        int | None, typer.Option(min=1, help="Images per request; more get 413. Default: serve.max_instances.")
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(min=0.001, help="Seconds of inference before 503. Default: serve.request_timeout_s.")
    ] = None,
    read_timeout: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Seconds for a request's headers, then its body, to arrive (else 408). Default: serve.read_timeout_s.",
        ),
    ] = None,
    max_connections: Annotated[
        int | None, typer.Option(min=1, help="Open connections at once; more get 503. Default: serve.max_connections.")
    ] = None,
    max_image_pixels: Annotated[
        int | None,
        typer.Option(min=1, help="Uploaded images declaring more pixels get 413. Default: serve.max_image_pixels."),
    ] = None,
    threads: ThreadsOpt = None,
    metrics: Annotated[
        bool | None,
        typer.Option("--metrics/--no-metrics", help="GET /metrics for Prometheus. Default: serve.metrics (on)."),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file whose first line is the bearer token every route but health needs (a mounted secret); "
            "the environment's SOFTMAX_MLOPS_SERVE_TOKEN wins. Default: serve.token_file (none).",
        ),
    ] = None,
    model_wait: Annotated[
        float | None,
        typer.Option(
            min=0,
            envvar="SOFTMAX_MLOPS_MODEL_WAIT_S",
            help="Seconds to keep retrying a models:/ URI that has no version yet (a fresh registry). "
            "Default: serve.model_wait_s.",
        ),
    ] = None,
) -> None:
    """HTTP inference: POST /predict (JSON {"instances": [...]} or a PNG/JPEG), GET /health, GET /metadata; the
    Open Inference Protocol (KServe v2) under /v2; MLflow's scoring protocol (POST /invocations, GET /ping)."""
    from .. import config
    from . import auth, server

    wait_s = model_wait if model_wait is not None else _config(standalone=model is not None).serve.model_wait_s
    cfg, predictor = _predictor(model, threads, wait_s)
    overrides = {
        "host": host,
        "port": port,
        "max_body_bytes": max_body_bytes,
        "max_instances": max_instances,
        "request_timeout_s": request_timeout,
        "read_timeout_s": read_timeout,
        "max_connections": max_connections,
        "max_image_pixels": max_image_pixels,
        "metrics": metrics,
        "token_file": str(token_file) if token_file is not None else None,
    }
    limits = config.overridden(cfg.serve, "serve", **overrides)
    server.serve(predictor, limits, cfg.predict.top_k, auth.token(limits))


COMMANDS = (predict, serve)
