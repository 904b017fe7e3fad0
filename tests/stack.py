"""Starting and stopping real servers for integration tests: PostgreSQL, MLflow, a Prefect server with the
process pool, the deployments and a worker. Everything binds to 127.0.0.1 on free ports and is stopped by
the Processes context manager, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_connection(port: int) -> socket.socket:
    """A plain TCP connection to 127.0.0.1:``port``, for requests no HTTP client would send."""
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class Processes:
    """Start processes; on exit stop them in reverse order with SIGINT (a Prefect worker ignores SIGTERM)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def start(self, *cmd: str, cwd: Path, env: dict) -> subprocess.Popen:
        """Output goes to an unnamed temporary file, never to a pipe: nobody reads a server's pipe while the
        test runs, and a server whose 64 KiB pipe is full blocks in its next log write (seen with a Prefect
        server logging a 409's traceback)."""
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in __exit__
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.started):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.log.close()  # type: ignore[attr-defined]


def output_of(proc: subprocess.Popen) -> str:
    """What a process started by :class:`Processes` (or with a pipe) has written so far."""
    log = getattr(proc, "log", None)
    if log is not None:
        log.seek(0)
        return log.read()
    return proc.stdout.read() if proc.stdout else ""


SERVER_START_S = 180  # an MLflow or Prefect server on 2 busy cores starts in 5-30 s; the margin is for CI load
FLOW_RUN_S = 600  # a whole training deployment (ten stages) takes 1-3 min here


def wait_until(predicate, what: str, timeout_s: float, proc: subprocess.Popen | None = None, every: float = 0.5):
    """Poll ``predicate`` until it returns something truthy (which is returned), for at most ``timeout_s``
    seconds; fail naming ``what`` was awaited, or at once if ``proc`` ends first."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if proc is not None and proc.poll() is not None:
            output = output_of(proc)
            raise AssertionError(f"waiting for {what}: {proc.args} exited first ({proc.returncode}):\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every)
    return result


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = SERVER_START_S) -> None:
    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(answers, f"{url} to answer 200", timeout_s, proc)


@contextlib.contextmanager
def serving(model: Path, log: Path, *options: str):
    """`softmax-mlops serve` on a free port of 127.0.0.1, its output in ``log`` (a pipe nobody reads could
    fill up and stall it); yields (base URL, port). SIGTERM at the end, as `docker stop` sends."""
    from helpers import REPO

    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["softmax-mlops", "serve", "-m", str(model), "--port", str(port), *options],
            cwd=REPO,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", proc)
            yield url, port
            assert proc.poll() is None, "the server died"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def run(*cmd: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def start_prefect(procs: Processes, root: Path, env: dict) -> None:
    """A Prefect server (env says where: PREFECT_API_URL, and PREFECT_API_DATABASE_CONNECTION_URL if not
    SQLite), the process pool, `prefect deploy --all` from prefect.yaml, and a worker."""
    port = env["PREFECT_API_URL"].split(":")[-1].split("/")[0]
    server = procs.start("prefect", "server", "start", "--host", "127.0.0.1", "--port", port, cwd=root, env=env)
    wait_http(f"{env['PREFECT_API_URL']}/health", server)
    run("prefect", "work-pool", "create", "softmax-mlops", "--type", "process", cwd=root, env=env)
    run("prefect", "--no-prompt", "deploy", "--all", cwd=root, env=env)
    procs.start("prefect", "worker", "start", "--pool", "softmax-mlops", cwd=root, env=env)


def prefect_env(root: Path, home: Path, port: int) -> dict:
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "SOFTMAX_MLOPS_PROJECT_DIR": str(root),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@contextlib.contextmanager
def prefect_api(url: str, more: dict | None = None):
    """Point this process's Prefect settings at ``url`` for the block (Prefect reads the environment once, at
    import, so a changed PREFECT_API_URL would not be seen), and stop Prefect's background senders on the way
    out.

    Prefect's events worker and API log worker are one per process, and each reads the API URL once, when it
    starts. One started inside this block (a concurrency slot, a flow, a log line) would go on sending every
    later event of the test session to ``url``, a server that is gone by then: the flows of the session harness
    would then record no task runs (CI failed so on test_flows.py, when pytest-randomly ran a test that used
    this block first). Draining them here lets the next user start fresh ones with its own URL."""
    import prefect.settings

    updates = {prefect.settings.PREFECT_API_URL: url, **(more or {})}
    try:
        with prefect.settings.temporary_settings(updates=updates):
            yield
    finally:
        drain_prefect_workers()


def drain_prefect_workers() -> None:
    """Stop (after sending what they hold, bounded) Prefect's per-process events and API log workers."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (EventsWorker, APILogWorker):
        worker.drain_all(timeout=DRAIN_S)


