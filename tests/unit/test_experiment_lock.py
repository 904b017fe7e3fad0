"""Two experiments saved at the same moment, from two git worktrees of one project, in two real processes.

`dvc exp save` writes refs that every worktree of a repository shares (refs/exps/exec/...). Two sweep trials
of the process pool, each in its own worktree, saved at once and clobbered each other's: one failed inside
DVC with "'NoneType' object is not subscriptable" (the first run of benchmarks/sweep_concurrency.py at
concurrency 2). save_experiment now holds a file lock in the git directory the worktrees share; without it,
this test failed in its first round.
"""

from __future__ import annotations

import multiprocessing
import subprocess
from pathlib import Path

import pytest

from helpers import run_tool
from pipelines.dvc_stages import EXPERIMENT_LOCK, StageFailed, experiment_workspace, reproduce, save_experiment

pytestmark = pytest.mark.timeout(600)

ROUNDS = 3


def git(*args: str, cwd: Path) -> str:
    result = run_tool("git", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository with DVC and one stage whose output depends on a parameter."""
    root = tmp_path_factory.mktemp("exp-lock")
    git("init", "-q", cwd=root)
    git("config", "user.email", "test@example.org", cwd=root)
    git("config", "user.name", "test", cwd=root)
    assert run_tool("dvc", "init", "-q", cwd=root).returncode == 0
    (root / "params.yaml").write_text("x: 0\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: echo ${x} > out.txt\n    params: [x]\n    outs: [out.txt]\n"
    )
    (root / ".gitignore").write_text("/out.txt\n")
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "init", cwd=root)
    return root


def trial(root: str, value: int, name: str, barrier, results) -> None:
    """One sweep trial, reduced to what races: its worktree, its stage, then the save, at the barrier."""
    try:
        with experiment_workspace(Path(root), [f"x={value}"]) as ws:
            reproduce(ws, "make")
            barrier.wait(timeout=120)
            results.put((name, save_experiment(ws, ["make"], name)))
    except Exception as exc:  # noqa: BLE001 - reported to the test, which shows it
        results.put((name, repr(exc)))


def test_two_experiments_saved_at_once_are_both_recorded(project):
    spawn = multiprocessing.get_context("spawn")
    for round_ in range(ROUNDS):
        barrier, results = spawn.Barrier(2), spawn.Queue()
        names = [f"r{round_}-a", f"r{round_}-b"]
        workers = [
            spawn.Process(target=trial, args=(str(project), 10 * round_ + i, name, barrier, results))
            for i, name in enumerate(names)
        ]
        for worker in workers:
            worker.start()
        saved = dict(results.get(timeout=300) for _ in workers)
        for worker in workers:
            worker.join(timeout=60)
        assert saved == {name: name for name in names}, f"round {round_}: {saved}"
        refs = git("for-each-ref", "--format=%(refname)", "refs/exps", cwd=project)
        assert all(f"/{name}\n" in refs for name in names), refs


def test_a_save_that_waits_too_long_fails_in_one_line_naming_the_lock(project):
    from filelock import FileLock

    common = Path(git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=project).strip())
    with FileLock(common / EXPERIMENT_LOCK), experiment_workspace(project, ["x=99"]) as ws:
        reproduce(ws, "make")
        with pytest.raises(StageFailed) as waited:
            save_experiment(ws, ["make"], "never", lock_s=1)
    assert str(waited.value) == f"dvc exp save: {common / EXPERIMENT_LOCK} stayed locked for 1 s by another save"
    assert (
        "never"
        not in subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=project, capture_output=True, text=True).stdout
    )
