"""The drift module in process, at its edges: the reference file's refusals word for word, the collector's
bounded float32 buffers and its uniform reservoir sample, every number of a report against scipy called
directly, the strict ``p < alpha`` boundary, and the exact text of the summary and the Markdown artifact.

test_drift.py covers the common path and test_guards_drift.py the refusals through the real CLI (a subprocess,
which mutation testing cannot see); these pin the details those leave open."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from helpers import Trap
from softmax_mlops.errors import PipelineError
from softmax_mlops.serving import drift


def probabilities_of(rng: np.random.Generator, n: int, classes: int = 10) -> np.ndarray:
    return rng.dirichlet(np.ones(classes), size=n).astype(np.float32)


def pixels_of(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def refused(path: Path) -> str:
    with pytest.raises(PipelineError) as err:
        drift.load_reference(path)
    return str(err.value)


# --- intensity and the reference file -----------------------------------------------------------------------------


def test_intensity_is_the_float64_mean_of_each_image_as_float32():
    """Float pixels too are averaged in double precision and rounded once: float32 accumulation would differ
    in the last bit for about a third of these images."""
    images = (np.random.default_rng(0).random((200, 28, 28)) * 255).astype(np.float32)
    expected = images.reshape(200, 784).astype(np.float64).mean(axis=1).astype(np.float32) / np.float32(255.0)
    got = drift.intensity(images)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_save_reference_stores_float32_probabilities_and_intensities(tmp_path):
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(10), size=40)  # float64, as a caller may hand them over
    images = pixels_of(rng, 40)
    drift.save_reference(tmp_path / "ref.npz", probabilities, images)
    reference = drift.load_reference(tmp_path / "ref.npz")
    assert set(reference) == {"probabilities", "intensity"}
    assert reference["probabilities"].dtype == np.float32 and reference["intensity"].dtype == np.float32
    np.testing.assert_array_equal(reference["probabilities"], probabilities.astype(np.float32))
    np.testing.assert_array_equal(reference["intensity"], drift.intensity(images))


def test_a_one_image_reference_loads(tmp_path):
    rng = np.random.default_rng(2)
    probabilities, images = probabilities_of(rng, 1), pixels_of(rng, 1)
    drift.save_reference(tmp_path / "one.npz", probabilities, images)
    reference = drift.load_reference(tmp_path / "one.npz")
    np.testing.assert_array_equal(reference["probabilities"], probabilities)
    assert reference["intensity"].shape == (1,)


def test_a_reference_that_needs_a_newer_zip_version_is_one_line(tmp_path):
    """zipfile refuses such an archive with NotImplementedError, which is neither OSError nor ValueError."""
    rng = np.random.default_rng(3)
    path = tmp_path / drift.REFERENCE_FILE
    drift.save_reference(path, probabilities_of(rng, 5), pixels_of(rng, 5))
    raw = path.read_bytes()
    directory = raw.rfind(b"PK\x01\x02")  # the last member's "version needed to extract" set to 25.5
    path.write_bytes(raw[: directory + 6] + bytes([255, 0]) + raw[directory + 8 :])
    with pytest.raises(PipelineError) as caught:
        drift.load_reference(path)
    assert str(caught.value) == f"{path} is not a drift reference: zip file version 25.5"


def test_a_lone_npy_array_is_named_with_its_dtype_and_shape(tmp_path):
    path = tmp_path / drift.REFERENCE_FILE
    with open(path, "wb") as fh:  # np.save on an open file keeps the .npz name
        np.save(fh, np.zeros((300, 10), np.float32))
    assert refused(path) == f"{path} is not a drift reference: a single float32 array [300, 10], not an .npz archive"


def test_object_arrays_are_refused_without_being_unpickled(tmp_path):
    path, marker = tmp_path / drift.REFERENCE_FILE, tmp_path / "unpickled"
    trap = np.array([Trap(marker)], dtype=object)
    with open(path, "wb") as fh:
        np.savez(fh, probabilities=trap, intensity=trap)
    assert refused(path) == (f"{path} is not a drift reference: Object arrays cannot be loaded when allow_pickle=False")
    assert not marker.exists(), "the reference was unpickled"


def npy_with_a_long_header(array: np.ndarray, header_bytes: int) -> bytes:
    """A version 1.0 .npy whose header is padded to ``header_bytes``: numpy refuses to parse headers over
    10,000 bytes unless pickles are allowed too."""
    header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {array.shape}, }}"
    header = header.ljust(header_bytes - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + array.tobytes()


def test_an_oversized_header_is_refused_and_only_its_first_line_quoted(tmp_path):
    """numpy's message runs over three lines; the error quotes the first."""
    import zipfile

    path = tmp_path / drift.REFERENCE_FILE
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("probabilities.npy", npy_with_a_long_header(np.full((5, 10), 0.1, np.float32), 20_000))
        archive.writestr("intensity.npy", npy_with_a_long_header(np.zeros(5, np.float32), 128))
    assert refused(path) == (
        f"{path} is not a drift reference: Header info length (20000) is large and may not be safe to load securely."
    )


