"""Batch-inference readers at their edges, in process: each refusal word for word (they name the file), the
numbers in a truncation message, batches of an image folder, a single image, and the memory map that drops
the pages it has read. test_inputs.py covers the round trips and the usual bad inputs."""

import gzip
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import idx_bytes
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving.inputs import open_source


def collect(source):
    ids, batches = [], []
    for batch_ids, batch in source.batches:
        ids.extend(batch_ids.tolist() if isinstance(batch_ids, np.ndarray) else batch_ids)
        batches.append(batch)
    return ids, batches


def refusal(path: Path, batch_size: int = 2) -> str:
    with pytest.raises(PipelineError) as err:
        collect(open_source(path, batch_size))
    return str(err.value)


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# --- .npy ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 784, 1), (3, 100)])
def test_an_npy_of_another_shape_is_named_with_its_shape(tmp_path, shape):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(shape, np.uint8))
    assert refusal(path) == f"{path}: expected shape [N, 28, 28] or [N, 784], got {list(shape)}"


def test_a_fortran_ordered_npy_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.asfortranarray(pixels(3)))
    assert refusal(path) == (
        f"{path}: Fortran-ordered arrays are not supported; save it with np.save(np.ascontiguousarray(a))"
    )


def test_bytes_after_an_npys_array_are_ignored_as_numpy_ignores_them(tmp_path):
    """np.load reads the array its header describes and nothing after it; the memory map must stop there too."""
    path = tmp_path / "x.npy"
    np.save(path, pixels(3))
    with open(path, "ab") as fh:
        fh.write(bytes(1000))
    ids, batches = collect(open_source(path, 2))
    assert ids == [0, 1, 2] and np.array_equal(np.concatenate(batches), np.load(path))


def test_an_npy_with_an_oversized_header_is_refused_quoting_numpys_first_line(tmp_path):
    """numpy will not parse a header over 10,000 bytes (unless told to trust the file); its message runs over
    three lines and the error quotes the first."""
    array = pixels(2)
    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {array.shape}, }}".ljust(19_999) + "\n"
    path = tmp_path / "x.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + array.tobytes())
    assert refusal(path) == (
        f"{path} is not a readable .npy array: Header info length (20000) is large and may not be safe to load "
        "securely."
    )


# --- IDX, raw and gzipped -----------------------------------------------------------------------------------------


def test_a_raw_idx_longer_than_its_header_promises_is_refused(tmp_path):
    """IDX files hold exactly what their header says: more is a different file, not extra images to drop."""
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(pixels(5)) + b"trailing bytes")
    with pytest.raises(PipelineError) as caught:
        open_source(path, batch_size=2)
    assert str(caught.value) == f"{path} holds more than the 5 images its header promises"


def test_a_gzipped_idx_longer_than_its_header_promises_is_refused(tmp_path):
    path = tmp_path / "x.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(pixels(5)) + b"trailing bytes"))
    with pytest.raises(PipelineError) as caught:
        collect(open_source(path, batch_size=2))
    assert str(caught.value) == f"{path} holds more than the 5 images its header promises"


def test_a_gzip_whose_crc_does_not_match_is_corrupted(tmp_path):
    """The pixels inflate fine, but the trailer's CRC-32 is not theirs: gzip only checks it at the end."""
    path = tmp_path / "x.idx.gz"
    packed = bytearray(gzip.compress(idx_bytes(pixels(5))))
    packed[-8] ^= 0xFF  # the first byte of the CRC-32
    path.write_bytes(bytes(packed))
    with pytest.raises(PipelineError) as caught:
        collect(open_source(path, batch_size=2))
    assert str(caught.value).startswith(f"{path} is corrupted: CRC check failed")


def test_a_gzip_with_a_broken_deflate_stream_is_one_line(tmp_path):
    """Bytes changed in the second half of the compressed data: zlib's own error, which is not an OSError."""
    path = tmp_path / "x.idx.gz"
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    packed = bytearray(gzip.compress(idx_bytes(images), compresslevel=9))
    for i in range(len(packed) // 2, len(packed) - 8, 7):
        packed[i] ^= 0x5A
    path.write_bytes(bytes(packed))
    with pytest.raises(PipelineError) as caught:
        collect(open_source(path, batch_size=8))
    assert str(caught.value) == f"{path} is corrupted: Error -3 while decompressing data: invalid stored block lengths"


def idx_header(type_code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("gzipped", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "content, problem",
    [
        (idx_header(0x0D, (2, 28, 28)) + bytes(8 * 784), ": IDX data type 0x0d is not unsigned bytes (0x08)"),
        (idx_header(0x08, (2, 28, 28))[:9], ": truncated IDX header"),
        (idx_header(0x08, (3, 28, 27)) + bytes(3 * 28 * 27), ": expected IDX images [N, 28, 28], got [3, 28, 27]"),
        (idx_bytes(np.zeros(5, np.uint8)), " is an IDX label file, not images"),
    ],
    ids=["float-type", "short-header", "28x27", "labels"],
)
def test_a_bad_idx_header_is_named_exactly(tmp_path, content, problem, gzipped):
    path = tmp_path / ("x.gz" if gzipped else "x.idx")
    path.write_bytes(gzip.compress(content, mtime=0) if gzipped else content)
    assert refusal(path) == f"{path}{problem}"


def test_a_gzip_that_cannot_be_opened_is_named(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b\x09" + bytes(20))  # the gzip magic, then compression method 9
    assert refusal(path) == f"{path} is not a readable gzip file: Unknown compression method"


def test_garbage_after_a_short_gzip_member_is_corruption(tmp_path):
    """The header promises 6 images, the gzip member holds 5 and is followed by bytes that are not gzip."""
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, (6, 28, 28)) + pixels(5).tobytes(), mtime=0) + b"garbage!")
    assert refusal(path, batch_size=4) == f"{path} is corrupted: Not a gzipped file (b'ga')"


