"""`softmax-mlops predict` as a user runs it: outputs, formats, threads, and failures without tracebacks."""

import csv
import json
import os

import numpy as np
import pytest

from helpers import REPO, cli


@pytest.fixture
def images(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    return tmp_path / "x.npy", pixels


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_one_row_per_image_matching_the_model(onnx_model, images, tmp_path, suffix):
    from softmax_mlops.serving.inference import Predictor

    path, pixels = images
    out = tmp_path / f"out.{suffix}"
    result = cli(
        "predict", str(path), "-o", str(out), "-m", str(onnx_model[0]), "--batch-size", "7", "--top-k", "2", cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    _, probabilities = Predictor(onnx_model[0]).run(pixels)
    if suffix == "csv":
        rows = list(csv.DictReader(out.open()))
        assert list(rows[0]) == ["id", "class_id", "class_name", "probability", "top_k"]
        class_ids = [int(r["class_id"]) for r in rows]
        assert rows[0]["top_k"].count(";") == 1
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        class_ids = [r["class_id"] for r in rows]
        assert len(rows[0]["top_k"]) == 2 and rows[0]["top_k"][0]["class_id"] == rows[0]["class_id"]
        assert rows[0]["probability"] == pytest.approx(probabilities[0].max(), rel=1e-6)
    assert len(rows) == 50 and class_ids == probabilities.argmax(1).tolist()


def test_failure_leaves_no_output_and_no_traceback(onnx_model, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 28, 28), np.float64))
    out = tmp_path / "out.csv"
    result = cli("predict", str(tmp_path / "bad.npy"), "-o", str(out), "-m", str(onnx_model[0]), cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("expected uint8 pixels, got float64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


def test_missing_model_is_a_clear_error(images, tmp_path):
    result = cli("predict", str(images[0]), "-o", str(tmp_path / "o.csv"), "-m", str(tmp_path / "none.onnx"), cwd=REPO)
    assert result.returncode == 1 and "no ONNX model at" in result.stderr and "Traceback" not in result.stderr


def test_threads_follow_the_cpus_this_process_may_use(tmp_path):
    """Pinned to one CPU, the default is one thread, whatever the host's core count (os.cpu_count() would say
    the host's). The pin is this thread's own (Linux's sched_setaffinity(0) is per thread), and is undone."""
    from softmax_mlops.serving.inference import available_cpus

    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        pinned = available_cpus(tmp_path)  # a folder without quota files: the mask alone
    finally:
        os.sched_setaffinity(0, allowed)
    assert pinned == 1
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "cap"),
    [
        ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2: half a CPU rounds up to one
        ({"cpu.max": "150000 100000\n"}, 2),  # one and a half: two
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity mask alone
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 without a quota
        ({"cpu/cpu.cfs_quota_us": "0\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # the least quota: one CPU
        ({"cpu/cpu.cfs_quota_us": "100000\n"}, None),  # v1 without its period file: unreadable, so no cap
        # v2 is read first and wins; an unreadable v2 file is skipped for v1's
        ({"cpu.max": "150000 100000\n", "cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
        ({"cpu.max": "junk\n", "cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        # v2's "no quota" is an answer too: v1's files are not read after it
        ({"cpu.max": "max 100000\n", "cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cpus(tmp_path, files, cap):
    """The quota files of cgroup v2 (cpu.max) and v1 (cfs_quota_us, cfs_period_us), as a container runtime
    writes them for `--cpus`, in a folder of their own: the quota caps the affinity mask."""
    from softmax_mlops.serving.inference import available_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (affinity if cap is None else min(affinity, cap))


def test_explicit_threads_reach_onnxruntime(onnx_model):
    """The session's options as the Predictor sets them: the threads asked for within an operator, one thread
    between operators (the graph is one chain), and errors alone in the log (onnxruntime's warnings about a
    graph it optimises would otherwise fill the service's log; 3 is ERROR, 4 FATAL)."""
    from softmax_mlops.serving.inference import Predictor

    options = Predictor(onnx_model[0], threads=1).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level) == (1, 1, 3)


@pytest.mark.parametrize(
    "ids, names",
    [
        (np.arange(5, 10), [f"class {i}" for i in range(10)]),
        (
            ["a.png", "dir, with comma/b.png", 'quote"d.png', "new\nline.png", "plain/c.png"],
            ["t-shirt", "a,b", 'q"uote', "x\ry", *map(str, range(6))],
        ),
    ],
)
def test_fast_csv_text_is_what_the_csv_module_writes(ids, names):
    import csv
    import io

    from softmax_mlops.serving.predict import csv_text

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=5).astype(np.float32)
    probabilities[0, :] = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # 1.000000 and 0.000000
    top_ids = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    top_probs = np.take_along_axis(probabilities, top_ids, axis=1)
    top_ids[1:, 0] = [1, 2, 3, 1]  # the names that need quoting, in the class_name column too
    expected = io.StringIO()
    csv.writer(expected, lineterminator="\n").writerows(
        (i, row[0], names[row[0]], f"{p[0]:.6f}", ";".join(f"{names[c]}:{q:.6f}" for c, q in zip(row, p, strict=True)))
        for i, row, p in zip(
            ids if isinstance(ids, list) else ids.tolist(), top_ids.tolist(), top_probs.tolist(), strict=True
        )
    )
    assert csv_text(ids, top_ids, top_probs, names) == expected.getvalue()