@pytest.mark.parametrize(
    "probabilities, intensity, got",
    [
        (np.zeros((300, 10), np.int64), np.zeros(300, np.float32), "int64 [300, 10] and float32 [300]"),
        (np.zeros((300, 10), np.float32), np.zeros(300, np.uint8), "float32 [300, 10] and uint8 [300]"),
        (np.zeros((300, 10), np.float32), np.zeros(200, np.float32), "float32 [300, 10] and float32 [200]"),
        (np.zeros((300, 10), np.float32), np.zeros((300, 2), np.float32), "float32 [300, 10] and float32 [300, 2]"),
        (np.zeros(300, np.float32), np.zeros(300, np.float32), "float32 [300] and float32 [300]"),
        (np.zeros((0, 10), np.float32), np.zeros(0, np.float32), "float32 [0, 10] and float32 [0]"),
    ],
    ids=["int-probabilities", "int-intensity", "lengths-differ", "2d-intensity", "1d-probabilities", "empty"],
)
def test_a_reference_of_the_wrong_shape_or_dtype_is_named_exactly(tmp_path, probabilities, intensity, got):
    path = tmp_path / drift.REFERENCE_FILE
    with open(path, "wb") as fh:
        np.savez(fh, probabilities=probabilities, intensity=intensity)
    assert refused(path) == (
        f"{path} is not a drift reference: expected float probabilities [N, classes] and intensity [N], got {got}"
    )


# --- the collector ------------------------------------------------------------------------------------------------


def test_the_collector_keeps_float32_samples_and_integer_counts(tmp_path):
    """Its memory is what the docstring promises: 11 float32 per sampled image, whatever the input dtype, and
    class counts that stay integers in the JSON report."""
    rng = np.random.default_rng(3)
    collector = drift.Collector(capacity=50)
    collector.add(pixels_of(rng, 30), rng.dirichlet(np.ones(10), size=30))  # float64 probabilities
    collector.add(pixels_of(rng, 40), rng.dirichlet(np.ones(10), size=40))
    keys, probabilities, intensities = collector.sample()
    assert probabilities.dtype == np.float32 and probabilities.shape == (50, 10)
    assert intensities.dtype == np.float32 and intensities.shape == (50,)
    assert probabilities.nbytes + intensities.nbytes == 50 * 11 * 4
    assert keys.dtype == np.uint64 and (np.diff(keys.astype(np.float64)) > 0).all()  # in key order
    assert collector.counts.dtype == np.int64 and collector.counts.sum() == 70
    reference = {"probabilities": probabilities_of(rng, 100), "intensity": drift.intensity(pixels_of(rng, 100))}
    report = collector.report(reference, alpha=0.05, min_images=10)
    counts = report["tests"]["chi2_predicted_class"]["batch_counts"]
    assert json.loads(json.dumps(counts)) == counts and all(type(c) is int for c in counts)


def test_the_sample_keeps_each_image_with_equal_chance():
    """Room for one image out of four: over 2,000 seeds each image is the one kept a quarter of the time (a
    standard deviation of 0.01: 0.2-0.3 is five of them either side). Keys that ignored the seed, or favoured
    early or late positions, skew this towards one image."""
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (0, 85, 170, 255)])
    probabilities = np.full((4, 10), 0.1, np.float32)
    kept = np.zeros(4, int)
    for seed in range(2000):
        collector = drift.Collector(capacity=1, seed=seed)
        collector.add(images[:1], probabilities[:1])
        collector.add(images[1:], probabilities[1:])
        assert collector.seen == 4
        kept[int(round(float(collector.sample()[2][0]) * 3))] += 1
    assert all(0.2 < share < 0.3 for share in kept / 2000), kept


