"""The compose stack, tested as containers: `make stack-test` (Docker Compose, or podman with podman-compose).

It builds the images, runs docker/compose.yaml, waits for every service's own healthcheck, runs both Prefect
deployments, checks MLflow, inference and both UIs, restarts the stack and checks that nothing was lost, then
removes everything it made (containers, volumes, networks, the images it built). Each step is timed.

With podman (no Docker engine; CI), images that cannot be pulled here are replaced through documented
overrides only: a local Debian base made with debootstrap (BASE_IMAGE), PyPI's torch (TORCH_INDEX_URL), and a
PostgreSQL stand-in built from Debian's package (docker/standins/compose.yaml). With Docker, compose.yaml
runs as users run it. Every wait is bounded (--timeout); the first failure ends the test with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
PROJECT = "softmax-mlops"
SERVICES = ("postgres", "mlflow", "prefect-server", "prefect-worker", "inference")
BUILT_BY = ("prefect-worker", "inference", "postgres")  # the services whose builds make the stack's images
IMAGES = ("softmax-mlops-pipeline:latest", "softmax-mlops-serve:latest")
STANDIN_IMAGES = ("localhost/softmax-mlops-postgres-standin:latest",)
MLFLOW, PREFECT, INFERENCE = "http://127.0.0.1:5000", "http://127.0.0.1:4200", "http://127.0.0.1:8000"
MODELS = ("softmax-mlops-scratch", "softmax-mlops-concise")
BATCH_IMAGES = 300  # test images put in the batch-inference inbox


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
            compose = shutil.which("podman-compose", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            if not compose:
                raise StackFailed("podman-compose is not installed: pip install -e '.[dev]' (make setup) has it")
            self.compose_cmd = [compose]
        else:
            self.compose_cmd = ["docker", "compose"]
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


def http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
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


@contextlib.contextmanager
def prefect_client_env(workdir: Path) -> Iterator[None]:
    """Talk to the stack's Prefect server from here, with a throwaway PREFECT_HOME."""
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    os.environ.update(PREFECT_API_URL=f"{PREFECT}/api", PREFECT_HOME=str(workdir / "prefect-home"))
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def run_deployment(name: str, timeout: float) -> str:
    """Trigger a deployment, wait (bounded) for its final state, return the state's name."""
    from prefect.deployments import run_deployment as trigger

    flow_run = trigger(name, timeout=timeout)
    state = flow_run.state
    if state is None or not state.is_final():
        raise StackFailed(f"{name}: not finished after {timeout:.0f} s (state {state.name if state else None})")
    return state.name


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


def served_accuracy(images: np.ndarray, labels: np.ndarray, batch: int = 200) -> float:
    correct = 0
    for start in range(0, len(images), batch):
        status, body = http(f"{INFERENCE}/predict", {"instances": images[start : start + batch].tolist()}, 60)
        if status != 200:
            raise StackFailed(f"POST {INFERENCE}/predict answered {status}: {body[:200]!r}")
        predicted = [p["class_id"] for p in json.loads(body)["predictions"]]
        correct += int(np.sum(np.array(predicted) == labels[start : start + batch]))
    return correct / len(images)


def feed_inbox(engine: Engine, images: np.ndarray, labels: np.ndarray, workdir: Path) -> None:
    """Real test images as PNGs in the batch-inference inbox (the `incoming` volume), as docs/operations.md says."""
    from PIL import Image

    inbox = workdir / "incoming"
    inbox.mkdir()
    for i in range(BATCH_IMAGES):
        Image.fromarray(images[i]).save(inbox / f"{i:05d}_label{labels[i]}.png")
    engine.run(engine.name, "cp", f"{inbox}/.", f"{engine.container('prefect-worker')}:/app/data/incoming/")


def check_volume_owners(engine: Engine) -> None:
    """Named volumes are writable by the images' user (uid 10001), as Docker seeds them from the image."""
    owners = engine.exec(
        "prefect-worker",
        "stat",
        "-c",
        "%u %n",
        "/app/.dvc/cache",
        "/app/data",
        "/app/data/incoming",
        "/app/predictions",
    ).split("\n")
    owners.append(engine.exec("mlflow", "stat", "-c", "%u %n", "/mlartifacts").strip())
    if wrong := [line for line in owners if line and not line.startswith("10001 ")]:
        raise StackFailed(f"volumes not owned by uid 10001: {wrong}")
    log("volumes owned by uid 10001: " + ", ".join(line.split()[1] for line in owners if line))


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


def predictions_on_volume(engine: Engine) -> dict[str, str]:
    """The batch-inference CSVs on the predictions volume: name -> content."""
    listing = engine.exec("prefect-worker", "sh", "-c", "ls /app/predictions/*.csv 2>/dev/null || true").split()
    return {Path(p).name: engine.exec("prefect-worker", "cat", p) for p in listing}


