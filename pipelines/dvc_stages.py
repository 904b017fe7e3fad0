"""Run DVC stages from Python, one at a time, so each becomes its own Prefect task.

Every stage goes through DVC's own `Repo.reproduce`, so a flow and `dvc repro` agree on what is up to date:
a stage with unchanged deps is a cache hit, in both. Parameter overrides run in a git worktree of HEAD
that shares the project's DVC cache, and end as a DVC experiment (`dvc exp show`), the way `dvc exp run -S`
does it: the user's params.yaml and workspace are never touched.

With a default DVC remote (`dvc remote add -d`, set with --local where the flow runs, so no credentials are
committed), stages pull what they need from it and the flow pushes their outputs and the run-cache back: a
stage that ran in one container is a cache hit in the next. Without one, nothing touches the network.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from softmax_mlops.errors import ERROR_FILE_ENV


class StageFailed(RuntimeError):
    """A DVC stage failed; the message is '<stage>: <the command's one-line error>'."""


class Outcome(enum.Enum):
    """What bringing a stage up to date took."""

    RAN = "ran"  # its command ran
    RESTORED = "restored"  # its outputs came from DVC's run-cache: the same deps and params ran before, anywhere
    UP_TO_DATE = "up to date"  # nothing to do, or its locked outputs were pulled from the remote


class _CommandStarts(logging.Handler):
    """Counts DVC's "Running stage '...':" records: the one sign that a stage's command ran rather than its
    outputs being restored from the run-cache (both count as reproduced for DVC)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Running stage '%s':":
            self.count += 1


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


def default_remote(workspace: Path) -> str | None:
    """The name of the project's default DVC remote, or None when it has none (the embedded default)."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return repo.config["core"].get("remote") or None


def reproduce(workspace: Path, stage: str, pull: bool = False) -> Outcome:
    """Bring one stage up to date, and say how: its command ran, its outputs were restored from the run-cache,
    or it was up to date already (or its outputs for the locked deps were pulled: ``pull`` is
    `dvc repro --pull`, from the default remote, run-cache included)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    starts = _CommandStarts()
    dvc_run_log = logging.getLogger("dvc.stage.run")
    level = dvc_run_log.level
    if not dvc_run_log.isEnabledFor(logging.INFO):  # DVC used as a library may log nothing below WARNING
        dvc_run_log.setLevel(logging.INFO)
    dvc_run_log.addHandler(starts)
    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error"
        try:
            # DVC resolves outputs against the working directory (its own executors chdir too)
            with (
                environment(**{ERROR_FILE_ENV: str(error_file)}),
                contextlib.chdir(workspace),
                Repo(str(workspace)) as repo,
            ):
                stages = repo.reproduce(stage, single_item=True, pull=pull)
        except DvcException as exc:
            # the stage command's own one-line error, else DVC's reason (it failed before or around the command)
            reason = error_file.read_text().strip() if error_file.exists() else _reason(exc)
            raise StageFailed(f"{stage}: {reason}") from None
        except Exception as exc:  # a remote's client (botocore) raises its own errors on --pull
            if not pull:
                raise
            raise StageFailed(f"{stage}: pulling from the DVC remote: {_reason(exc)}") from None
        finally:
            dvc_run_log.removeHandler(starts)
            dvc_run_log.setLevel(level)
    if not stages:
        return Outcome.UP_TO_DATE
    return Outcome.RAN if starts.count else Outcome.RESTORED


def push(workspace: Path, stages: Sequence[str]) -> int:
    """`dvc push --run-cache` of the stages' outputs to the default remote; returns how many files were sent.
    Fails as 'push: <DVC's reason>' (an unreachable store, refused credentials)."""
    from dvc.repo import Repo

    try:
        with contextlib.chdir(workspace), Repo(str(workspace)) as repo:
            return int(repo.push(targets=list(stages), run_cache=True))
    except Exception as exc:  # noqa: BLE001 - DVC's own errors, and the storage client's (botocore's) raw ones
        raise StageFailed(f"push: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    """The first line of an error and of its cause: DVC wraps the storage client's reason (the URL it could
    not reach) in a generic message."""
    cause = f": {exc.__cause__}" if exc.__cause__ and str(exc.__cause__) else ""
    return (str(exc) + cause).splitlines()[0]


@contextlib.contextmanager
def experiment_workspace(root: Path, overrides: Sequence[str]) -> Iterator[Path]:
    """A detached git worktree of HEAD with ``overrides`` (DVC's `-S key=value` syntax) applied to its
    params.yaml, using the project's DVC cache so cached stages and data are not copied or rerun, and the
    project's local remotes (a worktree has a .dvc/config.local of its own)."""
    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides

    parent = Path(tempfile.mkdtemp(prefix="softmax-mlops-exp-"))
    worktree = parent / "workspace"
    subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(worktree), "HEAD"], cwd=root, check=True)
    try:
        with Repo(str(root)) as project:
            cache_dir, local = project.cache.local_cache_dir, project.config.load_one("local")
        with Repo(str(worktree)) as repo, repo.config.edit("local") as conf:
            conf["cache"]["dir"] = str(cache_dir)
            conf["remote"].update(local.get("remote", {}))
            if remote := local.get("core", {}).get("remote"):
                conf["core"]["remote"] = remote
        apply_overrides(str(worktree / "params.yaml"), list(overrides))
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=root, check=False)
        shutil.rmtree(parent, ignore_errors=True)


def has_git(workspace: Path) -> bool:
    """False for a copy of the project without git (the images' /app, where DVC runs with core.no_scm)."""
    from dvc.repo import Repo
    from dvc.scm import NoSCM

    with Repo(str(workspace)) as repo:
        return not isinstance(repo.scm, NoSCM)


def override_in_place(workspace: Path, overrides: Sequence[str]) -> None:
    """Apply ``overrides`` (`key=value`, as `dvc exp run -S`) to the workspace's own params.yaml. Only for a
    disposable copy without git: a flow-run container of the Docker pool, whose copy dies with it. Its results
    live on in MLflow and in the DVC remote's run-cache; with no git there is no DVC experiment to record."""
    from dvc.utils.hydra import apply_overrides

    apply_overrides(str(workspace / "params.yaml"), list(overrides))


EXPERIMENT_LOCK = "softmax-mlops-exp-save.lock"  # in the git common directory, shared by every worktree
EXPERIMENT_LOCK_S = 600.0  # a save takes seconds; a holder stuck past this is reported, never waited on forever


def save_experiment(workspace: Path, stages: Sequence[str], name: str | None, lock_s: float = EXPERIMENT_LOCK_S) -> str:
    """Record the stages' results as a DVC experiment of the project; returns its name.

    Saves are serialized across processes with a file lock in the git directory that all worktrees share.
    `dvc exp save` writes refs that every worktree of a repository shares (refs/exps/exec/...): two sweep
    trials saving at the same moment clobbered each other's, and one failed inside DVC with
    "'NoneType' object is not subscriptable" (tests/unit/test_experiment_lock.py)."""
    from dvc.repo import Repo
    from filelock import FileLock, Timeout

    common = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=workspace,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    lock = Path(common) / EXPERIMENT_LOCK
    try:
        with FileLock(lock, timeout=lock_s), contextlib.chdir(workspace), Repo(str(workspace)) as repo:
            ref = repo.experiments.save(targets=list(stages), name=name, force=True)
            return ref.name if hasattr(ref, "name") else str(name or ref)
    except Timeout:
        raise StageFailed(f"dvc exp save: {lock} stayed locked for {lock_s:g} s by another save") from None