def test_the_keys_of_distinct_positions_are_distinct_and_seeded():
    positions = np.arange(200_000)
    keys = drift.sample_keys(positions, seed=0)
    assert len(np.unique(keys)) == len(positions)
    assert not np.array_equal(keys, drift.sample_keys(positions, seed=1))
    assert np.array_equal(keys[1000:2000], drift.sample_keys(np.arange(1000, 2000), seed=0))


def splitmix64(state: int) -> tuple[int, int]:
    """SplitMix64 (Steele, Lea and Flood 2014; the reference C in Vigna's xoshiro seeding), in plain integers:
    the next state and its output."""
    state = (state + 0x9E3779B97F4A7C15) % 2**64
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return state, z ^ (z >> 31)


def test_the_keys_are_splitmix64_outputs():
    """Position i under seed s is output s + 1 of SplitMix64 seeded with i: its published first outputs from
    seeds 0 and 1 (0xe220a8397b1dcdaf, 0x910a2dec89025cc1), and a reference in plain Python integers elsewhere."""
    assert [int(k) for k in drift.sample_keys(np.array([0, 1]), seed=0)] == [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1]
    positions = [0, 1, 2, 999, 2**32 + 5, 2**63 - 1]
    for seed in (0, 1, 7):
        expected = []
        for position in positions:
            state = position
            for _ in range(seed + 1):
                state, output = splitmix64(state)
            expected.append(output)
        assert [int(k) for k in drift.sample_keys(np.array(positions, np.int64), seed=seed)] == expected


def shard_collectors(images, probabilities, cuts, capacity, seed=0) -> list:
    """One collector per shard of the batch, each told where its shard starts, batched within the shard."""
    collectors = []
    for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
        collector = drift.Collector(capacity=capacity, seed=seed)
        for first in range(start, stop, 37):
            last = min(first + 37, stop)
            collector.add(images[first:last], probabilities[first:last], start=first)
        collectors.append(collector)
    return collectors


@pytest.mark.parametrize("capacity", [1, 64, 500, 5000])
def test_merged_shards_give_exactly_the_single_process_report(capacity):
    """Shards cut anywhere (one of them empty), collected apart and merged in any order: the same sample, in the
    same order, the same counts, and so the same report to the last bit as one collector over the whole batch."""
    rng = np.random.default_rng(9)
    images, probabilities = pixels_of(rng, 1200), probabilities_of(rng, 1200)
    reference = {"probabilities": probabilities_of(rng, 300), "intensity": drift.intensity(pixels_of(rng, 300))}
    (single,) = shard_collectors(images, probabilities, [0, 1200], capacity)
    shards = shard_collectors(images, probabilities, [0, 5, 5, 400, 1101, 1200], capacity)
    merged = drift.Collector(capacity=capacity)
    for i in (3, 0, 4, 1, 2):
        merged.merge(shards[i])
    assert merged.seen == single.seen == 1200 and np.array_equal(merged.counts, single.counts)
    for ours, theirs in zip(merged.sample(), single.sample(), strict=True):
        assert np.array_equal(ours, theirs)
    assert merged.report(reference, 0.05, 10) == single.report(reference, 0.05, 10)


def test_a_collector_of_another_seed_or_size_is_refused():
    rng = np.random.default_rng(1)
    other = drift.Collector(capacity=10, seed=1)
    other.add(pixels_of(rng, 3), probabilities_of(rng, 3))
    with pytest.raises(ValueError, match="seed 1, capacity 10 into one of seed 0, capacity 10"):
        drift.Collector(capacity=10).merge(other)
    with pytest.raises(ValueError, match="seed 0, capacity 9 into one of seed 0, capacity 10"):
        drift.Collector(capacity=10).merge(drift.Collector(capacity=9))


def held(collector: drift.Collector) -> int:
    """The images the collector really holds: the rows of its parts, not its own count of them."""
    return sum(len(keys) for keys, _, _ in collector._parts)


def test_the_collector_holds_at_most_twice_its_capacity_between_compactions():
    """The docstring's memory bound, on the arrays themselves: never more than 2 x capacity rows, and its count
    of them true."""
    rng = np.random.default_rng(2)
    collector = drift.Collector(capacity=100)
    for _ in range(300):
        collector.add(pixels_of(rng, 7), probabilities_of(rng, 7))
        assert collector._held == held(collector) <= 2 * 100
    assert collector.sample()[0].shape == (100,)


