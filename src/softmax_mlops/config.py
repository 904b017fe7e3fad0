"""Typed view of params.yaml: the one place configuration is read and environment overrides are resolved.

Every module takes a :class:`Config` instead of reading files or environment variables itself, so a path,
hyperparameter or URI has exactly one definition (params.yaml) and one loader (here). Each section is a pydantic
model whose fields declare their types and ranges; a bad value is reported as one line naming its key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import PipelineError

PARAMS_FILE = "params.yaml"
IMPLS = ("scratch", "concise")
# MLflow's defaults when params.yaml names none: the embedded SQLite store, and `mlflow ui`'s own address
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
MIRROR_ENV = "FASHION_MNIST_MIRROR"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# The MLflow UI as a browser reaches it. In a container stack the tracking URI is an in-network name
# (http://mlflow:5000) that a browser cannot open, so links need the published address instead.
UI_URL_ENV = "SOFTMAX_MLOPS_MLFLOW_UI_URL"
# The nightly batch inference's inbox and output folder where it runs (the stack: s3:// prefixes on its object
# store, since a flow-run container has no volume); params.yaml's batch_inference.input and output_dir otherwise.
BATCH_INPUT_ENV = "SOFTMAX_MLOPS_BATCH_INPUT"
BATCH_OUTPUT_ENV = "SOFTMAX_MLOPS_BATCH_OUTPUT_DIR"
# An existing Dask scheduler for sharded batch inference (tcp://host:8786); batch_inference.dask_address otherwise.
DASK_ADDRESS_ENV = "SOFTMAX_MLOPS_DASK_ADDRESS"
# The inference service's bearer token (serving/auth.py), else serve.token_file; a secret, so never in params.yaml.
SERVE_TOKEN_ENV = "SOFTMAX_MLOPS_SERVE_TOKEN"


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes. dvc.yaml interpolates the same four folders from params.yaml."""

    root: Path
    prepared: Path
    models: Path
    metrics: Path
    reports: Path

    @property
    def train_data(self) -> Path:
        return self.prepared / "train.npz"

    @property
    def val_data(self) -> Path:
        """The validation split set aside from the training images: for calibration, never for training."""
        return self.prepared / "val.npz"

    @property
    def test_data(self) -> Path:
        return self.prepared / "test.npz"

    @property
    def data_summary(self) -> Path:
        return self.prepared / "summary.json"

    def weights(self, impl: str) -> Path:
        return self.models / impl / "weights.npz"

    def run_info(self, impl: str) -> Path:
        """The MLflow run that train opened, so later stages log into the same run."""
        return self.models / impl / "mlflow_run.json"

    def history(self, impl: str) -> Path:
        return self.metrics / impl / "history.csv"

    def train_metrics(self, impl: str) -> Path:
        return self.metrics / impl / "train.json"

    def eval_metrics(self, impl: str) -> Path:
        return self.metrics / impl / "eval.json"

    def confusion(self, impl: str) -> Path:
        return self.metrics / impl / "confusion.csv"

    def calibration(self, impl: str) -> Path:
        """The fitted temperature, and ECE, NLL and Brier on the test set before and after it."""
        return self.metrics / impl / "calibration.json"

    def headline(self, impl: str) -> Path:
        """The only files dvc.yaml declares as metrics: the shipped model's accuracy, macro-F1, ECE after
        calibration and temperature, with the same keys for every implementation, so that `dvc metrics show` is
        one narrow row per implementation. The details are plain outputs."""
        return self.metrics / impl / "headline.json"

    def reliability(self, impl: str) -> Path:
        """Reliability diagrams before and after temperature scaling."""
        return self.reports / impl / "reliability.png"

    def onnx(self, impl: str) -> Path:
        return self.models / impl / "model.onnx"

    def model_card(self, impl: str) -> Path:
        return self.models / impl / "model.json"

    def parity(self, impl: str) -> Path:
        return self.models / impl / "parity.json"

    def drift_reference(self, impl: str) -> Path:
        """The test set's softmax outputs and intensities, beside model.onnx: what batches are compared with."""
        return self.models / impl / "drift_reference.npz"

    def report_dir(self, impl: str) -> Path:
        return self.reports / impl

    @property
    def compare_json(self) -> Path:
        return self.reports / "compare.json"

    @property
    def compare_md(self) -> Path:
        return self.reports / "compare.md"

    @property
    def compare_curves(self) -> Path:
        return self.reports / "compare_curves.png"

    @property
    def accuracy_curves(self) -> Path:
        """Every accuracy of both implementations per epoch, one row each: the data of DVC's accuracy plot."""
        return self.reports / "accuracy_curves.csv"


