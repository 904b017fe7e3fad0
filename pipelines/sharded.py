"""Sharded batch inference on Dask, through Prefect: one task per shard (softmax_mlops.serving.shards), run by
prefect-dask's DaskTaskRunner on a temporary local cluster or on an existing `dask scheduler`.

Each worker process loads the model once and keeps its onnxruntime session (``_predictor``): sessions never
travel, only the job, the shard and the model's name do. A worker that dies takes its running task with it;
Dask gives that task to another worker, and Prefect retries a task that failed. Either way a shard is written
once: its part is atomic, and a finished shard (its marker exists) is not predicted again.

On Kubernetes the same flow takes the address of a scheduler that dask-kubernetes started from
deploy/kubernetes/dask/daskcluster.yaml (``batch_inference.dask_address``); that manifest is validated against
the operator's CRD, not run here (docs/beyond.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from softmax_mlops import config
from softmax_mlops.errors import PipelineError, first_line
from softmax_mlops.serving import shards
from softmax_mlops.serving.inference import Predictor, available_cpus, is_mlflow_uri, registered_version, resolve_model

if TYPE_CHECKING:
    from prefect.states import State
    from prefect_dask import DaskTaskRunner

_PREDICTORS: dict[tuple[str, str, int | None], Predictor] = {}


def _predictor(model: str, tracking_uri: str, threads: int | None) -> Predictor:
    """This worker process's predictor for ``model``, loaded on first use and kept for the next shards."""
    key = (model, tracking_uri, threads)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = Predictor(resolve_model(model, tracking_uri), threads, source=model)
    return _PREDICTORS[key]


def _retried(task: object, task_run: object, state: State) -> bool:
    """Retry a shard that failed for a passing reason (a worker's resources, the registry), not one whose input
    is bad: a corrupt file fails the same way every time."""
    try:
        state.result()
    except PipelineError:
        return False
    except Exception:  # noqa: BLE001 - anything else may pass
        return True
    return True


@task(
    name="predict-shard",
    task_run_name="shard-{shard.index}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=_retried,
    cache_policy=NO_CACHE,
)
def predict_shard(job: shards.Job, shard: shards.Shard, tracking_uri: str, threads: int | None) -> shards.Part:
    return shards.predict_shard(job, shard, _predictor(job.model, tracking_uri, threads))


@flow(name="sharded-predict", log_prints=True)
def sharded_predict(
    job: shards.Job, pending: list[shards.Shard], tracking_uri: str, threads: int | None
) -> list[shards.Part]:
    """Every pending shard as a task on the flow's Dask cluster; the parts, in shard order. Every shard runs to
    its end: a bad one fails the run with one line per bad shard, and the good ones keep their parts, so that
    the rerun after a fix predicts only the shards that failed."""
    futures = predict_shard.map(unmapped(job), pending, unmapped(tracking_uri), unmapped(threads))
    wait(futures)
    parts, failures = [], []
    for shard, future in zip(pending, futures, strict=True):
        outcome = future.state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            failures.append(f"shard {shard.index}: {first_line(outcome)}")
            print(f"failed: {failures[-1]}")
        else:
            parts.append(outcome)
    if failures:
        shown = "; ".join(failures[:3]) + ("; ..." if len(failures) > 3 else "")
        raise PipelineError(
            f"{len(failures)} of {len(pending)} shards failed ({shown}); the {len(parts)} finished parts are kept "
            f"in {job.output}, and a rerun predicts only the others"
        )
    return parts


def _api_for_workers() -> dict[str, str]:
    """The Prefect API the local cluster's workers report to: the configured one, or this
    process's ephemeral server, started now if need be. Without it, each worker process would start an
    ephemeral server of its own: some 10 s and one more server process per worker."""
    from prefect.settings import PREFECT_API_URL

    if api := PREFECT_API_URL.value():  # from the environment, a profile, or a settings context (a test harness)
        return {"PREFECT_API_URL": api}
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one ephemeral mode uses (one per process)
    server.start()
    return {"PREFECT_API_URL": server.api_url}


def task_runner(workers: int, address: str | None) -> DaskTaskRunner:
    """An existing scheduler when ``address`` is set (its workers need PREFECT_API_URL themselves), else a
    temporary local cluster of ``workers`` processes with one task at a time each (onnxruntime's threads use
    the cores)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
            "env": _api_for_workers(),
        }
    )


def pinned(model: str, tracking_uri: str) -> str:
    """The model every worker must load: a registry alias (models:/name@champion) becomes the version it points
    to now, so that an alias moved mid-run cannot mix two models in one output."""
    if not is_mlflow_uri(model) or "@" not in model:
        return model
    version = registered_version(model, tracking_uri)
    return f"{model.split('@', 1)[0]}/{version}" if version else model


def run(
    cfg: config.Config,
    input_ref: str,
    output_ref: str,
    model: str,
    *,
    batch_size: int,
    top_k: int,
    fmt: str | None = None,
    skip_bad: bool = False,
    all_probabilities: bool = False,
    workers: int = 0,
    address: str | None = None,
    shard_size: int | None = None,
) -> dict:
    """Predict ``input_ref`` into the folder ``output_ref`` in shards of ``shard_size`` images (default:
    batch_inference.shard_size); the manifest. Either may be an s3:// URL, which each worker reads or writes
    itself. A rerun into the same folder predicts only the shards that did not finish."""
    tracking_uri = cfg.mlflow.tracking_uri
    model = pinned(model, tracking_uri)
    local = Predictor(resolve_model(model, tracking_uri), source=model)
    job, reference = shards.new_job(
        input_ref, output_ref, local, model, batch_size, top_k, fmt, skip_bad, all_probabilities, cfg.drift
    )
    plan = shards.plan(job.input, shard_size or cfg.batch_inference.shard_size)
    done = {part.shard for part in shards.start(job, plan)}
    pending = [shard for shard in plan if shard.index not in done]
    workers = workers or max(1, cfg.batch_inference.workers)
    if pending:
        threads = None if address else max(1, available_cpus() // workers)
        print(f"{len(pending)} of {len(plan)} shards to predict on {address or f'{workers} local Dask workers'}")
        runner = task_runner(workers, address)
        sharded_predict.with_options(task_runner=runner)(job, pending, tracking_uri, threads)  # type: ignore[arg-type]
    return shards.finish(job, plan, reference, cfg.drift)