def test_it_compacts_only_past_twice_its_capacity():
    """Compaction sorts everything held, so it waits until more than 2 x capacity rows are held: the sort's cost
    is then spread over at least `capacity` new images, not paid on every batch."""
    rng = np.random.default_rng(6)
    collector = drift.Collector(capacity=100)
    for n in range(1, 5):
        collector.add(pixels_of(rng, 50), probabilities_of(rng, 50))
        assert len(collector._parts) == n and held(collector) == 50 * n  # exactly 2 x capacity at n = 4: kept
    collector.add(pixels_of(rng, 50), probabilities_of(rng, 50))
    assert len(collector._parts) == 1 and held(collector) == 100


def test_once_full_it_holds_only_images_that_could_still_be_sampled():
    """After a compaction to `capacity` rows, an image whose key is above the largest kept key can never be
    sampled, so a long batch adds almost nothing: exactly its images with smaller keys."""
    rng = np.random.default_rng(7)
    collector = drift.Collector(capacity=100)
    collector.add(pixels_of(rng, 2500), probabilities_of(rng, 2500))  # 2,500 > 200: compacted to 100
    assert held(collector) == 100
    largest = int(collector.sample()[0][-1])
    keys = drift.sample_keys(np.arange(2500, 3500), seed=0)
    collector.add(pixels_of(rng, 1000), probabilities_of(rng, 1000))
    assert held(collector) == 100 + int((keys < largest).sum()) < 200  # about 1,000 x 100 / 2,500 = 40 more


def test_a_collector_sampled_before_it_is_full_still_takes_every_image():
    """report() or save() may sample a collector that has room left; the images added after that must all still
    be kept, not cut at the largest key sampled so far."""
    rng = np.random.default_rng(10)
    collector = drift.Collector(capacity=100)
    collector.add(pixels_of(rng, 30), probabilities_of(rng, 30))
    assert len(collector.sample()[0]) == 30
    collector.add(pixels_of(rng, 30), probabilities_of(rng, 30))
    assert len(collector.sample()[0]) == 60


@pytest.mark.parametrize(
    "capacity, images, batch",
    # 503 images at once at capacity 64: a case where selecting one rank too few (argpartition at capacity - 2)
    # keeps a wrong key. numpy's introselect mostly leaves the next smallest key in place, so few cases show it.
    [(1, 5000, 37), (64, 5000, 37), (500, 5000, 37), (64, 503, 503)],
)
def test_the_sample_is_the_images_with_the_smallest_keys(capacity, images, batch):
    """Known answer: the sample is exactly the `capacity` smallest of sample_keys(0..images-1), in order."""
    rng = np.random.default_rng(11)
    pixels, probabilities = pixels_of(rng, images), probabilities_of(rng, images)
    collector = drift.Collector(capacity=capacity)
    for first in range(0, images, batch):
        collector.add(pixels[first : first + batch], probabilities[first : first + batch])
    expected = np.sort(drift.sample_keys(np.arange(images), seed=0))[:capacity]
    assert np.array_equal(collector.sample()[0], expected)


def test_an_unchanged_collector_is_not_sorted_again():
    """report() and save() each ask for the sample; a collector that took nothing since gives back the same
    arrays instead of sorting up to 100,000 keys once more."""
    rng = np.random.default_rng(12)
    collector = drift.Collector(capacity=100)
    collector.add(pixels_of(rng, 150), probabilities_of(rng, 150))
    first = collector.sample()
    assert all(a is b for a, b in zip(first, collector.sample(), strict=True))


def test_an_empty_collector_saves_the_same_dtypes_as_a_full_one(tmp_path):
    """The archive's columns are uint64 keys and float32 samples whether or not the collector saw an image; one
    that saw none knows no classes (0 columns) and loads back as empty."""
    drift.Collector(capacity=5).save(tmp_path / "empty.npz")
    with np.load(tmp_path / "empty.npz") as npz:
        assert (npz["keys"].dtype, npz["keys"].shape) == (np.uint64, (0,))
        assert (npz["probabilities"].dtype, npz["probabilities"].shape) == (np.float32, (0, 0))
        assert (npz["intensities"].dtype, npz["intensities"].shape) == (np.float32, (0,))
    loaded = drift.Collector.load(tmp_path / "empty.npz")
    assert loaded.seen == 0 and loaded.counts is None and loaded.capacity == 5


