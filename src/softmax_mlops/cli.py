"""`softmax-mlops`: one command per DVC stage, plus the tools users run by hand.

dvc.yaml calls these commands, so running a stage by hand and through `dvc repro` is the same code. The
`pipeline` command, which runs them as a Prefect flow, is added by pipelines.cli (the console script's entry
point): the package never imports the orchestration layer above it. Expected
failures (PipelineError, and a tracking server or disk that fails) print one line and exit 1; Ctrl-C and
SIGTERM print "interrupted" and exit 130; either way a stage takes back the outputs it wrote. Heavy imports
wait until a command needs them, so `--help` stays fast.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import ERROR_FILE_ENV, PipelineError

if TYPE_CHECKING:
    from .config import Config
    from .inference import Predictor

app = typer.Typer(
    help="Softmax regression on Fashion-MNIST: the pipeline stages (normally run by `dvc repro`) and tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Impl(enum.StrEnum):  # config.IMPLS as choices typer can show; tests/unit/test_config.py checks they agree
    scratch = "scratch"
    concise = "concise"


ImplArg = Annotated[Impl, typer.Argument(help="Which implementation: scratch (hand-written) or concise (torch.nn).")]
_project: Path | None = None


@app.callback()
def _options(
    project: Annotated[Path, typer.Option(help="Project root holding params.yaml.", file_okay=False)] = Path("."),
) -> None:
    global _project
    _project = project


def project_dir() -> Path:
    """The project root given with --project (default: the working directory)."""
    return (_project or Path(".")).resolve()


def _config(standalone: bool = False) -> Config:
    """params.yaml of the project. ``standalone`` (predict and serve with an explicit --model): outside a
    project, run on the built-in defaults instead of failing for want of a params.yaml."""
    from . import config

    return config.load(_project, missing_ok=standalone)


@app.command()
def ingest() -> None:
    """Fetch Fashion-MNIST (official mirror, or FASHION_MNIST_MIRROR / ingest.mirror), verify md5s, set a
    stratified validation split aside, write data/prepared/{train,val,test}.npz and summary.json."""
    from . import data

    cfg = _config()
    summary = data.ingest(cfg.ingest, cfg.paths)
    typer.echo(
        f"ingest: {summary['train']['count']} train, {summary['val']['count']} validation, "
        f"{summary['test']['count']} test images "
        f"(data md5 {summary['data_md5']})"
    )


@app.command()
def train(impl: ImplArg) -> None:
    """Train one implementation with the `train` params; opens its MLflow run."""
    from . import train as training

    summary = training.run(_config(), impl.value)
    typer.echo(
        f"train@{impl.value}: test accuracy {summary['test_acc']:.4f} after {summary['epochs']} epochs "
        f"({summary['seconds_per_epoch']:.3f} s/epoch)"
    )


@app.command()
def evaluate(impl: ImplArg) -> None:
    """Score the saved weights on the test set: metrics, confusion matrix and PNGs, logged to the same run."""
    from . import evaluate as evaluation

    metrics = evaluation.run(_config(), impl.value)
    typer.echo(
        f"evaluate@{impl.value}: test accuracy {metrics['test_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}"
    )


@app.command()
def calibrate(impl: ImplArg) -> None:
    """Fit a temperature on the validation split; ECE, NLL and Brier on the test set before and after it, and
    reliability diagrams. The export divides the logits by it."""
    from . import calibrate as calibration

    report = calibration.run(_config(), impl.value)
    before, after = report["test"]["before"], report["test"]["after"]
    typer.echo(
        f"calibrate@{impl.value}: T = {report['temperature']:.4f}; test ECE {before['ece']:.4f} -> "
        f"{after['ece']:.4f}, NLL {before['nll']:.4f} -> {after['nll']:.4f}, "
        f"Brier {before['brier']:.4f} -> {after['brier']:.4f}"
    )


@app.command()
def compare() -> None:
    """Write reports/compare.{json,md}: scratch against concise, side by side."""
    from . import compare as comparison

    cfg = _config()
    report = comparison.run(cfg)
    diff = report.get("difference")
    typer.echo(
        f"compare: {cfg.paths.compare_md}"
        + (f" (test accuracy differs by {diff['test_accuracy_points']:.3f} points)" if diff else "")
    )


@app.command()
def export(impl: ImplArg) -> None:
    """Export to ONNX (uint8 image -> logits, probabilities), check parity with torch on the test set, and log,
    register and alias the model in MLflow (@candidate always; @champion past the accuracy gate and only when at
    least as good as the current champion on the same test data)."""
    from . import export as exporting

    result = exporting.run(_config(), impl.value)
    parity = result["parity"]
    typer.echo(
        f"export@{impl.value}: max abs diff {parity['max_abs_diff']:.1e}, argmax match "
        f"{parity['argmax_match']:.2%}; registered {result['registered_model']} v{result['version']}"
        + f" as @candidate; @champion {result['reason']}"
    )


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
    from .inference import Predictor, is_mlflow_uri, model_source, wait_for_model

    cfg = _config(standalone=model is not None)
    source = model or model_source(cfg.serve.model, cfg.root)  # --model is relative to where you are
    if is_mlflow_uri(source):  # the registry may be slow to answer (or retrying): say what we wait for
        typer.echo(f"softmax-mlops: loading {source} from {cfg.mlflow.tracking_uri}", err=True)
    path = wait_for_model(source, cfg.mlflow.tracking_uri, wait_s, lambda line: typer.echo(line, err=True))
    return cfg, Predictor(path, threads)


@app.command()
def predict(
    input: Annotated[
        Path,
        typer.Argument(
            help="IDX file (.gz or raw), .npy (uint8 [N,28,28] or [N,784]), a PNG/JPEG, "
            "or a folder of PNG/JPEG images (searched recursively)."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write predictions: .csv or .jsonl.")],
    model: ModelOpt = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="csv or jsonl (default: from --output's suffix).")
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
) -> None:
    """Batch inference with onnxruntime: one output row per image (id, class, probability, top-k), streamed in
    batches with bounded memory and written atomically. With a model that carries a drift reference, the batch
    is also tested for drift against the test set, and the report is written beside the output."""
    from . import predict as batch

    if output_format not in (None, "csv", "jsonl"):
        raise PipelineError(f"--format must be csv or jsonl, not {output_format!r}")
    cfg, predictor = _predictor(model, threads)
    result = batch.run(
        input,
        output,
        predictor,
        batch_size or cfg.predict.batch_size,
        top_k or cfg.predict.top_k,
        output_format,
        skip_bad,
        progress=sys.stderr.isatty(),
        drift_cfg=cfg.drift,
    )
    typer.echo(f"predict: {result.images} images -> {output}")
    if result.drift is not None:
        from .drift import report_path, summary

        typer.echo(f"{summary(result.drift)} -> {report_path(output)}")


@app.command()
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
    from . import config, server

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
    }
    limits = config.overridden(cfg.serve, "serve", **overrides)
    server.serve(predictor, limits, cfg.predict.top_k)


def _fail(message: str) -> None:
    typer.echo(f"softmax-mlops: error: {message}", err=True)
    if error_file := os.environ.get(ERROR_FILE_ENV):  # lets an orchestrator report the one-line reason
        Path(error_file).write_text(message, encoding="utf-8")
    sys.exit(1)


def _outside_failure(exc: Exception) -> str | None:
    """One line for failures of what the pipeline depends on (the tracking server, the disk), which libraries
    raise as their own exception types; None for anything else, which is a bug and keeps its traceback."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    if mlflow_errors and isinstance(exc, mlflow_errors.MlflowException):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or sys.modules["mlflow"].get_tracking_uri()
        return f"MLflow at {uri} failed: {str(exc.message).splitlines()[0] if exc.message else type(exc).__name__}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    return None


def main(application: typer.Typer = app) -> None:
    """Run ``application`` (this app, or one that adds commands to it, as pipelines.cli does) with the
    failure handling above."""
    from .atomic import all_or_nothing
    from .lifecycle import Interrupted, follow_stage_runner, interrupt_on_signals

    interrupt_on_signals()
    follow_stage_runner()
    try:
        with all_or_nothing():  # a failed or interrupted command takes back the outputs it wrote
            application()
    except PipelineError as exc:
        _fail(str(exc))
    except (Interrupted, KeyboardInterrupt) as exc:
        typer.echo(f"softmax-mlops: interrupted ({exc or 'SIGINT'})", err=True)
        sys.exit(130)
    except Exception as exc:
        if (reason := _outside_failure(exc)) is None:
            raise
        _fail(reason)


if __name__ == "__main__":
    main()
