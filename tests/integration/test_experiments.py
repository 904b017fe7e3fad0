"""Every way of running a DVC experiment logs to the project's own MLflow store: in the workspace, in a
temporary copy (--temp), and queued (--queue, then `dvc queue start`). A copy under .dvc/tmp/exps/ used to
resolve the default sqlite:///mlflow.db inside itself, and the record was deleted with the copy."""

import contextlib
import sqlite3
import time

import pytest

from helpers import copy_project, run_tool

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def project(real_splits, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("experiments") / "project")
    result = run_tool("dvc", "repro", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    return root


def runs_named(root, experiment: str) -> list[tuple[str, str]]:
    """(impl, status) of the project's MLflow runs tagged with a DVC experiment name."""
    with contextlib.closing(sqlite3.connect(root / "mlflow.db")) as db:
        return sorted(
            db.execute(
                "select i.value, r.status from runs r "
                "join tags t on t.run_uuid = r.run_uuid and t.key = 'dvc_exp_name' "
                "join tags i on i.run_uuid = r.run_uuid and i.key = 'impl' where t.value = ?",
                (experiment,),
            ).fetchall()
        )


WORKSPACE, TEMP = "lr0.05-workspace", "lr0.07-temp"
QUEUE_WAIT_S = 600  # one queued experiment: a 2-epoch chain of both implementations, about a minute


def wait_for_queued(root, name: str) -> str:
    """`dvc queue status` once the task ``name`` has ended, or a failure naming it after QUEUE_WAIT_S."""
    deadline = time.monotonic() + QUEUE_WAIT_S
    while time.monotonic() < deadline:
        status = run_tool("dvc", "queue", "status", cwd=root).stdout
        if name in status and ("Success" in status or "Failed" in status):
            return status
        time.sleep(2)
    pytest.fail(f"the queued experiment {name!r} did not end within {QUEUE_WAIT_S} s:\n{status}")


@pytest.fixture(scope="module")
def experiments(project):
    """Each way of running an experiment, once, before any test reads the store, so that no test depends on
    another having run first. Each has its own params: DVC's run cache would otherwise restore the outputs
    without running anything."""
    done = {
        WORKSPACE: run_tool("dvc", "exp", "run", "--name", WORKSPACE, "-S", "train.lr=0.05", cwd=project),
        TEMP: run_tool("dvc", "exp", "run", "--temp", "--name", TEMP, "-S", "train.lr=0.07", cwd=project),
    }
    queued = run_tool("dvc", "exp", "run", "--queue", "--name", "queued", "-S", "train.epochs=2", cwd=project)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    started = run_tool("dvc", "queue", "start", "--jobs", "1", cwd=project)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        done["queued"] = wait_for_queued(project, "queued")
        if "Success" not in done["queued"]:
            done["queued"] += run_tool("dvc", "queue", "logs", "queued", cwd=project).stdout
    finally:
        run_tool("dvc", "queue", "stop", "--kill", cwd=project)
    return done


@pytest.mark.parametrize("name", [WORKSPACE, TEMP], ids=["workspace", "temp"])
def test_exp_run_logs_to_the_project_store(project, experiments, name):
    result = experiments[name]
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs_named(project, name) == [("concise", "FINISHED"), ("scratch", "FINISHED")]
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "no store left inside an experiment copy"


def test_queued_experiments_log_to_the_project_store(project, experiments):
    assert "Success" in experiments["queued"], experiments["queued"]
    assert runs_named(project, "queued") == [("concise", "FINISHED"), ("scratch", "FINISHED")]


def test_the_readme_exp_show_command_keeps_only_the_headline_and_changed_params(project, experiments):
    """The README's own `dvc exp show` line, run as written, after the experiments above (one of them queued,
    which adds State and Executor columns unless dropped)."""
    import re
    import shlex

    from helpers import REPO

    (line,) = [row for row in (REPO / "README.md").read_text().splitlines() if row.startswith("dvc exp show")]
    command = shlex.split(line.split("#")[0])
    shown = run_tool(*command, cwd=project)
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()
    # the experiment, each implementation's test accuracy and the two params these experiments changed: nothing else
    assert rows[1].split() == [
        "Experiment",
        "metrics/scratch/headline.json:accuracy",
        "metrics/concise/headline.json:accuracy",
        "train.lr",
        "train.epochs",
    ], rows[1]
    assert WORKSPACE in shown.stdout
    # the README's arithmetic: 113 columns for one experiment named lr05, plus longer names, plus about 15 for
    # the second changed param (train.epochs, from the queued experiment)
    label = max(len(re.match(r"\s*(\S.*?)(\s{2,}|$)", row).group(1)) for row in rows[3:-1])
    width = max(len(row.rstrip()) for row in rows)
    assert width - (label - len("└── 1234567 [lr05]")) - 15 <= 120, shown.stdout
