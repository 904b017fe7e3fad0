"""What docs/pipeline.md promises across machines: the training stages write the bytes the committed dvc.lock
records, whatever CPU and thread count they run on. Other machines are played here by what a CPU decides and
the stage leaves alone: ATen's vectorized kernels (ATEN_CPU_CAPABILITY), the instruction sets MKL may use
(MKL_ENABLE_INSTRUCTIONS: a CPU without AVX-512, or one where MKL takes no AVX2 path, as on CPUs of another
vendor) and the thread count and MKL's dynamic threading the environment would give. Measured without
params.yaml's cpu_kernels, or with its former `mkl: AVX2` and threads left free: scratch's weights differ under
each of these (docs/pipeline.md has the figures), so this test fails without the pin."""

import hashlib

import pytest
import yaml

from helpers import REPO, copy_project, run_tool

pytestmark = [pytest.mark.realdata, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the repository with the genuine data ingested, and no trained model."""
    root = copy_project(tmp_path_factory.mktemp("kernels") / "project")
    result = run_tool("python", "-m", "softmax_mlops.stages", "ingest", cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def recorded(stage: str, path: str) -> str:
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"][stage]
    return next(out["md5"] for out in lock["outs"] if out["path"] == path)


MACHINES = {  # what the environment of a machine would hold; MKL_CBWR unset: MKL picks its own path there
    "avx512-2-threads": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512", "OMP_NUM_THREADS": "2"},
    "avx2-1-thread": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "MKL_NUM_THREADS": "1"},
    "sse42-3-threads": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "MKL_NUM_THREADS": "3"},
    "dynamic-threads": {"ATEN_CPU_CAPABILITY": "default", "MKL_DYNAMIC": "TRUE", "OMP_NUM_THREADS": "4"},
}


@pytest.mark.parametrize("machine", sorted(MACHINES))
@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_training_writes_the_recorded_bytes_whatever_the_machine(project, impl, machine):
    # `env -u` first drops what the test's own environment holds, then sets the machine's
    unset = [arg for key in ("MKL_CBWR", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "MKL_DYNAMIC") for arg in ("-u", key)]
    settings = [f"{key}={value}" for key, value in MACHINES[machine].items()]
    result = run_tool("env", *unset, *settings, "python", "-m", "softmax_mlops.stages", "train", impl, cwd=project)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = f"models/{impl}/weights.npz"
    written = hashlib.md5((project / weights).read_bytes()).hexdigest()
    assert written == recorded(f"train@{impl}", weights), f"{weights} on the machine {machine}"
