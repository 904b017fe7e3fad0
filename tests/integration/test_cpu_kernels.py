"""What docs/pipeline.md promises across machines: the training stages write the bytes the committed dvc.lock
records, whichever vectorized kernels torch would pick on the CPU it runs on. A CPU with AVX-512 and one with
only AVX2 are played here by ATEN_CPU_CAPABILITY, and MKL's own choice by leaving MKL_CBWR unset: without
params.yaml's cpu_kernels, the concise implementation's weights differ between the two (measured: AVX-512 and
AVX2 kernels sum in different orders), and both differ from the pinned ones."""

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


@pytest.mark.parametrize("capability", ["avx512", "avx2"])
@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_training_writes_the_recorded_bytes_whatever_the_cpu_would_pick(project, impl, capability):
    # MKL_CBWR unset (`env -u`): MKL picks its own code path for this CPU, as on a machine without the pin
    command = ("env", "-u", "MKL_CBWR", "python", "-m", "softmax_mlops.stages", "train", impl)
    result = run_tool(*command, cwd=project, env={"ATEN_CPU_CAPABILITY": capability})
    assert result.returncode == 0, result.stderr[-2000:]
    weights = f"models/{impl}/weights.npz"
    written = hashlib.md5((project / weights).read_bytes()).hexdigest()
    assert written == recorded(f"train@{impl}", weights), f"{weights} under {capability} kernels"
