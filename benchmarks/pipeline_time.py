"""Wall time of `dvc repro` in a clean clone of the committed HEAD (full run), then again with nothing changed.

Goals: full run <= 60 s, no-op <= 3 s. Uses the data mirror from FASHION_MNIST_MIRROR like the pipeline does.
Usage: FASHION_MNIST_MIRROR=../shared/fashion-mnist python benchmarks/pipeline_time.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return time.perf_counter() - start


def main() -> None:
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded SQLite default, fresh in the clone
    mirror = os.environ.get("FASHION_MNIST_MIRROR", "")
    if mirror and "://" not in mirror:  # relative to where you ran this, not to the clone the stages run in
        os.environ["FASHION_MNIST_MIRROR"] = str(Path(mirror).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        full = timed(["dvc", "repro"], clone)
        noop = timed(["dvc", "repro"], clone)
    print(f"dvc repro, clean clone : {full:6.1f} s   (goal <= 60 s)")
    print(f"dvc repro, no-op       : {noop:6.1f} s   (goal <= 3 s)")


if __name__ == "__main__":
    main()