def test_a_truncated_gzip_names_the_first_incomplete_image(tmp_path):
    """5 images promised, 3.5 present, read 2 at a time: the second batch stops inside image 3 of 5."""
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, (5, 28, 28)) + pixels(5).tobytes()[: 784 * 7 // 2], mtime=0))
    source = open_source(path, batch_size=2)
    batches = iter(source.batches)
    ids, first = next(batches)
    assert ids.tolist() == [0, 1] and first.shape == (2, 28, 28)
    with pytest.raises(PipelineError) as err:
        next(batches)
    assert str(err.value) == f"{path} is truncated: image 3 of 5 is incomplete"


# --- the memory map -----------------------------------------------------------------------------------------------


def resident_kib(path: Path) -> int:
    """The resident size of this process's mappings of ``path`` (Rss in /proc/self/smaps); fails when the
    file is not mapped at all, so that a small number can only mean pages released."""
    total, inside, found = 0, False, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            fields = line.split()
            if fields and fields[0].count("-") == 1 and not fields[0].endswith(":"):  # a mapping's header line
                inside = line.rstrip("\n").endswith(str(path))
                found = found or inside
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    assert found, f"{path} is not memory-mapped"
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
@pytest.mark.parametrize("kind", ["idx", "npy"])
def test_the_memory_map_drops_the_pages_it_has_read(tmp_path, kind):
    """8 batches of 3.9 MB: after 7 of them the mapping holds less than half a batch, not the 27 MB read so
    far (a plain memory map keeps every page it touched) nor the first batch's pages."""
    images = pixels(40_000)
    path = (tmp_path / f"x.{kind}").resolve()
    if kind == "idx":
        path.write_bytes(idx_bytes(images))
    else:
        np.save(path, images)
    batches = iter(open_source(path, batch_size=5000).batches)
    for start in range(0, 35_000, 5000):
        ids, batch = next(batches)
        assert ids[0] == start
        np.testing.assert_array_equal(batch, images[start : start + 5000])
    assert resident_kib(path) < 5000 * 784 // 2 // 1024
    ((ids, batch),) = list(batches)
    assert ids[0] == 35_000
    np.testing.assert_array_equal(batch, images[35_000:])


# --- image folders and single images ------------------------------------------------------------------------------


def gray(value: int) -> Image.Image:
    return Image.new("L", (28, 28), value)


def test_a_folder_is_read_in_batches_of_the_asked_size(tmp_path):
    for i in range(5):
        gray(10 * i).save(tmp_path / f"{i}.png")
    source = open_source(tmp_path, batch_size=2)
    assert source.count == 5
    ids, batches = collect(source)
    assert ids == [f"{i}.png" for i in range(5)] and [len(b) for b in batches] == [2, 2, 1]
    assert [int(b[j, 0, 0]) for b in batches for j in range(len(b))] == [0, 10, 20, 30, 40]


def test_a_single_image_is_read_alone(tmp_path):
    """Not the folder it is in, and whatever the case of its suffix."""
    gray(7).save(tmp_path / "one.PNG")
    gray(200).save(tmp_path / "other.png")
    source = open_source(tmp_path / "one.PNG", batch_size=4)
    assert source.count == 1
    ids, batches = collect(source)
    assert ids == ["one.PNG"] and len(batches) == 1
    np.testing.assert_array_equal(batches[0], np.full((1, 28, 28), 7, np.uint8))


def test_a_bad_single_image_is_skipped_when_asked(tmp_path, capsys):
    path = tmp_path / "bad.png"
    path.write_bytes(b"not an image")
    source = open_source(path, batch_size=4, skip_bad=True)
    assert source.count == 1 and collect(source) == ([], [])
    assert capsys.readouterr().err.startswith(f"softmax-mlops: warning: skipped {path}: ")
    with pytest.raises(PipelineError, match=f"^{re.escape(str(path))}: "):
        collect(open_source(path, batch_size=4))