class Section(BaseModel):
    """A params.yaml section: pydantic checks the types (strictly: no "0.1" for a float, no true for an int,
    though an int is a float) and the ranges declared on each field, and refuses unknown keys. Frozen, so a
    loaded configuration cannot change under a running stage."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


S = TypeVar("S", bound=Section)


class IngestConfig(Section):
    mirror: str = ""  # FASHION_MNIST_MIRROR overrides it
    validation_size: int = Field(5000, ge=10)  # training images set aside, stratified by class (>= 1 per class)
    validation_seed: int = Field(0, ge=0)


class TrainConfig(Section):
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    epochs: int = Field(5, ge=1)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"


class EvaluateConfig(Section):
    grid_images: int = Field(18, ge=1)


class CpuKernelsConfig(Section):
    """The CPU code paths torch's stages run, fixed so that their outputs are the same bytes on any x86-64 CPU,
    Intel or AMD: ATen picks its vectorized kernels by CPU (AVX-512 or AVX2), and MKL its BLAS code path and how
    it splits a product over threads; each choice sums in its own order. `aten` becomes ATEN_CPU_CAPABILITY,
    `mkl` MKL_CBWR (MKL's conditional numerical reproducibility branch: only COMPATIBLE is promised on non-Intel
    CPUs too) and `threads` the OpenMP and MKL thread count (MKL's results hold only for a fixed count, and its
    dynamic mode may lower it under load), in each stage's process before torch loads (stages.commands)."""

    aten: Literal["default", "avx2", "avx512"] = "avx2"
    mkl: Literal["COMPATIBLE", "SSE4_2", "AVX", "AVX2", "AVX512"] = "COMPATIBLE"
    threads: int = Field(1, ge=1)

    def environment(self) -> dict[str, str]:
        threads = str(self.threads)
        return {
            "ATEN_CPU_CAPABILITY": self.aten,
            "MKL_CBWR": self.mkl,
            "MKL_NUM_THREADS": threads,
            "OMP_NUM_THREADS": threads,
            "MKL_DYNAMIC": "FALSE",
        }


class CalibrateConfig(Section):
    bins: int = Field(15, ge=1)  # equal-width confidence bins of the ECE (Guo et al. 2017)
    initial_temperature: float = Field(1.5, gt=0)  # where LBFGS starts, as in the reference implementation
    max_iter: int = Field(100, ge=1)  # LBFGS iterations at most


class ExportConfig(Section):
    opset: int = Field(18, ge=7)
    champion_min_accuracy: float = Field(0.82, ge=0, le=1)
    champion_lock: str = Field("champion-gate", min_length=1)  # Prefect global concurrency limit (champion_lock.py)
    champion_lock_timeout_s: float = Field(600.0, gt=0)


class PredictConfig(Section):
    batch_size: int = Field(4096, ge=1)
    top_k: int = Field(3, ge=1, le=10)


class DriftConfig(Section):
    alpha: float = Field(0.05, gt=0, lt=1)  # level of each drift test (the per-class KS tests share it: Bonferroni)
    min_images: int = Field(200, ge=1)  # smaller batches are reported "not tested"
    max_images: int = Field(100_000, ge=1)  # larger batches are KS-tested on a seeded uniform sample of this many

    @model_validator(mode="after")
    def _sample_holds_a_test(self) -> DriftConfig:
        if self.max_images < self.min_images:
            raise ValueError(f"drift.max_images ({self.max_images}) must be >= drift.min_images ({self.min_images})")
        return self


