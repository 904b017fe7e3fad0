"""Test helpers: small generated IDX files in the exact format of the Fashion-MNIST downloads, and the CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import locale
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FILES = {  # torchvision's resource names, in its order
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, then the raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), labels.astype(np.int64)


def write_mirror(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> tuple[dict, list]:
    """A mirror folder with the four .gz files; returns the arrays and the (file name, md5) resources."""
    rng = np.random.default_rng(seed)
    splits = {"train": make_split(rng, n_train), "test": make_split(rng, n_test)}
    folder.mkdir(parents=True, exist_ok=True)
    resources = []
    for (split, kind), name in FILES.items():
        array = splits[split][0 if kind == "images" else 1]
        data = gzip.compress(idx_bytes(array), mtime=0)
        (folder / name).write_bytes(data)
        resources.append((name, hashlib.md5(data).hexdigest()))
    return splits, resources


REPO = Path(__file__).resolve().parents[1]
if REPO.name == "mutants":  # `make mutation`: mutmut runs the tests in its copy; the project is the repository
    REPO = REPO.parent


def learnable_mirror(folder: Path, n_train: int = 60, n_test: int = 20) -> list[tuple[str, str]]:
    """An IDX mirror whose classes can be learnt (class k has bright rows 2k and 2k+1 over faint noise), so that
    calibrate fits a moderate temperature (on random labels it would fit a huge one, flattening every logit).
    Returns the (file name, md5) resources, as helpers.write_mirror does."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            image[2 * label : 2 * label + 2] = 255
        splits[split] = (images, labels)
    folder.mkdir(parents=True)
    resources = []
    for (split, kind), name in FILES.items():
        packed = gzip.compress(idx_bytes(splits[split][0 if kind == "images" else 1]), mtime=0)
        (folder / name).write_bytes(packed)
        resources.append((name, hashlib.md5(packed).hexdigest()))
    return resources


def calibrated_project(base: Path, impl: str, epochs: int, new_store=None):
    """A project copy in ``base`` through ingest (80 learnable generated images, 10 of them for validation),
    ``epochs`` of training ``impl`` in batches of 10, evaluate and calibrate: what export@ needs, in seconds.
    ``new_store`` (conftest's new_mlflow_store) puts an empty MLflow store where params.yaml's tracking URI
    points, instead of letting train build one."""
    import yaml

    from softmax_mlops import config
    from softmax_mlops.stages import calibrate, data, evaluate, train

    root = copy_project(base / "project")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ingest"]["validation_size"] = 10  # of 60 training images
    params["train"] |= {"epochs": epochs, "batch_size": 10}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resources = learnable_mirror(base / "mirror")  # the md5s of the generated files, not of the real ones
    cfg = config.load(root)
    if new_store is not None and cfg.mlflow.tracking_uri.startswith("sqlite:///"):
        new_store(Path(cfg.mlflow.tracking_uri.removeprefix("sqlite:///")))
    data.ingest(cfg.ingest.model_copy(update={"mirror": str(base / "mirror")}), cfg.paths, resources)
    train.run(cfg, impl)
    evaluate.run(cfg, impl)
    calibrate.run(cfg, impl)
    return cfg


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console script as a user would."""
    return run_tool("softmax-mlops", *args, cwd=cwd, env=env)


def copy_project(dest: Path) -> Path:
    """A throwaway copy of the repository (tracked and new files, as git sees them), committed as its own repo."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failure as the project promises it: exit 1, no traceback, and stderr exactly one error line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("softmax-mlops: error: "), result.stderr
    return lines[0]


def render_offline(page: Path, timeout_s: float = 180) -> str:
    """``page``'s DOM after headless Chromium (Debian's package) has run its scripts with no network: every
    request but file:// goes to a proxy that does not exist, and Chromium's own background connections are off.
    Without Chromium the test skips on a developer's machine and fails in CI (`.ci/run` installs it)."""
    import tempfile

    import pytest

    if shutil.which("chromium") is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("chromium is not installed (apt-get install chromium)")

    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                f"--user-data-dir={profile}",
                "--proxy-server=127.0.0.1:9",
                "--proxy-bypass-list=<-loopback>",
                "--virtual-time-budget=20000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def run_tool(*cmd: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run dvc, git or another installed tool with the test environment (plus ``env``)."""
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def clone_state(src: Path, dest: Path) -> Path:
    """A copy of a project after it ran: code, git, outputs, DVC cache and the embedded MLflow store, for a test
    that changes things other tests read. MLflow's SQLite store records absolute artifact locations; they are
    moved to the copy, so nothing the copy logs lands in the original's artifacts."""
    import sqlite3

    dvc_tmp = (src / ".dvc" / "tmp").resolve()  # DVC's locks and caches of the source, not state to copy
    shutil.copytree(
        src, dest, symlinks=True, ignore=lambda d, names: ["tmp"] if Path(d).resolve() == dvc_tmp.parent else []
    )
    db = dest / "mlflow.db"
    if db.exists():
        old, new = str(src.resolve()), str(dest.resolve())
        with sqlite3.connect(db) as conn:
            tables = [row[0] for row in conn.execute("select name from sqlite_master where type = 'table'")]
            for table in tables:
                for column in conn.execute(f"pragma table_info({table})").fetchall():
                    if column[2].upper().startswith(("VARCHAR", "TEXT")):
                        conn.execute(f'update {table} set "{column[1]}" = replace("{column[1]}", ?, ?)', (old, new))
        conn.close()
    return dest


def paths_in(root: Path):
    """The project's output folders under ``root``, as params.yaml's defaults lay them out."""
    from softmax_mlops import config

    return config.Paths(
        root=root,
        prepared=root / "prepared",
        models=root / "models",
        metrics=root / "metrics",
        reports=root / "reports",
    )


class Trap:
    """Unpickling this creates ``marker``: proof that a file was unpickled (tests of loaders that must not)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@contextmanager
def ascii_locale() -> Iterator[None]:
    """LC_CTYPE=C (ASCII) for the block: what a reader that trusts the locale's encoding would get wrong."""
    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)


def model_copy(onnx_model, folder: Path, class_names: list[str] | None = None) -> Path:
    """The onnx_model fixture's model alone in ``folder`` (no sidecar unless a test adds one), with a model card
    (UTF-8, not escaped) if asked."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(onnx_model[0].read_bytes())
    if class_names is not None:
        card = json.dumps({"class_names": class_names}, ensure_ascii=False)
        (folder / "model.json").write_text(card, encoding="utf-8")
    return folder / "model.onnx"
