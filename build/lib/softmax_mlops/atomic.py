"""Atomic writes: every output appears whole or not at all.

An interrupted stage must not leave a half-written file that DVC or a later stage would take for a result,
so each writer gets a temporary path beside the target (same filesystem, so the rename is atomic).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``target`` only if the block succeeds.

    The temporary name keeps the target's suffix, because numpy and matplotlib choose formats by suffix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")
