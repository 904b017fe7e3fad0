"""Run DVC stages from Python, one at a time, so each becomes its own Prefect task.

Every stage goes through DVC's own `Repo.reproduce`, so a flow and `dvc repro` agree on what is up to date:
a stage with unchanged deps is a cache hit, in both. Parameter overrides run in a git worktree of HEAD
that shares the project's DVC cache, and end as a DVC experiment (`dvc exp show`), the way `dvc exp run -S`
does it: the user's params.yaml and workspace are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from softmax_mlops.errors import ERROR_FILE_ENV


class StageFailed(RuntimeError):
    """A DVC stage failed; the message is '<stage>: <the command's one-line error>'."""


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the stage commands DVC starts, and restore them afterwards."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def reproduce(workspace: Path, stage: str) -> bool:
    """Bring one stage up to date. True when DVC reproduced it (ran its command, or restored its outputs from
    the run cache), False when it was already up to date."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error"
        try:
            # DVC resolves outputs against the working directory (its own executors chdir too)
            with (
                environment(**{ERROR_FILE_ENV: str(error_file)}),
                contextlib.chdir(workspace),
                Repo(str(workspace)) as repo,
            ):
                stages = repo.reproduce(stage, single_item=True)
        except DvcException as exc:
            if error_file.exists():  # the stage command's own one-line error
                reason = error_file.read_text().strip()
            else:  # DVC failed before or around the command: give its reason and the underlying cause
                cause = f": {exc.__cause__}" if exc.__cause__ and str(exc.__cause__) else ""
                reason = (str(exc) + cause).splitlines()[0]
            raise StageFailed(f"{stage}: {reason}") from None
    return bool(stages)


@contextlib.contextmanager
def experiment_workspace(root: Path, overrides: Sequence[str]) -> Iterator[Path]:
    """A detached git worktree of HEAD with ``overrides`` (DVC's `-S key=value` syntax) applied to its
    params.yaml, using the project's DVC cache so cached stages and data are not copied or rerun."""
    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides

    parent = Path(tempfile.mkdtemp(prefix="softmax-mlops-exp-"))
    worktree = parent / "workspace"
    subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(worktree), "HEAD"], cwd=root, check=True)
    try:
        with Repo(str(worktree)) as repo, repo.config.edit("local") as conf:
            conf["cache"]["dir"] = str(Repo(str(root)).cache.local_cache_dir)
        apply_overrides(str(worktree / "params.yaml"), list(overrides))
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=root, check=False)
        shutil.rmtree(parent, ignore_errors=True)


def save_experiment(workspace: Path, stages: Sequence[str], name: str | None) -> str:
    """Record the stages' results as a DVC experiment of the project; returns its name."""
    from dvc.repo import Repo

    with contextlib.chdir(workspace), Repo(str(workspace)) as repo:
        ref = repo.experiments.save(targets=list(stages), name=name, force=True)
        return ref.name if hasattr(ref, "name") else str(name or ref)
