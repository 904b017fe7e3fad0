"""Signals at the two moments that used to leave an MLflow run RUNNING for good, sent for real (os.kill) from
SQLAlchemy's own event hooks in a real process, on a real SQLite store:

- between the store committing a new run and mlflow.start_run handing back the ActiveRun that ends it
  (CI hit this: `kill <dvc pid>` while train@scratch was opening its run);
- a second SIGTERM while the first one's cleanup is ending the run FAILED (a process group's SIGTERM, then the
  one the DVC watcher sends when DVC is gone).
"""

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import mlflow
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session
    from softmax_mlops import tracking
    from softmax_mlops.lifecycle import Interrupted, interrupt_on_signals

    when = sys.argv[2]
    seen = {"insert": False, "signals": 0}

    @event.listens_for(Engine, "before_cursor_execute")
    def before(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO RUNS"):
            seen["insert"] = True
        if when == "while ending" and statement.lstrip().upper().startswith("UPDATE RUNS") and seen["signals"] == 1:
            seen["signals"] += 1
            os.kill(os.getpid(), signal.SIGTERM)

    @event.listens_for(Session, "after_commit")
    def committed(session):
        if seen["insert"] and not seen["signals"]:
            seen["signals"] += 1
            os.kill(os.getpid(), signal.SIGTERM)

    mlflow.set_tracking_uri("sqlite:///" + sys.argv[1])
    experiment = mlflow.set_experiment("signals").experiment_id
    interrupt_on_signals()
    try:
        with tracking._open(experiment_id=experiment) as run:
            print("inside the run", flush=True)
    except Interrupted as exc:
        print("interrupted", exc, seen["signals"], flush=True)
        sys.exit(130)
    """
)


def statuses(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [status for (status,) in conn.execute("select status from runs")]


def run(tmp_path: Path, when: str, new_store) -> tuple[subprocess.CompletedProcess, list[str]]:
    db = tmp_path / "mlflow.db"
    new_store(db)  # an empty store: the script's signals watch the run's own statements, not the schema's
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db), when], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    return proc, statuses(db)


def test_a_signal_while_the_run_is_opened_ends_it_failed(tmp_path, new_mlflow_store):
    proc, status = run(tmp_path, "while opening", new_mlflow_store)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "interrupted SIGTERM 1" in proc.stdout
    assert "inside the run" not in proc.stdout, "the block never starts: the signal is raised at its door"
    assert status == ["FAILED"]


def test_a_second_signal_while_the_run_is_ended_does_not_cut_the_cleanup_short(tmp_path, new_mlflow_store):
    proc, status = run(tmp_path, "while ending", new_mlflow_store)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "interrupted SIGTERM 2" in proc.stdout, "both signals were sent"
    assert status == ["FAILED"]


def printed_by(code: str) -> list[str]:
    """The lines ``code`` prints, run in a fresh Python process that must exit 0."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_deferred_interrupts_hold_a_signal_until_the_block_ends():
    code = textwrap.dedent(
        """
        import os, signal
        from softmax_mlops.lifecycle import Interrupted, deferred_interrupts, interrupt_on_signals
        interrupt_on_signals()
        try:
            with deferred_interrupts():
                with deferred_interrupts():
                    os.kill(os.getpid(), signal.SIGINT)
                    sum(range(10_000))  # bytecodes after the signal, where the handler runs
                print("inner block ended whole", flush=True)
                sum(range(10_000))
                print("outer block ended whole", flush=True)
        except Interrupted as exc:
            print("raised after the block:", exc, flush=True)
        """
    )
    assert printed_by(code) == [
        "inner block ended whole",
        "outer block ended whole",
        "raised after the block: SIGINT",
    ]


def test_a_signal_after_a_swallowed_interrupt_still_stops_the_process():
    """An Interrupted raised where Python ignores exceptions (a weakref callback or __del__ during garbage
    collection prints "Exception ignored" and goes on) must not make the process deaf to the next signal."""
    code = textwrap.dedent(
        """
        import os, signal
        from softmax_mlops.lifecycle import Interrupted, interrupt_on_signals
        interrupt_on_signals()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10_000))
        except Interrupted:
            print("swallowed", flush=True)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10_000))
            print("deaf", flush=True)
        except Interrupted as exc:
            print("stopped by", exc, flush=True)
        """
    )
    assert printed_by(code) == ["swallowed", "stopped by SIGTERM"]
