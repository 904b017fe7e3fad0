"""Atomic writes: every output appears whole or not at all.

An interrupted stage must not leave a half-written file that DVC or a later stage would take for a result,
so each writer gets a temporary path beside the target (same filesystem, so the rename is atomic). Every
rename is remembered, so a stage that fails later can take back what it wrote (``all_or_nothing``). Files get
the permissions a plain ``open()`` would give (0666 less the umask), not mkstemp's private 0600, so another
user, or the uid of a container sharing the volume, can read them (MLflow copies the mode into its artifacts).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
_written: list[Path] = []  # every target renamed into place by this process, in order


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``target`` only if the block succeeds.

    The temporary name keeps the target's suffix, because numpy and matplotlib choose formats by suffix. An
    OSError while writing (a read-only or full filesystem) becomes one line that names ``target``.
    """
    target = Path(target)
    tmp_path: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
        _written.append(target)
    except OSError as exc:
        ours = (
            exc.filename is None
            or Path(exc.filename) in (target, target.parent)
            or Path(exc.filename).parent == target.parent
        )  # the target, its folder, or the temporary file
        if not ours:
            raise PipelineError(f"{exc.filename}: {exc.strerror or exc}") from None
        raise PipelineError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Remove every file written inside the block if the block fails or is interrupted: a stage leaves its
    complete outputs or none (DVC has already removed the previous ones before running the stage)."""
    start = len(_written)
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):  # the CLI framework's normal exit
            raise
        for path in _written[start:]:
            path.unlink(missing_ok=True)
        del _written[start:]
        raise


def write_npz(target: str | Path, **arrays: Any) -> None:
    """Like np.savez, but byte-for-byte reproducible: np.savez stamps every zip member with the current time,
    so the same arrays gave a new file (and a new md5 in dvc.lock) on every run. Members are stored
    uncompressed with a fixed date; np.load reads the file as usual.

    Each member is written whole, with its size known (writestr), not streamed with force_zip64: Python
    3.11.2 (Debian's, in the images) and 3.11.7 wrote different version fields for a forced ZIP64 member, so
    the same arrays had another md5 in a container, and a stage that ran there was never a cache hit here."""
    import io
    import zipfile

    import numpy as np

    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=False)
            archive.writestr(member, buffer.getvalue())


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")