DRAIN_S = 10  # what a stopped worker may still send to a live server; a dead one's retries are cut off here


def prefect_call(env: dict, fn):
    """Run ``fn(client)`` against the server named in ``env``."""
    from prefect import get_client

    async def main():
        async with get_client() as client:
            return await fn(client)

    import prefect.settings

    auth = (
        {prefect.settings.PREFECT_API_AUTH_STRING: env["PREFECT_API_AUTH_STRING"]}
        if "PREFECT_API_AUTH_STRING" in env
        else {}
    )
    with prefect_api(env["PREFECT_API_URL"], auth):
        return asyncio.run(main())


def run_deployment_and_wait(env: dict, name: str, parameters: dict | None = None):
    """Trigger a deployment now and wait for its flow run to end; returns (flow run id, final state)."""

    async def trigger(client):
        deployment = await client.read_deployment_by_name(name)
        return (await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)).id

    flow_run_id = prefect_call(env, trigger)

    async def state(client):
        return (await client.read_flow_run(flow_run_id)).state

    def final_state():
        current = prefect_call(env, state)
        return current if current.is_final() else None

    return flow_run_id, wait_until(final_state, f"flow run {flow_run_id} of {name} to end", FLOW_RUN_S, every=2)


class PostgreSQL:
    """A throwaway PostgreSQL cluster from Debian's packages on 127.0.0.1 (trust auth, user softmax)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        self.bin = Path(found[-1]).parent if found else None
        self.port = free_port()

    @property
    def available(self) -> bool:
        return self.bin is not None

    def _as_owner(self, *cmd: str) -> list[str]:
        # PostgreSQL refuses to run as root: use its own system user when the tests run as root (CI does)
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def __enter__(self) -> PostgreSQL:
        self.data = Path(tempfile.mkdtemp(prefix="softmax-mlops-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "softmax", "--auth=trust", "--no-sync"
            ),
            check=True,
            capture_output=True,
        )
        subprocess.run(
            self._as_owner(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-w",
                "-l",
                str(self.data / "server.log"),
                "-o",
                f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        return self

    def create_database(self, name: str) -> str:
        self.psql("postgres", f"CREATE DATABASE {name}")
        return f"softmax@127.0.0.1:{self.port}/{name}"

    def psql(self, database: str, sql: str) -> str:
        return subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "softmax",
                "-d",
                database,
                "-tAc",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def __exit__(self, *exc) -> None:
        subprocess.run(
            self._as_owner(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"), capture_output=True
        )
        shutil.rmtree(self.data, ignore_errors=True)


class S3Server:
    """moto's standalone S3 server (`moto_server`, as DVC's S3 plugin tests its remote) on 127.0.0.1 with the
    given buckets: what docker/standins/ runs in place of the stack's object store. It keeps everything in
    memory and takes any credentials."""

    KEYS = {"AWS_ACCESS_KEY_ID": "softmax-test", "AWS_SECRET_ACCESS_KEY": "softmax-test-secret"}

    def __init__(self, *buckets: str) -> None:
        self.buckets, self.port = buckets, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Server:
        self.proc = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_http(f"{self.url}/moto-api/", self.proc)
            self._create_buckets()
        except BaseException:  # __exit__ never runs for a failed __enter__: the server would outlive the test
            self.__exit__()
            raise
        return self

    def _create_buckets(self) -> None:
        for bucket in self.buckets:
            self.client().create_bucket(Bucket=bucket)

    def reset(self) -> None:
        """Empty, as if just started (moto's reset API, then the buckets again): one server serves a module's
        tests, each on a store of its own, without the second of CPU a new server costs."""
        import httpx

        httpx.post(f"{self.url}/moto-api/reset", timeout=30).raise_for_status()
        self._create_buckets()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.KEYS["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
