"""The champion gate under concurrency: two challengers deciding at the same moment, in two real processes,
against a real MLflow server and a real Prefect server, must never leave @champion on the worse one.

Without the lock, both read the same weak champion, both find themselves better, and the alias ends on
whichever wrote last: with the lock removed from promote_if_not_worse, this test failed on its first trial
(docs/development.md). With it, Prefect's global concurrency limit lets one decide at a time, and the second
compares itself with the first.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from softmax_mlops.errors import PipelineError
from softmax_mlops.tracking.champion_lock import champion_lock
from stack import Processes, free_port, prefect_api, prefect_call, prefect_env, wait_http

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]

NAME = "race"
LOCK = "champion-gate-test"
TRIALS = 12


# A challenger's export stage, reduced to its decision: a process of its own that promotes each version it is
# sent (one JSON line on stdin) and answers on stdout.
CHALLENGER = """
import json, sys
import mlflow, numpy as np
from softmax_mlops.tracking.champion_lock import champion_lock
from softmax_mlops.tracking.registry import Score, promote_if_not_worse
uri, data, name, lock_name = sys.argv[1:]
client = mlflow.MlflowClient(uri)
with np.load(data) as arrays:
    images, labels = arrays["images"], arrays["labels"]
print("RESULT ready", flush=True)
for line in sys.stdin:
    version, accuracy, nll = json.loads(line)
    try:
        lock = champion_lock(lock_name, timeout_s=120)
        d = promote_if_not_worse(client, name, version, Score(accuracy, nll), 0.0, uri, images, labels, lock)
        print("RESULT " + json.dumps([version, d.promoted, d.reason]), flush=True)
    except Exception as exc:
        print("RESULT " + json.dumps([version, None, repr(exc)]), flush=True)
"""


class Challenger:
    """One challenger process; its answers arrive through a thread, so that every read has a timeout."""

    def __init__(self, env: dict, data: Path, log: Path) -> None:
        args = [env["MLFLOW_TRACKING_URI"], str(data), NAME, LOCK]
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHALLENGER, *args],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.answers.put(line.removeprefix("RESULT ").strip())

    def send(self, version: str, accuracy: float, nll: float) -> None:
        self.proc.stdin.write(json.dumps([version, accuracy, nll]) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float):
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no answer within {timeout:.0f} s: {self.log.name}") from None
        return line if line == "ready" else json.loads(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A Prefect server on a free port of 127.0.0.1: the lock's own tests need no more."""
    root = tmp_path_factory.mktemp("race")
    env = prefect_env(root, root / "prefect-home", free_port())
    with Processes() as procs:
        prefect_port = env["PREFECT_API_URL"].split(":")[-1].split("/")[0]
        server = procs.start(
            "prefect", "server", "start", "--host", "127.0.0.1", "--port", prefect_port, cwd=root, env=env
        )
        wait_http(f"{env['PREFECT_API_URL']}/health", server)
        yield root, env


@pytest.fixture(scope="module")
def registry_server(servers):
    """And an MLflow server (SQLite, local artifacts), for the challengers' registry."""
    root, prefect = servers
    mlflow_port = free_port()
    env = {**prefect, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
    with Processes() as procs:
        cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]
        cmd += ["--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "art")]
        mlflow_server = procs.start(*cmd, cwd=root, env=env)
        wait_http(f"{env['MLFLOW_TRACKING_URI']}/health", mlflow_server)
        yield root, env


@pytest.fixture(scope="module")
def versions(registry_server):
    """Three registered versions scored for real: v_weak < v_worse < v_best on the same images and labels."""
    import mlflow
    import onnx

    from softmax_mlops.serving.inference import Predictor
    from softmax_mlops.stages.export import ExportedSoftmaxRegression, export_onnx
    from softmax_mlops.tracking.registry import score

    root, env = registry_server
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=generator).numpy()
    paths = []
    for i in range(3):
        module = ExportedSoftmaxRegression(
            torch.randn(784, 10, generator=generator), torch.randn(10, generator=generator)
        )
        paths.append(root / f"m{i}.onnx")
        export_onnx(module, paths[-1], opset=18)
    labels = Predictor(paths[0]).run(images)[1].argmax(axis=1)  # model 0 is right on every image
    np.savez(root / "data.npz", images=images, labels=labels)
    scores = [score(Predictor(p), images, labels) for p in paths]
    order = sorted(range(3), key=lambda i: (scores[i].accuracy, -scores[i].nll))  # weak, worse, best
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("race")
    registered = {}
    for role, i in zip(("weak", "worse", "best"), order, strict=True):
        with mlflow.start_run():
            info = mlflow.onnx.log_model(
                onnx.load(str(paths[i])), name="model", registered_model_name=NAME, pip_requirements=["onnxruntime"]
            )
        registered[role] = (str(info.registered_model_version), scores[i])
    assert registered["weak"][1].accuracy < registered["worse"][1].accuracy < registered["best"][1].accuracy
    return registered


