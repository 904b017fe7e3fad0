"""How a `softmax-mlops` process ends: SIGTERM like Ctrl-C, and never outliving the DVC run that started it.

`docker stop`, Kubernetes and Prefect workers stop processes with SIGTERM, whose default action kills Python
on the spot: no `finally`, so the MLflow run stays RUNNING and temporary files stay behind. Both SIGINT and
SIGTERM raise ``Interrupted`` instead, which unwinds through every `finally` and `with` like Ctrl-C does. It
is not KeyboardInterrupt because the CLI framework turns that into a bare "Aborted!"; like KeyboardInterrupt,
it is a BaseException, so no library's `except Exception` swallows it.

DVC runs a stage's command as a child and does not pass SIGTERM on: `kill <dvc pid>` used to leave the
stage training on and writing outputs behind DVC's back. Under DVC (which sets DVC_STAGE for the command),
a watcher thread sends this process SIGTERM as soon as the process that ran the stage is gone.

Two steps must not be cut in half, and are guarded here:
- `deferred_interrupts()` holds a signal until a block ends. Opening an MLflow run writes it RUNNING and only
  then hands back the object whose exit ends it; a signal in between left the run RUNNING for good.
- A signal that arrives while an earlier one's ``Interrupted`` is being handled (cleanup: `finally` blocks and
  `__exit__` methods ending the run FAILED and taking back outputs) is ignored: it comes from an impatient
  `kill`, a process group's SIGTERM followed by the watcher's, or Ctrl-C twice, and raising again would
  abandon the cleanup half done. Once no ``Interrupted`` is in flight (one raised where Python ignores
  exceptions, such as a weakref callback, is gone), the next signal raises again. SIGKILL stops at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; the message names the signal."""


class _State:
    """The depth of `deferred_interrupts` blocks, and a signal held until the outermost one ends."""

    deferred = 0
    pending: int | None = None


def _interrupt(signum: int) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _cleaning_up() -> bool:
    """Whether an ``Interrupted`` is being handled where the signal arrived: the exception in flight in a
    `finally`, `except` or `__exit__` (which the handler's thread sees), or one it was raised from."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, Interrupted):
            return True
        exc = exc.__context__
    return False


def interrupt_on_signals() -> None:
    def handler(signum: int, frame: object) -> None:
        if _cleaning_up():
            return  # already stopping: let the cleanup finish
        if _State.deferred:
            _State.pending = _State.pending or signum
            return
        _interrupt(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block whole: a SIGINT or SIGTERM that arrives during it is raised when it ends (as
    ``Interrupted``, where a `with` around the block's result can handle it)."""
    _State.deferred += 1
    try:
        yield
    finally:
        _State.deferred -= 1
        if not _State.deferred and _State.pending is not None:
            signum, _State.pending = _State.pending, None
            _interrupt(signum)


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(command name, state, parent pid) of ``pid`` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    state, ppid = raw[raw.rindex(")") + 2 :].split()[:2]
    return name, state, int(ppid)


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def stage_runner(pid: int | None = None) -> int | None:
    """The process that runs this stage for DVC: the parent, or the grandparent when the parent is the shell
    DVC starts the command in. None outside DVC, or where /proc is not available."""
    if not os.environ.get("DVC_STAGE"):
        return None
    parent = os.getppid() if pid is None else pid
    stat = _stat(parent)
    if stat is None:
        return None
    if stat[0] in SHELLS and stat[2] > 1:
        return stat[2]
    return parent


def follow_stage_runner(interval: float = 1.0) -> None:
    """Stop (SIGTERM to self, handled as an interrupt) when the process running this stage disappears."""
    runner = stage_runner()
    if runner is None or runner == 1:
        return

    def watch() -> None:
        while _alive(runner):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="follow-dvc", daemon=True).start()
