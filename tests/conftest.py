"""Shared fixtures: generated IDX mirrors for unit tests, the genuine data for real-data tests.

Real-data tests read FASHION_MNIST_MIRROR (a folder or URL), else torchvision's official mirror. When the
data cannot be had they skip on a developer's machine but fail in CI (CI=true), so a CI run can never pass
without having tested on the real data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hypothesis
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import copy_project, write_mirror
from softmax_mlops import config
from softmax_mlops.errors import PipelineError
from softmax_mlops.stages import data


def _absolute_mirror() -> None:
    """`FASHION_MNIST_MIRROR=../shared/fashion-mnist make test` (the README's command): a relative folder means
    relative to where the tests were started, but many tests run stages in copies of the project elsewhere."""
    mirror = os.environ.get(config.MIRROR_ENV, "")
    if mirror and "://" not in mirror and not Path(mirror).is_absolute():
        os.environ[config.MIRROR_ENV] = str(Path(mirror).resolve())


_absolute_mirror()

# DVC sends usage analytics from a daemon it starts after each command, unless told not to. The repository's
# .dvc/config says no, but the small DVC projects that tests create with `dvc init` do not: each of their commands
# started one more Python process (a second of CPU, beside the tests) that tried the internet, failed, and left
# its report in /tmp. Tests never phone home.
os.environ["DVC_NO_ANALYTICS"] = "1"

# The fuzz tests (test_parsers_fuzz.py, test_server_fuzz.py) take their number of examples from a hypothesis
# profile. "full", 400 per test, is the default: make test, CI and mutmut. make test-fast loads "fast"
# (--hypothesis-profile=fast), hypothesis' own default of 100, which keeps the edit loop inside its 2 minutes;
# at 400 the fuzz was some 25 s of CPU of it. Both are derandomized: "fast" runs the same kinds of example, fewer.
hypothesis.settings.register_profile("full", max_examples=400)
hypothesis.settings.register_profile("fast", max_examples=100)
hypothesis.settings.load_profile("full")

# What the package and MLflow import inside functions, about 10 s in all (torchvision 3 s, scikit-learn 2 s,
# MLflow's SQL stores and alembic 2 to 3 s). mutmut forks each mutant's process from a server that has
# only collected the tests (pyproject.toml), so without these every mutant whose tests reach ingest, a split
# or an MLflow store imported them again. Imports only: nothing here starts a thread before the fork. Not
# tritonclient: gevent's hub would not survive it.
MUTMUT_PRELOAD = (
    "torchvision.datasets",
    "sklearn.model_selection",
    "scipy.stats",
    "onnxruntime",
    "onnxscript",
    "torch.onnx",
    "mlflow.models",
    "mlflow.onnx",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "alembic.command",
    "dvc.repo",
    "uvicorn",
)


def _preload_under_mutmut() -> None:
    """Only under mutmut (it sets MUTANT_UNDER_TEST, empty in its fork server): pytest's own runs import what
    they use when they use it."""
    if "MUTANT_UNDER_TEST" in os.environ:
        import importlib

        for name in MUTMUT_PRELOAD:
            importlib.import_module(name)


_preload_under_mutmut()


def pytest_collection_finish(session: pytest.Session) -> None:
    """mutmut's fork server collects the tests once (`--collect-only`), then forks each mutant's run from it.
    mutmut freezes the garbage collector before it starts that server, not after, so every mutant's run
    traversed all that the collection imported (torch, MLflow, the preloads above) when pytest collected garbage
    at its end (its unraisable-exception check): 1.3 s of a 2 s run that tests one config function. Frozen here,
    once collected, that run takes 0.4 s."""
    if "MUTANT_UNDER_TEST" in os.environ and session.config.option.collectonly:
        import gc

        _build_mlflow_template()
        gc.freeze()


_mlflow_template: Path | None = None  # built once in mutmut's fork server, copied by every mutant's run


def _build_mlflow_template() -> None:
    """An empty MLflow store, migrated once for all mutants rather than once per mutant's run (1 to 2 s each,
    and every registry mutant needs one). It is built in a separate process, so that the fork server holds
    no database connection for its children to inherit."""
    import atexit
    import shutil
    import subprocess
    import tempfile

    global _mlflow_template
    folder = Path(tempfile.mkdtemp(prefix="mutmut-mlflow-"))
    db = folder / "mlflow.db"
    build = "import mlflow, sys; mlflow.MlflowClient('sqlite:///' + sys.argv[1]).search_experiments()"
    subprocess.run([sys.executable, "-c", build, str(db)], check=True, capture_output=True, timeout=300)
    _mlflow_template = db
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))


UNIT_TIMEOUT_S = 120  # the slowest unit test (300 fuzzed requests to a real server) takes about 20 s
# Under mutmut (which names the mutant in MUTANT_UNDER_TEST), a mutant that makes a loop endless would hold a
# worker for the whole limit, and mutmut's own limit counts CPU time, which a blocked read does not use. Only
# in-process tests that reach the mutant run there, the slowest of them in about 8 s.
MUTANT_TIMEOUT_S = 30


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that reaches the genuine data (the real_splits fixture, directly or through another fixture) is
    marked realdata, so that `-m "not realdata"` (make test-fast, mutmut) leaves it out whether or not its
    module says so. Unit tests use generated data and should be quick: a hang there fails in two minutes, not
    in the global fifteen (pyproject.toml). A test that names its own timeout keeps it."""
    unit = Path(__file__).parent / "unit"
    under_a_mutant = "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "")  # not its clean and stats runs
    for item in items:
        if "real_splits" in getattr(item, "fixturenames", ()) and item.get_closest_marker("realdata") is None:
            item.add_marker(pytest.mark.realdata)
        if item.path.is_relative_to(unit) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(MUTANT_TIMEOUT_S if under_a_mutant else UNIT_TIMEOUT_S))