def test_a_collector_that_saw_nothing_reports_not_tested():
    rng = np.random.default_rng(4)
    reference = {"probabilities": probabilities_of(rng, 120), "intensity": drift.intensity(pixels_of(rng, 120))}
    report = drift.Collector().report(reference, alpha=0.05, min_images=1)
    assert report == {
        "images": 0,
        "tested_images": 0,
        "reference_images": 120,
        "alpha": 0.05,
        "result": "not tested",
        "reason": "0 images, fewer than drift.min_images=1",
    }


# --- check(): the statistics --------------------------------------------------------------------------------------


@pytest.fixture
def shifted():
    """A reference that never predicts class 9 and a batch of 37 images that predicts it once (a column of
    the class table with a total of one) and is a little darker."""
    rng = np.random.default_rng(5)
    ref_p = probabilities_of(rng, 2000)
    ref_p[:, 9] = 0.0
    batch_p = probabilities_of(rng, 37)
    batch_p[:, 9] = 0.0
    batch_p[0] = np.eye(10, dtype=np.float32)[9]
    reference = {"probabilities": ref_p, "intensity": drift.intensity(pixels_of(rng, 2000))}
    batch_images = (pixels_of(rng, 37) * 0.9).astype(np.uint8)
    return reference, batch_p, drift.intensity(batch_images)


def test_every_number_of_the_report_is_scipys(shifted):
    reference, batch_p, batch_i = shifted
    report = drift.check(reference, batch_p, batch_i, alpha=0.05, min_images=37)  # exactly min_images: tested

    ks = [stats.ks_2samp(reference["probabilities"][:, k], batch_p[:, k]) for k in range(10)]
    reference_counts = [0] * 10
    for k, n in zip(*np.unique(reference["probabilities"].argmax(axis=1), return_counts=True), strict=True):
        reference_counts[k] = int(n)
    batch_counts = [int((batch_p.argmax(axis=1) == k).sum()) for k in range(10)]
    assert reference_counts[9] == 0 and batch_counts[9] == 1
    kept = [k for k in range(10) if reference_counts[k] + batch_counts[k] > 0]
    chi2 = stats.chi2_contingency(np.array([reference_counts, batch_counts])[:, kept])
    shift = stats.ks_2samp(reference["intensity"], batch_i)
    statistics = [float(t.statistic) for t in ks]
    # with 2,000 and 37 images the KS statistics have more than six decimals: the rounding is seen
    assert any(round(s, 6) != round(s, 7) for s in statistics)

    tests = report.pop("tests")
    assert report == {
        "images": 37,
        "tested_images": 37,
        "reference_images": 2000,
        "alpha": 0.05,
        "result": report["result"],
        "drifted_tests": report["drifted_tests"],
    }
    assert tests["ks_softmax_per_class"]["statistics"] == [round(s, 6) for s in statistics]
    assert all(type(s) is float for s in tests["ks_softmax_per_class"]["statistics"])
    assert tests["ks_softmax_per_class"]["p_values"] == pytest.approx([t.pvalue for t in ks], rel=1e-12)
    assert tests["ks_softmax_per_class"]["p_bonferroni"] == pytest.approx(
        min(1.0, 10 * min(t.pvalue for t in ks)), rel=1e-12
    )
    assert tests["chi2_predicted_class"] == {
        "reference_counts": reference_counts,
        "batch_counts": batch_counts,
        "statistic": pytest.approx(chi2.statistic, rel=1e-12),
        "p_value": pytest.approx(chi2.pvalue, rel=1e-12),
        "drift": bool(chi2.pvalue < 0.05),
    }
    assert chi2.statistic > 0 and 0 < chi2.pvalue < 1
    assert tests["ks_mean_intensity"] == {
        "reference_mean": pytest.approx(float(reference["intensity"].mean()), rel=1e-12),
        "batch_mean": pytest.approx(float(batch_i.mean()), rel=1e-12),
        "statistic": pytest.approx(shift.statistic, rel=1e-12),
        "p_value": pytest.approx(shift.pvalue, rel=1e-12),
        "drift": bool(shift.pvalue < 0.05),
    }
    drifted = [name for name, t in tests.items() if t["drift"]]
    assert report["drifted_tests"] == drifted and report["result"] == ("drift" if drifted else "no drift")