class ServeConfig(Section):
    model: str = "models/scratch/model.onnx"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_instances: int = Field(256, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    model_wait_s: float = Field(0.0, ge=0)  # how long to wait for a models:/ URI that does not resolve yet
    read_timeout_s: float = Field(10.0, gt=0)  # a request's headers, and then its body, must arrive within this
    max_connections: int = Field(64, ge=1)  # open connections; more are answered 503 and closed
    max_image_pixels: int = Field(4194304, ge=1)  # an uploaded image's declared width x height; more get 413
    keep_alive_s: float = Field(5.0, gt=0)  # an idle kept-alive connection is closed after this (uvicorn's)
    shutdown_grace_s: float = Field(5.0, ge=0)  # on SIGTERM/SIGINT, requests in flight get this long to finish
    metrics: bool = True  # GET /metrics for Prometheus, and the counting and timing of every request behind it
    drift_window: int = Field(1000, ge=1)  # the last predicted classes /metrics tests for drift (chi-squared)
    token_file: str | None = None  # a file holding the bearer token (a mounted secret); SOFTMAX_MLOPS_SERVE_TOKEN wins


class BatchInferenceConfig(Section):
    """The nightly deployment's inbox, output folder and model, and how a large input is sharded: with
    ``workers`` or ``dask_address`` set, the input is cut into shards of ``shard_size`` images, predicted as
    Prefect tasks on a Dask cluster (pipelines/sharded.py) into a folder of parts with a manifest."""

    input: str = "data/incoming"
    output_dir: str = "predictions"
    model: str = "models:/softmax-mlops-scratch@champion"
    workers: int = Field(0, ge=0)  # 0: one process (no Dask); N: a temporary local cluster of N worker processes
    dask_address: str | None = None  # an existing scheduler instead (tcp://host:8786)
    shard_size: int = Field(100_000, ge=1)  # images (rows, files) per shard


class SweepConfig(Section):
    """The `sweep` deployment (pipelines/sweep.py): how many trials run at once (0: the machine's cores), and how
    long the parent waits for all of them."""

    concurrency: int = Field(0, ge=0)
    timeout_s: float = Field(3600, gt=0)


class MlflowConfig(Section):
    tracking_uri: str
    experiment: str
    ui_url: str = DEFAULT_MLFLOW_UI_URL  # where a browser opens the MLflow UI (links in summaries)
    http_retries: int = Field(3, ge=0)  # retries of a failed request to a tracking server
    # per request (MLflow takes whole seconds); with the retries' back-off, a dead server is reported in about
    # http_retries x http_timeout_s + 7 s
    http_timeout_s: int = Field(10, ge=1)
    # MLflow's system metrics during training (system/cpu_utilization_percentage, ...): a sample every this many
    # seconds; 0 turns them off
    system_metrics_interval_s: float = Field(1.0, ge=0)

    @property
    def is_local_sqlite(self) -> bool:
        return self.tracking_uri.startswith("sqlite:")

    @property
    def artifact_location(self) -> str | None:
        """With the embedded SQLite store, artifacts live beside the database file (mlartifacts/), so every
        process that shares the database (a stage in an experiment worktree, say) shares the artifacts too."""
        if not self.is_local_sqlite:
            return None
        return (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def registered_model(self, impl: str) -> str:
        """One registered model per implementation, e.g. softmax-mlops-scratch."""
        return f"{self.experiment}-{impl}"

    def http_environment(self) -> dict[str, str]:
        """Bound how long a dead tracking server can stall a command. MLflow reads its HTTP client's settings
        only from the environment, and its defaults (7 retries, back-off factor 2, 120 s timeouts) meant minutes
        of silence before the error. Here the back-off factor is 1 (the sleeps are then 1, 2, 4 s...) and the
        retries and timeout come from params.yaml (mlflow.http_*); a value already in the environment wins.
        load() writes nothing: the process that talks to MLflow sets these (cli.configure_process)."""
        wanted = {env: str(getattr(self, field)) for env, field in HTTP_BUDGET_ENV.items()}
        wanted["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        return {env: os.environ.get(env) or value for env, value in wanted.items()}


@dataclass(frozen=True)
class Config:
    root: Path
    paths: Paths
    ingest: IngestConfig
    impls: tuple[str, ...]
    train: TrainConfig
    cpu_kernels: CpuKernelsConfig
    evaluate: EvaluateConfig
    calibrate: CalibrateConfig
    export: ExportConfig
    predict: PredictConfig
    drift: DriftConfig
    serve: ServeConfig
    batch_inference: BatchInferenceConfig
    sweep: SweepConfig
    mlflow: MlflowConfig

    @property
    def mirror(self) -> str:
        """Where ingest downloads from: FASHION_MNIST_MIRROR, else ingest.mirror, else torchvision's mirrors."""
        return self.ingest.mirror


def _section(cls: type[S], raw: dict[str, Any] | None, name: str) -> S:
    """Build a section from params.yaml, with pydantic's findings as one line that names each key."""
    if raw is not None and not isinstance(raw, dict):
        raise PipelineError(f"{PARAMS_FILE}: {name} must be a mapping of keys, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw or {})
    except ValidationError as exc:
        raise PipelineError(f"{PARAMS_FILE}: " + "; ".join(_problems(name, exc.errors()))) from None


def _problems(section: str, errors: list[Any]) -> list[str]:
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden"]
    found = [f"unknown key(s) in '{section}': {', '.join(unknown)}"] if unknown else []
    for error in errors:
        key, ctx, value = ".".join([section, *map(str, error["loc"])]), error.get("ctx") or {}, error.get("input")
        kind = error["type"]
        if kind == "extra_forbidden":
            continue
        if kind in TYPE_NAMES:
            found.append(f"{key} must be {TYPE_NAMES[kind]}, got {value!r}")
        elif kind in BOUNDS:
            symbol, bound = BOUNDS[kind]
            found.append(f"{key} must be {symbol} {ctx[bound]:g}, got {value!r}")
        elif kind == "literal_error":
            choices = str(ctx["expected"]).replace("'", "").replace(" or ", ", ")
            found.append(f"{key} must be one of {choices}, got {value!r}")
        else:  # a model validator's own message names its keys
            found.append(str(error["msg"]).removeprefix("Value error, "))
    return found


def overridden(section: S, name: str, **values: Any) -> S:
    """``section`` with the values that are not None replaced (command-line options), checked as params.yaml is."""
    return _section(type(section), section.model_dump() | {k: v for k, v in values.items() if v is not None}, name)


TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}
BOUNDS = {
    "greater_than_equal": (">=", "ge"),
    "greater_than": (">", "gt"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


EXPERIMENT_COPIES = Path(".dvc") / "tmp" / "exps"


def project_root(root: Path) -> Path:
    """The project a folder belongs to. `dvc exp run --temp` and queued experiments run in a throwaway copy
    under <project>/.dvc/tmp/exps/; what they record (the MLflow store) belongs to the project itself."""
    parts = root.parts
    for i in range(len(parts) - len(EXPERIMENT_COPIES.parts) + 1):
        if Path(*parts[i : i + len(EXPERIMENT_COPIES.parts)]) == EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return root


def resolve_tracking_uri(uri: str, root: Path) -> str:
    """Anchor a relative sqlite path at the project root (of an experiment copy too), so every stage, every
    way of running the pipeline and every test finds the same database."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str((project_root(root) / uri[len(prefix) :]).resolve())
    return uri


HTTP_BUDGET_ENV = {  # MLflow's own settings for its HTTP client; a value already in the environment wins
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "http_retries",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "http_timeout_s",
}


def _ui_url(tracking_uri: str, configured: str | None) -> str:
    """The MLflow UI for links: the environment override, else a tracking server's own address, else params."""
    if override := os.environ.get(UI_URL_ENV):
        return override
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    return configured or DEFAULT_MLFLOW_UI_URL


DEFAULT_PATHS = {"prepared": "data/prepared", "models": "models", "metrics": "metrics", "reports": "reports"}


def _batch_raw(raw: Any) -> Any:
    """batch_inference from params.yaml, with the inbox, output folder and Dask scheduler overridden by the environment
    (a section that is not a mapping is left for _section to refuse)."""
    if raw is not None and not isinstance(raw, dict):
        return raw
    values = dict(raw or {})
    for env, key in ((BATCH_INPUT_ENV, "input"), (BATCH_OUTPUT_ENV, "output_dir"), (DASK_ADDRESS_ENV, "dask_address")):
        if override := os.environ.get(env):
            values[key] = override
    return values


def load(root: str | Path | None = None, missing_ok: bool = False) -> Config:
    """Read ``params.yaml`` from ``root`` (default: the working directory, which is where DVC runs stages).
    With ``missing_ok``, a folder without one gets the built-in defaults (predict and serve with an explicit
    model work from anywhere)."""
    root = Path(root or os.getcwd()).resolve()
    params_path = root / PARAMS_FILE
    try:
        raw = yaml.safe_load(params_path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        if not missing_ok:
            raise PipelineError(f"no {PARAMS_FILE} in {root}: run from the project root") from None
        raw = {"paths": DEFAULT_PATHS}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{params_path} is not valid YAML: {exc}".replace("\n", " ")) from None

    paths_raw = raw.get("paths") or {}
    try:
        paths = Paths(root=root, **{k: root / paths_raw[k] for k in ("prepared", "models", "metrics", "reports")})
    except KeyError as exc:
        raise PipelineError(f"{PARAMS_FILE}: paths.{exc.args[0]} is missing") from None

    impls = tuple(raw.get("impls") or IMPLS)
    if bad := [i for i in impls if i not in IMPLS]:
        raise PipelineError(f"{PARAMS_FILE}: unknown impl(s) {bad}; choose from {', '.join(IMPLS)}")

    ingest_raw = raw.get("ingest") or {}
    mlflow_raw = dict(raw.get("mlflow") or {})
    configured_uri = mlflow_raw.pop("tracking_uri", None)
    tracking_uri = os.environ.get(TRACKING_URI_ENV) or configured_uri or DEFAULT_TRACKING_URI
    mlflow_cfg = _section(
        MlflowConfig,
        {
            **mlflow_raw,
            "tracking_uri": resolve_tracking_uri(tracking_uri, root),
            "experiment": mlflow_raw.get("experiment") or "softmax-mlops",
            "ui_url": _ui_url(tracking_uri, mlflow_raw.get("ui_url")),
        },
        "mlflow",
    )
    return Config(
        root=root,
        paths=paths,
        ingest=_section(
            IngestConfig,
            {**ingest_raw, "mirror": os.environ.get(MIRROR_ENV) or ingest_raw.get("mirror") or ""},
            "ingest",
        ),
        impls=impls,
        train=_section(TrainConfig, raw.get("train"), "train"),
        cpu_kernels=_section(CpuKernelsConfig, raw.get("cpu_kernels"), "cpu_kernels"),
        evaluate=_section(EvaluateConfig, raw.get("evaluate"), "evaluate"),
        calibrate=_section(CalibrateConfig, raw.get("calibrate"), "calibrate"),
        export=_section(ExportConfig, raw.get("export"), "export"),
        predict=_section(PredictConfig, raw.get("predict"), "predict"),
        drift=_section(DriftConfig, raw.get("drift"), "drift"),
        serve=_section(ServeConfig, raw.get("serve"), "serve"),
        batch_inference=_section(BatchInferenceConfig, _batch_raw(raw.get("batch_inference")), "batch_inference"),
        sweep=_section(SweepConfig, raw.get("sweep"), "sweep"),
        mlflow=mlflow_cfg,
    )
