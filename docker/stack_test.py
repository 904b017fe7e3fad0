"""The compose stack, tested as containers: `make stack-test` (Docker Compose, or podman with podman-compose).

It builds the images, runs docker/compose.yaml, waits for every service's own healthcheck, runs both Prefect
deployments on the Docker work pool (each flow run a fresh container, state only in the object store), runs
the training deployment again to show that a stage that ran in one container is a cache hit in the next,
checks MLflow, inference and both UIs, restarts the stack and checks that nothing was lost, then removes
everything it made (containers, volumes, networks, the images it built). Each step is timed.

With podman (no Docker engine; CI), images that cannot be pulled here are replaced through documented
overrides only: a local Debian base made with debootstrap (BASE_IMAGE), PyPI's torch (TORCH_INDEX_URL), and a
PostgreSQL stand-in built from Debian's package (docker/standins/compose.yaml); the Docker work pool's worker
gets podman's Docker API (`podman system service`, started and stopped here). With Docker, compose.yaml
runs as users run it. Every wait is bounded (--timeout); the first failure ends the test with one line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
PROJECT = "softmax-mlops"
SERVICES = ("postgres", "mlflow", "prefect-server", "prefect-worker", "inference", "prometheus")
BUILT_BY = ("prefect-worker", "inference")  # the services whose builds make the stack's images
STANDINS_BUILT_BY = ("postgres", "objectstore", "prometheus")
IMAGES = ("softmax-mlops-pipeline:latest", "softmax-mlops-serve:latest")
STANDIN_IMAGES = (
    "localhost/softmax-mlops-postgres-standin:latest",
    "localhost/softmax-mlops-objectstore-standin:latest",
    "localhost/softmax-mlops-prometheus-standin:latest",
)
MLFLOW, PREFECT, INFERENCE = "http://127.0.0.1:5000", "http://127.0.0.1:4200", "http://127.0.0.1:8000"
OBJECTSTORE, PROMETHEUS = "http://127.0.0.1:8333", "http://127.0.0.1:9090"
SERVED_REQUESTS = 'sum(softmax_mlops_requests_total{route="/predict", status="200"})'
SERVED_IMAGES = "sum(softmax_mlops_predictions_total)"
MODELS = ("softmax-mlops-scratch", "softmax-mlops-concise")
RUN_LABEL = "io.prefect.flow-run-id"  # prefect-docker's label on each flow-run container
NOTHING_RAN = "0 of 10 stages ran: none"  # the training flow's log line (pipelines/flows.py)
DEPLOYMENTS = ("weekly-retrain", "nightly-batch-inference", "sweep", "sweep-trial")  # prefect.yaml's
BATCH_IMAGES = 300  # test images put in the batch-inference inbox
SWEEP = [["train.epochs=2"], ["train.lr=0.2"], ["train.lr=0.05", "train.epochs=3"]]  # 3 sets, 2 at once


class StackFailed(RuntimeError):
    """A check failed; the message is the one line the test ends with."""


def log(message: str) -> None:
    print(f"[stack-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Engine:
    """The container engine and its compose front end, with the files and environment this run uses."""

    def __init__(self, name: str, standins: bool, mirror: Path | None, workdir: Path) -> None:
        self.name = name
        self.env = dict(os.environ)
        files = [DOCKER / "compose.yaml"]
        if standins:
            files.append(DOCKER / "standins" / "compose.yaml")
        if mirror:
            files.append(DOCKER / "compose.mirror.yaml")
            self.env["FASHION_MNIST_MIRROR"] = str(mirror)
        if name == "podman":
            if "CONTAINERS_CONF" not in self.env:  # runc and ulimits the sandboxes here allow
                conf = workdir / "containers.conf"
                conf.write_text(
                    '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
                    '[engine]\nruntime = "runc"\n[network]\nnetwork_backend = "netavark"\n'
                )
                self.env["CONTAINERS_CONF"] = str(conf)
            self.env["BUILDAH_FORMAT"] = "docker"  # keep HEALTHCHECK in the images (OCI format drops it)
            self.socket = workdir / "podman.sock"
            compose = shutil.which("podman-compose", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            if not compose:
                raise StackFailed("podman-compose is not installed: pip install -e '.[dev]' (make setup) has it")
            self.compose_cmd = [compose]
        else:
            self.compose_cmd = ["docker", "compose"]
            self.socket = Path(self.env.get("DOCKER_SOCKET", "/var/run/docker.sock"))
        self.service: subprocess.Popen | None = None
        self.compose_cmd += ["-p", PROJECT, *(a for f in files for a in ("-f", str(f)))]

    def run(
        self,
        *args: str,
        check: bool = True,
        capture: bool = True,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            args,
            env=self.env,
            cwd=ROOT,
            input=stdin,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
        if check and proc.returncode != 0:
            tail = (proc.stdout or b"").decode(errors="replace").strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise StackFailed(f"`{' '.join(args[:6])} ...` exited {proc.returncode}")
        return proc

    def start_api(self, timeout: float) -> None:
        """The Docker API that the Docker work pool's worker gets as its socket. Under podman, `podman system
        service` serves it, with this run's CONTAINERS_CONF (the flow-run containers need its runc and ulimits);
        its socket is made group-accessible so that the worker (uid 10001, in the socket's group) can use it."""
        if self.name == "podman":
            log(f"podman system service on {self.socket}")
            self.service = subprocess.Popen(
                ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_until(f"podman's API socket {self.socket}", self.socket.exists, timeout, every=0.5)
            self.socket.chmod(0o660)
        elif not self.socket.exists():
            raise StackFailed(f"the Docker socket {self.socket} does not exist (set DOCKER_SOCKET)")
        self.env["DOCKER_SOCKET"] = str(self.socket)
        self.env["DOCKER_SOCKET_GID"] = str(self.socket.stat().st_gid)

    def stop_api(self) -> None:
        if self.service is not None:
            self.service.terminate()
            try:
                self.service.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()

    def flow_containers(self) -> list[str]:
        """The flow-run containers that are left (any state), as '<name> <run id>' lines."""
        ids = self.run(self.name, "ps", "-a", "-q", "--filter", f"label={RUN_LABEL}").stdout.decode().split()
        if not ids:
            return []
        fmt = f'{{{{.Name}}}} {{{{index .Config.Labels "{RUN_LABEL}"}}}}'
        out = self.run(self.name, "inspect", "--format", fmt, *ids, check=False).stdout.decode()
        return [line.strip() for line in out.splitlines() if line.strip()]

    def storage(self) -> Path:
        """Where the engine keeps its images and containers: the disk the build's multi-GB layers land on."""
        fmt = "{{.Store.GraphRoot}}" if self.name == "podman" else "{{.DockerRootDir}}"
        return Path(self.run(self.name, "info", "--format", fmt).stdout.decode().strip())

    def disk(self) -> str:
        """Free space on the engine's storage, and the size of each image this test builds that exists."""
        root = self.storage()
        sizes = []
        for image in IMAGES:
            out = self.run(self.name, "image", "inspect", "--format", "{{.Size}}", image, check=False)
            if out.returncode == 0:
                sizes.append(f"{image} {int(out.stdout.decode().split()[0]) / 1e9:.2f} GB")
        free = shutil.disk_usage(root).free / 1e9
        return f"{root}: {free:.1f} GB free" + (f"; {', '.join(sizes)}" if sizes else "")

    def compose(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(*self.compose_cmd, *args, **kwargs)

    def container(self, service: str) -> str:
        out = (
            self.run(
                self.name,
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            )
            .stdout.decode()
            .split()
        )
        if not out:
            raise StackFailed(f"no running container for service {service}")
        return out[0]

    def exec(self, service: str, *cmd: str, stdin: bytes | None = None) -> str:
        args = [self.name, "exec"] + (["-i"] if stdin is not None else []) + [self.container(service), *cmd]
        return self.run(*args, stdin=stdin).stdout.decode()

    def dangling(self) -> set[str]:
        return set(self.run(self.name, "images", "-q", "--filter", "dangling=true").stdout.decode().split())

    def exit_code(self, service: str) -> int | None:
        """The exit code of a one-shot service's container once it has exited, else None."""
        listed = self.run(
            self.name,
            "ps",
            "-a",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={PROJECT}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--filter",
            "status=exited",
        )
        ids = listed.stdout.decode().split()
        if not ids:
            return None
        return int(self.run(self.name, "inspect", "--format", "{{.State.ExitCode}}", ids[0]).stdout.decode().strip())

    def healthy(self, service: str) -> bool:
        """The service's own HEALTHCHECK from compose.yaml. Docker runs it on its schedule; podman 4.3 without
        systemd never schedules it, so run it on demand (`podman healthcheck run`), which is the same check."""
        try:
            cid = self.container(service)
        except StackFailed:
            return False
        if self.name == "podman":
            return self.run("podman", "healthcheck", "run", cid, check=False).returncode == 0
        status = self.run("docker", "inspect", "--format", "{{.State.Health.Status}}", cid, check=False)
        return status.stdout.decode().strip() == "healthy"


def detect_engine(requested: str) -> str:
    if requested != "auto":
        return requested
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return "docker"
    if shutil.which("podman"):
        return "podman"
    raise StackFailed("neither a running Docker engine nor podman was found")


def local_base(engine: Engine, workdir: Path) -> str:
    """A Debian base image made with debootstrap from this machine's apt mirror (docker.io is unreachable)."""
    suite = next(
        line.split("=", 1)[1].strip()
        for line in Path("/etc/os-release").read_text().splitlines()
        if line.startswith("VERSION_CODENAME=")
    )
    image = f"localhost/softmax-mlops-base:{suite}"
    if engine.run("podman", "image", "exists", image, check=False).returncode == 0:
        return image
    mirror = "http://deb.debian.org/debian"
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if source.is_file():
            for line in source.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] or (words[:1] == ["deb"] and len(words) > 1):
                    mirror = words[1]
                    break
            break
    rootfs = workdir / "rootfs"
    log(f"debootstrap --variant=minbase {suite} from {mirror}")
    engine.run("debootstrap", "--variant=minbase", suite, str(rootfs), mirror)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    engine.run("podman", "import", "-", image, stdin=tar.stdout.read())
    tar.wait()
    shutil.rmtree(rootfs)
    return image


def http(
    url: str, body: dict | None = None, timeout: float = 30, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    sent = {**({"content-type": "application/json"} if data else {}), **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(what: str, predicate, timeout: float, every: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise StackFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_healthy(engine: Engine, services: tuple[str, ...], timeout: float) -> None:
    pending = list(services)

    def check() -> bool:
        pending[:] = [s for s in pending if not engine.healthy(s)]
        return not pending

    wait_until(f"healthy services ({', '.join(pending)})", check, timeout, every=5)


def test_images(mirror: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The genuine Fashion-MNIST test set, read from the mirror folder (or the official download)."""
    names = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if mirror:
        raw = [(mirror / name).read_bytes() for name in names]
    else:
        base = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
        raw = [urllib.request.urlopen(base + name, timeout=60).read() for name in names]
    images = np.frombuffer(gzip.decompress(raw[0]), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress(raw[1]), np.uint8, offset=8).astype(np.int64)
    return images, labels


def stack_secrets(workdir: Path) -> dict[str, str]:
    """Fresh credentials for this run, in the variables docker/.env.example names: none is compose.yaml's default,
    so a service that ignored its variable would lock its clients out, and each value is random enough that
    finding it anywhere (check_no_secret_leaked) means it leaked. The serve token goes in a file, as a compose
    secret; readable by the containers' users (10001 and 65534), as Docker mounts it with the host file's mode."""
    token = secrets.token_hex(24)
    token_file = workdir / "serve-token"
    token_file.write_text(f"{token}\n")
    token_file.chmod(0o644)
    return {
        "POSTGRES_PASSWORD": secrets.token_hex(12),
        "OBJECTSTORE_ACCESS_KEY": f"stack-{secrets.token_hex(4)}",
        "OBJECTSTORE_SECRET_KEY": secrets.token_hex(20),
        "MLFLOW_ADMIN_USERNAME": "admin",
        "MLFLOW_ADMIN_PASSWORD": secrets.token_hex(12),
        "MLFLOW_FLASK_SECRET_KEY": secrets.token_hex(24),
        "PREFECT_AUTH_STRING": f"admin:{secrets.token_hex(12)}",
        "SERVE_TOKEN_FILE": str(token_file),
    }


def secret_values(env: dict[str, str]) -> dict[str, str]:
    """What must never be written anywhere, by name: each secret, and the Basic credentials that carry two of
    them (a logged Authorization header would show those)."""
    mlflow_login = f"{env['MLFLOW_ADMIN_USERNAME']}:{env['MLFLOW_ADMIN_PASSWORD']}"
    return {
        "POSTGRES_PASSWORD": env["POSTGRES_PASSWORD"],
        "OBJECTSTORE_SECRET_KEY": env["OBJECTSTORE_SECRET_KEY"],
        "MLFLOW_ADMIN_PASSWORD": env["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SECRET_KEY": env["MLFLOW_FLASK_SECRET_KEY"],
        "PREFECT_AUTH_STRING": env["PREFECT_AUTH_STRING"].split(":", 1)[1],
        "the serve token": serve_token(),
        "MLflow's Basic credentials": base64.b64encode(mlflow_login.encode()).decode(),
        "Prefect's Basic credentials": base64.b64encode(env["PREFECT_AUTH_STRING"].encode()).decode(),
    }


def serve_token() -> str:
    return Path(os.environ["SERVE_TOKEN_FILE"]).read_text().splitlines()[0]


def basic(login: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def check_refusals(what: str, url: str, body: dict | None, right: dict[str, str], wrong: dict[str, str]) -> str:
    """No credentials and wrong ones are refused (401, or 403 where the service says so), the right ones are
    answered; returns what was seen, for the log."""
    seen = {name: http(url, body, headers=headers)[0] for name, headers in (("none", {}), ("wrong", wrong))}
    status, answer = http(url, body, headers=right)
    if any(code not in (401, 403) for code in seen.values()) or status != 200:
        raise StackFailed(f"{what}: {url} answered {seen} without or with wrong credentials, {status} with the right "
                          f"ones: {answer[:200]!r}")  # fmt: skip
    return f"{what}: none {seen['none']}, wrong {seen['wrong']}, right {status}"


def check_log_in(env: dict[str, str]) -> None:
    """Every shared service refuses a client without credentials or with wrong ones, and answers the right ones;
    its health route stays open for probes."""
    import botocore.exceptions

    said = [
        check_refusals(
            "MLflow", f"{MLFLOW}/api/2.0/mlflow/experiments/search?max_results=1", None,
            basic(f"{env['MLFLOW_ADMIN_USERNAME']}:{env['MLFLOW_ADMIN_PASSWORD']}"),
            basic(f"{env['MLFLOW_ADMIN_USERNAME']}:not-the-password"),
        ),
        check_refusals(
            "MLflow's artifact proxy", f"{MLFLOW}/api/2.0/mlflow-artifacts/artifacts", None,
            basic(f"{env['MLFLOW_ADMIN_USERNAME']}:{env['MLFLOW_ADMIN_PASSWORD']}"), basic("admin:wrong"),
        ),
        check_refusals(
            "Prefect", f"{PREFECT}/api/deployments/filter", {}, basic(env["PREFECT_AUTH_STRING"]),
            basic("admin:not-the-auth-string"),
        ),
    ]  # fmt: skip
    for url in (f"{MLFLOW}/health", f"{PREFECT}/api/health"):
        if (status := http(url)[0]) != 200:
            raise StackFailed(f"the health route {url} answered {status} without credentials")
    unsigned = http(f"{OBJECTSTORE}/dvc?list-type=2")[0]
    try:
        s3_client(secret=f"{env['OBJECTSTORE_SECRET_KEY']}x").list_objects_v2(Bucket="dvc")
        wrong: object = 200
    except botocore.exceptions.ClientError as exc:
        wrong = exc.response["Error"]["Code"]
    s3_client().list_objects_v2(Bucket="dvc")
    if unsigned != 403 or wrong != "SignatureDoesNotMatch":
        raise StackFailed(f"the object store answered {unsigned} unsigned and {wrong} with a wrong secret")
    said.append(f"object store: unsigned {unsigned}, wrong secret {wrong}, right keys listed s3://dvc")
    log("log-in: " + "; ".join(said))


@contextlib.contextmanager
def prefect_client_env(workdir: Path) -> Iterator[None]:
    """Talk to the stack's Prefect server from here, with a throwaway PREFECT_HOME and the stack's auth string."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_API_AUTH_STRING")}
    os.environ.update(
        PREFECT_API_URL=f"{PREFECT}/api",
        PREFECT_HOME=str(workdir / "prefect-home"),
        PREFECT_API_AUTH_STRING=os.environ["PREFECT_AUTH_STRING"],
    )
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def run_deployment(name: str, timeout: float, parameters: dict | None = None) -> str:
    """Trigger a deployment, wait (bounded) for it to complete; returns the flow run's id."""
    from prefect.deployments import run_deployment as trigger

    flow_run = trigger(name, timeout=timeout, parameters=parameters)
    state = flow_run.state
    if state is None or not state.is_final():
        raise StackFailed(f"{name}: not finished after {timeout:.0f} s (state {state.name if state else None})")
    if state.name != "Completed":
        raise StackFailed(f"{name}: flow run {flow_run.id} ended {state.name}: {state.message}")
    return str(flow_run.id)


def flow_run_log(run_id: str) -> str:
    """The flow run's log lines, as the Prefect server holds them (sent from inside its container)."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)])))
    return "\n".join(entry.message for entry in logs)


def dvc_times(run_id: str) -> str:
    """Where a training run's time went, from its task runs: the stage tasks (each `dvc repro --pull`: the pull
    of what the stage needs, the check, and the command if it ran) and the `dvc-push` task."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow = client.read_flow_run(uuid.UUID(run_id))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(run_id)])))
    push = sum(t.total_run_time.total_seconds() for t in tasks if t.name == "dvc-push")
    stages = sum(t.total_run_time.total_seconds() for t in tasks if t.name != "dvc-push")
    return (
        f"{len(tasks) - 1} stage tasks {stages:.1f} s (with --pull), dvc push {push:.1f} s, "
        f"of the flow run's {flow.total_run_time.total_seconds():.1f} s"
    )


def check_sweep(run_id: str) -> list[str]:
    """The sweep's leaderboard names every set, each trial completed and logged both implementations to MLflow
    with its artifacts in the bucket, and @champion is on the best version ever registered. Returns the trials'
    flow-run ids."""
    import uuid

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        (board,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["sweep-leaderboard"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run_id)]),
            )
        )
        trials = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(run_id)]))
        )
    text = str(board.data)
    if missing := [s for s in SWEEP if f"| {', '.join(f'`{o}`' for o in s)} | Completed |" not in text]:
        raise StackFailed(f"the sweep's leaderboard lacks completed rows for {missing}: {text}")
    if len(trials) != len(SWEEP) or any(t.state_name != "Completed" for t in trials):
        raise StackFailed(f"the sweep's trials: {[(t.name, t.state_name) for t in trials]}")
    mlflow = MlflowClient(tracking_uri=MLFLOW)
    experiment = mlflow.get_experiment_by_name(PROJECT)
    keys = s3_keys("mlflow", "artifacts/")  # the runs' own artifacts: artifacts/<experiment>/<run id>/...
    for trial in trials:
        runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.prefect_flow_run_id = '{trial.id}'")
        if sorted(r.data.params.get("impl", "") for r in runs) != ["concise", "scratch"]:
            raise StackFailed(f"trial {trial.name}: MLflow runs {[r.info.run_id for r in runs]}")
        for run in runs:
            if not any(f"/{run.info.run_id}/" in key for key in keys):
                raise StackFailed(f"trial {trial.name}: no artifact of MLflow run {run.info.run_id} in s3://mlflow")
    versions = mlflow.search_model_versions(f"name = '{MODELS[0]}'")
    champion = mlflow.get_model_version_by_alias(MODELS[0], "champion")
    best = max(float(v.tags["test_accuracy"]) for v in versions)
    if float(champion.tags["test_accuracy"]) != best:
        raise StackFailed(f"@champion is v{champion.version} ({champion.tags['test_accuracy']}), not the best ({best})")
    log(f"sweep: {len(trials)} trials completed; @champion v{champion.version} is the best of {len(versions)} ({best})")
    return [str(t.id) for t in trials]


def check_fresh_clone(workdir: Path) -> None:
    """A fresh clone on the host, with the stack's object store as its DVC remote: `dvc pull` brings the outputs
    of the committed dvc.lock, `dvc status` is clean, and the champion's ONNX file is there."""
    clone = workdir / "clone"
    dvc = str(Path(sys.executable).parent / "dvc")
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=os.environ["OBJECTSTORE_ACCESS_KEY"],
        AWS_SECRET_ACCESS_KEY=os.environ["OBJECTSTORE_SECRET_KEY"],
    )

    def run(*cmd: str) -> subprocess.CompletedProcess:
        where = clone if clone.exists() else workdir
        return subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True, timeout=600)

    for step in (
        ("git", "clone", "-q", str(ROOT), str(clone)),
        (dvc, "remote", "add", "--local", "-d", "store", "s3://dvc/cache"),
        (dvc, "remote", "modify", "--local", "store", "endpointurl", OBJECTSTORE),
        (dvc, "pull"),
    ):
        if (done := run(*step)).returncode != 0:
            raise StackFailed(
                f"fresh clone: `{' '.join(step[:4])}` exited {done.returncode}: {done.stderr.strip()[-300:]}"
            )
    status = run(dvc, "status", "--json")
    if status.stdout.strip() != "{}":
        raise StackFailed(f"fresh clone: dvc status is not clean after dvc pull: {status.stdout[:300]}")
    onnx = clone / "models" / "scratch" / "model.onnx"
    if not onnx.is_file():
        raise StackFailed(f"fresh clone: {onnx} was not pulled")
    log(f"fresh clone: dvc pull from the store, dvc status clean, {onnx.relative_to(clone)}: {onnx.stat().st_size} B")


def check_own_containers(engine: Engine, run_ids: list[str], timeout: float) -> None:
    """Each flow run ran in a container of its own, and that container was removed once Prefect held its final
    state (docker/reaper.py says so in the worker's log); no flow-run container is left behind."""

    def reaped() -> bool:
        worker_log = engine.compose("logs", "prefect-worker").stdout.decode(errors="replace")
        return all(f"of flow run {run_id} (Completed)" in worker_log for run_id in run_ids)

    wait_until(f"the reaper to remove the containers of flow runs {run_ids}", reaped, timeout)
    if left := engine.flow_containers():
        raise StackFailed(f"flow-run containers left behind: {left}")
    log(f"{len(run_ids)} flow runs, each in its own container, each removed after its final state")


def mlflow_state() -> dict:
    """Runs, registered models and @champion, read through MLflow's own client from the host."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=MLFLOW)
    experiment = client.get_experiment_by_name(PROJECT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    models = {m.name for m in client.search_registered_models()}
    champion = client.get_model_version_by_alias(MODELS[0], "champion") if MODELS[0] in models else None
    accuracy = client.get_run(champion.run_id).data.metrics.get("test_accuracy") if champion else None
    return {
        "runs": sorted(r.info.run_id for r in runs),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "models": sorted(models),
        "champion": champion.version if champion else None,
        "accuracy": accuracy,
    }


def promql(query: str) -> float:
    """An instant query through Prometheus' HTTP API: the one value of its result, 0 when it has none (a counter
    that no request has touched yet)."""
    status, body = http(f"{PROMETHEUS}/api/v1/query?{urllib.parse.urlencode({'query': query})}")
    if status != 200:
        raise StackFailed(f"Prometheus answered {status} to {query!r}: {body[:200]!r}")
    result = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def served_accuracy(images: np.ndarray, labels: np.ndarray, batch: int = 200) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        instances = {"instances": images[start : start + batch].tolist()}
        status, body = http(f"{INFERENCE}/predict", instances, 60, {"authorization": f"Bearer {serve_token()}"})
        if status != 200:
            raise StackFailed(f"POST {INFERENCE}/predict answered {status}: {body[:200]!r}")
        predicted = [p["class_id"] for p in json.loads(body)["predictions"]]
        correct += int(np.sum(np.array(predicted) == labels[start : start + batch]))
    return correct / len(images)


def s3_client(secret: str | None = None):
    """The stack's object store from the host, through the published S3 port, with the stack's keys (or another
    secret, to be refused)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=OBJECTSTORE,
        region_name="us-east-1",
        aws_access_key_id=os.environ["OBJECTSTORE_ACCESS_KEY"],
        aws_secret_access_key=secret or os.environ["OBJECTSTORE_SECRET_KEY"],
    )


def s3_keys(bucket: str, prefix: str) -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def feed_inbox(images: np.ndarray, labels: np.ndarray) -> None:
    """Real test images as PNGs in the batch-inference inbox, s3://batch/incoming/, as docs/operations.md says."""
    from PIL import Image

    s3 = s3_client()
    for i in range(BATCH_IMAGES):
        png = io.BytesIO()
        Image.fromarray(images[i]).save(png, format="PNG")
        s3.put_object(Bucket="batch", Key=f"incoming/{i:05d}_label{labels[i]}.png", Body=png.getvalue())


def object_store() -> dict[str, int]:
    """Objects in the stack's buckets: DVC's files and run-cache entries, and MLflow's artifacts (ONNX models
    among them)."""
    artifacts = s3_keys("mlflow", "artifacts/")
    return {
        "dvc files": len(s3_keys("dvc", "cache/files/")),
        "dvc run-cache": len(s3_keys("dvc", "cache/runs/")),
        "mlflow artifacts": len(artifacts),
        "onnx models": sum(key.endswith(".onnx") for key in artifacts),
    }


def check_links(engine: Engine) -> None:
    """Links that people open point at the published UIs, not at in-network names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-metrics"]))
        )
    if not artifacts or f"]({MLFLOW}/#/experiments/" not in str(artifacts[0].data):
        raise StackFailed(f"the training-metrics artifact does not link to {MLFLOW}: {artifacts[:1]}")
    worker_log = engine.compose("logs", "prefect-worker").stdout.decode(errors="replace")
    if f"{PREFECT}/runs/" not in worker_log or "http://prefect-server:4200/runs" in worker_log:
        raise StackFailed(f"the worker's 'View at' links do not use {PREFECT}")
    log(f"links: run summary -> {MLFLOW}, worker log -> {PREFECT}")


def check_no_secret_leaked(engine: Engine, env: dict[str, str]) -> None:
    """No secret of the stack is written where people and tools read: the services' logs (the worker's holds
    each flow-run container's output), the flow runs' logs, parameters and artifacts on the Prefect server, the
    MLflow runs' params and tags and the model versions' tags, dvc.lock, and the lock entries DVC's run-cache
    pushed to the store."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    places: dict[str, str] = {"compose logs": engine.compose("logs").stdout.decode(errors="replace")}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        places["Prefect flow-run parameters"] = json.dumps([r.parameters for r in runs], default=str)
        places["Prefect artifacts"] = json.dumps([a.data for a in client.read_artifacts(limit=200)], default=str)
        logs, offset = [], 0
        while batch := client.read_logs(limit=200, offset=offset):
            logs += [entry.message for entry in batch]
            offset += len(batch)
        places["Prefect flow-run logs"] = "\n".join(logs)
    mlflow = MlflowClient(tracking_uri=MLFLOW)
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    recorded = [(r.data.params, r.data.tags) for r in mlflow.search_runs(experiments, max_results=1000)]
    places["MLflow params and tags"] = json.dumps(recorded)
    versions = [v.tags for name in MODELS for v in mlflow.search_model_versions(f"name = '{name}'")]
    places["MLflow model-version tags"] = json.dumps(versions)
    places["dvc.lock"] = (ROOT / "dvc.lock").read_text()
    s3 = s3_client()
    places["DVC's run-cache on the store"] = "\n".join(
        s3.get_object(Bucket="dvc", Key=key)["Body"].read().decode(errors="replace")
        for key in s3_keys("dvc", "cache/runs/")
    )
    leaks = [f"{name} in {place}" for name, value in secret_values(env).items() for place, text in places.items()
             if value in text]  # fmt: skip
    if leaks:
        raise StackFailed(f"secrets written where they are read: {leaks}")
    sizes = ", ".join(f"{place} {len(text) / 1000:.0f} kB" for place, text in places.items())
    log(f"no secret in: {sizes} ({len(logs)} flow-run log lines, {len(runs)} flow runs, {len(recorded)} MLflow runs)")


def check_uis(env: dict[str, str], training_run: str, image: np.ndarray, label: int, shots: Path) -> None:
    """MLflow's, Prefect's and the inference service's pages in Debian's chromium (docker/ui_checks.py), each
    check with a screenshot in ``shots``."""
    import uuid

    import browser
    import ui_checks
    from mlflow.tracking import MlflowClient
    from PIL import Image
    from prefect.client.orchestration import get_client
    from selenium.common.exceptions import WebDriverException

    mlflow = MlflowClient(tracking_uri=MLFLOW)
    experiment = mlflow.get_experiment_by_name(PROJECT).experiment_id
    found = mlflow.search_runs([experiment], filter_string=f"tags.prefect_flow_run_id = '{training_run}'")
    runs = {
        r.data.params["impl"]: {"id": r.info.run_id, "name": r.info.run_name,
                                "test_accuracy": r.data.metrics["test_accuracy"]}
        for r in found
    }  # fmt: skip
    champion = mlflow.get_model_version_by_alias(MODELS[0], "champion").version
    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(uuid.UUID(training_run)).name
    png = shots.parent / f"test-image_label{label}.png"
    Image.fromarray(image).save(png)
    try:
        said = ui_checks.check_mlflow(
            MLFLOW, f"{env['MLFLOW_ADMIN_USERNAME']}:{env['MLFLOW_ADMIN_PASSWORD']}", experiment, runs, champion,
            MODELS[0], shots,
        )  # fmt: skip
        said += ui_checks.check_prefect(PREFECT, env["PREFECT_AUTH_STRING"], list(DEPLOYMENTS), run_name, shots)
        said += ui_checks.check_inference_page(INFERENCE, serve_token(), png, shots)
    except (ui_checks.UICheckFailed, browser.BrowserMissing) as exc:
        raise StackFailed(f"UI check: {exc}") from None
    except WebDriverException as exc:
        raise StackFailed(f"UI check: the browser failed: {str(exc).splitlines()[0]}") from None
    for line in said:
        log(f"browser: {line}")
    log(f"screenshots: {', '.join(sorted(p.name for p in shots.glob('*.png')))} in {shots}")


def stored_predictions() -> dict[str, str]:
    """The batch-inference CSVs in s3://batch/predictions/: name -> content."""
    s3 = s3_client()
    return {
        key.rsplit("/", 1)[1]: s3.get_object(Bucket="batch", Key=key)["Body"].read().decode()
        for key in s3_keys("batch", "predictions/")
        if key.endswith(".csv")
    }


def check_predictions(files: dict[str, str]) -> float:
    if len(files) != 1:
        raise StackFailed(f"expected one predictions CSV in s3://batch/predictions/, found {sorted(files)}")
    rows = list(csv_rows(next(iter(files.values()))))
    if len(rows) != BATCH_IMAGES:
        raise StackFailed(f"the predictions CSV has {len(rows)} rows for {BATCH_IMAGES} images")
    return sum(int(r["class_id"]) == int(r["id"].split("_label")[1].split(".")[0]) for r in rows) / len(rows)


def csv_rows(text: str) -> Iterator[dict]:
    import csv

    yield from csv.DictReader(io.StringIO(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--engine", choices=("auto", "docker", "podman"), default=os.environ.get("STACK_ENGINE", "auto")
    )
    parser.add_argument(
        "--standins",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="local base image, PyPI torch and the PostgreSQL stand-in (default: with podman)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("STACK_TIMEOUT", "900")),
        help="bound, in seconds, on each wait (healthy services, each flow run)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(os.environ.get("STACK_TEST_OUTPUT", ROOT / "stack-test-output")),
        help="where the browser checks leave their screenshots (kept after the run, emptied at its start)",
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        default=os.environ.get("KEEP_IMAGES") == "1",
        help="leave the built images (and the local base) for the next run",
    )
    args = parser.parse_args()
    # SIGTERM (a CI time limit, `kill`) ends the test like Ctrl-C: the cleanup in `finally` still runs
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    mirror_env = os.environ.get("FASHION_MNIST_MIRROR")
    mirror = Path(mirror_env).resolve() if mirror_env and "://" not in mirror_env else None
    timings: list[tuple[str, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="stack-test-"))
    engine: Engine | None = None
    built: list[str] = []
    dangling_before: set[str] = set()
    failure = None
    shots = args.output.resolve() / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        log(f"-- {name}")
        start = time.monotonic()
        try:
            yield
        finally:
            timings.append((name, time.monotonic() - start))

    try:
        # this run's credentials, for the stack (through the engine's environment) and for the clients here
        stack_env = stack_secrets(workdir)
        os.environ.update(stack_env)
        os.environ["MLFLOW_TRACKING_USERNAME"] = stack_env["MLFLOW_ADMIN_USERNAME"]
        os.environ["MLFLOW_TRACKING_PASSWORD"] = stack_env["MLFLOW_ADMIN_PASSWORD"]
        name = detect_engine(args.engine)
        standins = args.standins if args.standins is not None else name == "podman"
        engine = Engine(name, standins, mirror, workdir)
        log(f"engine {name}; compose: {' '.join(engine.compose_cmd)}")
        dangling_before = engine.dangling()
        log(f"disk before the build: {engine.disk()}")
        with step("1. build the images"):
            if standins:
                if name != "podman":
                    raise StackFailed("--standins builds its Debian base with podman; use --engine podman")
                engine.env["BASE_IMAGE"] = local_base(engine, workdir)
                engine.env.setdefault("TORCH_INDEX_URL", "https://pypi.org/simple")
                built.append(engine.env["BASE_IMAGE"])
            ca = Path("/etc/ssl/certs/ca-certificates.crt")
            if "CA_BUNDLE" not in engine.env and ca.is_file():  # a TLS-intercepting proxy needs the host's CAs
                engine.env["CA_BUNDLE"] = str(ca)
            built += [*IMAGES, *(STANDIN_IMAGES if standins else ())]
            # One build per image: mlflow and prefect-server run the worker's image, and podman-compose would
            # build it three times side by side (buildah does not cache COPY --from between those builds).
            engine.compose("build", *BUILT_BY, *(STANDINS_BUILT_BY if standins else ()), capture=False)
        log(f"disk after the build: {engine.disk()}")
        with step("2. up -d (compose.yaml, unchanged)"):
            engine.start_api(args.timeout)
            engine.compose("up", "-d", capture=False, timeout=args.timeout)
        with step("3. wait for healthy services; log-in on each"):
            wait_healthy(engine, SERVICES[:4], args.timeout)
            wait_until("the buckets job to exit", lambda: engine.exit_code("buckets") is not None, args.timeout)
            if (code := engine.exit_code("buckets")) != 0:
                raise StackFailed(f"the buckets job exited {code}: {engine.compose('logs', 'buckets').stdout!r}")
            check_log_in(stack_env)
        images, labels = test_images(mirror)
        with prefect_client_env(workdir):
            runs = []
            with step("4. training deployment (a fresh container)"):
                runs.append(run_deployment("training-pipeline/weekly-retrain", args.timeout))
                log(f"DVC in a container, the first run: {dvc_times(runs[-1])}")
            with step("5. MLflow runs, registry, @champion"):
                before = mlflow_state()
                log(
                    f"MLflow: {len(before['runs'])} runs, models {before['models']}, "
                    f"@champion v{before['champion']} (test accuracy {before['accuracy']})"
                )
                if before["finished"] < 2 or before["models"] != sorted(MODELS) or before["champion"] is None:
                    raise StackFailed(f"MLflow does not hold two finished runs, both models and @champion: {before}")
                check_links(engine)
                stored = object_store()
                log(f"object store: {stored}")
                if not all(stored.values()):
                    raise StackFailed(
                        f"the object store lacks DVC's outputs, its run-cache or MLflow's models: {stored}"
                    )
            with step("6. inference on the 10,000 test images, counted by Prometheus"):
                wait_healthy(engine, ("inference", "prometheus"), args.timeout)
                # the inference service needs its token; Prometheus scrapes with it (docker/prometheus.yml)
                bearer = {"authorization": f"Bearer {serve_token()}"}
                log(check_refusals("inference", f"{INFERENCE}/metadata", None, bearer, {"authorization": "Bearer x"}))
                wait_until("Prometheus scraping the inference service", lambda: promql('up{job="inference"}') == 1,
                           args.timeout)  # fmt: skip
                requests_before, images_before = promql(SERVED_REQUESTS), promql(SERVED_IMAGES)
                accuracy = served_accuracy(images, labels)
                sent = -(-len(images) // 200)
                wait_until(f"Prometheus to count the {sent} requests just sent",
                           lambda: promql(SERVED_REQUESTS) >= requests_before + sent, 120)  # fmt: skip
                counted = (promql(SERVED_REQUESTS) - requests_before, promql(SERVED_IMAGES) - images_before)
                log(f"Prometheus counted {counted[0]:.0f} /predict requests and {counted[1]:.0f} images")
                if counted != (sent, len(images)):
                    raise StackFailed(f"Prometheus counted {counted}, not the {sent} requests of {len(images)} sent")
                log(f"inference accuracy {accuracy:.4f}; registered {before['accuracy']:.4f}")
                if round(accuracy, 4) != round(before["accuracy"], 4):
                    raise StackFailed(f"served accuracy {accuracy:.4f} != recorded {before['accuracy']:.4f}")
                # the serving image ships without torch and the stages (tests/unit/test_layers.py checks the imports)
                shipped = engine.exec(
                    "inference",
                    "python3",
                    "-c",
                    "import importlib.util as u; "
                    "print([m for m in ('torch', 'softmax_mlops.serving') if u.find_spec(m)])",
                ).strip()
                log(f"the serving image holds {shipped} of torch and softmax_mlops.serving")
                if shipped != "['softmax_mlops.serving']":
                    raise StackFailed(f"the serving image should hold softmax_mlops.serving and no torch: {shipped}")
            with step("7. training deployment again, in a new container: nothing to reproduce"):
                runs.append(run_deployment("training-pipeline/weekly-retrain", args.timeout))
                if NOTHING_RAN not in (text := flow_run_log(runs[-1])):
                    tail = text[-600:]
                    raise StackFailed(f"the second weekly-retrain run did not log {NOTHING_RAN!r}: {tail!r}")
                said = [line for line in text.splitlines() if "stages ran:" in line or "run-cache:" in line]
                log(f"second weekly-retrain run {runs[-1]}: {said}")
                log(f"DVC in a container, the second run: {dvc_times(runs[-1])}")
                if (again := mlflow_state())["runs"] != before["runs"] or again["champion"] != before["champion"]:
                    raise StackFailed(f"a run that reproduced nothing changed MLflow: {again} (was {before})")
            with step("8. a fresh clone on the host pulls from the store"):
                check_fresh_clone(workdir)
            with step("9. batch-inference deployment (inbox and predictions in s3://batch)"):
                feed_inbox(images, labels)
                runs.append(run_deployment("batch-inference/nightly-batch-inference", args.timeout))
                predictions = stored_predictions()
                log(f"predictions {sorted(predictions)}: accuracy {check_predictions(predictions):.4f}")
            with step(f"10. sweep of {len(SWEEP)} sets, 2 at once, each in its own container"):
                runs.append(run_deployment("sweep/sweep", args.timeout, {"parameter_sets": SWEEP, "concurrency": 2}))
                runs += check_sweep(runs[-1])
                check_own_containers(engine, runs, args.timeout)
                worker_log = engine.compose("logs", "prefect-worker").stdout.decode(errors="replace")
                if "HashError" in worker_log or "Traceback" in worker_log:
                    raise StackFailed("the worker logged a traceback (see `compose logs prefect-worker`)")
                log(f"disk after the sweep: {engine.disk()}")
            with step("11. no secret in logs, MLflow, Prefect or dvc.lock"):
                check_no_secret_leaked(engine, stack_env)
            with step("12. MLflow, Prefect and the inference page in a real browser"):
                check_uis(stack_env, runs[0], images[0], int(labels[0]), shots)
            with step("13. down, up, nothing lost"):
                before, stored = mlflow_state(), object_store()  # after the sweep
                engine.compose("down", capture=False)
                engine.compose("up", "-d", capture=False, timeout=args.timeout)
                wait_healthy(engine, SERVICES, args.timeout)
                after = mlflow_state()
                from prefect.client.orchestration import get_client

                with get_client(sync_client=True) as client:
                    deployments = sorted(d.name for d in client.read_deployments())
                kept = {
                    "runs": after["runs"] == before["runs"],
                    "champion": after["champion"] == before["champion"],
                    "deployments": deployments == sorted(DEPLOYMENTS),
                    "predictions": stored_predictions() == predictions,
                    "object store": object_store() == stored,
                }
                log(f"after restart: {kept} (object store {stored})")
                restarts = (
                    engine.run(engine.name, "inspect", "--format", "{{.RestartCount}}", engine.container("inference"))
                    .stdout.decode()
                    .strip()
                )
                kept["inference did not restart"] = restarts == "0"
                if not all(kept.values()):
                    raise StackFailed(f"lost across down/up: {[k for k, v in kept.items() if not v]}")
    except (StackFailed, subprocess.TimeoutExpired, OSError) as exc:
        failure = str(exc)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.compose("logs", "--tail", "40", capture=False, check=False)
    finally:
        if engine is not None:
            with step("14. remove containers, volumes, networks, images"):
                for line in engine.flow_containers():  # a failed run's, left for the reaper
                    engine.run(engine.name, "rm", "-f", line.split()[0].lstrip("/"), check=False)
                engine.compose("down", "-v", "--remove-orphans", check=False)
                engine.stop_api()
                if not args.keep_images:
                    for image in built:
                        engine.run(engine.name, "rmi", "-f", image, check=False)
                    # the build stages' untagged images: only the ones this run left
                    for image in engine.dangling() - dangling_before:
                        engine.run(engine.name, "rmi", "-f", image, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    print("\nstack test: step timings")
    for name, seconds in timings:
        print(f"  {seconds:7.1f} s  {name}")
    print(f"  {sum(s for _, s in timings):7.1f} s  total")
    if failure:
        print(f"stack-test: FAILED: {failure}", file=sys.stderr)
        return 1
    print("stack-test: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