def test_a_batch_like_its_reference_has_a_bonferroni_p_of_one():
    """All ten per-class p-values are 1: times ten, capped at 1."""
    rng = np.random.default_rng(6)
    probabilities, intensities = probabilities_of(rng, 300), drift.intensity(pixels_of(rng, 300))
    reference = {"probabilities": probabilities, "intensity": intensities}
    report = drift.check(reference, probabilities, intensities, alpha=0.05, min_images=100)
    assert report["tests"]["ks_softmax_per_class"]["p_values"] == [1.0] * 10
    assert report["tests"]["ks_softmax_per_class"]["p_bonferroni"] == 1.0
    assert report["result"] == "no drift" and report["drifted_tests"] == []


def test_one_predicted_class_leaves_no_chi2_test():
    """Reference and batch predict a single class: no table to test, statistic 0 and p-value 1."""
    rng = np.random.default_rng(7)
    probabilities = probabilities_of(rng, 200)
    probabilities[:, 3] = 5.0  # class 3 wins everywhere
    reference = {"probabilities": probabilities, "intensity": drift.intensity(pixels_of(rng, 200))}
    report = drift.check(reference, probabilities[:150], reference["intensity"][:150], alpha=0.05, min_images=100)
    assert report["tests"]["chi2_predicted_class"] == {
        "reference_counts": [0, 0, 0, 200, 0, 0, 0, 0, 0, 0],
        "batch_counts": [0, 0, 0, 150, 0, 0, 0, 0, 0, 0],
        "statistic": 0.0,
        "p_value": 1.0,
        "drift": False,
    }


@pytest.mark.parametrize(
    "reference_counts, counts",
    [
        ([0, 0, 0, 200, 0, 0, 0, 0, 0, 0], [0, 0, 0, 150, 0, 0, 0, 0, 0, 0]),  # one class in both: one column
        ([0] * 10, [0] * 10),  # nothing at all: no column (scipy refuses an empty table)
    ],
)
def test_the_service_windows_class_p_value_is_one_when_there_is_nothing_to_test(reference_counts, counts):
    """The /metrics gauge's p-value (class_p_value): 1 when fewer than two classes occur, as check() reports."""
    assert drift.class_p_value(np.array(reference_counts), np.array(counts)) == 1.0


def test_the_service_windows_class_p_value_is_scipys():
    reference_counts, counts = np.array([50, 40, 0, 10] + [0] * 6), np.array([5, 9, 0, 1] + [0] * 6)
    expected = stats.chi2_contingency(np.array([[50, 40, 10], [5, 9, 1]])).pvalue
    assert drift.class_p_value(reference_counts, counts) == expected