@pytest.mark.heavy  # two challenger processes and twelve trials, after three models registered: some 50 s
def test_two_challengers_deciding_at_once_never_leave_the_champion_on_the_worse(registry_server, versions):
    import mlflow

    root, env = registry_server
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    children = [Challenger(env, root / "data.npz", root / f"challenger-{i}.log") for i in range(2)]
    try:
        assert [child.answer(timeout=300) for child in children] == ["ready", "ready"]
        order_seen = set()
        for trial in range(TRIALS):
            client.set_registered_model_alias(NAME, "champion", versions["weak"][0])
            # the two challengers swap processes every trial, so neither is always the quicker
            pair = ("worse", "best") if trial % 2 else ("best", "worse")
            for child, role in zip(children, pair, strict=True):
                version, s = versions[role]
                child.send(version, s.accuracy, s.nll)
            outcome = [child.answer(timeout=180) for child in children]
            assert all(promoted is not None for _, promoted, _ in outcome), outcome
            champion = client.get_model_version_by_alias(NAME, "champion").version
            assert str(champion) == versions["best"][0], (trial, outcome)
            # which one decided first (against the weak champion): both orders must occur, or they never raced
            order_seen.add(next(v for v, _, reason in outcome if f"champion v{versions['weak'][0]} " in reason))
        assert len(order_seen) == 2, "one challenger always decided first: the two never raced"
    finally:
        for child in children:
            child.stop()


def prefect_limit(env: dict, name: str):
    async def read(client):
        return await client.read_global_concurrency_limit_by_name(name)

    return prefect_call(env, read)


@pytest.mark.heavy  # the module's Prefect server: some 10 s of CPU to start, migrate and stop
def test_the_lock_is_created_with_one_slot_and_a_wider_limit_is_refused(servers):
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    _, env = servers
    with prefect_api(env["PREFECT_API_URL"]), champion_lock("made-here", timeout_s=30):
        held = prefect_limit(env, "made-here")
        assert held.limit == 1 and held.active_slots == 1  # taken while the block runs
    assert prefect_limit(env, "made-here").active_slots == 0

    async def create(client):
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="too-wide", limit=2))

    prefect_call(env, create)
    with prefect_api(env["PREFECT_API_URL"]), pytest.raises(PipelineError) as refused, champion_lock("too-wide", 30):
        pytest.fail("a two-slot limit is not a lock")
    assert str(refused.value) == (
        f"the Prefect concurrency limit 'too-wide' at {env['PREFECT_API_URL']} has 2 slot(s): "
        "the champion lock needs one active slot"
    )


@pytest.mark.heavy  # the module's Prefect server: some 10 s of CPU to start, migrate and stop
def test_a_lock_held_elsewhere_times_out_in_one_line(servers):
    _, env = servers
    with (
        prefect_api(env["PREFECT_API_URL"]),
        champion_lock("held", timeout_s=30),
        pytest.raises(PipelineError) as waited,
        champion_lock("held", 2),
    ):
        pytest.fail("the slot is taken")
    assert str(waited.value) == f"the champion lock 'held' at {env['PREFECT_API_URL']} stayed taken for 2 s"


def test_a_dead_prefect_api_fails_the_decision_in_one_line_naming_it():
    import prefect.settings

    url = f"http://127.0.0.1:{free_port()}/api"
    with (
        prefect_api(url, {prefect.settings.PREFECT_CLIENT_MAX_RETRIES: 1}),
        pytest.raises(PipelineError) as failed,
        champion_lock("champion-gate", timeout_s=5),
    ):
        pytest.fail("no API, no lock")
    assert str(failed.value).startswith(f"cannot reach the champion lock 'champion-gate' at {url}: ")
    assert "\n" not in str(failed.value)


@pytest.mark.heavy  # Prefect's test harness: a server of its own (10 s), unless test_flows.py started it first
def test_a_lock_taken_on_another_server_leaves_this_process_flows_recorded(servers, prefect_harness):
    """Taking the lock on another server starts Prefect's per-process events worker with that server's URL.
    Unless prefect_api stops it on the way out, every later flow of this process sends its events, and with them
    its task runs, to the other server: the session harness then records no task run (the CI failure of
    test_flows.py when this module ran first)."""
    import asyncio

    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, env = servers
    with prefect_api(env["PREFECT_API_URL"]), champion_lock("elsewhere", timeout_s=30):
        pass

    @task(name="recorded-task")
    def recorded() -> int:
        return 1

    @flow(name="after-the-lock")
    def after_the_lock() -> int:
        return recorded()

    state = after_the_lock(return_state=True)
    assert state.is_completed()

    async def task_names() -> list[str]:
        names: list[str] = []
        async with get_client() as client:
            for _ in range(60):  # task runs are recorded from their events, after the flow returns: poll, bounded
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                names = [r.name for r in runs]
                if names:
                    break
                await asyncio.sleep(0.5)
        return names

    assert [name.split("-")[0] for name in asyncio.run(task_names())] == ["recorded"]
