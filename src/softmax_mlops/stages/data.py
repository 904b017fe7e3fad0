"""Fashion-MNIST through torchvision's own download and md5 check, turned into plain uint8/int64 arrays.

The ingest stage downloads into a fresh temporary folder every time: torchvision only checks that extracted
files *exist* before skipping a download, so reusing a folder could read a truncated file without noticing.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import write_json, write_npz
from ..classes import CLASS_NAMES, NUM_CLASSES
from ..errors import PipelineError, first_line

if TYPE_CHECKING:
    from ..config import IngestConfig, Paths

IMAGE_SHAPE = (28, 28)


def mirror_url(mirror: str) -> str:
    """A local folder or a URL, as the base URL torchvision appends file names to."""
    if "://" not in mirror:
        folder = Path(mirror).expanduser().resolve()
        if not folder.is_dir():
            raise PipelineError(f"Fashion-MNIST mirror folder {mirror!r} does not exist")
        return folder.as_uri() + "/"
    return mirror if mirror.endswith("/") else mirror + "/"


class _FileHandlerWithLength(urllib.request.FileHandler):
    """urllib's file:// responses lack ``.length``, which torchvision's progress bar reads."""

    def file_open(self, req: urllib.request.Request) -> Any:  # urllib's own signature; a response object
        response: Any = super().file_open(req)  # an addinfourl, which has no .length
        response.length = int(response.headers.get("Content-length") or 0) or None
        return response


@contextlib.contextmanager
def _file_urls_supported() -> Iterator[None]:
    previous = getattr(urllib.request, "_opener", None)  # restore whatever opener was installed before
    urllib.request.install_opener(urllib.request.build_opener(_FileHandlerWithLength))
    try:
        yield
    finally:
        urllib.request.install_opener(previous)


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _diagnose(raw_folder: Path, resources: Sequence[tuple[str, str]], base_url: str, error: Exception) -> str:
    """Name the file that failed and why, in one line, instead of torchvision's multi-line message."""
    for filename, md5 in resources:
        path = raw_folder / filename
        if not path.exists():
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            return f"could not download {filename} from {base_url} (expected md5 {md5}): {reason}"
        actual = file_md5(path)
        if actual != md5:
            return (
                f"{filename} from {base_url} is corrupted or truncated: md5 {actual}, expected {md5} "
                f"({path.stat().st_size} bytes)"
            )
    return f"Fashion-MNIST could not be read: {error}".replace("\n", " ")


def source_files(resources: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The (file name, md5) pairs to fetch and record: torchvision's upstream list, unless a test passes the
    md5s of its own generated files."""
    from torchvision.datasets import FashionMNIST

    return list(FashionMNIST.resources if resources is None else resources)


def _dataset_class(mirror: str, resources: Sequence[tuple[str, str]] | None) -> Any:
    from torchvision.datasets import FashionMNIST

    attrs: dict[str, object] = {"resources": source_files(resources)}
    if mirror:
        attrs["mirrors"] = [mirror_url(mirror)]
    return type("FashionMNIST", (FashionMNIST,), attrs)


def torchvision_dataset(  # noqa: ANN201
    mirror: str,
    root: str | Path,
    train: bool,
    transform=None,  # noqa: ANN001
    resources: Sequence[tuple[str, str]] | None = None,
):
    """torchvision's FashionMNIST from the configured mirror (for the textbook-style reference benchmark)."""
    with _file_urls_supported():
        return _dataset_class(mirror, resources)(root, train=train, download=True, transform=transform)


def fetch(
    mirror: str = "", resources: Sequence[tuple[str, str]] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Download (or copy from a mirror), md5-verify and decode both splits.

    ``resources`` replaces torchvision's (file name, md5) list; tests use it to serve small generated IDX files
    through the very same download path.
    """
    dataset_cls = _dataset_class(mirror, resources)
    base_url = dataset_cls.mirrors[0]

    with tempfile.TemporaryDirectory(prefix="fashion-mnist-") as tmp, _file_urls_supported():
        splits = {}
        try:
            for split in ("train", "test"):
                ds = dataset_cls(tmp, train=split == "train", download=True)
                splits[split] = (ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64))
        except (RuntimeError, OSError, ValueError) as exc:
            raw_folder = Path(tmp) / "FashionMNIST" / "raw"
            raise PipelineError(_diagnose(raw_folder, dataset_cls.resources, base_url, exc)) from None
    return splits


def arrays_md5(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A content hash of the decoded data: stable across npz containers, so MLflow runs can be matched to data."""
    digest = hashlib.md5()
    for split in sorted(splits):
        for array in splits[split]:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def split_validation(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices (sorted) of a seeded, stratified validation split: each class keeps its share of the images.

    scikit-learn's own stratified split, so the class proportions and the seed's meaning are a well-kept
    library's, not ours."""
    from sklearn.model_selection import train_test_split

    try:
        _, val = train_test_split(np.arange(len(labels)), test_size=size, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise PipelineError(
            f"ingest.validation_size {size} does not fit {len(labels)} training images: {exc}"
        ) from None
    return np.sort(val)


def summarize(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    resources: Sequence[tuple[str, str]],
    validation_indices: np.ndarray,
    seed: int,
) -> dict:
    """Counts per split and class, the validation split's indices into the 60,000 training images, and hashes
    of the source files and of the decoded arrays of every split."""
    summary: dict = {}
    for split, (_, labels) in splits.items():
        counts = np.bincount(labels, minlength=NUM_CLASSES)
        summary[split] = {"count": int(len(labels)), "per_class": dict(zip(CLASS_NAMES, map(int, counts), strict=True))}
    summary["val"] |= {"seed": seed, "indices": validation_indices.tolist()}
    summary["data_md5"] = arrays_md5(splits)
    summary["source_md5"] = dict(resources)
    return summary


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write_npz(path, images=images, labels=labels)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a prepared split (no pickle), checking what a hand-edited or stale file could get wrong."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: run `dvc repro ingest` (or `softmax-mlops ingest`) first") from None
    except (KeyError, ValueError, OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        raise PipelineError(f"{path} is not a prepared split (images, labels): {first_line(exc)}") from None
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
        raise PipelineError(
            f"{path}: expected uint8 images [N, 28, 28] and N labels, got "
            f"{images.dtype} {images.shape} and {labels.shape}"
        )
    return images, labels.astype(np.int64, copy=False)


@dataclass(frozen=True)
class Ingested:
    """What the ingest stage wrote."""

    counts: Mapping[str, int]  # images per split: train, val, test
    data_md5: str  # the hash of the decoded arrays of every split
    summary: Mapping[str, Any]  # data/prepared/summary.json, as written


def ingest(settings: IngestConfig, paths: Paths, resources: Sequence[tuple[str, str]] | None = None) -> Ingested:
    """The ingest stage: fetch and verify everything first, then write, so a failure writes nothing. The
    official training images are split into train (what training sees) and val (for calibration)."""
    resources = source_files(resources)
    official = fetch(settings.mirror, resources)
    images, labels = official["train"]
    val = split_validation(images, labels, settings.validation_size, settings.validation_seed)
    rest = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    splits = {"train": (images[rest], labels[rest]), "val": (images[val], labels[val]), "test": official["test"]}
    for split, path in (("train", paths.train_data), ("val", paths.val_data), ("test", paths.test_data)):
        save_split(path, *splits[split])
    summary = summarize(splits, resources, val, settings.validation_seed)
    write_json(paths.data_summary, summary)
    return Ingested(
        counts={split: summary[split]["count"] for split in splits}, data_md5=summary["data_md5"], summary=summary
    )