def check_predictions(files: dict[str, str]) -> float:
    if len(files) != 1:
        raise StackFailed(f"expected one predictions CSV on the volume, found {sorted(files)}")
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
        "--keep-images",
        action="store_true",
        default=os.environ.get("KEEP_IMAGES") == "1",
        help="leave the built images (and the local base) for the next run",
    )
    args = parser.parse_args()

    mirror_env = os.environ.get("FASHION_MNIST_MIRROR")
    mirror = Path(mirror_env).resolve() if mirror_env and "://" not in mirror_env else None
    timings: list[tuple[str, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="stack-test-"))
    engine: Engine | None = None
    built: list[str] = []
    dangling_before: set[str] = set()
    failure = None

    @contextlib.contextmanager
    def step(name: str) -> Iterator[None]:
        log(f"-- {name}")
        start = time.monotonic()
        try:
            yield
        finally:
            timings.append((name, time.monotonic() - start))

    try:
        name = detect_engine(args.engine)
        standins = args.standins if args.standins is not None else name == "podman"
        engine = Engine(name, standins, mirror, workdir)
        log(f"engine {name}; compose: {' '.join(engine.compose_cmd)}")
        dangling_before = engine.dangling()
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
            engine.compose("build", *BUILT_BY, capture=False)
        with step("2. up -d (compose.yaml, unchanged)"):
            engine.compose("up", "-d", capture=False)
        with step("3. wait for healthy services"):
            wait_healthy(engine, SERVICES[:4], args.timeout)
            check_volume_owners(engine)
        images, labels = test_images(mirror)
        with prefect_client_env(workdir):
            with step("4. training deployment"):
                state = run_deployment("training-pipeline/weekly-retrain", args.timeout)
                if state != "Completed":
                    raise StackFailed(f"training-pipeline/weekly-retrain ended {state}")
            with step("5. MLflow runs, registry, @champion"):
                before = mlflow_state()
                log(
                    f"MLflow: {len(before['runs'])} runs, models {before['models']}, "
                    f"@champion v{before['champion']} (test accuracy {before['accuracy']})"
                )
                if before["finished"] < 2 or before["models"] != sorted(MODELS) or before["champion"] is None:
                    raise StackFailed(f"MLflow does not hold two finished runs, both models and @champion: {before}")
                check_links(engine)
            with step("6. inference on the 10,000 test images"):
                wait_healthy(engine, ("inference",), args.timeout)
                accuracy = served_accuracy(images, labels)
                log(f"inference accuracy {accuracy:.4f}; registered {before['accuracy']:.4f}")
                if round(accuracy, 4) != round(before["accuracy"], 4):
                    raise StackFailed(f"served accuracy {accuracy:.4f} != recorded {before['accuracy']:.4f}")
            with step("7. batch-inference deployment"):
                feed_inbox(engine, images, labels, workdir)
                state = run_deployment("batch-inference/nightly-batch-inference", args.timeout)
                if state != "Completed":
                    raise StackFailed(f"batch-inference/nightly-batch-inference ended {state}")
                predictions = predictions_on_volume(engine)
                log(f"predictions {sorted(predictions)}: accuracy {check_predictions(predictions):.4f}")
                worker_log = engine.compose("logs", "prefect-worker").stdout.decode(errors="replace")
                if "HashError" in worker_log or "Traceback" in worker_log:
                    raise StackFailed("the worker logged a traceback (see `compose logs prefect-worker`)")
            with step("8. Prefect and MLflow UIs"):
                for url in (f"{PREFECT}/", f"{MLFLOW}/"):
                    status, body = http(url)
                    if status != 200 or b"<html" not in body[:2000].lower():
                        raise StackFailed(f"GET {url} answered {status} without an HTML page")
                    log(f"GET {url} -> 200, HTML")
            with step("9. down, up, nothing lost"):
                cache_before = engine.exec("prefect-worker", "sh", "-c", "find /app/.dvc/cache -type f | wc -l").strip()
                engine.compose("down", capture=False)
                engine.compose("up", "-d", capture=False)
                wait_healthy(engine, SERVICES, args.timeout)
                after = mlflow_state()
                from prefect.client.orchestration import get_client

                with get_client(sync_client=True) as client:
                    deployments = sorted(d.name for d in client.read_deployments())
                cache_after = engine.exec("prefect-worker", "sh", "-c", "find /app/.dvc/cache -type f | wc -l").strip()
                kept = {
                    "runs": after["runs"] == before["runs"],
                    "champion": after["champion"] == before["champion"],
                    "deployments": deployments == ["nightly-batch-inference", "weekly-retrain"],
                    "dvc cache": cache_after == cache_before and int(cache_after) > 0,
                    "predictions": predictions_on_volume(engine) == predictions,
                }
                log(f"after restart: {kept} (DVC cache files {cache_after})")
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
            with step("10. remove containers, volumes, networks, images"):
                engine.compose("down", "-v", "--remove-orphans", check=False)
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