def test_two_predicted_classes_are_enough_for_a_chi2_test():
    """Reference 50/50 between two classes, batch 90/10: a 2x2 table, and a clear label shift."""
    rng = np.random.default_rng(8)
    reference_p = np.tile(np.eye(10, dtype=np.float32)[[0, 1]], (100, 1))  # 100 of class 0, 100 of class 1
    batch_p = np.eye(10, dtype=np.float32)[[0] * 180 + [1] * 20]
    intensities = drift.intensity(pixels_of(rng, 200))
    report = drift.check({"probabilities": reference_p, "intensity": intensities}, batch_p, intensities, 0.05, 100)
    expected = stats.chi2_contingency(np.array([[100, 100], [180, 20]]))
    chi2 = report["tests"]["chi2_predicted_class"]
    assert chi2["statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert chi2["p_value"] == pytest.approx(expected.pvalue, rel=1e-12) and expected.pvalue < 1e-10
    assert chi2["drift"] and "chi2_predicted_class" in report["drifted_tests"]


@pytest.mark.parametrize(
    "test, p_key",
    [
        ("ks_softmax_per_class", "p_bonferroni"),
        ("chi2_predicted_class", "p_value"),
        ("ks_mean_intensity", "p_value"),
    ],
)
def test_a_p_value_equal_to_alpha_is_not_drift(test, p_key):
    """Each test rejects when p < alpha, strictly: at alpha = p it does not, just above p it does."""
    rng = np.random.default_rng(9)
    reference = {"probabilities": probabilities_of(rng, 400), "intensity": drift.intensity(pixels_of(rng, 400))}
    batch_p = probabilities_of(rng, 300)
    batch_p[:60, 2] += 1.0  # more of class 2, and higher class-2 outputs
    batch_i = drift.intensity((pixels_of(rng, 300) * 0.96).astype(np.uint8))
    p = drift.check(reference, batch_p, batch_i, alpha=0.5, min_images=1)["tests"][test][p_key]
    assert 0 < p < 1
    at = drift.check(reference, batch_p, batch_i, alpha=p, min_images=1)
    above = drift.check(reference, batch_p, batch_i, alpha=float(np.nextafter(p, 1.0)), min_images=1)
    assert at["tests"][test]["drift"] is False and test not in at["drifted_tests"]
    assert above["tests"][test]["drift"] is True and test in above["drifted_tests"]


def test_fewer_images_than_min_images_is_not_tested():
    rng = np.random.default_rng(10)
    reference = {"probabilities": probabilities_of(rng, 50), "intensity": drift.intensity(pixels_of(rng, 50))}
    report = drift.check(reference, probabilities_of(rng, 9), drift.intensity(pixels_of(rng, 9)), 0.01, 10)
    assert report == {
        "images": 9,
        "tested_images": 9,
        "reference_images": 50,
        "alpha": 0.01,
        "result": "not tested",
        "reason": "9 images, fewer than drift.min_images=10",
    }
    assert drift.summary(report) == "drift: not tested (9 images, fewer than drift.min_images=10)"
    assert drift.markdown(report) == "**Drift: not tested** (9 images, fewer than drift.min_images=10).\n"


# --- the summary line and the Markdown artifact -------------------------------------------------------------------


def a_report() -> dict:
    return {
        "images": 500,
        "tested_images": 500,
        "reference_images": 2000,
        "alpha": 0.05,
        "result": "drift",
        "drifted_tests": ["chi2_predicted_class", "ks_mean_intensity"],
        "tests": {
            "ks_softmax_per_class": {"p_bonferroni": 1.0, "drift": False},
            "chi2_predicted_class": {"p_value": 0.000123456, "drift": True},
            "ks_mean_intensity": {"reference_mean": 0.28613, "batch_mean": 0.5, "p_value": 0.0421, "drift": True},
        },
    }


def test_the_markdown_artifact_word_for_word():
    assert drift.markdown(a_report()) == (
        "**Drift: drift** over 500 images, against 2000 reference images, alpha 0.05.\n"
        "\n"
        "| test | p-value | drift |\n"
        "|---|---:|---|\n"
        "| KS per class on softmax outputs (Bonferroni) | 1 | no |\n"
        "| chi² on predicted-class histogram | 0.000123 | yes |\n"
        "| KS on mean intensity (0.286 → 0.500) | 0.0421 | yes |\n"
    )


def test_the_summary_line_word_for_word():
    assert drift.summary(a_report()) == (
        "drift: drift over 500 images (KS softmax p=1 Bonferroni, chi2 classes p=0.000123, "
        "KS intensity p=0.0421; alpha 0.05)"
    )


def test_batches_that_win_no_reservoir_slot_are_counted_and_sampled_from_nothing():
    """Past `capacity` images, a batch can win no slot at all (a one-image batch almost always, once many have
    been seen). It still counts; before the fix, intensity() of zero images raised and predict crashed on
    inputs larger than about four times the capacity."""
    rng = np.random.default_rng(8)
    collector = drift.Collector(capacity=2, seed=0)
    for _ in range(200):
        collector.add(pixels_of(rng, 1), probabilities_of(rng, 1))
    assert collector.seen == 200 and int(collector.counts.sum()) == 200 and len(collector.sample()[0]) == 2
    assert drift.intensity(np.zeros((0, 28, 28), np.uint8)).shape == (0,)


def test_scipy_is_preloaded_only_for_a_batch_that_will_be_tested(monkeypatch):
    """preload starts scipy.stats' import in a daemon thread for a batch of at least min_images (check() tests
    it), and not for a smaller one (reported "not tested", which needs no scipy)."""
    imported: list[str] = []
    monkeypatch.setattr(drift, "importlib", type("Importlib", (), {"import_module": staticmethod(imported.append)}))
    assert drift.preload(199, 200) is None
    assert drift.preload(0, 1) is None
    thread = drift.preload(200, 200)
    assert thread is not None
    thread.join(timeout=60)
    assert thread.daemon and not thread.is_alive()
    assert imported == ["scipy.stats"]