@pytest.fixture(autouse=True, scope="session")
def _tqdm_lock_of_this_process():
    """tqdm guards its bars with a multiprocessing lock, a semaphore that forked processes share. mutmut forks
    one process per mutant from the one that ran the tests first, and kills a mutant that runs past its limit:
    killed while it held that lock, it would leave every later mutant that makes a progress bar (predict)
    blocked on it until the test timeout, which counts them as caught. A lock of this process's own ends that."""
    if "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", ""):
        import threading

        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())


@pytest.fixture(autouse=True, scope="session")
def _a_working_folder_of_its_own_under_mutmut(tmp_path_factory):
    """mutmut runs every mutant's tests in one folder, mutants/. A mutant that turns a path into None writes a
    file called "None" there, and any later mutant that reads from None finds it: an export mutant that gave
    the registry None for the ONNX file was scored as surviving. Under mutmut (its clean and stats runs too, so
    those would show a test that needs the old folder), each run of the tests starts in a new empty folder."""
    if "MUTANT_UNDER_TEST" not in os.environ:
        yield
        return
    before = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(autouse=True, scope="session")
def _tests_use_their_own_mlflow_stores():
    """Every test uses an MLflow store in its own project copy: a MLFLOW_TRACKING_URI exported in the
    developer's shell must not send test runs to their server (module fixtures start before the per-test
    fixture below, so clear it once for the session too)."""
    os.environ.pop(config.TRACKING_URI_ENV, None)


@pytest.fixture(autouse=True)
def _tracking_uri_stays_in_its_test():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, which config.load() honours: without this,
    one test's MLflow store would leak into every later test and subprocess. Tests use their own stores."""
    os.environ.pop(config.TRACKING_URI_ENV, None)
    yield
    os.environ.pop(config.TRACKING_URI_ENV, None)


@pytest.fixture
def idx_mirror(tmp_path):
    splits, resources = write_mirror(tmp_path / "mirror")
    return tmp_path / "mirror", splits, resources


@pytest.fixture(scope="session")
def real_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits through the real download path (md5-checked), once per session."""
    mirror = os.environ.get(config.MIRROR_ENV, "")
    try:
        return data.fetch(mirror)
    except PipelineError as exc:
        message = f"real Fashion-MNIST data unavailable (set {config.MIRROR_ENV}): {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def training_splits(real_splits) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What the pipeline trains on and holds out: the genuine training images minus the validation split that
    params.yaml sets aside (as ingest does), the validation split, and the test set."""
    settings = config.load(Path(__file__).resolve().parents[1]).ingest
    images, labels = real_splits["train"]
    val = data.split_validation(images, labels, settings.validation_size, settings.validation_seed)
    rest = np.setdiff1d(np.arange(len(labels)), val)
    return {"train": (images[rest], labels[rest]), "val": (images[val], labels[val]), "test": real_splits["test"]}


@pytest.fixture
def project(tmp_path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory):
    """An exported model with random weights scaled like trained ones (logits of about +-15), and its module."""
    import torch

    from softmax_mlops.stages.export import ExportedSoftmaxRegression, export_onnx

    generator = torch.Generator().manual_seed(0)
    module = ExportedSoftmaxRegression(
        torch.randn(784, 10, generator=generator) * 0.1, torch.randn(10, generator=generator)
    )
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(module, path, opset=18)
    return path, module.eval()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test harness for the session, in its own PREFECT_HOME, quiet and without analytics."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
        mp.delenv("PREFECT_API_URL", raising=False)
        from prefect.testing.utilities import prefect_test_harness

        # Prefect's default of 30 s for its server to start ran out on a loaded 2-core machine (three test runs
        # side by side); this bounds a hang, not a speed
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """``make(db)`` puts an empty MLflow SQLite store at ``db`` and returns its URI. MLflow builds a new store
    by running its whole chain of schema migrations, a second or two each time; a copy of one store built once
    per process is the same empty, current-schema database, in a few milliseconds."""
    import shutil

    import mlflow

    template = _mlflow_template  # under mutmut, its fork server built one
    if template is None:
        template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the tables

    def make(db: Path) -> str:
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
        return f"sqlite:///{db}"

    return make
